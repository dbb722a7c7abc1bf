"""Tiny in-process LLM fixtures for the E4SRec tests (no network, no hub).

A seeded random ``LlamaForCausalLM`` (hidden size 32, 2 layers, 4 heads, 2 KV heads) and a byte-level
BPE tokenizer of 300 tokens trained in process (``e4srec.backbone.tiny_random``), saved as a resolved
backbone folder (``backbone.json`` included) in float32, plus tiny prepared datasets and item tables,
and the check that a compiled training loss equals the eager one.
"""
from __future__ import annotations

from pathlib import Path

import torch

from e4srec import data
from e4srec.backbone import tiny_random, write_backbone_folder
from e4srec.files import save_tensors


def write_tiny_backbone(folder: str | Path, seed: int = 0, hidden_size: int = 32) -> Path:
    """A tiny backbone folder (float32) like the ones ``resolve_backbone`` writes."""
    model, tokenizer = tiny_random(seed=seed, hidden_size=hidden_size, intermediate_size=2 * hidden_size)
    write_backbone_folder(model, tokenizer, folder, {"source": f"tiny-random seed {seed}",
                                                     "source_sha256": f"seed {seed}"}, dtype="float32")
    return Path(folder)


def write_item_embeddings(path: str | Path, n_items: int, dim: int = 64, seed: int = 0) -> Path:
    generator = torch.Generator().manual_seed(seed)
    table = torch.randn(n_items + 1, dim, generator=generator)
    table[0] = 0
    save_tensors(path, {"item_embeddings": table})
    return Path(path)


def write_tiny_dataset(folder: str | Path, n_users: int = 24, n_items: int = 30, seed: int = 0,
                       max_len: int = 50, name: str = "tiny") -> Path:
    """A prepared dataset (sequences, negatives, dataset.json) from a seeded ``user item ...`` file."""
    import numpy as np

    folder = Path(folder)
    rng = np.random.default_rng(seed)
    lines = []
    for user in range(1, n_users + 1):
        length = int(rng.integers(4, 12))
        items = rng.choice(np.arange(1, n_items + 1), size=length, replace=False).tolist()
        if user == 1:
            items[0] = n_items  # every item id up to n_items occurs
        lines.append(" ".join(map(str, [user, *items])))
    raw = folder.parent / f"{folder.name}.txt"
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text("\n".join(lines) + "\n")
    data.prepare(name, raw, folder, raw_record={"sha256": "x"}, max_len=max_len, n_negatives=5)
    return folder


def assert_compiled_equals_eager(model, batches, scope: str = "step") -> None:
    """Loss and gradients of each batch: eager first, then compiled (``compile="always"``, ``scope``)."""
    def step(batch):
        model.zero_grad()
        loss = model.calculate_loss(batch)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    eager = [step(batch) for batch in batches]
    model.config.compile, model.config.compile_scope = "always", scope
    compiled = [step(batch) for batch in batches]
    for (loss_e, grads_e), (loss_c, grads_c) in zip(eager, compiled):
        torch.testing.assert_close(loss_c, loss_e, atol=1e-5, rtol=1e-5)
        for grad_e, grad_c in zip(grads_e, grads_c):
            torch.testing.assert_close(grad_c, grad_e, atol=1e-5, rtol=1e-4)
