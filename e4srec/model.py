"""E4SRec, stage 3: a frozen LLM reads a user's item-ID sequence and scores every item at once.

Paper: Li, Chen, Zhao, Zhang, Xing, "E4SRec: An Elegant Effective Efficient Extensible Solution of
Large Language Models for Sequential Recommendation", arXiv 2312.02443 (v1). Official code:
github.com/HestiaSky/E4SRec (``model.py``: ``LLM4Rec``; ``finetune.py``; ``utils/data_utils.py``).

The model, in build order (B users, S history positions, P prefix and R response tokens, H the
backbone's hidden size, N items)::

    history [B, S] --item_embeddings (frozen SASRec table, [N + 1, 64])--> [B, S, 64]
            --input_proj (trainable Linear 64 -> H)--> [B, S, H]
    [instruction prefix tokens (P)] + [projected history (S)] + [response tokens (R)]
            --frozen backbone + new LoRA (r 16, alpha 16, dropout 0.05 on gate/up/down_proj)-->
    hidden state of the last position [B, H] --item_scorer (trainable Linear H -> N + 1, no bias)-->
    scores [B, N + 1]; loss: cross-entropy over items 1..N.

Only ``input_proj``, ``item_scorer`` and the LoRA weights train; with the frozen table they are the
"pluggable components" of a dataset (see :mod:`e4srec.deploy`).

Speed (measured on an H200 with the 135M backbone, bf16, Beauty; paper/PERFORMANCE.md; a
step is bound by kernel launches and Python, not arithmetic):

- Training is compiled on a GPU (``compile="auto"``, CUDA graphs; about 1.5 minutes of compiling for
  one prompt per example, 4.5 for packed training's three width buckets at max_len 50):
  one prompt per example (``training="examples"``, the paper) at batch 16 takes 19.5 ms a step, a
  156 s epoch (eager: 198 ms, 1,583 s). Histories stay padded to ``max_len`` and an epoch's smaller
  last batch is padded to the first batch's size (padding rows leave the loss), so one graph serves.
  ``training="packed"`` reads each user's history once for all its targets: 29.6 s an epoch at 16
  users a batch and 14.5 s at 64, with length-grouped batches padded to widths 16, 32, ... max_len
  (a graph each). Eager training (the CPU, ``compile="never"``) pads each batch only to its own
  longest history. ``compile_scope="layers"`` compiles one decoder layer for all (regional
  compilation, no CUDA graphs; with a prefix KV cache in the layers' inputs, as when the CPU shares
  the prefix, each layer compiles its own graph since the cache is indexed by layer).
- Scoring runs the instruction prefix once, with batch size 1, and gives its keys and values to
  every user as a KV cache, cached until a LoRA weight changes. ``scoring="packed"`` (the default)
  puts the users' history and response tokens back to back in rows of ``eval_row_tokens``, with no
  padding between users and a 4D mask keeping each user to the prefix and its own tokens; the rows'
  prefix copies are the only per-pass overhead. ``scoring="padded"`` (the reference, and the BERT
  encoder's) gives each user a row padded to its chunk's longest history. Both give each user the
  hidden state of its own prompt (tested). With ranking, all 22,363 Beauty users in one batch:
  33,100 users/s packed, 68,800 with ``compile_scoring="always"`` (after 90 s of compiling), 7,000
  padded at batch 16,384; at batch 256 both layouts are launch-bound at about 3,300 users/s. On an
  H100: 27,700 and 56,700. In float64 (:func:`compute_in_float64`) every path gives every Beauty
  user the padded reference's rank, compiled packed included.
- Sharing the prefix in training halves the arithmetic but launches a second pass of kernels:
  on the 2-core CPU it pays (3.1 vs 5.7 s a step) and ``"auto"`` does it there; on the GPU it
  does not (388 vs 200 ms an eager step), except perhaps for a large, compute-bound backbone
  (``share_prefix="always"``).
- Input checks live in :meth:`E4SRec.recommend`, never in the training step; the eager step has
  one host sync (the batch's longest history), the compiled one none (packed: one, for the width).

Deliberate deviations from the paper and the official code (each a visible choice):

1. Inputs are cut to the last ``max_len`` (50) items, as for every model of the suite; the official
   code never cuts them.
2. The epoch is selected on the validation item by the shared trainer (NDCG@10, full ranking); the
   official code never uses the validation item.
3. The prompt follows the paper: the Alpaca template *with* an input section ("### Input:") and the
   ASCII apostrophe. The official code uses Alpaca's no-input template (no "### Input:" line) and
   "user’s" (U+2019). Both texts are fields of :class:`E4SRecConfig`; like the official code, no
   BOS token is added.
4. Padding: a batch's histories are left-padded inside the prompt (between the prefix and the items,
   as in the official collator), masked out, and their positions skipped by the position ids, so a
   user's scores do not depend on the other users of the batch (the official code lets padding
   shift the positions).
5. Where the prefix is shared in training, its LoRA dropout mask is shared by the batch; otherwise
   every path computes the same scores and gradients (tested).
6. The item scorer and the loss run in float32 even under bf16 autocast: bf16 scores over ~12k items
   tie often, and ties count against the target.
7. Column 0 (padding) of the item scorer is never a candidate: left out of the loss, -inf in scores.
8. The default backbone is SmolLM2-135M-Instruct (GGUF from PyPI, see :mod:`e4srec.backbone`), not
   LLaMA2-13B nor Platypus2-70B; it is loaded in bf16 on a GPU and float32 on the CPU unless
   ``load_in`` asks for 8-bit or 4-bit.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import types
import warnings
from pathlib import Path
from typing import ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .backbone import load_backbone, load_tokenizer, read_backbone_record, resolve_dtype
from .files import InputError, load_tensors, sha256_file
from .recommender import Recommender

PAPER_INSTRUCTION_PREFIX = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nGiven the user's purchase history, predict next possible item to be purchased.\n\n"
    "### Input:\n"
)
PAPER_RESPONSE_PREFIX = "\n### Response:\n"
SHARE_PREFIX = ("auto", "always", "never")
COMPILE = ("auto", "always", "never")
COMPILE_SCOPE = ("step", "layers")
TRAINING = ("examples", "packed")
SCORING = ("packed", "padded")
PACKED_MIN_WIDTH = 16  # packed compiled training: widths padded to 16, 32, ... max_len (few graphs)


# ----------------------------------------------------------------------------------------------
# Sub-modules and helpers


def load_item_embeddings(path: str | os.PathLike, n_items: int, dim: int | None = 64) -> torch.Tensor:
    """The frozen item table [n_items + 1, dim] (row 0 padding) from tensor ``item_embeddings`` of a
    safetensors file; a missing or truncated file, a missing tensor or a wrong shape names the file."""
    tensors = load_tensors(path)
    if "item_embeddings" not in tensors:
        raise InputError(f"{path}: no tensor 'item_embeddings' (found {sorted(tensors)[:5]})")
    return check_item_embeddings(tensors["item_embeddings"], n_items, dim, str(path))


def item_table(item_embeddings: str | os.PathLike | torch.Tensor | None, n_items: int, dim: int | None,
               model: str = "E4SRec") -> tuple[torch.Tensor, dict | None]:
    """(checked item table [n_items + 1, dim] in float32, its source {path, sha256} or None for a tensor)."""
    if item_embeddings is None:
        raise InputError(f"{model} needs item_embeddings: a safetensors file with tensor 'item_embeddings' "
                         f"[{n_items + 1}, {dim}] (SASRec's, stage 1)")
    if isinstance(item_embeddings, torch.Tensor):
        return check_item_embeddings(item_embeddings, n_items, dim, "item_embeddings"), None
    table = load_item_embeddings(item_embeddings, n_items, dim)
    return table, {"path": str(Path(item_embeddings).resolve()), "sha256": sha256_file(item_embeddings)}


def check_item_embeddings(table: torch.Tensor, n_items: int, dim: int | None, where: str) -> torch.Tensor:
    if table.ndim != 2:
        raise InputError(f"{where}: item_embeddings has shape {tuple(table.shape)}, expected [n_items + 1, dim]")
    if table.shape[0] != n_items + 1:
        raise InputError(f"{where}: item_embeddings has {table.shape[0]} rows, the dataset has {n_items} items "
                         f"(expected {n_items + 1} rows, row 0 padding): embeddings of another dataset?")
    if dim is not None and table.shape[1] != dim:
        raise InputError(f"{where}: item_embeddings has dimension {table.shape[1]}, expected {dim}")
    if not torch.isfinite(table).all():
        raise InputError(f"{where}: item_embeddings holds NaN or infinite values")
    return table.float()


def validate_histories(histories: Sequence[Sequence[int]], n_items: int, max_len: int,
                       where: str = "history") -> list[list[int]]:
    """Check user histories at the public API: non-empty, at most ``max_len``, ids in 1..n_items."""
    if isinstance(histories, (str, bytes)) or not isinstance(histories, Sequence):
        raise InputError(f"{where}: expected a list of histories (lists of item ids)")
    checked = []
    for index, history in enumerate(histories):
        name = f"{where}[{index}]" if len(histories) > 1 else where
        try:
            items = [int(i) for i in history]
        except (TypeError, ValueError):
            raise InputError(f"{name}: item ids must be integers, got {history!r}") from None
        if any(float(i) != float(j) for i, j in zip(items, history)):
            raise InputError(f"{name}: item ids must be integers, got {history!r}")
        if not items:
            raise InputError(f"{name}: empty history: E4SRec needs at least one item")
        if len(items) > max_len:
            raise InputError(f"{name}: {len(items)} items, more than max_len {max_len} (cut it to the last {max_len})")
        bad = [i for i in items if not 1 <= i <= n_items]
        if bad:
            raise InputError(f"{name}: unknown item id {bad[0]} (items are 1..{n_items}; 0 is padding)")
        checked.append(items)
    return checked


def left_pad_tensor(histories: list[list[int]], device) -> torch.Tensor:
    width = max(len(h) for h in histories)
    out = torch.zeros(len(histories), width, dtype=torch.long)
    for row, items in enumerate(histories):
        out[row, width - len(items):] = torch.tensor(items, dtype=torch.long)
    return out.to(device)


def trim_history(history: torch.Tensor) -> torch.Tensor:
    """[B, max_len] left-padded -> [B, S] with S the batch's longest history (one host sync)."""
    width = int((history > 0).sum(dim=1).max())
    return history[:, history.shape[1] - width:]


@contextlib.contextmanager
def quiet_peft():
    """Silence the FutureWarning PEFT triggers by calling a transformers API deprecated in 5.x."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _norm_in_input_dtype(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """A LLaMA-family RMSNorm computed in its input's dtype (the library's casts to float32)."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _rotary_in_input_dtype(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A default rotary embedding's (cos, sin) computed in ``x``'s dtype (the library's in float32)."""
    freqs = position_ids[..., None].to(x.dtype) * self.inv_freq.to(device=x.device, dtype=x.dtype)
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos() * self.attention_scaling, angles.sin() * self.attention_scaling


def compute_in_float64(model: nn.Module) -> nn.Module:
    """Turn ``model`` to float64 *throughout*, for rank-identity checks (issue "Performance", goal 2).

    ``model.to(torch.float64)`` leaves two float32 islands in a Hugging Face LLaMA-family backbone:
    the RMSNorm (``hidden_states.to(torch.float32)``, then back) and the rotary cos/sin
    (``.float()``). Eager paths run them through the same kernels for every layout, but a compiled
    graph fuses them into kernels of its own that round differently, so a float64 comparison would
    still move ranks at float32's precision. Here those modules compute in the model's dtype, the
    same in every path (eager or compiled, padded or packed), so that what is left between two
    paths is float64 rounding. Patches the modules of this model only; returns it. Raises
    :class:`InputError` for a rotary embedding other than the default (rope_type "default")."""
    model.to(torch.float64)
    for name, module in model.named_modules():
        if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_norm_in_input_dtype, module)
        elif hasattr(module, "inv_freq") and hasattr(module, "attention_scaling"):
            if getattr(module, "rope_type", "default") != "default":
                raise InputError(f"compute_in_float64: {name} is a {module.rope_type!r} rotary embedding; "
                                 "only the default one can be computed in float64 here")
            module.forward = types.MethodType(_rotary_in_input_dtype, module)
    return model


def chunk_bounds(widths: list[int], max_tokens: int, max_padding: int) -> list[tuple[int, int]]:
    """(start, stop) of consecutive chunks of ascending history ``widths`` for scoring.

    A chunk is padded to its last (longest) width; a new one starts where the current one would
    hold more than ``max_tokens`` positions or more than ``max_padding`` padding positions."""
    bounds, start, padding = [], 0, 0
    for row in range(1, len(widths)):
        size, width = row - start, max(widths[row], 1)
        grow = size * (width - max(widths[row - 1], 1))  # padding added to the rows already in the chunk
        if (size + 1) * width > max_tokens or padding + grow > max_padding:
            bounds.append((start, row))
            start, padding = row, 0
        else:
            padding += grow
    if widths:
        bounds.append((start, len(widths)))
    return bounds


def pack_rows(tokens: np.ndarray, row_tokens: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(row, start) of each user's block of ``tokens`` positions, filled in order into rows of width
    ``max(row_tokens, longest block)``, and that width (packed scoring)."""
    width = max(row_tokens, int(tokens.max(initial=1)))
    rows, starts = np.empty(len(tokens), dtype=np.int64), np.empty(len(tokens), dtype=np.int64)
    row = column = 0
    for user, size in enumerate(tokens.tolist()):
        if column + size > width:
            row, column = row + 1, 0
        rows[user], starts[user] = row, column
        column += size
    return rows, starts, width


def packed_pairs(sequence: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Windows [B, max_len + 1] -> [B, max_len] booleans: position j holds a (history, next item) pair
    (a tensor for a tensor, an array for an array)."""
    return (sequence[:, :-1] > 0) & (sequence[:, 1:] > 0)


def packed_width(longest: int, max_len: int) -> int:
    """The width a packed batch is padded to under compilation: 16, 32, 64, ... capped at ``max_len``."""
    width = PACKED_MIN_WIDTH
    while width < longest:
        width *= 2
    return min(width, max_len)


def _cache_keyword(model: nn.Module) -> str:
    """``cache`` (transformers >= 5.x) or ``past_key_values`` (older) for the decoder's forward."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    parameters = inspect.signature(base.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _cache_tensors(output) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (keys, values) of a decoder output's KV cache, whatever the transformers version."""
    cache = getattr(output, "cache", None)
    if cache is None:
        cache = output.past_key_values
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    return [tuple(layer[:2]) for layer in cache]


def _expanded_cache(layers: list[tuple[torch.Tensor, torch.Tensor]], batch_size: int, config):
    """A fresh DynamicCache holding the batch-1 prefix keys/values expanded (not copied) to the batch."""
    from transformers import DynamicCache

    data = [(k.expand(batch_size, -1, -1, -1), v.expand(batch_size, -1, -1, -1)) for k, v in layers]
    try:
        return DynamicCache(data, config=config)
    except TypeError:  # older signature
        return DynamicCache(data)


# ----------------------------------------------------------------------------------------------
# Configuration


PAPER_LORA_MODULES = ("gate_proj", "up_proj", "down_proj")  # LoRA targets of stages 2 and 3 (the paper)


@dataclasses.dataclass
class E4SRecConfig:
    """E4SRec's settings; defaults follow the paper (Section 4 and Table 5)."""

    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: list[str] = dataclasses.field(default_factory=lambda: list(PAPER_LORA_MODULES))
    instruction_prefix: str = PAPER_INSTRUCTION_PREFIX  # token embeddings before the history
    response_prefix: str = PAPER_RESPONSE_PREFIX  # token embeddings after it; its last position is read
    item_embedding_dim: int = 64  # SASRec's embedding size
    backbone_dtype: str = "auto"  # auto (bf16 on a GPU, float32 on the CPU) | float32 | bfloat16 | float16
    load_in: str = "none"  # none | 8bit | 4bit (bitsandbytes, GPU only)
    # where the instruction prefix runs once (batch 1) and its keys/values serve the whole batch: "auto"
    # (scoring, cached while the LoRA weights stay the same; training on the CPU only, where arithmetic
    # dominates: on a GPU a second pass of kernel launches costs more, 388 vs 200 ms an eager step),
    # "always", "never"
    share_prefix: str = "auto"
    # torch.compile the training loss (histories padded to max_len, batches to the first batch's size, so one
    # graph serves the run; CUDA graphs on a GPU: 22 vs 281 ms a step on an H200, after 1.5 to 4.5 min compiling):
    # "auto" (on a GPU with an unquantised backbone), "always", "never"
    compile: str = "auto"
    # What is compiled. "step": the whole training loss as one graph per shape, with CUDA graphs on a GPU
    # (fewest launches; each width bucket compiles the whole model again). "layers": regional compilation
    # (accelerate's compile_regions): the decoder layer is compiled once and every layer reuses it, the
    # rest runs eagerly, no CUDA graphs. Beauty, 64 users a batch, one H200: 70 s of compiling instead of
    # 413 s, then 33.6 s an epoch instead of 16.5 to 18.4 s, so "layers" wins for runs under about 20 epochs.
    compile_scope: str = "step"
    # "examples": one prompt per (history, next item), as the paper and the official code train.
    # "packed": one prompt per user holding every target of the user's last max_len + 1 training items:
    # the history is read once and each target position gets its own copy of the response tokens,
    # which see only the items up to that position (a 4D attention mask, positions as in its own
    # prompt), so each target's hidden state is the one its own "examples" prompt gives (tested).
    # Far fewer tokens and passes per epoch; a batch holds ``batch_size`` users, not examples.
    training: str = "examples"
    # Full-catalogue scoring. "packed": the users' history and response tokens back to back in rows of
    # ``eval_row_tokens`` (no padding between users), each token attending to the shared prefix (KV
    # cache) and its own user's earlier tokens (a 4D mask), so each user gets its own prompt's hidden
    # state (tested). "padded": one row per user, padded to the chunk's longest history.
    scoring: str = "packed"
    # torch.compile packed scoring's backbone pass (shapes dynamic: one graph for any number of rows):
    # "always" or "never" (the default until a GPU measurement says otherwise; paper/PERFORMANCE.md)
    compile_scoring: str = "never"
    eval_row_tokens: int = 256  # packed scoring: the width of a row (or the longest user's tokens, if more)
    eval_chunk_tokens: int = 32768  # scoring: at most this many positions a pass (users sorted by length)
    eval_chunk_padding: int | None = None  # padded scoring: padding positions a pass may hold (None: unlimited on a GPU, 16 on the CPU)

    def __post_init__(self):
        if not self.instruction_prefix:
            raise InputError("E4SRecConfig.instruction_prefix must not be empty")
        if self.share_prefix not in SHARE_PREFIX:
            raise InputError(f"E4SRecConfig.share_prefix: {self.share_prefix!r} is not one of {SHARE_PREFIX}")
        if self.compile not in COMPILE:
            raise InputError(f"E4SRecConfig.compile: {self.compile!r} is not one of {COMPILE}")
        if self.compile_scope not in COMPILE_SCOPE:
            raise InputError(f"E4SRecConfig.compile_scope: {self.compile_scope!r} is not one of {COMPILE_SCOPE}")
        if self.training not in TRAINING:
            raise InputError(f"E4SRecConfig.training: {self.training!r} is not one of {TRAINING}")
        if self.compile_scoring not in ("always", "never"):
            raise InputError(f"E4SRecConfig.compile_scoring: {self.compile_scoring!r} is not 'always' or 'never'")
        if self.scoring not in SCORING:
            raise InputError(f"E4SRecConfig.scoring: {self.scoring!r} is not one of {SCORING}")
        if self.eval_chunk_tokens < 1 or self.eval_row_tokens < 1:
            raise InputError("E4SRecConfig.eval_chunk_tokens and eval_row_tokens must be at least 1")


# ----------------------------------------------------------------------------------------------
# The model


class E4SRec(Recommender):
    """E4SRec on the suite's interface (``training_input`` "examples", or "sequences" when packed).

    Built from a resolved backbone folder (``backbone_dir``) and an item table (``item_embeddings``:
    a safetensors path or a tensor [n_items + 1, 64]). :mod:`e4srec.deploy` instead passes an already
    loaded PEFT ``backbone`` holding the adapter ``adapter_name`` (several datasets, one backbone).
    """

    config_class: ClassVar[type] = E4SRecConfig
    read_position: ClassVar[int] = -1  # the position whose hidden state is scored (the plain path)
    packs_targets: ClassVar[bool] = True  # training="packed" needs a causal decoder

    def __init__(self, n_items: int, n_users: int, max_len: int, config: E4SRecConfig | None = None,
                 backbone_dir: str | os.PathLike | None = None,
                 item_embeddings: str | os.PathLike | torch.Tensor | None = None, *,
                 backbone: nn.Module | None = None, tokenizer=None, backbone_record: dict | None = None,
                 adapter_name: str = "default"):
        super().__init__(n_items, n_users, max_len)
        self.config = config = config or self.config_class()
        if config.training == "packed" and not self.packs_targets:
            raise InputError(f"{type(self).__name__}: training='packed' needs a causal decoder backbone; "
                             "use training='examples'")
        if config.scoring == "packed" and not self.packs_targets:
            raise InputError(f"{type(self).__name__}: scoring='packed' needs a causal decoder backbone; "
                             "use scoring='padded'")
        table, self.item_embeddings_source = item_table(item_embeddings, n_items, config.item_embedding_dim)
        self.item_embeddings = nn.Embedding.from_pretrained(table, freeze=True, padding_idx=0)  # [N + 1, 64]

        if backbone is None:
            if backbone_dir is None:
                raise InputError("E4SRec needs backbone_dir (a folder written by `e4srec backbone`)")
            backbone_record = read_backbone_record(backbone_dir)
            device = "cuda" if torch.cuda.is_available() and config.load_in != "none" else "cpu"
            dtype = resolve_dtype(config.backbone_dtype, "cuda" if torch.cuda.is_available() else "cpu")
            base = load_backbone(backbone_dir, load_in=config.load_in, device=device, dtype=dtype)
            tokenizer = load_tokenizer(backbone_dir)
            backbone = self._add_lora(base, adapter_name)
        elif tokenizer is None or backbone_record is None:
            raise InputError("E4SRec: a shared backbone needs its tokenizer and backbone_record")
        elif adapter_name not in getattr(backbone, "peft_config", {}):
            raise InputError(f"E4SRec: the shared backbone has no adapter {adapter_name!r}")
        self.backbone = backbone  # PeftModel around the decoder (no LM head)
        self.adapter_name = adapter_name
        self.backbone_record = backbone_record
        self.hidden_size = hidden = backbone.get_input_embeddings().embedding_dim

        self.input_proj = nn.Linear(config.item_embedding_dim, hidden)  # [64] -> [H]
        self.item_scorer = nn.Linear(hidden, n_items + 1, bias=False)  # [H] -> [N + 1]

        self._register_prompt(tokenizer)
        self._cache_keyword = _cache_keyword(backbone)
        self._lora_parameters = [p for name, p in backbone.named_parameters()
                                 if "lora_" in name and f".{adapter_name}." in name]
        self._prefix_cache: tuple[tuple, list] | None = None
        # (compiled training loss, its batch size, the regionally compiled backbone or None), built at the first
        # compiled step
        self._compiled = None
        self._compiled_scoring = None  # the compiled packed scoring pass (compile_scoring="always")

    @property
    def training_input(self) -> str:
        """``examples``, or ``sequences`` (windows [B, max_len + 1]) under ``training="packed"``."""
        return "sequences" if self.config.training == "packed" else "examples"

    def _register_prompt(self, tokenizer) -> None:
        """Buffers ``prefix_ids`` [P] and ``response_ids`` [R]: the prompt around the history (no BOS)."""
        def token_ids(text: str) -> torch.Tensor:
            return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)

        self.register_buffer("prefix_ids", token_ids(self.config.instruction_prefix), persistent=False)  # [P]
        self.register_buffer("response_ids", token_ids(self.config.response_prefix), persistent=False)  # [R]

    def _lora_targets(self) -> list[str] | str:
        """PEFT's ``target_modules``: module-name suffixes (a subclass may give a regular expression)."""
        return list(self.config.target_modules)

    def _add_lora(self, base: nn.Module, adapter_name: str) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        if getattr(base, "is_loaded_in_8bit", False) or getattr(base, "is_loaded_in_4bit", False):
            from peft import prepare_model_for_kbit_training

            base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
        base.requires_grad_(False)
        lora = LoraConfig(r=self.config.lora_r, lora_alpha=self.config.lora_alpha,
                          lora_dropout=self.config.lora_dropout, target_modules=self._lora_targets(),
                          bias="none")
        with quiet_peft():
            return get_peft_model(base, lora, adapter_name=adapter_name)

    # -- building blocks ---------------------------------------------------------------------------

    def _activate(self) -> None:
        """Make this model's adapter the backbone's active one (several datasets share a backbone)."""
        if self.backbone.active_adapter != self.adapter_name:
            self.backbone.set_adapter(self.adapter_name, inference_mode=not self.training)

    def _autocast(self):
        """Half-precision backbones always run under autocast (the trainer only autocasts training)."""
        weight = self.backbone.get_input_embeddings().weight
        if weight.dtype in (torch.float32, torch.float64) or torch.is_autocast_enabled(weight.device.type):
            return contextlib.nullcontext()
        return torch.autocast(device_type=weight.device.type, dtype=weight.dtype)

    def _embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.backbone.get_input_embeddings()(ids)

    def _embed_history(self, history: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[B, S] item ids -> [B, S, H] projected SASRec embeddings in the backbone's dtype."""
        return self.input_proj(self.item_embeddings(history)).to(dtype)

    def _prefix_layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer keys/values [1, heads, P, d] of the instruction prefix (cached at inference)."""
        frozen = not self.training and not torch.is_grad_enabled()
        if frozen:
            key = (self.adapter_name, self.prefix_ids.device, torch.is_autocast_enabled(self.prefix_ids.device.type),
                   tuple(p._version for p in self._lora_parameters), tuple(p.data_ptr() for p in self._lora_parameters))
            if self._prefix_cache is not None and self._prefix_cache[0] == key:
                return self._prefix_cache[1]
        output = self.backbone(inputs_embeds=self._embed_tokens(self.prefix_ids)[None], use_cache=True)
        layers = _cache_tensors(output)
        self._prefix_cache = (key, layers) if frozen else None
        return layers

    def shares_prefix(self, device: torch.device) -> bool:
        mode = self.config.share_prefix
        return mode == "always" or (mode == "auto" and (not self.training or device.type == "cpu"))

    def backbone_tokens(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The prompt positions the backbone reads for a training batch, padding left out: the prefix
        (once a row, or not at all when shared), the history items and, per target, the response. A
        0-dim tensor on the batch's device (no host sync); the trainer sums it into tokens per second."""
        share = self.shares_prefix(batch["user"].device)
        prefix, response = (0 if share else self.prefix_ids.shape[0]), self.response_ids.shape[0]
        if "sequence" in batch:  # packed: each (position, next item) pair is an item and a response copy
            sequence = batch["sequence"]
            pairs = packed_pairs(sequence).sum()
            return pairs * (1 + response) + prefix * sequence.shape[0]
        return (batch["history"] > 0).sum() + batch["history"].shape[0] * (prefix + response)

    def last_hidden(self, history: torch.Tensor, share_prefix: bool | None = None) -> torch.Tensor:
        """[B, S] left-padded item ids (S: the batch's longest history) -> [B, H] last hidden state."""
        self._activate()
        with self._autocast():
            if not (self.shares_prefix(history.device) if share_prefix is None else share_prefix):
                return self._last_hidden_plain(history)
            batch_size = history.shape[0]
            prefix_len = self.prefix_ids.shape[0]
            response = self._embed_tokens(self.response_ids)[None]  # [1, R, H]
            embeds = torch.cat([self._embed_history(history, response.dtype),
                                response.expand(batch_size, -1, -1)], dim=1)  # [B, S + R, H]
            rest_mask = torch.cat([history > 0, history.new_ones(batch_size, response.shape[1], dtype=torch.bool)],
                                  dim=1)  # [B, S + R]
            attention_mask = torch.cat([rest_mask.new_ones(batch_size, prefix_len), rest_mask], dim=1)  # [B, P+S+R]
            position_ids = prefix_len - 1 + rest_mask.cumsum(dim=1)  # padding repeats the previous position
            cache = _expanded_cache(self._prefix_layers(), batch_size, self.backbone.get_base_model().config)
            output = self.backbone(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                   use_cache=True, **{self._cache_keyword: cache})
            return output.last_hidden_state[:, -1]  # [B, H]

    @torch.no_grad()
    def bare_backbone_hidden(self, history: torch.Tensor) -> torch.Tensor:
        """The backbone alone on the same prompts as :meth:`last_hidden`: LoRA off, the whole prompt for
        every user (no prefix cache), no item scorer. Table 4 times it beside E4SRec's scoring, as the
        paper times LLaMA2-13B's inference beside E4SRec's."""
        self._activate()
        with self._autocast(), self.backbone.disable_adapter():
            return self._last_hidden_plain(trim_history(history))

    def _last_hidden_plain(self, history: torch.Tensor, backbone: nn.Module | None = None) -> torch.Tensor:
        """The straightforward path: the whole prompt for every user, no cache (the reference).
        ``backbone``: the one to run (the regionally compiled training copy), by default ``self.backbone``."""
        batch_size = history.shape[0]
        prefix = self._embed_tokens(self.prefix_ids)[None].expand(batch_size, -1, -1)
        response = self._embed_tokens(self.response_ids)[None].expand(batch_size, -1, -1)
        embeds = torch.cat([prefix, self._embed_history(history, prefix.dtype), response], dim=1)
        ones = history.new_ones(batch_size, 1, dtype=torch.bool)
        attention_mask = torch.cat([ones.expand(-1, prefix.shape[1]), history > 0,
                                    ones.expand(-1, response.shape[1])], dim=1)
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        output = (backbone or self.backbone)(inputs_embeds=embeds, attention_mask=attention_mask,
                                             position_ids=position_ids, use_cache=False)
        return output.last_hidden_state[:, self.read_position]

    @property
    def score_dtype(self) -> torch.dtype:
        """float32, or float64 for a model turned to float64 (the rank-identity checks)."""
        return torch.promote_types(self.item_scorer.weight.dtype, torch.float32)

    def item_scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, H] -> [B, N + 1] scores in :attr:`score_dtype` (autocast off: bf16 scores tie)."""
        dtype = self.score_dtype
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return F.linear(hidden.to(dtype), self.item_scorer.weight.to(dtype))

    # -- packed training (``training="packed"``) ------------------------------------------------

    def _attention_mask_4d(self, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[B, Q, K] booleans (True: may attend) -> the 4D mask the backbone's attention takes as is."""
        implementation = getattr(self.backbone.get_base_model().config, "_attn_implementation", "eager")
        if implementation == "sdpa":
            return allowed[:, None]
        if implementation == "eager":
            return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
                ~allowed, torch.finfo(dtype).min)[:, None]
        raise InputError(f"E4SRec training='packed' needs a custom attention mask: attention implementation "
                         f"{implementation!r} does not take one (load the backbone with sdpa or eager attention)")

    def packed_hidden(self, inputs: torch.Tensor, share_prefix: bool | None = None,
                      backbone: nn.Module | None = None) -> torch.Tensor:
        """[B, S] left-padded item ids -> [B, S, H]: at position j, the hidden state that the prompt
        of the history ``inputs[:, :j + 1]`` alone gives (its response's last token).

        One pass per user: [prefix (P)] [items (S)] [S copies of the response tokens (R each)].
        Response copy j attends to the prefix, the items up to j and its own earlier tokens; items
        attend causally to the prefix and earlier items; padding is never attended to. Positions are
        those of copy j's own prompt (prefix 0..P-1, items P.., response right after item j).
        ``backbone``: as in :meth:`_last_hidden_plain`."""
        self._activate()
        batch_size, width = inputs.shape
        prefix_len, response_len = self.prefix_ids.shape[0], self.response_ids.shape[0]
        device = inputs.device
        share = self.shares_prefix(device) if share_prefix is None else share_prefix
        with self._autocast():
            response = self._embed_tokens(self.response_ids)  # [R, H]
            items = self._embed_history(inputs, response.dtype)  # [B, S, H]
            copies = response[None, None].expand(batch_size, width, -1, -1).reshape(batch_size, width * response_len, -1)
            valid = inputs > 0
            count = valid.cumsum(dim=1)  # [B, S] items up to and including j
            offsets = torch.arange(response_len, device=device)
            position_ids = torch.cat([prefix_len - 1 + count,  # padding repeats the previous position
                                      ((prefix_len + count)[:, :, None] + offsets).reshape(batch_size, -1)], dim=1)
            # who may attend to whom among items and response copies ([B, Q, Q], Q = S + S * R)
            seen = torch.ones(width, width, dtype=torch.bool, device=device).tril()[None] & valid[:, None, :]
            own_copy = torch.kron(torch.eye(width, device=device),
                                  torch.ones(response_len, response_len, device=device).tril()).bool()
            allowed = torch.cat([torch.cat([seen, seen.new_zeros(batch_size, width, width * response_len)], dim=2),
                                 torch.cat([seen.repeat_interleave(response_len, dim=1),
                                            own_copy[None].expand(batch_size, -1, -1)], dim=2)], dim=1)
            queries = allowed.shape[1]
            allowed = torch.cat([allowed.new_ones(batch_size, queries, prefix_len), allowed], dim=2)  # + prefix keys
            embeds = torch.cat([items, copies], dim=1)
            if share:
                cache = _expanded_cache(self._prefix_layers(), batch_size, self.backbone.get_base_model().config)
                extra = {"use_cache": True, self._cache_keyword: cache}
            else:  # the prefix runs in every row: its queries see only earlier prefix tokens
                prefix_rows = torch.cat([torch.ones(prefix_len, prefix_len, dtype=torch.bool, device=device).tril(),
                                         allowed.new_zeros(prefix_len, queries)], dim=1)
                allowed = torch.cat([prefix_rows[None].expand(batch_size, -1, -1), allowed], dim=1)
                embeds = torch.cat([self._embed_tokens(self.prefix_ids)[None].expand(batch_size, -1, -1), embeds], dim=1)
                position_ids = torch.cat([torch.arange(prefix_len, device=device)[None].expand(batch_size, -1),
                                          position_ids], dim=1)
                extra = {"use_cache": False}
            output = (backbone or self.backbone)(
                inputs_embeds=embeds, attention_mask=self._attention_mask_4d(allowed, embeds.dtype),
                position_ids=position_ids, **extra)
            hidden = output.last_hidden_state[:, -width * response_len:]
            return hidden.reshape(batch_size, width, response_len, -1)[:, :, -1]  # [B, S, H]

    def _packed_loss(self, sequence: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over every (history, next item) pair of the windows [B, max_len + 1], averaged
        over the batch's pairs; the eager path trims the batch to its longest window (one host sync)."""
        inputs, targets = sequence[:, :-1], sequence[:, 1:]
        if self.training and self.compiles(sequence.device):
            return self._compiled_loss(inputs, targets)
        keep = (inputs > 0) & (targets > 0)
        width = int(keep.sum(dim=1).max())
        inputs, targets, keep = inputs[:, -width:], targets[:, -width:], keep[:, -width:]
        hidden = self.packed_hidden(inputs)  # [B, S, H]
        scores = self.item_scores(hidden[keep])  # [pairs, N + 1]
        return F.cross_entropy(scores[:, 1:], targets[keep] - 1)

    def _static_packed_loss(self, inputs: torch.Tensor, targets: torch.Tensor,
                            backbone: nn.Module | None = None) -> torch.Tensor:
        """:meth:`_packed_loss` on fixed shapes, no host sync (padding pairs ignored)."""
        keep = (inputs > 0) & (targets > 0)
        scores = self.item_scores(self.packed_hidden(inputs, backbone=backbone))  # [B, S, N + 1]
        labels = torch.where(keep, targets - 1, torch.full_like(targets, -1))
        return F.cross_entropy(scores[..., 1:].flatten(0, 1), labels.flatten(), ignore_index=-1)

    # -- the recommender interface --------------------------------------------------------------

    def trim_batch(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Packed: the windows cut, on the host, to the batch's longest run of (history, next item)
        pairs, so that the compiled step knows its width without asking the device."""
        if "sequence" not in batch:
            return batch
        sequence = batch["sequence"]
        width = max(int(packed_pairs(sequence).sum(axis=1).max(initial=0)), 1)
        return {**batch, "sequence": sequence[:, -(width + 1):]}

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> float:
        """Packed: the (history, next item) pairs the loss averages over; examples: the examples."""
        if "sequence" in batch:
            return int(packed_pairs(batch["sequence"]).sum())
        return len(batch["user"])

    def calculate_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "sequence" in batch:  # training="packed"
            return self._packed_loss(batch["sequence"])
        history, target = batch["history"], batch["target"]
        if self.training and self.compiles(history.device):
            return self._compiled_loss(history, target)
        scores = self.item_scores(self.last_hidden(trim_history(history)))  # [B, N + 1]
        return F.cross_entropy(scores[:, 1:], target - 1)

    def compiles(self, device: torch.device) -> bool:
        mode = self.config.compile
        return mode == "always" or (mode == "auto" and device.type == "cuda" and self.config.load_in == "none")

    def _static_loss(self, history: torch.Tensor, target: torch.Tensor,
                     backbone: nn.Module | None = None) -> torch.Tensor:
        """The loss on untrimmed [B, max_len] histories with a per-user prefix: fixed shapes, no host
        sync. Rows with target 0 are padding (all-padding history) and left out of the mean."""
        scores = self.item_scores(self._last_hidden_plain(history, backbone))
        return F.cross_entropy(scores[:, 1:], target - 1, ignore_index=-1)

    def _compiled_loss(self, history: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The compiled :meth:`_static_loss` (or, for packed windows, :meth:`_static_packed_loss`); a
        smaller batch (an epoch's last) is padded to the first batch's size so that it reuses the graph
        instead of compiling another. Packed windows, which the trainer cut to their longest run of
        pairs on the host (:meth:`trim_batch`), are padded to that width's bucket (:func:`packed_width`:
        a few graphs instead of one per width); the step makes no host sync.

        ``compile_scope="layers"``: the loss runs eagerly on a regionally compiled copy of the backbone
        (its modules and weights are the backbone's own; the copy is used by training steps only, so
        scoring never triggers a compile)."""
        packed = target.ndim == 2
        if self._compiled is None:
            function = self._static_packed_loss if packed else self._static_loss
            if self.config.compile_scope == "layers":
                from accelerate.utils import compile_regions

                self._compiled = (function, history.shape[0], compile_regions(self.backbone, dynamic=False))
            else:
                mode = "reduce-overhead" if history.device.type == "cuda" else None  # CUDA graphs
                self._compiled = (torch.compile(function, dynamic=False, mode=mode), history.shape[0], None)
        compiled, size, regions = self._compiled
        missing = size - history.shape[0]
        if missing > 0:
            history = torch.cat([history, history.new_zeros(missing, *history.shape[1:])])
            target = torch.cat([target, target.new_zeros(missing, *target.shape[1:])])
        if packed:  # left-padded to the width bucket; the width is the host's (see trim_batch): no sync
            missing = max(packed_width(history.shape[1], self.max_len) - history.shape[1], 0)
            history, target = F.pad(history, (missing, 0)), F.pad(target, (missing, 0))
        self._activate()
        with self._autocast():
            return compiled(history, target, regions)

    def full_sort_predict(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, N + 1] scores; column 0 (padding) is -inf."""
        scores = self.item_scores(self.user_hidden(batch["history"]))
        scores[:, 0] = float("-inf")
        return scores

    def user_hidden(self, history: torch.Tensor) -> torch.Tensor:
        """[B, S] left-padded item ids -> [B, H] last hidden states, ``config.scoring``'s way. Users
        are sorted by history length; a pass holds at most ``eval_chunk_tokens`` positions."""
        lengths = (history > 0).sum(dim=1)
        order = torch.argsort(lengths, stable=True)  # similar lengths share a pass (and, packed, a row)
        widths = lengths[order].cpu().numpy()  # one host sync per scoring batch
        hidden = torch.empty(history.shape[0], self.hidden_size, device=history.device, dtype=self.score_dtype)
        if self.config.scoring == "packed":
            return self._packed_user_hidden(history, order, widths, hidden)
        padding = self.config.eval_chunk_padding
        if padding is None:
            padding = self.config.eval_chunk_tokens if history.device.type == "cuda" else 16
        for start, stop in chunk_bounds(widths.tolist(), self.config.eval_chunk_tokens, padding):
            rows = order[start:stop]
            hidden[rows] = self.last_hidden(history[rows, history.shape[1] - widths[stop - 1]:]).to(hidden.dtype)
        return hidden

    def _packed_user_hidden(self, history: torch.Tensor, order: torch.Tensor, widths: np.ndarray,
                            hidden: torch.Tensor) -> torch.Tensor:
        """:meth:`user_hidden` with the users' tokens packed into rows (``scoring="packed"``): users in
        ``order``, of history lengths ``widths``; fills and returns ``hidden``."""
        tokens = widths + self.response_ids.shape[0]
        rows, starts, width = pack_rows(tokens, self.config.eval_row_tokens)
        rows_per_pass = max(1, self.config.eval_chunk_tokens // width)
        n_rows = int(rows[-1]) + 1 if len(rows) else 0
        bounds = [*np.searchsorted(rows, np.arange(0, n_rows, rows_per_pass)), len(rows)]
        for begin, stop in zip(bounds[:-1], bounds[1:]):
            users = order[begin:stop]
            hidden[users] = self._packed_pass(history[users], rows[begin:stop] - rows[begin], starts[begin:stop],
                                              tokens[begin:stop], width).to(hidden.dtype)
        return hidden

    def _packed_pass(self, history: torch.Tensor, rows: np.ndarray, starts: np.ndarray, tokens: np.ndarray,
                     width: int) -> torch.Tensor:
        """One pass of packed scoring: user u's ``tokens[u]`` positions (its items, then the response
        tokens) at ``starts[u]`` of row ``rows[u]`` -> [U, H], each user's last position."""
        self._activate()
        device, n_rows = history.device, int(rows[-1]) + 1
        prefix_len, response_len = self.prefix_ids.shape[0], self.response_ids.shape[0]
        user = np.repeat(np.arange(len(tokens)), tokens)  # per packed token: its user, offset, row, column
        offset = np.arange(len(user)) - np.repeat(np.cumsum(tokens) - tokens, tokens)
        n_items = tokens - response_len
        is_item = offset < n_items[user]
        to_device = lambda array: torch.from_numpy(array).to(device)  # noqa: E731
        row, column = to_device(rows[user]), to_device(starts[user] + offset)
        item_user, item_offset = user[is_item], offset[is_item]
        item_ids = history[to_device(item_user), to_device(history.shape[1] - n_items[item_user] + item_offset)]
        with self._autocast():
            response = self._embed_tokens(self.response_ids)  # [R, H]
            items = self._embed_history(item_ids, response.dtype)  # [T_items, H]
            embeds = response.new_zeros(n_rows, width, response.shape[-1])
            item_mask = to_device(is_item)
            embeds[row[item_mask], column[item_mask]] = items
            embeds[row[~item_mask], column[~item_mask]] = response[to_device(offset[~is_item] - n_items[user[~is_item]])]
            position_ids = torch.full((n_rows, width), prefix_len, dtype=torch.long, device=device)
            position_ids[row, column] = prefix_len + to_device(offset)
            owner = torch.full((n_rows, width), -1, dtype=torch.long, device=device)
            owner[row, column] = to_device(user)
            causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
            allowed = (owner[:, :, None] == owner[:, None, :]) & (owner[:, None, :] >= 0) & causal  # [rows, W, W]
            allowed = torch.cat([allowed.new_ones(n_rows, width, prefix_len), allowed], dim=2)  # + prefix keys
            forward = self._scoring_pass
            if self.config.compile_scoring == "always":
                if self._compiled_scoring is None:
                    self._compiled_scoring = torch.compile(self._scoring_pass, dynamic=True)
                forward = self._compiled_scoring
            prefix = [tensor for layer in self._prefix_layers() for tensor in layer]
            return forward(embeds, self._attention_mask_4d(allowed, embeds.dtype), position_ids,
                           to_device(rows), to_device(starts + tokens - 1), *prefix)  # [U, H]

    def _scoring_pass(self, embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                      rows: torch.Tensor, columns: torch.Tensor, *prefix: torch.Tensor) -> torch.Tensor:
        """The backbone over packed rows after the prefix (per-layer keys and values, flat) -> the
        hidden states at (``rows``, ``columns``): [U, H]."""
        cache = _expanded_cache(list(zip(prefix[0::2], prefix[1::2])), embeds.shape[0],
                                self.backbone.get_base_model().config)
        output = self.backbone(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=True, **{self._cache_keyword: cache})
        return output.last_hidden_state[rows, columns]

    @torch.no_grad()
    def recommend(self, histories: Sequence[Sequence[int]], k: int = 10,
                  exclude_history: bool = False) -> list[list[int]]:
        """Top-``k`` items (ids in 1..n_items, best first) for each history; inputs are checked here."""
        histories = validate_histories(histories, self.n_items, self.max_len)
        limit = self.n_items - (max(len(set(h)) for h in histories) if exclude_history else 0)
        if not 1 <= k <= limit:
            raise InputError(f"k={k}: must be between 1 and {limit} (items that can be recommended)")
        was_training = self.training
        self.eval()
        try:
            device = self.item_scorer.weight.device
            history = left_pad_tensor(histories, device)
            scores = self.full_sort_predict({"history": history})
            if exclude_history:
                scores.scatter_(1, history, float("-inf"))  # padding column 0 is already -inf
            return torch.topk(scores, k, dim=1).indices.cpu().tolist()
        finally:
            self.train(was_training)

    # -- pluggable components ----------------------------------------------------------------------

    def pluggable_state(self) -> dict[str, torch.Tensor]:
        """The trained projections (the LoRA weights are saved by PEFT, the table is a pointer)."""
        return {"input_proj.weight": self.input_proj.weight, "input_proj.bias": self.input_proj.bias,
                "item_scorer.weight": self.item_scorer.weight}

    def save_components(self, out_dir: str | os.PathLike, dataset: str | None = None,
                        item_embeddings_path: str | os.PathLike | None = None) -> dict:
        from .deploy import save_components

        return save_components(self, out_dir, dataset=dataset, item_embeddings_path=item_embeddings_path)
