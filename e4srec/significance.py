"""Significance of E4SRec against each baseline, from the per-user ranks.

For each (dataset, protocol, metric): a user's value is the metric of their test rank, averaged over
the model's seeds; E4SRec and the baseline are compared over the same users with a paired Wilcoxon
signed-rank test and a paired t-test. E4SRec is its default variant and each variant that trains the
full model another way (``model_variant``, e.g. paper-batch; not Figure 3's ablations, which are not
tested). P-values are Holm-corrected across all comparisons of one table (Table 3: full ranking;
Table 6: sampled) and one E4SRec variant, so that adding a variant leaves the default's unchanged.
Effect sizes: the mean difference, Cohen's d_z (mean difference / standard deviation of the
differences) and the Wilcoxon matched-pairs rank-biserial correlation. Intervals: 95% percentile bootstrap over users of the mean (seeded).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from .files import read_json
from .metrics import per_user
from .tables import E4SREC_ABLATIONS, TABLE3, TABLE6, write_csv

BOOTSTRAP_RESAMPLES = 2000
COLUMNS = ["table", "dataset", "protocol", "metric", "k", "model", "model_variant", "baseline", "baseline_variant",
           "users", "model_seeds", "baseline_seeds", "model_value", "baseline_value", "mean_difference", "cohens_dz",
           "rank_biserial", "wilcoxon_p", "ttest_p", "wilcoxon_p_holm", "ttest_p_holm"]


def holm(p_values: np.ndarray) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (step-down, monotone, capped at 1)."""
    p_values = np.asarray(p_values, dtype=np.float64)
    order = np.argsort(p_values)
    m = len(p_values)
    adjusted = np.empty(m)
    running = 0.0
    for position, index in enumerate(order):
        running = max(running, (m - position) * p_values[index])
        adjusted[index] = min(1.0, running)
    return adjusted


def bootstrap_interval(values: np.ndarray, seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of ``values`` (users resampled with replacement)."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 200):  # chunks bound the memory of large datasets
        count = min(200, resamples - start)
        index = rng.integers(0, len(values), size=(count, len(values)))
        means[start:start + count] = values[index].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def load_user_values(run_dirs: list[str]) -> dict[tuple[str, str, str], dict]:
    """(dataset, model, variant) -> {"seeds": [...], "ranks": {column: [U, seeds] array}, "users": ids}."""
    groups: dict[tuple[str, str, str], dict] = {}
    for run_dir in run_dirs:
        record = read_json(Path(run_dir) / "run.json")
        ranks = pd.read_parquet(Path(run_dir) / "ranks.parquet")
        key = (record["dataset"], record["model"], record["variant"])
        group = groups.setdefault(key, {"seeds": [], "frames": []})
        group["seeds"].append(record["seed"])
        group["frames"].append(ranks.set_index("user_id").sort_index())
    for group in groups.values():
        users = group["frames"][0].index
        if any(not frame.index.equals(users) for frame in group["frames"]):
            raise ValueError("runs of one model cover different users")
        group["users"] = users.to_numpy()
    return groups


def user_metric(group: dict, protocol: str, metric: str, k) -> np.ndarray:
    """Per-user metric of the test rank, averaged over the group's seeds."""
    k = None if pd.isna(k) else int(k)
    return np.mean([per_user(frame[f"test_{protocol}"].to_numpy(), metric, k) for frame in group["frames"]], axis=0)


def compare(run_dirs: list[str], target_model: str = "E4SRec") -> pd.DataFrame:
    """One row per (dataset, protocol, metric, baseline): tests, effect sizes, intervals."""
    groups = load_user_values(run_dirs)
    rows = []
    for table, spec, protocols in (("table3", TABLE3, ("full", "full_masked")), ("table6", TABLE6, ("sampled",))):
        for (dataset, model, variant), target in groups.items():
            if model != target_model or variant in E4SREC_ABLATIONS:
                continue
            for (other_dataset, baseline, baseline_variant), other in groups.items():
                if other_dataset != dataset or baseline == target_model:
                    continue
                if not np.array_equal(target["users"], other["users"]):
                    raise ValueError(f"{dataset}: {target_model} and {baseline} were evaluated on different users")
                for protocol in protocols:
                    for metric, k in spec["metrics"]:
                        ours = user_metric(target, protocol, metric, k)
                        theirs = user_metric(other, protocol, metric, k)
                        diff = ours - theirs
                        nonzero = diff[diff != 0]
                        wilcoxon = stats.wilcoxon(ours, theirs, zero_method="wilcox") if len(nonzero) else None
                        ttest = stats.ttest_rel(ours, theirs) if diff.std() > 0 else None
                        ranks = stats.rankdata(np.abs(nonzero))
                        biserial = (ranks[nonzero > 0].sum() - ranks[nonzero < 0].sum()) / ranks.sum() if len(nonzero) else 0.0
                        rows.append({
                            "table": table, "dataset": dataset, "protocol": protocol, "metric": metric, "k": k,
                            "model": target_model, "model_variant": variant, "baseline": baseline,
                            "baseline_variant": baseline_variant,
                            "users": len(diff), "model_seeds": " ".join(map(str, sorted(target["seeds"]))),
                            "baseline_seeds": " ".join(map(str, sorted(other["seeds"]))),
                            "model_value": ours.mean(), "baseline_value": theirs.mean(), "mean_difference": diff.mean(),
                            "cohens_dz": diff.mean() / diff.std(ddof=1) if diff.std() > 0 else 0.0,
                            "rank_biserial": biserial,
                            "wilcoxon_p": wilcoxon.pvalue if wilcoxon else 1.0,
                            "ttest_p": ttest.pvalue if ttest else 1.0,
                        })
    frame = pd.DataFrame(rows, columns=COLUMNS)
    for part in frame.groupby(["table", "model_variant"]).groups.values():
        frame.loc[part, "wilcoxon_p_holm"] = holm(frame.loc[part, "wilcoxon_p"].to_numpy())
        frame.loc[part, "ttest_p_holm"] = holm(frame.loc[part, "ttest_p"].to_numpy())
    frame["k"] = frame["k"].astype("Int64")
    return frame


def intervals(run_dirs: list[str], seed: int = 0) -> pd.DataFrame:
    """95% bootstrap intervals of every table metric of every (dataset, model, variant)."""
    rows = []
    for (dataset, model, variant), group in load_user_values(run_dirs).items():
        for spec, protocols in ((TABLE3, ("full", "full_masked")), (TABLE6, ("sampled",))):
            for protocol in protocols:
                for metric, k in spec["metrics"]:
                    values = user_metric(group, protocol, metric, k)
                    low, high = bootstrap_interval(values, seed)
                    rows.append({"dataset": dataset, "model": model, "variant": variant, "protocol": protocol,
                                 "metric": metric, "k": k, "value": values.mean(), "ci_low": low, "ci_high": high,
                                 "seeds": len(group["seeds"]), "bootstrap_resamples": BOOTSTRAP_RESAMPLES,
                                 "bootstrap_seed": seed})
    frame = pd.DataFrame(rows)
    frame["k"] = frame["k"].astype("Int64")
    return frame


def write_significance(run_dirs: list[str], out: str | Path, intervals_out: str | Path) -> None:
    write_csv(out, compare(run_dirs))
    write_csv(intervals_out, intervals(run_dirs))
