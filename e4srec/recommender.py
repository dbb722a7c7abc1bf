"""The one interface every model implements, E4SRec included (RecBole's split of the model).

A model declares which training batches it wants (``training_input``) and implements two methods:

- ``calculate_loss(batch) -> scalar``: one training step's loss;
- ``full_sort_predict(batch) -> [B, n_items + 1]``: scores of every item (column 0 is padding).

Batches are dicts of tensors. Every batch has ``user`` [B] (row index into the dataset). Then:

- ``training_input == "sequences"``: ``sequence`` [B, max_len + 1], the last training items of each
  user, left-padded with 0 (inputs ``[:, :-1]``, next-item targets ``[:, 1:]``);
- ``training_input == "examples"``: ``history`` [B, max_len] left-padded and ``target`` [B];
- ``training_input == "none"``: the model is fitted by ``fit(data)`` alone (POP).

``fit(data)`` runs once before training and ``on_epoch_start(data, epoch)`` before each epoch, both
on the model's device; randomness inside them must come from torch's seeded global generator.
The constructor is ``Model(n_items, n_users, max_len, config)`` with ``config`` an instance of the
model's ``config_class`` dataclass (defaults follow the original paper).

Scoring batches have ``user`` and ``history`` [B, max_len] (left-padded, last item most recent).
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import nn

from .data import SequenceData


class Recommender(nn.Module):
    """Base class: subclasses set ``training_input`` and implement the two methods."""

    training_input: ClassVar[str] = "sequences"
    config_class: ClassVar[type] = type(None)  # the model's hyperparameter dataclass

    def __init__(self, n_items: int, n_users: int, max_len: int):
        super().__init__()
        self.n_items, self.n_users, self.max_len = n_items, n_users, max_len

    def fit(self, data: SequenceData) -> None:
        """Optional set-up from the training data before any step (statistics, vocabularies)."""

    def on_epoch_start(self, data: SequenceData, epoch: int) -> None:
        """Optional per-epoch work before the epoch's steps (ICLRec's intent clustering)."""

    def trim_batch(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A training batch on the host, before it goes to the device: a model may cut padding here
        that it would otherwise have to find on the device (a host sync every step). Default: as is."""
        return batch

    def calculate_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> float:
        """How many terms the loss on ``batch`` is the mean of: its users, unless a model says otherwise.
        The trainer weights the slices of a batch split across processes (DDP) or micro-batches by it, so
        that their gradients add up to the whole batch's mean loss (exactly when this count is right)."""
        return len(batch["user"])

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss: ``forward`` so that distributed wrappers synchronise gradients."""
        return self.calculate_loss(batch)

    def full_sort_predict(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


def xavier_init(module: nn.Module) -> None:
    """Xavier-normal weights for linear and embedding layers, zero biases (the paper's baselines)."""
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Embedding)):
            nn.init.xavier_normal_(sub.weight)
            if isinstance(sub, nn.Embedding) and sub.padding_idx is not None:
                with torch.no_grad():
                    sub.weight[sub.padding_idx].zero_()
        if isinstance(sub, nn.Linear) and sub.bias is not None:
            nn.init.zeros_(sub.bias)
