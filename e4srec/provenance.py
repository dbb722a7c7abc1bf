"""Provenance: the record every run and every table carries (command, config, commit, machine, date)."""
from __future__ import annotations

import datetime as _dt
import functools
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path

PACKAGES = ("e4srec", "torch", "transformers", "peft", "accelerate", "numpy", "pandas", "scipy",
            "snakemake", "safetensors")


@functools.lru_cache(maxsize=1)
def git_state() -> dict:
    """Commit and dirty flag of the checkout holding this package (``unknown`` outside git).

    ``E4SREC_GIT_COMMIT`` (with ``E4SREC_GIT_DIRTY=1`` if the tree had changes) wins when set: a
    launcher that copies the working tree to another machine states the commit it copied, because
    the copy's ``.git`` may be missing or stale (a rented GPU machine once reported the previous
    commit there, with the new tree as "dirty")."""
    stated = os.environ.get("E4SREC_GIT_COMMIT")
    if stated:
        return {"commit": stated, "dirty": os.environ.get("E4SREC_GIT_DIRTY") == "1", "source": "environment"}
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, check=True).stdout
        return {"commit": commit, "dirty": bool(status.strip())}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "dirty": None}


def package_versions() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def machine() -> dict:
    info = {"hostname": platform.node(), "platform": platform.platform(), "python": sys.version.split()[0],
            "cpu_count": os.cpu_count()}
    try:
        import torch

        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def record(**fields) -> dict:
    """A provenance record: the given fields plus command, commit, packages, machine and UTC date."""
    return {
        "command": " ".join(sys.argv),
        "git": git_state(),
        "packages": package_versions(),
        "machine": machine(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **fields,
    }
