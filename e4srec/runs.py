"""One run = one (dataset, model, variant, seed): build, train, rank, write ranks and record.

A run folder holds ``ranks.parquet`` (the per-user ranks, the source of every metric), ``run.json``
(provenance, resolved configuration, training history, timings) and, where the model has them,
``item_embeddings.safetensors`` ([n_items + 1, d], row 0 padding) taken from the checkpoint
selected on the validation item. Checkpoints live in ``checkpoints/`` (not committed).

Under several processes (``accelerate launch``/``torchrun``, data-parallel training, see
:mod:`e4srec.trainer`) every process trains; then the main process alone ranks the users and writes
the run folder, and the others return None at once (the ranking is not sharded). After FSDP, whose
trained model stays sharded, the main process ranks with a whole copy: the model built again from
its inputs and given the best checkpoint.
"""
from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import time
import types
import typing
from pathlib import Path

import numpy as np
import torch

from . import compile_cache, provenance
from .data import SequenceData
from .evaluate import rank_all
from .files import InputError, save_tensors, sha256_file, write_json, write_parquet
from .metrics import all_metrics
from .recommender import Recommender
from .trainer import TrainConfig, check_device, make_accelerator, restore_best, seed_everything, train

log = logging.getLogger(__name__)


def registry() -> dict[str, str]:
    from baselines import MODELS

    return {**MODELS, "E4SRec": "e4srec.model:E4SRec"}


# Variants that are another class (Figure 3's ablations without the LLM); any other variant is the
# model's own class with other parameters or inputs.
VARIANT_MODELS = {("E4SRec", "no-llm"): "e4srec.ablations:E4SRecNoLLM",
                  ("E4SRec", "bert-encoder"): "e4srec.ablations:E4SRecEncoder"}


def model_class(name: str, variant: str = "default") -> type[Recommender]:
    models = registry()
    if name not in models:
        raise InputError(f"unknown model {name!r}; known models: {', '.join(models)}")
    module, cls = VARIANT_MODELS.get((name, variant), models[name]).split(":")
    return getattr(importlib.import_module(module), cls)


def _has_type(value, hint) -> bool:
    """Whether a JSON/YAML value fits a dataclass field's annotation (an int fits float; bool is not an int)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        args = typing.get_args(hint)
        return isinstance(value, list) and all(_has_type(v, args[0]) for v in value) if args else isinstance(value, list)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint in (str, bool, dict, tuple):
        return isinstance(value, hint)
    return True  # anything else is left to the dataclass


def model_config(cls: type[Recommender], params: dict, where: str = "config"):
    """The model's hyperparameter dataclass from a dict; an unknown key or a value of the wrong type is an
    error that names it."""
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise InputError(f"{where}: unknown parameter(s) {unknown} for {cls.__name__}; known: {sorted(fields)}")
    try:
        hints = typing.get_type_hints(cls.config_class)
    except Exception:  # noqa: BLE001 (an annotation that does not evaluate: leave the checks to the dataclass)
        hints = {}
    for key, value in params.items():
        if key in hints and not _has_type(value, hints[key]):
            kind = hints[key].__name__ if isinstance(hints[key], type) else str(hints[key])
            raise InputError(f"{where}: parameter {key!r} of {cls.__name__} must be {kind}, got {value!r}")
    return cls.config_class(**params)


def build_model(name: str, data: SequenceData, params: dict | None = None, variant: str = "default",
                **context) -> Recommender:
    cls = model_class(name, variant)
    config = model_config(cls, params or {}, f"parameters of {name}")
    return cls(n_items=data.n_items, n_users=data.n_users, max_len=data.max_len, config=config, **context)


def input_checksums(dataset_dir: str | Path) -> dict[str, str]:
    folder = Path(dataset_dir)
    return {name: sha256_file(folder / name) for name in ("sequences.parquet", "negatives.parquet", "dataset.json")}


# Trainer settings a checkpoint may be resumed under when they changed (no effect on the weights).
RESUME_INDEPENDENT = ("device", "eval_batch_size", "oom_retry")


def resume_key(model: Recommender, params: dict | None, train_config: TrainConfig, checksums: dict) -> dict:
    """What a run's checkpoints must have been trained with to be resumed: the model class and
    parameters, the trainer settings (but ``RESUME_INDEPENDENT``), the dataset files' sha256 and, for
    E4SRec, the item table's and the backbone's. A rerun with any of them changed (Snakemake reruns a
    job whose parameters or inputs changed) starts over instead of resuming the old run."""
    source = getattr(model, "item_embeddings_source", None) or {}
    backbone = getattr(model, "backbone_record", None) or {}
    return {"model": f"{type(model).__module__}:{type(model).__name__}",
            "params": dataclasses.asdict(model_config(type(model), params or {})),
            "train": {k: v for k, v in dataclasses.asdict(train_config).items() if k not in RESUME_INDEPENDENT},
            "data_sha256": checksums, "item_embeddings_sha256": source.get("sha256"),
            "backbone_weights_sha256": backbone.get("weights_sha256")}


GPU_NOTE = ("CPU runs with the same seed, thread count and package versions give the same ranks bit for bit "
            "(tests/test_reliability.py); GPU runs are not bitwise reproducible (non-deterministic CUDA "
            "kernels such as atomic adds in scatter/index_add and embedding backward, cuBLAS and cuDNN "
            "algorithm choice, bf16 autocast, torch.compile): reruns on a GPU agree only statistically")


def nondeterminism_settings(device) -> dict:
    """The settings that decide whether a rerun gives the same numbers bit for bit."""
    return {
        "device_type": torch.device(device).type,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "deterministic_algorithms_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "torch_threads": torch.get_num_threads(),
        "note": GPU_NOTE,
    }


def _synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_bare_backbone(model, data: SequenceData, batch_size: int, device) -> dict:
    """Seconds the bare backbone takes over every user's validation prompt (``bare_backbone_hidden``:
    LoRA off, no prefix cache, no item scorer, no ranking), in batches of ``batch_size``, after one
    untimed batch: Table 4's "LLM alone" beside E4SRec's evaluation pass."""
    histories = torch.from_numpy(data.padded_histories("valid"))
    model.bare_backbone_hidden(histories[:batch_size].to(device))  # warm-up
    _synchronize(device)
    started = time.perf_counter()
    for start in range(0, data.n_users, batch_size):
        model.bare_backbone_hidden(histories[start:start + batch_size].to(device))
    _synchronize(device)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "users": data.n_users, "users_per_second": data.n_users / seconds,
            "batch_size": batch_size, "split": "valid",
            "what": "backbone forward over each user's whole prompt; LoRA off, no prefix cache, no item scorer"}


def run(dataset_dir: str | Path, model_name: str, out_dir: str | Path, *, variant: str = "default",
        seed: int = 0, params: dict | None = None, train_params: dict | None = None,
        ties: str = "pessimistic", progress: bool = True, time_backbone: bool = False, **context) -> dict | None:
    """Train and evaluate one model on one prepared dataset; write the run folder; return its record
    (None on a process other than the main one of several: only the main one evaluates and writes).
    ``time_backbone``: an LLM-based model also times its bare backbone on the same prompts (Table 4)."""
    out_dir = Path(out_dir)
    provenance.git_state()  # the commit as the run starts (cached): the code that actually ran
    train_config = TrainConfig.from_dict({**(train_params or {}), "seed": seed})
    check_device(train_config)  # no GPU for device: cuda -> fail before loading anything
    data = SequenceData.load(dataset_dir)
    torch.manual_seed(seed)
    np.random.seed(seed)
    model = build_model(model_name, data, params, variant=variant, **context)
    started = time.perf_counter()
    checksums = input_checksums(dataset_dir)
    training = train(model, data, train_config, out_dir / "checkpoints", progress=progress,
                     resume_key=resume_key(model, params, train_config, checksums))
    accelerator = make_accelerator(train_config)
    # Training held the last collective operation: every process leaves the process group now (under
    # NCCL, a process that exits without this is warned), and the main one evaluates alone.
    accelerator.end_training()
    if not accelerator.is_main_process:
        return None
    device = accelerator.device
    if "fsdp" in training:  # FSDP left the trained weights sharded over the processes: rank with a whole copy,
        del model  # built as above (same seeds, fitted as train() fits) and given the best checkpoint
        torch.manual_seed(seed)
        np.random.seed(seed)
        model = build_model(model_name, data, params, variant=variant, **context).to(device)
        seed_everything(seed)
        model.fit(data)
        restore_best(model, out_dir / "checkpoints", training)
    model.to(device).eval()
    eval_started = time.perf_counter()
    ranks = rank_all(model.full_sort_predict, data, train_config.eval_batch_size, device, ties)
    eval_seconds = time.perf_counter() - eval_started
    evaluation = {"ties": ties, "history_masking": "both (columns full and full_masked)",
                  "selection": "best validation NDCG@10 (full ranking); the test item is never used for selection",
                  "seconds": eval_seconds, "users": data.n_users}
    if time_backbone and hasattr(model, "bare_backbone_hidden"):
        evaluation["bare_backbone"] = time_bare_backbone(model, data, train_config.eval_batch_size, device)
    summary = {f"{split}_{protocol}": {f"{m}@{k}" if k else m: v for m, k, v in all_metrics(ranks[f"{split}_{protocol}"])}
               for split in ("valid", "test") for protocol in ("full", "full_masked", "sampled")}
    record = provenance.record(
        dataset=data.name, model=model_name, variant=variant, seed=seed,
        model_class=f"{type(model).__module__}:{type(model).__name__}",
        params=dataclasses.asdict(model_config(type(model), params or {})), training=training,
        evaluation=evaluation,
        inputs={"dataset_dir": str(dataset_dir), "sha256": checksums,
                "raw_sha256": data.record["raw"]["sha256"], "negatives": data.record["negatives"]},
        metrics=summary, total_seconds=time.perf_counter() - started,
        nondeterminism=nondeterminism_settings(device),
        compile_cache=compile_cache.report(),  # on or off, this process's cache hits and misses, compile seconds
        trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
        **{k: str(v) for k, v in context.items()},
    )
    if hasattr(model, "export_item_embeddings"):
        table = model.export_item_embeddings()
        if tuple(table.shape[:1]) != (data.n_items + 1,):
            raise ValueError(f"{model_name} exported {tuple(table.shape)} item embeddings, expected {data.n_items + 1} rows")
        save_tensors(out_dir / "item_embeddings.safetensors", {"item_embeddings": table.float()},
                     metadata={"dataset": data.name, "model": model_name, "variant": variant, "seed": str(seed),
                               "selected_epoch": str(training.get("best_epoch")),
                               "selection": "validation NDCG@10", "n_items": str(data.n_items)})
    if hasattr(model, "save_components"):  # E4SRec: the pluggable components, without the backbone
        record["components"] = model.save_components(out_dir / "components", dataset=data.name)
        record["backbone"] = model.backbone_record
        record["item_embeddings_source"] = model.item_embeddings_source
    write_parquet(out_dir / "ranks.parquet", ranks)
    write_json(out_dir / "run.json", record)  # written last: marks the run as complete
    return record
