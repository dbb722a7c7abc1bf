"""The compile cache shared by runs and processes (e4srec/compile_cache.py) and its benchmark
(workflow/scripts/compile_cache_benchmark.py), on the CPU with a tiny LLaMA and the step compiled.

One module fixture runs, side by side, the benchmark (two fresh ``e4srec train`` processes sharing a
cache folder, empty at first) and a third run with the cache switched off the workflow's way
(``E4SREC_COMPILE_CACHE=""``); every run has one thread, so that the CPU numbers are comparable bit for bit."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from e4srec import compile_cache
from e4srec.files import read_json

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "workflow" / "scripts" / "compile_cache_benchmark.py"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_llm import write_item_embeddings, write_tiny_backbone, write_tiny_dataset  # noqa: E402

# one shape a step (examples), one step, no shared prefix: the fewest graphs that still compile the
# decoder layer's forward and backward (compile_scope="layers", as the profiles train)
SETTINGS = ["--training", "examples", "--compile-scope", "layers", "--max-steps", "1", "--threads", "1",
            "--params", json.dumps({"share_prefix": "never", "lora_r": 4}), "--device", "cpu"]


def load_script():
    spec = importlib.util.spec_from_file_location("compile_cache_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compile_cache")
    dataset = write_tiny_dataset(folder / "data" / "tiny", n_users=24, n_items=30)
    backbone = write_tiny_backbone(folder / "backbone")
    table = write_item_embeddings(folder / "items.safetensors", 30)
    inputs = ["--dataset-dir", str(dataset), "--backbone", str(backbone), "--item-embeddings", str(table)]
    # Inductor's compile workers: one each (two runs share two cores); its generated code off the system temp dir
    environment = {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": "1", "TORCHINDUCTOR_CACHE_DIR": str(folder / "scratch")}
    environment.pop("E4SREC_COMPILE_CACHE", None)
    benchmark = subprocess.Popen(
        [sys.executable, str(SCRIPT), *inputs, *SETTINGS, "--work", str(folder / "bench"), "--out", str(folder / "record.json")],
        env=environment, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    script = load_script()
    args = script.parse_args([*inputs, *SETTINGS])
    off_command = script.train_command(args, dataset, backbone, table, folder / "off", "cpu", cache=None)
    off = subprocess.Popen([sys.executable, "-m", "e4srec.cli", *off_command], cwd=ROOT, text=True,
                           env={**environment, "E4SREC_COMPILE_CACHE": "", "TORCHINDUCTOR_CACHE_DIR": str(folder / "off_scratch")},
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    bench_out, bench_err = benchmark.communicate(timeout=600)
    off_out, off_err = off.communicate(timeout=600)
    assert benchmark.returncode == 0, bench_err[-3000:]
    assert off.returncode == 0, off_err[-3000:]
    return {"folder": folder, "record": read_json(folder / "record.json"), "stdout": bench_out}


@pytest.mark.slow
def test_second_process_hits_the_cache_with_the_same_numbers(runs):
    record, folder = runs["record"], runs["folder"]
    first, second = record["runs"]
    assert first["cache_files_before"] == 0 and second["cache_files_before"] > 0
    assert first["counters"]["fxgraph_cache_miss"] > 0
    assert second["counters"]["fxgraph_cache_hit"] > 0
    assert second["counters"]["fxgraph_cache_miss"] < first["counters"]["fxgraph_cache_miss"]
    assert second["counters"]["autograd_cache_hit"] > 0
    assert first["cache"]["enabled"] and first["cache"]["fx_graph_cache"] and first["cache"]["autograd_cache"]
    assert first["cache"]["folder"] == str((folder / "bench" / "compile_cache").resolve())
    assert record["losses_equal"] and record["test_ndcg10_equal"]
    ranks = [pd.read_parquet(folder / "bench" / f"run{i}" / "ranks.parquet") for i in (0, 1)]
    pd.testing.assert_frame_equal(ranks[0], ranks[1])
    # the record: one JSON with its provenance and the table printed
    for key in ("command", "git", "machine", "date", "torch", "gpu", "table"):
        assert key in record
    assert record["table"] in runs["stdout"]
    run_json = read_json(folder / "bench" / "run1" / "run.json")
    assert run_json["compile_cache"]["counters"]["fxgraph_cache_hit"] == second["counters"]["fxgraph_cache_hit"]
    assert run_json["compile_cache"]["compile_seconds"] > 0


@pytest.mark.slow
def test_cache_off_compiles_alike_and_writes_no_cache(runs):
    folder = runs["folder"]
    off = read_json(folder / "off" / "run.json")
    cached = off["compile_cache"]
    assert cached["configured"] and cached["enabled"] is False
    assert cached["fx_graph_cache"] is False and cached["autograd_cache"] is False
    assert cached["counters"]["fxgraph_cache_hit"] == cached["counters"]["fxgraph_cache_miss"] == 0
    assert cached["counters"]["autograd_cache_hit"] == cached["counters"]["autograd_cache_miss"] == 0
    assert cached["compile_seconds"] > 0  # it did compile
    scratch = folder / "off_scratch"  # Inductor's folder of that run: generated code, but no cache entries
    assert not [p for p in scratch.rglob("*") if p.is_file() and {"fxgraph", "aotautograd"} & set(p.parts)]
    assert not (folder / "off" / "compile_cache").exists()
    on = read_json(folder / "bench" / "run0" / "run.json")
    assert [e["loss"] for e in off["training"]["epochs"]] == [e["loss"] for e in on["training"]["epochs"]]
    assert off["metrics"] == on["metrics"]
    pd.testing.assert_frame_equal(pd.read_parquet(folder / "off" / "ranks.parquet"),
                                  pd.read_parquet(folder / "bench" / "run0" / "ranks.parquet"))


def test_configure_is_idempotent(tmp_path, monkeypatch):
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    for name in compile_cache.CACHE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(inductor_config, "fx_graph_cache", inductor_config.fx_graph_cache)
    monkeypatch.setattr(functorch_config, "enable_autograd_cache", functorch_config.enable_autograd_cache)
    monkeypatch.chdir(tmp_path)
    first = compile_cache.configure("cache")  # relative: made absolute
    environment = {name: os.environ[name] for name in compile_cache.CACHE_VARIABLES}
    assert environment == {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache"),
                           "TRITON_CACHE_DIR": str(tmp_path / "cache" / "triton"),
                           "TORCHINDUCTOR_FX_GRAPH_CACHE": "1", "TORCHINDUCTOR_AUTOGRAD_CACHE": "1"}
    assert first["enabled"] and first["fx_graph_cache"] and first["autograd_cache"]
    assert inductor_config.fx_graph_cache and functorch_config.enable_autograd_cache
    assert compile_cache.configure(tmp_path / "cache") == first  # again, or as an absolute path: the same
    assert {name: os.environ[name] for name in compile_cache.CACHE_VARIABLES} == environment
    assert not (tmp_path / "cache").exists()  # made by the first compile, not here
    off = compile_cache.configure("")
    assert off["enabled"] is False and not inductor_config.fx_graph_cache and not functorch_config.enable_autograd_cache
    assert compile_cache.configure(None) == off
    assert (os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"], os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"]) == ("0", "0")
    report = compile_cache.report()
    assert set(report["counters"]) >= {"fxgraph_cache_hit", "fxgraph_cache_miss", "autograd_cache_hit"}
    compile_cache._state.update(configured=False, enabled=None, folder=None)


def test_command_line_takes_the_option_over_the_environment(monkeypatch):
    from e4srec.cli import build_parser

    base = ["train", "--dataset-dir", "d", "--model", "POP", "--out", "o"]
    assert build_parser().parse_args(base).compile_cache is None  # then E4SREC_COMPILE_CACHE, if set
    assert build_parser().parse_args([*base, "--compile-cache", "c"]).compile_cache == "c"
    assert build_parser().parse_args([*base, "--no-compile-cache"]).compile_cache == ""
    with pytest.raises(SystemExit):
        build_parser().parse_args([*base, "--compile-cache", "c", "--no-compile-cache"])
