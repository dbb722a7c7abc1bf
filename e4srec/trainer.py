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

Several processes (``accelerate launch --num_processes N`` or ``torchrun``, data-parallel through
DDP): every process builds the same model and draws the same batches, and takes its own slice of each
(:func:`shard_batch`), so ``batch_size`` stays the global batch: the optimizer steps, the schedule
and the batches are those of one process, and a checkpoint resumes under any number of processes.
Each process draws its own dropout and negatives (seeded by (seed, epoch, rank)). The epoch's loss
is that of the global batches; every process validates, and all of them take the main process's
NDCG@10, so that they stop and select alike. The main process alone writes checkpoints, the others
wait for it (one machine, or a shared file system).

Sharded (FSDP2, ``accelerate launch --use_fsdp --fsdp_version 2``, :func:`prepare_fsdp`): the same
batches, slices, loss weights and schedule, but every process holds only its shard of each weight
(frozen backbone included); each transformers layer class the model holds (its backbones'
``_no_split_modules``, LlamaDecoderLayer for a LLaMA) is one FSDP unit, the rest of the model the
root unit. Checkpoints hold whole tensors (gathered from the shards), so they resume under DDP, FSDP
or one process alike. Every process validates (the root unit's weights gathered for it); the
trained model stays sharded, and :func:`e4srec.runs.run` ranks on the main process with a whole copy
rebuilt from the backbone folder and the best checkpoint (:func:`restore_best`).
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
from contextlib import nullcontext
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

# Called on the main process after each epoch's validation, before the epoch's checkpoint is committed,
# as hook(model, data, epoch, device) with the model as that epoch left it (e4srec.sensitivity ranks every
# user after each epoch). The model is put back in training mode after them; they change no weights.
EPOCH_END_HOOKS: list = []


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
    # Batches of similar lengths (as transformers' ``group_by_length``): the epoch's shuffled order is
    # cut into groups of 50 batches, each sorted by length, and the full batches are shuffled again
    # (the smaller last batch stays last). Less padding for models that pad to a batch's longest.
    group_by_length: bool = False

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
            "micro_batch_size), or when the backbone's weights themselves do not fit, load it quantised with "
            f"`load_in: 4bit` (E4SRec params; it shrinks the weights, not the activations). CUDA said: {first_line}")


def batch_rows(batch: dict) -> int:
    return len(batch["user"])


def shard_batch(batch: dict, rank: int, world: int, terms=batch_rows) -> tuple[dict, float]:
    """This process's contiguous slice of a global batch and its share of the batch's loss terms
    (``terms(batch)``, a model's :meth:`~e4srec.recommender.Recommender.loss_terms`; default: rows).

    Under several processes (DDP) every process draws the same global batches and takes its own slice,
    so the global batch, the optimizer steps and the schedule are those of one process. Slices are as
    equal as possible (the first ``rows % world`` processes get one row more), in rank order: together
    they cover the batch once, in order. A process whose slice would be empty (a batch of fewer rows
    than processes, such as an epoch's last) gets the batch's first row with share 0: DDP needs every
    process to run forward and backward, and a zero-weighted loss adds nothing to the gradients."""
    size = len(batch["user"])
    base, extra = divmod(size, world)
    start = rank * base + min(rank, extra)
    stop = start + base + (rank < extra)
    if stop == start:
        return {key: value[:1] for key, value in batch.items()}, 0.0
    if (start, stop) == (0, size):
        return batch, 1.0
    part = {key: value[start:stop] for key, value in batch.items()}
    return part, terms(part) / terms(batch)


def accumulate_gradients(model, batch: dict, share: float, micro_batches: int, accelerator, optimizer,
                         sync: bool = True, terms=batch_rows) -> torch.Tensor:
    """Forward and backward of this process's ``batch``, its ``share`` of the global batch; returns its
    part of the global batch's mean loss (the processes' parts add up to it), a detached 0-dim tensor
    on the device: nothing here waits for the GPU (:class:`StepLosses` checks the losses).

    With ``micro_batches`` > 1 the batch goes through in that many slices whose gradients add up
    (gradient accumulation). Every loss is weighted by its slice's share of the global batch's loss
    terms (the model's ``loss_terms``), times the number of processes since DDP averages their
    gradients: together the gradient of the global batch's mean loss where ``loss_terms`` counts what
    the loss averages over (users by default; E4SRec's packed pairs), an approximation of it otherwise
    (losses averaged over positions, in-batch negatives). DDP all-reduces the gradients during the last
    slice's backward; with ``sync`` False no slice does (the caller reduces them, see
    :func:`_all_reduce_gradients`)."""
    size = len(batch["user"])
    chunk = math.ceil(size / max(micro_batches, 1))
    whole = terms(batch) if chunk < size else None  # the slices' weights are their parts of it
    world = accelerator.num_processes
    optimizer.zero_grad(set_to_none=True)
    total = None
    for start in range(0, size, chunk):
        part = batch if chunk >= size else {key: value[start:start + chunk] for key, value in batch.items()}
        last = start + chunk >= size
        with nullcontext() if sync and last else accelerator.no_sync(model):
            with accelerator.autocast():
                loss = model(part)  # Recommender.forward is calculate_loss (so DDP wrappers sync)
            weight = share if part is batch else terms(part) / whole * share
            accelerator.backward(loss if weight * world == 1 else loss * (weight * world))
        weighted = loss.detach().float() * weight
        total = weighted if total is None else total + weighted
    return total


LOSS_CHECK_STEPS = 50  # steps between the host syncs that read the losses back


class StepLosses:
    """An epoch's step losses, kept on the device and read back every :data:`LOSS_CHECK_STEPS` steps
    and at the end of the epoch (one host sync each, instead of one a step, so that the host queues
    the next steps while the GPU runs). A NaN or infinite loss raises, naming its epoch, step, batch
    and first users; it is found at most that many steps late, always before the epoch is committed."""

    def __init__(self, epoch: int):
        self.epoch, self.total, self.pending = epoch, 0.0, []

    def add(self, loss: torch.Tensor, step: int, index: int, users: torch.Tensor) -> None:
        self.pending.append((loss, step, index, users[:8]))
        if len(self.pending) >= LOSS_CHECK_STEPS:
            self.check()

    def check(self) -> float:
        """Read the pending losses back (raising on a non-finite one); the epoch's sum so far."""
        if self.pending:
            values = torch.stack([loss for loss, *_ in self.pending]).tolist()
            for value, (_, step, index, users) in zip(values, self.pending):
                if not math.isfinite(value):
                    raise FloatingPointError(f"loss is {value} at epoch {self.epoch}, step {step} "
                                             f"(batch {index}, users {users.tolist()}...): lower the learning rate")
            self.total += sum(values)
            self.pending.clear()
        return self.total


def _out_of_memory_anywhere(accelerator, cuda_said: str | None) -> str | None:
    """What CUDA said where any process ran out of memory in this step (None: none did), the same on
    every process, so that all of them retry the step together."""
    from accelerate.utils import gather_object, reduce

    failed = reduce(torch.tensor([cuda_said is not None], dtype=torch.int64, device=accelerator.device), "sum")
    if not failed.item():
        return None
    said = gather_object([cuda_said])
    return next(f"process {rank}: {text}" for rank, text in enumerate(said) if text is not None)


def _all_reduce_gradients(parameters: list[torch.nn.Parameter], world: int) -> None:
    """The mean of every process's gradients, as DDP's reducer would have made it during backward."""
    for parameter in parameters:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        torch.distributed.all_reduce(parameter.grad)
        parameter.grad.div_(world)


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


def fsdp_asked() -> bool:
    """Whether the launcher asked for FSDP (``accelerate launch --use_fsdp`` sets ACCELERATE_USE_FSDP)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def is_sharded(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def transformer_layer_classes(model: torch.nn.Module) -> list[str]:
    """The transformers layer classes the model holds (its submodules' ``_no_split_modules`` that it
    instantiates): FSDP's units. None for a model without a transformers backbone (the baselines)."""
    named = {name for module in model.modules() for name in (getattr(module, "_no_split_modules", None) or [])}
    present = {type(module).__name__ for module in model.modules()}
    return sorted(named & present)


def prepare_fsdp(accelerator, model: torch.nn.Module) -> dict:
    """Set accelerate's FSDP plugin up for ``model`` before ``accelerator.prepare``; what is recorded.

    FSDP2 only (``fully_shard``: per-parameter sharding, so frozen and trainable weights share a unit
    without FSDP1's ``use_orig_params``). Each transformers layer is a unit (transformer-layer
    auto-wrap of :func:`transformer_layer_classes`), the root unit takes the rest (embeddings, the
    item projection and head). The mixed-precision policy keeps every weight in its own dtype and
    reduces gradients in theirs (float32 for LoRA, the projection and the head), as DDP does: bf16
    compute comes from the trainer's autocast in both. Every process loaded the whole model itself,
    so no process broadcasts its weights (``cpu_ram_efficient_loading`` off)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version != 2:
        raise InputError(f"FSDP version {plugin.fsdp_version}: the trainer shards through FSDP2 "
                         "(accelerate launch --use_fsdp --fsdp_version 2)")
    quantised = sorted({str(p.dtype) for p in model.parameters() if not p.is_floating_point()})
    if quantised:
        raise InputError(f"FSDP cannot shard quantised weights ({', '.join(quantised)}: load_in 8bit/4bit); "
                         "load the backbone unquantised (load_in: none) or train with DDP")
    if getattr(model, "shares_prefix", None) is not None:
        model.train()
        if model.shares_prefix(accelerator.device):
            raise InputError("FSDP: the training step shares the instruction prefix's keys and values between rows "
                             "(share_prefix always, or auto on the CPU); they pass from layer to layer outside the "
                             "layers' outputs, so FSDP frees the weights their backward needs. Set share_prefix: "
                             "never (auto does not share in training on a GPU)")
    layers = transformer_layer_classes(model)
    if plugin.auto_wrap_policy is None:
        plugin.auto_wrap_policy = transformer_auto_wrap_policy
    if plugin.transformer_cls_names_to_wrap is None:
        plugin.transformer_cls_names_to_wrap = layers
    plugin.mixed_precision_policy = MixedPrecisionPolicy()
    plugin.cpu_ram_efficient_loading = False
    return {"version": 2, "units": list(plugin.transformer_cls_names_to_wrap) or ["(root only)"],
            "reshard_after_forward": bool(plugin.reshard_after_forward),
            "mixed_precision": "weights and gradient reduction in each weight's own dtype; bf16 by autocast"}


def _is_dtensor(tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def whole_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sharded tensors (FSDP's DTensors) gathered whole, on every process (a collective: all of them
    call it with the same names in the same order); plain tensors as they are."""
    return {name: tensor.full_tensor() if _is_dtensor(tensor) else tensor for name, tensor in tensors.items()}


def _like(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor) as ``target`` holds it: this process's shard where ``target`` is sharded."""
    if not _is_dtensor(target):
        return value
    from torch.distributed.tensor import distribute_tensor

    whole = value.to(device=target.device, dtype=target.dtype)
    return distribute_tensor(whole, target.device_mesh, target.placements, src_data_rank=None)


def make_accelerator(config: TrainConfig):
    from accelerate import Accelerator

    use_cpu = config.device == "cpu" or not torch.cuda.is_available()
    check_device(config)
    precision = config.mixed_precision
    if precision == "auto":
        precision = "no" if use_cpu else "bf16"
    return Accelerator(cpu=use_cpu, mixed_precision=precision)


GROUP_BATCHES = 50  # group_by_length: batches per group sorted by length


def length_grouped(order: np.ndarray, lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """``order`` regrouped so that each batch holds rows of similar ``lengths``; the full batches in a
    random order, the smaller last one (if any) last."""
    group = GROUP_BATCHES * batch_size
    grouped = np.concatenate([chunk[np.argsort(-lengths[chunk], kind="stable")]
                              for chunk in np.split(order, range(group, len(order), group))]) if len(order) else order
    full = len(order) // batch_size
    batches = grouped[:full * batch_size].reshape(full, batch_size)[rng.permutation(full)]
    return np.concatenate([batches.reshape(-1), grouped[full * batch_size:]])


def training_batches(model: Recommender, data: SequenceData, batch_size: int, seed: int, epoch: int,
                     device, group_by_length: bool = False) -> tuple[int, "iter"]:
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
    if group_by_length:
        padded = arrays["sequence"] if "sequence" in arrays else arrays["history"]
        order = length_grouped(order, (padded > 0).sum(axis=1), batch_size, rng)
    n_batches = math.ceil(len(order) / batch_size)

    pinned = torch.device(device).type == "cuda"  # page-locked: the copies need not wait for the GPU

    def upload(array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        return (tensor.pin_memory() if pinned else tensor).to(device, non_blocking=pinned)

    def batches():
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            batch = model.trim_batch({key: value[index] for key, value in arrays.items()})
            yield {key: upload(value) for key, value in batch.items()}

    return n_batches, batches()


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters and buffers (frozen weights such as a backbone are not saved)."""
    state, seen = {}, set()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    buffers = {name for name, _ in model.named_buffers()}
    for name, tensor in model.state_dict().items():
        pointer = (tensor.to_local() if _is_dtensor(tensor) else tensor).data_ptr()  # FSDP: this process's shard
        if (name in trainable or name in buffers) and pointer not in seen:
            seen.add(pointer)
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
    model.load_state_dict({name: _like(tensor, expected[name]) if name in expected else tensor
                           for name, tensor in state.items()}, strict=False)


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
    # the parameter of each id (state_dict numbers them in param_groups order): under FSDP a moment
    # of a sharded parameter is loaded as its shard
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        pid, name = key.split(".", 1)
        param = params[int(pid)] if int(pid) < len(params) else None
        if torch.is_tensor(value) and param is not None and _is_dtensor(param) and value.shape == param.shape:
            value = _like(value, param)
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


def sharded_validation_ndcg10(model: Recommender, data: SequenceData, config: TrainConfig, device) -> float:
    """:func:`validation_ndcg10` of a model sharded by FSDP, on every process at once: scoring is no
    forward call, so the root unit's weights (embeddings, item projection and head) are gathered for
    it and sharded again after; each layer unit gathers its own as it runs. A cache that a model keys
    on its parameter objects (E4SRec's prefix keys and values) is dropped first: FSDP replaced them."""
    if getattr(model, "_prefix_cache", None) is not None:
        model._prefix_cache = None
    model.unshard()
    try:
        return validation_ndcg10(model, data, config, device)
    finally:
        model.reshard()


def restore_best(model: Recommender, checkpoint_dir: str | Path, record: dict) -> None:
    """Load the best checkpoint of a finished run (its record: :func:`train`'s) into a fresh, whole copy
    of its model (after FSDP, whose trained model stays sharded); none where no epoch was trained."""
    if record.get("best_epoch", -1) >= 0:
        best = Path(checkpoint_dir) / "best.safetensors"
        load_trainable_state(model, load_tensors(best), best)


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
    sharded = is_sharded(accelerator)
    if fsdp_asked() and not sharded and accelerator.num_processes > 1:
        raise RuntimeError(f"FSDP was asked for (ACCELERATE_USE_FSDP, accelerate launch --use_fsdp), but accelerate "
                           f"runs these {accelerator.num_processes} processes as {accelerator.distributed_type.value}: "
                           "it turns FSDP on for GPU processes only (on the CPU it keeps DDP)")
    if sharded and EPOCH_END_HOOKS:
        raise InputError("epoch-end hooks (per-epoch ranks) need the whole model on the main process: not under FSDP")
    seed_everything(config.seed)
    if not sharded:  # FSDP moves each unit's shard to the GPU itself (never the whole model)
        model.to(device)
    model.fit(data)  # runs on the model's device (S3-Rec pretrains here)
    record = {"config": dataclasses.asdict(config), "device": str(device), "world_size": accelerator.num_processes,
              "distributed_type": accelerator.distributed_type.value, "epochs": []}
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
    if sharded:
        record["fsdp"] = prepare_fsdp(accelerator, model)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    if sharded:  # fully_shard replaced the parameters by their shards (DTensors)
        parameters = [p for p in model.parameters() if p.requires_grad]
        record["fsdp"].update(parameters=sum(p.numel() for p in model.parameters()), parameters_here=sum(
            (p.to_local() if _is_dtensor(p) else p).numel() for p in model.parameters()))  # the main process's shard
        if config.oom_retry:
            raise InputError("oom_retry is not available under FSDP: its reduce-scatter starts during backward and "
                             "cannot be taken back when one process runs out of memory; train without oom_retry")

    state = {"epoch": -1, "best_epoch": -1, "best_valid_ndcg10": -1.0, "bad_epochs": 0, "step": 0,
             "train_seconds": 0.0, "epochs": []}
    state_path = checkpoint_dir / "state.json"
    if resume_key is not None:
        resume_key = json.loads(json.dumps(resume_key, sort_keys=True, default=str))
        state["resume_key"] = resume_key
    main = accelerator.is_main_process  # the one process that writes or deletes checkpoint files
    if main:
        if resume_key is not None:
            _discard_foreign_checkpoint(checkpoint_dir, resume_key)
        # finish (or drop) a checkpoint cut short; without state.json, drop the staged files of a run
        # killed in epoch 0
        _settle_checkpoint(checkpoint_dir, read_json(state_path)["epoch"] if state_path.exists() else -1)
    accelerator.wait_for_everyone()  # the others read the checkpoint only once it is settled
    if state_path.exists():  # resume
        state = read_json(state_path)
        load_trainable_state(raw_model, load_tensors(checkpoint_dir / "last.safetensors"), checkpoint_dir / "last.safetensors")
        _load_optimizer(optimizer, load_tensors(checkpoint_dir / "optimizer.safetensors"), state["optimizer"])
        with warnings.catch_warnings():  # replaying the schedule before any optimizer step is intended
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            for _ in range(state["step"]):
                scheduler.step()
        if main:
            log.info("resumed from %s after epoch %d", checkpoint_dir, state["epoch"])

    model.train()
    micro_batches = state.get("micro_batches", 1)  # > 1 after an out-of-memory retry (oom_retry)
    world, rank = accelerator.num_processes, accelerator.process_index
    # Several processes with oom_retry: each computes its gradients alone, and they are all-reduced only
    # once every process got through the step. DDP's own all-reduce, which starts during backward,
    # cannot be taken back when one process runs out of memory while the others already wait in it.
    deferred = world > 1 and config.oom_retry
    for epoch in range(state["epoch"] + 1, config.epochs):
        if state["bad_epochs"] >= config.patience:
            break
        seed_everything(config.seed, epoch)
        raw_model.on_epoch_start(data, epoch)
        if world > 1:  # the same epoch set-up everywhere, but each process its own dropout and negatives
            seed_everything(config.seed, epoch, rank)
        n_batches, batches = training_batches(raw_model, data, config.batch_size, config.seed, epoch, device,
                                              config.group_by_length)
        n_batches = min(n_batches, config.max_steps_per_epoch or n_batches)
        started, losses, examples = time.perf_counter(), StepLosses(epoch), 0
        count_tokens = getattr(raw_model, "backbone_tokens", None)  # LLM-based models: tokens per second
        tokens = torch.zeros((), dtype=torch.long, device=device)
        bar = tqdm(batches, total=n_batches, desc=f"{data.name} epoch {epoch}", disable=not (progress and main),
                   leave=False)
        for index, batch in enumerate(bar):
            if index >= n_batches:
                break
            shard, share = shard_batch(batch, rank, world, raw_model.loss_terms)  # one process: the whole batch
            while True:
                cuda_said = None
                try:
                    loss = accumulate_gradients(model, shard, share, micro_batches, accelerator, optimizer,
                                                sync=not deferred, terms=raw_model.loss_terms)
                except torch.cuda.OutOfMemoryError as err:
                    if not config.oom_retry or micro_batches >= len(shard["user"]):
                        raise RuntimeError(out_of_memory_message(config, epoch, state["step"], device, err,
                                                                 micro_batches)) from err
                    cuda_said = (str(err).strip().splitlines() or ["CUDA out of memory"])[0]
                if deferred:
                    cuda_said = _out_of_memory_anywhere(accelerator, cuda_said)
                if cuda_said is None:
                    break
                # outside the except block: the failed attempt's tensors are freed before the retry
                micro_batches = _split_after_out_of_memory(optimizer, state, micro_batches, len(shard["user"]),
                                                           epoch, cuda_said)
            if deferred:
                _all_reduce_gradients(parameters, world)
            if config.max_grad_norm:
                accelerator.clip_grad_norm_(parameters, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            losses.add(loss, state["step"], index, batch["user"])
            state["step"] += 1
            examples += len(batch["user"])
            if count_tokens is not None:
                tokens += count_tokens(batch)
            if not losses.pending:  # just read back: this process's slices, scaled
                bar.set_postfix(loss=f"{losses.total * world / (index + 1):.4f}")
        total_loss = losses.check()  # waits for the epoch's last step
        seconds = time.perf_counter() - started
        valid = (sharded_validation_ndcg10 if sharded else validation_ndcg10)(raw_model, data, config, device)
        if world > 1:  # the global batches' mean loss; every process keeps the main one's validation
            from accelerate.utils import broadcast, reduce

            total_loss = reduce(torch.tensor(total_loss, dtype=torch.float64, device=device), "sum").item()
            valid = broadcast(torch.tensor([valid], dtype=torch.float64, device=device)).item()
        improved = valid > state["best_valid_ndcg10"]
        state["epochs"].append({"epoch": epoch, "loss": total_loss / max(n_batches, 1), "valid_ndcg10": valid,
                                "seconds": seconds, "examples": examples,
                                **({"tokens": int(tokens)} if count_tokens is not None else {})})
        state["train_seconds"] += seconds
        state["epoch"] = epoch
        if improved:
            state.update(best_epoch=epoch, best_valid_ndcg10=valid, bad_epochs=0)
        else:
            state["bad_epochs"] += 1
        if main and EPOCH_END_HOOKS:  # before the commit: an epoch that was committed has had its hooks
            for hook in EPOCH_END_HOOKS:
                hook(raw_model, data, epoch, device)
            raw_model.train()
        if sharded:  # every process gathers the whole tensors (collectives); the main one writes them
            weights = whole_tensors(trainable_state(raw_model))
            opt_tensors, state["optimizer"] = _optimizer_tensors(optimizer)
            opt_tensors = whole_tensors(opt_tensors)
        if main:
            log.info("%s epoch %d: loss %.4f, valid NDCG@10 %.4f, %.1f s", data.name, epoch,
                     total_loss / max(n_batches, 1), valid, seconds)
            if not sharded:
                weights = trainable_state(raw_model)
            tag = {"epoch": str(epoch)}  # staged, then committed by state.json (see _settle_checkpoint)
            if improved:
                save_tensors(checkpoint_dir / "best.next.safetensors", weights, metadata=tag)
            if not sharded:
                opt_tensors, state["optimizer"] = _optimizer_tensors(optimizer)
            save_tensors(checkpoint_dir / "last.next.safetensors", weights, metadata=tag)
            save_tensors(checkpoint_dir / "optimizer.next.safetensors", opt_tensors, metadata=tag)
            write_json(state_path, state)  # the commit: it marks the epoch as complete
            _settle_checkpoint(checkpoint_dir, epoch)
        accelerator.wait_for_everyone()  # no process reads a checkpoint before it is complete

    if state["best_epoch"] >= 0:
        best = checkpoint_dir / "best.safetensors"
        load_trainable_state(raw_model, load_tensors(best), best)
    record.update({k: v for k, v in state.items() if k not in ("optimizer", "resume_key")})
    early = state["bad_epochs"] >= config.patience and state["epoch"] < config.epochs - 1
    record["stopped"] = "early stopping" if early else "epoch limit"
    record["peak_memory_mb"] = _peak_memory_mb(device)
    return record
