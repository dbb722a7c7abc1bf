"""The evaluator: ranks from scores (hand cases, an argsort reference), rank_all on tiny data."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from baselines.pop import POP
from e4srec.evaluate import RANK_COLUMNS, rank_all, rank_split, ranks_from_scores
from e4srec.files import InputError

try:
    from helpers import make_data, random_sequences
except ImportError:  # tests/ imported as a package
    from tests.helpers import make_data, random_sequences


def ranks(scores, targets, negatives=None, histories=None, ties="pessimistic"):
    scores = torch.as_tensor(scores)
    if scores.ndim == 1:
        scores = scores[None]
    batch = scores.shape[0]
    targets = torch.as_tensor(targets, dtype=torch.int64).reshape(batch)
    negatives = torch.as_tensor(negatives if negatives is not None else [[1]] * batch, dtype=torch.int64)
    histories = histories if histories is not None else [np.zeros(0, dtype=np.int64)] * batch
    return {k: v.tolist() for k, v in ranks_from_scores(scores, targets, negatives, histories, ties).items()}


# ----------------------------------------------------------------------------------------------
# Hand cases (n_items = 5; column 0 is padding)

ROW = [9.0, 1.0, 3.0, 3.0, 2.0, 0.0]  # padding has the top score; items 2 and 3 tie at 3.0


def test_pessimistic_ties():
    assert ranks(ROW, [2])["full"] == [2]  # 1 + item 3 (>=); the padding column never counts
    assert ranks(ROW, [3])["full"] == [2]
    assert ranks(ROW, [4])["full"] == [3]
    assert ranks(ROW, [5])["full"] == [5]


def test_optimistic_ties():
    assert ranks(ROW, [2], ties="optimistic")["full"] == [1]
    assert ranks(ROW, [3], ties="optimistic")["full"] == [1]
    assert ranks(ROW, [4], ties="optimistic")["full"] == [3]


def test_all_tied_scores():
    flat = [0.0] * 6
    assert ranks(flat, [3])["full"] == [5]
    assert ranks(flat, [3], ties="optimistic")["full"] == [1]


def test_padding_never_a_candidate_even_when_nan():
    row = [float("nan"), 1.0, 3.0, 3.0, 2.0, 0.0]
    assert ranks(row, [2])["full"] == [2]
    assert ranks(row, [2], ties="optimistic")["full"] == [1]


def test_padding_id_in_a_history_masks_no_item():
    row = [0.0, 1.0, 3.0, 3.0, 2.0, 8.0]  # the last item scores highest
    assert ranks(row, [2])["full"] == [3]
    assert ranks(row, [2], histories=[np.array([0, 3])])["full_masked"] == [2]  # item 5 stays a candidate


def test_history_masking():
    got = ranks(ROW, [2], histories=[np.array([3])])
    assert got["full"] == [2] and got["full_masked"] == [1]
    got = ranks(ROW, [4], histories=[np.array([1, 3])])
    assert got["full"] == [3] and got["full_masked"] == [2]  # item 3 removed; item 1 scored lower anyway


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
def test_target_in_its_own_history_ranks_last(ties):
    got = ranks(ROW, [2], histories=[np.array([2, 4])], ties=ties)
    assert got["full_masked"] == [5]
    got = ranks(ROW, [5], histories=[np.array([5])], ties=ties)
    assert got["full_masked"] == [5]


def test_histories_of_mixed_types_and_empty_rows():
    scores = torch.tensor([ROW, ROW, ROW])
    histories = [np.array([3], dtype=np.int64), [], [3, 4]]
    got = ranks(scores, [2, 2, 5], histories=histories)
    assert got["full_masked"] == [1, 2, 3]


def test_sampled_among_99_negatives():
    n_items = 200
    scores = torch.arange(n_items + 1, dtype=torch.float32)  # item i scores i
    negatives = list(range(101, 150)) + list(range(151, 201))  # 99 negatives; 50 of them above item 150
    assert len(negatives) == 99
    assert ranks(scores, [150], negatives=[negatives])["sampled"] == [51]
    tied = scores.clone()
    tied[101] = 150.0
    assert ranks(tied, [150], negatives=[negatives])["sampled"] == [52]
    assert ranks(tied, [150], negatives=[negatives], ties="optimistic")["sampled"] == [51]
    assert ranks(scores, [100], negatives=[list(range(1, 100))])["sampled"] == [1]
    assert ranks(scores, [1], negatives=[list(range(2, 101))])["sampled"] == [100]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_scores_raise(bad):
    row = list(ROW)
    row[3] = bad
    with pytest.raises(FloatingPointError, match="NaN or infinite"):
        ranks(row, [2])


def test_unknown_tie_policy():
    with pytest.raises(ValueError, match="unknown tie policy"):
        ranks(ROW, [2], ties="random")


def test_float64_scores_keep_their_precision():
    scores = torch.tensor([[0.0, 1.0, 1.0 + 1e-12, 0.5]], dtype=torch.float64)
    assert ranks(scores, [1])["full"] == [2]  # item 2 is strictly higher, not a float32 tie
    assert ranks(scores, [1], ties="optimistic")["full"] == [2]


def test_half_precision_and_integer_scores():
    row = torch.tensor([ROW], dtype=torch.bfloat16)
    assert ranks(row, [2])["full"] == [2]
    assert ranks(torch.tensor([[0, 5, 7, 7, 1]]), [1])["full"] == [3]


# ----------------------------------------------------------------------------------------------
# Agreement with an independent argsort reference


def reference(scores: np.ndarray, targets, negatives, histories, ties):
    out = {"full": [], "full_masked": [], "sampled": []}
    n_items = scores.shape[1] - 1
    for row, target, negs, history in zip(scores, targets, negatives, histories):
        def rank_among(items):
            items = np.asarray(items)
            is_target = items == target
            # sort by score, descending; among equal scores the target goes last (pessimistic) or first
            tie_key = is_target if ties == "pessimistic" else ~is_target
            order = np.lexsort((tie_key, -row[items]))
            return int(np.flatnonzero(is_target[order])[0]) + 1

        all_items = np.arange(1, n_items + 1)
        out["full"].append(rank_among(all_items))
        if target in set(history):
            out["full_masked"].append(n_items)
        else:
            out["full_masked"].append(rank_among([i for i in all_items if i not in set(history)]))
        out["sampled"].append(rank_among(np.concatenate([[target], negs])))
    return out


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
@pytest.mark.parametrize("seed", range(4))
def test_agrees_with_argsort_reference(seed, ties):
    rng = np.random.default_rng(seed)
    batch, n_items, n_neg = 16, 40, 9
    # integer-valued scores from a small range: many ties
    scores = rng.integers(-4, 5, size=(batch, n_items + 1)).astype(np.float32)
    if seed % 2:
        scores += rng.normal(size=scores.shape).astype(np.float32)  # and some without ties
    targets = rng.integers(1, n_items + 1, size=batch)
    histories, negatives = [], []
    for b in range(batch):
        history = rng.choice(np.arange(1, n_items + 1), size=rng.integers(0, 12), replace=False)
        if b % 5 == 0:
            history = np.append(history, targets[b])  # a target that repeats a history item
        histories.append(history.astype(np.int64))
        pool = np.setdiff1d(np.arange(1, n_items + 1), np.append(history, targets[b]))
        negatives.append(rng.choice(pool, size=n_neg, replace=False))
    negatives = np.stack(negatives)
    got = ranks_from_scores(torch.from_numpy(scores), torch.from_numpy(targets), torch.from_numpy(negatives),
                            histories, ties)
    expected = reference(scores, targets, negatives, histories, ties)
    for key in expected:
        assert got[key].tolist() == expected[key], key


# ----------------------------------------------------------------------------------------------
# rank_split / rank_all on a tiny SequenceData


@pytest.fixture
def tiny():
    return make_data(random_sequences(11, 25, seed=3, min_len=3, max_len=9), max_len=4, n_negatives=6)


def pop_model(data):
    model = POP(data.n_items, data.n_users, data.max_len)
    model.fit(data)
    return model


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
def test_rank_all_with_pop(tiny, ties):
    model = pop_model(tiny)
    frame = rank_all(model.full_sort_predict, tiny, batch_size=4, ties=ties)
    assert list(frame.columns) == ["user_id", *RANK_COLUMNS]
    assert RANK_COLUMNS == ["valid_full", "valid_full_masked", "valid_sampled",
                            "test_full", "test_full_masked", "test_sampled"]
    assert frame["user_id"].tolist() == tiny.user_ids.tolist()
    scores = model.popularity.numpy()[None].repeat(tiny.n_users, axis=0)
    for split in ("valid", "test"):
        expected = reference(scores, tiny.targets(split), tiny.negatives, tiny.histories(split), ties)
        for protocol, values in expected.items():
            assert frame[f"{split}_{protocol}"].tolist() == values, (split, protocol)
            assert frame[f"{split}_{protocol}"].dtype == np.int32
    # the batch size changes nothing
    assert frame.equals(rank_all(model.full_sort_predict, tiny, batch_size=512, ties=ties))


def test_rank_split_batches_and_user_subset(tiny):
    seen = []

    def score(batch):
        seen.append({k: v.clone() for k, v in batch.items()})
        return torch.zeros(len(batch["user"]), tiny.n_items + 1)

    rank_split(score, tiny, "test", batch_size=3)
    assert torch.cat([b["user"] for b in seen]).tolist() == list(range(tiny.n_users))
    assert torch.cat([b["history"] for b in seen]).numpy().tolist() == tiny.padded_histories("test").tolist()
    model = pop_model(tiny)
    whole = rank_split(model.full_sort_predict, tiny, "valid")
    part = rank_split(model.full_sort_predict, tiny, "valid", users=np.array([7, 2]))
    for key in whole:
        assert part[key].tolist() == whole[key][[7, 2]].tolist()


@pytest.mark.parametrize("shape", ["items", "batch"])
def test_wrong_shaped_scores_raise(tiny, shape):
    def score(batch):
        rows = len(batch["user"]) + (1 if shape == "batch" else 0)
        return torch.zeros(rows, tiny.n_items + (1 if shape == "batch" else 0))

    with pytest.raises(InputError, match="model returned scores of shape"):
        rank_all(score, tiny)
