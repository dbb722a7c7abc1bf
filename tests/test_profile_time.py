"""workflow/scripts/profile_time.py: a profile's run time, summed from its run records (issue
"Performance", goal 3)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "workflow" / "scripts" / "profile_time.py"


def write_run(runs: Path, dataset: str, model: str, seed: int, device: str, seconds: float, gpus=None) -> Path:
    folder = runs / dataset / model / "default" / f"seed~{seed}"
    folder.mkdir(parents=True)
    path = folder / "run.json"
    path.write_text(json.dumps({"model": model, "training": {"device": device}, "total_seconds": seconds,
                                "machine": {"gpus": gpus or []}}))
    return path


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def test_sums_by_model_device_and_gpu(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "Beauty", "E4SRec", 0, "cuda", 1800.0, ["NVIDIA H100"])
    write_run(runs, "Yelp", "E4SRec", 1, "cuda", 3600.0, ["NVIDIA H100"])
    write_run(runs, "Beauty", "SASRec", 0, "cpu", 720.0)
    done = run(str(runs), "--out", str(tmp_path / "time.json"))
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "time.json").read_text())
    assert result["runs"] == 3
    assert result["rows"] == [{"model": "E4SRec", "device": "cuda", "gpu": "NVIDIA H100", "runs": 2, "seconds": 5400.0},
                              {"model": "SASRec", "device": "cpu", "gpu": "-", "runs": 1, "seconds": 720.0}]
    assert result["by_device"] == {"cuda": {"runs": 2, "seconds": 5400.0}, "cpu": {"runs": 1, "seconds": 720.0}}
    assert "| E4SRec | cuda | NVIDIA H100 | 2 | 1.50 |" in done.stdout
    assert "| **all** | cpu | | 1 | **0.20** |" in done.stdout
    assert "git" in result and "date" in result  # provenance


def test_a_record_without_its_time_is_named(tmp_path):
    runs = tmp_path / "runs"
    path = write_run(runs, "Beauty", "BPR", 0, "cpu", 1.0)
    record = json.loads(path.read_text())
    del record["total_seconds"]
    path.write_text(json.dumps(record))
    done = run(str(runs))
    assert done.returncode != 0 and f"{path}: run record without the field 'total_seconds'" in done.stderr
    assert "no run records" in run(str(tmp_path / "empty")).stderr
