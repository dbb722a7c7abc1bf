#!/usr/bin/env python
"""Time E4SRec and SASRec on a CUDA GPU; print ONE markdown table and write the numbers as JSON.

What is measured, on one prepared dataset (a folder written by ``e4srec prepare``:
``sequences.parquet``, ``negatives.parquet``, ``dataset.json``; the workflow's ``<out>/data/<name>``):

1. **E4SRec training step** (forward, backward, AdamW step, ``loss.item()``; bf16 autocast as in the
   shared trainer) on the dataset's own shuffled training batches, at each ``--batch-sizes`` (default
   16, the paper's, and 256), ``eager`` (``compile="never"``) and ``compiled`` (``compile="always"``:
   histories padded to max_len, one CUDA graph): the median of ``--steps`` timed steps after
   ``--warmup`` untimed ones, examples/s, the first step's seconds (for ``compiled``: the compile
   time) and the peak GPU memory.
2. **E4SRec full-catalogue scoring**: ``rank_split`` on the validation item (scores of every item,
   then the three rank protocols) for ``--eval-users`` users: users/s. The reference is the padded
   path (``scoring="padded"``, one row per user) at ``--eval-batch-size``; each of ``--eval-settings``
   (batch, positions a pass, layout) is compared with it, user by user. ``--eval-float32`` repeats
   them with the backbone in float32 and TF32 off, where rank identity is a fair test (in bf16 the
   kernels a shape picks already move ranks).
3. **SASRec epoch time** through the shared trainer (``train()``, batch 256, bf16), for each loss of
   ``--sasrec-losses``: the seconds of the training part of epoch 0 (warm-up included) and epoch 1.

The backbone is ``embedded`` (SmolLM2-135M-Instruct, resolved once into ``--backbone-cache`` as
``e4srec backbone`` does) or a resolved backbone folder (``resources/backbones/embedded-instruct``,
a LLaMA folder, ...). E4SRec's item table is ``--item-embeddings`` (a SASRec run's
``item_embeddings.safetensors``) or a seeded random one: the timings do not depend on its values.

Example (from the repository root, on the GPU machine)::

    python workflow/scripts/gpu_benchmark.py --dataset-dir results/paper/data/Beauty \\
        --backbone resources/backbones/embedded-instruct --out gpu_benchmark.json

Without a CUDA GPU it stops at once with a message and exit status 3 (``--cpu-smoke-test`` runs the
same code on the CPU with the sizes given, to check the script itself; its timings mean nothing).
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

EXIT_NO_GPU = 3
ROOT = Path(__file__).resolve().parents[2]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time E4SRec (training step eager vs compiled; full-catalogue scoring) and SASRec (epoch) "
                    "on a CUDA GPU; print one markdown table and write JSON.",
        epilog=f"Needs a CUDA GPU: without one it exits with status {EXIT_NO_GPU} "
               "(--cpu-smoke-test runs it on the CPU to check the script; its timings mean nothing).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dataset-dir", required=True, help="prepared dataset folder (sequences.parquet, ...)")
    parser.add_argument("--backbone", default="embedded", help="'embedded' or a resolved backbone folder")
    parser.add_argument("--backbone-cache", default="resources/backbones/embedded",
                        help="where 'embedded' is resolved (kept if already there)")
    parser.add_argument("--item-embeddings", help="E4SRec's item table (safetensors); default: seeded random")
    parser.add_argument("--out", default="gpu_benchmark.json", help="JSON file to write")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 256], help="E4SRec training batch sizes")
    parser.add_argument("--modes", nargs="+", choices=["eager", "compiled"], default=["eager", "compiled"],
                        help="E4SRec training modes")
    parser.add_argument("--trainings", nargs="*", choices=["examples", "packed"], default=["examples", "packed"],
                        help="E4SRec training layouts: one prompt per example (the paper) or per user (packed); "
                             "none: time scoring only")
    parser.add_argument("--packed-batch-sizes", type=int, nargs="+", default=[16, 64, 256],
                        help="E4SRec packed training batch sizes (users)")
    parser.add_argument("--epoch", action="store_true",
                        help="packed: also time one whole epoch (length-grouped batches, no validation)")
    parser.add_argument("--steps", type=int, default=30, help="timed E4SRec training steps per setting")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before them (compiling included)")
    parser.add_argument("--eval-users", type=int, default=4096, help="users scored (0: all)")
    parser.add_argument("--eval-batch-size", type=int, default=256, help="scoring batch (the paper profile's)")
    parser.add_argument("--eval-settings", nargs="*", default=["4096:262144", "16384:1048576"],
                        help="more scoring settings to time, BATCH:CHUNK_TOKENS[:LAYOUT[:ROW_TOKENS]] (users a batch : "
                             "positions a pass : packed (default), compiled (packed, torch.compile) or padded : "
                             "packed row width, default 256); their "
                             "ranks are compared with the reference's (padded, --eval-batch-size)")
    parser.add_argument("--eval-float32", action="store_true",
                        help="repeat the reference and the scoring settings in float32 (TF32 off)")
    parser.add_argument("--eval-float64", action="store_true",
                        help="repeat them in float64 too (backbone with its norms and rotary embedding, item "
                             "scorer and ranking: e4srec.model.compute_in_float64), where only "
                             "a different computation, not rounding, can change a rank")
    parser.add_argument("--skip-model-precision", action="store_true",
                        help="score only in the --eval-float32/--eval-float64 precisions, not the backbone's own")
    parser.add_argument("--components", help="a trained E4SRec run's components folder (its LoRA, projections "
                        "and item scorer; trained on --backbone) to score with, frozen (with --trainings and no layouts); "
                        "default: an untrained model")
    parser.add_argument("--bare-backbone", action="store_true",
                        help="also time a forward pass of the bare backbone on the same inputs (Table 4)")
    parser.add_argument("--sasrec-losses", nargs="*", choices=["bce", "ce"], default=["bce", "ce"],
                        help="SASRec losses to time an epoch of (none: skip SASRec)")
    parser.add_argument("--sasrec-batch-size", type=int, default=256)
    parser.add_argument("--skip-e4srec", action="store_true", help="time SASRec only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu-smoke-test", action="store_true",
                        help="run on the CPU (fp32, no GPU needed) to check the script; timings mean nothing")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Helpers


class Timer:
    """Wall-clock seconds of a block, synchronising the GPU before and after."""

    def __init__(self, device):
        import torch

        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def __enter__(self):
        self.sync()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.sync()
        self.seconds = time.perf_counter() - self.start


def free_memory(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def log(message: str) -> None:
    print(f"[gpu_benchmark] {message}", file=sys.stderr, flush=True)


def row(what: str, setting: str, batch: int | str, time_text: str, throughput: str, warmup: str,
        peak: float | None, **values) -> dict:
    return {"what": what, "setting": setting, "batch": batch, "time": time_text, "throughput": throughput,
            "warm-up": warmup, "peak GPU GiB": "-" if peak is None else f"{peak:.2f}", "epoch": "-", **values}


def per_second(value: float, unit: str) -> str:
    return f"{value:,.0f} {unit}/s" if value >= 100 else f"{value:.3g} {unit}/s"


def markdown(rows: list[dict]) -> str:
    columns = ["what", "setting", "batch", "time", "throughput", "epoch", "warm-up", "peak GPU GiB"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# E4SRec


def resolve_backbone_dir(args) -> Path:
    from e4srec.backbone import resolve_backbone

    if args.backbone == "embedded":
        log(f"resolving the embedded backbone into {args.backbone_cache}")
        resolve_backbone("embedded", args.backbone_cache, dtype="bfloat16")
        return Path(args.backbone_cache)
    return Path(args.backbone)


def build_e4srec(args, data, backbone_dir: Path, device):
    import torch

    from e4srec.model import E4SRec, E4SRecConfig

    if args.components:  # a trained model, loaded as a service loads it
        from e4srec.deploy import E4SRecService

        service = E4SRecService(backbone_dir, device=str(device))
        service.add(data.name, args.components)
        return service.model(data.name)
    if args.item_embeddings:
        table = args.item_embeddings
    else:
        table = torch.randn(data.n_items + 1, 64, generator=torch.Generator().manual_seed(args.seed))
        table[0] = 0
    torch.manual_seed(args.seed)
    model = E4SRec(data.n_items, data.n_users, data.max_len, E4SRecConfig(compile="never"),
                   backbone_dir=backbone_dir, item_embeddings=table)
    return model.to(device)


def targets_of(batch: dict) -> int:
    if "sequence" in batch:
        return int(((batch["sequence"][:, :-1] > 0) & (batch["sequence"][:, 1:] > 0)).sum())
    return len(batch["user"])


def time_e4srec_training(model, data, args, device, training: str, mode: str, batch_size: int) -> dict:
    import torch

    from e4srec.trainer import training_batches

    model.config.training = training  # one prompt per example, or per user (packed)
    model.train()
    model.config.compile = "always" if mode == "compiled" else "never"
    model._compiled = None  # a fresh graph for this batch size
    torch._dynamo.reset()
    free_memory(device)
    needed = args.warmup + args.steps
    batches, epoch = [], 0
    while len(batches) < needed:  # full batches only (the compiled graph has one size), cycling epochs
        n_batches, epoch_batches = training_batches(model, data, batch_size, args.seed, epoch, device)
        full = [b for b in epoch_batches if len(b["user"]) == batch_size]
        if not full:
            raise SystemExit(f"{data.name}: fewer than {batch_size} training rows")
        batches += full
        epoch += 1
    batches = batches[:needed]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4, weight_decay=0.1)
    seconds = [step(model, optimizer, batch, device, f"{training} {mode} batch {batch_size}") for batch in batches]
    timed = seconds[args.warmup:] or seconds
    median = statistics.median(timed)
    rows = batches[args.warmup:] or batches
    targets = sum(targets_of(b) for b in rows) / len(rows)
    tokens = sum(int(model.backbone_tokens(b)) for b in rows) / len(rows)
    epoch_estimate = median * n_batches
    return row(f"E4SRec training step ({training})", mode, f"{batch_size} {'users' if training == 'packed' else 'examples'}",
               f"{median * 1e3:.1f} ms/step", per_second(targets / median, "targets"),
               f"first step {seconds[0]:.1f} s", peak_gib(device), median_seconds=median, min_seconds=min(timed),
               steps=len(timed), first_step_seconds=seconds[0], warmup_steps=min(args.warmup, len(seconds) - len(timed)),
               targets_per_step=targets, tokens_per_step=tokens, tokens_per_second=tokens / median,
               batches_per_epoch=n_batches, epoch_seconds_estimate=epoch_estimate,
               epoch=f"{epoch_estimate:.3g} s (median step x {n_batches} steps)")


def step(model, optimizer, batch: dict, device, what: str) -> float:
    """One timed training step (forward under bf16 autocast on a GPU, backward, AdamW)."""
    import torch

    with Timer(device) as timer:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = loss.item()
    if value != value:
        raise FloatingPointError(f"E4SRec {what}: loss is NaN")
    return timer.seconds


def time_e4srec_epoch(model, data, args, device, mode: str, batch_size: int) -> dict:
    """One whole packed epoch (length-grouped batches, every batch, no validation), after a warm-up
    epoch that compiles every width bucket (timed separately)."""
    import torch

    from e4srec.trainer import training_batches

    model.config.training = "packed"
    model.train()
    model.config.compile = "always" if mode == "compiled" else "never"
    model._compiled = None
    torch._dynamo.reset()
    free_memory(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4, weight_decay=0.1)
    results = []
    for epoch in range(2):  # 0: warm-up (compiles), 1: timed
        n_batches, batches = training_batches(model, data, batch_size, args.seed, epoch, device, group_by_length=True)
        with Timer(device) as timer:
            targets = 0
            for batch in batches:
                step(model, optimizer, batch, device, f"packed epoch {mode} batch {batch_size}")
                targets += targets_of(batch)
        results.append((timer.seconds, targets, n_batches))
    (warm, _, _), (seconds, targets, n_batches) = results
    return row("E4SRec training epoch (packed, length-grouped)", mode, f"{batch_size} users",
               f"{seconds:.1f} s/epoch", per_second(targets / seconds, "targets"), f"epoch 0 {warm:.1f} s",
               peak_gib(device), epoch_seconds=seconds, warmup_epoch_seconds=warm, targets=targets,
               batches=n_batches, epoch=f"{seconds:.1f} s (measured)")


def time_e4srec_scoring(model, data, args, device, batch_size: int, chunk_tokens: int, layout: str,
                        row_tokens: int, reference=None) -> tuple[dict, object]:
    """Full-catalogue scoring and ranking of the validation item (``rank_split``) at one setting;
    returns (row, full ranks). With ``reference`` ranks, records how many users' ranks differ."""
    import numpy as np
    import torch

    from e4srec.evaluate import rank_split
    from e4srec.metrics import hit_rate, ndcg

    model.eval()
    model.config.eval_chunk_tokens, model.config.eval_row_tokens = chunk_tokens, row_tokens
    model.config.scoring = "padded" if layout == "padded" else "packed"
    model.config.compile_scoring = "always" if layout == "compiled" else "never"  # packed, compiled
    dtype = str(model.backbone.get_input_embeddings().weight.dtype).replace("torch.", "")
    free_memory(device)
    users = np.arange(data.n_users if not args.eval_users else min(args.eval_users, data.n_users))
    with torch.no_grad(), Timer(device) as warm:  # the prefix cache and kernels warm up on one batch
        rank_split(model.full_sort_predict, data, "valid", batch_size, device, users=users[:batch_size])
    with torch.no_grad(), Timer(device) as timer:
        ranks = rank_split(model.full_sort_predict, data, "valid", batch_size, device, users=users)
    assert len(ranks["full"]) == len(users)
    rate = len(users) / timer.seconds
    full = np.asarray(ranks["full"])
    quality = {"valid_hr10": hit_rate(full, 10), "valid_ndcg10": ndcg(full, 10)}
    same = None if reference is None else bool(np.array_equal(full, np.asarray(reference)))
    differ = None if reference is None else int((full != np.asarray(reference)).sum())
    return row(f"E4SRec scoring (rank_split, all items; {layout}, {dtype})",
               f"{len(users)} users, {chunk_tokens} positions a pass"
               + (f", rows of {row_tokens}" if layout != "padded" else ""), batch_size, f"{timer.seconds:.2f} s",
               per_second(rate, "users"), f"first batch {warm.seconds:.1f} s", peak_gib(device), seconds=timer.seconds,
               users=len(users), users_per_second=rate, warmup_seconds=warm.seconds, chunk_tokens=chunk_tokens,
               layout=layout, row_tokens=row_tokens if layout != "padded" else None, dtype=dtype, **quality,
               ranks_identical_to_first=same, ranks_differing=differ), full


def time_scoring_settings(model, data, args, device) -> list[dict]:
    """The reference (padded, ``--eval-batch-size``) and then each ``--eval-settings`` entry, compared
    with it; again in float32 with ``--eval-float32`` and in float64 throughout with ``--eval-float64``."""
    import torch

    from e4srec.model import compute_in_float64

    row_tokens = model.config.eval_row_tokens
    settings = [(args.eval_batch_size, model.config.eval_chunk_tokens, "padded", row_tokens)]
    for setting in args.eval_settings:
        batch_size, chunk_tokens, *rest = setting.split(":")
        layout = rest[0] if rest else "packed"
        settings.append((int(batch_size), int(chunk_tokens), layout, int(rest[1]) if len(rest) > 1 else row_tokens))
    rows = []
    precisions = ([] if args.skip_model_precision else ["model"]) + ["float32"] * args.eval_float32 \
        + ["float64"] * args.eval_float64
    for precision in precisions:
        if precision == "float64":  # the same (bf16-representable) weights; norms and rotary in float64 too
            compute_in_float64(model)
        elif precision == "float32":  # the same weights in float32
            model.to(torch.float32)
        if precision != "model":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        reference = None
        for batch_size, chunk_tokens, layout, width in settings:
            log(f"E4SRec scoring: {precision}, {layout}, batch {batch_size}, {chunk_tokens} positions a pass")
            scoring, ranks = time_e4srec_scoring(model, data, args, device, batch_size, chunk_tokens, layout,
                                                 width, reference)
            reference = ranks if reference is None else reference
            rows.append(scoring)
            log(f"{scoring['throughput']}, ranks differing from the reference: {scoring['ranks_differing']}, "
                f"valid HR@10 {scoring['valid_hr10']:.4f}, NDCG@10 {scoring['valid_ndcg10']:.5f}")
    return rows


def time_bare_backbone(model, data, args, device) -> dict:
    """A forward pass of the bare backbone (LoRA off, no prefix cache, no item scorer) on the same
    prompts as scoring, at ``--eval-batch-size``, all users (as the runs record it for Table 4)."""
    from e4srec.runs import time_bare_backbone as bare_backbone

    model.eval()
    free_memory(device)
    timing = bare_backbone(model, data, args.eval_batch_size, device)
    return row("bare backbone forward (no LoRA, no cache, no scorer)", f"{timing['users']} users",
               args.eval_batch_size, f"{timing['seconds']:.2f} s", per_second(timing["users_per_second"], "users"),
               "-", peak_gib(device), **{key: value for key, value in timing.items() if key != "what"})


# ----------------------------------------------------------------------------------------------
# SASRec


def time_sasrec_epochs(data, args, device, loss: str) -> dict:
    from e4srec.runs import build_model
    from e4srec.trainer import TrainConfig, train

    free_memory(device)
    model = build_model("SASRec", data, {"loss": loss})
    config = TrainConfig(epochs=2, batch_size=args.sasrec_batch_size, learning_rate=1e-3, patience=10,
                         eval_batch_size=1024, seed=args.seed, device=device.type)
    with tempfile.TemporaryDirectory() as checkpoints:
        record = train(model, data, config, checkpoints, progress=False)
    first, second = (epoch["seconds"] for epoch in record["epochs"][:2])
    examples = record["epochs"][1]["examples"]
    return row("SASRec epoch (shared trainer)", loss, args.sasrec_batch_size, f"{second:.2f} s/epoch",
               per_second(examples / second, "sequences"), f"epoch 0 {first:.2f} s", peak_gib(device),
               epoch_seconds=[first, second], examples=examples)


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not args.cpu_smoke_test and not torch.cuda.is_available():
        print(f"gpu_benchmark.py: no CUDA GPU visible (torch {torch.__version__}, torch.cuda.is_available() is "
              "False): this script times GPU runs only. Run it on a CUDA machine with a CUDA build of torch "
              "(or pass --cpu-smoke-test to check the script on the CPU; its timings mean nothing).",
              file=sys.stderr)
        return EXIT_NO_GPU
    sys.path.insert(0, str(ROOT))  # e4srec and baselines without an install
    from e4srec import provenance
    from e4srec.data import SequenceData
    from e4srec.files import write_json

    if not (Path(args.dataset_dir) / "dataset.json").is_file():
        print(f"gpu_benchmark.py: {args.dataset_dir}: not a prepared dataset folder (no dataset.json; "
              "write one with `e4srec prepare` or the workflow's <out>/data/<dataset>)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.cpu_smoke_test else "cuda")
    data = SequenceData.load(args.dataset_dir)
    log(f"{data.name}: {data.n_users} users, {data.n_items} items, device {device}")
    rows, backbone = [], None
    if not args.skip_e4srec:
        backbone_dir = resolve_backbone_dir(args)
        model = build_e4srec(args, data, backbone_dir, device)
        backbone = model.backbone_record
        for training in args.trainings:
            sizes = args.packed_batch_sizes if training == "packed" else args.batch_sizes
            for mode in args.modes:
                for batch_size in sizes:
                    log(f"E4SRec training step: {training}, {mode}, batch {batch_size}")
                    try:
                        rows.append(time_e4srec_training(model, data, args, device, training, mode, batch_size))
                    except torch.cuda.OutOfMemoryError:
                        rows.append(row(f"E4SRec training step ({training})", mode, batch_size, "out of memory",
                                        "-", "-", peak_gib(device)))
                    log(f"{rows[-1]['time']}, {rows[-1]['throughput']}")
        if args.epoch:
            for mode in args.modes:
                for batch_size in args.packed_batch_sizes:
                    log(f"E4SRec packed epoch: {mode}, batch {batch_size}")
                    rows.append(time_e4srec_epoch(model, data, args, device, mode, batch_size))
                    log(str(rows[-1]["time"]))
        model._compiled = None
        torch._dynamo.reset()
        if args.bare_backbone:  # before the scoring settings, which may turn the model to float32
            rows.append(time_bare_backbone(model, data, args, device))
        rows.extend(time_scoring_settings(model, data, args, device))
        del model
    for loss in args.sasrec_losses:
        log(f"SASRec epoch: {loss}")
        rows.append(time_sasrec_epochs(data, args, device, loss))
    table = markdown(rows)
    gpu = {"name": torch.cuda.get_device_name(device), "cuda": torch.version.cuda} if device.type == "cuda" else None
    print(f"{data.name}: {gpu['name'] if gpu else 'CPU (smoke test: timings mean nothing)'}, "
          f"torch {torch.__version__}\n")
    print(table)
    write_json(args.out, provenance.record(
        benchmark="workflow/scripts/gpu_benchmark.py", smoke_test=args.cpu_smoke_test, arguments=vars(args),
        dataset={"dir": str(args.dataset_dir), "name": data.name, "users": data.n_users, "items": data.n_items},
        backbone=backbone, gpu=gpu, rows=rows, table=table))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
