"""Integrity of rebuilds, reruns and out-of-memory steps: the parts of the "Reliability and security"
issue beyond tests/test_reliability.py (interruption through Snakemake: tests/test_workflow_interruption.py).

1. Rebuilds refuse mismatched inputs: ``e4srec rebuild`` (before writing anything) and
   ``e4srec sparsity`` (Figure 4's terciles come from the prepared data) stop with an error naming
   the run and the file when a run's recorded dataset sha256 do not match the prepared data at hand,
   or an E4SRec run's item table is not the one it recorded; a copy prepared on another machine from
   the same raw file (same raw sha256, same negatives, the run's users in the same order) passes.
2. Checkpoints are resumed only under the settings and inputs they were written with (the resume
   key of run.json's trainer): a job rerun with another learning rate, or E4SRec with another item
   table, starts over (Snakemake reruns a job whose parameters or inputs changed, and the checkpoints,
   not being outputs, are still there); a setting without effect on the weights resumes.
3. E4SRec refuses an item table whose sha256 changed while it trained (the components record would
   name another table than the one trained on), before writing any output.
4. ``oom_retry``: a CUDA out-of-memory step is retried as 2, 4, ... micro-batches with gradient
   accumulation (same effective batch, same optimizer steps), logged and recorded in run.json; it
   gives up with the advice message at one example per micro-batch.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from e4srec import audit, deploy, runs, trainer
from e4srec.files import InputError, sha256_file, write_json, write_parquet
from e4srec.recommender import Recommender
from e4srec.trainer import TrainConfig

try:
    from helpers import files_in, main_rc, prepare_tiny, random_sequences, small_sequence_data
    from tiny_llm import write_item_embeddings, write_tiny_backbone, write_tiny_dataset
except ImportError:  # tests/ imported as a package
    from tests.helpers import files_in, main_rc, prepare_tiny, random_sequences, small_sequence_data
    from tests.tiny_llm import write_item_embeddings, write_tiny_backbone, write_tiny_dataset

ROOT = Path(__file__).resolve().parent.parent
PAPER = str(ROOT / "paper" / "paper_targets.tsv")
SASREC_TRAIN = {"device": "cpu", "epochs": 3, "batch_size": 8, "learning_rate": 0.01}
SASREC_RUN = "runs/tiny/SASRec/default/seed~0"
POP_RUN = "runs/tiny/POP/default/seed~0"


# ----------------------------------------------------------------------------------------------
# 1. Rebuilds refuse mismatched inputs


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """A results folder as the workflow writes it: data/tiny and two runs (SASRec trained, POP)."""
    root = tmp_path_factory.mktemp("integrity") / "results"
    source = tmp_path_factory.mktemp("raw")
    prepared = prepare_tiny(source, random_sequences(30, 25, seed=5, min_len=4, max_len=9), max_len=6, n_negatives=5)
    shutil.copytree(prepared, root / "data" / "tiny")
    for model, train in (("SASRec", SASREC_TRAIN), ("POP", {"device": "cpu"})):
        runs.run(root / "data" / "tiny", model, root / SASREC_RUN.replace("SASRec", model), train_params=train,
                 progress=False)
    return root


def copy_of(results: Path, tmp_path: Path) -> Path:
    root = tmp_path / "results"
    shutil.copytree(results, root, ignore=shutil.ignore_patterns("checkpoints"))
    return root


def rebuild(root: Path) -> int:
    return main_rc(["rebuild", str(root), "--paper", PAPER, "--datasets", "tiny"])


def test_rebuild_of_matching_data_and_of_an_equivalent_copy(results, tmp_path):
    root = copy_of(results, tmp_path)
    runs_here = [str(root / POP_RUN), str(root / SASREC_RUN)]
    assert audit.verify_inputs(runs_here, [root / "data" / "tiny"]) == []  # byte-identical: nothing to note
    # the same data prepared on another machine: other parquet bytes, another source path in dataset.json
    folder = root / "data" / "tiny"
    frame = pd.read_parquet(folder / "sequences.parquet")
    frame.to_parquet(folder / "sequences.parquet", index=False, compression="snappy")
    record = json.loads((folder / "dataset.json").read_text())
    record["raw"]["source"] = "/elsewhere/tiny.txt"
    write_json(folder / "dataset.json", record)
    notes = audit.verify_inputs(runs_here, [folder])
    assert len(notes) == 2 and all("prepared from the same raw file" in n for n in notes), notes
    assert rebuild(root) == 0
    assert (root / "tables" / "metrics.csv").is_file() and (root / "tables" / "figure4_sparsity.csv").is_file()


def test_rebuild_refuses_data_the_runs_were_not_made_from(results, tmp_path, capsys):
    root = copy_of(results, tmp_path)
    other = prepare_tiny(tmp_path / "other", random_sequences(30, 25, seed=6, min_len=4, max_len=9), max_len=6,
                         n_negatives=5)  # another raw file, the same shape
    shutil.rmtree(root / "data" / "tiny")
    shutil.copytree(other, root / "data" / "tiny")
    status = rebuild(root)
    message = capsys.readouterr().err
    assert status == 2
    assert f"run {root / POP_RUN}: {root / 'data/tiny/sequences.parquet'} has sha256" in message, message
    assert "the run was not made from this data" in message and "Traceback" not in message
    assert not (root / "tables").exists() and not (root / "figures").exists()  # refused before writing anything


def test_rebuild_refuses_a_copy_with_other_users(results, tmp_path, capsys):
    root = copy_of(results, tmp_path)
    folder = root / "data" / "tiny"
    frame = pd.read_parquet(folder / "sequences.parquet")
    write_parquet(folder / "sequences.parquet", frame.iloc[::-1].reset_index(drop=True))  # same raw, users reordered
    assert rebuild(root) == 2
    message = capsys.readouterr().err
    assert f"run {root / POP_RUN}: {root / POP_RUN / 'ranks.parquet'} does not hold the users of" in message, message
    assert not (root / "tables").exists()


def test_sparsity_refuses_data_the_runs_were_not_made_from(results, tmp_path, capsys):
    other = prepare_tiny(tmp_path / "other", random_sequences(30, 25, seed=6, min_len=4, max_len=9), max_len=6,
                         n_negatives=5)
    out = tmp_path / "figure4.csv"
    status = main_rc(["sparsity", "--runs", str(results / SASREC_RUN), "--datasets", str(other), "--out", str(out),
                      "--figure", str(tmp_path / "figure4")])
    message = capsys.readouterr().err
    assert status == 2 and f"run {results / SASREC_RUN}: {other / 'sequences.parquet'} has sha256" in message, message
    assert files_in(tmp_path / "other") == files_in(other.parent) and not out.exists()
    assert not list(tmp_path.glob("figure4*"))


def fake_e4srec_run(root: Path, table_sha: str, components_sha: str | None = None) -> Path:
    """A run folder whose record names SASRec's item table, as an E4SRec run's does."""
    run = root / "runs/tiny/E4SRec/default/seed~0"
    shutil.copytree(root / POP_RUN, run)
    path = run / "run.json"
    record = json.loads(path.read_text())
    record.update(model="E4SRec", item_embeddings_source={
        "path": f"/another/machine/results/{SASREC_RUN}/item_embeddings.safetensors", "sha256": table_sha})
    path.write_text(json.dumps(record))
    if components_sha:
        write_json(run / "components" / "components.json", {"item_embeddings": {"sha256": components_sha}})
    return run


def test_rebuild_checks_the_item_table_of_e4srec_runs(results, tmp_path, capsys):
    root = copy_of(results, tmp_path)
    table = root / SASREC_RUN / "item_embeddings.safetensors"
    run = fake_e4srec_run(root, sha256_file(table))
    all_runs = [str(root / r) for r in (POP_RUN, SASREC_RUN)] + [str(run)]
    assert audit.verify_inputs(all_runs, [root / "data" / "tiny"]) == []  # the table it recorded: fine

    record = json.loads((run / "run.json").read_text())
    record["item_embeddings_source"]["sha256"] = "0" * 64  # SASRec was retrained after E4SRec took its table
    (run / "run.json").write_text(json.dumps(record))
    assert rebuild(root) == 2
    message = capsys.readouterr().err
    assert f"run {run}: its item embeddings {table} have sha256 {sha256_file(table)}, the run recorded {'0' * 64}" \
        in message, message
    assert not (root / "tables").exists()


def test_rebuild_refuses_components_of_another_item_table(results, tmp_path, capsys):
    root = copy_of(results, tmp_path)
    table = root / SASREC_RUN / "item_embeddings.safetensors"
    run = fake_e4srec_run(root, sha256_file(table), components_sha="1" * 64)
    assert rebuild(root) == 2
    message = capsys.readouterr().err
    assert f"run {run}: {run / 'components/components.json'} names item embeddings sha256 {'1' * 64}" in message
    assert "the components do not belong to this run" in message


# ----------------------------------------------------------------------------------------------
# 2. and 3. Resume only under the same settings and inputs; E4SRec's item table


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity-e4srec")
    return {"root": root, "dataset": write_tiny_dataset(root / "data" / "tiny", n_users=24, n_items=30),
            "backbone": write_tiny_backbone(root / "backbone"),
            "table": write_item_embeddings(root / "items.safetensors", 30),
            "table_b": write_item_embeddings(root / "items_b.safetensors", 30, seed=1)}


def history(record: dict) -> list:
    return [(e["epoch"], e["loss"], e["valid_ndcg10"]) for e in record["training"]["epochs"]]


def test_rerun_with_other_settings_starts_over(results, tmp_path, caplog):
    data = results / "data" / "tiny"
    out = tmp_path / "run"
    runs.run(data, "SASRec", out, train_params=SASREC_TRAIN, progress=False)
    changed = {**SASREC_TRAIN, "learning_rate": 0.001}
    fresh = runs.run(data, "SASRec", tmp_path / "fresh", train_params=changed, progress=False)
    with caplog.at_level(logging.INFO, logger="e4srec.trainer"):
        rerun = runs.run(data, "SASRec", out, train_params=changed, progress=False)
    assert "checkpoint written for other settings or inputs (train differ): starting over" in caplog.text
    assert "resumed from" not in caplog.text
    assert history(rerun) == history(fresh) and len(history(rerun)) == SASREC_TRAIN["epochs"]
    assert (out / "ranks.parquet").read_bytes() == (tmp_path / "fresh" / "ranks.parquet").read_bytes()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="e4srec.trainer"):  # a setting without effect on the weights
        again = runs.run(data, "SASRec", out, train_params={**changed, "eval_batch_size": 7}, progress=False)
    assert f"resumed from {out / 'checkpoints'} after epoch 2" in caplog.text and "starting over" not in caplog.text
    assert history(again) == history(fresh)
    assert "resume_key" not in json.loads((out / "run.json").read_text())["training"]


E4SREC_TRAIN = {"device": "cpu", "epochs": 2, "batch_size": 8, "max_steps_per_epoch": 2, "eval_batch_size": 32}


def test_e4srec_resumes_only_with_the_item_table_it_trained_on(tiny, tmp_path, caplog):
    out = tmp_path / "run"
    context = {"backbone_dir": tiny["backbone"]}
    runs.run(tiny["dataset"], "E4SRec", out, train_params=E4SREC_TRAIN, progress=False,
             item_embeddings=tiny["table"], **context)
    with caplog.at_level(logging.INFO, logger="e4srec.trainer"):
        record = runs.run(tiny["dataset"], "E4SRec", out, train_params=E4SREC_TRAIN, progress=False,
                          item_embeddings=tiny["table_b"], **context)
    assert "(item_embeddings_sha256 differ): starting over" in caplog.text and "resumed from" not in caplog.text
    table_b = sha256_file(tiny["table_b"])
    assert record["item_embeddings_source"]["sha256"] == table_b
    assert deploy.read_components(out / "components")["item_embeddings"]["sha256"] == table_b


def test_e4srec_refuses_an_item_table_changed_while_training(tiny, tmp_path, monkeypatch):
    table = tmp_path / "items.safetensors"
    shutil.copy(tiny["table"], table)
    real_train = runs.train

    def train_then_swap_table(*args, **kwargs):
        record = real_train(*args, **kwargs)
        shutil.copy(tiny["table_b"], table)  # e.g. SASRec retrained into the same file meanwhile
        return record

    monkeypatch.setattr(runs, "train", train_then_swap_table)
    out = tmp_path / "run"
    with pytest.raises(InputError, match=f"{table}: changed since the model was built"):
        runs.run(tiny["dataset"], "E4SRec", out, train_params=E4SREC_TRAIN, progress=False,
                 item_embeddings=table, backbone_dir=tiny["backbone"])
    assert not (out / "run.json").exists() and not (out / "ranks.parquet").exists()
    assert not (out / "components").exists()


# ----------------------------------------------------------------------------------------------
# 4. Out of GPU memory: retry in micro-batches


class LinearMean(Recommender):
    """Mean of the history's item embeddings and a linear scorer (no dropout: deterministic steps)."""

    training_input = "examples"

    def __init__(self, n_items: int, n_users: int, max_len: int, config=None, fits: int | None = None,
                 failures: int | None = None):
        super().__init__(n_items, n_users, max_len)
        self.embedding = nn.Embedding(n_items + 1, 8, padding_idx=0)
        self.output = nn.Linear(8, n_items + 1)
        self.fits, self.failures, self.batch_sizes = fits, failures, []

    def encode(self, history):
        mask = (history > 0).unsqueeze(-1).float()
        return (self.embedding(history) * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def calculate_loss(self, batch):
        size = len(batch["user"])
        self.batch_sizes.append(size)
        if self.fits is not None and size > self.fits and (self.failures is None or self.failures > 0):
            if self.failures is not None:
                self.failures -= 1
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {size} GiB")
        return F.cross_entropy(self.output(self.encode(batch["history"])), batch["target"])

    def full_sort_predict(self, batch):
        return self.output(self.encode(batch["history"]))


@pytest.fixture(scope="module")
def small_data():
    return small_sequence_data()


def linear_mean(data, **kwargs) -> LinearMean:
    torch.manual_seed(0)
    return LinearMean(data.n_items, data.n_users, data.max_len, **kwargs)


def test_oom_retry_splits_the_batch_and_keeps_the_steps(small_data, tmp_path, caplog):
    config = TrainConfig(epochs=2, batch_size=16, learning_rate=0.05, device="cpu", seed=0, oom_retry=True)
    reference = linear_mean(small_data)
    expected = trainer.train(reference, small_data, config, tmp_path / "reference", progress=False)
    model = linear_mean(small_data, fits=8)  # any batch of more than 8 examples runs out of memory
    with caplog.at_level(logging.WARNING, logger="e4srec.trainer"):
        record = trainer.train(model, small_data, config, tmp_path / "retried", progress=False)
    assert record["oom_retries"] == [{"epoch": 0, "step": 0, "micro_batches": 2, "micro_batch_size": 8,
                                      "cuda_said": "CUDA out of memory. Tried to allocate 16 GiB"}]
    assert record["micro_batches"] == 2 and "oom_retries" not in expected
    assert "retrying the step as 2 micro-batches of up to 8 examples" in caplog.text
    assert "same effective batch size 16, same optimizer steps" in caplog.text
    assert max(model.batch_sizes[1:]) <= 8  # once split, every later step too
    assert record["step"] == expected["step"]  # the same optimizer steps ...
    assert [e["examples"] for e in record["epochs"]] == [e["examples"] for e in expected["epochs"]]
    for (name, got), want in zip(trainer.trainable_state(model).items(), trainer.trainable_state(reference).values()):
        assert torch.allclose(got, want, atol=1e-5), name  # ... and the gradients of the whole batch
    assert [e["loss"] for e in record["epochs"]] == pytest.approx([e["loss"] for e in expected["epochs"]], rel=1e-5)
    state = json.loads((tmp_path / "retried" / "state.json").read_text())
    assert state["micro_batches"] == 2  # a resumed run goes on in micro-batches


def test_oom_retry_gives_up_at_one_example(small_data, tmp_path, caplog):
    config = TrainConfig(epochs=1, batch_size=16, device="cpu", seed=0, oom_retry=True)
    with caplog.at_level(logging.WARNING, logger="e4srec.trainer"), pytest.raises(RuntimeError) as err:
        trainer.train(linear_mean(small_data, fits=0), small_data, config, tmp_path / "ckpt", progress=False)
    assert isinstance(err.value.__cause__, torch.cuda.OutOfMemoryError)
    assert "even in 16 micro-batches (oom_retry)" in str(err.value) and "lower batch_size" in str(err.value)
    assert caplog.text.count("retrying the step as") == 4  # 2, 4, 8, 16 micro-batches
    assert not (tmp_path / "ckpt" / "state.json").exists()


def test_out_of_memory_without_retry_suggests_it(small_data, tmp_path):
    config = TrainConfig(epochs=1, batch_size=16, device="cpu", seed=0)
    with pytest.raises(RuntimeError, match=r"or set `oom_retry: true` \(trainer settings\)"):
        trainer.train(linear_mean(small_data, fits=8), small_data, config, tmp_path / "ckpt", progress=False)


def test_oom_retry_is_recorded_in_run_json(results, tmp_path, monkeypatch):
    from baselines.sasrec import SASRec

    calculate_loss, failures = SASRec.calculate_loss, {"left": 1}

    def once_too_big(self, batch):  # the first batch of more than 4 users runs out of memory, once
        if len(batch["user"]) > 4 and failures["left"]:
            failures["left"] -= 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return calculate_loss(self, batch)

    monkeypatch.setattr(SASRec, "calculate_loss", once_too_big)
    out = tmp_path / "run"
    runs.run(results / "data" / "tiny", "SASRec", out, train_params={**SASREC_TRAIN, "oom_retry": True},
             progress=False)
    training = json.loads((out / "run.json").read_text())["training"]
    assert training["config"]["oom_retry"] is True and training["micro_batches"] == 2
    assert training["oom_retries"] == [{"epoch": 0, "step": 0, "micro_batches": 2, "micro_batch_size": 4,
                                        "cuda_said": "CUDA out of memory. Tried to allocate 2.00 GiB"}]
    assert len(training["epochs"]) == SASREC_TRAIN["epochs"] and (out / "ranks.parquet").is_file()


def test_stated_commit_wins_over_the_checkout(monkeypatch):
    """A launcher that copied the tree states its commit: a stale .git in the copy must not win."""
    from e4srec import provenance

    provenance.git_state.cache_clear()
    monkeypatch.setenv("E4SREC_GIT_COMMIT", "a" * 40)
    monkeypatch.setenv("E4SREC_GIT_DIRTY", "0")
    try:
        assert provenance.git_state() == {"commit": "a" * 40, "dirty": False, "source": "environment"}
        provenance.git_state.cache_clear()
        monkeypatch.delenv("E4SREC_GIT_COMMIT")
        state = provenance.git_state()
        assert state.get("source") != "environment" and state["commit"] != "a" * 40  # this checkout's
    finally:
        provenance.git_state.cache_clear()


def test_provenance_is_taken_before_the_command_writes(tmp_path, monkeypatch):
    """A rebuild that rewrites tracked tables must record the tree as it was when it started."""
    from e4srec import audit, cli, provenance

    calls = []
    monkeypatch.setattr(provenance, "git_state", lambda: calls.append("git") or {"commit": "c", "dirty": False})
    monkeypatch.setattr(audit, "report", lambda results: calls.append("command") or [])
    assert cli.main(["audit", str(tmp_path)]) == 0
    assert calls == ["git", "command"]
