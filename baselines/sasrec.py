"""SASRec: self-attentive sequential recommendation.

Paper: Wang-Cheng Kang and Julian McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018.
Reference implementation followed: the authors' TensorFlow code (github.com/kang205/SASRec) as
ported to PyTorch by pmixer (SASRec.pytorch), which is also the SASRec whose item embeddings the
E4SRec authors feed their LLM (HestiaSky/E4SRec ``baseline/model.py``): pre-norm blocks where the
layer-normed query feeds the attention residual, a ReLU point-wise feed-forward of width d,
embeddings scaled by sqrt(d), a final layer norm, item embeddings shared between input and output,
binary cross-entropy with one sampled negative at every position of the sequence.

Defaults (the original paper for the sparse Amazon data, the E4SRec paper's embedding size): d=64
(E4SRec: "embedding size 64"; SASRec used 50), 2 blocks, 1 head, dropout 0.5 (also on the attention
weights), max length 50 (from the data), Adam lr 1e-3; batch 128 in the paper, 256 here (see
``TRAIN_DEFAULTS``), Xavier-normal init as the E4SRec code does.

Deliberate deviations:
- ``loss="ce"`` (softmax cross-entropy over all items, what E4SRec itself uses) is available as the
  loss fairness switch; the default stays the original ``"bce"``.
- Negatives: one per position, uniform over items, redrawn when they hit the user's training
  sequence (the original draws until it misses the user's whole item set; the E4SRec code draws
  before the split). Drawn with torch's global generator, vectorised.
- Attention masks (not the timeline mask multiplication) keep padding out: padding keys are hidden
  and a padding query attends only to itself, so real positions are exactly as in the original.
- Adam betas are the trainer's (0.9, 0.999); the E4SRec code uses (0.9, 0.98) and a step decay.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from e4srec.recommender import Recommender, xavier_init

from .common import (ACTIVATIONS, LOSSES, SelfAttentiveEncoder, check_choice, check_fraction, encode_by_width,
                     last_hidden, next_item_loss, score_all_items)

# TrainConfig fields the workflow should use for this model (the paper's Adam lr; batch 256).
TRAIN_DEFAULTS = {"learning_rate": 1e-3, "batch_size": 256, "weight_decay": 0.0, "epochs": 200, "patience": 10}


@dataclasses.dataclass
class SASRecConfig:
    hidden_size: int = 64  # item embedding size d (the E4SRec paper: 64 for every baseline)
    n_layers: int = 2  # self-attention blocks
    n_heads: int = 1
    inner_size: int = 64  # point-wise feed-forward width (SASRec: d)
    dropout: float = 0.5  # embedding, feed-forward and attention-output dropout (Beauty: 0.5)
    attention_dropout: float = 0.5  # dropout on the attention weights (the original uses the same rate)
    activation: str = "relu"  # relu | gelu
    norm_first: bool = True  # SASRec's pre-norm layout; False: BERT's post-norm layout
    layer_norm_eps: float = 1e-8
    loss: str = "bce"  # bce (one sampled negative per position, the original) | ce (all items)

    def __post_init__(self):
        check_choice("loss", self.loss, LOSSES)
        check_choice("activation", self.activation, ACTIVATIONS)
        check_fraction("dropout", self.dropout)
        check_fraction("attention_dropout", self.attention_dropout)
        if self.hidden_size % self.n_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be a multiple of n_heads {self.n_heads}")


class SASRec(Recommender):
    """Causal self-attention over the item sequence; the state at each position predicts the next item.

    Subclasses (S3-Rec, CL4SRec, ICLRec) reuse the encoder and next-item loss; ``extra_tokens``
    adds rows after item ``n_items`` to the item table (a [mask] token), never scored.
    """

    training_input = "sequences"
    config_class = SASRecConfig
    extra_tokens = 0

    def __init__(self, n_items: int, n_users: int, max_len: int, config: SASRecConfig | None = None):
        super().__init__(n_items, n_users, max_len)
        self.config = config = config if config is not None else self.config_class()
        self.item_embeddings = nn.Embedding(n_items + 1 + self.extra_tokens, config.hidden_size, padding_idx=0)
        self.encoder = SelfAttentiveEncoder(
            max_len, config.hidden_size, config.n_layers, config.n_heads, config.inner_size, config.dropout,
            config.attention_dropout, config.activation, config.norm_first, config.layer_norm_eps)
        xavier_init(self)

    @property
    def mask_id(self) -> int:
        """The [mask] token id (only where ``extra_tokens`` provides one)."""
        return self.n_items + 1

    def encode(self, items: torch.Tensor, causal: bool = True) -> torch.Tensor:
        """items [B, L] left-padded -> hidden states [B, L, d] (zeros at trimmed padding columns)."""
        return encode_by_width(lambda part: self.encoder(self.item_embeddings(part), part, causal), items)

    def sequence_loss(self, hidden: torch.Tensor, sequence: torch.Tensor) -> torch.Tensor:
        """Next-item loss at every non-padding target: hidden [B, L, d] from ``sequence[:, :-1]``."""
        targets = sequence[:, 1:]  # [B, L]
        rows, columns = torch.nonzero(targets, as_tuple=True)  # [N] positions with a target
        return next_item_loss(hidden[rows, columns], targets[rows, columns], self.item_embeddings.weight,
                              self.config.loss, self.n_items, exclude=sequence[rows])

    def calculate_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        sequence = batch["sequence"]  # [B, L + 1]
        return self.sequence_loss(self.encode(sequence[:, :-1]), sequence)

    def full_sort_predict(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        user_state = last_hidden(self.encode(batch["history"]))  # [B, d]
        return score_all_items(user_state, self.item_embeddings.weight, self.n_items)  # [B, n_items + 1]

    @torch.no_grad()
    def export_item_embeddings(self) -> torch.Tensor:
        """[n_items + 1, d] item embeddings (row 0 padding, zero): E4SRec's frozen input table."""
        table = self.item_embeddings.weight[:self.n_items + 1].detach().float().cpu().clone()
        table[0] = 0.0
        return table
