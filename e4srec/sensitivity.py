"""Appendix B of the paper: how E4SRec's results move with six training settings, one at a time.

The paper states, without numbers: batch 16 is best; E4SRec is insensitive to the LoRA rank/alpha;
sensitive to LoRA dropout and to the modules LoRA adapts; 2-5 epochs suffice; warmup matters. This
module plans the runs that test those statements, trains them and turns their per-user ranks into
tables, paired significance tests, verdicts and figures.

Plan (:func:`expand`). A *base* run per (dataset, seed) holds Table 5's setting (the profile's E4SRec
settings with ``sensitivity.base`` over them). Each factor value is a *point*: the base with one
setting changed (:func:`factor_overrides`), trained under the name ``FACTOR~VALUE`` (e.g.
``batch_size~4``). A value whose resolved settings are the base's is the base run itself (Beauty's
warmup 100: no second run). The epochs factor is, by default, one run of the largest epoch count
whose ranks are written after every epoch (``EPOCH_RANKS``/``after~K.parquet``, through
:data:`e4srec.trainer.EPOCH_END_HOOKS`): value K is that run's model after K epochs. Its cosine
schedule spans the largest count, so "after 3 of 6 epochs" is not "a 3-epoch run" (whose learning
rate reaches zero at epoch 3); ``epochs_from_one_run: false`` trains one run per count instead.

Runs land in ``OUT/sensitivity/runs/DATASET/E4SRec/POINT/seed~N`` (the layout of ``OUT/runs``, so
``e4srec audit OUT/sensitivity`` checks them), each with a ``sensitivity.json`` naming its factor
and value. :func:`train_chunk` trains a list of points in one process, one after the other (a
*chunk*: the workflow runs one chunk per dataset, factor and seed); finished runs with the planned
settings are skipped, so a chunk cut short resumes where it stopped.

Analysis (:func:`write_report`), from the ranks only:

- a table per factor: per value, mean +- standard deviation over seeds of HR@10 and NDCG@10 for the
  full ranking (``test_full``: all items, history not masked) and the sampled protocol (target
  against 99 negatives), and the number of seeds; the reference row is the base's value;
- paired tests over users of each value against the reference (a user's value is the metric of the
  test rank averaged over seeds, as :mod:`e4srec.significance`): Wilcoxon signed-rank and t-test,
  and an equivalence test (TOST: two one-sided paired t-tests against +-margin, margin = ``margin``
  times the reference's mean); p-values Holm-corrected per (dataset, factor, metric, protocol);
- a verdict per statement and protocol (:data:`RULES` says how each is decided);
- a figure per factor (metric against value, one colour per dataset, the seeds' range as an interval).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import logging
import math
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from .files import InputError, read_json, sha256_file, write_json, write_parquet, write_text

log = logging.getLogger(__name__)

FACTORS = ("batch_size", "lora_rank", "lora_dropout", "lora_modules", "epochs", "warmup_steps")
FACTOR_TITLES = {"batch_size": "batch size", "lora_rank": "LoRA rank (alpha)", "lora_dropout": "LoRA dropout",
                 "lora_modules": "LoRA modules", "epochs": "epochs", "warmup_steps": "warmup steps"}
# LoRA targets by name (LLaMA-style module names): the paper's, attention's query/value, every linear layer
LORA_MODULES = {"gate_up_down": ["gate_proj", "up_proj", "down_proj"], "q_v": ["q_proj", "v_proj"],
                "all_linear": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
PACKED = "packed"  # the batch-size factor's value: packed training (a batch of users, not of examples)
BASE = "base"
EPOCH_RANKS = "epoch_ranks"  # folder of a per-epoch run's ranks, after~K.parquet = after K epochs
SIDECAR = "sensitivity.json"
METRICS = (("HR", 10), ("NDCG", 10))
PROTOCOLS = ("full", "sampled")
PROTOCOL_TITLES = {"full": "full ranking", "sampled": "sampled, 99 negatives"}


# ------------------------------------------------------------------------------------------------
# The plan


def label(value) -> str:
    """A factor value as a name part: 4, 0.05, packed, q_v."""
    if isinstance(value, bool):
        raise InputError(f"sensitivity: {value!r} is not a factor value")
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def point_name(factor: str, value) -> str:
    return f"{factor}~{label(value)}"


def _merge(*layers: dict) -> dict:
    merged = {"params": {}, "train": {}}
    for layer in layers:
        for key in ("params", "train"):
            merged[key].update(copy.deepcopy(layer.get(key, {})))
    return merged


def factor_overrides(factor: str, value, section: dict) -> dict:
    """The settings a factor value changes: {"params": model settings, "train": trainer settings}."""
    if factor == "batch_size":
        return copy.deepcopy(section["packed"]) if value == PACKED else {"train": {"batch_size": int(value)}}
    if factor == "lora_rank":
        alpha = int(value) if section["lora_alpha"] == "rank" else int(section["lora_alpha"])
        return {"params": {"lora_r": int(value), "lora_alpha": alpha}}
    if factor == "lora_dropout":
        return {"params": {"lora_dropout": float(value)}}
    if factor == "lora_modules":
        if value not in LORA_MODULES:
            raise InputError(f"sensitivity.factors.lora_modules: {value!r} is not one of {sorted(LORA_MODULES)}")
        return {"params": {"target_modules": list(LORA_MODULES[value])}}
    if factor == "epochs":  # expand() raises the patience to the count where it is lower: every epoch trains
        return {"train": {"epochs": int(value)}}
    if factor == "warmup_steps":
        return {"train": {"warmup_steps": int(value)}}
    raise InputError(f"sensitivity.factors: unknown factor {factor!r}; known: {', '.join(FACTORS)}")


def canonical(resolved: dict) -> dict:
    """A run's settings with every default filled in (E4SRecConfig, TrainConfig): equal settings compare equal."""
    from .model import E4SRecConfig
    from .trainer import TrainConfig

    return {"params": dataclasses.asdict(E4SRecConfig(**resolved["params"])),
            "train": dataclasses.asdict(TrainConfig.from_dict(resolved["train"]))}


def expand(section: dict, resolve) -> dict:
    """The runs of the study, per dataset: ``{dataset: {"runs": {name: run}, "chunks": {chunk: [names]}}}``.

    ``section`` is the config's ``sensitivity`` entry; ``resolve(dataset, name, overrides)`` gives the
    settings a run trains with, ``{"params": ..., "train": ...}``, with ``overrides`` (``{"params",
    "train"}``) over the profile's (the workflow resolves them as an E4SRec variant's). A run is
    ``{"name", "factor", "value", "values", "epoch_ranks", "overrides", "params", "train"}``; chunk
    ``base`` holds the base run, each factor's chunk its points. A point resolving to the base's
    settings is left out: the base run is that value."""
    plan = {}
    for dataset in section["datasets"]:
        base = resolve(dataset, BASE, _merge(section["base"]))
        base_settings = canonical(base)
        runs = {BASE: {"name": BASE, "factor": BASE, "value": None, "values": [], "epoch_ranks": False,
                       "overrides": _merge(section["base"]), **base}}
        chunks = {BASE: [BASE]}
        for factor, values in section["factors"].items():
            if factor not in FACTORS:
                raise InputError(f"sensitivity.factors: unknown factor {factor!r}; known: {', '.join(FACTORS)}")
            if not values:
                continue
            per_epoch = factor == "epochs" and section["epochs_from_one_run"]
            for value in [max(values)] if per_epoch else values:
                name = point_name(factor, value)
                overrides = _merge(section["base"], factor_overrides(factor, value, section))
                resolved = resolve(dataset, name, overrides)
                if factor == "epochs" and canonical(resolved)["train"]["patience"] < int(value):
                    overrides["train"]["patience"] = int(value)  # no early stopping before the count
                    resolved = resolve(dataset, name, overrides)
                if canonical(resolved) == base_settings and not per_epoch:
                    continue
                runs[name] = {"name": name, "factor": factor, "value": value, "values": list(values),
                              "epoch_ranks": per_epoch, "overrides": overrides, **resolved}
                chunks.setdefault(factor, []).append(name)
        plan[dataset] = {"runs": runs, "chunks": chunks}
    return plan


def workflow_section(section: dict, datasets: list[str], e4srec_enabled: bool) -> dict:
    """The config's ``sensitivity`` entry with its datasets resolved (null: the first of the profile's);
    an error for a dataset the profile does not prepare, or with E4SRec off."""
    chosen = section["datasets"] or datasets[:1]
    if section["enabled"] and not e4srec_enabled:
        raise InputError("config key 'sensitivity.enabled' needs e4srec.enabled")
    for dataset in chosen:
        if dataset not in datasets:
            raise InputError(f"config key 'sensitivity.datasets': {dataset!r} is not among datasets {datasets}")
    return {**section, "datasets": chosen}


def variant_resolver(registry: dict, model_params, train_params):
    """``resolve`` for :func:`expand` in the workflow: a run's overrides are registered in ``registry``
    (common.smk's SENSITIVITY_VARIANTS) as a variant's settings and resolved by the workflow's own
    ``e4srec_model_params`` and ``e4srec_train_params`` (profile, per-dataset settings, then the run's)."""
    import types

    def resolve(dataset: str, name: str, overrides: dict) -> dict:
        key = f"sensitivity:{name}"  # not a valid variant name: no configured variant is shadowed
        registry[key] = overrides
        point = types.SimpleNamespace(dataset=dataset, variant=key)
        return {"params": json.loads(model_params(point)), "train": json.loads(train_params(point))}

    return resolve


def chunk_manifests(plan: dict, out: str, seeds: list[int]) -> list[str]:
    """The manifest of every chunk of the plan (the workflow's job outputs), per seed."""
    return [f"{out}/chunks/{dataset}/{chunk}/seed~{seed}.json" for dataset, entry in plan.items()
            for chunk in entry["chunks"] for seed in seeds]


def run_dirs(plan: dict, out: str, seeds: list[int]) -> list[str]:
    """Every run folder of the plan."""
    return [f"{out}/runs/{dataset}/E4SRec/{name}/seed~{seed}" for dataset, entry in plan.items()
            for names in entry["chunks"].values() for name in names for seed in seeds]


def chunk_runs(plan: dict, dataset: str, chunk: str) -> list[dict]:
    """The runs of one chunk, as ``train --runs`` takes them."""
    return [plan[dataset]["runs"][name] for name in plan[dataset]["chunks"][chunk]]


# ------------------------------------------------------------------------------------------------
# Training a chunk


@contextlib.contextmanager
def per_epoch_ranks(out_dir: Path, eval_batch_size: int, ties: str):
    """While open, every epoch the trainer completes writes every user's ranks (all six columns, as
    ``ranks.parquet``) to ``out_dir/epoch_ranks/after~K.parquet``, K epochs trained."""
    import torch

    from . import trainer
    from .evaluate import rank_all

    def hook(model, data, epoch, device):
        model.eval()
        with torch.no_grad():
            ranks = rank_all(model.full_sort_predict, data, eval_batch_size, device, ties)
        write_parquet(out_dir / EPOCH_RANKS / f"after~{epoch + 1}.parquet", ranks)

    trainer.EPOCH_END_HOOKS.append(hook)
    try:
        yield
    finally:
        trainer.EPOCH_END_HOOKS.remove(hook)


def _comparable(config: dict) -> dict:
    from .runs import RESUME_INDEPENDENT

    return {k: v for k, v in config.items() if k not in RESUME_INDEPENDENT}


def finished(out_dir: Path, run: dict, seed: int) -> bool:
    """Whether ``out_dir`` holds this run, complete, trained with its settings (and its per-epoch ranks)."""
    from .runs import model_class, model_config
    from .trainer import TrainConfig

    if not ((out_dir / "run.json").exists() and (out_dir / "ranks.parquet").exists()):
        return False
    record = read_json(out_dir / "run.json")
    planned_params = dataclasses.asdict(model_config(model_class("E4SRec"), run["params"]))
    planned_train = dataclasses.asdict(TrainConfig.from_dict({**run["train"], "seed": seed}))
    same = (record.get("seed") == seed and record.get("variant") == run["name"]
            and json.loads(json.dumps(record.get("params"))) == json.loads(json.dumps(planned_params))
            and _comparable(record.get("training", {}).get("config", {})) == _comparable(planned_train))
    if same and run["epoch_ranks"]:
        trained = len(record["training"].get("epochs", []))
        same = all((out_dir / EPOCH_RANKS / f"after~{k}.parquet").exists() for k in range(1, trained + 1))
    return same


def _release_compiled() -> None:
    """Between runs of one process: drop the compiled graphs and free GPU memory. Each point may have
    other shapes or constants (batch size, rank, dropout, modules), and Dynamo falls back to eager
    once a function has been recompiled more than its cache limit; after a reset a run compiles as
    a fresh process would, through the persistent compile cache (compile_cache) where it is on."""
    gc.collect()
    if "torch" in sys.modules:
        import torch

        if "torch._dynamo" in sys.modules:
            torch._dynamo.reset()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def train_chunk(runs: list[dict], *, dataset_dir: str | Path, backbone: str | Path, item_embeddings: str | Path,
                runs_dir: str | Path, seed: int, ties: str = "pessimistic", manifest: str | Path | None = None,
                chunk: str = "", progress: bool = False) -> dict:
    """Train ``runs`` (entries of :func:`expand`'s plan) one after the other in this process, each into
    ``runs_dir/NAME/seed~SEED``; skip those already finished with their settings. Then write
    ``manifest`` (the chunk's runs and the sha256 of their run.json); return it."""
    from . import runs as runs_module

    entries = []
    for run in runs:
        out_dir = Path(runs_dir) / run["name"] / f"seed~{seed}"
        if finished(out_dir, run, seed):
            log.info("%s seed %d: finished with its settings, skipped", run["name"], seed)
        else:
            hooks = (per_epoch_ranks(out_dir, int(run["train"].get("eval_batch_size", 512)), ties)
                     if run["epoch_ranks"] else contextlib.nullcontext())
            with hooks:
                record = runs_module.run(dataset_dir, "E4SRec", out_dir, variant=run["name"], seed=seed,
                                         params=run["params"], train_params=run["train"], ties=ties,
                                         progress=progress, backbone_dir=str(backbone),
                                         item_embeddings=str(item_embeddings))
            _release_compiled()
            if record is None:  # not the main process of several
                continue
            test = record["metrics"]["test_full"]
            log.info("%s seed %d: test HR@10 %.4f NDCG@10 %.4f", run["name"], seed, test["HR@10"], test["NDCG@10"])
        epoch_files = sorted((out_dir / EPOCH_RANKS).glob("after~*.parquet")) if run["epoch_ranks"] else []
        write_json(out_dir / SIDECAR, {"factor": run["factor"], "value": run["value"], "values": run["values"],
                                       "epoch_ranks": bool(run["epoch_ranks"]), "overrides": run["overrides"]})
        entries.append({"name": run["name"], "dir": str(out_dir),
                        "run_json_sha256": sha256_file(out_dir / "run.json"),
                        "epoch_ranks": [path.name for path in epoch_files]})
    result = {"chunk": chunk, "seed": seed, "dataset_dir": str(dataset_dir), "runs": entries}
    if manifest:
        write_json(manifest, result)
    return result


# ------------------------------------------------------------------------------------------------
# Reading the runs


def reference_value(factor: str, record: dict):
    """The base run's value of ``factor``, from its run.json (its params and trainer settings)."""
    params, train = record["params"], record["training"]["config"]
    if factor == "batch_size":
        return PACKED if params.get("training") == "packed" else int(train["batch_size"])
    if factor == "lora_rank":
        return int(params["lora_r"])
    if factor == "lora_dropout":
        return float(params["lora_dropout"])
    if factor == "lora_modules":
        named = [name for name, modules in LORA_MODULES.items() if sorted(modules) == sorted(params["target_modules"])]
        return named[0] if named else "+".join(params["target_modules"])
    if factor == "epochs":
        return int(train["epochs"])
    if factor == "warmup_steps":
        return int(train["warmup_steps"])
    raise InputError(f"unknown factor {factor!r}")


def sort_key(factor: str, value):
    if factor == "lora_modules":
        order = list(LORA_MODULES)
        return (order.index(value) if value in order else len(order), str(value))
    if isinstance(value, (int, float)):
        return (0, float(value), "")
    return (1, 0.0, str(value))  # packed after the batch sizes


def _read_ranks(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path).set_index("user_id").sort_index()


def collect(run_dirs: list[str | Path]) -> dict[str, dict]:
    """Per dataset: ``{"base_record", "factors": {factor: {"reference": value, "values": {value: {seed:
    ranks}}}}}``, ranks indexed by user. The reference row of a factor is the base run, except for a
    per-epoch run, whose every row (the reference's epoch count included) comes from that run."""
    found: dict[str, dict] = {}
    for run_dir in map(Path, run_dirs):
        record = read_json(run_dir / "run.json")
        meta = read_json(run_dir / SIDECAR) if (run_dir / SIDECAR).exists() else {"factor": record["variant"]}
        entry = found.setdefault(record["dataset"], {"base": {}, "base_record": None, "points": []})
        if meta["factor"] == BASE:
            entry["base"][record["seed"]] = _read_ranks(run_dir / "ranks.parquet")
            entry["base_record"] = record
        else:
            entry["points"].append((meta, record, run_dir))
    out = {}
    for dataset, entry in found.items():
        if entry["base_record"] is None:
            raise InputError(f"sensitivity {dataset}: no base run among the runs given (its reference)")
        factors: dict[str, dict] = {}
        for meta, record, run_dir in entry["points"]:
            factor = meta["factor"]
            slot = factors.setdefault(factor, {"reference": reference_value(factor, entry["base_record"]),
                                               "values": {}, "per_epoch": False})
            if meta.get("epoch_ranks"):
                slot["per_epoch"] = True
                for value in meta["values"]:
                    path = run_dir / EPOCH_RANKS / f"after~{value}.parquet"
                    if not path.exists():
                        raise InputError(f"{run_dir}: no ranks after {value} epochs ({path.name})")
                    slot["values"].setdefault(value, {})[record["seed"]] = _read_ranks(path)
            else:
                slot["values"].setdefault(meta["value"], {})[record["seed"]] = _read_ranks(run_dir / "ranks.parquet")
        for factor, slot in factors.items():
            if not slot["per_epoch"] or slot["reference"] not in slot["values"]:
                slot["values"].setdefault(slot["reference"], {}).update(entry["base"])
            slot["values"] = dict(sorted(slot["values"].items(), key=lambda item: sort_key(factor, item[0])))
        out[dataset] = {"base_record": entry["base_record"], "factors": factors}
    return out


def user_values(seeds: dict[int, pd.DataFrame], protocol: str, metric: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(user ids, per-user metric of the test rank averaged over the seeds)."""
    from .metrics import per_user

    frames = list(seeds.values())
    users = frames[0].index
    if any(not frame.index.equals(users) for frame in frames):
        raise InputError("sensitivity: runs of one setting cover different users")
    return users.to_numpy(), np.mean([per_user(f[f"test_{protocol}"].to_numpy(), metric, k) for f in frames], axis=0)


def seed_means(seeds: dict[int, pd.DataFrame], protocol: str, metric: str, k: int) -> list[float]:
    from .metrics import per_user

    return [float(per_user(f[f"test_{protocol}"].to_numpy(), metric, k).mean()) for _, f in sorted(seeds.items())]


# ------------------------------------------------------------------------------------------------
# Tables and tests


def metric_name(metric: str, k: int, protocol: str) -> str:
    return f"{metric}@{k}_{protocol}"


def factor_table(collected: dict, factor: str) -> pd.DataFrame:
    """One row per (dataset, value): mean and standard deviation over seeds (ddof 1; empty with one seed)
    of HR@10 and NDCG@10 for both protocols, and the seeds."""
    rows = []
    for dataset, entry in collected.items():
        slot = entry["factors"].get(factor)
        if slot is None:
            continue
        for value, seeds in slot["values"].items():
            row = {"dataset": dataset, "factor": factor, "value": label(value),
                   "reference": value == slot["reference"], "seeds": len(seeds),
                   "seed_list": " ".join(map(str, sorted(seeds)))}
            for protocol in PROTOCOLS:
                for metric, k in METRICS:
                    values = seed_means(seeds, protocol, metric, k)
                    row[f"{metric_name(metric, k, protocol)}_mean"] = float(np.mean(values))
                    row[f"{metric_name(metric, k, protocol)}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
            rows.append(row)
    return pd.DataFrame(rows)


def factor_markdown(table: pd.DataFrame, factor: str) -> str:
    columns = [(metric_name(m, k, p), f"{m}@{k} ({'full' if p == 'full' else 'sampled-99'})")
               for p in PROTOCOLS for m, k in METRICS]
    lines = [f"# Sensitivity to {FACTOR_TITLES[factor]}", "",
             "Mean ± standard deviation over seeds of the test metrics; * marks the reference (Table 5's "
             "setting, the base run" + (", or the per-epoch run after that many epochs" if factor == "epochs" else "")
             + "). full: all items ranked, history not masked; sampled-99: the target against 99 negatives.", "",
             "| dataset | value | " + " | ".join(title for _, title in columns) + " | seeds |",
             "|---|---|" + "---|" * len(columns) + "---|"]
    for _, row in table.iterrows():
        cells = []
        for name, _ in columns:
            mean, std = row[f"{name}_mean"], row[f"{name}_std"]
            cells.append(f"{mean:.4f}" + ("" if pd.isna(std) else f" ± {std:.4f}"))
        value = f"{row['value']}*" if row["reference"] else row["value"]
        lines.append(f"| {row['dataset']} | {value} | " + " | ".join(cells) + f" | {row['seeds']} |")
    return "\n".join(lines) + "\n"


def paired_tests(ours: np.ndarray, reference: np.ndarray, margin: float) -> dict:
    """Paired tests over users of ``ours`` against ``reference``: Wilcoxon signed-rank (zero differences
    dropped) and t-test, both two-sided; TOST equivalence within +-``margin`` (the larger of the two
    one-sided t-tests' p-values); non-inferiority (H0: mean difference <= -margin, one-sided t-test)."""
    from scipy import stats

    diff = np.asarray(ours, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    mean = float(diff.mean())
    nonzero = diff[diff != 0]
    wilcoxon = float(stats.wilcoxon(nonzero, zero_method="wilcox").pvalue) if len(nonzero) else 1.0
    if diff.std() > 0 and len(diff) > 1:
        ttest = float(stats.ttest_rel(ours, reference).pvalue)
        lower = float(stats.ttest_1samp(diff, -margin, alternative="greater").pvalue)
        upper = float(stats.ttest_1samp(diff, margin, alternative="less").pvalue)
    else:  # every user's difference the same: the tests are decided by the mean alone
        ttest = 1.0 if mean == 0 else 0.0
        lower = 0.0 if mean > -margin else 1.0
        upper = 0.0 if mean < margin else 1.0
    return {"mean_difference": mean, "wilcoxon_p": wilcoxon, "ttest_p": ttest,
            "equivalence_p": max(lower, upper), "noninferiority_p": lower}


SIGNIFICANCE_COLUMNS = ["dataset", "factor", "value", "reference", "metric", "k", "protocol", "users", "seeds",
                        "reference_seeds", "value_mean", "reference_mean", "mean_difference", "relative_difference",
                        "margin", "wilcoxon_p", "ttest_p", "equivalence_p", "wilcoxon_p_holm", "ttest_p_holm",
                        "equivalence_p_holm"]


def significance(collected: dict, margin: float = 0.05) -> pd.DataFrame:
    """Each value against its factor's reference, per (dataset, metric, protocol); Holm over the values
    of one factor (a family: dataset, factor, metric, protocol)."""
    from .significance import holm

    rows = []
    for dataset, entry in collected.items():
        for factor, slot in entry["factors"].items():
            reference = slot["values"][slot["reference"]]
            for protocol in PROTOCOLS:
                for metric, k in METRICS:
                    ref_users, ref_values = user_values(reference, protocol, metric, k)
                    part = []
                    for value, seeds in slot["values"].items():
                        if value == slot["reference"]:
                            continue
                        users, values = user_values(seeds, protocol, metric, k)
                        if not np.array_equal(users, ref_users):
                            raise InputError(f"sensitivity {dataset} {factor}={value}: other users than the reference")
                        absolute = margin * float(ref_values.mean())
                        tests = paired_tests(values, ref_values, absolute)
                        part.append({"dataset": dataset, "factor": factor, "value": label(value),
                                     "reference": label(slot["reference"]), "metric": metric, "k": k,
                                     "protocol": protocol, "users": len(users), "seeds": len(seeds),
                                     "reference_seeds": len(reference), "value_mean": float(values.mean()),
                                     "reference_mean": float(ref_values.mean()),
                                     "relative_difference": tests["mean_difference"] / ref_values.mean()
                                     if ref_values.mean() else math.nan, "margin": absolute,
                                     **{key: tests[key] for key in ("mean_difference", "wilcoxon_p", "ttest_p",
                                                                    "equivalence_p")}})
                    if part:
                        for key in ("wilcoxon_p", "ttest_p", "equivalence_p"):
                            for row, adjusted in zip(part, holm(np.array([row[key] for row in part]))):
                                row[f"{key}_holm"] = float(adjusted)
                    rows += part
    return pd.DataFrame(rows, columns=SIGNIFICANCE_COLUMNS)


# ------------------------------------------------------------------------------------------------
# Verdicts

HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive"
BEST_BATCH = 16
EPOCH_RANGE = (2, 5)

# How each verdict is decided: written beside the verdicts (verdicts.md), and what the code below does.
# "Differs": Holm-corrected Wilcoxon p < alpha and |mean difference| > margin (margin: ``margin`` times
# the reference's mean of the verdict metric). "Equivalent": Holm-corrected TOST p < alpha (within the
# margin). Comparisons are paired over users against the factor's reference (Table 5's value).
RULES = {
    "batch 16 is best": (
        "Among the batch sizes of one prompt per example (packed training is not a batch size and is left "
        "out), the reference must be 16. Holds: every other batch size is significantly worse than 16 "
        "(Holm-corrected Wilcoxon p < alpha, mean difference < 0). Does not hold: some batch size is "
        "significantly better than 16 (p < alpha, mean difference > 0). Otherwise inconclusive."),
    "insensitive to LoRA rank/alpha": (
        "Holds: every rank is equivalent to the reference (Holm-corrected TOST p < alpha within the "
        "margin). Does not hold: some rank differs (Holm-corrected Wilcoxon p < alpha and |mean "
        "difference| > margin). Otherwise inconclusive."),
    "sensitive to LoRA dropout and modules": (
        "Per factor (dropout; modules): sensitive when some value differs from the reference (Holm-corrected "
        "Wilcoxon p < alpha and |mean difference| > margin), insensitive when every value is equivalent "
        "(Holm-corrected TOST p < alpha). Holds: both sensitive. Does not hold: either insensitive. "
        "Otherwise inconclusive."),
    "2-5 epochs suffice": (
        "B = the epoch count of 2 to 5 with the highest mean; every count above 5 is compared with B. Holds: "
        "B is non-inferior to every count above 5 (Holm-corrected one-sided paired t-test of H0: mean(B - "
        "count) <= -margin, p < alpha). Does not hold: some count above 5 is significantly better than B "
        "(Holm-corrected Wilcoxon p < alpha, mean difference > 0). Otherwise inconclusive, also without a "
        "count above 5. B is chosen on the test metric it is then tested on (optimistic for B)."),
    "warmup matters": (
        "Holds: some warmup value differs from the reference (Holm-corrected Wilcoxon p < alpha and |mean "
        "difference| > margin). Does not hold: every value is equivalent to the reference (Holm-corrected "
        "TOST p < alpha). Otherwise inconclusive."),
}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(text: str):
    """A table's value label as a number where it is one (4, 0.05), else as it is (packed, q_v)."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def _rows(tests: pd.DataFrame, dataset: str, factor: str, protocol: str, metric: str, k: int) -> pd.DataFrame:
    return tests[(tests["dataset"] == dataset) & (tests["factor"] == factor) & (tests["protocol"] == protocol)
                 & (tests["metric"] == metric) & (tests["k"] == k)]


def _evidence(rows: pd.DataFrame) -> str:
    if rows.empty:
        return "no values"
    reference = rows.iloc[0]
    parts = [f"reference {reference['reference']}: {reference['reference_mean']:.4f}; margin {reference['margin']:.4f}"]
    for _, row in rows.iterrows():
        parts.append(f"{row['value']}: {row['mean_difference']:+.4f} (Wilcoxon p_holm {row['wilcoxon_p_holm']:.3g}, "
                     f"TOST p_holm {row['equivalence_p_holm']:.3g})")
    return "; ".join(parts)


def sensitivity_verdict(rows: pd.DataFrame, alpha: float) -> str:
    """Sensitive (holds) / insensitive (does not hold) / inconclusive, from one factor's test rows."""
    if rows.empty:
        return INCONCLUSIVE
    differs = (rows["wilcoxon_p_holm"] < alpha) & (rows["mean_difference"].abs() > rows["margin"])
    if differs.any():
        return HOLDS
    if (rows["equivalence_p_holm"] < alpha).all():
        return FAILS
    return INCONCLUSIVE


def _flip(verdict: str) -> str:
    return {HOLDS: FAILS, FAILS: HOLDS}.get(verdict, verdict)


def epochs_verdict(slot: dict | None, protocol: str, metric: str, k: int, margin: float, alpha: float) -> tuple[str, str]:
    """:data:`RULES` "2-5 epochs suffice" from one dataset's epochs rows; (verdict, evidence)."""
    from .significance import holm

    if slot is None:
        return INCONCLUSIVE, "no epochs runs"
    values = {value: user_values(seeds, protocol, metric, k)[1] for value, seeds in slot["values"].items()}
    inside = [v for v in values if _is_number(v) and EPOCH_RANGE[0] <= v <= EPOCH_RANGE[1]]
    above = [v for v in values if _is_number(v) and v > EPOCH_RANGE[1]]
    if not inside or not above:
        return INCONCLUSIVE, f"epoch counts {list(values)}: none in {EPOCH_RANGE[0]}-{EPOCH_RANGE[1]} or none above"
    best = max(inside, key=lambda v: values[v].mean())
    absolute = margin * float(values[slot["reference"]].mean()) if slot["reference"] in values else \
        margin * float(values[best].mean())
    tests = {v: paired_tests(values[v], values[best], absolute) for v in above}
    wilcoxon = holm(np.array([tests[v]["wilcoxon_p"] for v in above]))
    # non-inferiority of B against v: H0 mean(B - v) <= -margin, i.e. mean(v - B) >= margin
    noninferior = holm(np.array([paired_tests(values[best], values[v], absolute)["noninferiority_p"] for v in above]))
    evidence = f"B = {best} epochs ({values[best].mean():.4f}); margin {absolute:.4f}; " + "; ".join(
        f"{v}: {tests[v]['mean_difference']:+.4f} vs B (Wilcoxon p_holm {w:.3g}, non-inferiority of B p_holm {n:.3g})"
        for v, w, n in zip(above, wilcoxon, noninferior))
    if any(w < alpha and tests[v]["mean_difference"] > 0 for v, w in zip(above, wilcoxon)):
        return FAILS, evidence
    if all(n < alpha for n in noninferior):
        return HOLDS, evidence
    return INCONCLUSIVE, evidence


def verdicts(collected: dict, tests: pd.DataFrame, alpha: float = 0.05, margin: float = 0.05,
             metric: str = "NDCG", k: int = 10) -> pd.DataFrame:
    """One row per (dataset, protocol, statement): the verdict, the numbers it rests on, and its rule."""
    rows = []
    for dataset, entry in collected.items():
        factors = entry["factors"]
        for protocol in PROTOCOLS:
            def add(statement, verdict, evidence):
                rows.append({"dataset": dataset, "protocol": protocol, "metric": f"{metric}@{k}", "statement": statement,
                             "verdict": verdict, "evidence": evidence, "alpha": alpha, "margin": margin,
                             "rule": RULES[statement]})

            # batch 16 is best
            batch = _rows(tests, dataset, "batch_size", protocol, metric, k)
            batch = batch[batch["value"] != PACKED]
            slot = factors.get("batch_size")
            if slot is None or batch.empty:
                add("batch 16 is best", INCONCLUSIVE, "no batch-size runs")
            elif label(slot["reference"]) != str(BEST_BATCH):
                add("batch 16 is best", INCONCLUSIVE, f"the reference batch size is {slot['reference']}, not {BEST_BATCH}")
            else:
                significant = batch["wilcoxon_p_holm"] < alpha
                if (significant & (batch["mean_difference"] > 0)).any():
                    verdict = FAILS
                elif (significant & (batch["mean_difference"] < 0)).all():
                    verdict = HOLDS
                else:
                    verdict = INCONCLUSIVE
                add("batch 16 is best", verdict, _evidence(batch))
            # insensitive to LoRA rank/alpha (the converse of sensitive)
            rank = _rows(tests, dataset, "lora_rank", protocol, metric, k)
            add("insensitive to LoRA rank/alpha", _flip(sensitivity_verdict(rank, alpha)) if not rank.empty
                else INCONCLUSIVE, _evidence(rank))
            # sensitive to LoRA dropout and modules
            parts = {f: _rows(tests, dataset, f, protocol, metric, k) for f in ("lora_dropout", "lora_modules")}
            each = {f: sensitivity_verdict(part, alpha) for f, part in parts.items()}
            both = HOLDS if all(v == HOLDS for v in each.values()) else \
                FAILS if any(v == FAILS for v in each.values()) else INCONCLUSIVE
            add("sensitive to LoRA dropout and modules", both, " | ".join(
                f"{f} ({'sensitive' if each[f] == HOLDS else 'insensitive' if each[f] == FAILS else 'inconclusive'}): "
                f"{_evidence(part)}" for f, part in parts.items()))
            # 2-5 epochs suffice
            add("2-5 epochs suffice", *epochs_verdict(factors.get("epochs"), protocol, metric, k, margin, alpha))
            # warmup matters
            warmup = _rows(tests, dataset, "warmup_steps", protocol, metric, k)
            add("warmup matters", sensitivity_verdict(warmup, alpha), _evidence(warmup))
    return pd.DataFrame(rows, columns=["dataset", "protocol", "metric", "statement", "verdict", "evidence", "alpha",
                                       "margin", "rule"])


def verdicts_markdown(frame: pd.DataFrame, alpha: float, margin: float) -> str:
    lines = ["# Appendix B: the paper's statements against these runs", "",
             f"alpha {alpha}; margin {margin:g} x the reference's mean. Paired over users (a user's value: the "
             "test metric averaged over seeds), each value against its factor's reference (Table 5's setting); "
             "Holm-corrected over the values of one factor. full: all items ranked; sampled: 99 negatives.", ""]
    if not frame.empty:
        lines += ["| dataset | protocol | metric | statement | verdict | evidence |", "|---|---|---|---|---|---|"]
        for _, row in frame.iterrows():
            lines.append(f"| {row['dataset']} | {row['protocol']} | {row['metric']} | {row['statement']} | "
                         f"**{row['verdict']}** | {row['evidence']} |")
    lines += ["", "## How each verdict is decided", "",
              "Differs: Holm-corrected Wilcoxon p < alpha and |mean difference| > margin. Equivalent: "
              "Holm-corrected TOST (two one-sided paired t-tests) p < alpha within +-margin.", ""]
    lines += [f"- **{statement}**: {rule}" for statement, rule in RULES.items()]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# Figures


def plot_factor(table: pd.DataFrame, factor: str, stem: str | Path) -> None:
    """Four panels (HR@10 and NDCG@10, full and sampled) of the metric against the factor's values: per
    dataset (Okabe-Ito colours, legend right of the panels) the mean over seeds and the seeds' range
    (min to max) as an interval; the reference value's tick marked with *. PNG and PDF, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    from .analysis import OKABE_ITO, save_figure

    palette = [OKABE_ITO[name] for name in ("blue", "vermillion", "bluish green", "orange", "reddish purple",
                                            "sky blue", "yellow", "black")]
    datasets = list(dict.fromkeys(table["dataset"]))
    colors = {d: palette[i % len(palette)] for i, d in enumerate(datasets)}
    markers = ["o", "s", "^", "D", "v", "P", "X", "*"]
    labels = list(dict.fromkeys(table["value"]))  # in the table's order (sorted per factor)
    position = {value: i for i, value in enumerate(labels)}
    figure, axes = plt.subplots(2, 2, figsize=(9.0, 6.2), squeeze=False)
    offsets = np.linspace(-0.12, 0.12, len(datasets)) if len(datasets) > 1 else [0.0]
    for (row_index, protocol), (column, (metric, k)) in [((r, p), (c, m)) for r, p in enumerate(PROTOCOLS)
                                                          for c, m in enumerate(METRICS)]:
        axis = axes[row_index][column]
        name = metric_name(metric, k, protocol)
        for offset, dataset in zip(offsets, datasets):
            rows = table[table["dataset"] == dataset]
            x = np.array([position[v] for v in rows["value"]]) + offset
            seeds = rows["seed_values"] if "seed_values" in rows else None
            mean = rows[f"{name}_mean"].to_numpy()
            low = np.array([min(s[name]) for s in seeds]) if seeds is not None else mean
            high = np.array([max(s[name]) for s in seeds]) if seeds is not None else mean
            color, marker = colors[dataset], markers[datasets.index(dataset) % len(markers)]
            axis.vlines(x, low, high, color=color, linewidth=1.6)
            axis.plot(x, mean, marker=marker, color=color, linestyle="none", markersize=5)
            numeric = np.array([_is_number(_number(v)) for v in rows["value"]])  # a line joins numbers only
            if factor != "lora_modules" and numeric.sum() > 1:
                axis.plot(x[numeric], mean[numeric], color=color, linewidth=0.9)
        ticks = [f"{v}*" if table[(table["value"] == v)]["reference"].any() else v for v in labels]
        axis.set_xticks(range(len(labels)), ticks, rotation=30 if factor == "lora_modules" else 0)
        axis.set_title(f"{metric}@{k}, {PROTOCOL_TITLES[protocol]}", fontsize=10)
        axis.set_xlabel(FACTOR_TITLES[factor])
        axis.spines[["top", "right"]].set_visible(False)
        axis.yaxis.grid(True, color="0.9", linewidth=0.8)
        axis.set_axisbelow(True)
    handles = [Line2D([], [], color=colors[d], marker=markers[i % len(markers)], label=d) for i, d in enumerate(datasets)]
    handles.append(Line2D([], [], color="0.3", linewidth=1.6, label="range over seeds\n(min to max)"))
    figure.suptitle(f"Sensitivity to {FACTOR_TITLES[factor]} (* Table 5's setting); mean over seeds", fontsize=11)
    figure.tight_layout(rect=(0, 0, 0.82, 0.96))
    figure.legend(handles=handles, loc="center left", bbox_to_anchor=(0.83, 0.5), frameon=False, fontsize=9)
    save_figure(figure, stem)
    plt.close(figure)


# ------------------------------------------------------------------------------------------------
# The report


def _with_seed_values(collected: dict, factor: str, table: pd.DataFrame) -> pd.DataFrame:
    """The table with, per row, each metric's per-seed values (for the figures' intervals)."""
    values = []
    for _, row in table.iterrows():
        slot = collected[row["dataset"]]["factors"][factor]
        seeds = next(s for v, s in slot["values"].items() if label(v) == row["value"])
        values.append({metric_name(m, k, p): seed_means(seeds, p, m, k) for p in PROTOCOLS for m, k in METRICS})
    return table.assign(seed_values=values)


def write_report(run_dirs: list[str | Path], out_dir: str | Path, factors: list[str] | None = None,
                 alpha: float = 0.05, margin: float = 0.05, verdict_metric: str = "NDCG@10") -> dict:
    """Every output of the study from its run folders, into ``out_dir``: ``tables/FACTOR.csv`` and
    ``.md``, ``tables/significance.csv``, ``tables/verdicts.csv`` and ``.md``, ``figures/FACTOR.png``
    and ``.pdf``; each file written atomically. ``factors``: those to write (default: those found)."""
    from .tables import write_csv

    out_dir = Path(out_dir)
    collected = collect(run_dirs)
    found = sorted({f for entry in collected.values() for f in entry["factors"]}, key=FACTORS.index)
    factors = list(factors or found)
    missing = sorted(set(factors) - set(found))
    if missing:
        raise InputError(f"sensitivity: no runs of factor(s) {missing} among the runs given")
    for factor in factors:
        table = factor_table(collected, factor)
        write_csv(out_dir / "tables" / f"{factor}.csv", table)
        write_text(out_dir / "tables" / f"{factor}.md", factor_markdown(table, factor))
        plot_factor(_with_seed_values(collected, factor, table), factor, out_dir / "figures" / factor)
    tests = significance(collected, margin)
    write_csv(out_dir / "tables" / "significance.csv", tests)
    metric, k = verdict_metric.split("@")
    frame = verdicts(collected, tests, alpha, margin, metric, int(k))
    write_csv(out_dir / "tables" / "verdicts.csv", frame)
    write_text(out_dir / "tables" / "verdicts.md", verdicts_markdown(frame, alpha, margin))
    return {"factors": factors, "datasets": list(collected), "verdicts": frame}


# ------------------------------------------------------------------------------------------------
# Command line: python -m e4srec.sensitivity {train,report}


def _runs_argument(text: str) -> list[dict]:
    """JSON (a list of runs, or one run), or @FILE holding it."""
    if text.startswith("@"):
        text = Path(text[1:]).read_text()
    value = json.loads(text)
    return value if isinstance(value, list) else [value]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m e4srec.sensitivity", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a chunk of the study's runs in one process")
    p.add_argument("--dataset-dir", required=True, help="prepared dataset folder (OUT/data/DATASET)")
    p.add_argument("--backbone", required=True, help="backbone folder (RESOURCES/backbones/...)")
    p.add_argument("--item-embeddings", required=True, help="SASRec's item_embeddings.safetensors")
    p.add_argument("--runs-dir", required=True, help="OUT/sensitivity/runs/DATASET/E4SRec")
    p.add_argument("--runs", required=True, action="append", type=_runs_argument,
                   help="the runs (JSON list of {name, factor, value, values, epoch_ranks, overrides, params, "
                        "train}, or @FILE); repeat to run several chunks in one process")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--ties", default="pessimistic", choices=["pessimistic", "optimistic"])
    p.add_argument("--manifest", help="write the chunk's manifest here")
    p.add_argument("--chunk", default="", help="the chunk's name (recorded in the manifest)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--compile-cache", default=None,
                   help="torch.compile's cache folder (default: $E4SREC_COMPILE_CACHE where set; '' off)")
    p.add_argument("--progress", action="store_true")
    r = sub.add_parser("report", help="tables, tests, verdicts and figures from the study's run folders")
    r.add_argument("--runs", nargs="+", required=True, help="run folders (base and points)")
    r.add_argument("--out-dir", required=True, help="OUT/sensitivity (tables/ and figures/ go here)")
    r.add_argument("--factors", nargs="*", default=None)
    r.add_argument("--alpha", type=float, default=0.05)
    r.add_argument("--margin", type=float, default=0.05)
    r.add_argument("--verdict-metric", default="NDCG@10", choices=["NDCG@10", "HR@10"])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if args.command == "train":
            from . import compile_cache, provenance

            provenance.git_state()
            cache = os.environ.get(compile_cache.ENVIRONMENT) if args.compile_cache is None else args.compile_cache
            if cache is not None:
                compile_cache.configure(cache or None)
            import torch

            if args.threads:
                torch.set_num_threads(args.threads)
            train_chunk([run for runs in args.runs for run in runs], dataset_dir=args.dataset_dir,
                        backbone=args.backbone, item_embeddings=args.item_embeddings, runs_dir=args.runs_dir,
                        seed=args.seed, ties=args.ties, manifest=args.manifest, chunk=args.chunk,
                        progress=args.progress)
        else:
            write_report(args.runs, args.out_dir, args.factors, args.alpha, args.margin, args.verdict_metric)
    except (InputError, FileNotFoundError, FloatingPointError) as err:
        print(f"e4srec.sensitivity {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
