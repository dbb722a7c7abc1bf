"""Interaction logs as users have them: CSV, TSV, Parquet, RecBole atomic ``.inter`` files, and files
in the S3-Rec layout (``user item item ...``) whose ids are raw tokens of any kind.

A log goes through the same steps whatever its format (paper/DATA.md documents each):

1. **read**: every row is checked; a problem is an :class:`InputError` naming the file, the line
   (text formats) or the row (Parquet) and the problem;
2. **rating filter**: with ``min_rating`` set, interactions rated below it are dropped;
3. **order**: a stable sort by timestamp, so interactions with equal timestamps keep their file
   order (without a timestamp column the file order is the chronological order);
4. **duplicates**: a repeated (user, item) pair is kept (``keep_all``), or only its earliest
   (``keep_first``) or latest (``keep_last``) interaction in that order is kept;
5. **k-core**: users and items with fewer than ``k`` interactions are removed, repeatedly until
   none is left (the k-core is unique, so the order of removals does not matter);
6. **ids**: raw ids are compared as text, exactly as written, and numbered 1..n: users in the order
   of their first kept interaction, items in the order they first appear when the users' sequences
   are read in user order, each oldest first (S3-Rec's ``id_map`` without its random user shuffle;
   it numbers the four benchmark files exactly so). The numbering is saved as ``user_ids.tsv`` and
   ``item_ids.tsv`` beside the prepared data (:class:`IdMap`).

The ``s3rec`` format is the benchmark files' own: integer ids already 1..n, used as they are
(:func:`e4srec.data.parse_sequences`); only duplicates and k-core apply to it, and by default neither.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import io
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .files import InputError, atomic_path, read_input_bytes

FORMATS = ("s3rec", "sequences", "csv", "tsv", "parquet", "recbole")
LOG_FORMATS = ("csv", "tsv", "parquet", "recbole")
DUPLICATE_POLICIES = ("keep_all", "keep_first", "keep_last")
# k_core when the config leaves it null: S3-Rec's five-core rule for raw logs; files in the S3-Rec
# layout come filtered already (the four benchmark files are 5-core: paper/DATA.md, "k-core").
DEFAULT_K_CORE = {"s3rec": 0, "sequences": 0, "csv": 5, "tsv": 5, "parquet": 5, "recbole": 5}
USER_IDS_FILE = "user_ids.tsv"
ITEM_IDS_FILE = "item_ids.tsv"
INT64_MAX = 2**63 - 1

_INTEGER = re.compile(r"-?[0-9]+")
_NUMBER = re.compile(r"[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?")
_BAD_ID_CHARACTER = re.compile(r"[\x00-\x1f\x7f]")  # tabs, newlines and other control characters
RECBOLE_TYPES = ("token", "token_seq", "float", "float_seq")


@dataclasses.dataclass(frozen=True)
class Columns:
    """Column names of a log: user, item, timestamp (None: file order is chronological), rating."""

    user: str = "user_id"
    item: str = "item_id"
    timestamp: str | None = "timestamp"
    rating: str | None = None

    def named(self) -> dict[str, str]:
        """Role -> column name, for the columns this log uses."""
        return {role: name for role, name in dataclasses.asdict(self).items() if name is not None}


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """How to read a dataset's file: its format, columns and the log's preprocessing (a config entry)."""

    format: str = "s3rec"
    columns: Columns = Columns()
    duplicates: str = "keep_all"
    k_core: int | None = None  # None: DEFAULT_K_CORE of the format
    min_rating: float | None = None
    memory_gib: float | None = None  # None: this machine's physical memory (e4srec.data limits)

    @classmethod
    def from_dict(cls, entry: "InputSpec | dict | None", where: str = "input") -> "InputSpec":
        """A spec from a config entry (``path`` is ignored: the fetch step copies the file)."""
        if entry is None:
            return cls()
        if isinstance(entry, InputSpec):
            return entry
        if not isinstance(entry, dict):
            raise InputError(f"{where}: expected a mapping of input settings, got {entry!r}")
        entry = {k: v for k, v in entry.items() if k != "path"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(entry) - known)
        if unknown:
            raise InputError(f"{where}: unknown key(s) {unknown}; known: {sorted(known | {'path'})}")
        columns = entry.get("columns") or {}
        if not isinstance(columns, dict):
            raise InputError(f"{where}: columns must be a mapping of role to column name, got {columns!r}")
        roles = {f.name for f in dataclasses.fields(Columns)}
        if set(columns) - roles:
            raise InputError(f"{where}: unknown column role(s) {sorted(set(columns) - roles)}; known: {sorted(roles)}")
        for role, name in columns.items():
            if name is not None and (not isinstance(name, str) or not name):
                raise InputError(f"{where}: column {role!r} must be a column name, got {name!r}")
            if role in ("user", "item") and name is None:
                raise InputError(f"{where}: the {role} column cannot be null")
        spec = cls(**{**entry, "columns": Columns(**columns)})
        if spec.format not in FORMATS:
            raise InputError(f"{where}: unknown format {spec.format!r}; choose one of {FORMATS}")
        if spec.duplicates not in DUPLICATE_POLICIES:
            raise InputError(f"{where}: unknown duplicates policy {spec.duplicates!r}; choose one of {DUPLICATE_POLICIES}")
        if spec.k_core is not None and (isinstance(spec.k_core, bool) or not isinstance(spec.k_core, int)
                                        or spec.k_core < 0):
            raise InputError(f"{where}: k_core must be a non-negative integer or null, got {spec.k_core!r}")
        if spec.min_rating is not None:
            if spec.format not in LOG_FORMATS or spec.columns.rating is None:
                raise InputError(f"{where}: min_rating needs a log format with a rating column (columns.rating)")
            if isinstance(spec.min_rating, bool) or not isinstance(spec.min_rating, (int, float)):
                raise InputError(f"{where}: min_rating must be a number, got {spec.min_rating!r}")
        if spec.memory_gib is not None and (isinstance(spec.memory_gib, bool)
                                            or not isinstance(spec.memory_gib, (int, float)) or spec.memory_gib <= 0):
            raise InputError(f"{where}: memory_gib must be a positive number or null, got {spec.memory_gib!r}")
        return spec

    @property
    def core(self) -> int:
        """The k of the k-core filter (0 or 1: no filter)."""
        return DEFAULT_K_CORE[self.format] if self.k_core is None else self.k_core

    @property
    def remaps(self) -> bool:
        """Whether raw ids are numbered anew (every format but s3rec)."""
        return self.format != "s3rec"

    @property
    def is_default(self) -> bool:
        """The benchmark files' reading: s3rec, every interaction kept, no filter."""
        return (not self.remaps and self.duplicates == "keep_all" and self.core <= 1
                and self.memory_gib is None)

    def as_record(self) -> dict[str, Any]:
        """The settings as applied (k_core resolved), for dataset.json."""
        record = dataclasses.asdict(self)
        record["k_core"] = self.core
        if self.format not in LOG_FORMATS:
            record.pop("columns")
        return record


# ----------------------------------------------------------------------------------------------
# The id maps


@dataclasses.dataclass(frozen=True)
class IdMap:
    """Raw ids of one kind in internal order: ``raw[i - 1]`` is the raw id of internal id ``i``.

    Saved as a UTF-8 TSV file with the header ``id<TAB>raw_id`` and one line per id, 1..n.
    """

    kind: str  # "user" or "item"
    raw: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.raw)

    @functools.cached_property
    def _index(self) -> dict[str, int]:
        return {raw: i for i, raw in enumerate(self.raw, start=1)}

    def internal(self, raw_id: Any, where: str = "id") -> int:
        """The internal id (1..n) of a raw id (compared as text)."""
        found = self._index.get(str(raw_id))
        if found is None:
            raise InputError(f"{where}: unknown {self.kind} id {str(raw_id)!r} ({len(self)} {self.kind}s are known)")
        return found

    def external(self, internal_id: int) -> str:
        """The raw id of an internal id (1..n)."""
        if not 1 <= int(internal_id) <= len(self.raw):
            raise InputError(f"{self.kind} id {internal_id}: not in 1..{len(self.raw)}")
        return self.raw[int(internal_id) - 1]

    def write(self, path: str | Path) -> None:
        with atomic_path(path, suffix=".tsv") as tmp:
            with open(tmp, "w", encoding="utf-8", newline="\n") as out:
                out.write("id\traw_id\n")
                for i, raw in enumerate(self.raw, start=1):
                    out.write(f"{i}\t{raw}\n")

    @classmethod
    def read(cls, path: str | Path, kind: str) -> "IdMap":
        """Read an id map file, checked line by line (ids 1..n in order, raw ids distinct)."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: file not found")
        lines = _decoded_lines(path)
        if not lines or lines[0] != "id\traw_id":
            raise InputError(f"{path}:1: expected the header 'id<TAB>raw_id' of an id map")
        raw = []
        for line_no, line in enumerate(lines[1:], start=2):
            internal, sep, value = line.partition("\t")
            if not sep or internal != str(line_no - 1) or not value:
                raise InputError(f"{path}:{line_no}: expected '{line_no - 1}<TAB>raw id', got {line!r}")
            raw.append(value)
        if len(set(raw)) != len(raw):
            raise InputError(f"{path}: a raw id appears twice")
        return cls(kind, tuple(raw))


# ----------------------------------------------------------------------------------------------
# Reading


@dataclasses.dataclass
class Log:
    """Interactions in file order: raw ids as text, numeric timestamps and ratings, and the line
    (text formats) or row (Parquet) each came from."""

    path: Path
    unit: str  # "line" or "row"
    users: np.ndarray  # object array of str
    items: np.ndarray  # object array of str
    times: np.ndarray | None
    ratings: np.ndarray | None
    where: np.ndarray  # int64

    def place(self, index: int) -> str:
        """``line N`` or ``row N`` of one interaction, for messages."""
        return f"{self.unit} {int(self.where[index])}"

    def __len__(self) -> int:
        return len(self.users)


def _decoded_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file (split at "\\n" only, a final newline required)."""
    data = path.read_bytes()
    if not data.strip():
        raise InputError(f"{path}: file is empty")
    text = _decode(path, data)
    lines = text.split("\n")[:-1]
    if not text.endswith("\n"):
        raise InputError(f"{path}:{len(lines) + 1}: last line has no newline: the file looks truncated")
    return lines


def _decode(path: Path, data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise InputError(f"{path}:{line}: not UTF-8 (byte 0x{data[err.start]:02x} at column {column})") from None
    return text[1:] if text.startswith("\ufeff") else text  # a byte order mark is not part of the header


def check_id(value: str, role: str, at: str) -> str:
    """A raw id as text: non-empty, no surrounding white space, no tab, newline or control character."""
    if value == "":
        raise InputError(f"{at}empty {role} id")
    if value != value.strip():
        raise InputError(f"{at}{role} id {value!r} has leading or trailing white space")
    if _BAD_ID_CHARACTER.search(value):
        raise InputError(f"{at}{role} id {value!r} holds a control character (tab, newline, ...)")
    return value


def _number(value: str, role: str, column: str, at: str) -> int | float:
    """A timestamp or rating from text: a decimal integer (any size up to int64) or a finite float."""
    if _INTEGER.fullmatch(value):
        number = int(value)
        if abs(number) > INT64_MAX:
            raise InputError(f"{at}{role} {value} does not fit in 64 bits")
        return number
    if not _NUMBER.fullmatch(value):
        raise InputError(f"{at}{role} {value!r} is not a number (column {column!r} must hold numbers in every row)")
    number = float(value)
    if not math.isfinite(number):
        raise InputError(f"{at}{role} {value!r} is not a finite number")
    return number


def _numeric_array(values: list[int | float]) -> np.ndarray:
    if all(isinstance(v, int) for v in values):
        return np.asarray(values, dtype=np.int64)
    return np.asarray(values, dtype=np.float64)


def read_delimited(path: str | Path, format: str, columns: Columns) -> Log:
    """Read a CSV (``,``), TSV (tab) or RecBole ``.inter`` file (tab, ``name:type`` header).

    Python's csv module rather than pandas' parser: it reports the line of every row exactly
    (quoted fields may span lines) and a row with too few fields is an error, not silently padded.
    RecBole files are tab-separated without quoting, as RecBole reads them.
    """
    path = Path(path)
    data = read_input_bytes(path)
    text = _decode(path, data)
    if not text.endswith("\n"):
        raise InputError(f"{path}:{text.count(chr(10)) + 1}: last line has no newline: the file looks truncated")
    delimiter = "," if format == "csv" else "\t"
    quoting = csv.QUOTE_NONE if format == "recbole" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting, strict=True)
    try:
        header = next(reader)
    except csv.Error as err:
        raise InputError(f"{path}:1: {err}") from None
    names, types = header, [None] * len(header)
    if format == "recbole":
        names, types = [], []
        for field in header:
            name, sep, kind = field.partition(":")
            if not sep or kind not in RECBOLE_TYPES:
                raise InputError(f"{path}:1: header field {field!r} is not name:type with a RecBole type "
                                 f"({', '.join(RECBOLE_TYPES)})")
            names.append(name)
            types.append(kind)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InputError(f"{path}:1: column(s) {repeated} appear twice in the header")
    index = {}
    for role, name in columns.named().items():
        if name not in names:
            raise InputError(f"{path}:1: no column {name!r} for the {role} (the header has: {', '.join(names)})")
        index[role] = names.index(name)
        kind = types[index[role]]
        wanted = ("token",) if role in ("user", "item") else ("float",)
        if kind is not None and kind not in wanted:
            raise InputError(f"{path}:1: column {name!r} is of RecBole type {kind}; the {role} column must be "
                             f"{wanted[0]}")
    users, items, times, ratings, where = [], [], [], [], []
    line = 1  # the last line read so far
    try:
        for row in reader:
            start, line = line + 1, reader.line_num
            at = f"{path}:{start}: "
            if not row or (len(row) == 1 and not row[0].strip()):
                raise InputError(f"{at}empty line")
            if len(row) != len(names):
                raise InputError(f"{at}{len(row)} fields, the header has {len(names)} (a cut-off or malformed row)")
            users.append(check_id(row[index["user"]], "user", at))
            items.append(check_id(row[index["item"]], "item", at))
            if "timestamp" in index:
                times.append(_number(row[index["timestamp"]], "timestamp", columns.timestamp, at))
            if "rating" in index:
                ratings.append(_number(row[index["rating"]], "rating", columns.rating, at))
            where.append(start)
    except csv.Error as err:
        hint = " (a quote opened and never closed: the file looks truncated)" if "end of data" in str(err) else ""
        raise InputError(f"{path}:{reader.line_num}: malformed {format} row: {err}{hint}") from None
    if not users:
        raise InputError(f"{path}: no interactions (only a header)")
    return Log(path, "line", np.asarray(users, dtype=object), np.asarray(items, dtype=object),
               _numeric_array(times) if times else None, _numeric_array(ratings) if ratings else None,
               np.asarray(where, dtype=np.int64))


def _first_null(column) -> int:
    return int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0]) + 1


def _parquet_ids(path: Path, column, name: str, role: str) -> np.ndarray:
    import pyarrow as pa

    kind = column.type
    if pa.types.is_dictionary(kind):
        column, kind = column.cast(kind.value_type), kind.value_type
    if column.null_count:
        raise InputError(f"{path}: row {_first_null(column)}: empty {role} id (null in column {name!r})")
    if pa.types.is_integer(kind):
        values = [str(v) for v in column.to_pylist()]
    elif pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind) \
            or pa.types.is_large_binary(kind):
        raw = column.cast(pa.large_binary()).to_pylist()
        values = []
        for row, value in enumerate(raw, start=1):
            try:
                values.append(check_id(value.decode("utf-8"), role, f"{path}: row {row}: "))
            except UnicodeDecodeError:
                raise InputError(f"{path}: row {row}: {role} id is not UTF-8 ({value[:20]!r})") from None
    else:
        raise InputError(f"{path}: column {name!r} has type {kind}: {role} ids must be integers or strings")
    return np.asarray(values, dtype=object)


def _parquet_numbers(path: Path, column, name: str, role: str) -> np.ndarray:
    import pyarrow as pa

    kind = column.type
    if column.null_count:
        raise InputError(f"{path}: row {_first_null(column)}: no {role} (null in column {name!r})")
    if pa.types.is_timestamp(kind) or pa.types.is_date(kind) or pa.types.is_duration(kind):
        return column.cast(pa.int64()).to_numpy()
    if pa.types.is_integer(kind):
        if pa.types.is_unsigned_integer(kind) and column.to_numpy().max(initial=0) > INT64_MAX:
            row = int(np.argmax(column.to_numpy() > INT64_MAX)) + 1
            raise InputError(f"{path}: row {row}: {role} does not fit in 64 bits")
        return column.cast(pa.int64()).to_numpy()
    if pa.types.is_floating(kind) or pa.types.is_decimal(kind):
        values = column.cast(pa.float64()).to_numpy()
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            raise InputError(f"{path}: row {bad[0] + 1}: {role} {values[bad[0]]} is not a finite number")
        return values
    raise InputError(f"{path}: column {name!r} has type {kind}: {role}s must be numbers or Parquet timestamps")


def read_parquet(path: str | Path, columns: Columns) -> Log:
    """Read a Parquet log; rows are numbered from 1 in file order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        handle = pq.ParquetFile(path)
        names = handle.schema_arrow.names
        missing = [(role, name) for role, name in columns.named().items() if name not in names]
        if missing:
            role, name = missing[0]
            raise InputError(f"{path}: no column {name!r} for the {role} (the file has: {', '.join(names)})")
        table = handle.read(columns=sorted(set(columns.named().values())))
    except (pa.ArrowException, OSError) as err:
        raise InputError(f"{path}: not a readable Parquet file ({err}): truncated, or not Parquet") from None
    if table.num_rows == 0:
        raise InputError(f"{path}: no interactions (0 rows)")
    col = {role: table.column(name).combine_chunks() for role, name in columns.named().items()}
    return Log(path, "row", _parquet_ids(path, col["user"], columns.user, "user"),
               _parquet_ids(path, col["item"], columns.item, "item"),
               _parquet_numbers(path, col["timestamp"], columns.timestamp, "timestamp") if "timestamp" in col else None,
               _parquet_numbers(path, col["rating"], columns.rating, "rating") if "rating" in col else None,
               np.arange(1, table.num_rows + 1, dtype=np.int64))


def read_token_sequences(path: str | Path) -> Log:
    """Read a file in the S3-Rec layout whose tokens are raw ids of any kind (``sequences``)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    users, items, where, seen = [], [], [], {}
    for line_no, line in enumerate(_decoded_lines(path), start=1):
        tokens = line.split()
        if not tokens:
            raise InputError(f"{path}:{line_no}: empty line")
        user = check_id(tokens[0], "user", f"{path}:{line_no}: ")
        if user in seen:
            raise InputError(f"{path}:{line_no}: duplicate line for user {user!r} (first on line {seen[user]})")
        seen[user] = line_no
        if len(tokens) == 1:
            raise InputError(f"{path}:{line_no}: user {user!r} has no items")
        for token in tokens[1:]:
            users.append(user)
            items.append(check_id(token, "item", f"{path}:{line_no}: "))
            where.append(line_no)
    return Log(path, "line", np.asarray(users, dtype=object), np.asarray(items, dtype=object), None, None,
               np.asarray(where, dtype=np.int64))


def read_log(path: str | Path, spec: InputSpec) -> Log:
    """Read ``path`` in ``spec.format`` (any format but s3rec)."""
    if spec.format in ("csv", "tsv", "recbole"):
        return read_delimited(path, spec.format, spec.columns)
    if spec.format == "parquet":
        return read_parquet(path, spec.columns)
    if spec.format == "sequences":
        return read_token_sequences(path)
    raise InputError(f"{path}: format {spec.format!r} is not a log format")


# ----------------------------------------------------------------------------------------------
# Ordering, duplicates, k-core, ids


def keep_mask(user_codes: np.ndarray, item_codes: np.ndarray, duplicates: str, k: int) -> tuple[np.ndarray, dict]:
    """Which interactions (already in chronological order) survive the duplicates policy and the
    k-core filter; and the counts removed by each."""
    n = len(user_codes)
    keep = np.ones(n, dtype=bool)
    if duplicates not in DUPLICATE_POLICIES:
        raise InputError(f"unknown duplicates policy {duplicates!r}; choose one of {DUPLICATE_POLICIES}")
    if duplicates != "keep_all" and n:
        pairs = user_codes.astype(np.int64) * (int(item_codes.max()) + 1) + item_codes
        if duplicates == "keep_first":
            first = np.unique(pairs, return_index=True)[1]
        else:  # keep_last: the first of the reversed order
            first = n - 1 - np.unique(pairs[::-1], return_index=True)[1]
        keep[:] = False
        keep[first] = True
    report = {"duplicates_dropped": int(n - keep.sum()), "k_core": k, "k_core_rounds": 0}
    before = int(keep.sum())
    users_before = len(np.unique(user_codes[keep]))
    items_before = len(np.unique(item_codes[keep]))
    if k > 1 and n:
        while True:
            user_count = np.bincount(user_codes[keep], minlength=int(user_codes.max()) + 1)
            item_count = np.bincount(item_codes[keep], minlength=int(item_codes.max()) + 1)
            low = keep & ((user_count[user_codes] < k) | (item_count[item_codes] < k))
            if not low.any():
                break
            keep &= ~low
            report["k_core_rounds"] += 1
    report["k_core_removed"] = {"interactions": before - int(keep.sum()),
                                "users": users_before - len(np.unique(user_codes[keep])),
                                "items": items_before - len(np.unique(item_codes[keep]))}
    return keep, report


def chronological_order(log: Log) -> np.ndarray:
    """Indices of the log in chronological order: stable, so equal timestamps keep file order."""
    if log.times is None:
        return np.arange(len(log))
    return np.argsort(log.times, kind="stable")


@dataclasses.dataclass
class Prepared:
    """A log as per-user sequences of internal ids, with the id maps and what each step removed."""

    sequences: dict[int, list[int]]
    users: IdMap
    items: IdMap
    first_place: dict[int, str]  # internal user -> "line N" / "row N" of the user's first kept interaction
    report: dict


def prepare_log(log: Log, spec: InputSpec) -> Prepared:
    """Rating filter, chronological order, duplicates, k-core, then ids 1..n (module docstring)."""
    report: dict[str, Any] = {"rows": len(log)}
    selected = np.arange(len(log))
    if spec.min_rating is not None:
        selected = np.flatnonzero(log.ratings >= spec.min_rating)
        report["rating_dropped"] = len(log) - len(selected)
    order = selected[np.argsort(log.times[selected], kind="stable")] if log.times is not None else selected
    user_codes, _ = pd.factorize(log.users[order])
    item_codes, _ = pd.factorize(log.items[order])
    keep, filtered = keep_mask(user_codes, item_codes, spec.duplicates, spec.core)
    report.update(filtered)
    kept = order[keep]
    if not len(kept):
        raise InputError(f"{log.path}: no interaction is left after the filters "
                         f"(min_rating {spec.min_rating}, duplicates {spec.duplicates}, k_core {spec.core})")
    user_number, user_raw = pd.factorize(log.users[kept])  # by first kept interaction
    by_user = np.argsort(user_number, kind="stable")  # user order, each user's interactions oldest first
    item_number, item_raw = pd.factorize(log.items[kept][by_user])
    bounds = np.cumsum(np.bincount(user_number))[:-1]
    chunks = np.split(item_number + 1, bounds)
    sequences = {u: chunk.tolist() for u, chunk in enumerate(chunks, start=1)}
    first = kept[by_user][np.concatenate([[0], bounds])]
    first_place = {u: log.place(int(i)) for u, i in enumerate(first, start=1)}
    report.update(interactions=len(kept), users=len(user_raw), items=len(item_raw))
    return Prepared(sequences, IdMap("user", tuple(user_raw)), IdMap("item", tuple(item_raw)), first_place, report)


def filter_sequences(sequences: dict[int, list[int]], duplicates: str, k: int) -> tuple[dict[int, list[int]], dict]:
    """Duplicates and k-core on sequences whose ids are kept (the s3rec format); users keep their order."""
    users = np.repeat(np.fromiter(sequences, dtype=np.int64, count=len(sequences)),
                      [len(items) for items in sequences.values()])
    items = np.fromiter((i for items in sequences.values() for i in items), dtype=np.int64)
    user_codes, _ = pd.factorize(users)
    item_codes, _ = pd.factorize(items)
    keep, report = keep_mask(user_codes, item_codes, duplicates, k)
    kept: dict[int, list[int]] = {user: [] for user in sequences}
    for user, item in zip(users[keep].tolist(), items[keep].tolist()):
        kept[user].append(item)
    if k > 1:  # the k-core removed these users entirely
        kept = {user: items for user, items in kept.items() if items}
    return kept, report
