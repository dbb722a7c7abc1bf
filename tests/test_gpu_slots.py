"""`e4srec gpu-slot`: jobs that Snakemake runs side by side get GPUs of their own (no GPU needed: the
GPUs are named through CUDA_VISIBLE_DEVICES, and the slots are file locks)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from e4srec.files import InputError
from e4srec.gpu_slots import gpu_slots, release, try_acquire


def test_jobs_spread_over_gpus_before_they_share_one(tmp_path):
    gpus = ["0", "1", "2"]
    first = [try_acquire(gpus, 1, 2, tmp_path) for _ in range(3)]
    assert [held for held, _ in first] == [["0"], ["1"], ["2"]]  # every GPU's first slot
    fourth = try_acquire(gpus, 1, 2, tmp_path)
    assert fourth[0] == ["0"]  # then second slots
    two = try_acquire(gpus, 2, 2, tmp_path)
    assert two[0] == ["1", "2"]  # a two-GPU job takes two distinct GPUs
    assert try_acquire(gpus, 1, 2, tmp_path) is None  # all six slots held: nothing is taken
    release(first[1][1])  # GPU 1's first slot comes free
    assert try_acquire(gpus, 1, 2, tmp_path)[0] == ["1"]


def test_a_job_waits_until_its_slot_comes_free(tmp_path):
    held, files = try_acquire(["7"], 1, 1, tmp_path)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        with _timeout(0.5):
            with gpu_slots(1, 1, tmp_path, poll_seconds=0.05, gpus=["7"]):
                pass
    assert time.monotonic() - started >= 0.5
    release(files)
    with gpu_slots(1, 1, tmp_path, poll_seconds=0.05, gpus=["7"]) as got:
        assert got == ["7"]


def test_slurm_jobs_have_slots_of_their_own(tmp_path, monkeypatch):
    """Two SLURM jobs on one node may both see their own GPU as "0": neither waits for the other."""
    monkeypatch.setenv("SLURM_JOB_ID", "101")
    with gpu_slots(1, 1, tmp_path, gpus=["0"]) as first:
        monkeypatch.setenv("SLURM_JOB_ID", "102")
        with _timeout(5), gpu_slots(1, 1, tmp_path, poll_seconds=0.05, gpus=["0"]) as second:
            assert first == second == ["0"]


def test_no_gpu_runs_as_is_and_bad_requests_are_errors(tmp_path):
    with gpu_slots(2, 1, tmp_path, gpus=[]) as got:
        assert got == []
    with pytest.raises(InputError, match="asks for 3 GPUs, but 2 are visible"):
        with gpu_slots(3, 1, tmp_path, gpus=["0", "1"]):
            pass


def test_command_runs_on_its_own_gpus_and_keeps_its_exit_status(tmp_path):
    """Two concurrent commands on a two-GPU machine see different GPUs; a failing command's status passes through."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="4,6")
    command = [sys.executable, "-m", "e4srec.cli", "gpu-slot", "--gpus", "1", "--lock-dir", str(tmp_path), "--"]
    # each prints its GPU, then holds it until both have started (so they surely overlap)
    show = ("import os, pathlib, time; gpu = os.environ['CUDA_VISIBLE_DEVICES']; print(gpu, flush=True); "
            f"folder = pathlib.Path({str(tmp_path / 'started')!r}); folder.mkdir(exist_ok=True); "
            "(folder / gpu).touch(); end = time.time() + 30\n"
            "while len(list(folder.iterdir())) < 2 and time.time() < end: time.sleep(0.05)")
    running = [subprocess.Popen(command + [sys.executable, "-c", show], env=env, stdout=subprocess.PIPE, text=True)
               for _ in range(2)]
    seen = sorted(process.communicate(timeout=60)[0].strip() for process in running)
    assert seen == ["4", "6"] and all(process.returncode == 0 for process in running)
    failed = subprocess.run(command + [sys.executable, "-c", "raise SystemExit(3)"], env=env)
    assert failed.returncode == 3


class _timeout:
    """Raise TimeoutError in the ``with`` block after ``seconds`` (SIGALRM)."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __enter__(self):
        import signal

        def expire(signum, frame):
            raise TimeoutError

        self.previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, *exc):
        import signal

        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self.previous)
        return False
