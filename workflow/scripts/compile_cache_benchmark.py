#!/usr/bin/env python
"""The compile cache across processes: the same short E4SRec training twice, each in a fresh process,
the first with an empty cache folder; write ONE JSON record (provenance included) and print a table.

Each run is ``e4srec train`` (the workflow's command, run in-process by a fresh Python subprocess of
this script) with ``--compile-cache <folder>`` (``e4srec.compile_cache``): the first run compiles and
fills the folder, the second finds what the first compiled. Per run it reports:

- ``first_step_seconds``: from starting the process to the first optimizer step done (GPU
  synchronised): Python and torch imports, loading the data and the backbone, and compiling (the
  first width bucket's graph, forward and backward);
- ``compile_seconds``: the run's seconds in torch.compile (``run.json``'s ``compile_cache``, Dynamo's
  ``entire_frame_compile`` + ``entire_backward_compile``: every graph, cached or not);
- ``first_epoch_seconds``: the trainer's seconds of epoch 0's training part (``training.epochs[0]``);
- the FX graph and AOTAutograd cache counters (hits, misses, ...) and the whole process's seconds;
- the epoch losses and validation NDCG@10, and whether the runs' losses are equal (bit for bit on the
  CPU; on a GPU a fresh compile may autotune to other kernels than a cached one).

Inputs: a prepared dataset folder (``--dataset-dir``: ``sequences.parquet``, ``negatives.parquet``
and ``dataset.json``, as ``e4srec prepare`` writes them: the workflow's ``<out>/data/<name>``), or a raw
S3-Rec file (``--raw Beauty.txt``: prepared here as the workflow does, max_len 50, 99 negatives drawn
with seed 2023), or ``--tiny-dataset`` (the tests' seeded tiny dataset). The backbone is a resolved folder
(``backbone.json``), or anything ``e4srec backbone`` resolves (a ``.gguf`` file, ``embedded``,
``tiny-random``): it is resolved once into ``<work>/backbone`` (untimed; bfloat16 on a GPU). The item
table is ``--item-embeddings`` or a seeded random one (the timings do not depend on its values).

On a GPU machine (from the repository root; the gguf package importable for a ``.gguf`` backbone)::

    python workflow/scripts/compile_cache_benchmark.py --dataset-dir results/paper/data/Beauty \\
        --backbone /tmp/bb/SmolLM2-135M-Instruct.Q4_1.gguf --compile-scope layers --epochs 1 \\
        --out compile_cache_layers.json

``--compile-scope step`` compiles every width bucket of the whole step (minutes on an H100): cap an
epoch with ``--max-steps``, or run ``--runs 1`` twice on one ``--work`` and ``--cache-dir`` (the
second with ``--warm-start``), to stay within a time limit. On the CPU, to check the script (CPU
Inductor compiles C++)::

    python workflow/scripts/compile_cache_benchmark.py --tiny-dataset --backbone tiny-random \\
        --device cpu --max-steps 6 --out compile_cache_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SPAWNED = "E4SREC_BENCHMARK_SPAWNED"  # the parent's wall clock when it started the run's process
DEFAULT_TRAIN = {"batch_size": 16, "scheduler": "cosine", "weight_decay": 0.1, "eval_batch_size": 256,
                 "learning_rate": 3e-4, "warmup_steps": 100, "patience": 100, "group_by_length": True}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="The same short E4SRec training twice in fresh processes sharing one compile cache "
                    "(empty at first): compile seconds, first step and first epoch, cache hits and misses.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--dataset-dir", help="prepared dataset folder (sequences.parquet, negatives.parquet, dataset.json)")
    data.add_argument("--raw", help="a raw S3-Rec file (Beauty.txt: one line per user), prepared here")
    data.add_argument("--tiny-dataset", action="store_true", help="the tests' seeded tiny dataset (CPU check)")
    parser.add_argument("--backbone", default="embedded",
                        help="a resolved backbone folder, or a .gguf file / 'embedded' / 'tiny-random' to resolve")
    parser.add_argument("--item-embeddings", help="E4SRec's item table (safetensors); default: seeded random")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=None, help="training steps an epoch at most (default: all)")
    parser.add_argument("--compile-scope", choices=["layers", "step"], default="layers")
    parser.add_argument("--training", choices=["packed", "examples"], default="packed")
    parser.add_argument("--params", default="{}", help="more E4SRec parameters, a JSON object")
    parser.add_argument("--train-params", default="{}",
                        help=f"trainer settings over {json.dumps(DEFAULT_TRAIN)}, a JSON object")
    parser.add_argument("--runs", type=int, default=2, help="runs, one after the other, each in a fresh process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=int, help="CPU threads of each run (e4srec train --threads)")
    parser.add_argument("--work", help="folder for the runs, the cache, the prepared data (default: a temporary one)")
    parser.add_argument("--cache-dir", help="the compile cache folder (default <work>/compile_cache); must be "
                                            "empty or absent")
    parser.add_argument("--warm-start", action="store_true",
                        help="let the first run find a non-empty cache (a later invocation on the same --cache-dir, "
                             "when two runs do not fit one time limit); recorded")
    parser.add_argument("--out", default="compile_cache_benchmark.json", help="JSON record to write")
    return parser.parse_args(argv)


def log(message: str) -> None:
    print(f"[compile_cache_benchmark] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# One run's process: `e4srec train`, timed to its first optimizer step


def child(result_path: str, argv: list[str]) -> int:
    """A run's process: ``e4srec train`` in-process, with a hook that notes when the first optimizer
    step is done. torch is imported first (its compile caches read their settings later, when
    Inductor is imported; ``e4srec`` configures them before that)."""
    spawned = float(os.environ[SPAWNED])
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    noted: dict = {}

    def first_step(optimizer, args, kwargs) -> None:
        if noted:
            return
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        noted["first_step_seconds"] = time.time() - spawned

    handle = register_optimizer_step_post_hook(first_step)
    sys.path.insert(0, str(ROOT))
    from e4srec import cli

    status = cli.main(argv)
    handle.remove()
    Path(result_path).write_text(json.dumps({**noted, "status": status}))
    return status


# ----------------------------------------------------------------------------------------------


def prepare_inputs(args, work: Path, device: str) -> tuple[Path, Path, Path]:
    """(dataset folder, resolved backbone folder, item table): prepared, resolved or drawn as asked."""
    import torch

    from e4srec.backbone import read_backbone_record, resolve_backbone
    from e4srec.data import SequenceData, prepare
    from e4srec.files import save_tensors, sha256_file

    if args.dataset_dir:
        dataset = Path(args.dataset_dir)
        if not (dataset / "dataset.json").is_file():
            raise SystemExit(f"{dataset}: not a prepared dataset folder (no dataset.json; write one with "
                             "`e4srec prepare`, take the workflow's <out>/data/<name>, or pass --raw)")
    elif args.raw:
        dataset = work / "data" / Path(args.raw).stem
        log(f"preparing {args.raw} into {dataset}")
        prepare(Path(args.raw).stem, args.raw, dataset, raw_record={"sha256": sha256_file(args.raw)}, max_len=50)
    else:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_llm import write_tiny_dataset

        dataset = write_tiny_dataset(work / "data" / "tiny", n_users=48, n_items=40)
    backbone = Path(args.backbone)
    if not (backbone / "backbone.json").is_file():
        target = work / "backbone"
        log(f"resolving {args.backbone} into {target}")
        resolve_backbone(args.backbone, target, dtype="bfloat16" if device == "cuda" else "float32")
        backbone = target
    read_backbone_record(backbone)
    if args.item_embeddings:
        table = Path(args.item_embeddings)
    else:
        data = SequenceData.load(dataset)
        table = work / "item_embeddings.safetensors"
        values = torch.randn(data.n_items + 1, 64, generator=torch.Generator().manual_seed(args.seed))
        values[0] = 0
        save_tensors(table, {"item_embeddings": values})
    return dataset, backbone, table


def train_command(args, dataset: Path, backbone: Path, table: Path, out: Path, device: str,
                  cache: Path | None) -> list[str]:
    """The arguments of one run's ``e4srec train`` (``cache`` None: without ``--compile-cache``)."""
    params = {"compile": "always", "compile_scope": args.compile_scope, "training": args.training,
              **json.loads(args.params)}
    train = {**DEFAULT_TRAIN, "epochs": args.epochs, "device": device, **json.loads(args.train_params)}
    if args.max_steps:
        train["max_steps_per_epoch"] = args.max_steps
    command = ["train", "--dataset-dir", str(dataset), "--model", "E4SRec", "--seed", str(args.seed),
               "--params", json.dumps(params), "--train-params", json.dumps(train), "--backbone", str(backbone),
               "--item-embeddings", str(table), "--out", str(out), "--no-progress"]
    if args.threads:
        command += ["--threads", str(args.threads)]
    return command + (["--compile-cache", str(cache)] if cache is not None else [])


def run_once(index: int, args, work: Path, cache: Path, dataset: Path, backbone: Path, table: Path,
             device: str) -> dict:
    """One run in a fresh process; its timings, counters and losses."""
    from e4srec.files import read_json

    out = work / f"run{index}"
    shutil.rmtree(out, ignore_errors=True)  # a run folder left from before would be resumed, not trained
    command = train_command(args, dataset, backbone, table, out, device, cache)
    result = work / f"run{index}.child.json"
    environment = {**os.environ, SPAWNED: repr(time.time())}
    started = time.perf_counter()
    process = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(result), "--", *command],
                             env=environment, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    (work / f"run{index}.log").write_text(process.stdout + process.stderr)
    if process.returncode != 0:
        raise SystemExit(f"run {index} failed (exit {process.returncode}); its log:\n{process.stderr[-4000:]}")
    noted, record = json.loads(result.read_text()), read_json(out / "run.json")
    epochs = record["training"]["epochs"]
    cached = record["compile_cache"]
    return {"run": index, "process_seconds": seconds,
            "first_step_seconds": noted.get("first_step_seconds"), "compile_seconds": cached["compile_seconds"],
            "first_epoch_seconds": epochs[0]["seconds"] if epochs else None,
            "epoch_seconds": [epoch["seconds"] for epoch in epochs], "losses": [epoch["loss"] for epoch in epochs],
            "valid_ndcg10": [epoch["valid_ndcg10"] for epoch in epochs],
            "test_ndcg10": record["metrics"]["test_full"]["NDCG@10"], "counters": cached["counters"],
            "cache": {key: cached[key] for key in ("enabled", "folder", "fx_graph_cache", "autograd_cache")},
            "steps": record["training"]["step"], "command": ["e4srec", *command]}


def cache_files(folder: Path) -> int:
    return sum(1 for path in folder.rglob("*") if path.is_file()) if folder.exists() else 0


def markdown(runs: list[dict]) -> str:
    lines = ["| run | cache files before | process start to first step | compile | first epoch | whole process "
             "| FX graph hits / misses | AOTAutograd hits / misses |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        c = run["counters"]
        lines.append(f"| {run['run']} | {run['cache_files_before']} | {run['first_step_seconds']:.1f} s | "
                     f"{run['compile_seconds']:.1f} s | {run['first_epoch_seconds']:.1f} s | {run['process_seconds']:.1f} s | "
                     f"{c['fxgraph_cache_hit']} / {c['fxgraph_cache_miss']} | "
                     f"{c['autograd_cache_hit']} / {c['autograd_cache_miss']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child(argv[1], argv[3:] if argv[2:3] == ["--"] else argv[2:])
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch

    from e4srec import provenance
    from e4srec.files import read_json, write_json

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU is visible")
    work = Path(args.work or tempfile.mkdtemp(prefix="compile_cache_benchmark."))
    work.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache_dir or work / "compile_cache").resolve()
    if cache_files(cache) and not args.warm_start:
        raise SystemExit(f"{cache}: not empty; the first run must start from an empty compile cache (or pass --warm-start)")
    dataset, backbone, table = prepare_inputs(args, work, device)
    runs = []
    for index in range(args.runs):
        before = cache_files(cache)
        log(f"run {index}: {before} files in {cache}")
        runs.append({**run_once(index, args, work, cache, dataset, backbone, table, device), "cache_files_before": before})
        log(f"run {index}: first step after {runs[-1]['first_step_seconds']:.1f} s, compile {runs[-1]['compile_seconds']:.1f} s, "
            f"first epoch {runs[-1]['first_epoch_seconds']:.1f} s, counters {runs[-1]['counters']}")
    table_text = markdown(runs)
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else None
    data_record = read_json(dataset / "dataset.json")
    record = provenance.record(
        benchmark="workflow/scripts/compile_cache_benchmark.py", arguments=vars(args), device=device, gpu=gpu,
        torch=torch.__version__, cuda=torch.version.cuda, torch_threads=torch.get_num_threads(),
        dataset={"dir": str(dataset), "name": data_record.get("name"), "statistics": data_record.get("statistics")},
        backbone=read_json(backbone / "backbone.json"), cache_dir=str(cache), cache_files_after=cache_files(cache),
        losses_equal=all(run["losses"] == runs[0]["losses"] for run in runs),
        test_ndcg10_equal=all(run["test_ndcg10"] == runs[0]["test_ndcg10"] for run in runs),
        runs=runs, table=table_text,
        what="each run a fresh process of `e4srec train --compile-cache`; run 0 starts from an empty cache folder")
    write_json(args.out, record)
    print(f"{data_record.get('name')}: {gpu or 'CPU'}, torch {torch.__version__}, compile_scope {args.compile_scope}\n")
    print(table_text)
    log(f"wrote {args.out} (runs in {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
