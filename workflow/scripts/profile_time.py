#!/usr/bin/env python
"""Add up the wall-clock time of every run of a profile, from the committed run records.

Made for issue "Performance", goal 3 (the whole paper profile within an hour on one H100): it reads
every ``<runs>/<dataset>/<model>/<variant>/seed~N/run.json`` and sums its ``total_seconds`` (training,
evaluation and saving, as the run measured itself) by model, by training device and by the GPU the
record names. Runs that shared a GPU (the paper profile ran two to four a GPU) each count their own
wall-clock time, so the GPU sums are the runs' time, not the GPUs'. Every number is read from the
records; a record without the fields is an error naming the file::

    python workflow/scripts/profile_time.py results/paper/runs --out profile_time.json
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from e4srec.files import read_json, write_json  # noqa: E402
from e4srec.provenance import record  # noqa: E402


def read(path: Path) -> tuple[str, str, str, float]:
    """(model, training device, GPU or "-", total seconds) of one run record."""
    try:
        run = read_json(path)
        gpus = run.get("machine", {}).get("gpus") or ["-"]
        return run["model"], run["training"]["device"], gpus[0], float(run["total_seconds"])
    except (OSError, ValueError) as err:  # ValueError: InputError from read_json included
        raise SystemExit(f"profile_time.py: {path}: not a readable run record ({err})")
    except (KeyError, TypeError) as err:
        raise SystemExit(f"profile_time.py: {path}: run record without the field {err}")


def tally(runs_dir: Path) -> dict:
    paths = sorted(runs_dir.glob("*/*/*/seed~*/run.json"))
    if not paths:
        raise SystemExit(f"profile_time.py: {runs_dir}: no run records (<dataset>/<model>/<variant>/seed~N/run.json)")
    groups = defaultdict(lambda: {"runs": 0, "seconds": 0.0})
    for path in paths:
        model, device, gpu, seconds = read(path)
        group = groups[(model, device, gpu)]
        group["runs"] += 1
        group["seconds"] += seconds
    rows = [{"model": model, "device": device, "gpu": gpu, **values} for (model, device, gpu), values in sorted(groups.items())]
    by_device = defaultdict(lambda: {"runs": 0, "seconds": 0.0})
    for row in rows:
        by_device[row["device"]]["runs"] += row["runs"]
        by_device[row["device"]]["seconds"] += row["seconds"]
    return {"runs_dir": str(runs_dir), "runs": len(paths), "rows": rows, "by_device": dict(by_device)}


def markdown(result: dict) -> str:
    lines = ["| model | device | GPU | runs | hours (sum of the runs' own wall-clock time) |", "|---|---|---|---:|---:|"]
    lines += [f"| {r['model']} | {r['device']} | {r['gpu']} | {r['runs']} | {r['seconds'] / 3600:.2f} |"
              for r in result["rows"]]
    lines += [f"| **all** | {device} | | {v['runs']} | **{v['seconds'] / 3600:.2f}** |"
              for device, v in sorted(result["by_device"].items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs_dir", type=Path, help="a profile's runs folder (results/paper/runs)")
    parser.add_argument("--out", type=Path, help="also write the sums as JSON (with provenance)")
    args = parser.parse_args(argv)
    result = tally(args.runs_dir)
    table = markdown(result)
    print(table)
    if args.out:
        write_json(args.out, record(experiment="wall-clock time of a profile's runs, from their records",
                                    table=table, **result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
