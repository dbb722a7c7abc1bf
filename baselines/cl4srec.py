"""CL4SRec: contrastive learning for sequential recommendation.

Paper: Xu Xie, Fei Sun, Zhaoyang Liu, Shiwen Wu, Jinyang Gao, Jiandong Zhang, Bolin Ding and Bin Cui,
"Contrastive Learning for Sequential Recommendation", ICDE 2022 (arXiv 2010.14395, 2020). The
authors released no code. Reference implementations followed: the CL4SRec of the RecBole-based
DuoRec code (github.com/RuihongQiu/DuoRec) and the instance-contrastive part of the ICLRec code
(github.com/salesforce/ICLRec), which both run it as a baseline on these four datasets.

The model is SASRec's encoder (here in the BERT post-norm layout of those codes: GELU, width 4d,
dropout 0.5) trained on next-item prediction plus lambda times a contrastive loss: two views of each
training sequence, each made by one operator drawn uniformly from crop (keep a random contiguous
eta-fraction), mask (replace a gamma-fraction by a [mask] token) and reorder (shuffle a random
contiguous beta-fraction); their user representations (the state at the last position) are pulled
together against the 2(B-1) other views of the batch (NT-Xent, dot-product similarity,
temperature tau).

Defaults: d=64, 2 layers, 2 heads, dropout 0.5, eta=0.6, gamma=0.3, beta=0.6 (the proportions of
the paper's illustrations of the operators; the paper tunes them per dataset, so tune them on the
validation item), lambda=0.1, tau=1.0, lr 1e-3, batch 256, loss "ce": the paper's main loss is a
softmax over the next item, which the RecBole-based DuoRec code computes over all items (``"bce"``
is the fairness switch's other side).

Deliberate deviations:
- The next-item loss is taken at every position of the sequence (the ``sequences`` batches of the
  suite, as in the ICLRec code); RecBole trains on one (prefix, next item) pair per example.
- Augmentations are drawn on the device for the whole batch at once (vectorised) with torch's
  global generator; the operators are those of the paper, with crop keeping at least one item.
"""
from __future__ import annotations

import dataclasses

import torch

from .common import augment_sequences, check_fraction, info_nce, last_hidden
from .sasrec import SASRec, SASRecConfig

TRAIN_DEFAULTS = {"learning_rate": 1e-3, "batch_size": 256, "weight_decay": 0.0, "epochs": 200, "patience": 10}


@dataclasses.dataclass
class CL4SRecConfig(SASRecConfig):
    n_heads: int = 2
    inner_size: int = 256
    activation: str = "gelu"
    norm_first: bool = False
    layer_norm_eps: float = 1e-12
    loss: str = "ce"
    crop_ratio: float = 0.6  # eta
    mask_ratio: float = 0.3  # gamma
    reorder_ratio: float = 0.6  # beta
    cl_weight: float = 0.1  # lambda
    temperature: float = 1.0  # tau

    def __post_init__(self):
        super().__post_init__()
        check_fraction("crop_ratio", self.crop_ratio, low_open=True)
        check_fraction("mask_ratio", self.mask_ratio)
        check_fraction("reorder_ratio", self.reorder_ratio)
        if self.temperature <= 0 or self.cl_weight < 0:
            raise ValueError("temperature must be > 0 and cl_weight >= 0")


class CL4SRec(SASRec):
    config_class = CL4SRecConfig
    extra_tokens = 1  # [mask] = n_items + 1

    def augment(self, items: torch.Tensor) -> torch.Tensor:
        """One random crop/mask/reorder view of each left-padded sequence [B, L]."""
        c = self.config
        return augment_sequences(items, self.mask_id, c.crop_ratio, c.mask_ratio, c.reorder_ratio)

    def calculate_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        sequence = batch["sequence"]  # [B, L + 1]
        inputs = sequence[:, :-1]
        loss = self.sequence_loss(self.encode(inputs), sequence)
        if self.config.cl_weight:
            views = self.encode(torch.cat([self.augment(inputs), self.augment(inputs)]))  # [2B, L, d]
            first, second = last_hidden(views).chunk(2)  # [B, d] each
            loss = loss + self.config.cl_weight * info_nce(first, second, self.config.temperature)
        return loss
