"""Caser: convolutional sequence embedding.

Paper: Jiaxi Tang and Ke Wang, "Personalized Top-N Sequential Recommendation via Convolutional
Sequence Embedding", WSDM 2018. Reference implementation followed: the authors' PyTorch code
(github.com/graytowne/caser_pytorch, ``caser.py``): the embeddings of the last L items form an
L x d "image"; n_v vertical filters (L x 1) and n_h horizontal filters of every height 1..L
(h x d, ReLU, max-pooled over time) are concatenated, dropped out and mapped to d by a ReLU
layer; that vector is concatenated with a user embedding and scored against a separate output
item table [n_items + 1, 2d] plus an item bias.

Defaults (the paper and its code): d=64 (E4SRec's; the paper uses 50), L=5, n_v=4, n_h=16,
dropout 0.5, ReLU after the convolutions and the dense layer, binary cross-entropy, Adam lr 1e-3;
batch 512 as the code (``TRAIN_DEFAULTS``; L2 1e-6 as decoupled weight decay).

Deliberate deviations:
- One target per example (T=1, as RecBole): the suite's ``examples`` batches pair each history
  with its next item; Caser uses the last L items of the history (windows of one user overlap, as in
  the paper's sliding windows). The paper predicts T=3 next items per window.
- ``loss="bce"`` uses one sampled negative per target (the code samples 3); ``"ce"`` (softmax over
  all items) is the fairness switch's other side.
- Xavier-normal init for every layer (the E4SRec paper's baselines); the code draws embeddings
  from N(0, 1/d).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from e4srec.recommender import Recommender, xavier_init

from .common import LOSSES, Dropout, check_choice, check_fraction, next_item_loss

TRAIN_DEFAULTS = {"learning_rate": 1e-3, "batch_size": 512, "weight_decay": 1e-6, "epochs": 200, "patience": 10}


class ConvolutionalSequenceEmbedding(nn.Module):
    """[B, L, d] embedded window -> [B, d] sequence vector z (vertical + horizontal convolutions)."""

    def __init__(self, window: int, hidden_size: int, n_vertical: int, n_horizontal: int, dropout: float):
        super().__init__()
        self.vertical = nn.Conv2d(1, n_vertical, (window, 1))
        self.horizontal = nn.ModuleList(nn.Conv2d(1, n_horizontal, (height, hidden_size))
                                        for height in range(1, window + 1))
        self.dropout = Dropout(dropout)
        self.dense = nn.Linear(n_vertical * hidden_size + n_horizontal * window, hidden_size)

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        image = window.unsqueeze(1)  # [B, 1, L, d]
        vertical = self.vertical(image).flatten(1)  # [B, n_v * d]
        horizontal = [F.relu(conv(image).squeeze(3)).amax(2) for conv in self.horizontal]  # L x [B, n_h]
        features = self.dropout(torch.cat([vertical, *horizontal], dim=1))
        return F.relu(self.dense(features))  # [B, d]


@dataclasses.dataclass
class CaserConfig:
    hidden_size: int = 64
    window: int = 5  # L, the number of most recent items read
    n_vertical: int = 4  # n_v
    n_horizontal: int = 16  # n_h per height
    dropout: float = 0.5
    loss: str = "bce"  # bce (the paper's) | ce

    def __post_init__(self):
        check_choice("loss", self.loss, LOSSES)
        check_fraction("dropout", self.dropout)
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")


class Caser(Recommender):
    training_input = "examples"
    config_class = CaserConfig

    def __init__(self, n_items: int, n_users: int, max_len: int, config: CaserConfig | None = None):
        super().__init__(n_items, n_users, max_len)
        self.config = config = config if config is not None else CaserConfig()
        if config.window > max_len:
            raise ValueError(f"window {config.window} exceeds the dataset's max_len {max_len}")
        d = config.hidden_size
        self.item_embeddings = nn.Embedding(n_items + 1, d, padding_idx=0)
        self.user_embeddings = nn.Embedding(n_users, d)
        self.sequence_embedding = ConvolutionalSequenceEmbedding(config.window, d, config.n_vertical,
                                                                 config.n_horizontal, config.dropout)
        self.output_item_embeddings = nn.Embedding(n_items + 1, 2 * d)  # W2 [n_items + 1, 2d]
        self.output_item_bias = nn.Parameter(torch.zeros(n_items + 1))  # b2
        xavier_init(self)
        for conv in [self.sequence_embedding.vertical, *self.sequence_embedding.horizontal]:
            nn.init.xavier_normal_(conv.weight)
            nn.init.zeros_(conv.bias)

    def user_state(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, 2d]: z from the last ``window`` items of ``history`` [B, max_len], and the user embedding."""
        window = self.item_embeddings(batch["history"][:, -self.config.window:])  # [B, L, d]
        return torch.cat([self.sequence_embedding(window), self.user_embeddings(batch["user"])], dim=1)

    def calculate_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return next_item_loss(self.user_state(batch), batch["target"], self.output_item_embeddings.weight,
                              self.config.loss, self.n_items,
                              exclude=torch.cat([batch["history"], batch["target"][:, None]], dim=1),
                              item_bias=self.output_item_bias)

    def full_sort_predict(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.user_state(batch) @ self.output_item_embeddings.weight.T + self.output_item_bias  # [B, n + 1]
