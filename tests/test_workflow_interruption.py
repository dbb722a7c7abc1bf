"""Interruption through Snakemake: training jobs killed with SIGKILL (the whole process group, the
Snakemake process and its job together, as a dead node or an OOM killer would) at seeded random
moments, and the same Snakemake command (with ``--rerun-incomplete``) run again after each kill.

What the test holds to:

- every rerun of a killed training job resumes from the checkpoint of the last committed epoch
  (its log says so), because the checkpoints live in ``checkpoints/`` of the run folder, which is
  not a declared output: Snakemake deletes the outputs of an incomplete job before rerunning it,
  never the checkpoints;
- no half-written output is ever taken as finished: a job cut short is rerun by the next command,
  or by a later one if the next is killed before it reaches the job (Snakemake reason "Incomplete
  output files" or "Missing output files"), and while a training job
  is unfinished none of its outputs (run.json, ranks.parquet, item_embeddings.safetensors,
  components/) exists under its final name;
- the final ranks.parquet files, the prepared dataset files and the item table are byte-identical to
  those of an uninterrupted run of the same command (run in parallel into another folder), and so are
  the metrics and the training history of run.json;
- the number of interruptions survived is the number planned: 2 in the default plan (one in each
  training job), 5 in the full plan (marked slow: one at a random moment from the start, two in
  each training job).

One SASRec job (the baseline whose item table E4SRec takes) and one E4SRec job of a `.test`-like
profile (TinyA, the tiny random LLaMA backbone, no instruction tuning), with more epochs than the
`.test` profile so that a kill can land inside training.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent

KILL_SEED = 11
SASREC_EPOCHS = 20
E4SREC_EPOCHS = 20
# Kill plans: the job whose checkpoint to wait for, or None for "any moment after the start"; the
# seeded plan draws the epoch and the delay. The full plan (5 kills: one anywhere, two in each
# training job, about 80 s here) is marked slow; the short one (one kill in each job, about 45 s)
# runs by default too.
SHORT_PLAN = ["SASRec", "E4SRec"]
FULL_PLAN = [None, "SASRec", "SASRec", "E4SRec", "E4SRec"]
RUN = "runs/TinyA/{model}/default/seed~0"
TRAINING_RULES = {"train_embedding_baseline": "SASRec", "train_e4srec": "E4SRec"}
EPOCHS = {"SASRec": SASREC_EPOCHS, "E4SRec": E4SREC_EPOCHS}


def write_config(folder: Path) -> Path:
    """The `.test` profile cut to the two jobs, into ``folder`` (out and resources both there)."""
    folder.mkdir(parents=True, exist_ok=True)
    text = f"""out: {folder}/results
resources: {folder}/resources
datasets: [TinyA]
custom_datasets:
  TinyA: {ROOT}/.test/data/TinyA.txt
max_len: 8
seeds: [0]
device: cpu
negatives: {{source: draw}}
baselines:
  models: [SASRec]
  train: {{epochs: {SASREC_EPOCHS}, batch_size: 8, patience: 100, eval_batch_size: 64}}
e4srec:
  backbone: tiny-random
  seeds: [0]
  ablations: []
  instruction_tuning: {{enabled: false}}
  train: {{epochs: {E4SREC_EPOCHS}, batch_size: 8, max_steps_per_epoch: 3, learning_rate: 0.001,
          scheduler: cosine, warmup_steps: 2, eval_batch_size: 32, patience: 100}}
"""
    (folder / "config.yaml").write_text(text)
    return folder / "config.yaml"


def snakemake_command(config: Path) -> list[str]:
    """The one command of the test, run again unchanged after every kill."""
    out = config.parent / "results"
    targets = [str(out / RUN.format(model=model) / "run.json") for model in ("SASRec", "E4SRec")]
    # --nolock: the runs write only into temporary folders, so they may run beside a real one.
    return [sys.executable, "-m", "snakemake", "--nolock", "--configfile", str(config), "--cores", "1",
            "--rerun-incomplete", *targets]


def kill_plan(seed: int, jobs: list[str | None]) -> list[dict]:
    """Seeded kill moments: after which committed epoch of which job, and how long after it."""
    rng = np.random.default_rng(seed)
    plan, last = [], {"SASRec": -1, "E4SRec": -1}
    for job in jobs:
        if job is None:
            plan.append({"job": None, "after_seconds": round(float(rng.uniform(2.5, 8.0)), 3)})
            continue
        last[job] += int(rng.integers(2, 6))  # at least two more epochs than at the previous kill
        plan.append({"job": job, "after_epoch": last[job], "delay": round(float(rng.uniform(0.0, 0.1)), 3)})
    return plan


def completed_epoch(out: Path, model: str) -> int:
    try:
        return json.loads((out / RUN.format(model=model) / "checkpoints" / "state.json").read_text())["epoch"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return -1


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the whole process group (Snakemake and its job) and wait until none of it runs."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 10
    while group_members(process.pid):
        assert time.monotonic() < deadline, f"process group {process.pid} still runs after SIGKILL"
        time.sleep(0.01)


def parse_jobs(log: str) -> tuple[dict[int, dict], set[int]]:
    """Jobs Snakemake started (jobid -> rule, outputs, reason) and those it finished, from its output."""
    started, finished, current = {}, set(), None
    for line in log.splitlines():
        if match := re.fullmatch(r"(?:local)?rule (\S+):", line):
            current = {"rule": match.group(1), "output": [], "reason": ""}
        elif current is not None and (match := re.fullmatch(r"    (\w+): (.*)", line)):
            key, value = match.groups()
            if key == "output":
                current["output"] = value.split(", ")
            elif key == "reason":
                current["reason"] = value
            elif key == "jobid":
                started[int(value)] = current
        elif current is not None and not line.startswith("    "):
            current = None
        if match := re.search(r"Finished jobid: (\d+)", line):
            finished.add(int(match.group(1)))
    return started, finished


def job_outputs(out: Path, model: str) -> list[Path]:
    run = out / RUN.format(model=model)
    names = ["ranks.parquet", "run.json", "item_embeddings.safetensors" if model == "SASRec" else "components"]
    return [run / name for name in names]


def resumed_after(out: Path, model: str) -> int | None:
    """The epoch the job's last attempt resumed after (from its log), None if it started afresh."""
    log = out / "logs" / f"{RUN.format(model=model)}.log"
    found = re.findall(r"resumed from \S+ after epoch (\d+)", log.read_text())
    return int(found[-1]) if found else None


def attempt_log(folder: Path, attempt: int) -> Path:
    return folder / f"snakemake-{attempt}.log"


def interrupted_workflow(config: Path, plan: list[dict]) -> list[dict]:
    """Run the command, kill it as planned, rerun it after each kill; the last run finishes.
    Returns one record per kill (what was running, which epochs were committed, what the rerun did)."""
    folder, out = config.parent, config.parent / "results"
    command = snakemake_command(config)
    kills, pending = [], []  # pending: (kill index, job) cut short and not rerun yet
    for attempt in range(len(plan) + 1):
        log = attempt_log(folder, attempt)
        # epochs committed before this attempt: a kill keyed on a job waits for at least one epoch of
        # THIS attempt (on a fast machine the previous attempt may already have passed the planned epoch,
        # and a kill before the rerun even started the job would test nothing)
        floor = {model: completed_epoch(out, model) for model in EPOCHS}
        with open(log, "w") as handle:
            process = subprocess.Popen(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        started = time.monotonic()
        if attempt == len(plan):  # the last run goes to the end
            assert process.wait(timeout=300) == 0, log.read_text()[-3000:]
        else:
            kill = dict(plan[attempt])
            try:
                if kill["job"] is None:
                    while time.monotonic() - started < kill["after_seconds"]:
                        assert process.poll() is None, "finished before the kill:\n" + log.read_text()[-3000:]
                        time.sleep(0.005)
                else:
                    kill["after_epoch"] = max(kill["after_epoch"], floor[kill["job"]] + 1)
                    while completed_epoch(out, kill["job"]) < kill["after_epoch"]:
                        assert process.poll() is None, f"finished before {kill}:\n" + log.read_text()[-3000:]
                        assert time.monotonic() - started < 240, f"timed out waiting for {kill}"
                        time.sleep(0.005)
                    time.sleep(kill["delay"])
                assert process.poll() is None, f"the workflow finished before {kill}: raise the epochs"
                kill_group(process)
            finally:
                if process.poll() is None:
                    kill_group(process)
            kill["seconds"] = round(time.monotonic() - started, 3)
        jobs, finished = parse_jobs(log.read_text())
        if attempt > 0:  # what this run did with the job(s) cut short by earlier kills
            before = kills[attempt - 1]
            rerun = {tuple(job["output"]): job for job in jobs.values()}
            for index, job in list(pending):
                again = rerun.get(tuple(job["output"]))
                if again is None:
                    # this run may itself be killed before it reaches the job: then the next one must
                    # rerun it; the last run, which goes to the end, must rerun every such job
                    assert attempt < len(plan), f"kill {index}: {job['rule']} was cut short but never rerun"
                    continue
                # Snakemake 9 may label such a rerun "Forced execution" (seen when the kill came while
                # no training job had started yet); what matters is that it runs again
                assert re.search(r"Incomplete output files|Missing output files|Forced execution", again["reason"]), again
                pending.remove((index, job))
            before["rerun"] = sorted(job["rule"] for job in jobs.values())
            for index, earlier in enumerate(kills):  # every job it cut short was rerun, none taken as finished
                earlier["survived"] = not any(i == index for i, _ in pending)
            for jobid, job in jobs.items():
                model = TRAINING_RULES.get(job["rule"])
                got_going = jobid in finished or completed_epoch(out, model) > before["epochs_at_kill"][model] \
                    if model else False
                if got_going:  # its log is this run's: did it resume from the epoch committed at the kill?
                    before.setdefault("resumed_after", {})[model] = resumed_after(out, model)
                    expected = before["epochs_at_kill"][model]
                    assert resumed_after(out, model) == (expected if expected >= 0 else None), (model, before)
        if attempt == len(plan):
            break
        kill["interrupted"] = [jobs[j] for j in sorted(set(jobs) - finished)]
        pending.extend((attempt, job) for job in kill["interrupted"])
        kill["epochs_at_kill"] = {model: completed_epoch(out, model) for model in ("SASRec", "E4SRec")}
        kill["outputs_at_kill"] = sorted(str(p.relative_to(out)) for model in ("SASRec", "E4SRec")
                                         for p in job_outputs(out, model) if p.exists())
        for job in kill["interrupted"]:
            model = TRAINING_RULES.get(job["rule"])
            if model and kill["epochs_at_kill"][model] < EPOCHS[model] - 1:
                # killed while training: not one of its outputs exists under its final name
                present = [p.name for p in job_outputs(out, model) if p.exists()]
                assert present == [], f"kill {attempt} left {present} of the unfinished {model} job"
        kills.append(kill)
    return kills


def read_run(out: Path, model: str) -> dict:
    return json.loads((out / RUN.format(model=model) / "run.json").read_text())


def history(record: dict) -> list:
    return [(e["epoch"], e["loss"], e["valid_ndcg10"], e["examples"]) for e in record["training"]["epochs"]]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the killed processes in /proc (Linux)")
@pytest.mark.parametrize("jobs", [pytest.param(SHORT_PLAN, id="2-kills"),
                                  pytest.param(FULL_PLAN, id="5-kills", marks=pytest.mark.slow)])
def test_snakemake_training_jobs_survive_sigkill(jobs, tmp_path):
    plan = kill_plan(KILL_SEED, jobs)
    reference_config = write_config(tmp_path / "reference")
    with open(tmp_path / "reference.log", "w") as handle:  # the uninterrupted run, in parallel
        reference = subprocess.Popen(snakemake_command(reference_config), cwd=ROOT, stdout=handle,
                                     stderr=subprocess.STDOUT, start_new_session=True)
    try:
        config = write_config(tmp_path / "interrupted")
        kills = interrupted_workflow(config, plan)
        assert reference.wait(timeout=300) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    finally:
        if reference.poll() is None:
            kill_group(reference)
    (tmp_path / "kills.json").write_text(json.dumps(kills, indent=2))
    summary = json.dumps([{k: v for k, v in kill.items() if k != "interrupted"} |
                          {"interrupted": [j["rule"] for j in kill["interrupted"]]} for kill in kills], indent=1)
    print(f"kill plan (seed {KILL_SEED}) and what happened:\n{summary}")

    survived = sum(kill.get("survived", False) for kill in kills)
    assert survived == len(kills) == len(jobs) == len(plan)
    # the kills meant to land inside a training job did, after a committed epoch, and the job resumed from it
    for kill in kills:
        if kill["job"]:
            model = kill["job"]
            assert model in [TRAINING_RULES.get(j["rule"]) for j in kill["interrupted"]], summary
            assert kill["after_epoch"] <= kill["epochs_at_kill"][model] < EPOCHS[model] - 1, summary
            assert kill["resumed_after"][model] == kill["epochs_at_kill"][model], summary

    reference_out, out = reference_config.parent / "results", config.parent / "results"
    for model in ("SASRec", "E4SRec"):
        run, expected = out / RUN.format(model=model), reference_out / RUN.format(model=model)
        assert (run / "ranks.parquet").read_bytes() == (expected / "ranks.parquet").read_bytes(), model
        record, expected_record = read_run(out, model), read_run(reference_out, model)
        assert json.dumps(record["metrics"], sort_keys=True) == json.dumps(expected_record["metrics"], sort_keys=True)
        assert history(record) == history(expected_record), model
        assert record["training"]["best_epoch"] == expected_record["training"]["best_epoch"]
        assert not list((run / "checkpoints").glob("*.next.safetensors"))  # nothing left staged
    for name in ("sequences.parquet", "negatives.parquet"):
        assert (out / "data/TinyA" / name).read_bytes() == (reference_out / "data/TinyA" / name).read_bytes()
    table = f"{RUN.format(model='SASRec')}/item_embeddings.safetensors"
    assert (out / table).read_bytes() == (reference_out / table).read_bytes()
    projections = f"{RUN.format(model='E4SRec')}/components/projections.safetensors"
    assert (out / projections).read_bytes() == (reference_out / projections).read_bytes()

    # Snakemake agrees that everything is finished: no incomplete job is left
    again = subprocess.run([*snakemake_command(config), "-n"], cwd=ROOT, capture_output=True, text=True)
    assert "Nothing to be done" in again.stdout + again.stderr, again.stdout[-2000:]
