"""Extensibility (a), measured: new items added to a trained E4SRec by extending only its item table
and its item scorer (no LLM, no LoRA, no input projection training).

The paper (RQ5) only argues that a new item needs one new row in the frozen input item table E and
one in the item scorer W_out. :func:`run_new_items` measures it:

1. **New items**: a seeded random ``fraction`` (5%) of the item ids (:func:`choose_new_items`).
2. **Withheld data** (:class:`WithheldData`): every user's *training part* with the new items'
   interactions deleted; the validation and test items and the histories they are predicted from
   stay as they are (a history may hold new items). Stage 1 (SASRec) and stage 3 (E4SRec) train on
   it with the settings of the default runs and the same seeds, so they start from the same
   initial weights as the default runs.
   The new items are withheld from *all* training, negatives included: :class:`WithheldSASRec`
   draws its negatives (BCE) or takes its softmax (CE) over the old items only, and
   :class:`WithheldE4SRec` leaves the new items out of the cross-entropy's softmax (their scores
   are -inf in training). Without this the new rows would be trained as "never the next item"
   (pushed down), not untrained. After training their rows are reset to their initial values
   (AdamW's weight decay shrinks rows even without a gradient), so the withheld model holds
   exactly untrained rows for the new items. Epochs are selected on the validation item of every
   user, like every run of the suite (the ~5% of users whose validation item is new are ranked
   with untrained rows by every epoch).
3. **Extension**, LLM, LoRA and input projection untouched:

   a. item table (:func:`extend_item_table`): the withheld SASRec with only its new items' rows
      trainable (:class:`RowTable`: old rows are a frozen buffer, so they stay bit-identical
      whatever the optimizer does; every other SASRec weight frozen) trains on the FULL training
      data through the suite's trainer (a few epochs, validation-selected); its table is exported.
   b. item scorer (:func:`extend_item_scorer`): with the withheld E4SRec and the extended table,
      the last hidden states of every FULL training example and of every validation history are
      computed once (no grad); then only the new items' rows of ``item_scorer`` train, with the
      cross-entropy over all items on the cached states (exact, and cheap: the old items'
      log-sum-exp and target logits are constants computed once), selected on validation
      NDCG@10 (full ranking, the suite's evaluator).

   The input projection *does* see the new table rows: histories at evaluation (and the FULL
   training examples of step b) may contain new items, which go through the extended table and
   the frozen projection.
4. **Comparison** through the suite's evaluator (full ranking, history not masked, the configured
   tie policy) of (i) the withheld model before the extension, (ii) the extended model, (iii) the
   model retrained on the full data (the default E4SRec run of the same seed, or trained here),
   for the users whose target item is new, the others, and all, on the test and the validation
   item; HR@10 and NDCG@10 (:func:`comparison_rows`). Timings: the extension against retraining
   (the default runs' training, and the withheld trainings of this job as a same-machine proxy).

Outputs (the work folder): the new items (``new_items.json``), the withheld runs (SASRec table;
E4SRec ranks and components), the extended table and the extended model's components and ranks;
the tables are written by :func:`write_new_items_tables` (JSON, CSV, Markdown).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from baselines.common import next_item_loss
from baselines.sasrec import SASRec

from . import provenance
from .data import SequenceData
from .evaluate import rank_all, rank_split
from .files import InputError, load_tensors, read_json, save_tensors, sha256_file, write_json, write_parquet, write_text
from .metrics import hit_rate, ndcg
from .model import E4SRec
from .trainer import TrainConfig, check_device, make_accelerator, train

log = logging.getLogger(__name__)

MODELS = ("withheld", "extended", "retrained")
MODEL_LABELS = {"withheld": "withheld (before extension)", "extended": "extended (table + scorer rows)",
                "retrained": "retrained on full data"}
GROUPS = ("new item", "old item", "all")
METRICS = (("HR", 10), ("NDCG", 10))
MARKER = "new_items.json"  # marks a work folder written here (the only kind this module deletes)


# ----------------------------------------------------------------------------------------------
# New items and the withheld data


def choose_new_items(n_items: int, fraction: float, seed: int) -> np.ndarray:
    """A seeded uniform sample of round(fraction * n_items) item ids (sorted), the "new" items."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
        raise InputError(f"new items: fraction must be in (0, 1), got {fraction!r}")
    count = int(round(fraction * n_items))
    if count < 1 or n_items - count < 1:
        raise InputError(f"new items: {n_items} items are too few for fraction {fraction} "
                         f"({count} new, {n_items - count} old): need at least one of each")
    rng = np.random.default_rng([int(seed), 5])
    return np.sort(rng.choice(np.arange(1, n_items + 1), size=count, replace=False)).astype(np.int64)


def ids_sha256(ids: Sequence[int]) -> str:
    """sha256 of the ids written as ascending decimal integers joined by ``,`` (e.g. ``3,17,42``)."""
    return hashlib.sha256(",".join(str(int(i)) for i in sorted(ids)).encode()).hexdigest()


def item_mask(n_items: int, items: Sequence[int]) -> np.ndarray:
    """[n_items + 1] bool, True at ``items`` (row 0, padding, is never an item)."""
    mask = np.zeros(n_items + 1, dtype=bool)
    mask[np.asarray(items, dtype=np.int64)] = True
    return mask


@dataclasses.dataclass
class WithheldData(SequenceData):
    """A dataset whose training parts lack the ``new_items``; validation and test items and the
    histories used at evaluation (:meth:`histories`) are those of the full data."""

    new_items: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __post_init__(self):
        self.new_items = np.asarray(self.new_items, dtype=np.int64)
        if len(self.new_items) and (self.new_items.min() < 1 or self.new_items.max() > self.n_items):
            raise InputError(f"{self.name}: new items must be ids 1..{self.n_items}")
        self._is_new = item_mask(self.n_items, self.new_items)

    @classmethod
    def from_data(cls, data: SequenceData, new_items: Sequence[int]) -> "WithheldData":
        fields = {f.name: getattr(data, f.name) for f in dataclasses.fields(SequenceData)}
        return cls(**fields, new_items=np.asarray(new_items, dtype=np.int64))

    def train_part(self, user_index: int) -> np.ndarray:
        part = self.sequences[user_index][:-2]
        return part[~self._is_new[part]]

    def removed_interactions(self) -> int:
        """Interactions with new items deleted from the training parts."""
        return int(sum(self._is_new[seq[:-2]].sum() for seq in self.sequences))


# ----------------------------------------------------------------------------------------------
# Models that never train on the new items


class WithheldSASRec(SASRec):
    """SASRec whose loss knows only the old items: BCE negatives are drawn from them and the CE
    softmax runs over them (through a compacted view of the table), so the new items' rows get no
    gradient at all. Scoring (validation, export) uses the whole table."""

    def __init__(self, n_items: int, n_users: int, max_len: int, config=None, new_items: Sequence[int] = ()):
        super().__init__(n_items, n_users, max_len, config)
        is_new = torch.from_numpy(item_mask(n_items, new_items))
        old = torch.nonzero(~is_new[1:]).squeeze(1) + 1
        compact = torch.zeros(n_items + 1, dtype=torch.long)  # original id -> 1..n_old; new items and padding -> 0
        compact[old] = torch.arange(1, len(old) + 1)
        self.n_old = len(old)
        self.register_buffer("_old_ids", torch.cat([torch.zeros(1, dtype=torch.long), old]), persistent=False)
        self.register_buffer("_compact", compact, persistent=False)

    def sequence_loss(self, hidden: torch.Tensor, sequence: torch.Tensor) -> torch.Tensor:
        targets = sequence[:, 1:]
        rows, columns = torch.nonzero(targets, as_tuple=True)
        table = self.item_embeddings.weight[self._old_ids]  # [n_old + 1, d], row 0 padding
        return next_item_loss(hidden[rows, columns], self._compact[targets[rows, columns]], table, self.config.loss,
                              self.n_old, exclude=self._compact[sequence[rows]])


class WithheldE4SRec(E4SRec):
    """E4SRec whose training loss leaves the new items out of the softmax (their scores are -inf in
    training mode only), so their item scorer rows get no gradient. Scoring is E4SRec's."""

    def __init__(self, *args, new_items: Sequence[int] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("_withheld", torch.from_numpy(item_mask(self.n_items, new_items)), persistent=False)

    def item_scores(self, hidden: torch.Tensor) -> torch.Tensor:
        scores = super().item_scores(hidden)
        return scores.masked_fill(self._withheld, float("-inf")) if self.training else scores


class RowTable(nn.Module):
    """An item table whose ``rows`` are a trainable parameter and every other row a frozen buffer.

    Stands in for ``nn.Embedding``: ``weight`` is the whole table, calling it looks ids up."""

    def __init__(self, table: torch.Tensor, rows: Sequence[int]):
        super().__init__()
        self.register_buffer("frozen", table.detach().clone())
        self.register_buffer("rows", torch.as_tensor(np.asarray(rows), dtype=torch.long))
        self.trainable = nn.Parameter(table.detach()[self.rows].clone())

    @property
    def weight(self) -> torch.Tensor:
        return self.frozen.index_put((self.rows,), self.trainable)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


# ----------------------------------------------------------------------------------------------
# The extension


@dataclasses.dataclass
class ExtensionConfig:
    """Settings of the extension (the withheld trainings use the default runs' settings)."""

    table_epochs: int = 10  # item table: epochs over the full training data (SASRec's other settings)
    table_patience: int = 3
    scorer_epochs: int = 20  # item scorer: epochs over the cached hidden states
    scorer_patience: int = 3
    scorer_learning_rate: float = 1e-3  # Adam, no weight decay
    scorer_batch_size: int = 1024

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise InputError(f"extension setting {field.name}: must be a positive number, got {value!r}")

    @classmethod
    def from_dict(cls, values: dict | None) -> "ExtensionConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values or {}) - known)
        if unknown:
            raise InputError(f"extension settings: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**(values or {}))


def extend_item_table(withheld: SASRec, data: SequenceData, new_items: Sequence[int], config: TrainConfig,
                      checkpoint_dir: str | Path, progress: bool = False) -> tuple[SASRec, dict]:
    """A SASRec with ``withheld``'s weights whose only trainable weights are the new items' table rows,
    trained on ``data`` (the full training data) by the suite's trainer; -> (model, training record)."""
    model = SASRec(withheld.n_items, withheld.n_users, withheld.max_len, withheld.config)
    model.load_state_dict(withheld.state_dict())
    model.requires_grad_(False)
    model.item_embeddings = RowTable(model.item_embeddings.weight, new_items)
    record = train(model, data, config, checkpoint_dir, progress=progress)
    return model, record


@torch.no_grad()
def last_hidden_states(model: E4SRec, histories: np.ndarray, batch_size: int) -> torch.Tensor:
    """[n, H] float32 last hidden states of left-padded ``histories`` [n, max_len], computed as
    :meth:`E4SRec.full_sort_predict` does (blocks of ``batch_size`` users)."""
    model.eval()
    device = model.item_scorer.weight.device
    out = [model.user_hidden(torch.from_numpy(np.ascontiguousarray(histories[start:start + batch_size])).to(device))
           for start in range(0, len(histories), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, model.hidden_size, device=device)


def _scores_from_hidden(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    scores = hidden @ weight.T  # float32, as E4SRec.item_scores
    scores[:, 0] = float("-inf")
    return scores


def extend_item_scorer(model: E4SRec, data: SequenceData, new_items: Sequence[int], config: ExtensionConfig,
                       seed: int = 0, eval_batch_size: int = 256, ties: str = "pessimistic") -> dict:
    """Train only the ``new_items``' rows of ``model.item_scorer`` (in place) on the cached last hidden
    states of every training example of ``data``; select the epoch on validation NDCG@10. Every other
    weight of the model stays bit-identical. Returns the training record."""
    started = time.perf_counter()
    device = model.item_scorer.weight.device
    new = torch.as_tensor(np.asarray(new_items), dtype=torch.long, device=device)
    is_new = torch.from_numpy(item_mask(model.n_items, new_items)).to(device)
    old = torch.nonzero(~is_new[1:]).squeeze(1) + 1
    position = torch.full((model.n_items + 1,), -1, dtype=torch.long, device=device)
    position[new] = torch.arange(len(new), device=device)

    _, histories, targets = data.training_examples()
    hidden = last_hidden_states(model, histories, eval_batch_size)  # [M, H]
    valid_hidden = last_hidden_states(model, data.padded_histories("valid"), eval_batch_size)  # [U, H]
    cache_seconds = time.perf_counter() - started
    targets = torch.from_numpy(targets).to(device)
    weight = model.item_scorer.weight.detach().float()  # [N + 1, H]
    # constants of the exact cross-entropy over items 1..N: the old items' log-sum-exp and target logits
    old_lse = torch.cat([torch.logsumexp(hidden[s:s + 4096] @ weight[old].T, dim=1)
                         for s in range(0, len(hidden), 4096)]) if len(hidden) else hidden.new_zeros(0)
    target_logit = (hidden * weight[targets]).sum(dim=1)
    target_new = is_new[targets]

    def loss_of(rows: torch.Tensor, new_rows: torch.Tensor) -> torch.Tensor:
        logits = hidden[rows] @ new_rows.T  # [B, n_new]
        lse = torch.logaddexp(old_lse[rows], torch.logsumexp(logits, dim=1))
        chosen = logits.gather(1, position[targets[rows]].clamp(min=0)[:, None]).squeeze(1)
        return (lse - torch.where(target_new[rows], chosen, target_logit[rows])).mean()

    def validation(new_rows: torch.Tensor) -> float:
        full = weight.index_put((new,), new_rows.detach())
        ranks = rank_split(lambda batch: _scores_from_hidden(valid_hidden[batch["user"]], full), data, "valid",
                           eval_batch_size, device, ties)["full"]
        return ndcg(ranks, 10)

    @torch.no_grad()
    def mean_loss(new_rows: torch.Tensor) -> float:
        parts = [loss_of(torch.arange(s, min(s + 4096, len(hidden)), device=device), new_rows) * min(4096, len(hidden) - s)
                 for s in range(0, len(hidden), 4096)]
        return float(sum(parts) / len(hidden)) if parts else math.nan

    rows = nn.Parameter(weight[new].clone())
    optimizer = torch.optim.Adam([rows], lr=config.scorer_learning_rate)
    best, best_rows, bad, epochs = -1.0, rows.detach().clone(), 0, []
    initial = {"valid_ndcg10": validation(rows), "loss": mean_loss(rows)}
    for epoch in range(config.scorer_epochs):
        if bad >= config.scorer_patience:
            break
        epoch_started = time.perf_counter()
        order = torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(len(hidden))).to(device)
        total, steps = 0.0, 0
        for start in range(0, len(order), config.scorer_batch_size):
            loss = loss_of(order[start:start + config.scorer_batch_size], rows)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, steps = total + loss.item(), steps + 1
        seconds = time.perf_counter() - epoch_started  # the training loop, as the trainer's epoch seconds
        valid = validation(rows)
        epochs.append({"epoch": epoch, "loss": total / max(steps, 1), "valid_ndcg10": valid, "seconds": seconds})
        if valid > best:
            best, best_rows, bad = valid, rows.detach().clone(), 0
        else:
            bad += 1
    with torch.no_grad():
        model.item_scorer.weight[new] = best_rows.to(model.item_scorer.weight.dtype)
    best_epoch = max(epochs, key=lambda e: e["valid_ndcg10"])["epoch"] if epochs else -1
    return {"config": dataclasses.asdict(config), "examples": int(len(hidden)),
            "examples_with_new_target": int(target_new.sum()), "cache_seconds": cache_seconds,
            "train_seconds": cache_seconds + sum(e["seconds"] for e in epochs),
            "initial": initial, "epochs": epochs, "best_epoch": best_epoch, "best_valid_ndcg10": best,
            "seconds": time.perf_counter() - started,
            "selection": "best validation NDCG@10 (full ranking) over the epochs"}


# ----------------------------------------------------------------------------------------------
# The experiment


def _timed_train(model, data, config, checkpoint_dir, progress):
    started = time.perf_counter()
    record = train(model, data, config, checkpoint_dir, progress=progress)
    record["wall_seconds"] = time.perf_counter() - started
    return record


def _reset_rows(weight: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
    with torch.no_grad():
        weight[rows.to(weight.device)] = values.to(weight.device, weight.dtype)


def _file_record(path: str | Path) -> dict:
    return {"path": str(path), "sha256": sha256_file(path)}


def _check_full_run(run_dir: Path, data: SequenceData, model: str) -> dict:
    record = read_json(run_dir / "run.json")
    if record.get("dataset") != data.name or record.get("model") != model:
        raise InputError(f"{run_dir / 'run.json'}: a {record.get('model')} run of {record.get('dataset')}, "
                         f"expected {model} on {data.name}")
    return record


def _prepare_work_dir(work_dir: Path) -> None:
    if work_dir.exists() and any(work_dir.iterdir()):
        if not (work_dir / MARKER).is_file():
            raise InputError(f"{work_dir}: exists and is not a new-items work folder (no {MARKER}): not deleting it")
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)


def run_new_items(dataset_dir: str | Path, backbone_dir: str | Path, work_dir: str | Path, *,
                  fraction: float = 0.05, selection_seed: int = 0, seed: int = 0, sasrec_seed: int = 0,
                  sasrec_params: dict | None = None, sasrec_train_params: dict | None = None,
                  e4srec_params: dict | None = None, e4srec_train_params: dict | None = None,
                  extension: dict | None = None, full_run: str | Path | None = None,
                  full_sasrec_run: str | Path | None = None, ties: str = "pessimistic",
                  progress: bool = False) -> dict:
    """The whole experiment (see the module docstring); returns its record (``rows``: the comparison)."""
    from . import runs
    from .backbone import load_tokenizer

    work_dir = Path(work_dir)
    extension_config = ExtensionConfig.from_dict(extension)
    sasrec_config = runs.model_config(SASRec, sasrec_params or {}, "parameters of SASRec")
    e4srec_config = runs.model_config(E4SRec, e4srec_params or {}, "parameters of E4SRec")
    sasrec_train = TrainConfig.from_dict({**(sasrec_train_params or {}), "seed": sasrec_seed})
    e4srec_train = TrainConfig.from_dict({**(e4srec_train_params or {}), "seed": seed})
    table_train = dataclasses.replace(sasrec_train, epochs=extension_config.table_epochs,
                                      patience=extension_config.table_patience)
    check_device(e4srec_train)
    data = SequenceData.load(dataset_dir)
    new_items = choose_new_items(data.n_items, fraction, selection_seed)
    full_run = Path(full_run) if full_run else None
    full_sasrec_run = Path(full_sasrec_run) if full_sasrec_run else None
    full_record = _check_full_run(full_run, data, "E4SRec") if full_run else None
    sasrec_record = _check_full_run(full_sasrec_run, data, "SASRec") if full_sasrec_run else None
    _prepare_work_dir(work_dir)
    selection = {"fraction": fraction, "seed": selection_seed, "count": int(len(new_items)),
                 "ids": new_items.tolist(), "ids_sha256": ids_sha256(new_items),
                 "method": "uniform without replacement over 1..n_items, numpy default_rng([seed, 5])"}
    write_json(work_dir / MARKER, {"dataset": data.name, "n_items": data.n_items, **selection})
    withheld_data = WithheldData.from_data(data, new_items)
    new = torch.from_numpy(new_items)
    timings: dict[str, float] = {}

    # 1. stage 1 on the withheld data
    log.info("%s: %d new items (%.1f%%); %d training interactions withheld", data.name, len(new_items),
             100 * fraction, withheld_data.removed_interactions())
    torch.manual_seed(sasrec_seed)
    np.random.seed(sasrec_seed)
    sasrec = WithheldSASRec(data.n_items, data.n_users, data.max_len, sasrec_config, new_items=new_items)
    sasrec_init = sasrec.item_embeddings.weight.detach()[new].clone()
    sasrec_dir = work_dir / "withheld" / "SASRec"
    sasrec_training = _timed_train(sasrec, withheld_data, sasrec_train, sasrec_dir / "checkpoints", progress)
    _reset_rows(sasrec.item_embeddings.weight, new, sasrec_init)
    withheld_table = sasrec_dir / "item_embeddings.safetensors"
    save_tensors(withheld_table, {"item_embeddings": sasrec.export_item_embeddings()},
                 metadata={"dataset": data.name, "model": "SASRec", "variant": "withheld-new-items",
                           "seed": str(sasrec_seed), "new_items_sha256": selection["ids_sha256"]})
    timings["withheld_sasrec"] = sasrec_training["wall_seconds"]

    # 2. stage 3 on the withheld data
    torch.manual_seed(seed)
    np.random.seed(seed)
    withheld = WithheldE4SRec(data.n_items, data.n_users, data.max_len, e4srec_config, backbone_dir=backbone_dir,
                              item_embeddings=withheld_table, new_items=new_items)
    scorer_init = withheld.item_scorer.weight.detach()[new].clone()
    e4srec_dir = work_dir / "withheld" / "E4SRec"
    e4srec_training = _timed_train(withheld, withheld_data, e4srec_train, e4srec_dir / "checkpoints", progress)
    _reset_rows(withheld.item_scorer.weight, new, scorer_init)
    timings["withheld_e4srec"] = e4srec_training["wall_seconds"]
    device = make_accelerator(e4srec_train).device
    withheld.to(device).eval()
    withheld_ranks = rank_all(withheld.full_sort_predict, data, e4srec_train.eval_batch_size, device, ties)
    write_parquet(e4srec_dir / "ranks.parquet", withheld_ranks)
    withheld_components = withheld.save_components(e4srec_dir / "components", dataset=data.name)

    # 3a. the item table: new rows only, full training data
    table_dir = work_dir / "extended" / "SASRec-table"
    started = time.perf_counter()
    table_model, table_training = extend_item_table(sasrec, data, new_items, table_train, table_dir / "checkpoints",
                                                    progress)
    timings["extension_table"] = time.perf_counter() - started
    extended_table = table_dir / "item_embeddings.safetensors"
    save_tensors(extended_table, {"item_embeddings": table_model.export_item_embeddings()},
                 metadata={"dataset": data.name, "model": "SASRec", "variant": "extended-new-items",
                           "seed": str(sasrec_seed), "new_items_sha256": selection["ids_sha256"],
                           "selected_epoch": str(table_training.get("best_epoch"))})

    # 3b. the item scorer: new rows only, on cached hidden states of the full training examples
    started = time.perf_counter()
    extended = E4SRec(data.n_items, data.n_users, data.max_len, e4srec_config, item_embeddings=extended_table,
                      backbone=withheld.backbone, tokenizer=load_tokenizer(backbone_dir),
                      backbone_record=withheld.backbone_record, adapter_name=withheld.adapter_name)
    extended.load_state_dict(withheld.pluggable_state(), strict=False)  # LoRA: the same adapter object
    extended.to(device)
    scorer_training = extend_item_scorer(extended, data, new_items, extension_config, seed=seed,
                                         eval_batch_size=e4srec_train.eval_batch_size, ties=ties)
    timings["extension_scorer"] = time.perf_counter() - started
    extended_dir = work_dir / "extended" / "E4SRec"
    extended_ranks = rank_all(extended.full_sort_predict, data, e4srec_train.eval_batch_size, device, ties)
    write_parquet(extended_dir / "ranks.parquet", extended_ranks)
    extended_components = extended.save_components(extended_dir / "components", dataset=data.name)
    checks = extension_checks(e4srec_dir / "components", extended_dir / "components", withheld_table,
                              extended_table, new_items)
    if not checks["only_new_rows_changed"]:
        raise RuntimeError(f"the extension changed more than the new items' rows: {checks}")

    # 4. the model retrained on the full data
    if full_run is None:
        table = full_sasrec_run / "item_embeddings.safetensors" if full_sasrec_run else None
        if table is None:
            full_sasrec_run = work_dir / "retrained" / "SASRec"
            sasrec_record = runs.run(dataset_dir, "SASRec", full_sasrec_run, seed=sasrec_seed, params=sasrec_params,
                                     train_params=sasrec_train_params, ties=ties, progress=progress)
            table = full_sasrec_run / "item_embeddings.safetensors"
        full_run = work_dir / "retrained" / "E4SRec"
        full_record = runs.run(dataset_dir, "E4SRec", full_run, seed=seed, params=e4srec_params,
                               train_params=e4srec_train_params, ties=ties, progress=progress,
                               backbone_dir=backbone_dir, item_embeddings=table)
    retrained_ranks = pd.read_parquet(full_run / "ranks.parquet")
    if full_record.get("seed") != seed:
        log.warning("%s: seed %s, the withheld model's is %d", full_run, full_record.get("seed"), seed)

    ranks = {"withheld": withheld_ranks, "extended": extended_ranks, "retrained": retrained_ranks}
    retrain_default = None
    if sasrec_record is not None:
        retrain_default = sasrec_record["training"]["train_seconds"] + full_record["training"]["train_seconds"]
    timings_record = {
        "extension_seconds": table_training["train_seconds"] + scorer_training["train_seconds"],
        "extension_table_seconds": table_training["train_seconds"],
        "extension_scorer_seconds": scorer_training["train_seconds"],
        "extension_scorer_cache_seconds": scorer_training["cache_seconds"],
        "withheld_training_seconds": sasrec_training["train_seconds"] + e4srec_training["train_seconds"],
        "retrain_train_seconds": retrain_default,
        "retrain_sasrec_train_seconds": sasrec_record["training"]["train_seconds"] if sasrec_record else None,
        "retrain_e4srec_train_seconds": full_record["training"]["train_seconds"],
        "wall_seconds": {"extension_table": timings["extension_table"], "extension_scorer": timings["extension_scorer"],
                         "withheld_sasrec": timings["withheld_sasrec"], "withheld_e4srec": timings["withheld_e4srec"]},
        "note": ("Training loops only (validation excluded), as the trainer's 'train_seconds': extension_* are this "
                 "job's (the scorer's include caching the hidden states, a forward pass over every training "
                 "example); withheld_training_seconds: this job's two withheld trainings (SASRec + E4SRec, the "
                 "pipeline of a retraining, same machine and process); retrain_*: the default runs' (their "
                 "run.json), measured by their own jobs. wall_seconds: wall-clock of each phase here, validation, "
                 "model building and one-time start-up costs (first imports) included."),
    }
    inputs = {"dataset_dir": str(dataset_dir), "sha256": runs.input_checksums(dataset_dir),
              "backbone_dir": str(backbone_dir), "backbone_weights_sha256": withheld.backbone_record["weights_sha256"],
              "retrained_run": {"dir": str(full_run), "ranks": _file_record(full_run / "ranks.parquet"),
                                "run_json": _file_record(full_run / "run.json"), "seed": full_record.get("seed")}}
    if full_sasrec_run is not None:
        inputs["retrained_sasrec_run"] = {"dir": str(full_sasrec_run),
                                          "run_json": _file_record(full_sasrec_run / "run.json")}
    return provenance.record(
        experiment="Extensibility (a): new items by extending only the item table and the item scorer",
        dataset=data.name, n_items=data.n_items, users=data.n_users, seed=seed, sasrec_seed=sasrec_seed,
        new_items=selection, ties=ties, protocol="full ranking, history not masked",
        withheld_data={"removed_training_interactions": withheld_data.removed_interactions(),
                       "training_examples": int(len(withheld_data.training_examples()[2])),
                       "full_training_examples": int(len(data.training_examples()[2])),
                       "evaluation": "validation/test items and histories as in the full data",
                       "new_items_excluded_from": "positives, SASRec negatives / softmax, E4SRec softmax",
                       "new_rows_after_training": "reset to their initial values (untrained)"},
        input_projection_sees_new_rows=True,
        input_projection_note=("yes: histories at evaluation (and the full training examples of the scorer "
                               "extension) may contain new items; their extended table rows go through the frozen "
                               "input projection"),
        settings={"sasrec_params": dataclasses.asdict(sasrec_config), "sasrec_train": dataclasses.asdict(sasrec_train),
                  "e4srec_params": dataclasses.asdict(e4srec_config), "e4srec_train": dataclasses.asdict(e4srec_train),
                  "extension": dataclasses.asdict(extension_config), "table_train": dataclasses.asdict(table_train)},
        training={"withheld_sasrec": _summary(sasrec_training), "withheld_e4srec": _summary(e4srec_training),
                  "extension_table": _summary(table_training), "extension_scorer": scorer_training},
        checks=checks, timings=timings_record, inputs=inputs,
        outputs={"work_dir": str(work_dir), "withheld_table": _file_record(withheld_table),
                 "extended_table": _file_record(extended_table),
                 "withheld_ranks": _file_record(e4srec_dir / "ranks.parquet"),
                 "extended_ranks": _file_record(extended_dir / "ranks.parquet"),
                 "withheld_components": str(e4srec_dir / "components"),
                 "extended_components": str(extended_dir / "components"),
                 "components_bytes": {"withheld": withheld_components["size_bytes"],
                                      "extended": extended_components["size_bytes"]}},
        nondeterminism=runs.nondeterminism_settings(device),
        rows=comparison_rows(data, new_items, ranks),
    )


def _summary(training: dict) -> dict:
    keys = ("best_epoch", "best_valid_ndcg10", "train_seconds", "wall_seconds", "stopped", "device", "epochs")
    return {k: training[k] for k in keys if k in training}


def extension_checks(withheld_components: Path, extended_components: Path, withheld_table: Path,
                     extended_table: Path, new_items: Sequence[int]) -> dict:
    """What the extension changed, from the files: LoRA, input projection, the item scorer's and the
    item table's old and new rows."""
    new = torch.as_tensor(np.asarray(new_items), dtype=torch.long)

    def rows_differ(a: torch.Tensor, b: torch.Tensor) -> tuple[bool, int]:
        old = torch.ones(a.shape[0], dtype=torch.bool)
        old[new] = False
        changed = (a[new] != b[new]).any(dim=1)
        return bool(torch.equal(a[old], b[old])), int(changed.sum())

    adapter_a = load_tensors(withheld_components / "adapter" / "adapter_model.safetensors")
    adapter_b = load_tensors(extended_components / "adapter" / "adapter_model.safetensors")
    proj_a = load_tensors(withheld_components / "projections.safetensors")
    proj_b = load_tensors(extended_components / "projections.safetensors")
    table_a = load_tensors(withheld_table)["item_embeddings"]
    table_b = load_tensors(extended_table)["item_embeddings"]
    lora_identical = adapter_a.keys() == adapter_b.keys() and all(torch.equal(adapter_a[k], adapter_b[k]) for k in adapter_a)
    projection_identical = all(torch.equal(proj_a[k], proj_b[k]) for k in ("input_proj.weight", "input_proj.bias"))
    scorer_old, scorer_changed = rows_differ(proj_a["item_scorer.weight"], proj_b["item_scorer.weight"])
    table_old, table_changed = rows_differ(table_a, table_b)
    checks = {"lora_identical": lora_identical, "input_projection_identical": projection_identical,
              "scorer_old_rows_identical": scorer_old, "scorer_new_rows_changed": scorer_changed,
              "table_old_rows_identical": table_old, "table_new_rows_changed": table_changed,
              "new_items": len(new)}
    checks["only_new_rows_changed"] = lora_identical and projection_identical and scorer_old and table_old
    return checks


def comparison_rows(data: SequenceData, new_items: Sequence[int], ranks: dict[str, pd.DataFrame]) -> list[dict]:
    """HR@10 and NDCG@10 (full ranking) of each model, per split and user group (target new, old, all)."""
    is_new = item_mask(data.n_items, new_items)
    for name, frame in ranks.items():
        if not np.array_equal(frame["user_id"].to_numpy(), data.user_ids):
            raise InputError(f"ranks of the {name} model list other users than {data.name}")
    rows = []
    for split in ("valid", "test"):
        target_new = is_new[data.targets(split)]
        for group, members in zip(GROUPS, (target_new, ~target_new, np.ones_like(target_new))):
            for model in MODELS:
                values = ranks[model][f"{split}_full"].to_numpy()[members]
                for metric, k in METRICS:
                    value = (hit_rate if metric == "HR" else ndcg)(values, k) if len(values) else math.nan
                    rows.append({"dataset": data.name, "split": split, "group": group, "users": int(members.sum()),
                                 "model": model, "metric": metric, "k": k, "value": value})
    return rows


def markdown_table(result: dict) -> str:
    """The comparison as one Markdown table (rows: split x group; columns: metric x model) and the timings."""
    frame = pd.DataFrame(result["rows"])
    frame["column"] = frame["metric"] + "@" + frame["k"].astype(str) + " " + frame["model"]
    wide = frame.pivot_table(index=["split", "group", "users"], columns="column", values="value", sort=False)
    columns = [f"{m}@{k} {model}" for m, k in METRICS for model in MODELS]
    wide = wide[columns].reset_index()
    wide["split"] = pd.Categorical(wide["split"], ["test", "valid"])
    wide["group"] = pd.Categorical(wide["group"], list(GROUPS))
    wide = wide.sort_values(["split", "group"])
    sel, t = result["new_items"], result["timings"]
    lines = [f"# Extensibility (a): new items, {result['dataset']}", "",
             f"{sel['count']} new items of {result['n_items']} ({100 * sel['fraction']:g}%, seed {sel['seed']}, ids "
             f"sha256 {sel['ids_sha256'][:12]}) withheld from all training; then only their rows of the item table "
             f"(SASRec, other weights frozen) and of the item scorer (LoRA, input projection and old rows frozen) "
             f"trained. Seed {result['seed']}; {result['protocol']}; ties {result['ties']}. Models: "
             + "; ".join(f"{m} = {MODEL_LABELS[m]}" for m in MODELS) + ".", "",
             "| split | users' target | users | " + " | ".join(columns) + " |",
             "|---|---|---:|" + "---:|" * len(columns)]
    for _, row in wide.iterrows():
        cells = ["-" if pd.isna(row[c]) else f"{row[c]:.4f}" for c in columns]
        lines.append(f"| {row['split']} | {row['group']} | {row['users']} | " + " | ".join(cells) + " |")
    retrain = t["retrain_train_seconds"]
    lines += ["", f"Training time (training loops, validation excluded): extension {t['extension_seconds']:.2f} s "
              f"(item table {t['extension_table_seconds']:.2f} s, item scorer {t['extension_scorer_seconds']:.2f} s of "
              f"which {t['extension_scorer_cache_seconds']:.2f} s caching hidden states); retraining SASRec + E4SRec "
              + (f"{retrain:.2f} s (the default runs), " if retrain is not None else "")
              + f"{t['withheld_training_seconds']:.2f} s (this job's withheld trainings, same machine).",
              f"Checks: LoRA identical {result['checks']['lora_identical']}, input projection identical "
              f"{result['checks']['input_projection_identical']}, old scorer rows identical "
              f"{result['checks']['scorer_old_rows_identical']}, old table rows identical "
              f"{result['checks']['table_old_rows_identical']}."]
    return "\n".join(lines) + "\n"


def write_new_items_tables(result: dict, out_json: str | Path) -> None:
    """``out_json`` (the record), and beside it ``.csv`` (long form) and ``.md`` (one table)."""
    from .tables import write_csv

    out_json = Path(out_json)
    write_csv(out_json.with_suffix(".csv"), pd.DataFrame(result["rows"]))
    write_text(out_json.with_suffix(".md"), markdown_table(result))
    write_json(out_json, result)  # last: marks the outputs as complete
