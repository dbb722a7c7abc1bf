"""SASRec (cross-entropy) of this suite beside RecBole 1.2.1's SASRec, on the same CPU and data.

Issue "Performance", goal 3 (CPU part). Both tools train SASRec with softmax cross-entropy over all
items on Beauty (leave-one-out: last item test, second to last validation), 64-dim, 2 blocks,
max length 50, batch 256, Adam lr 1e-3, for the same number of epochs, and report seconds per
training epoch and validation NDCG@10 (full ranking, no history masking) after each epoch.

RecBole must live in its own virtual environment (never the suite's), e.g.::

    python -m venv --system-site-packages /tmp/rbenv && /tmp/rbenv/bin/pip install recbole==1.2.1

Usage (from the repository root, with the suite's environment active)::

    python workflow/scripts/recbole_side_by_side.py --recbole-python /tmp/rbenv/bin/python \
        --work /tmp/sbs --epochs 3 --threads 2 --order ours,recbole,ours --markdown /tmp/sbs/table.md

The runs go one after another in the order given (alternating the tools brackets the slow RecBole
run between two runs of ours, so both see the same window of machine load); /proc/loadavg is
recorded before and after each run. ``--architecture ours`` (default) sets RecBole's SASRec to this
suite's SASRec defaults (1 head, feed-forward width 64, ReLU, dropout 0.5 on hidden states and
attention weights, layer-norm eps 1e-8); ``--architecture recbole`` keeps RecBole's own defaults
(2 heads, width 256, GELU, eps 1e-12). What cannot be matched: RecBole's SASRec is post-norm with
N(0, 0.02) init, ours is pre-norm (the original SASRec) with Xavier init.

Compatibility shims applied inside the RecBole worker process only (no file of either package is
edited): ``np.float_ = np.float64``, ``np.complex_ = np.complex128`` and ``np.unicode_ = np.str_``
(removed in NumPy 2.0; RecBole's Config.compatibility_settings() reads them to re-create ``np.float``,
``np.long`` etc., which recbole/evaluator/metrics.py still uses), and RecBole is driven through its
Config/create_dataset/data_preparation/Trainer API rather than ``recbole.quick_start``, which
imports ``ray`` (ray 2.6.3 needs ``pkg_resources``, gone from setuptools >= 81).
"""
from __future__ import annotations

import argparse
import json
import resource
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

BEAUTY = "/work/shared/datasets/Beauty.txt"
# This suite's SASRec defaults (baselines/sasrec.py SASRecConfig), in RecBole's names.
OUR_ARCHITECTURE = {"n_heads": 1, "inner_size": 64, "hidden_act": "relu", "hidden_dropout_prob": 0.5,
                    "attn_dropout_prob": 0.5, "layer_norm_eps": 1e-8}
RECBOLE_ARCHITECTURE = {"n_heads": 2, "inner_size": 256, "hidden_act": "gelu", "hidden_dropout_prob": 0.5,
                        "attn_dropout_prob": 0.5, "layer_norm_eps": 1e-12}


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().split(" ")[:3].__str__().replace("'", "")
    except OSError:
        return "n/a"


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# Data ---------------------------------------------------------------------------------------------
def write_atomic(raw: Path, folder: Path) -> Path:
    """S3-Rec format (user item item ..., chronological) -> RecBole's Beauty.inter (timestamp = position)."""
    out = folder / "Beauty" / "Beauty.inter"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with raw.open() as source, out.open("w") as target:
        target.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for line in source:
            user, *items = line.split()
            for position, item in enumerate(items):
                target.write(f"{user}\t{item}\t{position}\n")
    return out


def prepare_ours(raw: Path, work: Path) -> Path:
    """The suite's prepared Beauty (as workflow/rules/data.smk: fetch from a local mirror, then prepare)."""
    data = work / "data" / "Beauty"
    if (data / "dataset.json").exists():
        return data
    raw_dir = work / "raw"
    subprocess.run(["e4srec", "fetch", "--dataset", "Beauty", "--mirror", str(raw.parent),
                    "--out", str(raw_dir / "Beauty.txt"), "--record", str(raw_dir / "Beauty.json"),
                    "--negatives-dir", str(raw_dir / "Beauty_negatives"), "--negatives", "draw"], check=True)
    subprocess.run(["e4srec", "prepare", "--dataset", "Beauty", "--raw", str(raw_dir / "Beauty.txt"),
                    "--record", str(raw_dir / "Beauty.json"), "--negatives-dir", str(raw_dir / "Beauty_negatives"),
                    "--out", str(data), "--max-len", "50", "--min-interactions", "3", "--short-user-policy", "drop",
                    "--subsample-seed", "0", "--negatives-count", "99", "--negatives-seed", "2023"], check=True)
    return data


# Runs ---------------------------------------------------------------------------------------------
def run_ours(data: Path, out: Path, args) -> dict:
    if out.exists():
        shutil.rmtree(out)
    train_params = {"epochs": args.epochs, "batch_size": 256, "learning_rate": 1e-3, "weight_decay": 0.0,
                    "device": "cpu", "patience": 100, "eval_batch_size": 1024}
    command = ["e4srec", "train", "--dataset-dir", str(data), "--model", "SASRec", "--variant", "ce",
               "--seed", str(args.seed), "--params", json.dumps({"loss": "ce"}),
               "--train-params", json.dumps(train_params), "--out", str(out), "--threads", str(args.threads),
               "--no-progress"]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - started
    record = json.loads((out / "run.json").read_text())
    epochs = record["training"]["epochs"]
    return {"tool": "ours", "command": shlex.join(command), "git": record.get("git"), "wall_seconds": wall,
            "epochs": [{"epoch": e["epoch"], "train_seconds": e["seconds"], "valid_ndcg10": e["valid_ndcg10"],
                        "examples": e["examples"], "loss": e["loss"]} for e in epochs],
            "torch_threads": record.get("nondeterminism", {}).get("torch_threads")}


def run_recbole(atomic_root: Path, out: Path, args) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    result = out / "recbole.json"
    command = [args.recbole_python, str(Path(__file__).resolve()), "--recbole-worker", "--work", str(args.work),
               "--epochs", str(args.epochs), "--threads", str(args.threads), "--seed", str(args.seed),
               "--architecture", args.architecture, "--worker-out", str(result)]
    if args.recbole_steps:
        command += ["--recbole-steps", str(args.recbole_steps)]
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=out)
    wall = time.perf_counter() - started
    record = json.loads(result.read_text())
    record.update(tool="recbole", wall_seconds=wall, command=" ".join(command))
    if args.recbole_steps:  # one pseudo-epoch: the extrapolated time, no validation
        record["epochs"] = [{"epoch": "0 (extrapolated from %d steps)" % record["steps_timed"],
                             "train_seconds": record["extrapolated_epoch_seconds"], "valid_ndcg10": float("nan"),
                             "examples": record["train_examples"]}]
    return record


def recbole_worker(args) -> None:
    """Runs inside RecBole's environment: train SASRec (CE) and write per-epoch timings as JSON."""
    import numpy as np

    # Aliases removed from NumPy 2.0: RecBole 1.2.1's Config.compatibility_settings() runs
    # ``np.float = np.float_`` (and complex_, unicode_), which raises AttributeError on NumPy 2.
    for name, value in (("float_", np.float64), ("complex_", np.complex128), ("unicode_", np.str_)):
        if name not in np.__dict__:
            setattr(np, name, value)
    import torch

    torch.set_num_threads(args.threads)
    sys.argv = sys.argv[:1]  # RecBole's Config also reads --key=value from the command line
    import recbole
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.model.sequential_recommender import SASRec
    from recbole.trainer import Trainer
    from recbole.utils import init_logger, init_seed

    architecture = OUR_ARCHITECTURE if args.architecture == "ours" else RECBOLE_ARCHITECTURE
    config_dict = {
        "data_path": str(Path(args.work) / "recbole_data"), "checkpoint_dir": str(Path(args.work) / "recbole_saved"),
        "use_gpu": False, "gpu_id": "", "seed": args.seed, "reproducibility": True, "show_progress": False,
        "worker": 0, "log_wandb": False, "state": "INFO",
        "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "TIME_FIELD": "timestamp",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]}, "MAX_ITEM_LIST_LENGTH": 50,
        "user_inter_num_interval": "[0,inf)", "item_inter_num_interval": "[0,inf)",
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
        "repeatable": True, "metrics": ["NDCG", "Hit"], "topk": [10], "valid_metric": "NDCG@10",
        "eval_batch_size": 1024, "train_batch_size": 256, "learner": "adam", "learning_rate": 1e-3,
        "weight_decay": 0.0, "epochs": args.epochs, "stopping_step": 100, "eval_step": 1,
        "train_neg_sample_args": None, "loss_type": "CE",
        "hidden_size": 64, "n_layers": 2, "initializer_range": 0.02, **architecture,
    }
    started = time.perf_counter()
    config = Config(model="SASRec", dataset="Beauty", config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    dataset = create_dataset(config)
    train_data, valid_data, _ = data_preparation(config, dataset)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = SASRec(config, train_data._dataset).to(config["device"])
    trainer = Trainer(config, model)
    prepare_seconds = time.perf_counter() - started

    if args.recbole_steps:  # step timing only: the first args.recbole_steps batches of epoch 0, no validation
        model.train()
        times, batches = [], iter(train_data)
        for _ in range(args.recbole_steps + 3):
            interaction = next(batches).to(config["device"])
            t0 = time.perf_counter()
            trainer.optimizer.zero_grad()
            loss = model.calculate_loss(interaction)
            loss.backward()
            trainer.optimizer.step()
            times.append(time.perf_counter() - t0)
        times = times[3:]  # warm-up steps left out
        n_batches = -(-len(train_data._dataset) // config["train_batch_size"])
        Path(args.worker_out).write_text(json.dumps({
            "recbole_version": recbole.__version__, "torch_threads": torch.get_num_threads(),
            "prepare_seconds": prepare_seconds, "steps_timed": len(times), "step_seconds": times,
            "mean_step_seconds": sum(times) / len(times), "batches_per_epoch": n_batches,
            "train_examples": len(train_data._dataset),
            "extrapolated_epoch_seconds": sum(times) / len(times) * n_batches}, indent=1))
        return

    epochs = []
    train_epoch, valid_epoch = trainer._train_epoch, trainer._valid_epoch

    def timed_train(*a, **k):  # the same interval RecBole's own "train ... time" log line measures
        t0 = time.time()
        loss = train_epoch(*a, **k)
        epochs.append({"epoch": len(epochs), "train_seconds": time.time() - t0,
                       "loss": float(sum(loss) if isinstance(loss, tuple) else loss)})
        return loss

    def timed_valid(*a, **k):
        t0 = time.time()
        score, result = valid_epoch(*a, **k)
        epochs[-1].update(valid_seconds=time.time() - t0, valid_ndcg10=float(result["ndcg@10"]),
                          valid_hit10=float(result["hit@10"]))
        return score, result

    def save(*_):  # after every epoch, so that a run stopped early keeps its finished epochs
        for epoch in epochs:
            epoch["examples"] = len(train_data._dataset)
        Path(args.worker_out).write_text(json.dumps({
            "recbole_version": recbole.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "torch_threads": torch.get_num_threads(), "prepare_seconds": prepare_seconds,
            "architecture": architecture, "n_items": dataset.item_num - 1, "n_users": dataset.user_num - 1,
            "train_examples": len(train_data._dataset), "valid_users": len(valid_data._dataset), "epochs": epochs,
        }, indent=1))

    trainer._train_epoch, trainer._valid_epoch = timed_train, timed_valid
    trainer.fit(train_data, valid_data, saved=False, show_progress=False, callback_fn=save)
    save()


def recbole_run_from_log(log: Path, examples: int | None = None) -> dict:
    """A RecBole run (finished or stopped early) from its own log: "epoch N training [time: S s, ..."
    and the "valid result" NDCG@10 that follows each evaluation."""
    import re

    epochs, text = [], log.read_text()
    for match in re.finditer(r"epoch (\d+) training \[time: ([\d.]+)s, train loss: ([\d.]+)\]", text):
        epochs.append({"epoch": int(match.group(1)), "train_seconds": float(match.group(2)),
                       "loss": float(match.group(3)), "examples": examples})
    for epoch, match in zip(epochs, re.finditer(r"ndcg@10 : ([\d.]+)", text)):
        epoch["valid_ndcg10"] = float(match.group(1))
    epochs = [e for e in epochs if "valid_ndcg10" in e]
    return {"tool": "recbole", "epochs": epochs, "log": str(log), "wall_seconds": None}


# Report -------------------------------------------------------------------------------------------
def first_epoch_reaching(epochs: list[dict], target: float) -> tuple[int | None, float | None]:
    elapsed = 0.0
    for epoch in epochs:
        elapsed += epoch["train_seconds"]
        if epoch["valid_ndcg10"] >= target:
            return epoch["epoch"], elapsed
    return None, None


def markdown(runs: list[dict]) -> str:
    lines = ["| run | tool | epoch | train s | examples/epoch | valid NDCG@10 | cumulative train s | load before -> after |",
             "|---|---|---|---|---|---|---|---|"]
    for index, run in enumerate(runs):
        cumulative = 0.0
        for epoch in run["epochs"]:
            cumulative += epoch["train_seconds"]
            lines.append(f"| {index + 1} | {run['tool']} | {epoch['epoch']} | {epoch['train_seconds']:.1f} | "
                         f"{epoch['examples']} | {epoch['valid_ndcg10']:.4f} | {cumulative:.1f} | "
                         f"{run['load_before']} -> {run['load_after']} |")
    recbole_runs = [r for r in runs if r["tool"] == "recbole"]
    ours_runs = [r for r in runs if r["tool"] == "ours"]
    lines += ["", "| tool | mean train s / epoch | best valid NDCG@10 | train s to reach RecBole's best NDCG@10 |",
              "|---|---|---|---|"]
    target = max((e["valid_ndcg10"] for r in recbole_runs for e in r["epochs"]
                  if e["valid_ndcg10"] == e["valid_ndcg10"]), default=None)  # NaN: step-timing runs
    for run in runs:
        mean = sum(e["train_seconds"] for e in run["epochs"]) / max(len(run["epochs"]), 1)
        best = max((e["valid_ndcg10"] for e in run["epochs"] if e["valid_ndcg10"] == e["valid_ndcg10"]),
                   default=float("nan"))
        reach = "n/a"
        if target is not None:
            epoch, seconds = first_epoch_reaching(run["epochs"], target)
            reach = f"{seconds:.1f} (epoch {epoch})" if epoch is not None else "not reached"
        lines.append(f"| {run['tool']} (run {runs.index(run) + 1}) | {mean:.1f} | {best:.4f} | {reach} |")
    def mean_epoch(run):
        return sum(e["train_seconds"] for e in run["epochs"]) / max(len(run["epochs"]), 1)

    if recbole_runs and ours_runs:
        lines.append("")
        for index, run in enumerate(runs):  # each RecBole run against the runs of ours right before and after it
            if run["tool"] != "recbole":
                continue
            neighbours = [runs[i] for i in (index - 1, index + 1) if 0 <= i < len(runs) and runs[i]["tool"] == "ours"]
            for other in neighbours:
                lines.append(f"Seconds per epoch, RecBole run {index + 1} / ours run {runs.index(other) + 1}: "
                             f"{mean_epoch(run) / mean_epoch(other):.1f}x.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--beauty", default=BEAUTY, help="Beauty in the S3-Rec format")
    parser.add_argument("--work", default="/tmp/recbole_side_by_side", help="scratch folder (data, runs, logs)")
    parser.add_argument("--recbole-python", default="/tmp/rbenv/bin/python", help="python of RecBole's venv")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--order", default="ours,recbole,ours", help="comma-separated runs, in order")
    parser.add_argument("--architecture", choices=["ours", "recbole"], default="ours",
                        help="RecBole SASRec block settings: this suite's defaults or RecBole's own")
    parser.add_argument("--recbole-steps", type=int, default=0,
                        help="time only this many RecBole training steps (after 3 warm-up steps) and "
                             "extrapolate one epoch, instead of training --epochs epochs")
    parser.add_argument("--markdown", help="write the Markdown table here too")
    parser.add_argument("--previous", nargs="*", default=[],
                        help="runs.json files of earlier invocations: their runs come first in the table")
    parser.add_argument("--recbole-log", nargs="*", default=[],
                        help="RecBole log files (a run stopped early included) to put in the table as runs; "
                             "with load and CPU unknown unless given in --previous")
    parser.add_argument("--recbole-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.recbole_worker:
        recbole_worker(args)
        return

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    atomic = write_atomic(Path(args.beauty), work / "recbole_data")
    data = prepare_ours(Path(args.beauty), work)
    print(f"data: {atomic} and {data}", file=sys.stderr)
    runs = [run for previous in args.previous for run in json.loads(Path(previous).read_text())]
    for log in args.recbole_log:
        # RecBole's training examples: one per (prefix, next item) of each user's training part (n - 3)
        examples = sum(len(line.split()) - 1 - 3 for line in Path(args.beauty).open())
        runs.append({**recbole_run_from_log(Path(log), examples), "load_before": "n/a", "load_after": "n/a"})
    for index, tool in enumerate(filter(None, args.order.split(",")), start=len(runs)):
        before, cpu0 = loadavg(), children_cpu_seconds()
        out = work / f"run{index + 1}_{tool}"
        run = run_ours(data, out, args) if tool == "ours" else run_recbole(work / "recbole_data", out, args)
        run.update(load_before=before, load_after=loadavg(), cpu_seconds=children_cpu_seconds() - cpu0)
        runs.append(run)
        print(f"run {index + 1} {tool}: wall {run['wall_seconds']:.1f} s, cpu {run['cpu_seconds']:.1f} s, "
              f"load {before} -> {run['load_after']}", file=sys.stderr)
        (work / "runs.json").write_text(json.dumps(runs, indent=1))
    table = markdown(runs)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table)


if __name__ == "__main__":
    main()
