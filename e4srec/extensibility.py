"""Extensibility, measured: one loaded backbone serving several datasets' pluggable components.

The paper (Section "Extensibility", RQ5) argues that one backbone serves many datasets, each adding
only its components (LoRA adapter, input projection, item scorer, frozen item table); it measures
nothing. :func:`measure_serving` loads the backbone once into an :class:`~e4srec.deploy.E4SRecService`,
plugs in every dataset's components and records:

- ``load_seconds``: loading the backbone (once), then each dataset's components (``add``);
- ``bytes``: the backbone's parameter bytes as loaded (dtype of the device), and what each dataset
  adds to it: its LoRA weights, its input projection and item scorer, and its item table, counted
  from the tensors themselves (so the same on any machine); on a GPU also the CUDA memory allocated
  after each step;
- ``switch``: the latency of ``recommend`` for one user when the previous call served the same
  dataset, and when it served another one (switching the active adapter), as medians over
  ``rounds`` calls each, with their difference (the switching overhead);
- ``identical``: whether each dataset's scores from the shared service equal, bit for bit, those of
  a service that loaded that dataset alone (the adapters do not leak into each other).

Histories are drawn with a seeded generator from each dataset's item ids (lengths 1 to ``max_len``):
timings do not depend on which items they hold.
"""
from __future__ import annotations

import random
import statistics
import time
from pathlib import Path
from typing import Mapping

import torch

from .deploy import E4SRecService
from .files import InputError


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _cuda_allocated(device: torch.device) -> int | None:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def _histories(n_items: int, max_len: int, count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randint(1, n_items) for _ in range(rng.randint(1, max_len))] for _ in range(count)]


def _seconds(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def measure_serving(backbone_dir: str | Path, components: Mapping[str, str | Path], *, rounds: int = 20,
                    seed: int = 0, device: str = "cpu", check_users: int = 8) -> dict:
    """Serve every ``components`` folder (name -> folder) from one backbone; return the measurements."""
    if len(components) < 2:
        raise InputError(f"measure_serving: give at least two datasets' components (got {list(components)})")
    if rounds < 1:
        raise InputError("measure_serving: rounds must be at least 1")
    started = time.perf_counter()
    service = E4SRecService(backbone_dir, device=device)
    backbone_seconds = time.perf_counter() - started
    dev = service.device
    result = {"backbone_dir": str(backbone_dir), "device": str(dev),
              "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
              "torch_threads": torch.get_num_threads(), "rounds": rounds, "seed": seed,
              "backbone": {"load_seconds": backbone_seconds,
                           "parameter_bytes": _tensor_bytes(service._base.parameters()),
                           "cuda_allocated_bytes": _cuda_allocated(dev)},
              "datasets": {}}

    for name, folder in components.items():
        seconds = _seconds(lambda: service.add(name, folder))
        model = service.model(name)
        lora = [p for key, p in service._peft.named_parameters() if "lora_" in key and f".{name}." in key]
        result["datasets"][name] = {
            "components_dir": str(folder), "n_items": model.n_items, "load_seconds": seconds,
            "added_bytes": {"lora": _tensor_bytes(lora),
                            "projections": _tensor_bytes([model.input_proj.weight, model.input_proj.bias,
                                                          model.item_scorer.weight]),
                            "item_table": _tensor_bytes([model.item_embeddings.weight])},
            "cuda_allocated_bytes": _cuda_allocated(dev)}
        added = result["datasets"][name]["added_bytes"]
        added["total"] = sum(added.values())

    names = list(components)
    users = {name: _histories(service.model(name).n_items, service.model(name).max_len, 2 * rounds, seed + i)
             for i, name in enumerate(names)}
    for name in names:  # warm-up: first calls build the prefix caches
        service.recommend(name, users[name][0])
    same, switched = {n: [] for n in names}, {n: [] for n in names}
    for r in range(rounds):
        for i, name in enumerate(names):
            # previous call served names[i - 1]: a switch; then the same dataset again: no switch
            switched[name].append(_seconds(lambda: service.recommend(name, users[name][2 * r])))
            same[name].append(_seconds(lambda: service.recommend(name, users[name][2 * r + 1])))
    for name in names:
        entry = result["datasets"][name]
        entry["recommend_seconds_same"] = statistics.median(same[name])
        entry["recommend_seconds_switched"] = statistics.median(switched[name])
        entry["switch_overhead_seconds"] = entry["recommend_seconds_switched"] - entry["recommend_seconds_same"]

    shared_scores = {name: service.scores(name, users[name][:check_users]).cpu() for name in names}
    service = None  # free the shared backbone before each dataset is loaded alone
    for name in names:  # each dataset alone on a fresh backbone: identical scores?
        alone = E4SRecService(backbone_dir, device=device)
        alone.add(name, components[name])
        scores = alone.scores(name, users[name][:check_users]).cpu()
        result["datasets"][name]["identical_to_alone"] = bool(torch.equal(scores, shared_scores[name]))
        del alone
    result["all_identical"] = all(d["identical_to_alone"] for d in result["datasets"].values())
    total_added = sum(d["added_bytes"]["total"] for d in result["datasets"].values())
    result["total_bytes"] = result["backbone"]["parameter_bytes"] + total_added
    result["separate_backbones_bytes"] = len(names) * result["backbone"]["parameter_bytes"] + total_added
    return result


def serving_table(result: dict) -> str:
    """The measurements as one Markdown table (one row per dataset, then the totals)."""
    mb = 1e6
    lines = [f"One backbone ({result['backbone']['parameter_bytes'] / mb:.1f} MB of parameters, loaded in "
             f"{result['backbone']['load_seconds']:.2f} s) serving {len(result['datasets'])} datasets on "
             f"{result['gpu'] or 'the CPU'} ({result['torch_threads']} torch threads); medians of "
             f"{result['rounds']} calls.", "",
             "| dataset | items | components load (s) | added MB (LoRA / projections / item table) | "
             "recommend, same (ms) | recommend, after a switch (ms) | switch overhead (ms) | scores identical to alone |",
             "|---|---:|---:|---|---:|---:|---:|---|"]
    for name, d in result["datasets"].items():
        a = d["added_bytes"]
        lines.append(f"| {name} | {d['n_items']} | {d['load_seconds']:.2f} | {a['total'] / mb:.1f} "
                     f"({a['lora'] / mb:.1f} / {a['projections'] / mb:.1f} / {a['item_table'] / mb:.1f}) | "
                     f"{1e3 * d['recommend_seconds_same']:.1f} | {1e3 * d['recommend_seconds_switched']:.1f} | "
                     f"{1e3 * d['switch_overhead_seconds']:.1f} | {'yes' if d['identical_to_alone'] else 'NO'} |")
    lines += ["", f"All datasets on one backbone: {result['total_bytes'] / mb:.1f} MB; one backbone per dataset: "
              f"{result['separate_backbones_bytes'] / mb:.1f} MB."]
    return "\n".join(lines) + "\n"
