"""Per-epoch time of every baseline on one GPU, and what a whole run takes at that speed.

Each baseline trains for ``--epochs`` epochs (no early stop) on one prepared dataset, in a process
of its own, one after the other, so that the GPU holds one job at a time; the settings are those
of the committed run of the same model, variant and seed (its ``run.json``: ``params`` and
``training.config``), only the
number of epochs and the patience changed. The record gives, per run: the process's wall time,
the first epoch (CUDA start-up and warm-up included), the median of the later epochs, the test
evaluation, and, with the committed run's epochs-to-converge (the epochs it trained before early
stopping), the estimated whole-run time on this GPU:

    start-up + first epoch + (committed epochs - 1) x median epoch + evaluation

Run on a GPU machine from the repository root (the prepared dataset from the workflow's
``results/paper/data/<dataset>``; the committed runs under ``results/paper/runs`` for the settings):

    python workflow/scripts/baseline_epoch_benchmark.py --dataset-dir results/paper/data/Beauty \
        --runs results/paper/runs --out baseline_epochs.json --epochs 4

The JSON record carries its command, commit, machine (GPU name) and date; it is written atomically.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from e4srec import provenance
from e4srec.files import write_json

DEFAULT_RUNS = ["POP/default", "BPR/default", "GRU4Rec/default", "Caser/default", "SASRec/default", "SASRec/ce",
                "BERT4Rec/default", "S3-Rec/default", "CL4SRec/default", "ICLRec/default"]


def committed_settings(run_json: Path) -> tuple[dict, dict, dict]:
    """The committed run's params, train settings and training summary (from its command and record)."""
    record = json.loads(run_json.read_text())
    training = record.get("training", {})
    params = record["params"]  # the model's whole resolved configuration
    train = {key: value for key, value in training.get("config", {}).items() if key != "seed"}
    return params, train, {"epochs_run": len(training.get("epochs", [])), "best_epoch": training.get("best_epoch"),
                           "committed_train_seconds": training.get("train_seconds"),
                           "committed_total_seconds": record.get("total_seconds"),
                           "committed_gpus": record.get("machine", {}).get("gpus"),
                           "committed_commit": record.get("git", {}).get("commit")}


def time_run(dataset_dir: Path, model: str, variant: str, seed: int, params: dict, train: dict, out: Path) -> dict:
    command = [sys.executable, "-m", "e4srec.cli", "train", "--dataset-dir", str(dataset_dir), "--model", model,
               "--variant", variant, "--seed", str(seed), "--params", json.dumps(params),
               "--train-params", json.dumps(train), "--out", str(out), "--no-progress"]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        return {"error": result.stderr[-2000:], "process_seconds": wall}
    record = json.loads((out / "run.json").read_text())
    epochs = [epoch["seconds"] for epoch in record["training"].get("epochs", [])]
    return {"process_seconds": wall, "total_seconds": record["total_seconds"],
            "train_seconds": record["training"].get("train_seconds"),
            "epoch_seconds": epochs, "first_epoch_seconds": epochs[0] if epochs else None,
            "median_later_epoch_seconds": statistics.median(epochs[1:]) if len(epochs) > 1 else None,
            "evaluation_seconds": record["evaluation"]["seconds"], "device": record["training"].get("device"),
            "peak_memory_mb": record["training"].get("peak_memory_mb")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset-dir", required=True, type=Path)
    parser.add_argument("--runs", default=Path("results/paper/runs"), type=Path, help="committed run folders")
    parser.add_argument("--models", nargs="*", default=DEFAULT_RUNS, help="MODEL/VARIANT (default: every baseline)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)

    dataset = json.loads((args.dataset_dir / "dataset.json").read_text())["name"]
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models:
            model, variant = name.split("/")
            committed = args.runs / dataset / model / variant / f"seed~{args.seed}" / "run.json"
            params, train, summary = committed_settings(committed)
            if model != "POP":
                train = {**train, "epochs": args.epochs, "patience": args.epochs + 1, "device": "auto"}
            measured = time_run(args.dataset_dir, model, variant, args.seed, params, train,
                                Path(scratch) / model / variant)
            entry = {"model": model, "variant": variant, "seed": args.seed, "params": params, "train": train,
                     **summary, **measured}
            if measured.get("median_later_epoch_seconds") is not None and summary["epochs_run"]:
                startup = measured["process_seconds"] - measured["total_seconds"]
                entry["estimated_whole_run_seconds"] = (
                    startup + measured["first_epoch_seconds"]
                    + (summary["epochs_run"] - 1) * measured["median_later_epoch_seconds"]
                    + measured["evaluation_seconds"])
            results.append(entry)
            print(f"{name}: {json.dumps({k: entry.get(k) for k in ('process_seconds', 'first_epoch_seconds', 'median_later_epoch_seconds', 'epochs_run', 'estimated_whole_run_seconds', 'error')})}",
                  flush=True)
            # rewritten after every run, so that a time limit leaves the runs finished so far
            write_json(args.out, provenance.record(what="baseline per-epoch time on one GPU, one job at a time",
                                                   dataset=dataset, epochs=args.epochs, runs=results,
                                                   complete=len(results) == len(args.models)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
