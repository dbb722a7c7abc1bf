"""Ranking metrics, computed from per-user ranks only (rank 1 is the top).

HR@k = share of users whose target rank <= k; NDCG@k = mean of 1 / log2(rank + 1) over users with
rank <= k (one relevant item, so the ideal DCG is 1); MRR = mean of 1 / rank.
"""
from __future__ import annotations

import numpy as np

HR_KS = (1, 5, 10, 20)
NDCG_KS = (5, 10, 20)


def hit_rate(ranks: np.ndarray, k: int) -> float:
    return float(np.mean(np.asarray(ranks) <= k))


def ndcg(ranks: np.ndarray, k: int) -> float:
    ranks = np.asarray(ranks, dtype=np.float64)
    return float(np.mean(np.where(ranks <= k, 1.0 / np.log2(ranks + 1.0), 0.0)))


def mrr(ranks: np.ndarray) -> float:
    return float(np.mean(1.0 / np.asarray(ranks, dtype=np.float64)))


def per_user(ranks: np.ndarray, metric: str, k: int | None) -> np.ndarray:
    """The per-user values whose mean is the metric (for paired tests and bootstrap intervals)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if metric == "HR":
        return (ranks <= k).astype(np.float64)
    if metric == "NDCG":
        return np.where(ranks <= k, 1.0 / np.log2(ranks + 1.0), 0.0)
    if metric == "MRR":
        return 1.0 / ranks
    raise ValueError(f"unknown metric {metric!r}")


def all_metrics(ranks: np.ndarray) -> list[tuple[str, int | None, float]]:
    """Every reported metric as (metric, k, value); k is None for MRR."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        raise ValueError("no ranks to evaluate")
    if ranks.min() < 1:
        raise ValueError("ranks start at 1")
    rows = [("HR", k, hit_rate(ranks, k)) for k in HR_KS]
    rows += [("NDCG", k, ndcg(ranks, k)) for k in NDCG_KS]
    rows.append(("MRR", None, mrr(ranks)))
    return rows
