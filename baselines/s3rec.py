"""S3-Rec with the mask-item-prediction (MIP) pretraining objective only, then next-item fine-tuning.

Paper: Kun Zhou, Hui Wang, Wayne Xin Zhao, Yutao Zhu, Sirui Wang, Fuzheng Zhang, Zhongyuan Wang and
Ji-Rong Wen, "S3-Rec: Self-Supervised Learning for Sequential Recommendation with Mutual Information
Maximization", CIKM 2020. The E4SRec paper runs S3-Rec "with the mask item prediction objective
only" (no attributes). Reference implementation followed: the authors' code
(github.com/RUCAIBox/CIKM2020-S3Rec, ``models.py``/``trainers.py``): a post-norm BERT-style encoder
(GELU, width 4d, dropout 0.5 on hidden states and attention), pretraining with bidirectional
attention where masked items (probability 0.2, a [mask] token) are scored by
sigmoid((W_mip h_t) . e_item) against one sampled negative item (binary cross-entropy), then
fine-tuning the same encoder causally as SASRec with binary cross-entropy and one negative per
position; item embeddings are shared throughout.

Defaults: d=64, 2 layers, 2 heads, dropout 0.5, mask probability 0.2, pretraining Adam lr 1e-3,
batch 256; fine-tuning lr 1e-3, batch 256 (``TRAIN_DEFAULTS``); loss "bce" (the authors').

Deliberate deviations:
- ``pretrain_epochs`` defaults to 10 (the authors pretrain for up to 300 epochs with all four
  objectives): MIP alone on Beauty-sized data changes little after a few epochs, and the suite's
  budget is the fine-tuning. Set it higher in the config for a closer reproduction.
- Pretraining sees each user's last max_len training items once per epoch (the authors slice every
  user into all prefixes); masking is redrawn every epoch, so prefixes add little.
- The MIP loss is the mean over masked positions (the authors sum; only Adam's scale differs).
- Pretraining runs inside ``fit(data)`` with its own Adam optimizer, on the model's device, with
  torch's global generator (seeded by the trainer) for shuffling, masks and negatives. It is not
  resumable by itself: a resumed run pretrains again and then loads the fine-tuning checkpoint.
- ``loss="ce"`` (softmax over all items) is the fairness switch's other side for fine-tuning; the
  MIP pretraining keeps its binary cross-entropy.
"""
from __future__ import annotations

import dataclasses
import logging

import torch
import torch.nn.functional as F
from torch import nn

from e4srec.data import SequenceData

from .common import sample_negatives
from .sasrec import SASRec, SASRecConfig

log = logging.getLogger(__name__)

TRAIN_DEFAULTS = {"learning_rate": 1e-3, "batch_size": 256, "weight_decay": 0.0, "epochs": 200, "patience": 10}


@dataclasses.dataclass
class S3RecConfig(SASRecConfig):
    n_heads: int = 2
    inner_size: int = 256  # 4 * hidden_size
    activation: str = "gelu"
    norm_first: bool = False  # BERT post-norm layout (the authors' encoder)
    layer_norm_eps: float = 1e-12
    mask_ratio: float = 0.2  # MIP masking probability (mask_p)
    pretrain_epochs: int = 10  # MIP epochs run inside fit(); 0 skips pretraining (plain SASRec-like)
    pretrain_batch_size: int = 256
    pretrain_learning_rate: float = 1e-3

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio!r}")
        if self.pretrain_epochs < 0 or self.pretrain_batch_size < 1 or self.pretrain_learning_rate <= 0:
            raise ValueError("pretrain_epochs must be >= 0, pretrain_batch_size >= 1, pretrain_learning_rate > 0")


class S3Rec(SASRec):
    config_class = S3RecConfig
    extra_tokens = 1  # [mask] = n_items + 1

    def __init__(self, n_items: int, n_users: int, max_len: int, config: S3RecConfig | None = None):
        super().__init__(n_items, n_users, max_len, config)
        self.mip_proj = nn.Linear(self.config.hidden_size, self.config.hidden_size)  # W_mip
        nn.init.xavier_normal_(self.mip_proj.weight)
        nn.init.zeros_(self.mip_proj.bias)

    def mip_loss(self, items: torch.Tensor) -> torch.Tensor:
        """Mask-item-prediction loss of a batch of left-padded sequences ``items`` [B, L]."""
        masked = (torch.rand(items.shape, device=items.device) < self.config.mask_ratio) & (items != 0)
        hidden = self.encode(torch.where(masked, torch.full_like(items, self.mask_id), items), causal=False)
        rows, columns = torch.nonzero(masked, as_tuple=True)
        if rows.numel() == 0:
            return hidden.sum() * 0.0
        targets = items[rows, columns]  # [N]
        negatives = sample_negatives(targets.shape, self.n_items, items.device, exclude=items[rows])
        projected = self.mip_proj(hidden[rows, columns])  # [N, d]
        table = self.item_embeddings.weight
        logits = torch.stack([(projected * table[targets]).sum(-1), (projected * table[negatives]).sum(-1)], 1)
        logits = logits.float()
        return (F.softplus(-logits[:, 0]) + F.softplus(logits[:, 1])).mean()

    def fit(self, data: SequenceData) -> None:
        """MIP pretraining on every user's last max_len training items (before next-item training).

        W_mip serves only pretraining: it is frozen afterwards (no unused trainable parameters in
        fine-tuning, which distributed training would reject; it is not in the checkpoints).
        """
        if self.config.pretrain_epochs > 0:
            self.pretrain(data)
        self.mip_proj.requires_grad_(False)

    def pretrain(self, data: SequenceData) -> None:
        device = self.item_embeddings.weight.device
        sequences = torch.from_numpy(data.training_sequences()[:, 1:])  # [U, L]
        sequences = sequences[(sequences != 0).any(1)].to(device)
        optimizer = torch.optim.Adam(self.parameters(), lr=self.config.pretrain_learning_rate)
        was_training = self.training
        self.train()
        for epoch in range(self.config.pretrain_epochs):
            order = torch.randperm(len(sequences), device=device)
            total, steps = 0.0, 0
            for start in range(0, len(order), self.config.pretrain_batch_size):
                loss = self.mip_loss(sequences[order[start:start + self.config.pretrain_batch_size]])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total, steps = total + loss.detach(), steps + 1
            log.info("S3-Rec MIP pretraining epoch %d: loss %.4f", epoch, float(total) / max(steps, 1))
        self.train(was_training)
