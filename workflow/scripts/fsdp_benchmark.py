#!/usr/bin/env python
"""FSDP against DDP at LLaMA2-13B's shape: memory per GPU and step time of E4SRec training; one JSON record.

Not run yet: it needs a machine with two (or more) CUDA GPUs of one host, at least 80 GB each
(an H100 x2 or H200 x2 kind). It reuses the DDP measurement of ``tests/benchmarks/records/scale_13b``
(its kit, backbone and training settings): a seeded random LLaMA2-13B-shaped backbone
(``workflow/scripts/random_backbone.py --preset 13b``, 12.94B parameters; its scores mean nothing),
E4SRec packed and eager on 2,000 sampled Beauty users, 16 users a global batch, learning rate 3e-4,
cosine with 25 warm-up steps, weight decay 0.1, length-grouped batches, seed 0. Then, one after
another, each alone on the GPUs, through the rules' own launch commands (workflow/rules/common.smk):

  ddp   ``accelerate launch --multi_gpu --num_processes N ... -m e4srec.cli train``
  fsdp  ``accelerate launch --use_fsdp --fsdp_version 2 --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP
        --fsdp_reshard_after_forward true --fsdp_cpu_ram_efficient_loading false --num_processes N ...``

``oom_retry`` is off in both (FSDP does not take it). For each: the exit status, the run's record
(``training``: epochs, seconds, peak memory of the main process), seconds a training step (the
epoch's training seconds over its steps, epoch 0 holding the warm-up), and every GPU's memory as
``nvidia-smi`` saw it, sampled each ``--sample-seconds`` (peak and median while training; this
counts the CUDA caching allocator's reserved memory and the context, which ``torch.cuda``'s peak
allocated does not). The record also holds the GPUs, the package versions and the commands.

How to run (from the repository root on the GPU machine, after building the kit as
tests/benchmarks/records/scale_13b/README.md says: a prepared dataset folder, SASRec's item table
on it, a resolved backbone for the tokenizer)::

    python workflow/scripts/fsdp_benchmark.py --dataset-dir KIT/data --item-embeddings KIT/items.safetensors \\
        --tokenizer-from KIT/tok --work /tmp/fsdp13b --out fsdp_vs_ddp_13b.json

(``--backbone DIR`` reuses a random 13B folder already written; ``--gpus 0,1`` picks the GPUs;
``--steps 60`` caps each epoch; ``--epochs 2``; ``--dry-run`` prints the commands and exits, which
also works without a GPU.) Not timed: each strategy loads the 26 GB of bf16 weights in every
process, trains the capped epochs and ranks the 2,000 users; the record is rewritten after each run,
so a run cut short keeps the ones before it. Without two CUDA GPUs it exits with status 3 before
doing anything.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

EXIT_NO_GPUS = 3
ROOT = Path(__file__).resolve().parents[2]
TRAIN = {"batch_size": 16, "epochs": 2, "learning_rate": 0.0003, "warmup_steps": 25, "scheduler": "cosine",
         "weight_decay": 0.1, "eval_batch_size": 256, "patience": 100, "group_by_length": True, "device": "cuda"}
PARAMS = {"training": "packed", "compile": "never", "load_in": "none"}
COMMON = ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
LAUNCH = {"ddp": ["--multi_gpu"],
          "fsdp": ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
                   "--fsdp_reshard_after_forward", "true", "--fsdp_cpu_ram_efficient_loading", "false"]}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dataset-dir", required=True, help="prepared dataset folder (e4srec prepare)")
    parser.add_argument("--item-embeddings", required=True, help="SASRec's item table on that dataset")
    parser.add_argument("--tokenizer-from", help="a resolved backbone whose tokenizer the random one takes")
    parser.add_argument("--backbone", help="a random 13B backbone folder already written (else one is written)")
    parser.add_argument("--work", default="/tmp/fsdp13b", help="folder for the backbone, runs and logs")
    parser.add_argument("--out", default="fsdp_vs_ddp_13b.json", help="the JSON record")
    parser.add_argument("--gpus", default="0,1", help="CUDA_VISIBLE_DEVICES of the runs (one process each)")
    parser.add_argument("--strategies", default="ddp,fsdp", help="comma-separated, in order")
    parser.add_argument("--epochs", type=int, default=TRAIN["epochs"])
    parser.add_argument("--steps", type=int, default=60, help="max_steps_per_epoch (0: the whole epoch)")
    parser.add_argument("--sample-seconds", type=float, default=1.0, help="nvidia-smi sampling interval")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds a run may take")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    return parser.parse_args(argv)


def train_command(strategy: str, args, backbone: Path, out: Path) -> list[str]:
    gpus = len(args.gpus.split(","))
    train = {**TRAIN, "epochs": args.epochs, **({"max_steps_per_epoch": args.steps} if args.steps else {})}
    return ["accelerate", "launch", *LAUNCH[strategy], "--num_processes", str(gpus), *COMMON, "-m", "e4srec.cli",
            "train", "--dataset-dir", args.dataset_dir, "--model", "E4SRec", "--backbone", str(backbone),
            "--item-embeddings", args.item_embeddings, "--no-progress", "--seed", "0",
            "--params", json.dumps(PARAMS), "--train-params", json.dumps(train), "--out", str(out)]


def gpu_memory_mib() -> list[int]:
    """Memory used on every visible GPU (nvidia-smi's index order), MiB."""
    text = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                          capture_output=True, text=True, check=True).stdout
    return [int(line) for line in text.split()]


class Sampler(threading.Thread):
    def __init__(self, every: float):
        super().__init__(daemon=True)
        self.every, self.samples, self.done = every, [], threading.Event()

    def run(self):
        while not self.done.is_set():
            self.samples.append((time.time(), gpu_memory_mib()))
            self.done.wait(self.every)

    def summary(self, indices: list[int]) -> dict:
        per_gpu = {str(i): [sample[i] for _, sample in self.samples] for i in indices}
        return {"samples": len(self.samples), "every_seconds": self.every,
                "peak_mib": {i: max(v) for i, v in per_gpu.items() if v},
                "median_mib": {i: statistics.median(v) for i, v in per_gpu.items() if v}}


def measure(strategy: str, args, backbone: Path, work: Path) -> dict:
    out = work / "runs" / strategy
    command = train_command(strategy, args, backbone, out)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": args.gpus, "OMP_NUM_THREADS": "4", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1"}
    sampler = Sampler(args.sample_seconds)
    sampler.start()
    started = time.time()
    with open(work / f"{strategy}.log", "w") as log:
        try:
            code = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    sampler.done.set()
    sampler.join()
    result = {"command": shlex.join(command), "exit": code, "wall_seconds": time.time() - started,
              "gpu_memory": sampler.summary([int(i) for i in args.gpus.split(",")])}
    if (out / "run.json").exists():
        record = json.loads((out / "run.json").read_text())
        training = record["training"]
        steps = [min(-(-e["examples"] // TRAIN["batch_size"]), args.steps or 10**9) for e in training["epochs"]]
        result.update(
            distributed_type=training["distributed_type"], world_size=training["world_size"],
            fsdp=training.get("fsdp"), peak_memory_mb_main_process=training["peak_memory_mb"],
            epochs=[{"epoch": e["epoch"], "loss": e["loss"], "valid_ndcg10": e["valid_ndcg10"], "seconds": e["seconds"],
                     "steps": n, "seconds_per_step": e["seconds"] / n} for e, n in zip(training["epochs"], steps)],
            test_full={k: record["metrics"]["test_full"].get(k) for k in ("HR@10", "NDCG@10")},
            backbone_weights_sha256=record.get("backbone", {}).get("weights_sha256"))
    else:
        result["log_tail"] = (work / f"{strategy}.log").read_text()[-3000:]
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.work)
    backbone = Path(args.backbone) if args.backbone else work / "random-13b"
    make_backbone = [sys.executable, "workflow/scripts/random_backbone.py", "--preset", "13b", "--seed", "0",
                     "--tokenizer-from", str(args.tokenizer_from), "--out", str(backbone), "--device", "cuda"]
    strategies = args.strategies.split(",")
    if args.dry_run:
        if not args.backbone:
            print(shlex.join(make_backbone))
        for strategy in strategies:
            print(f"CUDA_VISIBLE_DEVICES={args.gpus} " + shlex.join(train_command(strategy, args, backbone,
                                                                                  work / "runs" / strategy)))
        return 0
    import torch

    if torch.cuda.device_count() < 2 or len(args.gpus.split(",")) < 2:
        print(f"needs two CUDA GPUs of one host (visible: {torch.cuda.device_count()}, --gpus {args.gpus})",
              file=sys.stderr)
        return EXIT_NO_GPUS
    if not args.backbone and not args.tokenizer_from:
        print("--tokenizer-from is needed to write the random backbone (or pass --backbone)", file=sys.stderr)
        return 2
    work.mkdir(parents=True, exist_ok=True)
    import accelerate
    import peft
    import transformers

    record = {"what": "E4SRec training at LLaMA2-13B's shape (random weights): DDP against FSDP2, memory per GPU "
                      "and seconds a step", "gpus": subprocess.run(["nvidia-smi", "-L"], capture_output=True,
                                                                      text=True).stdout.splitlines(),
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "peft": peft.__version__, "accelerate": accelerate.__version__},
              "params": PARAMS, "train": {**TRAIN, "epochs": args.epochs, "max_steps_per_epoch": args.steps or None},
              "runs": {}}
    if not args.backbone:
        started = time.time()
        code = subprocess.run(make_backbone, cwd=ROOT, env={**os.environ, "CUDA_VISIBLE_DEVICES": args.gpus.split(",")[0]}
                              ).returncode
        record["backbone"] = {"command": shlex.join(make_backbone), "exit": code, "seconds": time.time() - started}
        if code:
            Path(args.out).write_text(json.dumps(record, indent=2))
            return 1
    for strategy in strategies:  # one after another, each alone on the GPUs
        record["runs"][strategy] = measure(strategy, args, backbone, work)
        Path(args.out).write_text(json.dumps(record, indent=2))  # written after each run
        print(strategy, json.dumps({k: v for k, v in record["runs"][strategy].items() if k != "log_tail"})[:2000])
    return 0 if all(run["exit"] == 0 for run in record["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
