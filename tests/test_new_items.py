"""Extensibility (a), new items (e4srec/new_items.py) on the tiny LLaMA: the withheld data holds no new
item, the withheld models never train the new items' rows, the extension changes only those rows
(LoRA, input projection, old rows and every other SASRec weight bit-identical), the extended model
scores the new items, bad input is an InputError, and `e4srec new-items` writes its tables."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from baselines.sasrec import SASRec, SASRecConfig
from e4srec import commands
from e4srec.data import SequenceData
from e4srec.files import InputError, load_tensors
from e4srec.model import E4SRec, E4SRecConfig
from e4srec.new_items import (ExtensionConfig, WithheldData, WithheldE4SRec, WithheldSASRec, _scores_from_hidden,
                              choose_new_items, extend_item_scorer, extend_item_table, last_hidden_states)
from e4srec.trainer import TrainConfig
from helpers import prepare_tiny, torch_threads
from tiny_llm import write_item_embeddings, write_tiny_backbone, write_tiny_dataset

N_ITEMS, N_USERS, MAX_LEN, FRACTION = 40, 40, 8, 0.1


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("new_items")
    dataset = write_tiny_dataset(root / "data" / "tiny", n_users=N_USERS, n_items=N_ITEMS, max_len=MAX_LEN)
    data = SequenceData.load(dataset)
    return {"root": root, "backbone": write_tiny_backbone(root / "backbone"), "dataset": dataset, "data": data,
            "table": write_item_embeddings(root / "items.safetensors", N_ITEMS),
            "new": choose_new_items(N_ITEMS, FRACTION, 0)}


def test_choose_new_items():
    new = choose_new_items(N_ITEMS, FRACTION, 0)
    assert len(new) == 4 and np.all(np.diff(new) > 0) and new.min() >= 1 and new.max() <= N_ITEMS
    assert np.array_equal(new, choose_new_items(N_ITEMS, FRACTION, 0))  # seeded
    assert not np.array_equal(new, choose_new_items(N_ITEMS, FRACTION, 1))
    for bad in (0, 1, 0.0, 1.0, -0.1, 1.5, float("nan"), True, "0.1", None):
        with pytest.raises(InputError, match=r"fraction must be in \(0, 1\)"):
            choose_new_items(N_ITEMS, bad, 0)
    for n_items, fraction in ((5, 0.05), (1, 0.5), (2, 0.9)):  # no new item, or no old item left
        with pytest.raises(InputError, match="too few"):
            choose_new_items(n_items, fraction, 0)


def test_withheld_data_has_no_new_item_in_training(tiny):
    data, new = tiny["data"], tiny["new"]
    assert np.isin(data.training_examples()[1], new).any()  # the full data does train on them
    withheld = WithheldData.from_data(data, new)
    _, histories, targets = withheld.training_examples()
    assert not np.isin(histories, new).any() and not np.isin(targets, new).any()
    assert not np.isin(withheld.training_sequences(), new).any()
    assert 0 < len(targets) < len(data.training_examples()[2])
    removed = sum(int(np.isin(seq[:-2], new).sum()) for seq in data.sequences)
    assert withheld.removed_interactions() == removed > 0
    for split in ("valid", "test"):  # evaluation is that of the full data
        assert np.array_equal(withheld.targets(split), data.targets(split))
        assert all(np.array_equal(a, b) for a, b in zip(withheld.histories(split), data.histories(split)))


@pytest.mark.parametrize("loss", ["bce", "ce"])
def test_withheld_sasrec_never_trains_new_rows(tiny, loss):
    withheld = WithheldData.from_data(tiny["data"], tiny["new"])
    torch.manual_seed(0)
    model = WithheldSASRec(N_ITEMS, N_USERS, MAX_LEN, SASRecConfig(loss=loss), new_items=tiny["new"])
    model.train()
    for _ in range(3):  # several draws of negatives
        model.calculate_loss({"sequence": torch.from_numpy(withheld.training_sequences())}).backward()
    grad = model.item_embeddings.weight.grad
    assert torch.all(grad[torch.from_numpy(tiny["new"])] == 0)
    old = np.setdiff1d(np.arange(1, N_ITEMS + 1), tiny["new"])
    assert (grad[torch.from_numpy(old)].abs().sum(dim=1) > 0).float().mean() > 0.5


def build_e4srec(tiny, cls=E4SRec, seed=0, **kwargs) -> E4SRec:
    torch.manual_seed(seed)
    model = cls(N_ITEMS, N_USERS, MAX_LEN, E4SRecConfig(lora_r=4), backbone_dir=tiny["backbone"],
                item_embeddings=tiny["table"], **kwargs)
    with torch.no_grad():  # LoRA B starts at zero: give the adapters a visible effect
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.3)
    return model


def test_withheld_e4srec_never_trains_new_rows(tiny):
    model = build_e4srec(tiny, WithheldE4SRec, new_items=tiny["new"])
    _, histories, targets = WithheldData.from_data(tiny["data"], tiny["new"]).training_examples()
    model.train()
    model.calculate_loss({"history": torch.from_numpy(histories), "target": torch.from_numpy(targets)}).backward()
    grad = model.item_scorer.weight.grad
    new = torch.from_numpy(tiny["new"])
    assert torch.all(grad[new] == 0) and grad[1:].abs().sum() > 0
    model.eval()  # scoring is E4SRec's: the new items get finite scores
    with torch.no_grad():
        scores = model.full_sort_predict({"history": torch.from_numpy(histories[:4])})
    assert torch.isfinite(scores[:, new]).all()


def test_extend_item_table_changes_only_new_rows(tiny):
    torch.manual_seed(0)
    withheld = WithheldSASRec(N_ITEMS, N_USERS, MAX_LEN, new_items=tiny["new"])
    before = {k: v.clone() for k, v in withheld.state_dict().items()}
    config = TrainConfig(epochs=2, batch_size=16, eval_batch_size=64, device="cpu", learning_rate=1e-2)
    model, record = extend_item_table(withheld, tiny["data"], tiny["new"], config, tiny["root"] / "table_ckpt")
    assert record["best_epoch"] >= 0
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["item_embeddings.trainable"]
    after = model.state_dict()
    for name, value in before.items():
        assert torch.equal(withheld.state_dict()[name], value), name  # the withheld model is untouched
        if name != "item_embeddings.weight":
            assert torch.equal(after[name], value), name  # every other SASRec weight bit-identical
    table = model.export_item_embeddings()
    new = torch.from_numpy(tiny["new"])
    old = torch.ones(N_ITEMS + 1, dtype=torch.bool)
    old[new] = False
    old[0] = False
    assert torch.equal(table[old], before["item_embeddings.weight"][old])
    assert (table[new] != before["item_embeddings.weight"][new]).any(dim=1).all()


def walk_data(tmp_path, n_users: int = 60, seed: int = 0) -> SequenceData:
    """Users walk a fixed permutation of the items: the next item is a function of the last one, so
    a new item's scorer row has something to learn."""
    rng = np.random.default_rng(seed)
    step = dict(zip(range(1, N_ITEMS + 1), (rng.permutation(N_ITEMS) + 1).tolist()))
    sequences = {}
    for user in range(1, n_users + 1):
        items = [int(rng.integers(1, N_ITEMS + 1))]
        for _ in range(int(rng.integers(5, 12))):
            items.append(step[items[-1]])
        sequences[user] = items
    return SequenceData.load(prepare_tiny(tmp_path, sequences, max_len=MAX_LEN, n_negatives=3))


def test_extend_item_scorer_changes_only_new_rows(tiny):
    data, new_items = tiny["data"], tiny["new"]
    model = build_e4srec(tiny)
    model.eval()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # the cached hidden states give the model's own scores
    hidden = last_hidden_states(model, data.padded_histories("valid"), 16)
    with torch.no_grad():
        expected = model.full_sort_predict({"history": torch.from_numpy(data.padded_histories("valid"))})
    torch.testing.assert_close(_scores_from_hidden(hidden, model.item_scorer.weight.detach()), expected)

    record = extend_item_scorer(model, data, new_items, ExtensionConfig(scorer_epochs=2), eval_batch_size=16)
    assert record["examples_with_new_target"] > 0 and len(record["epochs"]) == 2
    after = model.state_dict()
    for name, value in before.items():  # LoRA, input projection, item table, backbone: bit-identical
        if name != "item_scorer.weight":
            assert torch.equal(after[name], value), name
    new = torch.from_numpy(new_items)
    old = torch.ones(N_ITEMS + 1, dtype=torch.bool)
    old[new] = False
    assert torch.equal(after["item_scorer.weight"][old], before["item_scorer.weight"][old])
    assert (after["item_scorer.weight"][new] != before["item_scorer.weight"][new]).any(dim=1).all()


def test_extend_item_scorer_learns_to_score_new_items(tiny, tmp_path):
    """The tiny random LLaMA barely lets the history reach the last hidden state (RMSNorm, 0.02-scale
    weights), so nothing is learnable from it: the LLM's last hidden state is replaced by an informative
    stand-in (the last item's table row), and the extension must learn where the new items come next."""
    data, new_items = walk_data(tmp_path), tiny["new"]
    model = build_e4srec(tiny)
    model.eval()
    model.user_hidden = lambda history: model.item_embeddings(history[:, -1])[:, :model.hidden_size]
    _, histories, targets = data.training_examples()
    new_target = np.isin(targets, new_items)

    def target_ranks():
        with torch.no_grad():
            scores = model.full_sort_predict({"history": torch.from_numpy(histories[new_target])})
        return (scores >= scores.gather(1, torch.from_numpy(targets[new_target])[:, None])).sum(dim=1).float()

    ranks_before = target_ranks()
    record = extend_item_scorer(model, data, new_items, ExtensionConfig(scorer_epochs=10, scorer_patience=10,
                                                                        scorer_learning_rate=0.05), eval_batch_size=16)
    assert record["examples_with_new_target"] == new_target.sum() > 0
    assert record["epochs"][-1]["loss"] < record["initial"]["loss"]
    assert record["best_valid_ndcg10"] > record["initial"]["valid_ndcg10"]
    ranks_after = target_ranks()  # the new items now score high where they come next
    assert ranks_after.median() <= 2 < ranks_before.median(), (ranks_before, ranks_after)


def test_new_items_command_end_to_end(tiny, capsys):
    root, out = tiny["root"], tiny["root"] / "tables" / "extensibility_new_items.json"
    work = root / "work"
    args = ["new-items", "--dataset-dir", str(tiny["dataset"]), "--backbone", str(tiny["backbone"]),
            "--work-dir", str(work), "--out", str(out), "--fraction", str(FRACTION), "--threads", "1",
            "--sasrec-train-params", json.dumps({"epochs": 2, "batch_size": 16, "eval_batch_size": 64, "device": "cpu"}),
            "--e4srec-params", json.dumps({"lora_r": 4}),
            "--e4srec-train-params", json.dumps({"epochs": 1, "batch_size": 8, "max_steps_per_epoch": 3,
                                                 "eval_batch_size": 32, "device": "cpu"}),
            "--extension", json.dumps({"table_epochs": 2, "scorer_epochs": 3})]
    assert commands.main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    result = json.loads(out.read_text())
    assert printed["checks"] == result["checks"]
    checks = result["checks"]
    assert checks["only_new_rows_changed"] and checks["lora_identical"] and checks["input_projection_identical"]
    assert checks["scorer_new_rows_changed"] == checks["table_new_rows_changed"] == len(tiny["new"])
    assert result["new_items"]["ids"] == tiny["new"].tolist() and result["input_projection_sees_new_rows"] is True
    assert result["timings"]["extension_seconds"] > 0 and result["timings"]["retrain_train_seconds"] > 0

    # before extension, the new items' rows are exactly their initial values (untrained), which the
    # default run of the same seed starts from
    new = torch.from_numpy(tiny["new"])
    withheld_table = load_tensors(work / "withheld" / "SASRec" / "item_embeddings.safetensors")["item_embeddings"]
    torch.manual_seed(0)
    assert torch.equal(withheld_table[new], SASRec(N_ITEMS, N_USERS, MAX_LEN).item_embeddings.weight.detach()[new])
    scorer = load_tensors(work / "withheld" / "E4SRec" / "components" / "projections.safetensors")["item_scorer.weight"]
    torch.manual_seed(0)
    fresh = E4SRec(N_ITEMS, N_USERS, MAX_LEN, E4SRecConfig(lora_r=4), backbone_dir=tiny["backbone"],
                   item_embeddings=work / "withheld" / "SASRec" / "item_embeddings.safetensors")
    assert torch.equal(scorer[new], fresh.item_scorer.weight.detach()[new])

    frame = pd.read_csv(out.with_suffix(".csv"))
    assert len(frame) == 2 * 3 * 3 * 2 and set(frame["model"]) == {"withheld", "extended", "retrained"}
    data = tiny["data"]
    test_new = int(np.isin(data.targets("test"), tiny["new"]).sum())
    users = frame[frame["split"] == "test"].groupby("group")["users"].first()
    assert users["new item"] == test_new and users["all"] == N_USERS == users["new item"] + users["old item"]
    assert frame["value"].dropna().between(0, 1).all()
    table = out.with_suffix(".md").read_text()
    assert "| test | new item |" in table and "Training time (training loops, validation excluded): extension" in table
    retrained = pd.read_parquet(work / "retrained" / "E4SRec" / "ranks.parquet")
    assert frame.query("split == 'test' and group == 'all' and model == 'retrained' and metric == 'HR'")["value"].item() \
        == pytest.approx(float((retrained["test_full"] <= 10).mean()))

    # bad input: exit status 2, nothing deleted
    assert commands.main(args[:-2] + ["--fraction", "1.5"]) == 2
    assert "fraction must be in (0, 1)" in capsys.readouterr().err
    bad = args + ["--full-run", str(work / "retrained" / "SASRec")]
    assert commands.main(bad) == 2
    assert "a SASRec run of tiny, expected E4SRec" in capsys.readouterr().err
    (root / "precious").mkdir()
    (root / "precious" / "keep.txt").write_text("x")
    assert commands.main([a if a != str(work) else str(root / "precious") for a in args]) == 2
    assert "not a new-items work folder" in capsys.readouterr().err and (root / "precious" / "keep.txt").exists()
    assert commands.main(args[:-2] + ["--extension", '{"table_epoch": 2}']) == 2
    assert "unknown key(s) ['table_epoch']" in capsys.readouterr().err
