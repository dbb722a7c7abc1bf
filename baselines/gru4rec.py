"""GRU4Rec: a recurrent network over the item sequence.

Paper: Balazs Hidasi, Alexandros Karatzoglou, Linas Baltrunas and Domonkos Tikk, GRU4Rec, ICLR 2016
(arXiv:1511.06939). Reference implementation followed:
RecBole's ``gru4rec.py`` (the usual GRU4Rec baseline of sequential recommendation papers, S3-Rec's
and ICLRec's included): item embeddings -> dropout -> GRU -> a dense layer back to the embedding
size -> dot product with the (shared) item embeddings, cross-entropy over all items.

Defaults (RecBole's, with the E4SRec paper's embedding size): embedding 64, GRU hidden size 128,
1 layer, embedding dropout 0.3, loss "ce" (softmax over all items, as RecBole; the paper's ranking
losses TOP1/BPR over in-batch negatives are not reproduced: "bce" with one uniform negative is
the fairness switch's other side), Adam lr 1e-3, batch 256.

Deliberate deviations:
- Trained on the suite's ``sequences`` batches: the GRU reads each user's last max_len training
  items and predicts the next item at every position (the paper's parallel mini-batches over click
  sequences do the same per sequence; RecBole trains on one (prefix, next item) pair per example, whose
  gradients this covers in one pass).
- The suite's batches are left-padded; the GRU needs the padding after the items (a GRU's state
  moves even on zero inputs), so rows are grouped by length, trimmed, moved to the front (a gather
  on the device), run, and their states moved back under their items.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from e4srec.recommender import Recommender, xavier_init

from .common import (LOSSES, Dropout, check_choice, check_fraction, encode_by_width, next_item_loss,
                     score_all_items)

TRAIN_DEFAULTS = {"learning_rate": 1e-3, "batch_size": 256, "weight_decay": 0.0, "epochs": 200, "patience": 10}


def align_left(items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded [B, L] -> (items moved to the front, padding after them [B, L]; lengths [B])."""
    length = items.shape[1]
    lengths = (items != 0).sum(1)
    shift = (torch.arange(length, device=items.device)[None, :] + (length - lengths)[:, None]) % length
    return items.gather(1, shift), lengths


@dataclasses.dataclass
class GRU4RecConfig:
    hidden_size: int = 64  # item embedding size (the E4SRec paper: 64)
    gru_hidden_size: int = 128
    n_layers: int = 1
    dropout: float = 0.3  # on the input embeddings
    loss: str = "ce"  # ce (RecBole's) | bce

    def __post_init__(self):
        check_choice("loss", self.loss, LOSSES)
        check_fraction("dropout", self.dropout)


class GRU4Rec(Recommender):
    training_input = "sequences"
    config_class = GRU4RecConfig

    def __init__(self, n_items: int, n_users: int, max_len: int, config: GRU4RecConfig | None = None):
        super().__init__(n_items, n_users, max_len)
        self.config = config = config if config is not None else GRU4RecConfig()
        self.item_embeddings = nn.Embedding(n_items + 1, config.hidden_size, padding_idx=0)
        self.embedding_dropout = Dropout(config.dropout)
        self.gru = nn.GRU(config.hidden_size, config.gru_hidden_size, config.n_layers, batch_first=True)
        self.output_proj = nn.Linear(config.gru_hidden_size, config.hidden_size)
        xavier_init(self)
        for name, weight in self.gru.named_parameters():  # Xavier for the recurrent weights too
            (nn.init.xavier_uniform_ if "weight" in name else nn.init.zeros_)(weight)

    def encode(self, items: torch.Tensor) -> torch.Tensor:
        """items [B, L] left-padded -> states [B, L, d] at the same positions (padding ones unused)."""
        return encode_by_width(self.encode_window, items)

    def encode_window(self, items: torch.Tensor) -> torch.Tensor:
        """[b, w] left-padded -> [b, w, d]: the GRU runs on the items moved to the front."""
        aligned, lengths = align_left(items)
        output, _ = self.gru(self.embedding_dropout(self.item_embeddings(aligned)))  # [b, w, h]
        width = items.shape[1]
        back = (torch.arange(width, device=items.device)[None, :] - (width - lengths)[:, None]) % width
        return self.output_proj(output.gather(1, back[..., None].expand(-1, -1, output.shape[-1])))

    def calculate_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        sequence = batch["sequence"]  # [B, L + 1]
        hidden = self.encode(sequence[:, :-1])  # [B, L, d]
        targets = sequence[:, 1:]
        rows, columns = torch.nonzero(targets, as_tuple=True)
        return next_item_loss(hidden[rows, columns], targets[rows, columns], self.item_embeddings.weight,
                              self.config.loss, self.n_items, exclude=sequence[rows])

    def full_sort_predict(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        user_state = self.encode(batch["history"])[:, -1]  # [B, d] at the most recent item
        return score_all_items(user_state, self.item_embeddings.weight, self.n_items)
