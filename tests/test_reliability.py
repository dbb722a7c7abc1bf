"""Reliability and security properties of the suite, each with a test that fails if it breaks.

1. Interruption: ``e4srec train`` killed with SIGKILL at seeded random moments (after at least one
   epoch checkpoint) and rerun with the same command ends with ranks byte-identical to an
   uninterrupted run (SASRec: 3 kills in a row; E4SRec on the tiny random backbone: 1 kill); while a
   killed run is unfinished there is no run.json nor ranks.parquet. A crash inside the checkpoint
   write itself (after the tensors, before state.json) resumes exactly too.
2. Determinism: two runs of the CI profile workflow (baselines and paper targets, E4SRec off) into
   two temporary folders give byte-identical ranks.parquet files and identical table CSVs; run.json
   records the nondeterminism settings.
3. Bad input beyond the dataset files of tests/test_data.py: 27 cases (BAD_TRAIN: 13,
   BAD_RECOMMEND: 4, BAD_INSTRUCT: 4, BAD_CONFIG: 5, plus the audit of a folder without runs),
   each through the CLI: non-zero exit, a message naming the file (or key) and the problem, and no
   output file left behind.
4. Resource faults: out of GPU memory in the training step says what to lower and names the batch
   size; a NaN loss through the CLI exits non-zero naming the step; ``device: cuda`` without a GPU
   fails before any work and writes nothing.
5. Safe artefacts: no pickle, no ``torch.load`` without ``weights_only=True``, no
   ``trust_remote_code=True``, no ``allow_pickle=True`` in e4srec/ and baselines/.
6. Provenance audit (``e4srec audit``): OK on a real tiny run, FAIL on doctored records.
"""
from __future__ import annotations

import ast
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tokenize
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from e4srec import runs, trainer
from e4srec.data import SequenceData
from e4srec.files import load_tensors, save_tensors, sha256_file, write_parquet
from e4srec.recommender import Recommender
from e4srec.trainer import TrainConfig

try:
    from helpers import files_in, main_rc, prepare_tiny, random_sequences, small_sequence_data
    from tiny_llm import write_item_embeddings, write_tiny_backbone, write_tiny_dataset
except ImportError:  # tests/ imported as a package
    from tests.helpers import files_in, main_rc, prepare_tiny, random_sequences, small_sequence_data
    from tests.tiny_llm import write_item_embeddings, write_tiny_backbone, write_tiny_dataset

ROOT = Path(__file__).resolve().parent.parent

# Kills survived in every run of this file: 3 (SASRec, in a row) + 1 (E4SRec) = 4 SIGKILLs, each
# followed by a rerun of the same command; the final ranks equal the uninterrupted run's byte for byte.
SASREC_KILLS = 3
E4SREC_KILLS = 1
KILL_SEED = 2024

SASREC_TRAIN = {"device": "cpu", "epochs": 24, "batch_size": 32, "patience": 100}
E4SREC_TRAIN = {"device": "cpu", "epochs": 12, "batch_size": 8, "max_steps_per_epoch": 3, "learning_rate": 0.001,
                "scheduler": "cosine", "warmup_steps": 2, "eval_batch_size": 32, "patience": 100}


def e4srec_cli(*args: str, cwd: Path | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "e4srec.cli", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, **kwargs)


def train_command(dataset: Path, out: Path, model: str, train_params: dict, *extra: str) -> list[str]:
    return [sys.executable, "-m", "e4srec.cli", "train", "--dataset-dir", str(dataset), "--model", model,
            "--out", str(out), "--seed", "0", "--train-params", json.dumps(train_params), "--threads", "1",
            "--no-progress", *extra]


# ----------------------------------------------------------------------------------------------
# Shared tiny inputs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small prepared dataset (24 users, 30 items), the tiny random backbone and a 64-d item table."""
    root = tmp_path_factory.mktemp("reliability")
    dataset = write_tiny_dataset(root / "data" / "tiny", n_users=24, n_items=30, max_len=50)
    return {"root": root, "dataset": dataset, "backbone": write_tiny_backbone(root / "backbone"),
            "table": write_item_embeddings(root / "items.safetensors", 30)}


@pytest.fixture(scope="module")
def sasrec_dataset(tmp_path_factory):
    """300 users: SASRec epochs long enough (about 0.1 s) to be killed inside one."""
    root = tmp_path_factory.mktemp("sasrec-data")
    return prepare_tiny(root, random_sequences(300, 80, seed=3, min_len=4, max_len=20), max_len=10, n_negatives=9)


@pytest.fixture(scope="module")
def e4srec_reference(tiny):
    """An uninterrupted E4SRec run through the CLI (its components serve the recommend cases)."""
    out = tiny["root"] / "e4srec-reference"
    result = subprocess.run(train_command(tiny["dataset"], out, "E4SRec", E4SREC_TRAIN, "--backbone",
                                          str(tiny["backbone"]), "--item-embeddings", str(tiny["table"])),
                            capture_output=True, text=True, cwd=tiny["root"])
    assert result.returncode == 0, result.stderr[-3000:]
    return out


# ----------------------------------------------------------------------------------------------
# 1. Interruption


def completed_epoch(checkpoints: Path) -> int:
    try:
        return json.loads((checkpoints / "state.json").read_text())["epoch"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return -1


def kill_during_training(command: list[str], out: Path, after_epoch: int, delay: float, log: Path,
                         epochs: int, timeout: float = 240) -> int:
    """Start ``command``, wait for the checkpoint of ``after_epoch``, wait ``delay`` seconds more and
    SIGKILL it; check that the killed run left no run.json (nor ranks.parquet while still training).
    Returns the last complete epoch at the kill."""
    checkpoints = out / "checkpoints"
    with open(log, "a") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=handle, cwd=out.parent)
    deadline = time.monotonic() + timeout
    try:
        while completed_epoch(checkpoints) < after_epoch:
            assert process.poll() is None, f"finished (status {process.returncode}) before epoch {after_epoch}: " \
                                           + log.read_text()[-2000:]
            assert time.monotonic() < deadline, "timed out waiting for a checkpoint"
            time.sleep(0.005)
        time.sleep(delay)
        assert process.poll() is None, "the run finished before the kill: lower the delay or add epochs"
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    epoch = completed_epoch(checkpoints)
    assert not (out / "run.json").exists(), "a killed run left run.json: it looks finished"
    if epoch < epochs - 1:  # still training at the kill: no ranks either
        assert not (out / "ranks.parquet").exists()
        assert not (out / "item_embeddings.safetensors").exists()
    return epoch


def training_history(run_json: Path) -> list:
    record = json.loads(run_json.read_text())["training"]
    return [(e["epoch"], e["loss"], e["valid_ndcg10"], e["examples"]) for e in record["epochs"]]


def assert_same_run(reference: Path, resumed: Path) -> None:
    assert (resumed / "ranks.parquet").read_bytes() == (reference / "ranks.parquet").read_bytes()
    pd.testing.assert_frame_equal(pd.read_parquet(resumed / "ranks.parquet"), pd.read_parquet(reference / "ranks.parquet"))
    assert training_history(resumed / "run.json") == training_history(reference / "run.json")


def same_safetensors(a: Path, b: Path) -> bool:
    from safetensors import safe_open

    left, right = load_tensors(a), load_tensors(b)
    with safe_open(str(a), "pt") as ha, safe_open(str(b), "pt") as hb:
        same_metadata = ha.metadata() == hb.metadata()
    return same_metadata and left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def interrupted_run(command: list[str], out: Path, kills: int, epochs: int, max_delay: float) -> list[int]:
    """Kill ``command`` ``kills`` times at seeded random moments, each after a new checkpoint, and rerun it
    each time; the last rerun finishes. Returns the epochs completed at each kill."""
    rng = np.random.default_rng(KILL_SEED)
    log = out.parent / f"{out.name}.log"
    at_kill, epoch = [], -1
    for _ in range(kills):
        after = epoch + int(rng.integers(1, 4))  # at least one more checkpoint than at the last kill
        epoch = kill_during_training(command, out, after, float(rng.uniform(0.0, max_delay)), log, epochs)
        assert epoch >= after
        at_kill.append(epoch)
    final = subprocess.run(command, capture_output=True, text=True, cwd=out.parent)
    assert final.returncode == 0, final.stderr[-3000:]
    assert "resumed from" in final.stderr  # it continued, it did not start over
    return at_kill


@pytest.mark.slow
def test_sasrec_survives_repeated_sigkill(sasrec_dataset, tmp_path):
    reference_out, out = tmp_path / "reference", tmp_path / "interrupted"
    reference = subprocess.Popen(train_command(sasrec_dataset, reference_out, "SASRec", SASREC_TRAIN),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        at_kill = interrupted_run(train_command(sasrec_dataset, out, "SASRec", SASREC_TRAIN), out, SASREC_KILLS,
                                  SASREC_TRAIN["epochs"], max_delay=0.4)
    finally:
        _, stderr = reference.communicate(timeout=300)
    assert reference.returncode == 0, stderr[-3000:]
    assert len(at_kill) == SASREC_KILLS and at_kill == sorted(at_kill) and at_kill[-1] < SASREC_TRAIN["epochs"] - 1
    assert_same_run(reference_out, out)
    # the same tensor and metadata (not the same bytes: safetensors writes its metadata map in a random order)
    assert same_safetensors(out / "item_embeddings.safetensors", reference_out / "item_embeddings.safetensors")
    assert not list((out / "checkpoints").glob("*.next.safetensors"))  # nothing left staged


@pytest.mark.slow
def test_e4srec_survives_sigkill(tiny, e4srec_reference, tmp_path):
    out = tmp_path / "interrupted"
    command = train_command(tiny["dataset"], out, "E4SRec", E4SREC_TRAIN, "--backbone", str(tiny["backbone"]),
                            "--item-embeddings", str(tiny["table"]))
    at_kill = interrupted_run(command, out, E4SREC_KILLS, E4SREC_TRAIN["epochs"], max_delay=0.3)
    assert len(at_kill) == E4SREC_KILLS and at_kill[-1] < E4SREC_TRAIN["epochs"] - 1
    assert_same_run(e4srec_reference, out)
    projections = "components/projections.safetensors"
    assert same_safetensors(out / projections, e4srec_reference / projections)


class MeanModel(Recommender):
    """Mean of the history's item embeddings, a linear scorer, dropout (draws from torch's generator)."""

    training_input = "examples"

    def __init__(self, n_items: int, n_users: int, max_len: int, config=None):
        super().__init__(n_items, n_users, max_len)
        self.embedding = nn.Embedding(n_items + 1, 8, padding_idx=0)
        self.output = nn.Linear(8, n_items + 1)
        self.dropout = nn.Dropout(0.2)

    def encode(self, history):
        mask = (history > 0).unsqueeze(-1).float()
        return self.dropout((self.embedding(history) * mask).sum(1) / mask.sum(1).clamp(min=1.0))

    def calculate_loss(self, batch):
        return F.cross_entropy(self.output(self.encode(batch["history"])), batch["target"])

    def full_sort_predict(self, batch):
        return self.output(self.encode(batch["history"]))


@pytest.fixture(scope="module")
def small_data():
    return small_sequence_data()


def mean_model(data, seed: int = 0) -> MeanModel:
    torch.manual_seed(seed)
    return MeanModel(data.n_items, data.n_users, data.max_len)


def weights_of(model) -> dict:
    return {k: v.detach().clone() for k, v in trainer.trainable_state(model).items()}


@pytest.mark.parametrize("cut", ["before_state_json", "after_state_json"])
def test_kill_inside_the_checkpoint_write_resumes_exactly(small_data, tmp_path, monkeypatch, cut):
    """The window SIGKILL rarely hits: epoch 1's tensors written, state.json not yet (or just) written."""
    config = TrainConfig(epochs=3, batch_size=16, learning_rate=0.05, patience=100, seed=1, device="cpu",
                         scheduler="cosine", warmup_steps=2)
    whole = mean_model(small_data)
    trainer.train(whole, small_data, config, tmp_path / "whole", progress=False)

    class Killed(BaseException):
        pass

    calls = {"state": 0}
    write_json, settle = trainer.write_json, trainer._settle_checkpoint

    def dying_write_json(path, obj):
        if Path(path).name == "state.json":
            calls["state"] += 1
            if calls["state"] == 2 and cut == "before_state_json":
                raise Killed()
        write_json(path, obj)

    def dying_settle(folder, epoch):
        if epoch == 1 and cut == "after_state_json" and calls["state"] == 2:
            raise Killed()
        settle(folder, epoch)

    monkeypatch.setattr(trainer, "write_json", dying_write_json)
    monkeypatch.setattr(trainer, "_settle_checkpoint", dying_settle)
    with pytest.raises(Killed):
        trainer.train(mean_model(small_data), small_data, config, tmp_path / "cut", progress=False)
    monkeypatch.setattr(trainer, "write_json", write_json)
    monkeypatch.setattr(trainer, "_settle_checkpoint", settle)
    assert completed_epoch(tmp_path / "cut") == (0 if cut == "before_state_json" else 1)

    resumed = mean_model(small_data, seed=99)
    trainer.train(resumed, small_data, config, tmp_path / "cut", progress=False)
    assert all(torch.equal(a, b) for a, b in zip(weights_of(whole).values(), weights_of(resumed).values()))
    assert not list((tmp_path / "cut").glob("*.next.safetensors"))
    for name in ("last", "best", "optimizer"):
        left = load_tensors(tmp_path / "whole" / f"{name}.safetensors")
        right = load_tensors(tmp_path / "cut" / f"{name}.safetensors")
        assert left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left), name


# ----------------------------------------------------------------------------------------------
# 2. Determinism of the workflow


def snakemake_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "--nolock", *args]


def ci_config(folder: Path) -> Path:
    """The CI profile, baselines and tables only (E4SRec has its own determinism test above)."""
    text = f"""out: {folder}/results
resources: {folder}/resources
datasets: [TinyA]
custom_datasets:
  TinyA: {ROOT}/.test/data/TinyA.txt
  TinyB: {ROOT}/.test/data/TinyB.txt
max_len: 8
seeds: [0]
device: cpu
baselines:
  models: [POP, SASRec]
  train: {{epochs: 3, batch_size: 16, patience: 2, eval_batch_size: 64}}
e4srec:
  enabled: false
"""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(text)
    return folder / "config.yaml"


@pytest.mark.slow
def test_workflow_reruns_are_byte_identical(tmp_path):
    folders = [tmp_path / "a", tmp_path / "b"]
    processes = [subprocess.Popen(snakemake_command("--cores", "1", "--configfile", str(ci_config(f)), "--quiet", "all",
                                                    "--", "baselines", "paper"),
                                  cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for f in folders]
    for process in processes:
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 0, output[-3000:]
    a, b = (f / "results" for f in folders)
    ranks = sorted(p.relative_to(a) for p in a.glob("runs/**/ranks.parquet"))
    assert len(ranks) >= 2 and ranks == sorted(p.relative_to(b) for p in b.glob("runs/**/ranks.parquet"))
    for path in ranks:
        assert (a / path).read_bytes() == (b / path).read_bytes(), path
    tables = sorted(p.relative_to(a) for p in a.glob("tables/*.csv"))
    assert {"table2.csv", "table3.csv", "table6.csv", "metrics.csv"} <= {p.name for p in tables}
    assert tables == sorted(p.relative_to(b) for p in b.glob("tables/*.csv"))
    for path in tables:
        assert (a / path).read_bytes() == (b / path).read_bytes(), path
    record = json.loads((a / "runs/TinyA/SASRec/default/seed~0/run.json").read_text())
    settings = record["nondeterminism"]
    assert settings["device_type"] == "cpu" and settings["torch_threads"] == 1
    assert {"deterministic_algorithms", "cudnn_deterministic", "cudnn_benchmark", "cublas_workspace_config"} <= set(settings)
    assert "GPU runs are not bitwise reproducible" in settings["note"]


def test_run_json_records_nondeterminism_settings(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    record = runs.run(tiny["dataset"], "POP", tmp_path / "run", train_params={"device": "cpu"}, progress=False)
    written = json.loads((tmp_path / "run" / "run.json").read_text())["nondeterminism"]
    assert written == json.loads(json.dumps(record["nondeterminism"]))
    assert written["deterministic_algorithms"] == torch.are_deterministic_algorithms_enabled()
    assert written["cudnn_deterministic"] == torch.backends.cudnn.deterministic
    assert written["cudnn_benchmark"] == torch.backends.cudnn.benchmark
    assert written["cublas_workspace_config"] == ":4096:8" and written["device_type"] == "cpu"


# ----------------------------------------------------------------------------------------------
# 3. Bad input through the CLI


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture(scope="module")
def checkpoint_run(tiny, tmp_path_factory):
    """A finished SASRec run's checkpoints, without its outputs (a resume starts from them)."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    runs.run(tiny["dataset"], "SASRec", out, train_params={"device": "cpu", "epochs": 1, "batch_size": 16},
             progress=False)
    for name in ("run.json", "ranks.parquet", "item_embeddings.safetensors"):
        (out / name).unlink()
    return out


def with_checkpoint(checkpoint_run: Path, tmp_path: Path, damage) -> Path:
    out = tmp_path / "run"
    shutil.copytree(checkpoint_run, out)
    damage(out / "checkpoints")
    return out


# (case id, how to build the argv and the out folder, pattern the message must hold)
def _bad_table(name, rows=31, dim=64):
    def make(tiny, tmp_path):
        table = tmp_path / name
        save_tensors(table, {"item_embeddings": torch.zeros(rows, dim)})
        return table
    return make


def _truncated_table(tiny, tmp_path):
    table = tmp_path / "truncated.safetensors"
    shutil.copy(tiny["table"], table)
    truncate(table)
    return table


def _other_tensor(tiny, tmp_path):
    table = tmp_path / "other.safetensors"
    save_tensors(table, {"weights": torch.zeros(31, 64)})
    return table


def _e4srec(table_maker):
    def argv(tiny, tmp_path, checkpoint_run):
        table = table_maker(tiny, tmp_path)
        out = tmp_path / "run"
        return ["train", "--dataset-dir", str(tiny["dataset"]), "--model", "E4SRec", "--out", str(out),
                "--backbone", str(tiny["backbone"]), "--item-embeddings", str(table),
                "--train-params", '{"device": "cpu", "epochs": 1}'], out, table.name
    return argv


def _sasrec(params: str = "{}", model: str = "SASRec", dataset=None, damage=None, where=None):
    def argv(tiny, tmp_path, checkpoint_run):
        out = with_checkpoint(checkpoint_run, tmp_path, damage) if damage else tmp_path / "run"
        return ["train", "--dataset-dir", str(dataset(tmp_path) if dataset else tiny["dataset"]), "--model", model,
                "--out", str(out), "--params", params, "--train-params",
                '{"device": "cpu", "epochs": 1, "batch_size": 16}'], \
            out, where(out, tmp_path) if where else None
    return argv


def _reshaped_checkpoint(checkpoints: Path) -> None:
    """last.safetensors with one tensor of another shape, as another model's checkpoint holds."""
    tensors = load_tensors(checkpoints / "last.safetensors")
    name = sorted(tensors)[0]
    tensors[name] = torch.zeros(tensors[name].shape[0] + 1, *tensors[name].shape[1:])
    save_tensors(checkpoints / "last.safetensors", tensors)


BAD_TRAIN = [
    ("item_embeddings_truncated", _e4srec(_truncated_table), "not a valid safetensors file"),
    ("item_embeddings_wrong_rows", _e4srec(_bad_table("rows.safetensors", rows=20)),
     "item_embeddings has 20 rows, the dataset has 30 items"),
    ("item_embeddings_wrong_dim", _e4srec(_bad_table("dim.safetensors", dim=32)),
     "item_embeddings has dimension 32, expected 64"),
    ("item_embeddings_no_tensor", _e4srec(_other_tensor), "no tensor 'item_embeddings'"),
    ("checkpoint_truncated", _sasrec(damage=lambda c: truncate(c / "last.safetensors"),
                                     where=lambda out, _: "checkpoints/last.safetensors"), "not a valid safetensors file"),
    ("optimizer_checkpoint_truncated", _sasrec(damage=lambda c: truncate(c / "optimizer.safetensors"),
                                               where=lambda out, _: "optimizer.safetensors"),
     "not a valid safetensors file"),
    ("checkpoint_state_truncated", _sasrec(damage=lambda c: truncate(c / "state.json"),
                                           where=lambda out, _: "state.json"), "not valid JSON"),
    # other parameters would start over (the resume key differs): here the key matches, the tensors do not
    ("checkpoint_of_another_shape", _sasrec(damage=_reshaped_checkpoint, where=lambda out, _: "last.safetensors"),
     r"tensor \S+ has shape \([\d, ]+\), the model expects \([\d, ]+\)"),
    ("unknown_model", _sasrec(model="SASRecc"), "unknown model 'SASRecc'"),
    ("params_unknown_parameter", _sasrec('{"depth": 2}'), r"unknown parameter\(s\) \['depth'\] for SASRec"),
    ("params_wrong_type", _sasrec('{"dropout": "0.5"}'), "parameter 'dropout' of SASRec must be float, got '0.5'"),
    ("params_not_an_object", _sasrec('[1, 2]'), "--params.*expected a JSON object"),
    ("dataset_dir_missing", _sasrec(dataset=lambda tmp: tmp / "nowhere", where=lambda out, tmp: str(tmp / "nowhere")),
     "dataset.json"),
]


@pytest.mark.parametrize("case, build, pattern", BAD_TRAIN, ids=[c[0] for c in BAD_TRAIN])
def test_bad_train_input(case, build, pattern, tiny, checkpoint_run, tmp_path, capsys):
    argv, out, names = build(tiny, tmp_path, checkpoint_run)
    before = files_in(out)
    status = main_rc(argv)
    message = capsys.readouterr().err
    assert status != 0
    assert re.search(pattern, message), message
    if names:  # the file at fault
        assert names in message, message
    assert files_in(out) == before  # nothing written (a damaged checkpoint is left as it was)
    assert "Traceback" not in message  # a message, not a crash


def test_unknown_model_as_a_subprocess(tiny, tmp_path):
    """One case end to end through the console entry point: status 2, one line, nothing written."""
    result = e4srec_cli("train", "--dataset-dir", str(tiny["dataset"]), "--model", "Nope", "--out",
                        str(tmp_path / "run"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("e4srec train: error: unknown model 'Nope'"), result.stderr
    assert files_in(tmp_path / "run") == []


def _recommend(history: str, damage=None):
    def argv(tiny, components, tmp_path):
        folder = components
        if damage:  # a damaged copy beside the original (the item table pointer is relative)
            folder = components.parent / f"components-{tmp_path.name}"
            shutil.copytree(components, folder)
            damage(folder)
        return ["recommend", "--backbone", str(tiny["backbone"]), "--components", str(folder), "--dataset", "tiny",
                "--history", history], folder
    return argv


BAD_RECOMMEND = [
    ("history_unknown_item", _recommend("1 2 999"), "history: unknown item id 999 .items are 1..30"),
    ("history_padding_item", _recommend("0 3"), "history: unknown item id 0"),
    ("history_not_integers", _recommend("1 two 3"), "--history '1 two 3': expected item ids"),
    ("projections_truncated", _recommend("1 2 3", damage=lambda f: truncate(f / "projections.safetensors")),
     "projections.safetensors: not a valid safetensors file"),
]


@pytest.mark.parametrize("case, build, pattern", BAD_RECOMMEND, ids=[c[0] for c in BAD_RECOMMEND])
def test_bad_recommend_input(case, build, pattern, tiny, e4srec_reference, tmp_path, capsys):
    argv, folder = build(tiny, e4srec_reference / "components", tmp_path)
    try:
        status = main_rc(argv)
        captured = capsys.readouterr()
    finally:
        if folder.name != "components":
            shutil.rmtree(folder)
    assert status == 2 and captured.out == ""  # no recommendation printed
    assert re.search(pattern, captured.err), captured.err


def _instructions(records) -> callable:
    def write(path: Path) -> Path:
        path.write_text(json.dumps(records) if not isinstance(records, str) else records)
        return path
    return write


GOOD = {"instruction": "Add the numbers.", "input": "1 and 2", "output": "3"}
BAD_INSTRUCT = [
    ("instruction_missing_output", _instructions([GOOD, {"instruction": "Say hi.", "input": ""}]), [],
     r"record 1: missing field 'output'"),
    ("instruction_missing_instruction", _instructions([{"input": "", "output": "x"}]), [],
     r"record 0: missing field 'instruction'"),
    ("instruction_field_not_a_string", _instructions([{**GOOD, "output": 3}]), [],
     r"record 0: field 'output' must be a string"),
    ("instruction_unknown_parameter", _instructions([GOOD]), ["--param", "epochz=1"],
     r"unknown parameter\(s\) \['epochz'\]"),
]


@pytest.mark.parametrize("case, write, extra, pattern", BAD_INSTRUCT, ids=[c[0] for c in BAD_INSTRUCT])
def test_bad_instruction_input(case, write, extra, pattern, tiny, tmp_path, capsys):
    data = write(tmp_path / "instructions.json")
    out = tmp_path / "tuned"
    status = main_rc(["instruct", "--backbone", str(tiny["backbone"]), "--data", str(data), "--out", str(out), *extra])
    message = capsys.readouterr().err
    assert status == 2
    assert re.search(pattern, message), message
    if case != "instruction_unknown_parameter":
        assert str(data) in message
    assert not out.exists() and files_in(tmp_path) == ["instructions.json"]


BAD_CONFIG = [
    ("seeds_wrong_type", ["seeds=zero"], "seeds", "'zero' is not of type 'array'"),
    ("device_not_a_choice", ["device=gpu"], "device", "'gpu' is not one of"),
    ("nested_unknown_key", ['e4srec={"enabled": false, "epochz": 3}'], "epochz", "Additional properties"),
    ("unknown_model_in_configfile", "baselines: {models: [POP, SASRecc]}\n", "SASRecc", "is not one of"),
    ("max_len_string_in_configfile", "max_len: eight\n", "max_len", "is not of type 'integer'"),
]


@pytest.mark.parametrize("case, change, key, problem", BAD_CONFIG, ids=[c[0] for c in BAD_CONFIG])
def test_bad_config_is_a_schema_error(case, change, key, problem, tmp_path):
    args = ["-n", "--configfile", ".test/config.yaml"]
    if isinstance(change, str):
        (tmp_path / "extra.yaml").write_text(change)
        args = ["-n", "--configfile", ".test/config.yaml", str(tmp_path / "extra.yaml")]
        change = []
    result = subprocess.run(snakemake_command(*args, "--config", f"out={tmp_path}/results",
                                              f"resources={tmp_path}/resources", *change),
                            cwd=ROOT, capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert key in output and problem in output, output[-3000:]
    assert not (tmp_path / "results").exists() and not (tmp_path / "resources").exists()


def test_audit_of_a_folder_without_runs(tmp_path, capsys):
    assert main_rc(["audit", str(tmp_path)]) == 2
    assert f"{tmp_path}: no run folders" in capsys.readouterr().err


def test_bad_input_count_in_docstring():
    count = len(BAD_TRAIN) + len(BAD_RECOMMEND) + len(BAD_INSTRUCT) + len(BAD_CONFIG) + 1
    assert f"{count} cases" in __doc__


# ----------------------------------------------------------------------------------------------
# 4. Resource faults


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_out_of_memory_says_what_to_lower(small_data, tmp_path, where):
    class Hungry(MeanModel):
        def calculate_loss(self, batch):
            if where == "forward":
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            loss = super().calculate_loss(batch)

            def explode(grad):
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

            loss.register_hook(explode)
            return loss

    torch.manual_seed(0)
    model = Hungry(small_data.n_items, small_data.n_users, small_data.max_len)
    config = TrainConfig(epochs=2, batch_size=16, device="cpu", seed=0)
    with pytest.raises(RuntimeError) as err:
        trainer.train(model, small_data, config, tmp_path / "ckpt", progress=False)
    message = str(err.value)
    assert isinstance(err.value.__cause__, torch.cuda.OutOfMemoryError)
    assert not isinstance(err.value, torch.cuda.OutOfMemoryError)
    for part in ("out of GPU memory", "epoch 0, step 0", "batch_size 16", "lower batch_size", "micro_batch_size",
                 "load_in: 4bit", "Tried to allocate 20.00 GiB"):
        assert part in message, message
    assert not (tmp_path / "ckpt" / "state.json").exists()


@pytest.mark.slow
def test_nan_loss_through_the_cli(tiny, tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(train_command(tiny["dataset"], out, "SASRec",
                                          {"device": "cpu", "epochs": 2, "batch_size": 4, "learning_rate": 1e30}),
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode != 0
    assert re.search(r"loss is (nan|inf|-inf) at epoch \d+, step \d+ \(batch \d+", result.stderr), result.stderr[-2000:]
    assert "lower the learning rate" in result.stderr
    assert not (out / "run.json").exists() and not (out / "ranks.parquet").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_gpu_fails_before_any_work(tiny, tmp_path):
    out = tmp_path / "run"
    result = e4srec_cli("train", "--dataset-dir", str(tiny["dataset"]), "--model", "SASRec", "--out", str(out),
                        "--train-params", '{"device": "cuda"}', cwd=tmp_path)
    assert result.returncode != 0
    assert "device: cuda was asked for, but no GPU is visible" in result.stderr
    assert files_in(tmp_path) == []  # nothing written, not even an empty run folder


def test_cuda_check_comes_before_loading(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # a dataset folder that does not exist: the device check must fail first
    with pytest.raises(RuntimeError, match="no GPU is visible"):
        runs.run(tmp_path / "no-dataset", "SASRec", tmp_path / "run", train_params={"device": "cuda"}, progress=False)
    assert files_in(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# 5. Safe artefacts


PICKLE_NAMES = re.compile(r"pickle|dill|joblib|shelve|marshal", re.IGNORECASE)


def unsafe_uses(source: str, filename: str = "<source>") -> list[str]:
    """Code (not comments or prose) that can execute code hidden in a file: pickle and friends,
    torch.load without weights_only=True, trust_remote_code=True, allow_pickle=True."""
    found = []
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    for token in tokens:
        if token.type == tokenize.NAME and PICKLE_NAMES.search(token.string):
            found.append(f"{filename}:{token.start[0]}: {token.string}")
    tree = ast.parse(source, filename)

    def truthy(node) -> bool:
        return not (isinstance(node, ast.Constant) and not node.value)

    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
            keywords = {k.arg: k.value for k in node.keywords}
            if name == "load" and owner == "torch":
                safe = keywords.get("weights_only")
                if not (isinstance(safe, ast.Constant) and safe.value is True):
                    found.append(f"{filename}:{node.lineno}: torch.load without weights_only=True")
            for key in ("trust_remote_code", "allow_pickle"):
                if key in keywords and truthy(keywords[key]):
                    found.append(f"{filename}:{node.lineno}: {key}={ast.unparse(keywords[key])}")
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value in ("trust_remote_code", "allow_pickle") and truthy(value):
                    found.append(f"{filename}:{node.lineno}: {{'{key.value}': {ast.unparse(value)}}}")
    for number, line in enumerate(source.splitlines(), start=1):  # the plain grep, strings included
        if re.search(r"(trust_remote_code|allow_pickle)\s*[=:]\s*True|torch\.load\(", line) and "weights_only=True" not in line:
            found.append(f"{filename}:{number}: {line.strip()}")
    return sorted(set(found))


def test_the_scanner_finds_unsafe_code():
    planted = ("import pickle\nfrom joblib import load\nx = torch.load(path)\ny = torch.load(path, weights_only=False)\n"
               "m = AutoModel.from_pretrained(p, trust_remote_code=True)\nnp.load(f, allow_pickle=True)\n"
               "kwargs = {'trust_remote_code': True}\n")
    found = unsafe_uses(planted)
    for needle in ("pickle", "joblib", "torch.load without weights_only=True", "trust_remote_code=True",
                   "allow_pickle=True", "{'trust_remote_code': True}"):
        assert any(needle in f for f in found), (needle, found)
    assert unsafe_uses("# never pickle\n'''no trust_remote_code here'''\nz = torch.load(p, weights_only=True)\n") == []


def test_package_has_no_unsafe_loading():
    files = sorted([*(ROOT / "e4srec").rglob("*.py"), *(ROOT / "baselines").rglob("*.py")])
    assert len(files) > 20
    found = [hit for path in files for hit in unsafe_uses(path.read_text(), str(path.relative_to(ROOT)))]
    assert found == []
    pickled = [str(p) for folder in ("e4srec", "baselines") for p in (ROOT / folder).rglob("*")
               if p.suffix in {".pkl", ".pickle", ".pt", ".pth", ".bin", ".joblib", ".npy", ".npz"}]
    assert pickled == []


# ----------------------------------------------------------------------------------------------
# 6. Provenance audit


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """A results folder as the workflow writes it: data/tiny and two runs (SASRec trained, POP)."""
    root = tmp_path_factory.mktemp("audited") / "results"
    source = tmp_path_factory.mktemp("raw")
    prepared = prepare_tiny(source, random_sequences(30, 25, seed=5, min_len=4, max_len=9), max_len=6, n_negatives=5)
    shutil.copytree(prepared, root / "data" / "tiny")
    for model, train in (("SASRec", {"device": "cpu", "epochs": 4, "batch_size": 8, "learning_rate": 0.01}),
                         ("POP", {"device": "cpu"})):
        runs.run(root / "data" / "tiny", model, root / "runs" / "tiny" / model / "default" / "seed~0",
                 train_params=train, progress=False)
    return root


SASREC_RUN = "runs/tiny/SASRec/default/seed~0"


def doctored(audited: Path, tmp_path: Path) -> Path:
    root = tmp_path / "results"
    shutil.copytree(audited, root)
    return root


def edit_record(root: Path, change) -> None:
    path = root / SASREC_RUN / "run.json"
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


def run_audit(root: Path, capsys) -> tuple[int, str]:
    status = main_rc(["audit", str(root)])
    return status, capsys.readouterr().out


def test_audit_passes_a_real_run(audited, capsys):
    record = json.loads((audited / SASREC_RUN / "run.json").read_text())
    git = record["git"]["commit"]
    status, out = run_audit(audited, capsys)
    if git == "unknown":  # a copy of the tree without .git: the audit must say so
        assert status == 1 and "git commit is 'unknown'" in out
        pytest.skip("no git checkout: commit unknown")
    assert status == 0, out
    lines = out.strip().splitlines()
    assert lines[0].startswith("OK   runs/tiny/POP/default/seed~0") and lines[1].startswith(f"OK   {SASREC_RUN}")
    assert all("split and negatives checked on" in line and "(sha256 verified)" in line for line in lines[:2])
    assert lines[-1].startswith(f"audit {audited}: 2 runs, 2 OK, 0 with problems")


def _unknown_commit(record):
    record["git"] = {"commit": "unknown", "dirty": None}


def _best_not_argmax(record):
    epochs = record["training"]["epochs"]
    worst = min(epochs, key=lambda e: e["valid_ndcg10"])
    record["training"]["best_epoch"] = worst["epoch"]


def _selected_on_test(record):
    record["evaluation"]["selection"] = "best test NDCG@10"


def _no_checksums(record):
    del record["inputs"]["sha256"]["negatives.parquet"]


def _no_train_config(record):
    del record["training"]["config"]


DOCTORED_RECORDS = [
    ("commit_unknown", _unknown_commit, "git commit is 'unknown'"),
    ("best_epoch_not_argmax", _best_not_argmax, "not selected on validation"),
    ("selection_not_validation", _selected_on_test, "the epoch must be selected on validation"),
    ("inputs_without_checksum", _no_checksums, "inputs lack the dataset folder or the sha256 of ['negatives.parquet']"),
    ("no_training_config", _no_train_config, "no training configuration"),
]


@pytest.mark.parametrize("case, change, problem", DOCTORED_RECORDS, ids=[c[0] for c in DOCTORED_RECORDS])
def test_audit_fails_doctored_records(case, change, problem, audited, tmp_path, capsys):
    root = doctored(audited, tmp_path)
    edit_record(root, change)
    status, out = run_audit(root, capsys)
    assert status == 1
    line = next(line for line in out.splitlines() if SASREC_RUN in line)
    assert line.startswith("FAIL") and problem in line, out
    assert "1 with problems" in out.splitlines()[-1]


def test_audit_fails_negatives_overlapping_history(audited, tmp_path, capsys):
    root = doctored(audited, tmp_path)
    folder = root / "data" / "tiny"
    sequences = pd.read_parquet(folder / "sequences.parquet")
    negatives = pd.read_parquet(folder / "negatives.parquet")
    user_negatives = list(negatives.loc[3, "negatives"])
    user_negatives[0] = sequences.loc[3, "items"][0]  # a history item among the negatives
    negatives.at[3, "negatives"] = user_negatives
    write_parquet(folder / "negatives.parquet", negatives)
    for run in ("SASRec", "POP"):  # the records name the doctored file, so the checks run on it
        path = root / "runs" / "tiny" / run / "default" / "seed~0" / "run.json"
        record = json.loads(path.read_text())
        record["inputs"]["sha256"]["negatives.parquet"] = sha256_file(folder / "negatives.parquet")
        path.write_text(json.dumps(record))
    status, out = run_audit(root, capsys)
    assert status == 1
    user = int(sequences.loc[3, "user_id"])
    assert out.count(f"sampled negatives of 1 users include items of their history (first: user {user})") == 2, out


def test_audit_catches_a_split_that_leaks_the_test_item(audited, monkeypatch, capsys):
    # a split bug: the training part keeps the validation item (sequence[:-1]) and so sees the test position's input
    monkeypatch.setattr(SequenceData, "train_part", lambda self, u: self.sequences[u][:-1])
    status, out = run_audit(audited, capsys)
    assert status == 1
    assert "training_sequences() holds items outside each user's sequence[:-2]" in out
    assert "training_examples() holds items outside" in out


def test_audit_fails_swapped_ranks_and_incomplete_folders(audited, tmp_path, capsys):
    root = doctored(audited, tmp_path)
    shutil.copy(root / "runs/tiny/POP/default/seed~0/ranks.parquet", root / SASREC_RUN / "ranks.parquet")
    incomplete = root / "runs/tiny/GRU4Rec/default/seed~0"
    incomplete.mkdir(parents=True)
    shutil.copy(root / SASREC_RUN / "ranks.parquet", incomplete / "ranks.parquet")  # no run.json: unfinished
    status, out = run_audit(root, capsys)
    assert status == 1
    assert "FAIL runs/tiny/GRU4Rec/default/seed~0: incomplete run folder: run.json missing" in out
    assert "ranks and record do not belong together" in out or "do not come from the selected checkpoint" in out


def test_audit_without_data_skips_split_checks(audited, tmp_path, capsys):
    root = doctored(audited, tmp_path)
    shutil.rmtree(root / "data")
    for run in ("SASRec", "POP"):  # the recorded dataset_dir points into the original folder: move it away too
        path = root / "runs" / "tiny" / run / "default" / "seed~0" / "run.json"
        record = json.loads(path.read_text())
        record["inputs"]["dataset_dir"] = str(tmp_path / "gone")
        path.write_text(json.dumps(record))
    status, out = run_audit(root, capsys)
    if json.loads((root / SASREC_RUN / "run.json").read_text())["git"]["commit"] == "unknown":
        pytest.skip("no git checkout: commit unknown")
    assert status == 0, out
    assert out.count("data not available, split checks skipped") == 2
    assert "skipped for 2" in out.splitlines()[-1]
