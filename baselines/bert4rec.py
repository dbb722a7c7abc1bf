"""BERT4Rec: bidirectional self-attention trained with the Cloze (masked item) task.

Paper: Fei Sun, Jun Liu, Jian Wu, Changhua Pei, Xiao Lin, Wenwu Ou and Peng Jiang, "BERT4Rec:
Sequential Recommendation with Bidirectional Encoder Representations from Transformer", CIKM 2019.
Reference implementation followed: RecBole's ``bert4rec.py`` (itself after the authors' TensorFlow
code, github.com/FeiSun/BERT4Rec): post-norm BERT blocks with GELU, a [mask] token after the last
item id, the loss only at masked positions, prediction by appending [mask] after the history.

Defaults (the paper, Beauty): d=64, 2 layers, 2 heads, feed-forward 4d=256, dropout 0.1, mask
proportion rho=0.6 (the paper's best for Beauty), max length 50, cross-entropy over all items at
the masked positions (the paper's softmax). The paper's output layer is kept:
score(v) = GELU(h W + b) . e_v + b_v with the input item embeddings e shared.
The paper also trains on samples that mask only the last item (to match prediction, where [mask]
follows the history); here a sequence is such a sample with probability ``last_item_mask_prob``
= 0.5 (RecBole's ``ft_ratio`` default; the paper gives no proportion).

Deliberate deviations:
- Batches are the trainer's ``sequences``: each user's last max_len + 1 training items, of which
  the last max_len are the Cloze input, masked afresh every epoch (the authors pre-generate 10
  masked copies per user with a sliding window; RecBole masks on the fly as here).
- Masked positions are drawn independently with probability rho per item (the authors draw exactly
  round(rho * n)); a sequence may get no masked position and then adds nothing to the loss.
- ``loss="bce"`` (one sampled negative per masked position) is the fairness switch's other side.
- Learning rate 1e-3 (``TRAIN_DEFAULTS``, as RecBole) instead of the paper's 1e-4 with 400k steps:
  the suite's trainer stops early on validation NDCG@10, and 1e-4 does not converge in its budget.
  Weight decay 0.01 as in the paper (decoupled AdamW, as BERT's own optimizer).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from e4srec.recommender import Recommender, xavier_init

from .common import (ACTIVATIONS, LOSSES, SelfAttentiveEncoder, check_choice, check_fraction, encode_by_width,
                     next_item_loss, score_all_items)

TRAIN_DEFAULTS = {"learning_rate": 1e-3, "batch_size": 256, "weight_decay": 0.01, "epochs": 200, "patience": 10}


class ItemScorer(nn.Module):
    """BERT4Rec's output layer: GELU(h W + b) -> layer norm, then a dot product with the shared item
    embeddings plus a per-item bias."""

    def __init__(self, hidden_size: int, n_rows: int, layer_norm_eps: float):
        super().__init__()
        self.transform = nn.Linear(hidden_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.item_bias = nn.Parameter(torch.zeros(n_rows))  # [n_items + 2]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(F.gelu(self.transform(hidden)))


@dataclasses.dataclass
class BERT4RecConfig:
    hidden_size: int = 64
    n_layers: int = 2
    n_heads: int = 2
    inner_size: int = 256  # 4 * hidden_size
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation: str = "gelu"
    layer_norm_eps: float = 1e-12
    mask_ratio: float = 0.6  # rho, the Cloze masking probability (the paper's Beauty value)
    last_item_mask_prob: float = 0.5  # share of sequences whose only masked item is the last one
    loss: str = "ce"  # ce (softmax over all items at masked positions, the paper) | bce

    def __post_init__(self):
        check_choice("loss", self.loss, LOSSES)
        check_choice("activation", self.activation, ACTIVATIONS)
        for name in ("dropout", "attention_dropout", "last_item_mask_prob"):
            check_fraction(name, getattr(self, name))
        check_fraction("mask_ratio", self.mask_ratio, low_open=True)


class BERT4Rec(Recommender):
    training_input = "sequences"
    config_class = BERT4RecConfig

    def __init__(self, n_items: int, n_users: int, max_len: int, config: BERT4RecConfig | None = None):
        super().__init__(n_items, n_users, max_len)
        self.config = config = config if config is not None else BERT4RecConfig()
        self.mask_id = n_items + 1
        self.item_embeddings = nn.Embedding(n_items + 2, config.hidden_size, padding_idx=0)  # + [mask]
        self.encoder = SelfAttentiveEncoder(
            max_len, config.hidden_size, config.n_layers, config.n_heads, config.inner_size, config.dropout,
            config.attention_dropout, config.activation, norm_first=False, layer_norm_eps=config.layer_norm_eps)
        self.item_scorer = ItemScorer(config.hidden_size, n_items + 2, config.layer_norm_eps)
        xavier_init(self)

    def encode(self, items: torch.Tensor) -> torch.Tensor:
        """items [B, L] (with [mask] tokens) -> bidirectional hidden states [B, L, d]."""
        return encode_by_width(lambda part: self.encoder(self.item_embeddings(part), part, causal=False), items)

    def cloze_mask(self, items: torch.Tensor) -> torch.Tensor:
        """[B, L] bool: the positions to mask (random with rho, or only the last item)."""
        real = items != 0
        random_mask = (torch.rand(items.shape, device=items.device) < self.config.mask_ratio) & real
        last_only = torch.zeros_like(real)
        last_only[:, -1] = real[:, -1]
        choose_last = torch.rand(items.shape[0], 1, device=items.device) < self.config.last_item_mask_prob
        return torch.where(choose_last, last_only, random_mask)

    def calculate_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        items = batch["sequence"][:, 1:]  # [B, L]: the last max_len training items
        masked = self.cloze_mask(items)
        hidden = self.encode(torch.where(masked, torch.full_like(items, self.mask_id), items))  # [B, L, d]
        rows, columns = torch.nonzero(masked, as_tuple=True)
        if rows.numel() == 0:  # no position masked in the whole batch (tiny data): a zero loss with a graph
            return hidden.sum() * 0.0
        return next_item_loss(self.item_scorer(hidden[rows, columns]), items[rows, columns],
                              self.item_embeddings.weight, self.config.loss, self.n_items,
                              exclude=items[rows], item_bias=self.item_scorer.item_bias)

    def full_sort_predict(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        history = batch["history"]  # [B, L]
        mask_column = torch.full_like(history[:, :1], self.mask_id)
        items = torch.cat([history[:, 1:], mask_column], dim=1)  # drop the oldest, append [mask]
        user_state = self.item_scorer(self.encode(items)[:, -1])  # [B, d]
        return score_all_items(user_state, self.item_embeddings.weight, self.n_items) \
            + self.item_scorer.item_bias[:self.n_items + 1]
