"""POP: every user gets the same ranking, items ordered by their popularity.

Popularity is the number of interactions of each item in the training parts of all users (no
validation or test item is counted). With the evaluator's default policy (no history masking,
pessimistic ties) this reproduces the paper's POP rows (see the README's Table 3 note).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from e4srec.data import SequenceData
from e4srec.recommender import Recommender


@dataclasses.dataclass
class POPConfig:
    """POP has no hyperparameters."""


class POP(Recommender):
    training_input = "none"
    config_class = POPConfig

    def __init__(self, n_items: int, n_users: int, max_len: int, config: POPConfig | None = None):
        super().__init__(n_items, n_users, max_len)
        self.register_buffer("popularity", torch.zeros(n_items + 1))  # [n_items + 1]

    def fit(self, data: SequenceData) -> None:
        counts = np.bincount(np.concatenate([data.train_part(u) for u in range(data.n_users)]),
                             minlength=self.n_items + 1).astype(np.float32)
        counts[0] = 0.0
        self.popularity.copy_(torch.from_numpy(counts))

    def full_sort_predict(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.popularity.expand(batch["history"].shape[0], -1)
