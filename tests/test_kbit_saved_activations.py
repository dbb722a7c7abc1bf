"""workflow/scripts/kbit_saved_activations.py: the 4-bit path's dtypes against bf16, on a tiny LLaMA."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tiny_llm import write_item_embeddings, write_tiny_backbone, write_tiny_dataset

SCRIPT = Path(__file__).resolve().parents[1] / "workflow" / "scripts" / "kbit_saved_activations.py"


def test_measures_both_variants_on_one_batch(tmp_path):
    backbone = write_tiny_backbone(tmp_path / "bb")
    dataset = write_tiny_dataset(tmp_path / "data", n_users=24, n_items=30)
    items = write_item_embeddings(tmp_path / "items.safetensors", 30)
    out = tmp_path / "saved.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--backbone", str(backbone), "--dataset-dir", str(dataset),
                             "--item-embeddings", str(items), "--users", "8", "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    record = json.loads(out.read_text())
    assert record["users"] == 8 and record["git"]["commit"] and record["command"]
    bf16, kbit = record["results"]["bf16"], record["results"]["4-bit path dtypes"]
    # peft's preparation casts the token embeddings to float32, so the residual stream is float32 there
    assert (bf16["residual_stream_dtype"], kbit["residual_stream_dtype"]) == ("bfloat16", "float32")
    for result_ in (bf16, kbit):
        assert result_["saved_bytes"] == sum(result_["by_dtype"].values()) > 0
        assert result_["by_dtype"]["bfloat16"] > 0
    assert record["ratio"] == kbit["saved_bytes"] / bf16["saved_bytes"]
    # the same trainable start and the same batch: the losses differ only by rounding
    assert abs(bf16["loss"] - kbit["loss"]) < 0.05 * abs(bf16["loss"])


def test_a_missing_dataset_is_a_clear_error(tmp_path):
    backbone = write_tiny_backbone(tmp_path / "bb")
    items = write_item_embeddings(tmp_path / "items.safetensors", 30)
    result = subprocess.run([sys.executable, str(SCRIPT), "--backbone", str(backbone), "--dataset-dir",
                             str(tmp_path / "nowhere"), "--item-embeddings", str(items), "--out", str(tmp_path / "o.json")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "nowhere" in result.stderr
    assert not (tmp_path / "o.json").exists()
