"""The trainer on tiny models and data: CPU determinism, resume, NaN losses, early stopping, runs.run."""
from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from e4srec import runs, trainer
from e4srec.evaluate import RANK_COLUMNS, rank_all
from e4srec.files import load_tensors
from e4srec.recommender import Recommender
from e4srec.trainer import TrainConfig, train, trainable_state

try:
    from helpers import make_data, prepare_tiny, random_sequences
except ImportError:  # tests/ imported as a package
    from tests.helpers import make_data, prepare_tiny, random_sequences


@dataclasses.dataclass
class TinyConfig:
    dim: int = 8
    dropout: float = 0.2


class AverageModel(Recommender):
    """Mean of the history's item embeddings -> linear scores of every item; cross-entropy."""

    training_input = "examples"
    config_class = TinyConfig

    def __init__(self, n_items: int, n_users: int, max_len: int, config: TinyConfig | None = None):
        super().__init__(n_items, n_users, max_len)
        config = config or TinyConfig()
        self.embedding = nn.Embedding(n_items + 1, config.dim, padding_idx=0)
        self.output = nn.Linear(config.dim, n_items + 1)
        self.dropout = nn.Dropout(config.dropout)  # draws from torch's generator: tests the reseeding

    def encode(self, history: torch.Tensor) -> torch.Tensor:
        mask = (history > 0).unsqueeze(-1).float()
        return self.dropout((self.embedding(history) * mask).sum(1) / mask.sum(1).clamp(min=1.0))

    def calculate_loss(self, batch):
        return F.cross_entropy(self.output(self.encode(batch["history"])), batch["target"])

    def full_sort_predict(self, batch):
        return self.output(self.encode(batch["history"]))


class BigramModel(Recommender):
    """Next item from the previous item only, trained on every position of ``sequence``."""

    training_input = "sequences"
    config_class = TinyConfig

    def __init__(self, n_items: int, n_users: int, max_len: int, config: TinyConfig | None = None):
        super().__init__(n_items, n_users, max_len)
        config = config or TinyConfig()
        self.embedding = nn.Embedding(n_items + 1, config.dim, padding_idx=0)
        self.output = nn.Linear(config.dim, n_items + 1)
        self.dropout = nn.Dropout(config.dropout)

    def calculate_loss(self, batch):
        inputs, targets = batch["sequence"][:, :-1], batch["sequence"][:, 1:]
        keep = (inputs > 0) & (targets > 0)
        return F.cross_entropy(self.output(self.dropout(self.embedding(inputs[keep]))), targets[keep])

    def full_sort_predict(self, batch):
        return self.output(self.embedding(batch["history"][:, -1]))


MODELS = [AverageModel, BigramModel]


@pytest.fixture(scope="module")
def data():
    return make_data(random_sequences(40, 30, seed=0, min_len=4, max_len=10), max_len=5, n_negatives=5)


def config(**overrides) -> TrainConfig:
    values = {"epochs": 3, "batch_size": 16, "learning_rate": 0.05, "patience": 100, "seed": 1, "device": "cpu"}
    return TrainConfig(**{**values, **overrides})


def build(cls, data, init_seed: int = 0) -> Recommender:
    torch.manual_seed(init_seed)
    return cls(data.n_items, data.n_users, data.max_len)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainable_state(model).items()}


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def history(record: dict) -> list[tuple]:
    """The per-epoch record without wall-clock times."""
    return [(e["epoch"], e["loss"], e["valid_ndcg10"], e["examples"]) for e in record["epochs"]]


def steps_per_epoch(cls, data, batch_size: int) -> int:
    n, _ = trainer.training_batches(build(cls, data), data, batch_size, 0, 0, "cpu")
    return n


# ----------------------------------------------------------------------------------------------
# (a) CPU determinism


@pytest.mark.parametrize("cls", MODELS)
def test_same_seed_same_weights_and_ranks(cls, data, tmp_path):
    results = []
    for name in ("a", "b"):
        model = build(cls, data)
        record = train(model, data, config(), tmp_path / name, progress=False)
        model.eval()
        results.append((weights(model), rank_all(model.full_sort_predict, data), history(record)))
    (wa, ra, ha), (wb, rb, hb) = results
    assert same_weights(wa, wb)
    assert ra.equals(rb)
    assert ha == hb and len(ha) == 3
    other = build(cls, data)
    train(other, data, config(seed=2), tmp_path / "c", progress=False)
    assert not same_weights(wa, weights(other))  # the seed matters (shuffling and dropout)


# ----------------------------------------------------------------------------------------------
# (b) Resume


class Crash(RuntimeError):
    pass


@pytest.mark.parametrize("cls", MODELS)
@pytest.mark.parametrize("interruption", ["epoch_limit", "crash_mid_epoch"])
def test_resume_equals_uninterrupted(cls, interruption, data, tmp_path, monkeypatch):
    # a crash keeps the epoch count, so it also checks that the cosine schedule resumes where it was
    schedule = {"scheduler": "cosine", "warmup_steps": 4} if interruption == "crash_mid_epoch" else {}
    whole = build(cls, data)
    whole_record = train(whole, data, config(epochs=3, **schedule), tmp_path / "whole", progress=False)

    first = build(cls, data)
    if interruption == "epoch_limit":
        train(first, data, config(epochs=1), tmp_path / "resumed", progress=False)
    else:  # die in the middle of the second epoch: only epoch 0 is complete on disk
        calls = {"n": 0}
        original = cls.calculate_loss
        crash_at = steps_per_epoch(cls, data, 16) + 2

        def crashing(self, batch):
            calls["n"] += 1
            if calls["n"] > crash_at:
                raise Crash("killed")
            return original(self, batch)

        monkeypatch.setattr(cls, "calculate_loss", crashing)
        with pytest.raises(Crash):
            train(first, data, config(epochs=3, **schedule), tmp_path / "resumed", progress=False)
        monkeypatch.setattr(cls, "calculate_loss", original)
    state = json.loads((tmp_path / "resumed" / "state.json").read_text())
    assert state["epoch"] == 0

    second = build(cls, data, init_seed=123)  # a new process: other initial weights, overwritten by the checkpoint
    resumed_record = train(second, data, config(epochs=3, **schedule), tmp_path / "resumed", progress=False)
    assert same_weights(weights(whole), weights(second))
    assert history(whole_record) == history(resumed_record)
    for key in ("best_epoch", "best_valid_ndcg10", "step", "bad_epochs", "epoch"):
        assert whole_record[key] == resumed_record[key], key
    last_whole = load_tensors(tmp_path / "whole" / "last.safetensors")
    last_resumed = load_tensors(tmp_path / "resumed" / "last.safetensors")
    assert same_weights(last_whole, last_resumed)
    second.eval()
    whole.eval()
    assert rank_all(whole.full_sort_predict, data).equals(rank_all(second.full_sort_predict, data))


def test_finished_run_is_not_trained_again(data, tmp_path):
    model = build(AverageModel, data)
    record = train(model, data, config(epochs=2), tmp_path / "ckpt", progress=False)
    again = build(AverageModel, data, init_seed=5)
    record_again = train(again, data, config(epochs=2), tmp_path / "ckpt", progress=False)
    assert history(record) == history(record_again)
    assert same_weights(weights(model), weights(again))


# ----------------------------------------------------------------------------------------------
# (c) NaN loss


def test_nan_loss_names_epoch_and_step(data, tmp_path, monkeypatch):
    n_batches = steps_per_epoch(AverageModel, data, 16)
    calls = {"n": 0}
    original = AverageModel.calculate_loss

    def nan_at_third_step_of_epoch_1(self, batch):
        calls["n"] += 1
        loss = original(self, batch)
        return loss * float("nan") if calls["n"] == n_batches + 3 else loss

    monkeypatch.setattr(AverageModel, "calculate_loss", nan_at_third_step_of_epoch_1)
    with pytest.raises(FloatingPointError, match=re.escape(f"loss is nan at epoch 1, step {n_batches + 2}")):
        train(build(AverageModel, data), data, config(epochs=3), tmp_path / "ckpt", progress=False)
    # the failed epoch was never recorded as complete
    assert json.loads((tmp_path / "ckpt" / "state.json").read_text())["epoch"] == 0


# ----------------------------------------------------------------------------------------------
# (d) Early stopping


def test_early_stopping_restores_best_checkpoint(data, tmp_path, monkeypatch):
    scripted = [0.1, 0.3, 0.2, 0.25, 0.3, 0.9, 0.9, 0.9]  # best at epoch 1; 0.3 again is no improvement
    snapshots = []

    def fake_validation(model, data_, config_, device):
        snapshots.append(weights(model))
        return scripted[len(snapshots) - 1]

    monkeypatch.setattr(trainer, "validation_ndcg10", fake_validation)
    model = build(AverageModel, data)
    record = train(model, data, config(epochs=8, patience=3), tmp_path / "ckpt", progress=False)
    assert [e["valid_ndcg10"] for e in record["epochs"]] == scripted[:5]  # epochs 0..4, then 3 without improvement
    assert record["best_epoch"] == 1 and record["best_valid_ndcg10"] == 0.3
    assert record["stopped"] == "early stopping" and record["bad_epochs"] == 3
    assert same_weights(weights(model), snapshots[1])
    assert not same_weights(weights(model), snapshots[-1])
    assert same_weights(load_tensors(tmp_path / "ckpt" / "best.safetensors"), snapshots[1])


def test_early_stopping_when_nothing_improves(data, tmp_path):
    model = build(AverageModel, data)
    record = train(model, data, config(epochs=10, patience=2, learning_rate=0.0), tmp_path / "ckpt", progress=False)
    assert len(record["epochs"]) == 3 and record["best_epoch"] == 0 and record["stopped"] == "early stopping"


def test_epoch_limit(data, tmp_path, monkeypatch):
    values = iter([0.1, 0.2, 0.3])
    monkeypatch.setattr(trainer, "validation_ndcg10", lambda *args: next(values))
    record = train(build(AverageModel, data), data, config(epochs=3, patience=1), tmp_path / "ckpt", progress=False)
    assert record["stopped"] == "epoch limit" and record["best_epoch"] == 2 and len(record["epochs"]) == 3


# ----------------------------------------------------------------------------------------------
# (e) POP through runs.run


@pytest.fixture
def dataset_dir(tmp_path):
    return prepare_tiny(tmp_path / "data", random_sequences(15, 20, seed=6, min_len=3, max_len=8), max_len=5,
                        n_negatives=4)


def test_pop_run_writes_ranks_and_record(dataset_dir, tmp_path):
    out = tmp_path / "run"
    record = runs.run(dataset_dir, "POP", out, seed=0, train_params={"device": "cpu"}, progress=False)
    ranks = pd.read_parquet(out / "ranks.parquet")
    assert list(ranks.columns) == ["user_id", *RANK_COLUMNS] and len(ranks) == 15
    written = json.loads((out / "run.json").read_text())
    assert written == json.loads(json.dumps(record, default=str))
    git = written["git"]
    assert set(git) == {"commit", "dirty"}
    assert git["commit"] == "unknown" or re.fullmatch(r"[0-9a-f]{40}", git["commit"])
    for field in ("command", "packages", "machine", "date"):
        assert written[field], field
    assert written["packages"]["torch"] == torch.__version__
    assert (written["dataset"], written["model"], written["variant"], written["seed"]) == ("tiny", "POP", "default", 0)
    assert set(written["inputs"]["sha256"]) == {"sequences.parquet", "negatives.parquet", "dataset.json"}
    assert written["training"]["stopped"] == "no training (fitted statistics)"
    assert set(written["metrics"]) == set(RANK_COLUMNS)
    assert written["metrics"]["test_full"]["HR@10"] == pytest.approx(np.mean(ranks["test_full"] <= 10))
    assert not (out / "item_embeddings.safetensors").exists()


@pytest.mark.parametrize("failing", ["rank_all", "write_parquet"])
def test_run_json_only_when_ranks_exist(dataset_dir, tmp_path, monkeypatch, failing):
    def boom(*args, **kwargs):
        raise RuntimeError(f"{failing} failed")

    monkeypatch.setattr(runs, failing, boom)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match=failing):
        runs.run(dataset_dir, "POP", out, train_params={"device": "cpu"}, progress=False)
    assert not (out / "run.json").exists() and not (out / "ranks.parquet").exists()


def test_unknown_model_and_parameter(dataset_dir, tmp_path):
    with pytest.raises(runs.InputError, match="unknown model 'Nope'"):
        runs.run(dataset_dir, "Nope", tmp_path / "run", progress=False)
    with pytest.raises(runs.InputError, match=r"unknown parameter\(s\) \['depth'\] for POP"):
        runs.run(dataset_dir, "POP", tmp_path / "run", params={"depth": 2}, progress=False)
    assert not (tmp_path / "run" / "run.json").exists()


def test_length_grouped_batches():
    """group_by_length: a permutation of the epoch; each batch's rows of similar length; the smaller
    last batch stays last; seeded."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 51, size=1003)
    order = np.random.default_rng(1).permutation(1003)
    grouped = trainer.length_grouped(order, lengths, 10, np.random.default_rng(2))
    assert sorted(grouped.tolist()) == list(range(1003))
    assert set(grouped[1000:].tolist()) == set(order[1000:].tolist())  # the last group: 3 rows
    spread = [np.ptp(lengths[grouped[i:i + 10]]) for i in range(0, 1000, 10)]
    assert np.mean(spread) < 5  # random batches of 10 would spread over about 40
    np.testing.assert_array_equal(grouped, trainer.length_grouped(order, lengths, 10, np.random.default_rng(2)))
