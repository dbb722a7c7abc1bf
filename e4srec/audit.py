"""Provenance audit of a results folder (``e4srec audit RESULTS_DIR``): can every run be trusted?

For every run folder ``RESULTS_DIR/runs/DATASET/MODEL/VARIANT/seed~N`` it checks that

- the folder is complete (``run.json`` and ``ranks.parquet``; a run is only complete with both);
- the record names the git commit that ran (40 hex digits, not ``unknown``), the configuration
  (model ``params`` and the trainer's ``training.config``) and the inputs with their sha256;
- the selected epoch came from validation: ``evaluation.selection`` says validation, and the
  training record's ``best_epoch`` is the epoch of the (first) maximum of ``valid_ndcg10``;
- the metrics of ``run.json`` are those of ``ranks.parquet`` (the file was not swapped), and the
  validation NDCG@10 of the ranks is the selected epoch's (the ranks come from that checkpoint);

and, where the prepared dataset is at hand (``inputs.dataset_dir``, else
``RESULTS_DIR/data/DATASET``) with the sha256 the run recorded (or, said so in the line, a copy
prepared from the same raw file, by sha256, with the same negatives record, whose parquet bytes
differ, e.g. written on another machine):

- the users of ``ranks.parquet`` are the dataset's;
- the split never lets a test (or validation) item into training: for every user the trainer's
  inputs (:meth:`SequenceData.training_sequences` and :meth:`SequenceData.training_examples`, the
  two functions the trainer feeds models from) are recomputed independently from positions
  ``sequence[:-2]`` only, the validation target is ``sequence[-2]`` and the test target
  ``sequence[-1]`` (checked by position, not by item id: an item may recur in a history);
- every user's 99 sampled negatives exclude every item of the user's sequence.

One line per run (``OK`` or ``FAIL`` with the problems), then a summary; non-zero exit status if
any run has a problem. Data checks that cannot run (data missing or changed) are reported, not
failed.

:func:`verify_inputs` is stricter and runs before ``e4srec rebuild`` and ``e4srec sparsity`` write
anything: a run whose dataset (sha256, or an equivalent copy with the same users in the same order)
or item table is not the one at hand is an error naming the run and the file.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from .files import InputError, sha256_file

DATA_FILES = ("sequences.parquet", "negatives.parquet", "dataset.json")
COMMIT = re.compile(r"[0-9a-f]{40}")
SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclasses.dataclass
class RunAudit:
    run_dir: Path
    problems: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    data_checked: bool = False
    equivalent_copy: bool = False  # data checked on a copy matched by raw sha256, not byte for byte

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self, root: Path) -> str:
        try:
            name = self.run_dir.relative_to(root)
        except ValueError:
            name = self.run_dir
        if self.problems:
            return f"FAIL {name}: " + "; ".join(self.problems) + ("" if not self.notes else f" [{'; '.join(self.notes)}]")
        return f"OK   {name}" + ("" if not self.notes else f" ({'; '.join(self.notes)})")


# ----------------------------------------------------------------------------------------------
# Record checks


def check_record(record: dict, problems: list[str], notes: list[str]) -> None:
    """Commit, configuration, inputs and validation-based selection of one run.json."""
    git = record.get("git") or {}
    commit = git.get("commit")
    if not isinstance(commit, str) or not COMMIT.fullmatch(commit):
        problems.append(f"git commit is {commit!r}, not a commit id: the code that ran is unknown")
    elif git.get("dirty"):
        notes.append(f"commit {commit[:10]} with uncommitted changes (dirty)")
    if not isinstance(record.get("params"), dict):
        problems.append("no model configuration ('params')")
    training = record.get("training")
    if not isinstance(training, dict) or not isinstance(training.get("config"), dict):
        problems.append("no training configuration ('training.config')")
        training = training if isinstance(training, dict) else {}
    inputs = record.get("inputs") or {}
    sums = inputs.get("sha256") if isinstance(inputs.get("sha256"), dict) else {}
    missing = [name for name in DATA_FILES if not SHA256.fullmatch(str(sums.get(name, "")))]
    if not inputs.get("dataset_dir") or missing:
        problems.append(f"inputs lack the dataset folder or the sha256 of {missing or 'nothing'}")

    selection = (record.get("evaluation") or {}).get("selection", "")
    if "validation" not in str(selection).lower():
        problems.append(f"evaluation.selection is {selection!r}: the epoch must be selected on validation")
    epochs = training.get("epochs") or []
    if epochs:
        values = [e.get("valid_ndcg10") for e in epochs]
        if any(v is None or not np.isfinite(v) for v in values):
            problems.append("training epochs lack a finite valid_ndcg10")
        else:
            # the trainer keeps an epoch only if strictly better: the first maximum
            best = epochs[int(np.argmax(values))]
            if training.get("best_epoch") != best.get("epoch"):
                problems.append(f"best_epoch is {training.get('best_epoch')}, but validation NDCG@10 peaks at epoch "
                                f"{best.get('epoch')} ({max(values):.6f}): not selected on validation")
            elif training.get("best_valid_ndcg10") != max(values):
                problems.append(f"best_valid_ndcg10 {training.get('best_valid_ndcg10')} is not the epochs' maximum "
                                f"{max(values)}")
    elif training.get("stopped") != "no training (fitted statistics)":
        problems.append("training record lists no epochs (and is not a fitted-statistics model)")


def check_ranks(record: dict, ranks: pd.DataFrame, problems: list[str], notes: list[str]) -> None:
    """The metrics of run.json are the ones of ranks.parquet, whose validation ranks are those of the
    selected epoch (a few users' ranks of slack, below 1e-4 NDCG@10, for GPU evaluation)."""
    from .metrics import all_metrics, ndcg

    training = record.get("training") if isinstance(record.get("training"), dict) else {}
    selected = training.get("best_valid_ndcg10")
    if training.get("epochs") and isinstance(selected, (int, float)) and "valid_full" in ranks.columns:
        found = ndcg(ranks["valid_full"].to_numpy(), 10)
        if abs(found - selected) > 1e-4:
            problems.append(f"ranks.parquet's validation NDCG@10 {found:.6f} is not the selected epoch's "
                            f"{selected:.6f}: the ranks do not come from the selected checkpoint")
        elif found != selected:
            notes.append(f"validation NDCG@10 of the ranks {found:.8f} vs selected epoch {selected:.8f} (GPU rounding?)")

    for column, recorded in (record.get("metrics") or {}).items():
        if column not in ranks.columns:
            problems.append(f"ranks.parquet lacks column {column!r} named in run.json metrics")
            continue
        values = {f"{m}@{k}" if k else m: v for m, k, v in all_metrics(ranks[column].to_numpy())}
        differ = [k for k, v in recorded.items() if k in values and abs(values[k] - v) > 1e-9]
        if differ:
            problems.append(f"run.json metrics of {column} ({differ[0]} {recorded[differ[0]]}) are not those of "
                            f"ranks.parquet ({values[differ[0]]}): ranks and record do not belong together")
            return


# ----------------------------------------------------------------------------------------------
# Data checks (split and negatives), cached per prepared dataset


def expected_training(sequences: list[np.ndarray], max_len: int):
    """The training inputs the split allows, rebuilt by position from ``sequence[:-2]`` alone."""
    rows, users, histories, targets = [], [], [], []
    for u, seq in enumerate(sequences):
        train = np.asarray(seq[: len(seq) - 2])  # positions 0 .. len-3: never the validation or test position
        window = train[-(max_len + 1):] if len(train) > max_len + 1 else train
        row = np.zeros(max_len + 1, dtype=np.int64)
        if len(window):
            row[max_len + 1 - len(window):] = window
        rows.append(row)
        for t in range(max(1, len(train) - max_len), len(train)):
            history = train[max(0, t - max_len):t]
            padded = np.zeros(max_len, dtype=np.int64)
            padded[max_len - len(history):] = history
            users.append(u)
            histories.append(padded)
            targets.append(train[t])
    shape = (0, max_len)
    return (np.stack(rows) if rows else np.zeros((0, max_len + 1), dtype=np.int64),
            np.asarray(users, dtype=np.int64),
            np.stack(histories) if histories else np.zeros(shape, dtype=np.int64),
            np.asarray(targets, dtype=np.int64))


def check_data(folder: Path) -> list[str]:
    """Split and negatives checks of one prepared dataset folder; the problems found."""
    from .data import SequenceData

    data = SequenceData.load(folder)
    problems = []
    seqs = data.sequences
    short = [int(data.user_ids[u]) for u, s in enumerate(seqs) if len(s) < 3]
    if short:
        problems.append(f"{len(short)} users with fewer than 3 items (first: user {short[0]}): no training part")
    if not np.array_equal(data.targets("test"), np.array([s[-1] for s in seqs])) or \
            not np.array_equal(data.targets("valid"), np.array([s[-2] for s in seqs])):
        problems.append("the split's test/validation targets are not the last/second to last items")
    if any(not np.array_equal(data.train_part(u), s[:-2]) for u, s in enumerate(seqs)):
        problems.append("the training part is not sequence[:-2] for every user")
    if any(len(h) != len(s) - 1 or not np.array_equal(h, s[:-1]) for h, s in zip(data.histories("test"), seqs)):
        problems.append("test histories are not sequence[:-1]")
    rows, users, histories, targets = expected_training(seqs, data.max_len)
    if not np.array_equal(data.training_sequences(), rows):
        problems.append("training_sequences() holds items outside each user's sequence[:-2] (test or validation leak)")
    got_users, got_histories, got_targets = data.training_examples()
    if not (np.array_equal(got_users, users) and np.array_equal(got_histories, histories)
            and np.array_equal(got_targets, targets)):
        problems.append("training_examples() holds items outside each user's sequence[:-2] (test or validation leak)")
    overlapping = [int(data.user_ids[u]) for u, (s, n) in enumerate(zip(seqs, data.negatives))
                   if np.intersect1d(s, n).size]
    if overlapping:
        problems.append(f"sampled negatives of {len(overlapping)} users include items of their history "
                        f"(first: user {overlapping[0]})")
    bad = (data.negatives < 1) | (data.negatives > data.n_items)
    if bad.any():
        problems.append(f"sampled negatives outside items 1..{data.n_items}")
    return problems


def find_dataset(record: dict, root: Path, dataset: str) -> tuple[Path | None, str]:
    """The prepared dataset folder of a run and how it was matched: ``(folder, "")`` where its files
    have the sha256 the run recorded; ``(folder, note)`` where the bytes differ (another machine's
    parquet writer) but it was prepared from the same raw file (sha256) with the same negatives;
    ``(None, why)`` where neither holds."""
    inputs = record.get("inputs") or {}
    recorded = inputs.get("sha256") or {}
    tried, equivalent = [], None
    for folder in (Path(str(inputs.get("dataset_dir", ""))), root / "data" / dataset):
        if not str(folder) or folder in tried or not all((folder / name).is_file() for name in DATA_FILES):
            continue
        tried.append(folder)
        if all(sha256_file(folder / name) == recorded.get(name) for name in DATA_FILES):
            return folder, ""
        try:
            local = json.loads((folder / "dataset.json").read_text())
        except json.JSONDecodeError:
            continue
        if equivalent is None and inputs.get("raw_sha256") and (local.get("raw") or {}).get("sha256") == \
                inputs.get("raw_sha256") and local.get("negatives") == inputs.get("negatives"):
            equivalent = folder
    if equivalent is not None:
        return equivalent, (f"checked on {equivalent}, prepared from the same raw file (sha256) with the same "
                            "negatives, but not byte-identical to the run's inputs")
    if tried:
        return None, f"data at {', '.join(map(str, tried))} differs from the run's inputs (sha256): split checks skipped"
    return None, "data not available, split checks skipped"


# ----------------------------------------------------------------------------------------------
# The audit


def run_folders(root: Path) -> list[Path]:
    """Every run folder (holding run.json or ranks.parquet) under ROOT/runs."""
    folders = {p.parent for name in ("run.json", "ranks.parquet") for p in root.glob(f"runs/*/*/*/seed~*/{name}")}
    return sorted(folders)


def audit_run(run_dir: Path, root: Path, data_cache: dict) -> RunAudit:
    result = RunAudit(run_dir)
    problems, notes = result.problems, result.notes
    record_path, ranks_path = run_dir / "run.json", run_dir / "ranks.parquet"
    if not record_path.is_file() or not ranks_path.is_file():
        missing = [p.name for p in (record_path, ranks_path) if not p.is_file()]
        problems.append(f"incomplete run folder: {', '.join(missing)} missing")
        return result
    try:
        record = json.loads(record_path.read_text())
    except json.JSONDecodeError as err:
        problems.append(f"{record_path.name}: not valid JSON ({err.msg})")
        return result
    try:
        ranks = pd.read_parquet(ranks_path)
    except Exception as err:  # noqa: BLE001 (any reader error: a damaged file)
        problems.append(f"{ranks_path.name}: unreadable ({type(err).__name__})")
        return result
    check_record(record, problems, notes)
    check_ranks(record, ranks, problems, notes)

    dataset = record.get("dataset") or run_dir.parts[-4]
    folder, why = find_dataset(record, root, dataset)
    if folder is None:
        notes.append(why)
        return result
    result.equivalent_copy = bool(why)
    key = str(folder.resolve())
    if key not in data_cache:
        data_cache[key] = check_data(folder)
    problems.extend(f"{folder}: {p}" for p in data_cache[key])
    users = pd.read_parquet(folder / "sequences.parquet", columns=["user_id"])["user_id"].to_numpy()
    if "user_id" not in ranks.columns or not np.array_equal(np.sort(ranks["user_id"].to_numpy()), np.sort(users)):
        problems.append(f"ranks.parquet users are not the users of {folder}")
    result.data_checked = True
    notes.append(f"split and negatives {why}" if why else f"split and negatives checked on {folder} (sha256 verified)")
    return result


# ----------------------------------------------------------------------------------------------
# Inputs of a rebuild: tables and figures are only rebuilt against the data the runs were made from


def _sha256(path: Path, cache: dict) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in cache:
        cache[key] = sha256_file(path)
    return cache[key]


def _read_record(run_dir: Path) -> dict:
    path = run_dir / "run.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"run {run_dir}: {path} not found (an unfinished run folder)") from None
    except json.JSONDecodeError as err:
        raise InputError(f"run {run_dir}: {path} is not valid JSON ({err.msg})") from None


def verify_run_dataset(run_dir: Path, record: dict, folder: Path, cache: dict) -> str:
    """The prepared dataset ``folder`` is the one the run was made from: the sha256 of its three files
    are the recorded ones, or (returned note) it is an equivalent copy prepared on another machine: same
    raw file (sha256), same negatives record, and the run's ranks hold its users in its order. Else an
    InputError naming the run and the file."""
    inputs = record.get("inputs") or {}
    recorded = inputs.get("sha256") if isinstance(inputs.get("sha256"), dict) else {}
    missing = [name for name in DATA_FILES if not SHA256.fullmatch(str(recorded.get(name, "")))]
    if missing:
        raise InputError(f"run {run_dir}: run.json records no sha256 of {missing} (inputs.sha256): cannot tell whether "
                         f"{folder} holds the data the run was made from")
    absent = [name for name in DATA_FILES if not (folder / name).is_file()]
    if absent:
        raise InputError(f"run {run_dir}: {folder / absent[0]} not found")
    actual = {name: _sha256(folder / name, cache) for name in DATA_FILES}
    differ = [name for name in DATA_FILES if actual[name] != recorded[name]]
    if not differ:
        return ""
    local = json.loads((folder / "dataset.json").read_text())
    raw = inputs.get("raw_sha256")
    same_source = bool(raw) and (local.get("raw") or {}).get("sha256") == raw \
        and local.get("negatives") == inputs.get("negatives")
    if same_source:
        users = pd.read_parquet(folder / "sequences.parquet", columns=["user_id"])["user_id"].to_numpy()
        ranked = pd.read_parquet(run_dir / "ranks.parquet", columns=["user_id"])["user_id"].to_numpy()
        if np.array_equal(users, ranked):
            return (f"{folder} is not byte-identical to the inputs of {run_dir.name} but prepared from the same raw "
                    "file (sha256) with the same negatives and the same users")
        raise InputError(f"run {run_dir}: {run_dir / 'ranks.parquet'} does not hold the users of "
                         f"{folder / 'sequences.parquet'} in their order (same raw file, prepared otherwise): the "
                         "run was not made from this data")
    name = differ[0]
    raise InputError(f"run {run_dir}: {folder / name} has sha256 {actual[name]}, the run recorded {recorded[name]} "
                     f"({', '.join(differ)} differ; not prepared from the same raw file with the same negatives "
                     "either): the run was not made from this data. Rebuild against the data it was made from, or "
                     "rerun it")


def verify_item_table(run_dir: Path, record: dict, runs_by_key: dict, cache: dict) -> None:
    """An E4SRec run's item table (``item_embeddings_source``) is the one its components record names
    and, where the run folder that exported it is among the rebuilt runs (or the recorded path
    exists), that folder's file has the recorded sha256."""
    source = record.get("item_embeddings_source")
    if not isinstance(source, dict) or not source.get("sha256"):
        return
    components = run_dir / "components" / "components.json"
    if components.is_file():
        named = (json.loads(components.read_text()).get("item_embeddings") or {}).get("sha256")
        if named != source["sha256"]:
            raise InputError(f"run {run_dir}: {components} names item embeddings sha256 {named}, run.json records "
                             f"{source['sha256']}: the components do not belong to this run")
    path = Path(str(source.get("path", "")))
    exporter = runs_by_key.get(tuple(path.parent.parts[-4:]))
    table = exporter / path.name if exporter is not None else path
    if str(path) and table.is_file():
        found = _sha256(table, cache)
        if found != source["sha256"]:
            raise InputError(f"run {run_dir}: its item embeddings {table} have sha256 {found}, the run recorded "
                             f"{source['sha256']}: it was trained on another item table (was that run retrained?); "
                             "rerun it")


def verify_inputs(run_dirs, dataset_dirs) -> list[str]:
    """Before tables or figures are rebuilt from ``run_dirs`` against the prepared ``dataset_dirs``:
    every run of a dataset among them was made from that data (:func:`verify_run_dataset`) and every
    E4SRec run's item table is the one it recorded (:func:`verify_item_table`). Raises InputError
    naming the run and the file; returns notes (equivalent copies)."""
    folders = {}
    for folder in map(Path, dataset_dirs):
        try:
            name = json.loads((folder / "dataset.json").read_text()).get("name") or folder.name
        except (FileNotFoundError, json.JSONDecodeError):
            name = folder.name  # SequenceData.load reports it
        folders[name] = folder
    run_dirs = [Path(r) for r in run_dirs]
    runs_by_key = {tuple(r.parts[-4:]): r for r in run_dirs}
    cache, notes = {}, []
    for run_dir in run_dirs:
        record = _read_record(run_dir)
        dataset = record.get("dataset") or run_dir.parts[-4]
        if dataset in folders:
            note = verify_run_dataset(run_dir, record, folders[dataset], cache)
            if note:
                notes.append(f"{run_dir}: {note}")
        verify_item_table(run_dir, record, runs_by_key, cache)
    return notes


def in_progress(root: Path) -> list[Path]:
    """Run folders with neither run.json nor ranks.parquet (a run training now, or killed): not runs yet."""
    return sorted(p for p in root.glob("runs/*/*/*/seed~*") if p.is_dir() and not (p / "run.json").exists()
                  and not (p / "ranks.parquet").exists())


def audit(root: str | Path) -> list[RunAudit]:
    root = Path(root)
    folders = run_folders(root)
    if not folders:
        raise InputError(f"{root}: no run folders (runs/DATASET/MODEL/VARIANT/seed~N with run.json and ranks.parquet)")
    cache: dict = {}
    return [audit_run(folder, root, cache) for folder in folders]


def report(root: str | Path, out=None) -> int:
    """Print one line per run and a summary; return the number of runs with problems."""
    import sys

    out = out or sys.stdout
    root = Path(root)
    results = audit(root)
    for result in results:
        print(result.line(root), file=out)
    failed = sum(not r.ok for r in results)
    checked = sum(r.data_checked for r in results)
    copies = sum(r.data_checked and r.equivalent_copy for r in results)
    print(f"audit {root}: {len(results)} runs, {len(results) - failed} OK, {failed} with problems; split and "
          f"negatives checked for {checked} ({checked - copies} on sha256-verified data, {copies} on an equivalent "
          f"copy), skipped for {len(results) - checked} (data not available or changed)"
          f"; {len(in_progress(root))} unfinished folders (no run.json or ranks.parquet) not audited", file=out)
    return failed
