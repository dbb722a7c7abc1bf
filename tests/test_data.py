"""Datasets: verified fetching, the bad-input corpus, the leave-one-out split, negatives, Table 2."""
from __future__ import annotations

import json
import logging
import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from e4srec import data
from e4srec.data import (KnownDataset, SequenceData, draw_negatives, fetch_dataset, fetch_negatives, left_pad,
                         parse_sequences, prepare, statistics, subsample_users)
from e4srec.files import InputError, atomic_path, git_blob_sha1, sha256_file, write_text

try:
    from helpers import files_in, make_data, prepare_tiny, random_sequences, sha256_bytes, write_sequences
except ImportError:  # tests/ imported as a package
    from tests.helpers import files_in, make_data, prepare_tiny, random_sequences, sha256_bytes, write_sequences

TINY = b"1 1 2 3 4\n2 2 3 5\n3 1 4 5 6\n"
TINY_SAMPLE = b"1 5 6\n2 1 4\n3 2 3\n"
BEAUTY = Path("/work/shared/datasets/Beauty.txt")


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A mirror folder holding ``Tiny.txt`` and ``Tiny_sample.txt``, registered as a known dataset."""
    folder = tmp_path / "mirror"
    folder.mkdir()
    (folder / "Tiny.txt").write_bytes(TINY)
    (folder / "Tiny_sample.txt").write_bytes(TINY_SAMPLE)
    monkeypatch.setitem(data.KNOWN_DATASETS, "Tiny",
                        KnownDataset("TinyPaper", sha256_bytes(TINY), git_blob_sha1(folder / "Tiny_sample.txt")))
    return folder


# ----------------------------------------------------------------------------------------------
# Fetching and checksums


def test_fetch_from_mirror_folder_verifies_sha256(mirror, tmp_path):
    dest = tmp_path / "raw" / "Tiny.txt"
    record = fetch_dataset("Tiny", dest, mirror=str(mirror))
    assert dest.read_bytes() == TINY
    assert record == {"name": "Tiny", "source": str(mirror / "Tiny.txt"), "sha256": sha256_bytes(TINY),
                      "checksum_verified": True}
    assert files_in(dest.parent) == ["Tiny.txt"]  # no temporary left beside it
    assert data.paper_name("Tiny") == "TinyPaper" and data.paper_name("Mine") == "Mine"


@pytest.mark.parametrize("trailing_slash", [False, True])
def test_fetch_from_file_url_mirror(mirror, tmp_path, trailing_slash):
    base = mirror.as_uri() + ("/" if trailing_slash else "")
    dest = tmp_path / "raw" / "Tiny.txt"
    record = fetch_dataset("Tiny", dest, mirror=base)
    assert record["source"] == mirror.as_uri() + "/Tiny.txt"
    assert record["checksum_verified"] and dest.read_bytes() == TINY


@pytest.mark.parametrize("as_url", [False, True])
def test_checksum_mismatch_names_source_and_leaves_nothing(mirror, tmp_path, as_url):
    (mirror / "Tiny.txt").write_bytes(TINY[:-3] + b"9\n")  # one corrupted id
    dest_dir = tmp_path / "raw"
    source = mirror.as_uri() + "/Tiny.txt" if as_url else str(mirror / "Tiny.txt")
    with pytest.raises(InputError, match="sha256 mismatch") as err:
        fetch_dataset("Tiny", dest_dir / "Tiny.txt", mirror=mirror.as_uri() if as_url else str(mirror))
    assert source in str(err.value)
    assert files_in(dest_dir) == []


def test_mismatch_keeps_an_earlier_good_file(mirror, tmp_path):
    dest = tmp_path / "Tiny.txt"
    dest.write_bytes(b"earlier\n")
    (mirror / "Tiny.txt").write_bytes(TINY + b"4 1 2 3\n")
    with pytest.raises(InputError):
        fetch_dataset("Tiny", dest, mirror=str(mirror))
    assert dest.read_bytes() == b"earlier\n" and files_in(tmp_path) == ["Tiny.txt", "mirror/Tiny.txt",
                                                                      "mirror/Tiny_sample.txt"]


@pytest.mark.parametrize("as_url", [False, True])
def test_missing_in_mirror_is_input_error(mirror, tmp_path, as_url):
    (mirror / "Tiny.txt").unlink()
    with pytest.raises(InputError, match=re.escape("Tiny.txt") + ".*cannot fetch dataset 'Tiny'"):
        fetch_dataset("Tiny", tmp_path / "raw" / "Tiny.txt", mirror=mirror.as_uri() if as_url else str(mirror))
    assert files_in(tmp_path / "raw") == []


def test_custom_dataset_records_checksum_without_checking(tmp_path):
    own = tmp_path / "own.txt"
    own.write_bytes(b"1 1 2 3\n")
    record = fetch_dataset("Mine", tmp_path / "raw" / "Mine.txt", path=str(own))
    assert record == {"name": "Mine", "source": str(own), "sha256": sha256_file(own), "checksum_verified": False}
    assert (tmp_path / "raw" / "Mine.txt").read_bytes() == own.read_bytes()


def test_custom_path_for_a_known_name_is_not_checked(mirror, tmp_path):
    own = tmp_path / "own.txt"
    own.write_bytes(b"1 1 2 3\n")  # not the published Tiny file
    record = fetch_dataset("Tiny", tmp_path / "raw" / "Tiny.txt", mirror=str(mirror), path=str(own))
    assert record["source"] == str(own) and record["checksum_verified"] is False


@pytest.mark.parametrize("content", [b"", b"1 2 3\n", b"a\r\nb\r\n", bytes(range(256)) * 3])
def test_git_blob_sha1_matches_git_hash_object(tmp_path, content):
    path = tmp_path / "blob.bin"
    path.write_bytes(content)
    out = subprocess.run(["git", "hash-object", "--no-filters", str(path)], cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout.strip()
    assert git_blob_sha1(path) == out


def test_known_sample_checksums_are_git_blob_sha1s():
    for known in data.KNOWN_DATASETS.values():
        assert re.fullmatch(r"[0-9a-f]{40}", known.sample_git_sha1) and re.fullmatch(r"[0-9a-f]{64}", known.sha256)


@pytest.mark.parametrize("as_url", [False, True])
def test_fetch_negatives_verified(mirror, tmp_path, as_url):
    dest = tmp_path / "neg" / "Tiny_sample.txt"
    record = fetch_negatives("Tiny", dest, mirror=mirror.as_uri() if as_url else str(mirror))
    assert dest.read_bytes() == TINY_SAMPLE
    assert record["git_blob_sha1"] == data.KNOWN_DATASETS["Tiny"].sample_git_sha1
    assert record["source"].endswith("Tiny_sample.txt")
    assert files_in(dest.parent) == ["Tiny_sample.txt"]


@pytest.mark.parametrize("as_url", [False, True])
def test_fetch_negatives_unreachable_returns_none(mirror, tmp_path, as_url, caplog):
    (mirror / "Tiny_sample.txt").unlink()
    dest = tmp_path / "neg" / "Tiny_sample.txt"
    with caplog.at_level(logging.INFO, logger="e4srec.data"):
        assert fetch_negatives("Tiny", dest, mirror=mirror.as_uri() if as_url else str(mirror)) is None
    assert "not reachable" in caplog.text
    assert files_in(tmp_path / "neg") == []


def test_fetch_negatives_unknown_dataset_returns_none(tmp_path):
    assert fetch_negatives("Mine", tmp_path / "x.txt", mirror=str(tmp_path)) is None


def test_fetch_negatives_mismatch_raises_and_leaves_nothing(mirror, tmp_path):
    (mirror / "Tiny_sample.txt").write_bytes(TINY_SAMPLE.replace(b"5 6", b"6 5"))
    with pytest.raises(InputError, match="git blob SHA-1 mismatch") as err:
        fetch_negatives("Tiny", tmp_path / "neg" / "Tiny_sample.txt", mirror=str(mirror))
    assert str(mirror / "Tiny_sample.txt") in str(err.value)
    assert files_in(tmp_path / "neg") == []


def test_atomic_path_failure_leaves_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.txt"
    write_text(target, "old\n")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old\n" and files_in(tmp_path) == ["out.txt"]


def test_atomic_write_has_the_mode_of_a_plain_open(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    write_text(tmp_path / "atomic.txt", "x")
    assert (tmp_path / "atomic.txt").stat().st_mode == plain.stat().st_mode


# ----------------------------------------------------------------------------------------------
# Bad input corpus: every problem is an InputError naming the file (and line), prepare() writes nothing

# (case id, file content, line number named in the message or None, pattern of the problem)
BAD_FILES = [
    ("empty", b"", None, "file is empty"),
    ("only_whitespace", b"\n  \n", None, "file is empty"),
    ("truncated", b"1 1 2 3\n2 2 3", 2, "no newline.*truncated"),
    ("truncated_single_line", b"1 1 2 3", 1, "no newline.*truncated"),
    ("word_token", b"1 1 2 3\n2 2 x 4\n", 2, "non-integer token 'x'"),
    ("float_token", b"1 1 2.0 3\n", 1, "non-integer token '2.0'"),
    ("underscore_token", b"1 1 1_000 3\n", 1, "non-integer token '1_000'"),
    ("plus_sign_token", b"1 1 +2 3\n", 1, r"non-integer token '\+2'"),
    ("double_minus_token", b"1 1 --2 3\n", 1, "non-integer token '--2'"),
    ("non_ascii_digit", "1 1 \u00b2 3\n".encode(), 1, "non-integer token"),
    ("invalid_utf8", b"1 1 2 3\n2 2 \xff 4\n", 2, "non-integer token"),
    ("non_integer_user", b"u1 1 2 3\n", 1, "non-integer token 'u1'"),
    ("duplicate_user", b"1 1 2 3\n2 2 3 4\n1 4 5 6\n", 3, "duplicate line for user 1"),
    ("item_zero", b"1 1 2 3\n2 2 0 4\n", 2, "item id 0 must be positive"),
    ("negative_item", b"1 1 -2 3\n", 1, "item id -2 must be positive"),
    ("user_zero", b"1 1 2 3\n0 1 2 3\n", 2, "user id 0 must be positive"),
    ("negative_user", b"-3 1 2 3\n", 1, "user id -3 must be positive"),
    ("empty_line", b"1 1 2 3\n\n2 2 3 4\n", 2, "empty line"),
    ("whitespace_line", b"1 1 2 3\n \t \n2 2 3 4\n", 2, "empty line"),
    ("trailing_empty_line", b"1 1 2 3\n2 2 3 4\n\n", 3, "empty line"),
    ("line_number_after_form_feed", b"1 1 2\x0c3\n2 2 3 4\n2 5 6 7\n", 3, "duplicate line for user 2"),
]


def _expect_named(err: pytest.ExceptionInfo, path: Path, line: int | None, problem: str) -> None:
    message = str(err.value)
    where = f"{path}:{line}: " if line is not None else f"{path}: "
    assert message.startswith(where), message
    assert re.search(problem, message), message


@pytest.mark.parametrize("content,line,problem", [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES])
def test_bad_file_parse(tmp_path, content, line, problem):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(InputError) as err:
        parse_sequences(path)
    _expect_named(err, path, line, problem)


@pytest.mark.parametrize("content,line,problem", [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES])
def test_bad_file_prepare_writes_nothing(tmp_path, content, line, problem):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    out = tmp_path / "out"
    with pytest.raises(InputError) as err:
        prepare("bad", path, out, raw_record={}, max_len=5, n_negatives=1)
    _expect_named(err, path, line, problem)
    assert files_in(out) == []


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.txt"
    with pytest.raises(InputError, match=re.escape(f"{path}: file not found")):
        parse_sequences(path)
    with pytest.raises(InputError, match=re.escape(f"{path}: file not found")):
        prepare("x", path, tmp_path / "out", raw_record={}, max_len=5)
    assert files_in(tmp_path / "out") == []


# Failures of prepare() beyond parsing: (case id, raw content, keyword arguments, pattern)
BAD_PREPARE = [
    ("short_user_policy_error", b"1 1 2 3\n2 4 5\n3 1 2 3\n", {"short_user_policy": "error"},
     "1 users have fewer than 3 interactions.*first: user 2"),
    ("all_users_short", b"1 1 2\n2 3\n", {}, "no user has at least 3 interactions"),
    ("users_without_items", b"1\n2\n", {}, "no user has at least 3 interactions"),
    ("unknown_policy", b"1 1 2 3\n2 4 5\n", {"short_user_policy": "dorp"}, "unknown short-user policy 'dorp'"),
    ("min_interactions_too_small", b"1 1 2 3\n", {"min_interactions": 1}, "min_interactions is 1"),
    ("too_many_negatives", b"1 1 2 3\n2 2 3 4\n", {"n_negatives": 2}, "user 1: only 1 unseen items, 2 negatives needed"),
]


@pytest.mark.parametrize("content,kwargs,problem", [c[1:] for c in BAD_PREPARE], ids=[c[0] for c in BAD_PREPARE])
def test_bad_prepare_writes_nothing(tmp_path, content, kwargs, problem):
    path = tmp_path / "raw.txt"
    path.write_bytes(content)
    out = tmp_path / "out"
    kwargs = {"n_negatives": 1, **kwargs}
    with pytest.raises(InputError) as err:
        prepare("raw", path, out, raw_record={}, max_len=5, **kwargs)
    _expect_named(err, path, None, problem)
    assert files_in(out) == []


# A negatives file that does not fit the dataset: (case id, negatives content, pattern)
BAD_NEGATIVES = [
    ("missing_user", b"1 5 6\n", "no negatives for user 2"),
    ("wrong_count", b"1 5 6\n2 1\n", "user 2 has 1 negatives, expected 2"),
    ("in_history", b"1 5 6\n2 1 3\n", "negatives of user 2 include items of the user's history"),
    ("beyond_n_items", b"1 5 6\n2 1 99\n", "include item 99, beyond the dataset's 6 items"),
    ("malformed", b"1 5 6\n2 1 x\n", "non-integer token 'x'"),
]


@pytest.mark.parametrize("content,problem", [c[1:] for c in BAD_NEGATIVES], ids=[c[0] for c in BAD_NEGATIVES])
def test_bad_negatives_file_writes_nothing(tmp_path, content, problem):
    raw = write_sequences(tmp_path / "raw.txt", {1: [1, 2, 3, 4], 2: [2, 3, 4, 5, 6]})
    negatives = tmp_path / "raw_sample.txt"
    negatives.write_bytes(content)
    out = tmp_path / "out"
    with pytest.raises(InputError, match=problem) as err:
        prepare("raw", raw, out, raw_record={}, max_len=5, n_negatives=2, negatives_path=negatives)
    assert str(negatives) in str(err.value)
    assert files_in(out) == []


def test_good_negatives_file_is_used(tmp_path):
    raw = write_sequences(tmp_path / "raw.txt", {1: [1, 2, 3, 4], 2: [2, 3, 4, 5, 6]})
    negatives = tmp_path / "raw_sample.txt"
    negatives.write_bytes(b"2 1 1\n1 5 6\n")  # S3-Rec files may repeat a negative
    out = tmp_path / "out"
    record = prepare("raw", raw, out, raw_record={}, max_len=5, n_negatives=2, negatives_path=negatives,
                     negatives_record={"git_blob_sha1": "abc"})
    assert record["negatives"]["origin"].startswith("downloaded") and record["negatives"]["git_blob_sha1"] == "abc"
    loaded = SequenceData.load(out)
    assert loaded.negatives.tolist() == [[5, 6], [1, 1]]


def test_short_users_dropped_counted_and_logged(tmp_path, caplog):
    raw = write_sequences(tmp_path / "raw.txt", {1: [1, 2, 3], 2: [4, 5], 3: [1, 4, 5, 6], 4: [2]})
    with caplog.at_level(logging.WARNING, logger="e4srec.data"):
        record = prepare("raw", raw, tmp_path / "out", raw_record={}, max_len=5, n_negatives=1)
    assert record["short_users"] == {"min_interactions": 3, "policy": "drop", "dropped": 2}
    assert json.loads((tmp_path / "out" / "dataset.json").read_text())["short_users"]["dropped"] == 2
    assert "dropped 2 users with fewer than 3 interactions" in caplog.text and str(raw) in caplog.text
    loaded = SequenceData.load(tmp_path / "out")
    assert loaded.user_ids.tolist() == [1, 3]
    # n_items is the largest id of the whole file (the id space), not of the kept users only
    assert loaded.n_items == 6 and record["statistics"]["users"] == 2


def test_crlf_and_extra_spaces_parse(tmp_path):
    path = tmp_path / "crlf.txt"
    path.write_bytes(b"1 1 2 3\r\n2  2\t3 4 \r\n")
    assert parse_sequences(path) == {1: [1, 2, 3], 2: [2, 3, 4]}


def test_prepare_roundtrip(tmp_path):
    sequences = random_sequences(12, 30, seed=1)
    out = prepare_tiny(tmp_path, sequences, max_len=4, n_negatives=5, negatives_seed=9)
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "negatives.parquet", "sequences.parquet"]
    loaded = SequenceData.load(out)
    assert loaded.name == "tiny" and loaded.max_len == 4 and loaded.n_items == 30
    assert loaded.user_ids.tolist() == sorted(sequences)
    assert [s.tolist() for s in loaded.sequences] == [sequences[u] for u in sorted(sequences)]
    expected = draw_negatives(sequences, 30, 5, 9)
    assert loaded.negatives.tolist() == [expected[u] for u in sorted(sequences)]
    assert {k: loaded.record["negatives"][k] for k in ("count", "origin", "seed")} == {"count": 5, "origin": "drawn", "seed": 9}


def test_load_rejects_mismatched_users(tmp_path):
    out = prepare_tiny(tmp_path, random_sequences(5, 20, seed=2))
    neg = pd.read_parquet(out / "negatives.parquet")
    neg["user_id"] = neg["user_id"][::-1].to_numpy()
    neg.to_parquet(out / "negatives.parquet", index=False)
    with pytest.raises(InputError, match="list different users"):
        SequenceData.load(out)


# ----------------------------------------------------------------------------------------------
# The leave-one-out split on a hand-made case

HAND = {1: [1, 2, 3, 4, 5, 6, 7], 2: [8, 9, 10], 3: [2, 4, 6, 8]}


@pytest.fixture
def hand():
    return make_data(HAND, max_len=3, n_items=10, n_negatives=2)


def test_targets_and_histories(hand):
    assert hand.targets("valid").tolist() == [6, 9, 6]
    assert hand.targets("test").tolist() == [7, 10, 8]
    assert [h.tolist() for h in hand.histories("valid")] == [[1, 2, 3, 4, 5], [8], [2, 4]]
    assert [h.tolist() for h in hand.histories("test")] == [[1, 2, 3, 4, 5, 6], [8, 9], [2, 4, 6]]
    assert hand.padded_histories("valid").tolist() == [[3, 4, 5], [0, 0, 8], [0, 2, 4]]
    assert hand.padded_histories("test").tolist() == [[4, 5, 6], [0, 8, 9], [2, 4, 6]]
    assert hand.padded_histories("test").dtype == np.int64


def test_training_examples_hand(hand):
    users, histories, targets = hand.training_examples()
    # user 0: training part [1..5]: last 3 positions with a non-empty history; user 1: [8] gives none;
    # user 2: [2, 4]: one example
    assert users.tolist() == [0, 0, 0, 2]
    assert histories.tolist() == [[0, 1, 2], [1, 2, 3], [2, 3, 4], [0, 0, 2]]
    assert targets.tolist() == [3, 4, 5, 4]


def test_training_sequences_hand(hand):
    assert hand.training_sequences().tolist() == [[2, 3, 4, 5], [0, 0, 0, 8], [0, 0, 2, 4]]


def test_no_example_uses_a_held_out_item(hand):
    users, histories, targets = hand.training_examples()
    for u, history, target in zip(users, histories, targets):
        train = hand.train_part(u).tolist()  # items are distinct per user in HAND
        assert target in train and all(i in train for i in history if i)
        assert not {int(target), *history.tolist()} & set(hand.sequences[u][-2:].tolist())


@pytest.mark.parametrize("max_len", [1, 2, 5, 20])
def test_training_examples_match_reference(max_len):
    sequences = random_sequences(15, 40, seed=max_len, min_len=3, max_len=14)
    data_ = make_data(sequences, max_len=max_len, n_negatives=0)
    expected = []
    for u, user in enumerate(sorted(sequences)):
        train = sequences[user][:-2]
        for t in range(len(train)):
            if t >= 1 and t >= len(train) - max_len:
                history = train[max(0, t - max_len):t]
                expected.append((u, [0] * (max_len - len(history)) + history, train[t]))
    users, histories, targets = data_.training_examples()
    assert list(zip(users.tolist(), histories.tolist(), targets.tolist())) == expected
    assert len(expected) == sum(min(len(s) - 3, max_len) for s in sequences.values() if len(s) > 3)
    seqs = data_.training_sequences()
    assert seqs.shape == (15, max_len + 1)
    for row, user in zip(seqs.tolist(), sorted(sequences)):
        train = sequences[user][:-2][-(max_len + 1):]
        assert row == [0] * (max_len + 1 - len(train)) + train


def test_left_pad_edges():
    assert left_pad([[1, 2, 3], [], np.array([4])], 2).tolist() == [[2, 3], [0, 0], [0, 4]]
    assert left_pad([[1, 2]], 0).shape == (1, 0)
    assert left_pad([], 3).shape == (0, 3)


# ----------------------------------------------------------------------------------------------
# Negatives, subsampling, statistics


def test_draw_negatives_seeded_distinct_unseen():
    sequences = random_sequences(20, 50, seed=3, max_len=30)
    first = draw_negatives(sequences, 50, 15, seed=7)
    assert first == draw_negatives(sequences, 50, 15, seed=7)
    assert first != draw_negatives(sequences, 50, 15, seed=8)
    for user, negs in first.items():
        assert len(negs) == 15 and len(set(negs)) == 15
        assert not set(negs) & set(sequences[user])
        assert all(1 <= n <= 50 for n in negs)


def test_draw_negatives_takes_every_unseen_item_when_exactly_enough():
    negs = draw_negatives({1: [1, 2, 3], 2: [4, 5]}, 6, 3, seed=0)
    assert sorted(negs[1]) == [4, 5, 6]
    with pytest.raises(InputError, match="user 1: only 3 unseen items, 4 negatives needed"):
        draw_negatives({1: [1, 2, 3], 2: [4, 5]}, 6, 4, seed=0)


def test_subsample_deterministic():
    sequences = random_sequences(40, 30, seed=4)
    a = subsample_users(sequences, 10, seed=5)
    assert a == subsample_users(sequences, 10, seed=5)
    assert len(a) == 10 and list(a) == sorted(a) and all(a[u] == sequences[u] for u in a)
    assert set(a) != set(subsample_users(sequences, 10, seed=6))
    assert subsample_users(sequences, None, seed=5) == sequences
    assert subsample_users(sequences, 40, seed=5) == sequences


def test_prepare_subsample_records_both_statistics(tmp_path):
    sequences = random_sequences(30, 25, seed=5)
    out = prepare_tiny(tmp_path, sequences, subsample=8, subsample_seed=3)
    record = json.loads((out / "dataset.json").read_text())
    assert record["subsample"] == {"users": 8, "seed": 3}
    assert record["full_statistics"]["users"] == 30 and record["statistics"]["users"] == 8
    assert SequenceData.load(out).user_ids.tolist() == sorted(subsample_users(sequences, 8, 3))


def test_statistics_hand():
    stats = statistics({1: [1, 2, 3], 2: [2, 3, 4, 5]}, 5)
    assert stats == {"users": 2, "items": 5, "interactions": 7, "sparsity": pytest.approx(0.3),
                     "average_length": 3.5}


@pytest.mark.skipif(not BEAUTY.is_file(), reason="Beauty.txt not available")
def test_beauty_table2(tmp_path):
    # the real file through the mirror path: sha256 verified against the published checksum
    record = fetch_dataset("Beauty", tmp_path / "Beauty.txt", mirror=str(BEAUTY.parent))
    assert record["checksum_verified"]
    sequences = parse_sequences(tmp_path / "Beauty.txt")
    n_items = max(max(items) for items in sequences.values())
    stats = statistics(sequences, n_items)
    assert (stats["users"], stats["items"], stats["interactions"]) == (22363, 12101, 198502)
    assert stats["sparsity"] == pytest.approx(1 - 198502 / (22363 * 12101))
    assert min(len(items) for items in sequences.values()) >= 3  # nothing dropped by the policy
