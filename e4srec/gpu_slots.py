"""GPUs of their own for jobs that Snakemake runs side by side on one machine.

Snakemake counts a ``gpu`` resource but does not say which GPU a job may use, so without help every
job of a multi-GPU machine would land on the first GPU. ``e4srec gpu-slot --gpus N -- COMMAND`` holds
N GPUs for COMMAND and runs it with ``CUDA_VISIBLE_DEVICES`` naming only them. Each GPU has
``jobs_per_gpu`` slots (a small model's training step leaves the GPU mostly idle, so two or three
jobs can share one); a slot is an exclusive ``flock`` on a file under the lock folder, taken by this
process and released when it exits, however it exits. Slots are taken level by level (every GPU's
first slot before any second one), so jobs spread over the GPUs before they share one. A job that
finds no free slots waits for them. Under SLURM (``SLURM_JOB_ID`` set) a job's GPUs are its own
already and may be numbered from 0 in every job of a node, so each job has slots of its own.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .files import InputError

DEFAULT_LOCK_DIR = Path(tempfile.gettempdir()) / "e4srec-gpu-slots"


def visible_gpus() -> list[str]:
    """The GPUs this process may use: ``CUDA_VISIBLE_DEVICES`` as set (ids or UUIDs), else every GPU torch sees."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [gpu.strip() for gpu in listed.split(",") if gpu.strip() and gpu.strip() != "-1"]
    import torch

    return [str(index) for index in range(torch.cuda.device_count())]


def _lock_path(lock_dir: Path, gpu: str, slot: int) -> Path:
    return lock_dir / f"gpu-{re.sub(r'[^A-Za-z0-9._-]', '_', gpu)}.slot-{slot}.lock"


def try_acquire(gpus: list[str], count: int, jobs_per_gpu: int, lock_dir: Path) -> tuple[list[str], list] | None:
    """``count`` distinct GPUs of ``gpus``, a free slot held on each: (their ids, the open lock files),
    or None (nothing held) when fewer than ``count`` GPUs have a free slot."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    held, files = [], []
    for slot in range(jobs_per_gpu):  # every GPU's first slot before any GPU's second
        for gpu in gpus:
            if len(held) == count:
                return held, files
            if gpu in held:
                continue
            handle = open(_lock_path(lock_dir, gpu, slot), "a")  # noqa: SIM115 (held until release)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            held.append(gpu)
            files.append(handle)
    if len(held) == count:
        return held, files
    release(files)
    return None


def release(files: list) -> None:
    for handle in files:
        handle.close()  # closing the file drops its flock


@contextlib.contextmanager
def gpu_slots(count: int, jobs_per_gpu: int = 1, lock_dir: Path = DEFAULT_LOCK_DIR, poll_seconds: float = 2.0,
              gpus: list[str] | None = None):
    """Hold ``count`` GPUs (a slot on each) for the ``with`` block; yields their ids, [] when no GPU is
    visible (the job then runs as it would have)."""
    gpus = visible_gpus() if gpus is None else gpus
    if not gpus:
        yield []
        return
    if count > len(gpus):
        raise InputError(f"gpu-slot: a job asks for {count} GPUs, but {len(gpus)} are visible ({', '.join(gpus)})")
    if jobs_per_gpu < 1:
        raise InputError(f"gpu-slot: jobs_per_gpu must be at least 1, got {jobs_per_gpu}")
    lock_dir = Path(lock_dir)
    if os.environ.get("SLURM_JOB_ID"):
        lock_dir = lock_dir / f"slurm-job-{os.environ['SLURM_JOB_ID']}"
    waited = False
    while (got := try_acquire(gpus, count, jobs_per_gpu, lock_dir)) is None:
        if not waited:
            print(f"gpu-slot: waiting for {count} free GPU slot(s) under {lock_dir}", flush=True)
            waited = True
        time.sleep(poll_seconds)
    held, files = got
    try:
        yield held
    finally:
        release(files)


def run_on_gpus(command: list[str], count: int, jobs_per_gpu: int = 1, lock_dir: Path = DEFAULT_LOCK_DIR) -> int:
    """Run ``command`` on ``count`` GPUs of its own (``CUDA_VISIBLE_DEVICES``); its exit status. SIGTERM
    and SIGINT are passed on to it, and the slots are held until it has exited."""
    if not command:
        raise InputError("gpu-slot: no command given (usage: e4srec gpu-slot --gpus N -- COMMAND ...)")
    with gpu_slots(count, jobs_per_gpu, lock_dir) as held:
        print(f"gpu-slot: GPU {','.join(held)} for {command[0]}" if held else "gpu-slot: no GPU visible",
              file=sys.stderr, flush=True)
        env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": ",".join(held)} if held else {}))
        child = subprocess.Popen(command, env=env)
        forward = {sig: signal.signal(sig, lambda number, frame: child.send_signal(number))
                   for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            return child.wait()
        finally:
            for sig, handler in forward.items():
                signal.signal(sig, handler)
