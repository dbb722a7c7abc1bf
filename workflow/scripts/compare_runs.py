#!/usr/bin/env python
"""Print a Markdown table comparing training runs from their ``run.json`` records.

Made for issue "Performance", goal 4 (one GPU against several under DDP), and usable for any set of
runs of one setting: per run, the processes and GPUs, each epoch's training seconds, the total, the
tokens a second, the peak GPU memory, the last epoch's loss, the validation NDCG@10 after each epoch,
the test HR@10 / NDCG@10 (full ranking), and the speed-up against the first run, of the whole training
time and of the last epoch's (the one to read where the first epoch compiles).
Every number is read from the records, none is typed in::

    python workflow/scripts/compare_runs.py one_gpu/run.json two_gpus/run.json --labels "1 GPU" "DDP, 2 GPUs"

A run folder may be given instead of its ``run.json``. A record without the fields a column needs is
an error naming the file and the field.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from e4srec.efficiency import RunRecord  # noqa: E402
from e4srec.files import InputError  # noqa: E402

COLUMNS = ("run", "processes", "GPU", "epochs (train s)", "train total", "speed-up (total, last epoch)", "tokens/s",
           "peak memory", "last loss", "valid NDCG@10 by epoch", "test HR@10 / NDCG@10")


class RecordError(ValueError):
    """A run record that cannot be compared: the message names the file and the field (read through
    :class:`e4srec.efficiency.RunRecord`, Tables 4 and 5's reader)."""


def load(path: Path) -> RunRecord:
    path = path / "run.json" if path.is_dir() else path
    try:
        return RunRecord.read(path)
    except (OSError, InputError) as err:
        raise RecordError(f"{path}: cannot read a run record ({err})") from None


def field(record: RunRecord, key: str):
    """The value at a dotted key (:meth:`RunRecord.get`), or an error naming the file and the field."""
    try:
        return record.get(key)
    except InputError:
        raise RecordError(f"{record.path}: no field {key}") from None


def summary(record: RunRecord) -> dict:
    """The numbers of one run that the table shows."""
    training = field(record, "training")
    epochs = field(record, "training.epochs")
    if not epochs:
        raise RecordError(f"{record.path}: training.epochs is empty")
    seconds = [float(epoch["seconds"]) for epoch in epochs]
    tokens = sum(int(epoch.get("tokens") or 0) for epoch in epochs)
    test = field(record, "metrics.test_full")
    gpus = (record.data.get("machine") or {}).get("gpus") or ["CPU"]
    return {"processes": int(training.get("world_size") or 1), "gpu": gpus[0],
            "seconds": seconds, "train_seconds": float(field(record, "training.train_seconds")),
            "tokens_per_s": tokens / sum(seconds) if tokens else None,
            "peak_memory_mb": training.get("peak_memory_mb"),
            "loss": float(epochs[-1]["loss"]), "valid": [epoch.get("valid_ndcg10") for epoch in epochs],
            "hr10": float(test["HR@10"]), "ndcg10": float(test["NDCG@10"])}


def table(records: list[RunRecord], labels: list[str]) -> str:
    rows = [summary(record) for record in records]
    total, last = rows[0]["train_seconds"], rows[0]["seconds"][-1]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for label, row in zip(labels, rows):
        memory = f"{row['peak_memory_mb'] / 1024:.1f} GiB a GPU" if row["peak_memory_mb"] else "-"
        tokens = f"{row['tokens_per_s']:,.0f}" if row["tokens_per_s"] else "-"
        valid = " / ".join("-" if value is None else f"{value:.4f}" for value in row["valid"])
        cells = (label, str(row["processes"]), row["gpu"], ", ".join(f"{s:.1f}" for s in row["seconds"]),
                 f"{row['train_seconds']:.1f} s",
                 f"{total / row['train_seconds']:.2f}x, {last / row['seconds'][-1]:.2f}x", tokens, memory,
                 f"{row['loss']:.5f}", valid, f"{row['hr10']:.4f} / {row['ndcg10']:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run.json files or run folders; the first is the reference")
    parser.add_argument("--labels", nargs="+", help="a label per run (default: the folder names)")
    args = parser.parse_args(argv)
    if args.labels and len(args.labels) != len(args.runs):
        parser.error(f"--labels gives {len(args.labels)} labels for {len(args.runs)} runs")
    try:
        records = [load(path) for path in args.runs]
        labels = args.labels or [record.path.parent.name for record in records]
        print(table(records, labels))
    except RecordError as err:
        print(f"compare_runs: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
