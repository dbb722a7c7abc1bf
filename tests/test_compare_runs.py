"""workflow/scripts/compare_runs.py: the one-GPU-against-DDP table, read from run records (issue
"Performance", goal 4), run as a user runs it on the committed
records of tests/benchmarks/records/compile_scope (2 x H200, commit b97aae9, 2026-11-27)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "workflow" / "scripts" / "compare_runs.py"
RECORDS = ROOT / "tests" / "benchmarks" / "records" / "compile_scope"


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=60)


def test_table_of_one_gpu_against_ddp_from_the_committed_records():
    result = run_script(RECORDS / "layers_seed1.json", RECORDS / "ddp2_layers_seed1.json",
                        "--labels", "1 GPU", "DDP")
    assert result.returncode == 0, result.stderr
    header, rule, one, two = result.stdout.strip().splitlines()
    assert header.startswith("| run | processes | GPU |") and rule.count("---") == header.count("|") - 1
    # the numbers of paper/PERFORMANCE.md's compile-scope table (2 x H200, b97aae9), read from the records
    assert one.split(" | ")[1:8] == ["1", "NVIDIA H200", "70.1, 33.7, 33.6", "137.4 s", "1.00x, 1.00x", "43,130",
                                     "14.8 GiB a GPU"]
    assert two.split(" | ")[1:6] == ["2", "NVIDIA H200", "83.1, 38.2, 35.6", "156.8 s", "0.88x, 0.94x"]
    assert one.endswith("| 0.0283 / 0.0398 / 0.0396 | 0.0559 / 0.0300 |")
    assert two.endswith("| 0.0286 / 0.0397 / 0.0393 | 0.0552 / 0.0292 |")


def test_a_run_folder_stands_for_its_record_and_names_the_rows(tmp_path):
    folder = tmp_path / "one_gpu"
    folder.mkdir()
    (folder / "run.json").write_text((RECORDS / "layers_seed1.json").read_text())
    result = run_script(folder)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[2].startswith("| one_gpu | 1 | NVIDIA H200 |")


def test_a_record_without_a_needed_field_is_named(tmp_path):
    record = json.loads((RECORDS / "layers_seed1.json").read_text())
    del record["metrics"]["test_full"]
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(record))
    result = run_script(RECORDS / "layers_seed1.json", broken)
    assert result.returncode == 2 and result.stdout == ""
    assert f"{broken}: no field metrics.test_full" in result.stderr
    result = run_script(tmp_path / "missing.json")
    assert result.returncode == 2 and "missing.json: cannot read a run record" in result.stderr


def test_labels_must_match_the_runs():
    result = run_script(RECORDS / "layers_seed1.json", "--labels", "a", "b")
    assert result.returncode == 2 and "--labels gives 2 labels for 1 runs" in result.stderr
