"""workflow/scripts/random_backbone.py: a seeded random LLaMA folder for timing DDP at a compute-bound
size (issue "Performance", goal 4), run as a user runs it, at a tiny size."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from e4srec.backbone import read_backbone_record
from e4srec.model import E4SRec, E4SRecConfig
from tiny_llm import write_item_embeddings, write_tiny_backbone

SCRIPT = Path(__file__).resolve().parents[1] / "workflow" / "scripts" / "random_backbone.py"
TINY = ["--layers", "2", "--hidden", "64", "--intermediate", "128", "--heads", "4", "--kv-heads", "2"]


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_writes_a_seeded_backbone_that_e4srec_trains_on(tmp_path):
    tokenizer_from = write_tiny_backbone(tmp_path / "tiny")
    folders = {}
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        folders[name] = tmp_path / name
        result = run_script("--out", str(folders[name]), "--tokenizer-from", str(tokenizer_from), "--seed", seed,
                            "--dtype", "float32", *TINY)
        assert result.returncode == 0, result.stderr
    record = read_backbone_record(folders["a"])
    assert record["source"] == "random-llama" and record["hidden_size"] == 64
    assert record["random_init"] | {"tokenizer_from": None} == {
        "seed": 0, "layers": 2, "hidden": 64, "intermediate": 128, "heads": 4, "kv_heads": 2,
        "tokenizer_from": None, "note": "random weights, for timing only: its scores mean nothing"}
    assert record["weights_sha256"] == read_backbone_record(folders["b"])["weights_sha256"]  # same seed, same weights
    assert record["weights_sha256"] != read_backbone_record(folders["c"])["weights_sha256"]
    config = json.loads((folders["a"] / "config.json").read_text())
    assert (config["num_hidden_layers"], config["num_key_value_heads"], config["vocab_size"]) == (2, 2, 300)
    model = E4SRec(30, 2, 50, E4SRecConfig(), backbone_dir=folders["a"],
                   item_embeddings=write_item_embeddings(tmp_path / "items.safetensors", 30))
    assert model.item_scorer.weight.shape == (31, 64)
    loss = model.calculate_loss({"history": torch.tensor([[0, 3, 4, 5], [1, 2, 3, 4]]),
                                 "target": torch.tensor([6, 5]), "user": torch.arange(2)})
    loss.backward()
    assert torch.isfinite(loss) and model.item_scorer.weight.grad.abs().sum() > 0


def test_a_bad_shape_is_a_clear_error(tmp_path):
    tokenizer_from = write_tiny_backbone(tmp_path / "tiny")
    result = run_script("--out", str(tmp_path / "x"), "--tokenizer-from", str(tokenizer_from),
                        *TINY[:6], "--heads", "5", "--kv-heads", "1")
    assert result.returncode == 2 and "must be a multiple of --heads (5)" in result.stderr
    result = run_script("--out", str(tmp_path / "x"), "--tokenizer-from", str(tokenizer_from), "--layers", "2")
    assert result.returncode == 2 and "missing --hidden, --intermediate, --heads, --kv-heads" in result.stderr
    assert not (tmp_path / "x").exists()
