"""Data-parallel training (DDP) on the CPU: two gloo processes under ``torchrun`` and under the
``accelerate launch`` command the Snakemake rules run, on tiny data.

The global batch stays ``batch_size`` (each process takes its slice, :func:`e4srec.trainer.shard_batch`),
so a two-process run of a model without randomness in its loss (SASRec with the full softmax and no
dropout; E4SRec with LoRA dropout off) follows a one-process run of the same seed up to float
rounding: the same per-epoch loss, validation and test metrics and item table. Every user here has a
full training window, so SASRec's loss, a mean over positions, is also a mean over users and the
slices' weighting is exact; E4SRec packed (compiled by layers) weights its slices by their
(history, next item) pairs, which is exact too. The batches (29 rows in batches of 7) give the processes unequal slices
(4 and 3 rows) and a last batch of one row, where the second process runs a zero-weighted step. The
main process alone writes the run folder; a run killed mid-epoch resumes from its last checkpoint
under two processes and ends where the uninterrupted one does, and an out-of-memory step on one
process is retried in micro-batches on all of them (``oom_retry``).

Sharded (FSDP2, ``distributed: fsdp``): the rules' ``accelerate launch --use_fsdp --fsdp_version 2 ...``
command. accelerate turns FSDP on for GPU processes only (``accelerate/state.py`` switches only the
MULTI_GPU-like types to FSDP; CPU processes stay MULTI_CPU, the plugin dropped without a word), so the
trainer refuses such a launch on the CPU, and the tests' worker (:data:`FSDP_WORKER`) sets accelerate's
state to FSDP with the launcher's plugin; from there on the trainer runs its GPU path, and torch's
``fully_shard`` shards over gloo. E4SRec's LLaMA layers are then FSDP units (SASRec, without
transformers layers, one root unit), and the runs match one process up to float rounding, resumed
after a kill too: FSDP reduce-scatters each gradient as the sum of the two processes' halves, one
process sums the whole batch, so the numbers agree to rounding, not bit for bit.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from e4srec import runs
from e4srec.files import load_tensors
from e4srec.trainer import shard_batch

try:
    from helpers import prepare_tiny, random_sequences, torch_threads
except ImportError:  # tests/ imported as a package
    from tests.helpers import prepare_tiny, random_sequences, torch_threads

ROOT = Path(__file__).resolve().parent.parent
SASREC_PARAMS = {"loss": "ce", "dropout": 0.0, "attention_dropout": 0.0, "hidden_size": 16, "inner_size": 16}
SASREC_TRAIN = {"epochs": 3, "batch_size": 7, "learning_rate": 0.01, "patience": 10, "eval_batch_size": 64,
                "device": "cpu"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
# The rules' launch (workflow/rules/common.smk); without a GPU, device: cpu makes the processes MULTI_CPU
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
# The rules' launch under `distributed: fsdp` (workflow/rules/common.smk, FSDP_LAUNCH)
FSDP_ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version", "2",
                   "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP", "--fsdp_reshard_after_forward", "true",
                   "--fsdp_cpu_ram_efficient_loading", "false", *ACCELERATE[4:]]

# A worker for that launch on the CPU: accelerate's state set to FSDP (the plugin from the launcher's
# FSDP_* variables), which accelerate does for GPU processes only; KILL_AT_STEP as in WORKER.
FSDP_WORKER = """
import os, signal, sys
from accelerate import FullyShardedDataParallelPlugin
from accelerate.utils import DistributedType
from e4srec import cli, trainer

make_accelerator, shard_batch = trainer.make_accelerator, trainer.shard_batch
rank, kill_at, steps = int(os.environ["RANK"]), int(os.environ.get("KILL_AT_STEP", 0)), [0]

def sharding_accelerator(config):
    accelerator = make_accelerator(config)
    if accelerator.distributed_type != DistributedType.FSDP:
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
        accelerator.state.distributed_type = DistributedType.FSDP
    return accelerator

def counting_shard_batch(batch, rank_, world, *terms):
    steps[0] += 1
    if rank == 0 and steps[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return shard_batch(batch, rank_, world, *terms)

trainer.make_accelerator, trainer.shard_batch = sharding_accelerator, counting_shard_batch
sys.exit(cli.main(sys.argv[1:]))
"""

# A worker for torchrun: `e4srec train` with faults injected (environment variables): KILL_AT_STEP
# SIGKILLs process 0 before that training step (counted from 1 within this launch), OOM_ONCE makes
# process 1 run out of memory once, on its first slice of more than two users.
WORKER = """
import os, signal, sys
import torch
from baselines.sasrec import SASRec
from e4srec import cli, trainer

rank, kill_at, steps = int(os.environ["RANK"]), int(os.environ.get("KILL_AT_STEP", 0)), [0]
shard_batch, calculate_loss, failures = trainer.shard_batch, SASRec.calculate_loss, [int(os.environ.get("OOM_ONCE", 0))]

def counting_shard_batch(batch, rank_, world, *terms):
    steps[0] += 1
    if rank == 0 and steps[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return shard_batch(batch, rank_, world, *terms)

def failing_loss(self, batch):
    if rank == 1 and failures[0] and len(batch["user"]) > 2:
        failures[0] -= 1
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")
    return calculate_loss(self, batch)

trainer.shard_batch, SASRec.calculate_loss = counting_shard_batch, failing_loss
sys.exit(cli.main(sys.argv[1:]))
"""


# A worker for torchrun: `e4srec train`, then whether this process still holds a process group.
LEAVING_WORKER = """
import sys
import torch
from e4srec import cli

code = cli.main(sys.argv[1:])
print(f"process group after the run: {'held' if torch.distributed.is_initialized() else 'none'}", flush=True)
sys.exit(code)
"""


def launch(launcher: list[str], args: list[str], **env) -> subprocess.CompletedProcess:
    """Two processes on the CPU (gloo), one thread each."""
    child_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false",
                 **{key: str(value) for key, value in env.items()}}
    return subprocess.run([*launcher, *args], cwd=ROOT, env=child_env, capture_output=True, text=True, timeout=300)


def train_args(dataset_dir, out, model: str, params: dict, train: dict, *extra: str) -> list[str]:
    return ["train", "--dataset-dir", str(dataset_dir), "--model", model, "--params", json.dumps(params),
            "--train-params", json.dumps(train), "--out", str(out), "--threads", "1", "--no-progress", *extra]


def assert_same_run(got: dict, want: dict) -> None:
    """Two run records of the same seed: the same epochs, losses and metrics up to float rounding."""
    got_epochs, want_epochs = got["training"]["epochs"], want["training"]["epochs"]
    assert [e["examples"] for e in got_epochs] == [e["examples"] for e in want_epochs]
    assert [e["loss"] for e in got_epochs] == pytest.approx([e["loss"] for e in want_epochs], rel=1e-4)
    assert [e["valid_ndcg10"] for e in got_epochs] == pytest.approx([e["valid_ndcg10"] for e in want_epochs],
                                                                     abs=1e-6)
    assert got["training"]["best_epoch"] == want["training"]["best_epoch"]
    assert got["training"]["step"] == want["training"]["step"]
    for protocol, metrics in want["metrics"].items():
        assert got["metrics"][protocol] == pytest.approx(metrics, abs=1e-6), protocol


def read_run(folder: Path) -> dict:
    return json.loads((folder / "run.json").read_text())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The one-process references run with one thread, as each of the two processes does."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def sasrec(tmp_path_factory) -> dict:
    """A prepared dataset (29 users of 8 to 12 items) and a one-process SASRec run on it."""
    root = tmp_path_factory.mktemp("ddp")
    dataset_dir = prepare_tiny(root / "data", random_sequences(29, 40, seed=3, min_len=8, max_len=12), max_len=5)
    reference = runs.run(dataset_dir, "SASRec", root / "single", seed=0, params=SASREC_PARAMS,
                         train_params=SASREC_TRAIN, progress=False)
    return {"root": root, "dataset_dir": dataset_dir, "reference": json.loads(json.dumps(reference, default=str))}


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("size", [1, 2, 5, 7, 16])
def test_shard_batch_covers_the_batch_once_in_order(size, world):
    batch = {"user": torch.arange(size) + 100, "history": torch.arange(size * 3).reshape(size, 3)}
    shards = [shard_batch(batch, rank, world) for rank in range(world)]
    real = [(part, share) for part, share in shards if share > 0]
    for key, value in batch.items():
        assert torch.equal(torch.cat([part[key] for part, _ in real]), value)  # once each, in rank order
    assert sum(share for _, share in shards) == pytest.approx(1.0)
    rows = [len(part["user"]) for part, _ in real]
    assert max(rows) - min(rows) <= 1 and rows == sorted(rows, reverse=True)
    for part, share in shards:
        if share == 0:  # more processes than rows: one row, weighted zero, so that DDP's backward runs
            assert len(part["user"]) == 1 and size < world
    assert len(real) == min(size, world)


def test_two_processes_match_one(sasrec, tmp_path):
    """torchrun, two gloo processes: one run folder, its record says so, the numbers are one process's."""
    out = tmp_path / "run"
    result = launch(TORCHRUN, ["-m", "e4srec.cli", *train_args(sasrec["dataset_dir"], out, "SASRec", SASREC_PARAMS,
                                                                SASREC_TRAIN)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.rglob("run.json")) == ["run.json"]
    record = read_run(out)
    assert record["training"]["world_size"] == 2 and record["training"]["distributed_type"] == "MULTI_CPU"
    assert sasrec["reference"]["training"]["world_size"] == 1
    assert [e["examples"] for e in record["training"]["epochs"]] == [29] * 3  # the global batches
    assert_same_run(record, sasrec["reference"])
    two = load_tensors(out / "item_embeddings.safetensors")["item_embeddings"]
    one = load_tensors(sasrec["root"] / "single" / "item_embeddings.safetensors")["item_embeddings"]
    torch.testing.assert_close(two, one, atol=1e-5, rtol=1e-4)


def test_killed_run_resumes_under_two_processes(sasrec, tmp_path):
    """Process 0 killed (SIGKILL) in the middle of epoch 1, after process 1 ran out of memory once at
    the first step (oom_retry: every process retries in two micro-batches); the relaunch resumes from
    epoch 0's checkpoint and ends with the numbers of one uninterrupted process."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    out = tmp_path / "run"
    args = train_args(sasrec["dataset_dir"], out, "SASRec", SASREC_PARAMS, {**SASREC_TRAIN, "oom_retry": True})
    killed = launch(TORCHRUN, [str(worker), *args], KILL_AT_STEP=7, OOM_ONCE=1)  # 5 steps an epoch
    assert killed.returncode != 0
    assert not (out / "run.json").exists()
    state = json.loads((out / "checkpoints" / "state.json").read_text())
    assert state["epoch"] == 0 and state["micro_batches"] == 2
    resumed = launch(TORCHRUN, [str(worker), *args])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    record = read_run(out)
    assert record["training"]["world_size"] == 2 and record["training"]["micro_batches"] == 2
    assert record["training"]["oom_retries"] == [{
        "epoch": 0, "step": 0, "micro_batches": 2, "micro_batch_size": 2,
        "cuda_said": "process 1: CUDA out of memory. Tried to allocate 3.00 GiB"}]
    assert_same_run(record, sasrec["reference"])


def test_every_process_leaves_the_process_group(sasrec, tmp_path):
    """After `e4srec train` under two processes neither holds a process group any more (under NCCL a
    process that exits holding one is warned), the main one included, which evaluates alone."""
    worker = tmp_path / "worker.py"
    worker.write_text(LEAVING_WORKER)
    args = train_args(sasrec["dataset_dir"], tmp_path / "run", "SASRec", SASREC_PARAMS, {**SASREC_TRAIN, "epochs": 1})
    result = launch(TORCHRUN, [str(worker), *args])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("process group after the run: none") == 2, result.stdout[-2000:]
    assert (tmp_path / "run" / "run.json").exists()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled-layers"])
def test_e4srec_under_accelerate_launch(tmp_path, compiled):
    """E4SRec (tiny LLaMA, LoRA) through the rules' `accelerate launch ... -m e4srec.cli train`; also
    packed and regionally compiled, as the GPU runs train (each process compiles its own copy)."""
    from tiny_llm import write_item_embeddings, write_tiny_backbone, write_tiny_dataset

    backbone = write_tiny_backbone(tmp_path / "backbone")
    table = write_item_embeddings(tmp_path / "items.safetensors", 30)
    dataset_dir = write_tiny_dataset(tmp_path / "data" / "tiny", n_users=12, n_items=30)
    params = {"lora_r": 4, "lora_dropout": 0.0}
    if compiled:
        params.update(training="packed", compile="always", compile_scope="layers", share_prefix="never")
    train = {"epochs": 2, "batch_size": 7, "max_steps_per_epoch": 4, "learning_rate": 1e-3, "eval_batch_size": 16,
             "device": "cpu"}
    context = {"backbone_dir": backbone, "item_embeddings": table}
    reference = runs.run(dataset_dir, "E4SRec", tmp_path / "single", params=params, train_params=train,
                         progress=False, **context)
    out = tmp_path / "run"
    result = launch(ACCELERATE, ["-m", "e4srec.cli", *train_args(dataset_dir, out, "E4SRec", params, train,
                                                                  "--backbone", str(backbone),
                                                                  "--item-embeddings", str(table))])
    assert result.returncode == 0, result.stderr[-3000:]
    record = read_run(out)
    assert record["training"]["world_size"] == 2 and record["training"]["distributed_type"] == "MULTI_CPU"
    assert (out / "components").is_dir()
    assert_same_run(record, json.loads(json.dumps(reference, default=str)))


def test_shard_batch_shares_follow_the_loss_terms():
    """With a model's loss_terms (E4SRec packed: pairs), each slice's share is its part of the terms, so a
    slice of long histories weighs more than one of short ones."""
    batch = {"user": torch.arange(4), "history": torch.tensor([[0, 0, 1], [0, 2, 3], [4, 5, 6], [7, 8, 9]])}
    terms = lambda part: int((part["history"] > 0).sum())  # noqa: E731
    shares = [shard_batch(batch, rank, 2, terms)[1] for rank in range(2)]
    assert shares == [pytest.approx(3 / 9), pytest.approx(6 / 9)]
    assert shard_batch(batch, 0, 1, terms) == (batch, 1.0)


E4SREC_FSDP_PARAMS = {"lora_r": 4, "lora_dropout": 0.0, "share_prefix": "never"}
E4SREC_FSDP_TRAIN = {"epochs": 2, "batch_size": 7, "max_steps_per_epoch": 4, "learning_rate": 1e-3,
                     "eval_batch_size": 16, "device": "cpu"}


@pytest.fixture(scope="module")
def tiny_e4srec(tmp_path_factory) -> dict:
    """A tiny LLaMA backbone, item table and dataset (12 users), and a one-process E4SRec run on them
    (share_prefix never: see test_fsdp_refuses_a_shared_prefix)."""
    from tiny_llm import write_item_embeddings, write_tiny_backbone, write_tiny_dataset

    root = tmp_path_factory.mktemp("fsdp")
    context = {"backbone_dir": write_tiny_backbone(root / "backbone"),
               "item_embeddings": write_item_embeddings(root / "items.safetensors", 30)}
    dataset_dir = write_tiny_dataset(root / "data" / "tiny", n_users=12, n_items=30)
    reference = runs.run(dataset_dir, "E4SRec", root / "single", params=E4SREC_FSDP_PARAMS,
                         train_params=E4SREC_FSDP_TRAIN, progress=False, **context)
    return {"root": root, "dataset_dir": dataset_dir, "context": context,
            "reference": json.loads(json.dumps(reference, default=str))}


def e4srec_args(tiny: dict, out: Path, params: dict = E4SREC_FSDP_PARAMS) -> list[str]:
    return train_args(tiny["dataset_dir"], out, "E4SRec", params, E4SREC_FSDP_TRAIN,
                      "--backbone", str(tiny["context"]["backbone_dir"]),
                      "--item-embeddings", str(tiny["context"]["item_embeddings"]))


def test_fsdp_e4srec_matches_one_process(tiny_e4srec, tmp_path):
    """E4SRec sharded over two processes (each LlamaDecoderLayer an FSDP unit, LoRA, projection and head
    trained): one process's losses, validation and test metrics, item scorer and LoRA weights."""
    worker = tmp_path / "worker.py"
    worker.write_text(FSDP_WORKER)
    out = tmp_path / "run"
    result = launch(FSDP_ACCELERATE, [str(worker), *e4srec_args(tiny_e4srec, out)])
    assert result.returncode == 0, result.stderr[-3000:]
    record = read_run(out)
    training = record["training"]
    assert training["world_size"] == 2 and training["distributed_type"] == "FSDP"
    assert training["fsdp"]["version"] == 2 and training["fsdp"]["units"] == ["LlamaDecoderLayer"]
    assert training["fsdp"]["reshard_after_forward"] is True
    fsdp = training["fsdp"]  # every weight sharded: the main process holds about half of them
    assert fsdp["parameters"] / 2 <= fsdp["parameters_here"] < fsdp["parameters"] * 0.55, fsdp
    assert "fsdp" not in tiny_e4srec["reference"]["training"]
    assert_same_run(record, tiny_e4srec["reference"])
    sharded = load_tensors(out / "checkpoints" / "best.safetensors")
    single = load_tensors(tiny_e4srec["root"] / "single" / "checkpoints" / "best.safetensors")
    assert sorted(sharded) == sorted(single) and any("lora_B" in name for name in single)
    for name, tensor in single.items():  # whole tensors, gathered from the shards
        torch.testing.assert_close(sharded[name], tensor, atol=1e-5, rtol=1e-4, msg=name)
    assert (out / "components").is_dir()


def test_fsdp_killed_run_resumes(tiny_e4srec, tmp_path):
    """Process 0 killed (SIGKILL) in epoch 1 under FSDP; the relaunch loads the whole checkpoint
    (weights and Adam's moments) into the shards and ends with one uninterrupted process's numbers."""
    worker = tmp_path / "worker.py"
    worker.write_text(FSDP_WORKER)
    out = tmp_path / "run"
    args = [str(worker), *e4srec_args(tiny_e4srec, out)]
    killed = launch(FSDP_ACCELERATE, args, KILL_AT_STEP=6)  # 4 steps an epoch
    assert killed.returncode != 0
    assert not (out / "run.json").exists()
    assert json.loads((out / "checkpoints" / "state.json").read_text())["epoch"] == 0
    resumed = launch(FSDP_ACCELERATE, args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(read_run(out), tiny_e4srec["reference"])


def test_fsdp_sasrec_is_one_unit(sasrec, tmp_path):
    """A model without transformers layers (SASRec) is sharded as one root unit; one process's numbers."""
    worker = tmp_path / "worker.py"
    worker.write_text(FSDP_WORKER)
    out = tmp_path / "run"
    result = launch(FSDP_ACCELERATE, [str(worker), *train_args(sasrec["dataset_dir"], out, "SASRec", SASREC_PARAMS,
                                                               SASREC_TRAIN)])
    assert result.returncode == 0, result.stderr[-3000:]
    record = read_run(out)
    assert record["training"]["distributed_type"] == "FSDP" and record["training"]["fsdp"]["units"] == ["(root only)"]
    assert_same_run(record, sasrec["reference"])


def test_fsdp_on_the_cpu_is_refused_as_accelerate_runs_it(sasrec, tmp_path):
    """Without the worker, accelerate runs an FSDP launch's CPU processes as DDP (MULTI_CPU): the
    trainer says so instead of training unsharded."""
    result = launch(FSDP_ACCELERATE, ["-m", "e4srec.cli", *train_args(sasrec["dataset_dir"], tmp_path / "run", "SASRec",
                                                                       SASREC_PARAMS, SASREC_TRAIN)])
    assert result.returncode != 0
    assert "accelerate runs these 2 processes as MULTI_CPU" in result.stderr, result.stderr[-3000:]


def test_fsdp_refuses_a_shared_prefix(tiny_e4srec, tmp_path):
    """share_prefix auto shares the prefix in training on the CPU: its keys and values cross FSDP's layer
    units outside their outputs, whose backward would need weights FSDP freed (torch: "setStorage: ...
    out of bounds for storage of size 0"); the trainer refuses it up front."""
    worker = tmp_path / "worker.py"
    worker.write_text(FSDP_WORKER)
    params = {**E4SREC_FSDP_PARAMS, "share_prefix": "auto"}
    result = launch(FSDP_ACCELERATE, [str(worker), *e4srec_args(tiny_e4srec, tmp_path / "run", params)])
    assert result.returncode != 0
    assert "FSDP: the training step shares the instruction prefix" in result.stderr, result.stderr[-3000:]


def test_workflow_launches_fsdp(tmp_path):
    """distributed: fsdp with gpus_per_job 2 gives every training job the FSDP launch (dry run); the
    default (ddp) keeps `--multi_gpu` (tests/test_workflow.py)."""
    result = subprocess.run([sys.executable, "-m", "snakemake", "--nolock", "-n", "-p", "--configfile",
                             ".test/config.yaml", "--config", f"out={tmp_path}/results", f"resources={tmp_path}/resources",
                             "device=cuda", "gpus_per_job=2", "distributed=fsdp"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    launch_command = " ".join(["accelerate launch", *FSDP_ACCELERATE[3:], "-m e4srec.cli train --dataset-dir"])
    commands = [line for line in result.stdout.splitlines() if "e4srec.cli train" in line]
    assert commands and all(launch_command in line for line in commands), commands[:2]
    assert "--multi_gpu" not in result.stdout


def test_fsdp_benchmark_dry_run_uses_the_rules_launch():
    """workflow/scripts/fsdp_benchmark.py (GPU only) prints its commands with --dry-run: the DDP and the
    FSDP launch of the rules, the same training otherwise."""
    result = subprocess.run([sys.executable, "workflow/scripts/fsdp_benchmark.py", "--dry-run", "--dataset-dir", "D",
                             "--item-embeddings", "I", "--tokenizer-from", "T", "--work", "W"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    backbone, ddp, fsdp = result.stdout.splitlines()
    assert "random_backbone.py --preset 13b" in backbone
    assert " ".join(["accelerate launch", *ACCELERATE[3:]]) in ddp
    assert " ".join(["accelerate launch", *FSDP_ACCELERATE[3:]]) in fsdp
    assert ddp.split("-m e4srec.cli train")[1].replace("runs/ddp", "runs/fsdp") == fsdp.split("-m e4srec.cli train")[1]
