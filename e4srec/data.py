"""Datasets: download and verify, validate, split leave-one-out, sample negatives, Table 2.

The four benchmark files are the S3-Rec preprocessed files the paper uses unchanged: one line per
user, ``user_id item_id item_id ...`` in chronological order, ids from 1. A user's own dataset is one
config entry (a name and a path, or a mapping with its format); its checksum is recorded, not
checked. Besides that format, interaction logs (CSV, TSV, Parquet, RecBole ``.inter``) and files in
the S3-Rec layout with raw ids of any kind are read by :mod:`e4srec.interactions`, which numbers
their ids 1..n and saves the numbering beside the prepared data (paper/DATA.md).

Split (the paper's): the last item is the test target, the second to last the validation target,
the rest is the training part. Model inputs are cut to the last ``max_len`` items (50).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd

from . import interactions
from .files import InputError, atomic_path, git_blob_sha1, read_input_bytes, read_json, sha256_file, write_json, write_parquet
from .interactions import INT64_MAX, ITEM_IDS_FILE, USER_IDS_FILE, InputSpec

log = logging.getLogger(__name__)

CANONICAL_URL = "https://raw.githubusercontent.com/RUCAIBox/CIKM2020-S3Rec/master/data/"


@dataclasses.dataclass(frozen=True)
class KnownDataset:
    """A benchmark file of the paper: its checksums and the name the paper's tables use."""

    paper_name: str
    sha256: str
    sample_git_sha1: str  # the S3-Rec 99-negative candidate file <name>_sample.txt


KNOWN_DATASETS = {
    "Beauty": KnownDataset("Beauty", "226cce9c3105299ca0db9615d7d3fb32b3175e90da43100ae352599f0f0107b8",
                           "a516bb7a9ccaabadbb13be731382f30bd977c7a8"),
    "Sports_and_Outdoors": KnownDataset("Sports", "2a095e0648872beb9982408958290f5d655db5be2911c3756b5446de9f0b8de2",
                                        "17dc8cab2b54c6ee0ba1dc9d5cc273e70427e81b"),
    "Toys_and_Games": KnownDataset("Toys", "176c680c688d497598c4a89a03b402c0fe78d795e5db335c2e78dd5f2d778a3f",
                                   "97e609efc6228cc342df2ce480bebec4b7c3911b"),
    "Yelp": KnownDataset("Yelp", "724b219106b81dd2349027da997334ddb6da9fe2f152ad6e0d97a93170f7caed",
                         "fbd75af7efe10bab288245c0d4a54ca3bf2faa3b"),
}


SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def check_dataset_name(name: str) -> str:
    """A dataset name names folders and files: letters, digits, '_', '.', '-', from a letter or digit."""
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name) or ".." in name:
        raise InputError(f"dataset name {name!r} is not a safe file name (1 to 100 letters, digits, '_', '.' or "
                         "'-', starting with a letter or digit, no '..'): it names the dataset's folders and files")
    return name


def paper_name(dataset: str) -> str:
    """The name the paper's tables give a dataset (``Sports`` for ``Sports_and_Outdoors``)."""
    return KNOWN_DATASETS[dataset].paper_name if dataset in KNOWN_DATASETS else dataset


# ----------------------------------------------------------------------------------------------
# Download


def _copy_from(source: str, dest: Path) -> None:
    """Copy a file from a local path or a URL to ``dest`` (caller makes it atomic)."""
    if "://" in source:
        with urllib.request.urlopen(source, timeout=60) as response, open(dest, "wb") as out:
            shutil.copyfileobj(response, out)
    else:
        if not Path(source).is_file():
            raise FileNotFoundError(source)
        shutil.copyfile(source, dest)


def fetch_arguments(entry: str | dict) -> str:
    """``e4srec fetch``'s source arguments for a custom dataset's config entry: ``--path`` and, for a
    mapping, its settings but the path as ``--input JSON`` (shell-quoted)."""
    import json
    import shlex

    if isinstance(entry, str):
        return f"--path {shlex.quote(entry)}"
    settings = json.dumps({k: v for k, v in entry.items() if k != "path"}, sort_keys=True)
    return f"--path {shlex.quote(str(entry['path']))} --input {shlex.quote(settings)}"


def _source_of(filename: str, mirror: str | None) -> str:
    if not mirror:
        return CANONICAL_URL + filename
    return mirror.rstrip("/") + "/" + filename if "://" in mirror else str(Path(mirror) / filename)


def fetch_dataset(name: str, dest: str | Path, mirror: str | None = None, path: str | None = None) -> dict:
    """Fetch one dataset file to ``dest``, verified; return its record (source, sha256, verified).

    Known datasets come from ``mirror`` (a folder or URL base) or the canonical URL and must match
    their published sha256. A custom dataset (``path`` given) is copied and its sha256 recorded.
    """
    dest = Path(dest)
    check_dataset_name(name)
    source = path if path else _source_of(f"{name}.txt", mirror)
    with atomic_path(dest) as tmp:
        try:
            _copy_from(source, tmp)
        except (OSError, ValueError) as err:
            raise InputError(f"{source}: cannot fetch dataset {name!r} ({err})") from None
        digest = sha256_file(tmp)
        known = KNOWN_DATASETS.get(name)
        if known and not path and digest != known.sha256:
            raise InputError(f"{source}: sha256 mismatch for {name}: expected {known.sha256}, got {digest}"
                             " (corrupted or truncated download)")
    return {"name": name, "source": source, "sha256": digest, "checksum_verified": bool(known and not path)}


def fetch_negatives(name: str, dest: str | Path, mirror: str | None = None) -> dict | None:
    """Try to fetch S3-Rec's 99-negative file, verified by git blob SHA-1; None if unreachable."""
    known = KNOWN_DATASETS.get(name)
    if known is None:
        return None
    source = _source_of(f"{name}_sample.txt", mirror)
    try:
        with atomic_path(dest) as tmp:
            _copy_from(source, tmp)
            blob = git_blob_sha1(tmp)
            if blob != known.sample_git_sha1:
                raise InputError(f"{source}: git blob SHA-1 mismatch: expected {known.sample_git_sha1}, got {blob}")
    except (OSError, ValueError) as err:
        if isinstance(err, InputError):
            raise
        log.info("negatives for %s not reachable at %s (%s): they will be drawn", name, source, err)
        return None
    return {"source": source, "git_blob_sha1": blob}


# ----------------------------------------------------------------------------------------------
# Parsing and validation


_INTEGER = re.compile(r"-?[0-9]+")


def parse_sequences(path: str | Path) -> dict[int, list[int]]:
    """Parse a ``user item item ...`` file; every problem is reported with file and line."""
    path = Path(path)
    text = read_input_bytes(path)
    # Lines end at "\n" only (str.splitlines would also break at \x0b, \x0c, \x1c-\x1e, \x85,
    # \u2028 and \u2029, inventing lines and shifting every reported line number after them).
    lines = text.decode("utf-8", errors="replace").split("\n")[:-1]
    if not text.endswith(b"\n"):
        raise InputError(f"{path}:{len(lines) + 1}: last line has no newline: the file looks truncated")
    sequences: dict[int, list[int]] = {}
    for line_no, raw in enumerate(lines, start=1):
        tokens = raw.split()
        if not tokens:
            raise InputError(f"{path}:{line_no}: empty line")
        # Plain ASCII decimal integers only: int() alone would also accept "1_000", "+3" or
        # non-ASCII digits, and silently read a malformed file.
        bad = next((t for t in tokens if not _INTEGER.fullmatch(t)), None)
        if bad is not None:
            raise InputError(f"{path}:{line_no}: non-integer token {bad!r}")
        ids = [int(token) for token in tokens]
        big = next((i for i in ids if i > INT64_MAX), None)
        if big is not None:
            raise InputError(f"{path}:{line_no}: id {big} does not fit in 64 bits (this format uses ids as they "
                             "are; format 'sequences' numbers ids of any kind 1..n)")
        user, items = ids[0], ids[1:]
        if user in sequences:
            raise InputError(f"{path}:{line_no}: duplicate line for user {user}")
        if user <= 0:
            raise InputError(f"{path}:{line_no}: user id {user} must be positive")
        bad_items = [i for i in items if i <= 0]
        if bad_items:
            raise InputError(f"{path}:{line_no}: item id {bad_items[0]} must be positive (ids start at 1; 0 is padding)")
        sequences[user] = items
    return sequences


SHORT_USER_POLICIES = ("drop", "error")
ID_ORDER = ("users by their first kept interaction in chronological order (a stable sort by timestamp: file "
            "order within equal timestamps); items by first appearance in the users' sequences read in user "
            "order, each oldest first")


def drop_short_users(sequences: dict[int, list[int]], min_interactions: int, policy: str,
                     path: str | Path = "<sequences>", describe=None) -> tuple[dict[int, list[int]], int]:
    """Apply the short-user policy: ``drop`` (return the count dropped) or ``error``; ``describe``
    (user -> text) names a user in the message (default: its id)."""
    if policy not in SHORT_USER_POLICIES:
        raise InputError(f"{path}: unknown short-user policy {policy!r}; choose one of {SHORT_USER_POLICIES}")
    short = [u for u, items in sequences.items() if len(items) < min_interactions]
    if short and policy == "error":
        first = describe(short[0]) if describe else short[0]
        raise InputError(f"{path}: {len(short)} users have fewer than {min_interactions} interactions "
                         f"(first: user {first}); leave-one-out needs a training, a validation and a test item")
    kept = {u: items for u, items in sequences.items() if len(items) >= min_interactions}
    if short:
        log.warning("%s: dropped %d users with fewer than %d interactions", path, len(short), min_interactions)
    return kept, len(short)


def subsample_users(sequences: dict[int, list[int]], n_users: int | None, seed: int) -> dict[int, list[int]]:
    """A seeded uniform sample of ``n_users`` users (all of them when None or larger)."""
    if not n_users or n_users >= len(sequences):
        return sequences
    users = np.array(sorted(sequences))
    chosen = np.sort(np.random.default_rng(seed).choice(users, size=n_users, replace=False))
    return {int(u): sequences[int(u)] for u in chosen}


def draw_negatives(sequences: dict[int, list[int]], n_items: int, n_negatives: int, seed: int) -> dict[int, list[int]]:
    """Draw ``n_negatives`` distinct items per user, uniformly from items the user never interacted with."""
    rng = np.random.default_rng(seed)
    negatives = {}
    for user in sorted(sequences):
        seen = set(sequences[user])
        if n_items - len(seen) < n_negatives:
            raise InputError(f"user {user}: only {n_items - len(seen)} unseen items, {n_negatives} negatives needed")
        chosen: list[int] = []
        taken = set(seen)
        while len(chosen) < n_negatives:
            for item in rng.integers(1, n_items + 1, size=2 * n_negatives).tolist():
                if item not in taken:
                    taken.add(item)
                    chosen.append(item)
                    if len(chosen) == n_negatives:
                        break
        negatives[user] = chosen
    return negatives


def parse_negatives(path: str | Path, sequences: dict[int, list[int]], n_negatives: int,
                    n_items: int | None = None) -> dict[int, list[int]]:
    """Read an S3-Rec ``_sample.txt`` file; check it covers every user and excludes their history
    (and, given ``n_items``, that every negative is an item id 1..n_items)."""
    negatives = parse_sequences(path)
    for user, items in sequences.items():
        if user not in negatives:
            raise InputError(f"{path}: no negatives for user {user}")
        if len(negatives[user]) != n_negatives:
            raise InputError(f"{path}: user {user} has {len(negatives[user])} negatives, expected {n_negatives}")
        if set(negatives[user]) & set(items):
            raise InputError(f"{path}: negatives of user {user} include items of the user's history")
        if n_items is not None and max(negatives[user], default=0) > n_items:
            raise InputError(f"{path}: negatives of user {user} include item {max(negatives[user])}, "
                             f"beyond the dataset's {n_items} items")
    return {u: negatives[u] for u in sequences}


def statistics(sequences: dict[int, list[int]], n_items: int) -> dict:
    """Table 2: users, items, interactions, sparsity, average sequence length."""
    n_users = len(sequences)
    interactions = sum(len(items) for items in sequences.values())
    return {"users": n_users, "items": n_items, "interactions": interactions,
            "sparsity": 1.0 - interactions / (n_users * n_items), "average_length": interactions / n_users}


# ----------------------------------------------------------------------------------------------
# Limits: what a prepared dataset will make the models allocate, against the machine's memory

# One catalogue item costs at least a 64-float32 item table row with its gradient and two Adam
# moments (1 KiB) and one float32 score for each user of a 256-user full-ranking batch (1 KiB); the
# models add more (E4SRec's item scorer has a row of the backbone's hidden size).
BYTES_PER_ITEM = 2048
EVAL_BATCH = 256


def machine_memory() -> int:
    """Bytes of memory of this machine: physical memory, or the cgroup limit where lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total


def _gib(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:,.1f} GiB" if n_bytes < 2**40 else f"{n_bytes / 2**40:,.1f} TiB"


def check_catalogue(n_items: int, memory: int, where: str) -> None:
    """Refuse a catalogue whose per-item arrays cannot fit ``memory`` bytes."""
    need = n_items * BYTES_PER_ITEM
    if need > memory:
        raise InputError(f"{where}: a catalogue of {n_items:,} items needs at least {_gib(need)} ({BYTES_PER_ITEM} "
                         f"bytes an item: item table, its gradient and Adam moments, scores of a {EVAL_BATCH}-user "
                         f"batch); {_gib(memory)} of memory fits at most {memory // BYTES_PER_ITEM:,} items")


def sequence_bytes(lengths: list[int], max_len: int) -> int:
    """At least what ``max_len`` makes the models allocate: three int64 [users, max_len] matrices
    (validation and test histories, training sequences), the int64 [examples, max_len] training
    histories and one batch of float32 [256, max_len, max_len] attention scores."""
    examples = sum(min(max(n - 3, 0), max_len) for n in lengths)
    return 8 * max_len * (3 * len(lengths) + examples) + EVAL_BATCH * 4 * max_len ** 2


def check_max_len(sequences: dict[int, list[int]], max_len: int, memory: int, where: str) -> None:
    """Refuse a ``max_len`` whose padded matrices cannot fit ``memory`` bytes; say which fits."""
    lengths = [len(items) for items in sequences.values()]
    need = sequence_bytes(lengths, max_len)
    if need <= memory:
        return
    low, high = 0, max_len  # the largest max_len that fits
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if sequence_bytes(lengths, mid) <= memory else (low, mid - 1)
    raise InputError(f"{where}: max_len {max_len:,} needs at least {_gib(need)} for {len(lengths):,} users (padded "
                     f"int64 histories and a {EVAL_BATCH}-row batch of attention scores); {_gib(memory)} of memory "
                     f"fits max_len up to {low:,}")


# ----------------------------------------------------------------------------------------------
# The prepared dataset


def prepare(name: str, raw_path: str | Path, out_dir: str | Path, *, raw_record: dict, max_len: int,
            min_interactions: int = 3, short_user_policy: str = "drop", subsample: int | None = None,
            subsample_seed: int = 0, n_negatives: int = 99, negatives_seed: int = 2023,
            negatives_path: str | Path | None = None, negatives_record: dict | None = None,
            source: InputSpec | dict | None = None, memory_bytes: int | None = None) -> dict:
    """Validate, subsample and fix negatives; write ``sequences.parquet``, ``negatives.parquet``
    and ``dataset.json`` (statistics, sources, policies) into ``out_dir``.

    ``source`` says how to read ``raw_path`` (an :class:`e4srec.interactions.InputSpec` or its
    config mapping; default: the S3-Rec format, every interaction kept, ids as they are). Formats
    that number ids anew also write ``user_ids.tsv`` and ``item_ids.tsv``. ``memory_bytes`` bounds
    the catalogue and ``max_len`` (default: the spec's ``memory_gib``, else this machine's memory).
    Nothing is written unless every check passes."""
    out_dir = Path(out_dir)
    check_dataset_name(name)
    spec = InputSpec.from_dict(source, f"{raw_path}: input settings")
    memory = memory_bytes or (int(spec.memory_gib * 2**30) if spec.memory_gib else machine_memory())
    if min_interactions < 2:
        raise InputError(f"{raw_path}: min_interactions is {min_interactions}; leave-one-out needs at least "
                         "a validation and a test item per user (2; 3 to leave a training item)")
    prepared, applied, describe = None, None, None
    if spec.remaps:
        prepared = interactions.prepare_log(interactions.read_log(raw_path, spec), spec)
        full, n_items = prepared.sequences, len(prepared.items)
        applied = prepared.report
        check_catalogue(n_items, memory, str(raw_path))
        describe = lambda u: f"{prepared.users.external(u)!r} ({prepared.first_place[u]})"  # noqa: E731
    else:
        full = parse_sequences(raw_path)
        n_items = max((max(items) for items in full.values() if items), default=0)
        if n_items * BYTES_PER_ITEM > memory:  # ids are array indices here: name the line of the largest
            line = next(n for n, items in enumerate(full.values(), start=1) if n_items in items)
            check_catalogue(n_items, memory, f"{raw_path}:{line}: item id {n_items} (ids are used as they are: "
                                             "format 'sequences' numbers them 1..n)")
        if not spec.is_default:
            full, applied = interactions.filter_sequences(full, spec.duplicates, spec.core)
    full, dropped = drop_short_users(full, min_interactions, short_user_policy, raw_path, describe)
    if not full:
        raise InputError(f"{raw_path}: no user has at least {min_interactions} interactions")
    full_stats = statistics(full, n_items)
    sequences = subsample_users(full, subsample, subsample_seed)
    check_max_len(sequences, max_len, memory, str(raw_path))
    if negatives_path is not None:
        negatives = parse_negatives(negatives_path, sequences, n_negatives, n_items)
        negatives_info = {"origin": "downloaded (S3-Rec candidate file, git blob SHA-1 verified)", **(negatives_record or {})}
    else:
        try:
            negatives = draw_negatives(sequences, n_items, n_negatives, negatives_seed)
        except InputError as err:
            raise InputError(f"{raw_path}: {err}") from None
        negatives_info = {"origin": "drawn", "seed": negatives_seed,
                          "method": "uniform over items the user never interacted with, without replacement"}
    users = sorted(sequences)
    frame = pd.DataFrame({"user_id": users, "items": [sequences[u] for u in users]})
    neg_frame = pd.DataFrame({"user_id": users, "negatives": [negatives[u] for u in users]})
    record = {
        "name": name, "n_items": n_items, "max_len": max_len, "raw": raw_record,
        "statistics": statistics(sequences, n_items), "full_statistics": full_stats,
        "short_users": {"min_interactions": min_interactions, "policy": short_user_policy, "dropped": dropped},
        "subsample": {"users": subsample, "seed": subsample_seed},
        "negatives": {"count": n_negatives, **negatives_info},
        "split": "leave-one-out: last item test, second to last validation, the rest training",
    }
    if applied is not None:  # the benchmark files' reading adds nothing: their dataset.json stays as it was
        record["input"] = {**spec.as_record(), **applied}
    if prepared is not None:
        record["ids"] = {"users": USER_IDS_FILE, "items": ITEM_IDS_FILE, "order": ID_ORDER}
        prepared.users.write(out_dir / USER_IDS_FILE)
        prepared.items.write(out_dir / ITEM_IDS_FILE)
    else:  # ids as they are: no numbering to keep (remove one a format that renumbered left behind)
        for stale in (USER_IDS_FILE, ITEM_IDS_FILE):
            (out_dir / stale).unlink(missing_ok=True)
    write_parquet(out_dir / "sequences.parquet", frame)
    write_parquet(out_dir / "negatives.parquet", neg_frame)
    write_json(out_dir / "dataset.json", record)
    return record


def left_pad(rows: list[np.ndarray] | list[list[int]], width: int) -> np.ndarray:
    """Right-align each row's last ``width`` items in a zero (padding) matrix [n, width]."""
    out = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        row = row[len(row) - width:] if len(row) > width else row  # row[-0:] would be the whole row
        if len(row):
            out[i, width - len(row):] = row
    return out


@dataclasses.dataclass
class SequenceData:
    """A prepared dataset in memory. Items are 1..n_items; 0 is padding."""

    name: str
    n_items: int
    max_len: int
    user_ids: np.ndarray  # [U]
    sequences: list[np.ndarray]  # per user, full chronological sequence
    negatives: np.ndarray  # [U, n_negatives]
    record: dict

    @classmethod
    def load(cls, folder: str | Path) -> "SequenceData":
        folder = Path(folder)
        record = read_json(folder / "dataset.json")
        frame = pd.read_parquet(folder / "sequences.parquet")
        neg = pd.read_parquet(folder / "negatives.parquet")
        if not np.array_equal(frame["user_id"].to_numpy(), neg["user_id"].to_numpy()):
            raise InputError(f"{folder}: sequences.parquet and negatives.parquet list different users")
        return cls(name=record["name"], n_items=int(record["n_items"]), max_len=int(record["max_len"]),
                   user_ids=frame["user_id"].to_numpy(),
                   sequences=[np.asarray(items, dtype=np.int64) for items in frame["items"]],
                   negatives=np.stack([np.asarray(n, dtype=np.int64) for n in neg["negatives"]]),
                   record=record)

    @property
    def n_users(self) -> int:
        return len(self.sequences)

    def train_part(self, user_index: int) -> np.ndarray:
        return self.sequences[user_index][:-2]

    def histories(self, split: str) -> list[np.ndarray]:
        """Uncut histories: the training part for ``valid``, training part + validation item for ``test``."""
        end = {"valid": -2, "test": -1}[split]
        return [seq[:end] for seq in self.sequences]

    def targets(self, split: str) -> np.ndarray:
        index = {"valid": -2, "test": -1}[split]
        return np.array([seq[index] for seq in self.sequences], dtype=np.int64)

    def padded_histories(self, split: str) -> np.ndarray:
        """[U, max_len] model inputs: each history cut to its last ``max_len`` items, left-padded."""
        return left_pad(self.histories(split), self.max_len)

    def training_sequences(self) -> np.ndarray:
        """[U, max_len + 1] the last ``max_len + 1`` training items per user, left-padded: inputs
        ``[:, :-1]`` and next-item targets ``[:, 1:]`` for models trained on every position."""
        return left_pad([self.train_part(i) for i in range(self.n_users)], self.max_len + 1)

    def training_examples(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(user_index [N], history [N, max_len], target [N]): one example per training position
        with a non-empty history, for the last ``max_len`` positions of each training part."""
        users, histories, targets = [], [], []
        for u in range(self.n_users):
            train = self.train_part(u)
            for t in range(max(1, len(train) - self.max_len), len(train)):
                users.append(u)
                histories.append(train[max(0, t - self.max_len):t])
                targets.append(train[t])
        return (np.asarray(users, dtype=np.int64), left_pad(histories, self.max_len),
                np.asarray(targets, dtype=np.int64))
