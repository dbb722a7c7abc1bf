"""Stage 2: instruction tuning of the backbone (LoRA, Alpaca template), merged into a new backbone.

The paper instruction-tunes LLaMA2-13B once, before any recommendation training: LoRA on
``gate_proj``, ``up_proj`` and ``down_proj``, one epoch, the Alpaca prompt template, Platypus-style
data (not released). This module does the same on any resolved backbone folder (see
:mod:`e4srec.backbone`): causal-LM loss on the response tokens only (the prompt is masked, as in
alpaca-lora's ``train_on_inputs=False``), an EOS token after each response, AdamW with a cosine
schedule, seeded; then ``merge_and_unload`` and a new backbone folder in the same format, whose
``backbone.json`` records the parent backbone, the data's sha256 and every parameter.

Data: any Alpaca-format file (JSON list or JSONL of ``{"instruction", "input", "output"}``). The
suite's default is the 175 Self-Instruct seed tasks (Wang et al., 2022; Apache-2.0), converted by
:func:`convert_self_instruct`: a small set, a stand-in for the paper's unreleased data.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

from .backbone import load_backbone, load_tokenizer, read_backbone_record, write_backbone_folder
from .files import InputError, atomic_path, sha256_file, write_json
from .model import PAPER_LORA_MODULES, quiet_peft

log = logging.getLogger(__name__)

SELF_INSTRUCT_FILE = "self_instruct_seed_tasks.jsonl"
SELF_INSTRUCT_URL = ("https://raw.githubusercontent.com/yizhongw/self-instruct/"
                     "0b26ccaa415992100fa32df62d41b994cf928e23/data/seed_tasks.jsonl")
SELF_INSTRUCT_SHA256 = "7779004fa198fdf27cf70a159363879d8a26c53329e11b436af17b3941875f48"

# The Alpaca templates (alpaca-lora's templates/alpaca.json, which the official E4SRec code ships).
PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
FIELDS = ("instruction", "input", "output")


def alpaca_prompt(instruction: str, input: str = "") -> str:  # noqa: A002 (Alpaca's field name)
    """The Alpaca prompt up to and including ``### Response:\\n``."""
    if input:
        return PROMPT_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


# ----------------------------------------------------------------------------------------------
# Data


def fetch_self_instruct(dest: str | os.PathLike, mirror: str | os.PathLike | None = None) -> dict:
    """Copy the Self-Instruct seed tasks from ``mirror`` (a folder) or GitHub to ``dest``, sha256-verified."""
    source = str(Path(mirror) / SELF_INSTRUCT_FILE) if mirror else SELF_INSTRUCT_URL
    with atomic_path(dest) as tmp:
        try:
            if mirror:
                tmp.write_bytes(Path(source).read_bytes())
            else:
                with urllib.request.urlopen(source, timeout=60) as response:
                    tmp.write_bytes(response.read())
        except OSError as err:
            raise InputError(f"{source}: cannot fetch the Self-Instruct seed tasks ({err})") from None
        digest = sha256_file(tmp)
        if digest != SELF_INSTRUCT_SHA256:
            raise InputError(f"{source}: sha256 mismatch: expected {SELF_INSTRUCT_SHA256}, got {digest}")
    return {"source": source, "sha256": digest}


def convert_self_instruct(jsonl_path: str | os.PathLike, out_path: str | os.PathLike) -> dict:
    """Self-Instruct tasks (JSONL) -> Alpaca JSON list, one record per instance; return a record."""
    jsonl_path = Path(jsonl_path)
    if not jsonl_path.is_file():
        raise InputError(f"{jsonl_path}: file not found")
    records = []
    for line_no, line in enumerate(jsonl_path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            task = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{jsonl_path}:{line_no}: not valid JSON ({err.msg})") from None
        if not isinstance(task, dict) or "instruction" not in task or not isinstance(task.get("instances"), list):
            raise InputError(f"{jsonl_path}:{line_no}: a task needs 'instruction' and a list 'instances'")
        for number, instance in enumerate(task["instances"]):
            if not isinstance(instance, dict) or "output" not in instance:
                raise InputError(f"{jsonl_path}:{line_no}: instance {number} has no 'output'")
            records.append({"instruction": task["instruction"], "input": instance.get("input", ""),
                            "output": instance["output"]})
    if not records:
        raise InputError(f"{jsonl_path}: no tasks")
    write_json(out_path, records)
    return {"source": str(jsonl_path), "source_sha256": sha256_file(jsonl_path), "records": len(records),
            "out": str(out_path), "sha256": sha256_file(out_path)}


def load_alpaca(path: str | os.PathLike) -> list[dict]:
    """Alpaca records from a JSON list or a JSONL file; every problem names file, record and field."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    text = path.read_text(encoding="utf-8")
    try:
        loaded = json.loads(text)
        records = loaded if isinstance(loaded, list) else [loaded]
        where = lambda i: f"{path}: record {i}"  # noqa: E731
    except json.JSONDecodeError:
        records, lines = [], []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise InputError(f"{path}:{line_no}: neither a JSON document nor JSON lines ({err.msg})") from None
            lines.append(line_no)
        where = lambda i: f"{path}:{lines[i]}: record {i}"  # noqa: E731
    if not records:
        raise InputError(f"{path}: no records")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise InputError(f"{where(index)}: expected an object with {list(FIELDS)}")
        for field in FIELDS:
            if field not in record:
                raise InputError(f"{where(index)}: missing field {field!r}")
            if not isinstance(record[field], str):
                raise InputError(f"{where(index)}: field {field!r} must be a string")
        if not record["instruction"].strip() or not record["output"].strip():
            raise InputError(f"{where(index)}: empty 'instruction' or 'output'")
    return [{field: record[field] for field in FIELDS} for record in records]


# ----------------------------------------------------------------------------------------------
# Tuning


@dataclasses.dataclass
class InstructConfig:
    """Stage 2 settings (LoRA as in the paper; trainer settings as alpaca-lora where unstated)."""

    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: list[str] = dataclasses.field(default_factory=lambda: list(PAPER_LORA_MODULES))
    epochs: int = 1
    learning_rate: float = 3e-4
    weight_decay: float = 0.0
    batch_size: int = 16  # examples per optimizer step
    micro_batch_size: int = 16  # examples per forward (gradient accumulation = batch_size / micro_batch_size)
    warmup_steps: int = 0
    max_length: int = 512  # tokens per example (prompt + response + EOS), longer ones cut at the end
    max_examples: int | None = None  # first N records only (quick profiles)
    max_steps: int | None = None  # cap on optimizer steps (tests)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # backbone weights while tuning: auto (bf16 on a GPU, float32 on the CPU)

    @classmethod
    def from_dict(cls, params: dict | None) -> "InstructConfig":
        params = dict(params or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise InputError(f"instruction tuning: unknown parameter(s) {unknown}; known: {sorted(known)}")
        config = cls(**params)
        if config.batch_size % config.micro_batch_size:
            raise InputError(f"instruction tuning: batch_size {config.batch_size} is not a multiple of "
                             f"micro_batch_size {config.micro_batch_size}")
        return config


def tokenize_examples(records: list[dict], tokenizer, max_length: int) -> tuple[list[list[int]], list[int]]:
    """(token ids, prompt length) per example: prompt, response, EOS; examples whose prompt fills
    ``max_length`` are dropped (no response token would be trained)."""
    examples, prompt_lengths = [], []
    for record in records:
        prompt = tokenizer(alpaca_prompt(record["instruction"], record["input"]))["input_ids"]
        response = tokenizer(record["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt + response)[:max_length]
        if len(prompt) >= len(ids):
            continue
        examples.append(ids)
        prompt_lengths.append(len(prompt))
    return examples, prompt_lengths


def _batch(examples, prompt_lengths, index, pad_id, device) -> dict[str, torch.Tensor]:
    width = max(len(examples[i]) for i in index)
    input_ids = torch.full((len(index), width), pad_id, dtype=torch.long)
    labels = torch.full((len(index), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(index), width), dtype=torch.long)
    for row, i in enumerate(index):
        ids = torch.tensor(examples[i], dtype=torch.long)
        input_ids[row, :len(ids)] = ids
        attention_mask[row, :len(ids)] = 1
        labels[row, prompt_lengths[i]:len(ids)] = ids[prompt_lengths[i]:]  # response tokens and EOS only
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device), "labels": labels.to(device)}


def instruction_tune(backbone_dir: str | os.PathLike, data_path: str | os.PathLike, out_dir: str | os.PathLike,
                     params: dict | None = None) -> dict:
    """LoRA-tune the backbone on Alpaca data, merge, write a new backbone folder; return its record."""
    from peft import LoraConfig, get_peft_model
    from transformers import get_cosine_schedule_with_warmup

    config = InstructConfig.from_dict(params)
    parent = read_backbone_record(backbone_dir)
    records = load_alpaca(data_path)
    used = records[:config.max_examples] if config.max_examples else records
    device = torch.device("cuda" if config.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if config.device == "auto" else config.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("instruction tuning: device cuda was asked for, but no GPU is visible")
    tokenizer = load_tokenizer(backbone_dir)
    examples, prompt_lengths = tokenize_examples(used, tokenizer, config.max_length)
    if not examples:
        raise InputError(f"{data_path}: no example leaves room for a response within max_length {config.max_length}")

    torch.manual_seed(config.seed)
    base = load_backbone(backbone_dir, device=device, dtype=config.dtype, causal_lm=True)
    base.requires_grad_(False)
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.target_modules), bias="none", task_type="CAUSAL_LM")
    with quiet_peft():
        model = get_peft_model(base, lora)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(examples) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, total_steps)
    half = base.get_input_embeddings().weight.dtype
    autocast = (torch.autocast(device_type=device.type, dtype=half) if half != torch.float32
                else torch.autocast(device_type=device.type, enabled=False))

    rng = np.random.default_rng(config.seed)
    losses, step, started = [], 0, time.perf_counter()
    model.train()
    for epoch in range(config.epochs):
        order = rng.permutation(len(examples))
        for start in range(0, len(order), config.batch_size):
            if step >= total_steps:
                break
            batch_index = order[start:start + config.batch_size]
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            micro = [batch_index[i:i + config.micro_batch_size] for i in range(0, len(batch_index), config.micro_batch_size)]
            for index in micro:
                batch = _batch(examples, prompt_lengths, index, tokenizer.pad_token_id, device)
                with autocast:
                    loss = model(**batch).loss / len(micro)
                loss.backward()
                step_loss += loss.detach()
            optimizer.step()
            scheduler.step()
            step += 1
            losses.append(float(step_loss))
            log.info("instruction tuning step %d/%d: loss %.4f", step, total_steps, losses[-1])
    seconds = time.perf_counter() - started
    if not losses or not all(math.isfinite(x) for x in losses):
        raise FloatingPointError(f"instruction tuning diverged (losses {losses[-5:]}): lower the learning rate")

    merged = model.merge_and_unload()
    record = {
        "source": f"instruction-tuned {Path(backbone_dir).resolve()}",
        "source_sha256": parent["weights_sha256"],
        "parent": {k: parent.get(k) for k in ("source", "source_sha256", "weights_sha256", "dtype")},
        "instruction_tuning": {
            "data": {"path": str(Path(data_path).resolve()), "sha256": sha256_file(data_path),
                     "records": len(records), "used": len(used), "trained": len(examples),
                     "dropped_too_long": len(used) - len(examples)},
            "params": dataclasses.asdict(config), "template": "alpaca (alpaca-lora templates/alpaca.json)",
            "loss": "causal LM on response tokens + EOS (prompt masked)",
            "steps": step, "losses": losses, "seconds": seconds, "device": str(device),
        },
    }
    return write_backbone_folder(merged.to("cpu"), tokenizer, out_dir, record, dtype=parent.get("dtype", "bfloat16"))
