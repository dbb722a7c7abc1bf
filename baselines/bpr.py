"""BPR-MF: matrix factorisation trained with Bayesian personalised ranking.

Paper: Steffen Rendle, Christoph Freudenthaler, Zeno Gantner and Lars Schmidt-Thieme, "BPR:
Bayesian Personalized Ranking from Implicit Feedback", UAI 2009. Reference implementation
followed: RecBole's ``bpr.py`` (user and item embeddings, score = dot product, loss
-log sigmoid(s(u, i) - s(u, j)) for an observed item i and a uniformly drawn unobserved item j).

Defaults: d=64 (the E4SRec paper), Adam lr 1e-3, no regularisation (RecBole's), Xavier-normal init.
Non-sequential: the order of the items is ignored, so there is no loss switch (BPR is its loss).

Representation of the training data: the suite's ``sequences`` batches, one row per user with the
user's last max_len + 1 training items; every non-padding item of the row is a positive (i) of the
row's user, each with one negative (j) drawn uniformly (torch's global generator) and redrawn when
it hits the row's items. One epoch thus visits every (user, training item) pair once, as RecBole's
pair sampler does, in 256-user batches (about 2,300 pairs on Beauty).

Deliberate deviations:
- Users with more than max_len + 1 training items contribute only their last max_len + 1 (153 of
  22,363 Beauty users are longer than 50); a user whose training part has one item is not trained
  (the suite keeps only rows with an input and a target); such a user keeps a random embedding.
- ``export_item_embeddings`` gives the item factors for the ablation "BPR embeddings + LLM"
  (the E4SRec paper's Figure 3).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from e4srec.recommender import Recommender, xavier_init

from .common import sample_negatives, score_all_items

TRAIN_DEFAULTS = {"learning_rate": 1e-3, "batch_size": 256, "weight_decay": 0.0, "epochs": 200, "patience": 10}


@dataclasses.dataclass
class BPRConfig:
    hidden_size: int = 64  # embedding size of users and items


class BPR(Recommender):
    training_input = "sequences"
    config_class = BPRConfig

    def __init__(self, n_items: int, n_users: int, max_len: int, config: BPRConfig | None = None):
        super().__init__(n_items, n_users, max_len)
        self.config = config = config if config is not None else BPRConfig()
        self.user_embeddings = nn.Embedding(n_users, config.hidden_size)
        self.item_embeddings = nn.Embedding(n_items + 1, config.hidden_size, padding_idx=0)
        xavier_init(self)

    def calculate_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        items = batch["sequence"]  # [B, L + 1]: the user's training items (order unused)
        rows, columns = torch.nonzero(items, as_tuple=True)  # [N] observed (user, item) pairs
        positives = items[rows, columns]
        negatives = sample_negatives(positives.shape, self.n_items, items.device, exclude=items[rows])
        users = self.user_embeddings(batch["user"][rows])  # [N, d]
        difference = (users * (self.item_embeddings(positives) - self.item_embeddings(negatives))).sum(-1)
        return F.softplus(-difference.float()).mean()  # -log sigmoid(s_ui - s_uj)

    def full_sort_predict(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return score_all_items(self.user_embeddings(batch["user"]), self.item_embeddings.weight, self.n_items)

    @torch.no_grad()
    def export_item_embeddings(self) -> torch.Tensor:
        """[n_items + 1, d] item factors, row 0 (padding) zero."""
        table = self.item_embeddings.weight.detach().float().cpu().clone()
        table[0] = 0.0
        return table
