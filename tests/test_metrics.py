"""Metrics from ranks: hand-computed cases, an independent pure-Python reference, invariants."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from e4srec.metrics import HR_KS, NDCG_KS, all_metrics, hit_rate, mrr, ndcg, per_user

# ----------------------------------------------------------------------------------------------
# Hand-computed


def test_hand_case_1_2_11():
    ranks = np.array([1, 2, 11])
    assert hit_rate(ranks, 1) == pytest.approx(1 / 3)
    assert hit_rate(ranks, 5) == pytest.approx(2 / 3)
    assert hit_rate(ranks, 10) == pytest.approx(2 / 3)
    assert hit_rate(ranks, 11) == pytest.approx(1.0)
    assert ndcg(ranks, 1) == pytest.approx(1 / 3)
    assert ndcg(ranks, 10) == pytest.approx((1 + 1 / math.log2(3)) / 3)
    assert ndcg(ranks, 20) == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(12)) / 3)
    assert mrr(ranks) == pytest.approx((1 + 1 / 2 + 1 / 11) / 3)


def test_hand_single_user():
    assert ndcg([3], 5) == pytest.approx(0.5)  # 1 / log2(4)
    assert ndcg([7], 5) == 0.0 and hit_rate([7], 5) == 0.0
    assert mrr([4]) == 0.25
    assert ndcg([1], 1) == 1.0


def test_all_metrics_rows_and_values():
    ranks = np.array([1, 2, 11, 30], dtype=np.int32)
    rows = all_metrics(ranks)
    assert [(m, k) for m, k, _ in rows] == ([("HR", k) for k in (1, 5, 10, 20)] + [("NDCG", k) for k in (5, 10, 20)]
                                            + [("MRR", None)])
    values = {(m, k): v for m, k, v in rows}
    assert values[("HR", 20)] == pytest.approx(3 / 4)
    assert values[("NDCG", 5)] == pytest.approx((1 + 1 / math.log2(3)) / 4)
    assert values[("MRR", None)] == pytest.approx((1 + 1 / 2 + 1 / 11 + 1 / 30) / 4)
    assert all(isinstance(v, float) for _, _, v in rows)


@pytest.mark.parametrize("bad", [np.array([], dtype=np.int64), np.array([0, 1]), np.array([3, -1])])
def test_all_metrics_rejects_bad_ranks(bad):
    with pytest.raises(ValueError):
        all_metrics(bad)


def test_per_user_unknown_metric():
    with pytest.raises(ValueError, match="unknown metric 'AUC'"):
        per_user(np.array([1]), "AUC", None)


# ----------------------------------------------------------------------------------------------
# An independent reference: per user, build the ranked list with the one relevant item and score it


def reference(ranks: list[int]) -> dict[tuple[str, int | None], float]:
    out: dict[tuple[str, int | None], float] = {}
    n = len(ranks)
    for k in HR_KS:
        hits = 0
        for r in ranks:
            relevance = [0] * max(k, r)  # the ranked list: the relevant item at position r
            relevance[r - 1] = 1
            hits += sum(relevance[:k])
        out[("HR", k)] = hits / n
    for k in NDCG_KS:
        total = 0.0
        for r in ranks:
            relevance = [0] * max(k, r)
            relevance[r - 1] = 1
            dcg = sum(rel / math.log(pos + 2, 2) for pos, rel in enumerate(relevance[:k]))
            idcg = 1 / math.log(2, 2)
            total += dcg / idcg
        out[("NDCG", k)] = total / n
    out[("MRR", None)] = sum(1 / r for r in ranks) / n
    return out


@pytest.mark.parametrize("seed", range(5))
def test_agrees_with_reference(seed):
    rng = random.Random(seed)
    ranks = [rng.choice([1, 2, 3, rng.randint(1, 30), rng.randint(1, 12000)]) for _ in range(200)]
    expected = reference(ranks)
    got = {(m, k): v for m, k, v in all_metrics(np.array(ranks, dtype=np.int32))}
    assert got.keys() == expected.keys()
    for key in got:
        assert got[key] == pytest.approx(expected[key], rel=1e-12, abs=1e-15), key


# ----------------------------------------------------------------------------------------------
# Invariants

ranks_strategy = st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=60)


@settings(max_examples=150, deadline=None)
@given(ranks_strategy)
def test_invariants(ranks):
    ranks = np.array(ranks)
    ks = sorted(set(HR_KS) | set(NDCG_KS) | {2, 3, 50})
    hrs = [hit_rate(ranks, k) for k in ks]
    ndcgs = [ndcg(ranks, k) for k in ks]
    assert hrs == sorted(hrs) and ndcgs == sorted(ndcgs)  # monotone in k
    for k, h, g in zip(ks, hrs, ndcgs):
        assert 0.0 <= g <= h + 1e-12 <= 1.0 + 1e-12  # NDCG@k <= HR@k
    assert ndcg(ranks, 1) == pytest.approx(hit_rate(ranks, 1))
    assert hit_rate(ranks, 1) <= mrr(ranks) + 1e-12 and 0 < mrr(ranks) <= 1
    assert mrr(ranks) >= 1 / ranks.max() - 1e-12
    for metric, k, value in all_metrics(ranks):
        assert np.mean(per_user(ranks, metric, k)) == pytest.approx(value, rel=1e-12, abs=1e-15)
        assert per_user(ranks, metric, k).shape == ranks.shape


@settings(max_examples=50, deadline=None)
@given(ranks_strategy, st.integers(min_value=0, max_value=5))
def test_better_ranks_never_lower_metrics(ranks, shift):
    ranks = np.array(ranks)
    better = np.maximum(ranks - shift, 1)
    for (m, k, worse_value), (_, _, better_value) in zip(all_metrics(ranks), all_metrics(better)):
        assert better_value >= worse_value - 1e-12, (m, k)


def test_perfect_ranking_gives_one():
    ranks = np.ones(17, dtype=np.int64)
    assert all(value == 1.0 for _, _, value in all_metrics(ranks))


def test_order_of_users_does_not_matter():
    ranks = np.random.default_rng(0).integers(1, 100, size=50)
    for (m, k, a), (_, _, b) in zip(all_metrics(ranks), all_metrics(ranks[::-1])):
        assert a == pytest.approx(b)
