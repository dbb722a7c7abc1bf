"""One evaluator for every model: scores over all items -> per-user ranks of the held-out item.

A model scores all items for a batch of histories (``full_sort_predict``, shape [B, n_items + 1],
column 0 is padding and never a candidate). From those scores this module derives, per user and
for both the validation and the test target, three ranks:

- ``full``: rank among all items, history NOT masked (the paper-faithful default of Table 3);
- ``full_masked``: rank among all items with every item of the user's (uncut) history removed, as the
  official inference script and S3-Rec's full ranking do; a target that is itself in the history
  (6.7% of Yelp users) then ranks last;
- ``sampled``: rank among the target and the user's 99 negatives (Table 6).

Ties are counted pessimistically: rank = 1 + the number of other candidates scoring at least as
high as the target (``ties="optimistic"`` counts only strictly higher scores, for analysis).
The ranks file is the one source of truth for every metric, test and table.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd
import torch

from .data import SequenceData, left_pad
from .files import InputError

RANK_COLUMNS = [f"{split}_{protocol}" for split in ("valid", "test") for protocol in ("full", "full_masked", "sampled")]
TIE_POLICIES = ("pessimistic", "optimistic")


def _count_above(scores: torch.Tensor, target_scores: torch.Tensor, ties: str) -> torch.Tensor:
    """Per row, how many entries of ``scores`` [B, C] are >= (pessimistic) or > the target score [B]."""
    if ties == "pessimistic":
        return (scores >= target_scores[:, None]).sum(dim=1)
    if ties == "optimistic":
        return (scores > target_scores[:, None]).sum(dim=1)
    raise ValueError(f"unknown tie policy {ties!r}; choose one of {TIE_POLICIES}")


def ranks_from_scores(scores: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor,
                      history_items: list[np.ndarray], ties: str = "pessimistic") -> dict[str, np.ndarray]:
    """Ranks (from 1) of ``targets`` [B] under the three protocols, from ``scores`` [B, n_items + 1]."""
    # Upcast half precision (and integers) only: rounding float64 scores to float32 would merge
    # close scores into ties and move ranks.
    if not scores.is_floating_point():
        scores = scores.double()
    elif scores.dtype not in (torch.float32, torch.float64):
        scores = scores.float()
    if not torch.isfinite(scores[:, 1:]).all():
        raise FloatingPointError("model produced NaN or infinite scores")
    rows = torch.arange(scores.shape[0], device=scores.device)
    target_scores = scores[rows, targets]
    candidates = scores[:, 1:]  # drop the padding column
    # The target itself is among the candidates: pessimistic counts it once (>=), optimistic never (>).
    full = _count_above(candidates, target_scores, ties) + (0 if ties == "pessimistic" else 1)

    # Mask on the full matrix, then drop column 0: a padding id 0 in a history then masks only the
    # padding column (indexing ``candidates`` with id - 1 would mask the last item instead).
    masked_full = scores.clone()
    lengths = [len(h) for h in history_items]
    if sum(lengths):
        row_index = torch.repeat_interleave(rows, torch.tensor(lengths, device=scores.device))
        # int64 whatever the rows' types: np.concatenate of an int array and an empty list is float64.
        col_index = torch.from_numpy(np.concatenate([np.asarray(h, dtype=np.int64) for h in history_items]))
        masked_full[row_index, col_index.to(scores.device)] = float("-inf")
    masked_scores = masked_full[:, 1:]
    masked_target = masked_full[rows, targets]
    masked = _count_above(masked_scores, masked_target, ties) + (0 if ties == "pessimistic" else 1)
    # A masked target (score -inf) ranks last, whatever the tie policy.
    masked = torch.where(torch.isinf(masked_target), torch.full_like(masked, candidates.shape[1]), masked)

    negative_scores = scores.gather(1, negatives)
    sampled = 1 + _count_above(negative_scores, target_scores, ties)
    return {"full": full.cpu().numpy(), "full_masked": masked.cpu().numpy(), "sampled": sampled.cpu().numpy()}


ScoreFn = Callable[[dict[str, torch.Tensor]], torch.Tensor]


@torch.no_grad()
def rank_split(score: ScoreFn, data: SequenceData, split: str, batch_size: int = 512,
               device: str | torch.device = "cpu", ties: str = "pessimistic",
               users: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Ranks of the ``split`` target for every user (or the given user indices)."""
    users = np.arange(data.n_users) if users is None else np.asarray(users)
    histories = data.histories(split)
    targets = data.targets(split)
    out: dict[str, list[np.ndarray]] = {"full": [], "full_masked": [], "sampled": []}
    for start in range(0, len(users), batch_size):
        index = users[start:start + batch_size]
        batch = {
            "user": torch.from_numpy(index).to(device),
            "history": torch.from_numpy(left_pad([histories[i] for i in index], data.max_len)).to(device),
        }
        scores = score(batch)
        if scores.shape != (len(index), data.n_items + 1):
            raise InputError(f"model returned scores of shape {tuple(scores.shape)}, expected "
                             f"({len(index)}, {data.n_items + 1}) for {data.name}")
        ranks = ranks_from_scores(scores, torch.from_numpy(targets[index]).to(device),
                                  torch.from_numpy(data.negatives[index]).to(device),
                                  [histories[i] for i in index], ties)
        for key, value in ranks.items():
            out[key].append(value)
    return {key: np.concatenate(parts).astype(np.int32) for key, parts in out.items()}


def rank_all(score: ScoreFn, data: SequenceData, batch_size: int = 512, device: str | torch.device = "cpu",
             ties: str = "pessimistic") -> pd.DataFrame:
    """The ranks table of a run: user_id and the six rank columns (validation and test x protocols)."""
    frame = {"user_id": data.user_ids}
    for split in ("valid", "test"):
        for protocol, ranks in rank_split(score, data, split, batch_size, device, ties).items():
            frame[f"{split}_{protocol}"] = ranks
    return pd.DataFrame(frame)
