"""Stage 4: pluggable components per dataset, many datasets served by ONE loaded backbone.

A components folder holds only what a dataset adds to the shared backbone:

- ``adapter/``: the LoRA adapter, written by PEFT's ``save_pretrained`` (``adapter_config.json`` +
  ``adapter_model.safetensors``, LoRA weights only);
- ``projections.safetensors``: ``input_proj.weight`` [H, 64], ``input_proj.bias`` [H] and
  ``item_scorer.weight`` [n_items + 1, H];
- ``components.json``: the dataset, ``n_items``, ``max_len``, the E4SRec configuration, a pointer to
  the frozen item embeddings file (relative to the folder) with its sha256, the backbone's
  ``weights_sha256`` and hidden size, and the sizes in bytes against the backbone's.

:class:`E4SRecService` loads a backbone once and plugs in any number of components folders (PEFT
multi-adapter: ``load_adapter`` under the dataset's name, ``set_adapter`` to switch); every
mismatch (backbone checksum, hidden size, item count, shapes, item table checksum) is an error
that names the file. Added with its ``item_ids.tsv`` (written beside the prepared data of a dataset
whose ids were numbered anew, paper/DATA.md), a dataset takes and returns the user's own item ids.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Sequence

import torch

from .backbone import load_backbone, load_tokenizer, read_backbone_record, weights_bytes
from .files import InputError, atomic_dir, load_tensors, read_json, save_tensors, sha256_file, write_json
from .interactions import IdMap
from .model import (E4SRec, E4SRecConfig, left_pad_tensor, load_item_embeddings, quiet_peft,
                    validate_histories)

FORMAT = "e4srec-components/1"
ADAPTER_DIR = "adapter"
PROJECTIONS_FILE = "projections.safetensors"
RECORD_FILE = "components.json"


def _sizes(folder: Path, table: Path) -> dict[str, int | None]:
    """Bytes of the adapter, the projections and the item table (None if missing), and their total."""
    sizes = {"adapter": sum(f.stat().st_size for f in (folder / ADAPTER_DIR).rglob("*") if f.is_file()),
             "projections": (folder / PROJECTIONS_FILE).stat().st_size,
             "item_embeddings": table.stat().st_size if table.is_file() else None}
    sizes["total"] = sum(v for v in sizes.values() if v)
    return sizes


def item_table_file(model, item_embeddings_path: str | os.PathLike | None = None) -> tuple[Path, str]:
    """(resolved path, sha256) of the file ``model``'s frozen item table came from, which its saved
    components point to; an error if it was given as a tensor or has changed since."""
    source = model.item_embeddings_source
    if item_embeddings_path is None:
        if source is None:
            raise InputError("save_components: the model's item table was given as a tensor; pass "
                             "item_embeddings_path (the safetensors file it came from)")
        item_embeddings_path = source["path"]
    table_path = Path(item_embeddings_path).resolve()
    table_sha = sha256_file(table_path)
    if source and table_sha != source["sha256"]:
        raise InputError(f"{table_path}: changed since the model was built (sha256 {table_sha}, "
                         f"was {source['sha256']})")
    return table_path, table_sha


def save_components(model: E4SRec, out_dir: str | os.PathLike, dataset: str | None = None,
                    item_embeddings_path: str | os.PathLike | None = None) -> dict:
    """Write ``model``'s pluggable components into ``out_dir`` (atomically); return components.json."""
    out_dir = Path(out_dir)
    table_path, table_sha = item_table_file(model, item_embeddings_path)
    backbone = model.backbone_record
    with atomic_dir(out_dir) as tmp:
        saved = tmp / "peft"
        model.backbone.save_pretrained(saved, selected_adapters=[model.adapter_name])
        # PEFT puts any adapter not named "default" in a sub-folder of that name
        source = saved if model.adapter_name == "default" else saved / model.adapter_name
        shutil.move(str(source), str(tmp / ADAPTER_DIR))
        shutil.rmtree(saved, ignore_errors=True)
        (tmp / ADAPTER_DIR / "README.md").unlink(missing_ok=True)  # PEFT's blank model card
        save_tensors(tmp / PROJECTIONS_FILE, model.pluggable_state(),
                     metadata={"n_items": str(model.n_items), "hidden_size": str(model.hidden_size)})
        sizes = _sizes(tmp, table_path)
        backbone_bytes = backbone.get("weights_bytes")
        record = {
            "format": FORMAT, "dataset": dataset or "default", "n_items": model.n_items, "max_len": model.max_len,
            "hidden_size": model.hidden_size, "config": dataclasses.asdict(model.config),
            "item_embeddings": {"path": os.path.relpath(table_path, out_dir.resolve()), "sha256": table_sha,
                                "shape": list(model.item_embeddings.weight.shape)},
            "backbone": {"weights_sha256": backbone["weights_sha256"], "hidden_size": backbone["hidden_size"],
                         "source": backbone.get("source"), "weights_bytes": backbone_bytes},
            "size_bytes": sizes,
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "size_vs_backbone": sizes["total"] / backbone_bytes if backbone_bytes else None,
        }
        write_json(tmp / RECORD_FILE, record)
    return record


def read_components(components_dir: str | os.PathLike) -> dict:
    """components.json of a folder, checked for the files and fields it promises."""
    folder = Path(components_dir)
    path = folder / RECORD_FILE
    if not path.is_file():
        raise InputError(f"{path}: not found (not a components folder: save one with deploy.save_components)")
    record = read_json(path)
    missing = [k for k in ("format", "dataset", "n_items", "max_len", "hidden_size", "config", "item_embeddings",
                           "backbone") if k not in record]
    if missing:
        raise InputError(f"{path}: missing field(s) {missing}")
    if record["format"] != FORMAT:
        raise InputError(f"{path}: format {record['format']!r}, this version reads {FORMAT!r}")
    for name in (f"{ADAPTER_DIR}/adapter_config.json", PROJECTIONS_FILE):
        if not (folder / name).is_file():
            raise InputError(f"{folder / name}: missing from the components folder")
    return record


def components_size(components_dir: str | os.PathLike, backbone_dir: str | os.PathLike | None = None) -> dict:
    """Sizes in bytes of a dataset's components (adapter, projections, item table) against the backbone's."""
    folder = Path(components_dir)
    record = read_components(folder)
    table = (folder / record["item_embeddings"]["path"]).resolve()
    sizes = _sizes(folder, table)
    backbone_size = weights_bytes(backbone_dir) if backbone_dir else record["backbone"].get("weights_bytes")
    return {"dataset": record["dataset"], "components_dir": str(folder), "size_bytes": sizes,
            "backbone_bytes": backbone_size,
            "ratio": sizes["total"] / backbone_size if backbone_size else None}


class E4SRecService:
    """One backbone in memory, any number of datasets' components plugged in by name.

    Example::

        service = E4SRecService("resources/backbone")
        service.add("Beauty", "results/.../components")
        service.recommend("Beauty", [12, 7, 301], k=10)  # -> 10 item ids of Beauty
    """

    def __init__(self, backbone_dir: str | os.PathLike, device: str = "cpu", load_in: str = "none",
                 dtype: str = "auto"):
        self.backbone_dir = Path(backbone_dir)
        self.backbone_record = read_backbone_record(backbone_dir)
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   ("cpu" if device == "auto" else device))
        self._base = load_backbone(backbone_dir, load_in=load_in, device=self.device, dtype=dtype)
        self._base.requires_grad_(False)
        self._tokenizer = load_tokenizer(backbone_dir)
        self._peft = None
        self.models: dict[str, E4SRec] = {}
        self.item_ids: dict[str, IdMap] = {}  # datasets served in their own item ids

    @property
    def names(self) -> list[str]:
        return list(self.models)

    def add(self, name: str, components_dir: str | os.PathLike, item_ids: str | os.PathLike | None = None) -> dict:
        """Plug in a dataset's components under ``name``; return its components.json. With ``item_ids``
        (the dataset's item_ids.tsv), :meth:`recommend` takes and returns the dataset's own item ids."""
        from peft import PeftModel

        folder = Path(components_dir)
        record = read_components(folder)
        if name in self.models:
            raise InputError(f"{folder}: a dataset named {name!r} is already loaded")
        hidden = self.backbone_record["hidden_size"]
        if record["hidden_size"] != hidden or record["backbone"]["hidden_size"] != hidden:
            raise InputError(f"{folder / RECORD_FILE}: components of hidden size {record['hidden_size']}, the backbone "
                             f"{self.backbone_dir} has hidden size {hidden}")
        if record["backbone"]["weights_sha256"] != self.backbone_record["weights_sha256"]:
            raise InputError(f"{folder / RECORD_FILE}: trained on the backbone with weights sha256 "
                             f"{record['backbone']['weights_sha256']}, but {self.backbone_dir} has "
                             f"{self.backbone_record['weights_sha256']}: load them on the backbone they were trained on")
        table_path = (folder / record["item_embeddings"]["path"]).resolve()
        if not table_path.is_file():
            raise InputError(f"{table_path}: the item embeddings file of {folder} is missing")
        digest = sha256_file(table_path)
        if digest != record["item_embeddings"]["sha256"]:
            raise InputError(f"{table_path}: sha256 {digest}, but {folder / RECORD_FILE} expects "
                             f"{record['item_embeddings']['sha256']}: the item table changed")
        projections = load_tensors(folder / PROJECTIONS_FILE)
        known = {f.name for f in dataclasses.fields(E4SRecConfig)}
        config = E4SRecConfig(**{k: v for k, v in record["config"].items() if k in known})
        expected = {"input_proj.weight": (hidden, config.item_embedding_dim), "input_proj.bias": (hidden,),
                    "item_scorer.weight": (record["n_items"] + 1, hidden)}
        for key, shape in expected.items():
            if key not in projections or tuple(projections[key].shape) != shape:
                found = tuple(projections[key].shape) if key in projections else "missing"
                raise InputError(f"{folder / PROJECTIONS_FILE}: {key} is {found}, expected {shape} "
                                 f"(n_items {record['n_items']}, hidden size {hidden})")

        table = load_item_embeddings(table_path, record["n_items"], config.item_embedding_dim)
        id_map = IdMap.read(item_ids, "item") if item_ids is not None else None
        if id_map is not None and len(id_map) != record["n_items"]:
            raise InputError(f"{item_ids}: {len(id_map)} items, but {folder / RECORD_FILE} has n_items "
                             f"{record['n_items']}: not the id map of the data these components were trained on")

        adapter_dir = folder / ADAPTER_DIR  # every check passed: only now touch the shared backbone
        with quiet_peft():
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(self._base, adapter_dir, adapter_name=name, is_trainable=False)
            else:
                self._peft.load_adapter(adapter_dir, adapter_name=name, is_trainable=False)
        model = E4SRec(record["n_items"], 0, record["max_len"], config, item_embeddings=table, backbone=self._peft,
                       tokenizer=self._tokenizer, backbone_record=self.backbone_record, adapter_name=name)
        model.item_embeddings_source = {"path": str(table_path), "sha256": digest}
        model.load_state_dict(projections, strict=False)
        model.to(self.device).eval()
        model.requires_grad_(False)
        self.models[name] = model
        if id_map is not None:
            self.item_ids[name] = id_map
        return record

    def model(self, name: str) -> E4SRec:
        if name not in self.models:
            raise InputError(f"unknown dataset {name!r}; loaded: {self.names}")
        return self.models[name]

    @torch.no_grad()
    def scores(self, name: str, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        """[B, n_items + 1] scores of dataset ``name`` for checked histories (column 0 is -inf)."""
        model = self.model(name)
        histories = validate_histories(histories, model.n_items, model.max_len)
        return model.full_sort_predict({"history": left_pad_tensor(histories, self.device)})

    def recommend(self, name: str, history: Sequence, k: int = 10, exclude_history: bool = False) -> list:
        """Top-``k`` item ids (best first) of dataset ``name`` for one user's history: ids 1..n_items,
        or the dataset's own ids (text) where it was added with its ``item_ids``."""
        if isinstance(history, (str, bytes)):
            raise InputError(f"history: expected a list of item ids, got {history!r}")
        id_map = self.item_ids.get(name)
        if id_map is not None:
            history = [id_map.internal(item, "history") for item in history]
        items = self.model(name).recommend([history], k, exclude_history=exclude_history)[0]
        return [id_map.external(item) for item in items] if id_map is not None else items
