"""Significance tests of E4SRec against the baselines (e4srec.significance) and the marks they give
Tables 3 and 6 (e4srec.tables.add_verdicts), on synthetic per-user ranks."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from e4srec import significance, tables

USERS = 300


def write_run(root, model: str, variant: str, seed: int, ranks: np.ndarray) -> str:
    """A run folder with run.json and ranks.parquet; ``ranks`` [USERS] used for every split and protocol."""
    folder = root / "Beauty" / model / variant / f"seed~{seed}"
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"dataset": "Beauty", "model": model, "variant": variant, "seed": seed}))
    frame = pd.DataFrame({"user_id": np.arange(1, USERS + 1)})
    for split in ("valid", "test"):
        for protocol in ("full", "full_masked", "sampled"):
            frame[f"{split}_{protocol}"] = ranks.astype(np.int32)
    frame.to_parquet(folder / "ranks.parquet")
    return str(folder)


@pytest.fixture
def runs(tmp_path):
    rng = np.random.default_rng(0)
    good = rng.integers(1, 8, USERS)  # most targets in the top 10
    weak = rng.integers(5, 40, USERS)
    return {
        "default": [write_run(tmp_path, "E4SRec", "default", s, weak + s) for s in (0, 1)],
        "paper-batch": [write_run(tmp_path, "E4SRec", "paper-batch", 0, good)],
        "no-llm": [write_run(tmp_path, "E4SRec", "no-llm", 0, good)],
        "SASRec": [write_run(tmp_path, "SASRec", "default", 0, rng.integers(3, 20, USERS))],
        "POP": [write_run(tmp_path, "POP", "default", 0, rng.integers(20, 100, USERS))],
    }


def test_holm_adjusts_step_down_and_stays_monotone():
    adjusted = significance.holm(np.array([0.01, 0.04, 0.03, 0.5]))
    assert adjusted.tolist() == pytest.approx([0.04, 0.09, 0.09, 0.5])


def test_each_trained_variant_is_tested_in_a_family_of_its_own(runs):
    """The default and paper-batch are each compared with every baseline; no-llm (an ablation) is not;
    Holm's family is one table and one variant, so adding paper-batch leaves the default's p-values."""
    every = [run for group in runs.values() for run in group]
    frame = significance.compare(every)
    assert set(frame["model_variant"]) == {"default", "paper-batch"}
    assert set(frame["baseline"]) == {"SASRec", "POP"}
    alone = significance.compare([*runs["default"], *runs["SASRec"], *runs["POP"]])
    default = frame[frame["model_variant"] == "default"].reset_index(drop=True)
    pd.testing.assert_frame_equal(default, alone)
    assert (default["model_seeds"] == "0 1").all() and (default["baseline_seeds"] == "0").all()
    better = frame[(frame["model_variant"] == "paper-batch") & (frame["baseline"] == "SASRec")
                   & (frame["table"] == "table3") & (frame["metric"] == "HR") & (frame["k"] == 10)]
    assert (better["mean_difference"] > 0).all() and (better["wilcoxon_p_holm"] < 0.01).all()


def test_marks_follow_each_variant_own_tests(runs):
    """Table 3's significance column: paper-batch from its own tests (better than the best baseline),
    the default from its own (worse), the no-llm ablation untested (NA)."""
    every = [run for group in runs.values() for run in group]
    tested = significance.compare(every)
    rows = [{"dataset": "Beauty", "model": "E4SRec", "variant": variant, "protocol": "full", "metric": "HR", "k": 10,
             "value": 0.1, "paper_value": np.nan, "difference": np.nan, "relative_difference": np.nan}
            for variant in ("default", "paper-batch", "no-llm")]
    frame = pd.DataFrame(rows).astype({"k": "Int64"})
    marks = tables.add_verdicts(frame, None, tested).set_index("variant")["significant_vs_best_baseline"]
    assert bool(marks["paper-batch"]) and not bool(marks["default"])
    assert pd.isna(marks["no-llm"])
