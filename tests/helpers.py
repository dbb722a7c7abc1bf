"""Tiny-data builders shared by the tests (no test collects from here).

Import as ``from helpers import ...`` (pytest puts ``tests/`` on ``sys.path``) or, where ``tests``
is a package, ``from tests.helpers import ...``.
"""
from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import numpy as np

from e4srec.data import SequenceData, draw_negatives, prepare


def write_sequences(path: str | Path, sequences: dict[int, list[int]]) -> Path:
    """Write ``user item item ...`` lines (one per user, in dict order) with a final newline."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(" ".join(map(str, [user, *items])) + "\n" for user, items in sequences.items()))
    return path


def random_sequences(n_users: int, n_items: int, seed: int, min_len: int = 3, max_len: int = 12) -> dict[int, list[int]]:
    """Seeded sequences of distinct items; users 1..n_users; item ``n_items`` always occurs."""
    rng = np.random.default_rng(seed)
    sequences = {}
    for user in range(1, n_users + 1):
        length = int(rng.integers(min_len, max_len + 1))
        sequences[user] = [int(i) for i in rng.choice(np.arange(1, n_items + 1), size=length, replace=False)]
    if all(n_items not in items for items in sequences.values()):
        sequences[1][0] = n_items
    return sequences


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_data(sequences: dict[int, list[int]], max_len: int = 5, n_items: int | None = None,
              n_negatives: int = 3, seed: int = 0, name: str = "tiny") -> SequenceData:
    """An in-memory SequenceData (no files); negatives drawn with ``seed``."""
    n_items = n_items or max(max(items) for items in sequences.values())
    users = sorted(sequences)
    negatives = draw_negatives(sequences, n_items, n_negatives, seed) if n_negatives else {u: [] for u in users}
    return SequenceData(name=name, n_items=n_items, max_len=max_len, user_ids=np.asarray(users, dtype=np.int64),
                        sequences=[np.asarray(sequences[u], dtype=np.int64) for u in users],
                        negatives=np.asarray([negatives[u] for u in users], dtype=np.int64).reshape(len(users), -1),
                        record={"name": name, "n_items": n_items, "max_len": max_len})


def small_sequence_data() -> SequenceData:
    """40 seeded users of 4 to 10 of 30 items, max_len 5, no negatives: the trainer-level tests' data."""
    return make_data(random_sequences(40, 30, seed=0, min_len=4, max_len=10), max_len=5, n_items=30,
                     n_negatives=0, name="small")


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to ``n`` inside the block, restored after it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def prepare_tiny(folder: str | Path, sequences: dict[int, list[int]], max_len: int = 5, n_negatives: int = 3,
                 name: str = "tiny", **kwargs) -> Path:
    """Write a raw file and prepare it into ``folder/prepared``; return the prepared folder."""
    folder = Path(folder)
    raw = write_sequences(folder / f"{name}.txt", sequences)
    out = folder / "prepared"
    raw_record = {"name": name, "source": str(raw), "sha256": sha256_bytes(raw.read_bytes()), "checksum_verified": False}
    prepare(name, raw, out, raw_record=raw_record, max_len=max_len, n_negatives=n_negatives, **kwargs)
    return out


def files_in(folder: str | Path) -> list[str]:
    """Every file name under ``folder`` (hidden temporaries included); [] when it does not exist."""
    folder = Path(folder)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def main_rc(argv: list[str]) -> int:
    """``e4srec ARGV`` in process: the exit status the console script would return."""
    from e4srec import cli

    try:
        return cli.main(argv)
    except SystemExit as stop:  # argparse
        return stop.code
