"""The paper's baselines on the one recommender interface: tiny seeded data, every registered model.

Per model: the training loss is finite and falls on a fixed batch; scores have the evaluator's
shape and are deterministic in eval mode; ``runs.run`` writes a complete run folder; both losses of
the fairness switch work; exported item embeddings have a zero padding row; an unknown parameter is
an error that names it. Then the shared blocks: trimming padding changes no output, attention is
causal, the augmentations, the contrastive loss, k-means, negative sampling and the CPU
cross-entropy kernel agree with their definitions.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import baselines.common as common
from baselines import MODELS
from e4srec import data as datasets
from e4srec import runs
from e4srec.data import SequenceData, left_pad
from e4srec.files import InputError
from e4srec.trainer import training_batches

N_USERS, N_ITEMS, MAX_LEN, N_NEGATIVES = 30, 40, 6, 5
# Small-data settings: few intents for 30 users, one MIP epoch.
TINY_PARAMS = {"ICLRec": {"n_intents": 4}, "S3-Rec": {"pretrain_epochs": 1}}
SEQUENTIAL = [name for name in MODELS if name not in ("POP", "BPR")]
TRAINED = [name for name in MODELS if name != "POP"]
EXPORTERS = ["SASRec", "BPR", "S3-Rec", "CL4SRec", "ICLRec"]


def tiny_sequences(seed: int = 0) -> dict[int, list[int]]:
    """Users 1..30 with 3..14 distinct items of 1..40 (some longer than MAX_LEN + 1)."""
    rng = np.random.default_rng(seed)
    sequences = {user: [int(i) for i in rng.choice(np.arange(1, N_ITEMS + 1), size=int(rng.integers(3, 15)),
                                                   replace=False)]
                 for user in range(1, N_USERS + 1)}
    sequences[1][0] = N_ITEMS  # the largest id occurs
    return sequences


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine OpenMP's
    spin-waiting made single steps take seconds; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data() -> SequenceData:
    sequences = tiny_sequences()
    users = sorted(sequences)
    negatives = datasets.draw_negatives(sequences, N_ITEMS, N_NEGATIVES, seed=0)
    return SequenceData(name="tiny", n_items=N_ITEMS, max_len=MAX_LEN, user_ids=np.asarray(users),
                        sequences=[np.asarray(sequences[u], dtype=np.int64) for u in users],
                        negatives=np.asarray([negatives[u] for u in users], dtype=np.int64),
                        record={"name": "tiny", "n_items": N_ITEMS, "max_len": MAX_LEN})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("tiny")
    raw = folder / "tiny.txt"
    raw.write_text("".join(" ".join(map(str, [u, *items])) + "\n" for u, items in tiny_sequences().items()))
    datasets.prepare("tiny", raw, folder / "prepared", raw_record={"name": "tiny", "sha256": "test"},
                     max_len=MAX_LEN, n_negatives=N_NEGATIVES)
    return str(folder / "prepared")


def build(name: str, data: SequenceData, **params):
    torch.manual_seed(0)
    model = runs.build_model(name, data, {**TINY_PARAMS.get(name, {}), **params})
    model.fit(data)
    model.on_epoch_start(data, 0)
    return model


def training_batch(model, data: SequenceData, size: int = 32) -> dict[str, torch.Tensor]:
    _, batches = training_batches(model, data, size, seed=0, epoch=0, device="cpu")
    return next(batches)


def scoring_batch(data: SequenceData) -> dict[str, torch.Tensor]:
    return {"user": torch.arange(data.n_users), "history": torch.from_numpy(data.padded_histories("valid"))}


# ----------------------------------------------------------------------------------------------
# Every model on the interface


@pytest.mark.parametrize("name", TRAINED)
def test_loss_is_finite_and_falls_on_a_fixed_batch(name, data):
    model = build(name, data)
    batch = training_batch(model, data)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(30):
        loss = model.calculate_loss(batch)
        assert loss.dim() == 0 and torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5]), losses


@pytest.mark.parametrize("name", list(MODELS))
def test_full_sort_predict_shape_and_determinism(name, data):
    model = build(name, data).eval()
    batch = scoring_batch(data)
    with torch.no_grad():
        first, second = model.full_sort_predict(batch), model.full_sort_predict(batch)
    assert first.shape == (data.n_users, data.n_items + 1)
    assert torch.isfinite(first[:, 1:]).all()
    assert torch.equal(first, second)


@pytest.mark.parametrize("name", SEQUENTIAL)
@pytest.mark.parametrize("loss", ["bce", "ce"])
def test_both_losses_train(name, loss, data):
    model = build(name, data, loss=loss).train()
    value = model.calculate_loss(training_batch(model, data))
    value.backward()
    assert torch.isfinite(value)
    gradient = model.item_embeddings.weight.grad if hasattr(model, "item_embeddings") else None
    assert gradient is not None and gradient[1:].abs().sum() > 0


def test_loss_switch_rejects_unknown_values(data):
    with pytest.raises(ValueError, match="loss"):
        runs.build_model("SASRec", data, {"loss": "mse"})


@pytest.mark.parametrize("name", EXPORTERS)
def test_export_item_embeddings(name, data):
    model = build(name, data).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        model.calculate_loss(training_batch(model, data)).backward()
        optimizer.step()
    table = model.export_item_embeddings()
    assert table.shape == (data.n_items + 1, 64) and table.dtype == torch.float32
    assert torch.count_nonzero(table[0]) == 0 and torch.count_nonzero(table[1:]) > 0


@pytest.mark.parametrize("name", list(MODELS))
def test_unknown_parameter_is_named(name, data):
    with pytest.raises(InputError, match="not_a_parameter"):
        runs.build_model(name, data, {"not_a_parameter": 1})


@pytest.mark.parametrize("name", list(MODELS))
def test_run_end_to_end(name, prepared, tmp_path):
    record = runs.run(prepared, name, tmp_path / "run", seed=0, params=TINY_PARAMS.get(name, {}),
                      train_params={"epochs": 2, "batch_size": 16, "device": "cpu"}, progress=False)
    ranks = pd.read_parquet(tmp_path / "run" / "ranks.parquet")
    assert len(ranks) == N_USERS and (tmp_path / "run" / "run.json").exists()
    assert ranks["test_full"].between(1, N_ITEMS).all() and ranks["test_sampled"].between(1, N_NEGATIVES + 1).all()
    assert (tmp_path / "run" / "item_embeddings.safetensors").exists() == (name in EXPORTERS)
    assert 0.0 <= record["metrics"]["test_full"]["NDCG@10"] <= 1.0


# ----------------------------------------------------------------------------------------------
# Model-specific behaviour


@pytest.mark.parametrize("name", ["SASRec", "S3-Rec", "BERT4Rec", "GRU4Rec"])
def test_trimming_padding_changes_no_output(name, data, monkeypatch):
    model = build(name, data).eval()
    history = scoring_batch(data)["history"]
    real = history != 0
    with torch.no_grad():
        monkeypatch.setattr(common, "WIDTH_BUCKETS", ())
        untrimmed = model.encode(history)
        monkeypatch.setattr(common, "WIDTH_BUCKETS", (1, 2, 4))
        trimmed = model.encode(history)
    assert torch.allclose(trimmed[real], untrimmed[real], atol=1e-5)


def test_sasrec_attention_is_causal(data):
    model = build("SASRec", data).eval()
    history = scoring_batch(data)["history"]
    changed = history.clone()
    changed[:, -1] = (changed[:, -1] % N_ITEMS) + 1  # a different most recent item
    with torch.no_grad():
        before, after = model.encode(history), model.encode(changed)
    assert torch.allclose(before[:, :-1], after[:, :-1], atol=1e-6)
    assert not torch.allclose(before[:, -1], after[:, -1])


def test_gru4rec_reads_only_the_items(data):
    model = build("GRU4Rec", data).eval()
    history = scoring_batch(data)["history"][:4]
    with torch.no_grad():
        state = model.encode(history)[:, -1]
        for row in range(4):
            items = history[row][history[row] != 0][None]
            output, _ = model.gru(model.item_embeddings(items))
            assert torch.allclose(state[row], model.output_proj(output[0, -1]), atol=1e-5)


def test_s3rec_pretraining_changes_the_encoder_and_freezes_the_mip_head(data):
    untrained = build("S3-Rec", data, pretrain_epochs=0)
    pretrained = build("S3-Rec", data, pretrain_epochs=2)
    assert not torch.equal(untrained.item_embeddings.weight, pretrained.item_embeddings.weight)
    assert not any(p.requires_grad for p in pretrained.mip_proj.parameters())


def test_iclrec_clusters_intents_each_epoch(data):
    model = build("ICLRec", data)
    assert model.intents_ready and torch.isfinite(model.intent_centroids).all()
    assert model.intent_centroids.abs().sum() > 0
    assert "intent_centroids" not in model.state_dict()  # recomputed every epoch, not checkpointed


def test_bert4rec_scores_after_an_appended_mask(data):
    model = build("BERT4Rec", data).eval()
    history = scoring_batch(data)["history"]
    expected = torch.cat([history[:, 1:], torch.full_like(history[:, :1], model.mask_id)], 1)
    with torch.no_grad():
        state = model.item_scorer(model.encode(expected)[:, -1])
        scores = model.full_sort_predict(scoring_batch(data))
    reference = state @ model.item_embeddings.weight[:N_ITEMS + 1].T + model.item_scorer.item_bias[:N_ITEMS + 1]
    assert torch.allclose(scores, reference, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Shared blocks


def left_padded(rows: list[list[int]], width: int = 8) -> torch.Tensor:
    return torch.from_numpy(left_pad(rows, width))


def test_crop_keeps_a_contiguous_run():
    torch.manual_seed(0)
    items = left_padded([[1, 2, 3, 4, 5, 6], [7, 8], [9]] * 20)
    cropped = common.crop_sequences(items, 0.5)
    for source, view in zip(items.tolist(), cropped.tolist()):
        real = [i for i in source if i]
        kept = [i for i in view if i]
        assert view[:len(view) - len(kept)] == [0] * (len(view) - len(kept))  # left-padded
        assert len(kept) == max(1, int(0.5 * len(real)))
        start = real.index(kept[0])
        assert real[start:start + len(kept)] == kept


def test_mask_replaces_floor_ratio_items():
    torch.manual_seed(0)
    items = left_padded([[1, 2, 3, 4, 5, 6], [7, 8], [9]] * 20)
    masked = common.mask_sequences(items, 0.5, mask_id=99)
    for source, view in zip(items.tolist(), masked.tolist()):
        n = sum(1 for i in source if i)
        assert sum(1 for i in view if i == 99) == int(0.5 * n)
        assert all(v in (s, 99) if s else v == 0 for s, v in zip(source, view))


def test_reorder_shuffles_one_window():
    torch.manual_seed(0)
    items = left_padded([[1, 2, 3, 4, 5, 6], [7, 8], [9]] * 20)
    reordered = common.reorder_sequences(items, 0.5)
    changed = False
    for source, view in zip(items.tolist(), reordered.tolist()):
        assert sorted(source) == sorted(view)
        moved = [k for k, (s, v) in enumerate(zip(source, view)) if s != v]
        window = int(0.5 * sum(1 for i in source if i))
        assert not moved or moved[-1] - moved[0] < window
        changed |= bool(moved)
    assert changed


def test_info_nce_matches_its_definition():
    torch.manual_seed(0)
    first, second = torch.randn(5, 3), torch.randn(5, 3)
    expected = []
    for anchor, partner, own in [(first, second, first), (second, first, second)]:
        for i in range(5):
            logits = [anchor[i] @ partner[j] / 0.5 for j in range(5)]
            logits += [anchor[i] @ own[j] / 0.5 for j in range(5) if j != i]
            expected.append(-F.log_softmax(torch.stack(logits), 0)[i])
    assert torch.allclose(common.info_nce(first, second, 0.5), torch.stack(expected).mean(), atol=1e-5)


def test_kmeans_finds_separated_clusters():
    torch.manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = torch.cat([c + 0.1 * torch.randn(50, 2) for c in centres])
    found = common.kmeans(points, 3)
    assert torch.cdist(centres, found).min(1).values.max() < 0.5
    assignment = common.nearest_centroid(points, found)
    assert len(set(assignment.tolist())) == 3


def test_negatives_avoid_excluded_items():
    torch.manual_seed(0)
    exclude = torch.arange(1, 11).expand(2000, 10)  # items 1..10 of 40 are excluded
    negatives = common.sample_negatives((2000, 3), 40, "cpu", exclude=exclude)
    assert negatives.min() >= 1 and negatives.max() <= 40
    assert (negatives <= 10).float().mean() < 0.01  # 0.25 without redraws, 0.25^4 after three


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("chunk_bytes", [4 * 11 * 3, 3 << 20])  # chunks of 8 rows (several), one chunk
def test_cpu_linear_cross_entropy_matches_torch(monkeypatch, with_bias, chunk_bytes):
    """The fused chunked CPU loss gives F.cross_entropy's value and gradients for hidden, table and
    bias, whether the rows go through in one chunk or several."""
    monkeypatch.setattr(common, "CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(0)
    hidden = torch.randn(21, 5, requires_grad=True)
    table = (2 * torch.randn(11, 5)).requires_grad_()
    bias = torch.randn(11, requires_grad=True) if with_bias else None
    targets = torch.randint(0, 11, (21,))
    inputs = [hidden, table] + ([bias] if with_bias else [])
    ours = common.linear_cross_entropy(hidden, table, targets, bias)
    gradients = torch.autograd.grad(3 * ours, inputs)
    logits = hidden @ table.T + (bias if with_bias else 0)
    reference = F.cross_entropy(logits, targets)
    expected = torch.autograd.grad(3 * reference, inputs)
    assert torch.allclose(ours, reference, atol=1e-6)
    for got, want in zip(gradients, expected):
        assert torch.allclose(got, want, atol=1e-6)
    with torch.no_grad():  # evaluation takes torch's own path
        assert torch.allclose(common.linear_cross_entropy(hidden, table, targets, bias), reference, atol=1e-6)
