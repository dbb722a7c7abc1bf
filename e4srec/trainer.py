"""The one trainer of the suite: baselines and E4SRec train through :func:`train`.

Adam(W), optional cosine schedule with warmup, validation on the held-out validation item after
every epoch (full ranking, NDCG@10, no history masking), early stopping with patience, the best
checkpoint restored at the end. Runs through ``accelerate`` (bf16 autocast on a GPU, fp32 on the
CPU). Resumable: after each epoch the trainable weights, the optimizer and the trainer state are
written atomically (safetensors + JSON); each epoch reseeds from (seed, epoch), so a resumed run
ends with the same weights as an uninterrupted one on the CPU. An epoch's tensors are first staged
(``*.next.safetensors``, tagged with the epoch), ``state.json`` commits them, and only then do they
replace ``best``/``last``/``optimizer``: a process killed at any moment resumes from one
consistent epoch (uncommitted staged files are dropped, committed ones moved into place).
A checkpoint is resumed only under the resume key it was written with (settings and input sha256,
from :func:`e4srec.runs.run`): a job rerun with other parameters or inputs starts over. With
``oom_retry`` a step out of GPU memory is retried in micro-batches (gradient accumulation).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import resource
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import SequenceData
from .evaluate import rank_split
from .files import InputError, load_tensors, read_json, read_metadata, save_tensors, write_json
from .metrics import ndcg
from .recommender import Recommender

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainConfig:
    epochs: int = 200
    batch_size: int = 256
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 10  # epochs without a better validation NDCG@10 before stopping
    scheduler: str = "constant"  # or "cosine" (with linear warmup)
    warmup_steps: int = 0
    max_grad_norm: float | None = None
    eval_batch_size: int = 512
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    mixed_precision: str = "auto"  # auto (bf16 on GPU, no on CPU) | bf16 | no
    max_steps_per_epoch: int | None = None  # cap (smoke tests and quick profiles only)
    # On CUDA out of memory, retry the step as 2, 4, 8 ... micro-batches whose gradients are summed
    # (gradient accumulation): the same effective batch and the same optimizer steps. Recorded in
    # the training record (``oom_retries``, ``micro_batches``) and kept for the rest of the run.
    oom_retry: bool = False

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"trainer settings: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**values)


def seed_everything(*seeds: int) -> None:
    """Seed torch (CPU and GPU) from a tuple of integers."""
    torch.manual_seed(int(np.random.SeedSequence(list(seeds)).generate_state(1)[0]))


def check_device(config: TrainConfig) -> None:
    """Fail at once (before any data or model is loaded) when a GPU is asked for but none is visible."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was asked for, but no GPU is visible (torch.cuda.is_available() is False)")


def out_of_memory_message(config: TrainConfig, epoch: int, step: int, device, err: BaseException,
                          micro_batches: int = 1) -> str:
    """What to lower when a training step runs out of GPU memory."""
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    retry = (f"even in {micro_batches} micro-batches (oom_retry); " if micro_batches > 1 else
             "or set `oom_retry: true` (trainer settings) to retry in micro-batches; " if not config.oom_retry else "")
    return (f"out of GPU memory in the training step (epoch {epoch}, step {step}, batch_size {config.batch_size}, "
            f"device {device}): {retry}lower batch_size (now {config.batch_size}; for instruction tuning, "
            "micro_batch_size), or for a large backbone load it quantised with `load_in: 4bit` "
            f"(E4SRec params). CUDA said: {first_line}")


def optimizer_step(model, batch: dict, micro_batches: int, accelerator, optimizer, parameters, config: TrainConfig,
                   epoch: int, step: int, index: int) -> float:
    """Forward, backward and one optimizer step on ``batch``; returns the batch's loss. With
    ``micro_batches`` > 1 the batch goes through in that many slices whose losses are weighted by
    their share of the batch and whose gradients add up before the one step (gradient accumulation):
    the gradient of the whole batch's mean loss for losses that average over the batch's users, an
    approximation of it for losses averaged over positions or using in-batch negatives."""
    size = len(batch["user"])
    chunk = math.ceil(size / max(micro_batches, 1))
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for start in range(0, size, chunk):
        part = batch if chunk >= size else {key: value[start:start + chunk] for key, value in batch.items()}
        with accelerator.autocast():
            loss = model(part)  # Recommender.forward is calculate_loss (so DDP wrappers sync)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch}, step {step} "
                                     f"(batch {index}, users {part['user'][:8].tolist()}...): "
                                     "lower the learning rate")
        weight = len(part["user"]) / size
        accelerator.backward(loss if chunk >= size else loss * weight)
        total += loss.item() * weight
    if config.max_grad_norm:
        accelerator.clip_grad_norm_(parameters, config.max_grad_norm)
    optimizer.step()
    return total


def _split_after_out_of_memory(optimizer, state: dict, micro_batches: int, size: int, epoch: int,
                               cuda_said: str) -> int:
    """Twice as many micro-batches for the step that ran out of memory and every later one (recorded)."""
    optimizer.zero_grad(set_to_none=True)  # gradients of the failed attempt
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    micro_batches = min(micro_batches * 2, size)
    state["micro_batches"] = micro_batches
    state.setdefault("oom_retries", []).append({"epoch": epoch, "step": state["step"], "micro_batches": micro_batches,
                                                "micro_batch_size": math.ceil(size / micro_batches),
                                                "cuda_said": cuda_said})
    log.warning("out of GPU memory at epoch %d, step %d (%s): retrying the step as %d micro-batches of up to %d "
                "examples (gradient accumulation: same effective batch size %d, same optimizer steps)", epoch,
                state["step"], cuda_said, micro_batches, math.ceil(size / micro_batches), size)
    return micro_batches


CHECKPOINT_FILES = ("best", "last", "optimizer")


def _settle_checkpoint(checkpoint_dir: Path, epoch: int) -> None:
    """Move the files staged for ``epoch`` (committed by state.json) into place; delete any other
    staged file (an epoch killed before its commit)."""
    for name in CHECKPOINT_FILES:
        staged = checkpoint_dir / f"{name}.next.safetensors"
        if not staged.exists():
            continue
        try:
            staged_epoch = read_metadata(staged).get("epoch")
        except Exception:  # noqa: BLE001 (unreadable: never committed)
            staged_epoch = None
        if staged_epoch == str(epoch):
            os.replace(staged, checkpoint_dir / f"{name}.safetensors")
        else:
            staged.unlink()


def make_accelerator(config: TrainConfig):
    from accelerate import Accelerator

    use_cpu = config.device == "cpu" or not torch.cuda.is_available()
    check_device(config)
    precision = config.mixed_precision
    if precision == "auto":
        precision = "no" if use_cpu else "bf16"
    return Accelerator(cpu=use_cpu, mixed_precision=precision)


def training_batches(model: Recommender, data: SequenceData, batch_size: int, seed: int, epoch: int,
                     device) -> tuple[int, "iter"]:
    """(number of batches, iterator of batch dicts) for one epoch, shuffled by (seed, epoch)."""
    rng = np.random.default_rng([seed, epoch])
    if model.training_input == "sequences":
        sequences = data.training_sequences()
        keep = np.flatnonzero((sequences[:, :-1] > 0).any(axis=1) & (sequences[:, 1:] > 0).any(axis=1))
        arrays = {"user": keep, "sequence": sequences[keep]}
    elif model.training_input == "examples":
        users, histories, targets = data.training_examples()
        arrays = {"user": users, "history": histories, "target": targets}
    else:
        return 0, iter(())
    order = rng.permutation(len(arrays["user"]))
    n_batches = math.ceil(len(order) / batch_size)

    def batches():
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            yield {key: torch.from_numpy(np.ascontiguousarray(value[index])).to(device) for key, value in arrays.items()}

    return n_batches, batches()


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters and buffers (frozen weights such as a backbone are not saved)."""
    state, seen = {}, set()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    buffers = {name for name, _ in model.named_buffers()}
    for name, tensor in model.state_dict().items():
        if (name in trainable or name in buffers) and tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            state[name] = tensor
    return state


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    expected = trainable_state(model)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise InputError(f"{path}: checkpoint lacks {missing[:3]} ({len(missing)} tensors): it was saved by another model")
    for name, tensor in state.items():
        if name in expected and tuple(expected[name].shape) != tuple(tensor.shape):
            raise InputError(f"{path}: tensor {name} has shape {tuple(tensor.shape)}, the model expects "
                             f"{tuple(expected[name].shape)}")
    model.load_state_dict(state, strict=False)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state_dict = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, state in state_dict["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _peak_memory_mb(device) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def validation_ndcg10(model: Recommender, data: SequenceData, config: TrainConfig, device) -> float:
    model.eval()
    with torch.no_grad():
        ranks = rank_split(model.full_sort_predict, data, "valid", config.eval_batch_size, device)["full"]
    model.train()
    return ndcg(ranks, 10)


def _discard_foreign_checkpoint(checkpoint_dir: Path, resume_key: dict) -> None:
    """Delete the checkpoint of ``checkpoint_dir`` when it was written for another resume key (other
    settings or inputs: a job rerun because they changed must start over, not resume)."""
    state_path = checkpoint_dir / "state.json"
    if not state_path.exists():
        return
    saved = read_json(state_path).get("resume_key")
    if saved == resume_key:
        return
    differ = sorted(k for k in set(resume_key) | set(saved or {}) if (saved or {}).get(k) != resume_key.get(k))
    log.warning("%s: checkpoint written for other settings or inputs (%s): starting over", checkpoint_dir,
                f"{', '.join(differ)} differ" if saved is not None else "it records none")
    state_path.unlink()  # first: without state.json nothing below is ever resumed from
    for name in CHECKPOINT_FILES:
        for path in (checkpoint_dir / f"{name}.safetensors", checkpoint_dir / f"{name}.next.safetensors"):
            path.unlink(missing_ok=True)


def train(model: Recommender, data: SequenceData, config: TrainConfig, checkpoint_dir: str | Path,
          progress: bool = True, resume_key: dict | None = None) -> dict:
    """Train ``model`` on ``data``; return the training record. The best model is loaded at the end.

    ``resume_key`` (JSON-able: settings and input checksums, see :func:`e4srec.runs.run`) is stored
    with every checkpoint; a checkpoint stored with another key is discarded and training starts
    over, so that a job rerun because its parameters or inputs changed never resumes the old run."""
    checkpoint_dir = Path(checkpoint_dir)
    accelerator = make_accelerator(config)
    device = accelerator.device
    seed_everything(config.seed)
    model.to(device)
    model.fit(data)  # runs on the model's device (S3-Rec pretrains here)
    record = {"config": dataclasses.asdict(config), "device": str(device), "epochs": []}
    if model.training_input == "none":
        record.update(best_epoch=0, stopped="no training (fitted statistics)", train_seconds=0.0)
        return record

    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay) \
        if config.weight_decay else torch.optim.Adam(parameters, lr=config.learning_rate)
    steps_per_epoch, _ = training_batches(model, data, config.batch_size, config.seed, 0, "cpu")
    if config.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
    if config.scheduler == "cosine":
        from transformers import get_cosine_schedule_with_warmup

        scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, steps_per_epoch * config.epochs)
    else:
        from transformers import get_constant_schedule_with_warmup

        scheduler = get_constant_schedule_with_warmup(optimizer, config.warmup_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)

    state = {"epoch": -1, "best_epoch": -1, "best_valid_ndcg10": -1.0, "bad_epochs": 0, "step": 0,
             "train_seconds": 0.0, "epochs": []}
    state_path = checkpoint_dir / "state.json"
    if resume_key is not None:
        resume_key = json.loads(json.dumps(resume_key, sort_keys=True, default=str))
        state["resume_key"] = resume_key
        _discard_foreign_checkpoint(checkpoint_dir, resume_key)
    if state_path.exists():  # resume
        state = read_json(state_path)
        _settle_checkpoint(checkpoint_dir, state["epoch"])  # finish (or drop) a checkpoint cut short
        load_trainable_state(raw_model, load_tensors(checkpoint_dir / "last.safetensors"), checkpoint_dir / "last.safetensors")
        _load_optimizer(optimizer, load_tensors(checkpoint_dir / "optimizer.safetensors"), state["optimizer"])
        with warnings.catch_warnings():  # replaying the schedule before any optimizer step is intended
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            for _ in range(state["step"]):
                scheduler.step()
        log.info("resumed from %s after epoch %d", checkpoint_dir, state["epoch"])
    else:
        _settle_checkpoint(checkpoint_dir, state["epoch"])  # drops staged files of a run killed in epoch 0

    model.train()
    micro_batches = state.get("micro_batches", 1)  # > 1 after an out-of-memory retry (oom_retry)
    for epoch in range(state["epoch"] + 1, config.epochs):
        if state["bad_epochs"] >= config.patience:
            break
        seed_everything(config.seed, epoch)
        raw_model.on_epoch_start(data, epoch)
        n_batches, batches = training_batches(raw_model, data, config.batch_size, config.seed, epoch, device)
        n_batches = min(n_batches, config.max_steps_per_epoch or n_batches)
        started, total_loss, examples = time.perf_counter(), 0.0, 0
        bar = tqdm(batches, total=n_batches, desc=f"{data.name} epoch {epoch}", disable=not progress, leave=False)
        for index, batch in enumerate(bar):
            if index >= n_batches:
                break
            while True:
                cuda_said = None
                try:
                    loss = optimizer_step(model, batch, micro_batches, accelerator, optimizer, parameters, config,
                                          epoch, state["step"], index)
                except torch.cuda.OutOfMemoryError as err:
                    if not config.oom_retry or micro_batches >= len(batch["user"]):
                        raise RuntimeError(out_of_memory_message(config, epoch, state["step"], device, err,
                                                                 micro_batches)) from err
                    cuda_said = (str(err).strip().splitlines() or ["CUDA out of memory"])[0]
                if cuda_said is None:
                    break
                # outside the except block: the failed attempt's tensors are freed before the retry
                micro_batches = _split_after_out_of_memory(optimizer, state, micro_batches, len(batch["user"]),
                                                           epoch, cuda_said)
            scheduler.step()
            state["step"] += 1
            total_loss += loss
            examples += len(batch["user"])
            bar.set_postfix(loss=f"{total_loss / (index + 1):.4f}")
        seconds = time.perf_counter() - started
        valid = validation_ndcg10(raw_model, data, config, device)
        improved = valid > state["best_valid_ndcg10"]
        state["epochs"].append({"epoch": epoch, "loss": total_loss / max(n_batches, 1), "valid_ndcg10": valid,
                                "seconds": seconds, "examples": examples})
        state["train_seconds"] += seconds
        log.info("%s epoch %d: loss %.4f, valid NDCG@10 %.4f, %.1f s", data.name, epoch,
                 total_loss / max(n_batches, 1), valid, seconds)
        weights = trainable_state(raw_model)
        tag = {"epoch": str(epoch)}  # staged, then committed by state.json (see _settle_checkpoint)
        if improved:
            state.update(best_epoch=epoch, best_valid_ndcg10=valid, bad_epochs=0)
            save_tensors(checkpoint_dir / "best.next.safetensors", weights, metadata=tag)
        else:
            state["bad_epochs"] += 1
        opt_tensors, opt_meta = _optimizer_tensors(optimizer)
        save_tensors(checkpoint_dir / "last.next.safetensors", weights, metadata=tag)
        save_tensors(checkpoint_dir / "optimizer.next.safetensors", opt_tensors, metadata=tag)
        state["epoch"] = epoch
        state["optimizer"] = opt_meta
        write_json(state_path, state)  # the commit: it marks the epoch as complete
        _settle_checkpoint(checkpoint_dir, epoch)

    if state["best_epoch"] >= 0:
        best = checkpoint_dir / "best.safetensors"
        load_trainable_state(raw_model, load_tensors(best), best)
    record.update({k: v for k, v in state.items() if k not in ("optimizer", "resume_key")})
    early = state["bad_epochs"] >= config.patience and state["epoch"] < config.epochs - 1
    record["stopped"] = "early stopping" if early else "epoch limit"
    record["peak_memory_mb"] = _peak_memory_mb(device)
    return record
