"""Interaction logs as users have them (e4srec.interactions): the formats, the tie rule, duplicates,
k-core, the id numbering and its maps, recommendations in the user's own ids, the bad-input corpus
(every error names the file, the line or row, and the problem, and nothing is written), the memory
limits, and property tests that prepare-then-read keeps every interaction in order."""
from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from e4srec import interactions
from e4srec.data import (SequenceData, check_dataset_name, fetch_arguments, fetch_dataset, parse_sequences, prepare,
                         sequence_bytes)
from e4srec.files import InputError
from e4srec.interactions import (ITEM_IDS_FILE, USER_IDS_FILE, Columns, IdMap, InputSpec, filter_sequences, keep_mask,
                                 prepare_log, read_log)

try:
    from helpers import files_in, main_rc, write_sequences
except ImportError:  # tests/ imported as a package
    from tests.helpers import files_in, main_rc, write_sequences

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = Path("/work/shared/datasets")
BENCHMARK_NAMES = ["Beauty", "Sports_and_Outdoors", "Toys_and_Games", "Yelp"]

# The worked example of paper/DATA.md: a RecBole atomic .inter file with string ids, a tie
# (u_bo's two interactions at 1700000100), a repeated pair (u_ada, B00SHAMPOO), an item seen once
# (B00RAZOR: the 2-core removes it) and a user left with two interactions (u_di: dropped, fewer than 3).
EXAMPLE = """\
user_id:token\titem_id:token\trating:float\ttimestamp:float
u_ada\tB00SHAMPOO\t5\t1700000300
u_ada\tB00CONDITIONER\t4\t1700000100
u_ada\tB00SOAP\t3\t1700000200
u_ada\tB00SHAMPOO\t5\t1700000400
u_bo\tB00SOAP\t4\t1700000100
u_bo\tB00SHAMPOO\t2\t1700000100
u_bo\tB00LOTION\t5\t1700000500
u_bo\tB00CONDITIONER\t3\t1700000600
u_cy\tB00CONDITIONER\t5\t1700000050
u_cy\tB00SOAP\t1\t1700000900
u_cy\tB00PERFUME\t4\t1700000950
u_cy\tB00RAZOR\t2\t1700000970
u_cy\tB00LOTION\t4\t1700000990
u_di\tB00PERFUME\t5\t1700000700
u_di\tB00SOAP\t2\t1700000800
"""
EXAMPLE_SETTINGS = {"format": "recbole", "duplicates": "keep_first", "k_core": 2}
EXAMPLE_USERS = ["u_cy", "u_ada", "u_bo", "u_di"]
EXAMPLE_ITEMS = ["B00CONDITIONER", "B00SOAP", "B00PERFUME", "B00LOTION", "B00SHAMPOO"]
EXAMPLE_SEQUENCES = {1: [1, 2, 3, 4], 2: [1, 2, 5], 3: [2, 5, 4, 1]}  # u_di (4: [3, 2]) is too short

# A log in each format: the same interactions (file order, ties at t=2, a repeated pair).
ROWS = [("alice", "B002", 3), ("alice", "B001", 1), ("bob", "B001", 2), ("bob", "B003", 2), ("alice", "B003", 5),
        ("bob", "B002", 7), ("carol", "99999999999999999999", 1), ("carol", "B001", 1), ("carol", "B002", 0),
        ("bob", "B001", 9)]
# chronological order: carol B002 (0); alice B001, carol 999..., carol B001 (1); bob B001, bob B003 (2); ...
ROWS_USERS = ["carol", "alice", "bob"]
ROWS_SEQUENCES = {"carol": ["B002", "99999999999999999999", "B001"], "alice": ["B001", "B002", "B003"],
                  "bob": ["B001", "B003", "B002", "B001"]}


def write_log(path: Path, rows, format: str, names=("user_id", "item_id", "timestamp"), ratings=None) -> Path:
    """``rows`` of (user, item, timestamp) written in ``format`` (csv, tsv, recbole, parquet)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = {names[0]: [r[0] for r in rows], names[1]: [r[1] for r in rows], names[2]: [r[2] for r in rows]}
    if ratings is not None:
        columns["rating"] = ratings
    if format == "parquet":
        pq.write_table(pa.table(columns), path)
        return path
    buffer = io.StringIO()
    if format == "recbole":
        kinds = ["token", "token", "float", "float"]
        buffer.write("\t".join(f"{n}:{k}" for n, k in zip(columns, kinds)) + "\n")
        for values in zip(*columns.values()):
            buffer.write("\t".join(map(str, values)) + "\n")
    else:
        writer = csv.writer(buffer, delimiter="," if format == "csv" else "\t", lineterminator="\n")
        writer.writerow(list(columns))
        writer.writerows(zip(*columns.values()))
    path.write_text(buffer.getvalue(), encoding="utf-8")
    return path


def raw_sequences(rows, duplicates: str = "keep_all") -> dict[str, list[str]]:
    """The reference: each user's items, stably sorted by timestamp, duplicates applied."""
    ordered = sorted(range(len(rows)), key=lambda i: rows[i][2])
    if duplicates == "keep_last":
        ordered = ordered[::-1]
    seen, kept = set(), []
    for i in ordered:
        pair = rows[i][:2]
        if duplicates == "keep_all" or pair not in seen:
            kept.append(i)
        seen.add(pair)
    if duplicates == "keep_last":
        kept = kept[::-1]
    sequences: dict[str, list[str]] = {}
    for i in kept:
        sequences.setdefault(rows[i][0], []).append(rows[i][1])
    return sequences


def as_raw(prepared) -> dict[str, list[str]]:
    return {prepared.users.external(u): [prepared.items.external(i) for i in items]
            for u, items in prepared.sequences.items()}


# ----------------------------------------------------------------------------------------------
# Formats, order, duplicates, numbering


@pytest.mark.parametrize("format", ["csv", "tsv", "recbole", "parquet"])
def test_every_log_format_reads_the_same(tmp_path, format):
    path = write_log(tmp_path / f"log.{format}", ROWS, format)
    prepared = prepare_log(read_log(path, InputSpec(format=format, k_core=0)), InputSpec(format=format, k_core=0))
    assert as_raw(prepared) == ROWS_SEQUENCES and list(as_raw(prepared)) == ROWS_USERS
    assert prepared.users.raw == tuple(ROWS_USERS)
    # items by first appearance in the users' sequences, users in order, each oldest first
    assert prepared.items.raw == ("B002", "99999999999999999999", "B001", "B003")
    assert prepared.sequences == {1: [1, 2, 3], 2: [3, 1, 4], 3: [3, 4, 1, 3]}
    assert prepared.report["rows"] == len(ROWS) and prepared.report["interactions"] == len(ROWS)


def test_columns_named_in_config_and_extra_columns_ignored(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("when,who,extra,what\n5,u1,x,i1\n1,u1,y,i2\n3,u2,z,i1\n")
    spec = InputSpec.from_dict({"format": "csv", "columns": {"user": "who", "item": "what", "timestamp": "when"},
                                "k_core": 0})
    assert as_raw(prepare_log(read_log(path, spec), spec)) == {"u1": ["i2", "i1"], "u2": ["i1"]}


def test_without_timestamp_column_file_order_is_chronological(tmp_path):
    path = tmp_path / "log.tsv"
    path.write_text("user_id\titem_id\nu\tb\nu\ta\nv\ta\n")
    spec = InputSpec.from_dict({"format": "tsv", "columns": {"timestamp": None}, "k_core": 0})
    prepared = prepare_log(read_log(path, spec), spec)
    assert as_raw(prepared) == {"u": ["b", "a"], "v": ["a"]} and prepared.items.raw == ("b", "a")


def test_ids_are_text_exactly_as_written(tmp_path):
    # "7" and "07" are two items; integers of any size and any Unicode text are ids
    path = write_log(tmp_path / "log.csv", [("u", "7", 1), ("u", "07", 2), ("u", "ß☃", 3), ("u", "1" * 40, 4)], "csv")
    spec = InputSpec(format="csv", k_core=0)
    assert prepare_log(read_log(path, spec), spec).items.raw == ("7", "07", "ß☃", "1" * 40)


@pytest.mark.parametrize("duplicates, expected", [
    ("keep_all", {"u": ["a", "b", "a", "a"]}), ("keep_first", {"u": ["a", "b"]}), ("keep_last", {"u": ["b", "a"]})])
def test_duplicates(tmp_path, duplicates, expected):
    path = write_log(tmp_path / "log.csv", [("u", "a", 1), ("u", "b", 2), ("u", "a", 3), ("u", "a", 3)], "csv")
    spec = InputSpec(format="csv", duplicates=duplicates, k_core=0)
    prepared = prepare_log(read_log(path, spec), spec)
    assert as_raw(prepared) == expected
    assert prepared.report["duplicates_dropped"] == 4 - len(expected["u"])


def test_min_rating(tmp_path):
    path = write_log(tmp_path / "log.csv", [("u", "a", 1), ("u", "b", 2), ("u", "c", 3)], "csv", ratings=[5, 2, 4])
    spec = InputSpec.from_dict({"format": "csv", "columns": {"rating": "rating"}, "min_rating": 3.5, "k_core": 0})
    prepared = prepare_log(read_log(path, spec), spec)
    assert as_raw(prepared) == {"u": ["a", "c"]} and prepared.report["rating_dropped"] == 1


def test_k_core_iterates_until_stable():
    # 2-core: item x is seen once, so u3 falls to one interaction, so item y falls to one: removed in turn
    users = np.array([0, 0, 1, 1, 2, 2])
    items = np.array([0, 1, 0, 1, 2, 3])  # u3 (2) has x (2, once) and y (3, once)
    keep, report = keep_mask(users, items, "keep_all", 2)
    assert keep.tolist() == [True, True, True, True, False, False]
    chain = np.array([0, 0, 1, 1, 2, 2, 2]), np.array([0, 1, 0, 1, 0, 2, 3])
    keep, report = keep_mask(*chain, "keep_all", 3)  # u1/u2 have 2 < 3: everything goes, round after round
    assert not keep.any() and report["k_core_rounds"] >= 2
    keep, report = keep_mask(users, items, "keep_all", 0)
    assert keep.all() and report["k_core_removed"] == {"interactions": 0, "users": 0, "items": 0}


def test_default_k_core_is_five_for_logs_none_for_sequence_files():
    assert InputSpec(format="csv").core == 5 and InputSpec(format="recbole").core == 5
    assert InputSpec(format="s3rec").core == 0 and InputSpec(format="sequences").core == 0
    assert InputSpec(format="csv", k_core=0).core == 0
    assert InputSpec().is_default and not InputSpec(k_core=5).is_default


def test_sequences_format_numbers_raw_tokens(tmp_path):
    path = tmp_path / "seq.txt"
    path.write_bytes("anna B07 B01 B07\nbert B01 ß9 B02\n".encode())
    spec = InputSpec(format="sequences")
    prepared = prepare_log(read_log(path, spec), spec)
    assert prepared.users.raw == ("anna", "bert") and prepared.items.raw == ("B07", "B01", "ß9", "B02")
    assert prepared.sequences == {1: [1, 2, 1], 2: [2, 3, 4]}


def test_the_numbering_is_s3recs_on_a_file_already_numbered():
    # a file whose ids follow S3-Rec's id_map (users 1..U in order, items by first appearance)
    # keeps every id when read as raw tokens
    sequences = {1: [1, 2, 3], 2: [2, 4, 1], 3: [5, 3, 4]}
    text = "".join(" ".join(map(str, [u, *items])) + "\n" for u, items in sequences.items())
    log = interactions.Log(Path("x"), "line", *_columns_of(text), None, None, np.zeros(9, dtype=np.int64))
    prepared = prepare_log(log, InputSpec(format="sequences"))
    assert prepared.sequences == sequences and prepared.items.raw == tuple("12345")


def _columns_of(text: str):
    pairs = [(line.split()[0], item) for line in text.splitlines() for item in line.split()[1:]]
    return np.array([p[0] for p in pairs], dtype=object), np.array([p[1] for p in pairs], dtype=object)


# ----------------------------------------------------------------------------------------------
# The worked example (paper/DATA.md) through prepare(), and the id maps


def test_worked_example(tmp_path):
    path = tmp_path / "example.inter"
    path.write_text(EXAMPLE)
    out = tmp_path / "prepared"
    record = prepare("example", path, out, raw_record={}, max_len=50, n_negatives=0, source=EXAMPLE_SETTINGS)
    assert files_in(out) == ["dataset.json", ITEM_IDS_FILE, "negatives.parquet", "sequences.parquet", USER_IDS_FILE]
    assert record["input"]["duplicates_dropped"] == 1 and record["input"]["k_core_removed"] == \
        {"interactions": 1, "users": 0, "items": 1}
    assert record["short_users"]["dropped"] == 1 and record["n_items"] == 5
    loaded = SequenceData.load(out)
    assert {int(u): s.tolist() for u, s in zip(loaded.user_ids, loaded.sequences)} == EXAMPLE_SEQUENCES
    users, items = IdMap.read(out / USER_IDS_FILE, "user"), IdMap.read(out / ITEM_IDS_FILE, "item")
    assert users.raw == tuple(EXAMPLE_USERS) and items.raw == tuple(EXAMPLE_ITEMS)
    assert (out / ITEM_IDS_FILE).read_text().splitlines()[:3] == ["id\traw_id", "1\tB00CONDITIONER", "2\tB00SOAP"]


def test_worked_example_matches_the_doc():
    doc = (ROOT / "paper" / "DATA.md").read_text()
    block = re.search(r"<!-- example.inter -->\n```text\n(.*?)```", doc, re.S)
    assert block and block.group(1) == EXAMPLE  # tab-separated in the doc too: copied, it is a valid file
    for line in ("format: recbole", "duplicates: keep_first", "k_core: 2"):
        assert line in doc
    for u, items in EXAMPLE_SEQUENCES.items():
        assert f"{EXAMPLE_USERS[u - 1]}: " + " ".join(EXAMPLE_ITEMS[i - 1] for i in items) in doc


def test_s3rec_format_writes_no_id_maps_and_removes_stale_ones(tmp_path):
    out = tmp_path / "out"
    path = write_log(tmp_path / "log.csv", ROWS, "csv")
    prepare("mine", path, out, raw_record={}, max_len=5, n_negatives=0, source={"format": "csv", "k_core": 0})
    assert (out / ITEM_IDS_FILE).exists()
    raw = write_sequences(tmp_path / "raw.txt", {1: [1, 2, 3], 2: [2, 3, 4]})
    record = prepare("mine", raw, out, raw_record={}, max_len=5, n_negatives=0)
    assert files_in(out) == ["dataset.json", "negatives.parquet", "sequences.parquet"]
    assert "input" not in record and "ids" not in record


def test_s3rec_dataset_json_has_the_keys_it_always_had(tmp_path):
    # the benchmark files' preparation is byte-identical: nothing added to their dataset.json
    raw = write_sequences(tmp_path / "raw.txt", {1: [1, 2, 3], 2: [2, 3, 4]})
    record = prepare("mine", raw, tmp_path / "out", raw_record={"name": "mine"}, max_len=5, n_negatives=1)
    assert sorted(json.loads((tmp_path / "out" / "dataset.json").read_text())) == sorted(record) == [
        "full_statistics", "max_len", "n_items", "name", "negatives", "raw", "short_users", "split", "statistics",
        "subsample"]


def test_s3rec_format_with_filters_keeps_ids(tmp_path):
    raw = write_sequences(tmp_path / "raw.txt", {1: [1, 2, 3, 3], 2: [2, 3, 4], 3: [1, 2, 3, 9]})
    record = prepare("mine", raw, tmp_path / "out", raw_record={}, max_len=5, n_negatives=0,
                     source={"duplicates": "keep_first", "k_core": 2})
    loaded = SequenceData.load(tmp_path / "out")
    # items 4 and 9 are seen once; user 2 is left with [2, 3], fewer than min_interactions 3
    assert [s.tolist() for s in loaded.sequences] == [[1, 2, 3], [1, 2, 3]] and loaded.n_items == 9
    assert record["input"]["duplicates_dropped"] == 1 and record["input"]["k_core_removed"]["items"] == 2
    assert loaded.user_ids.tolist() == [1, 3] and record["short_users"]["dropped"] == 1
    assert not (tmp_path / "out" / ITEM_IDS_FILE).exists()


def test_id_map_roundtrip_and_lookup(tmp_path):
    ids = IdMap("item", ("B1", "ß", "99999999999999999999"))
    ids.write(tmp_path / "ids.tsv")
    back = IdMap.read(tmp_path / "ids.tsv", "item")
    assert back == ids and back.internal("ß") == 2 and back.external(3) == "99999999999999999999"
    assert back.internal(99999999999999999999) == 3  # compared as text
    with pytest.raises(InputError, match="history: unknown item id 'nope'"):
        back.internal("nope", "history")


@pytest.mark.parametrize("content, line, problem", [
    ("", 1, "header"), ("id\traw_id\n2\tB\n", 2, "expected '1<TAB>raw id'"), ("id\traw_id\n1\tB", 2, "no newline"),
    ("id\traw_id\n1\tB\n2\tB\n", None, "appears twice")])
def test_bad_id_map(tmp_path, content, line, problem):
    path = tmp_path / "ids.tsv"
    path.write_text(content)
    with pytest.raises(InputError, match=problem) as err:
        IdMap.read(path, "item")
    assert str(err.value).startswith(f"{path}:{line}: " if line else f"{path}: ") or content == ""


# ----------------------------------------------------------------------------------------------
# Bad input: every problem names the file and the line (text) or row (Parquet); prepare() writes nothing

CSV_HEADER = "user_id,item_id,timestamp\n"
# (case id, format, file content (bytes), line (or "row N") named, pattern of the problem, settings)
BAD_LOGS = [
    ("csv_empty_user", "csv", CSV_HEADER + "u1,a,1\n,b,2\n", 3, "empty user id", {}),
    ("csv_empty_item", "csv", CSV_HEADER + "u1,,1\n", 2, "empty item id", {}),
    ("csv_space_in_id", "csv", CSV_HEADER + "u1, a,1\n", 2, "item id ' a' has leading or trailing white space", {}),
    ("csv_tab_in_id", "csv", CSV_HEADER + "u1,\"a\tb\",1\n", 2, "control character", {}),
    ("csv_unknown_column", "csv", CSV_HEADER + "u1,a,1\n", 1, "no column 'time' for the timestamp .the header has: "
     "user_id, item_id, timestamp", {"columns": {"timestamp": "time"}}),
    ("csv_duplicate_header", "csv", "user_id,item_id,user_id\nu,a,1\n", 1, "appear twice in the header", {}),
    ("csv_mixed_types_timestamp", "csv", CSV_HEADER + "u1,a,1\nu1,b,yesterday\n", 3,
     "timestamp 'yesterday' is not a number .column 'timestamp' must hold numbers in every row", {}),
    ("csv_mixed_types_rating", "csv", "user_id,item_id,timestamp,rating\nu,a,1,5\nu,b,2,good\n", 3,
     "rating 'good' is not a number", {"columns": {"rating": "rating"}}),
    ("csv_nan_timestamp", "csv", CSV_HEADER + "u1,a,nan\n", 2, "not a number", {}),
    ("csv_timestamp_overflow", "csv", CSV_HEADER + "u1,a,99999999999999999999\n", 2,
     "timestamp 99999999999999999999 does not fit in 64 bits", {}),
    ("csv_non_utf8", "csv", CSV_HEADER.encode() + b"u1,a,1\nu\xff,b,2\n", 3, "not UTF-8 .byte 0xff at column 2", {}),
    ("csv_no_final_newline", "csv", CSV_HEADER + "u1,a,1\nu1,b,2", 3, "last line has no newline.*truncated", {}),
    ("csv_cut_off_row", "csv", CSV_HEADER + "u1,a,1\nu1,b\n", 3, "2 fields, the header has 3 .a cut-off", {}),
    ("csv_too_many_fields", "csv", CSV_HEADER + "u1,a,1,9\n", 2, "4 fields, the header has 3", {}),
    ("csv_empty_line", "csv", CSV_HEADER + "u1,a,1\n\nu1,b,2\n", 3, "empty line", {}),
    ("csv_unterminated_quote", "csv", CSV_HEADER + "u1,\"a,1\n", 2, "malformed csv row: unexpected end of data "
     ".a quote opened and never closed", {}),
    ("csv_only_header", "csv", CSV_HEADER, None, "no interactions .only a header", {}),
    ("csv_empty_file", "csv", "", None, "file is empty", {}),
    ("tsv_cut_off_row", "tsv", "user_id\titem_id\ttimestamp\nu\ta\t1\nu\tb\n", 3, "2 fields", {}),
    ("recbole_untyped_header", "recbole", "user_id\titem_id:token\ttimestamp:float\nu\ta\t1\n", 1,
     "header field 'user_id' is not name:type", {}),
    ("recbole_timestamp_token", "recbole", "user_id:token\titem_id:token\ttimestamp:token\nu\ta\t1\n", 1,
     "column 'timestamp' is of RecBole type token; the timestamp column must be float", {}),
    ("recbole_cut_off_row", "recbole", "user_id:token\titem_id:token\ttimestamp:float\nu\ta\t1\nu\tb\n", 3,
     "2 fields", {}),
    ("sequences_empty_user", "sequences", "anna a b c\nbert\n", 2, "user 'bert' has no items", {}),
    ("sequences_duplicate_user", "sequences", "anna a b c\nanna d\n", 2, "duplicate line for user 'anna' .first "
     "on line 1", {}),
    ("sequences_non_utf8", "sequences", b"anna a b\nbert \xfe\n", 2, "not UTF-8", {}),
    ("sequences_truncated", "sequences", "anna a b c\nbert a", 2, "no newline", {}),
    ("sequences_empty_line", "sequences", "anna a b c\n\n", 2, "empty line", {}),
    ("short_user_policy_error", "csv", CSV_HEADER + "u1,a,1\nu1,b,2\nu1,c,3\nu2,a,4\nu2,b,5\n", None,
     r"1 users have fewer than 3 interactions .first: user 'u2' .line 5.", {"k_core": 0}),
    ("filters_leave_nothing", "csv", CSV_HEADER + "u1,a,1\nu1,b,2\n", None, "no interaction is left after the "
     "filters", {"k_core": 5}),
]


def _problem(path: Path, where, message: str, problem: str) -> None:
    prefix = f"{path}: " if where is None else (f"{path}: {where}: " if isinstance(where, str) else f"{path}:{where}: ")
    assert message.startswith(prefix), message
    assert re.search(problem, message), message


@pytest.mark.parametrize("format, content, where, problem, settings", [c[1:] for c in BAD_LOGS],
                         ids=[c[0] for c in BAD_LOGS])
def test_bad_log_names_file_and_line_and_writes_nothing(tmp_path, format, content, where, problem, settings):
    path = tmp_path / "log.txt"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    out = tmp_path / "out"
    with pytest.raises(InputError) as err:
        prepare("mine", path, out, raw_record={}, max_len=5, n_negatives=0, short_user_policy="error",
                source={"format": format, "k_core": 0, **settings})
    _problem(path, where, str(err.value), problem)
    assert files_in(out) == []


def _parquet(path: Path, **columns) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


BAD_PARQUET = [
    ("missing_column", lambda p: _parquet(p, user_id=["u"], item=["a"], timestamp=[1]), None,
     "no column 'item_id' for the item .the file has: user_id, item, timestamp"),
    ("float_ids", lambda p: _parquet(p, user_id=["u"], item_id=[1.5], timestamp=[1]), None,
     "column 'item_id' has type double: item ids must be integers or strings"),
    ("null_user", lambda p: _parquet(p, user_id=["u", None], item_id=["a", "b"], timestamp=[1, 2]), "row 2",
     "empty user id .null in column 'user_id'"),
    ("string_timestamps", lambda p: _parquet(p, user_id=["u"], item_id=["a"], timestamp=["1"]), None,
     "column 'timestamp' has type string: timestamps must be numbers"),
    ("nan_timestamp", lambda p: _parquet(p, user_id=["u", "u"], item_id=["a", "b"], timestamp=[1.0, float("nan")]),
     "row 2", "not a finite number"),
    ("non_utf8", lambda p: _parquet(p, user_id=pa.array([b"u", b"\xff"], pa.binary()).view(pa.string()),
                                    item_id=["a", "b"], timestamp=[1, 2]), "row 2", "user id is not UTF-8"),
    ("empty_id", lambda p: _parquet(p, user_id=["u", ""], item_id=["a", "b"], timestamp=[1, 2]), "row 2",
     "empty user id"),
    ("uint64_timestamp_overflow", lambda p: _parquet(p, user_id=["u"], item_id=["a"],
                                                     timestamp=pa.array([2**64 - 1], pa.uint64())),
     "row 1", "does not fit in 64 bits"),
    ("no_rows", lambda p: _parquet(p, user_id=pa.array([], pa.string()), item_id=pa.array([], pa.string()),
                                   timestamp=pa.array([], pa.int64())), None, "no interactions"),
    ("cut_short", lambda p: p.write_bytes(_parquet(p, user_id=["u"], item_id=["a"], timestamp=[1]).read_bytes()[:-30])
     and p, None, "not a readable Parquet file .*truncated, or not Parquet"),
    ("not_parquet", lambda p: p.write_text(CSV_HEADER + "u,a,1\n") and p, None, "not a readable Parquet file"),
]


@pytest.mark.parametrize("write, where, problem", [c[1:] for c in BAD_PARQUET], ids=[c[0] for c in BAD_PARQUET])
def test_bad_parquet_names_file_and_row_and_writes_nothing(tmp_path, write, where, problem):
    path = tmp_path / "log.parquet"
    write(path)
    out = tmp_path / "out"
    with pytest.raises(InputError) as err:
        prepare("mine", path, out, raw_record={}, max_len=5, n_negatives=0, source={"format": "parquet", "k_core": 0})
    _problem(path, where, str(err.value), problem)
    assert files_in(out) == []


def test_parquet_integer_ids_timestamps_and_dictionary_columns(tmp_path):
    path = _parquet(tmp_path / "log.parquet", user_id=pa.array(["u", "u", "v"]).dictionary_encode(),
                    item_id=pa.array([2**62, 7, 7], pa.int64()),
                    timestamp=pa.array([3, 1, 2], pa.timestamp("s")))
    spec = InputSpec(format="parquet", k_core=0)
    assert as_raw(prepare_log(read_log(path, spec), spec)) == {"u": ["7", str(2**62)], "v": ["7"]}


BAD_S3REC = [
    ("id_beyond_int64", b"1 1 2 3\n2 2 99999999999999999999 4\n", 2,
     "id 99999999999999999999 does not fit in 64 bits .*format 'sequences'"),
    ("catalogue_beyond_memory", b"1 1 2 3\n2 2 10000000000 4\n3 1 2 4\n", 2,
     r"item id 10000000000 .*a catalogue of 10,000,000,000 items needs at least 18.6 TiB .*fits at most"),
]


@pytest.mark.parametrize("content, line, problem", [c[1:] for c in BAD_S3REC], ids=[c[0] for c in BAD_S3REC])
def test_s3rec_ids_too_large(tmp_path, content, line, problem):
    path = tmp_path / "raw.txt"
    path.write_bytes(content)
    out = tmp_path / "out"
    with pytest.raises(InputError) as err:
        prepare("raw", path, out, raw_record={}, max_len=5)  # the default negatives: 99 drawn
    _problem(path, line, str(err.value), problem)
    assert files_in(out) == []


def test_s3rec_sparse_ids_may_be_renumbered(tmp_path):
    path = tmp_path / "raw.txt"
    path.write_bytes(b"1 1 2 3\n2 2 10000000000 4\n3 1 2 4\n")
    record = prepare("raw", path, tmp_path / "out", raw_record={}, max_len=5, n_negatives=0,
                     source={"format": "sequences"})
    items = IdMap.read(tmp_path / "out" / ITEM_IDS_FILE, "item")
    assert record["n_items"] == 5 and items.raw == ("1", "2", "3", "10000000000", "4")


def test_catalogue_limit_says_what_fits(tmp_path):
    path = write_log(tmp_path / "log.csv", [(f"u{u}", f"i{i}", i) for u in range(3) for i in range(40)], "csv")
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"a catalogue of 40 items needs at least 0.0 GiB .*fits at most 39 items"):
        prepare("mine", path, out, raw_record={}, max_len=5, n_negatives=0, memory_bytes=39 * 2048 + 100,
                source={"format": "csv", "k_core": 0})
    assert files_in(out) == []
    assert prepare("mine", path, out, raw_record={}, max_len=5, n_negatives=0, memory_bytes=2**30,
                   source={"format": "csv", "k_core": 0})["n_items"] == 40


def test_max_len_limit_says_what_fits(tmp_path):
    raw = write_sequences(tmp_path / "raw.txt", {1: [1, 2, 3, 4], 2: [2, 3, 4, 5]})
    out = tmp_path / "out"
    memory = sequence_bytes([4, 4], 1000)
    with pytest.raises(InputError) as err:
        prepare("raw", raw, out, raw_record={}, max_len=1001, n_negatives=0, memory_bytes=memory)
    assert re.search(r"max_len 1,001 needs at least .* for 2 users .*fits max_len up to 1,000$", str(err.value))
    assert str(err.value).startswith(f"{raw}: ") and files_in(out) == []
    with pytest.raises(InputError, match=r"max_len 1,000,000,000 needs at least 931,322,574\.\d TiB"):
        prepare("raw", raw, out, raw_record={}, max_len=10**9, n_negatives=0)
    assert files_in(out) == []


@pytest.mark.parametrize("name", ["../escape", "a/b", "a b", "", ".hidden", "x..y", "é", "a" * 101, "-dash"])
def test_unsafe_dataset_name(tmp_path, name):
    raw = write_sequences(tmp_path / "raw.txt", {1: [1, 2, 3]})
    with pytest.raises(InputError, match="is not a safe file name"):
        prepare(name, raw, tmp_path / "out", raw_record={}, max_len=5, n_negatives=0)
    with pytest.raises(InputError, match="is not a safe file name"):
        fetch_dataset(name, tmp_path / "copy.txt", path=str(raw))
    assert files_in(tmp_path) == ["raw.txt"]


def test_safe_dataset_names():
    for name in ("Beauty", "Sports_and_Outdoors", "Toys_and_Games", "Yelp", "TinyA", "ml-1m", "amazon.books2"):
        assert check_dataset_name(name) == name


@pytest.mark.parametrize("settings, problem", [
    ({"format": "xlsx"}, "unknown format 'xlsx'"),
    ({"duplicates": "drop"}, "unknown duplicates policy 'drop'"),
    ({"k_core": -1}, "k_core must be a non-negative integer"),
    ({"k_core": True}, "k_core must be"),
    ({"colums": {}}, r"unknown key\(s\) \['colums'\]"),
    ({"format": "csv", "columns": {"usr": "u"}}, r"unknown column role\(s\) \['usr'\]"),
    ({"format": "csv", "columns": {"user": None}}, "the user column cannot be null"),
    ({"format": "csv", "min_rating": 3}, "min_rating needs a log format with a rating column"),
    ({"memory_gib": 0}, "memory_gib must be a positive number"),
])
def test_bad_settings(tmp_path, settings, problem):
    raw = write_sequences(tmp_path / "raw.txt", {1: [1, 2, 3]})
    with pytest.raises(InputError, match=problem) as err:
        prepare("raw", raw, tmp_path / "out", raw_record={}, max_len=5, n_negatives=0, source=settings)
    assert str(err.value).startswith(f"{raw}: input settings: ")
    assert files_in(tmp_path / "out") == []


# ----------------------------------------------------------------------------------------------
# The four benchmark files: 5-core already, numbered as S3-Rec numbers


@pytest.mark.skipif(not BENCHMARKS.is_dir(), reason="benchmark files not available")
@pytest.mark.parametrize("name", BENCHMARK_NAMES)
def test_benchmark_files_are_five_core_and_numbered_as_we_number(name):
    path = BENCHMARKS / f"{name}.txt"
    sequences = parse_sequences(path)
    filtered, report = filter_sequences(sequences, "keep_all", 5)
    assert filtered == sequences and report["k_core_rounds"] == 0  # the five-core filter changes nothing
    # read as raw tokens, our numbering gives every user and item its own id back
    prepared = prepare_log(read_log(path, InputSpec(format="sequences")), InputSpec(format="sequences"))
    assert prepared.sequences == sequences
    assert prepared.items.raw == tuple(map(str, range(1, len(prepared.items) + 1)))


# ----------------------------------------------------------------------------------------------
# Property tests: prepare-then-read keeps every interaction, in order

# raw ids: any text without white space or control characters (quotes and commas included), or integers of any size
IDS = st.one_of(st.text(st.characters(max_codepoint=0x2FFF, exclude_categories=("Cc", "Cs", "Zs", "Zl", "Zp")),
                        min_size=1, max_size=6),
                st.integers(min_value=0, max_value=10**25).map(str))
LOGS = st.lists(st.tuples(st.sampled_from(["u1", "u2", "7", "99999999999999999999", "ü"]), IDS,
                          st.integers(min_value=0, max_value=4)), min_size=1, max_size=40)
PROPERTY = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@PROPERTY
@given(rows=LOGS, format=st.sampled_from(["csv", "tsv", "recbole", "parquet"]),
       duplicates=st.sampled_from(["keep_all", "keep_first", "keep_last"]))
def test_property_every_interaction_kept_in_order(tmp_path_factory, rows, format, duplicates):
    path = write_log(tmp_path_factory.mktemp("log") / f"log.{format}", rows, format)
    spec = InputSpec(format=format, duplicates=duplicates, k_core=0)
    prepared = prepare_log(read_log(path, spec), spec)
    expected = raw_sequences(rows, duplicates)
    assert as_raw(prepared) == expected
    assert sum(map(len, prepared.sequences.values())) == sum(map(len, expected.values()))
    assert sorted(prepared.items.raw) == sorted({r[1] for r in rows})


@PROPERTY
@given(rows=LOGS)
def test_property_prepare_then_load_roundtrip(tmp_path_factory, rows):
    folder = tmp_path_factory.mktemp("prepared")
    path = write_log(folder / "log.csv", rows, "csv")
    expected = {u: items for u, items in raw_sequences(rows).items() if len(items) >= 3}
    if not expected:
        return
    prepare("mine", path, folder / "out", raw_record={}, max_len=50, n_negatives=0,
            source={"format": "csv", "k_core": 0})
    loaded = SequenceData.load(folder / "out")
    users, items = IdMap.read(folder / "out" / USER_IDS_FILE, "user"), IdMap.read(folder / "out" / ITEM_IDS_FILE, "item")
    got = {users.external(u): [items.external(i) for i in seq.tolist()] for u, seq in zip(loaded.user_ids, loaded.sequences)}
    assert got == expected and loaded.n_items == len({r[1] for r in rows})


def _k_core_reference(sequences: dict[str, list[str]], k: int) -> dict[str, list[str]]:
    """S3-Rec's filter_Kcore, written plainly: drop users, then items, below k until stable."""
    sequences = {u: list(items) for u, items in sequences.items()}
    while True:
        counts: dict[str, int] = {}
        for items in sequences.values():
            for item in items:
                counts[item] = counts.get(item, 0) + 1
        if all(len(v) >= k for v in sequences.values()) and all(c >= k for c in counts.values()):
            return sequences
        sequences = {u: [i for i in items if counts[i] >= k] for u, items in sequences.items() if len(items) >= k}


@PROPERTY
@given(rows=st.lists(st.tuples(st.sampled_from("abcdefg"), st.sampled_from("pqrstuvwxyz"), st.integers(0, 3)),
                     max_size=80), k=st.integers(min_value=2, max_value=4))
def test_property_k_core_matches_s3rec_loop(tmp_path_factory, rows, k):
    if not rows:
        return
    path = write_log(tmp_path_factory.mktemp("log") / "log.csv", rows, "csv")
    spec = InputSpec(format="csv", k_core=k)
    expected = {u: v for u, v in _k_core_reference(raw_sequences(rows), k).items() if v}
    try:
        got = as_raw(prepare_log(read_log(path, spec), spec))
    except InputError as err:
        assert not expected and "no interaction is left" in str(err)
        return
    assert got == expected
    assert all(len(v) >= k for v in got.values())
    counts = pd.Series([i for v in got.values() for i in v]).value_counts()
    assert (counts >= k).all()


# ----------------------------------------------------------------------------------------------
# Command line and workflow


def test_fetch_keeps_settings_for_prepare(tmp_path, capsys):
    log = tmp_path / "example.inter"
    log.write_text(EXAMPLE)
    raw, record = tmp_path / "raw" / "example.txt", tmp_path / "raw" / "example.json"
    assert main_rc(["fetch", "--dataset", "example", "--out", str(raw), "--record", str(record),
                    "--negatives-dir", str(tmp_path / "neg"), "--path", str(log),
                    "--input", json.dumps(EXAMPLE_SETTINGS)]) == 0
    assert json.loads(record.read_text())["input"]["format"] == "recbole"
    out = tmp_path / "data" / "example"
    assert main_rc(["prepare", "--dataset", "example", "--raw", str(raw), "--record", str(record),
                    "--negatives-dir", str(tmp_path / "neg"), "--out", str(out), "--negatives-count", "0"]) == 0
    loaded = SequenceData.load(out)
    assert {int(u): s.tolist() for u, s in zip(loaded.user_ids, loaded.sequences)} == EXAMPLE_SEQUENCES
    assert main_rc(["fetch", "--dataset", "example", "--out", str(raw), "--record", str(record),
                    "--negatives-dir", str(tmp_path / "neg"), "--path", str(log), "--input", '{"format": "xls"}']) == 2
    assert "--input: unknown format 'xls'" in capsys.readouterr().err


def test_fetch_arguments_quote_paths_and_settings():
    assert fetch_arguments("data/a.txt") == "--path data/a.txt"
    assert fetch_arguments({"path": "my data/a b.csv", "format": "csv"}) == \
        "--path 'my data/a b.csv' --input '{\"format\": \"csv\"}'"


def test_workflow_prepares_a_log_dataset(tmp_path):
    log = tmp_path / "example.inter"
    log.write_text(EXAMPLE)
    config = tmp_path / "config.yaml"
    config.write_text(f"""out: {tmp_path}/results
resources: {tmp_path}/resources
datasets: [Example]
custom_datasets:
  Example: {{path: {log}, format: recbole, duplicates: keep_first, k_core: 2}}
negatives: {{count: 1}}
""")
    target = f"{tmp_path}/results/data/Example/dataset.json"
    result = subprocess.run([sys.executable, "-m", "snakemake", target, "--nolock", "--cores", "1", "--configfile",
                             str(config)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "results" / "data" / "Example"
    assert IdMap.read(out / ITEM_IDS_FILE, "item").raw == tuple(EXAMPLE_ITEMS)
    assert json.loads((out / "dataset.json").read_text())["input"]["k_core"] == 2


def test_workflow_refuses_an_unsafe_dataset_name(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(f"out: {tmp_path}/results\nresources: {tmp_path}/resources\ndatasets: ['a b']\n"
                      "custom_datasets: {'a b': x.txt}\n")
    result = subprocess.run([sys.executable, "-m", "snakemake", "--nolock", "-n", "--configfile", str(config)],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0 and "a b" in result.stdout + result.stderr


# ----------------------------------------------------------------------------------------------
# Recommendations in the user's own ids (deploy.E4SRecService, e4srec recommend)


def test_recommend_in_the_users_own_ids(tmp_path, capsys):
    pytest.importorskip("peft")
    import torch

    from e4srec import commands, deploy
    from e4srec.model import E4SRec, E4SRecConfig
    from tiny_llm import write_item_embeddings, write_tiny_backbone

    path = tmp_path / "example.inter"
    path.write_text(EXAMPLE)
    data_dir = tmp_path / "data"
    prepare("example", path, data_dir, raw_record={}, max_len=50, n_negatives=0, source=EXAMPLE_SETTINGS)
    backbone = write_tiny_backbone(tmp_path / "backbone")
    torch.manual_seed(0)
    model = E4SRec(5, 3, 50, E4SRecConfig(), backbone_dir=backbone,
                   item_embeddings=write_item_embeddings(tmp_path / "items.safetensors", 5))
    model.save_components(tmp_path / "components", dataset="example")
    expected = model.eval().recommend([[1, 2]], k=3)[0]

    service = deploy.E4SRecService(backbone)
    service.add("example", tmp_path / "components", item_ids=data_dir / ITEM_IDS_FILE)
    got = service.recommend("example", ["B00CONDITIONER", "B00SOAP"], k=3)
    assert got == [EXAMPLE_ITEMS[i - 1] for i in expected]
    with pytest.raises(InputError, match="history: unknown item id 'B00NOPE'"):
        service.recommend("example", ["B00NOPE"])
    wrong = tmp_path / "wrong.tsv"
    IdMap("item", ("a", "b")).write(wrong)
    with pytest.raises(InputError, match="2 items, but .* has n_items 5"):
        deploy.E4SRecService(backbone).add("example", tmp_path / "components", item_ids=wrong)

    args = ["recommend", "--backbone", str(backbone), "--components", str(tmp_path / "components"),
            "--dataset", "example", "--history", "B00CONDITIONER B00SOAP", "-k", "3"]
    assert commands.main([*args, "--item-ids", str(data_dir / ITEM_IDS_FILE)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["items"] == got and printed["history"] == ["B00CONDITIONER", "B00SOAP"]
    assert commands.main(args[:-4] + ["--history", "1 2", "-k", "3"]) == 0  # without the map: internal ids
    assert json.loads(capsys.readouterr().out)["items"] == expected
