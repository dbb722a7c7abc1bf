"""Analyses beyond the main tables, from the same per-user ranks.

- Figure 4 (robustness to sparsity): users split into three equal-size groups by the length of the
  history their test item is predicted from (the paper gives no boundaries; ours are the user
  terciles, recorded in the CSV), each model's HR@10 / NDCG@10 per group with 95% bootstrap intervals.
- Sampled vs full: where the 99-negative protocol orders the models differently from full ranking
  (the known inconsistency of sampled metrics; Krichene and Rendle, KDD 2020): Kendall's tau between
  the two orderings per dataset and every pair of models whose order flips.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from .data import SequenceData, paper_name
from .files import atomic_path, read_json
from .metrics import per_user
from .significance import bootstrap_interval
from .tables import write_csv

GROUPS = ("short", "medium", "long")


def _runs_by_model(run_dirs: list[str]) -> dict[tuple[str, str], list[pd.DataFrame]]:
    """(dataset, model label) -> the ranks frames of its seeds (label = model, or model (variant))."""
    runs: dict[tuple[str, str], list[pd.DataFrame]] = {}
    for run_dir in run_dirs:
        record = read_json(Path(run_dir) / "run.json")
        label = record["model"] if record["variant"] == "default" else f"{record['model']} ({record['variant']})"
        runs.setdefault((record["dataset"], label), []).append(pd.read_parquet(Path(run_dir) / "ranks.parquet"))
    return runs


def sparsity_groups(run_dirs: list[str], dataset_dirs: list[str], models: list[str] | None = None) -> pd.DataFrame:
    """HR@10 and NDCG@10 (full ranking, test item) per history-length tercile of users."""
    datasets = {SequenceData.load(d).name: SequenceData.load(d) for d in dataset_dirs}
    rows = []
    for (dataset, label), frames in _runs_by_model(run_dirs).items():
        if models and label not in models or dataset not in datasets:
            continue
        data = datasets[dataset]
        lengths = np.array([len(h) for h in data.histories("test")])
        # Terciles by rank of length (ties broken by user order) give three equal-size groups.
        order = np.argsort(lengths, kind="stable")
        group_of = np.empty(len(lengths), dtype=np.int64)
        for g, part in enumerate(np.array_split(order, 3)):
            group_of[part] = g
        for g, name in enumerate(GROUPS):
            members = group_of == g
            for metric, k in (("HR", 10), ("NDCG", 10)):
                values = np.mean([per_user(f["test_full"].to_numpy(), metric, k) for f in frames], axis=0)[members]
                low, high = bootstrap_interval(values)
                rows.append({"dataset": dataset, "model": label, "group": name, "users": int(members.sum()),
                             "min_length": int(lengths[members].min()), "max_length": int(lengths[members].max()),
                             "metric": metric, "k": k, "value": values.mean(), "ci_low": low, "ci_high": high,
                             "seeds": len(frames)})
    return pd.DataFrame(rows)


def protocol_disagreement(run_dirs: list[str], metric: str = "NDCG", k: int = 10) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-dataset Kendall tau between full and sampled orderings, every flipped pair)."""
    scores: dict[str, dict[str, tuple[float, float]]] = {}
    for (dataset, label), frames in _runs_by_model(run_dirs).items():
        full = np.mean([per_user(f["test_full"].to_numpy(), metric, k).mean() for f in frames])
        sampled = np.mean([per_user(f["test_sampled"].to_numpy(), metric, k).mean() for f in frames])
        scores.setdefault(dataset, {})[label] = (full, sampled)
    summary, flips = [], []
    for dataset, models in scores.items():
        names = sorted(models)
        full = np.array([models[n][0] for n in names])
        sampled = np.array([models[n][1] for n in names])
        tau = stats.kendalltau(full, sampled).statistic if len(names) > 1 else np.nan
        flipped = 0
        for a, b in itertools.combinations(range(len(names)), 2):
            if np.sign(full[a] - full[b]) * np.sign(sampled[a] - sampled[b]) < 0:
                flipped += 1
                flips.append({"dataset": dataset, "model_a": names[a], "model_b": names[b],
                              f"full_{metric}@{k}_a": full[a], f"full_{metric}@{k}_b": full[b],
                              f"sampled_{metric}@{k}_a": sampled[a], f"sampled_{metric}@{k}_b": sampled[b]})
        summary.append({"dataset": dataset, "models": len(names), "metric": f"{metric}@{k}", "kendall_tau": tau,
                        "flipped_pairs": flipped, "pairs": len(names) * (len(names) - 1) // 2})
    return pd.DataFrame(summary), pd.DataFrame(flips)


def save_figure(figure, stem: str | Path) -> None:
    """PNG and PDF, each written atomically."""
    for suffix in (".png", ".pdf"):
        with atomic_path(Path(stem).with_suffix(suffix), suffix=suffix) as tmp:
            figure.savefig(tmp, dpi=150, bbox_inches="tight")


def label_colors(labels) -> dict[str, tuple]:
    """One colour per bar label, the same in every panel of a figure (matplotlib's tab10 cycle)."""
    import matplotlib

    cycle = matplotlib.colormaps["tab10"].colors
    return {label: cycle[i % len(cycle)] for i, label in enumerate(dict.fromkeys(labels))}


def figure_legend(figure, colors: dict[str, tuple]) -> None:
    """One legend for the whole figure, listing every label once (panels may show fewer)."""
    from matplotlib.patches import Patch

    figure.legend(handles=[Patch(color=color, label=label) for label, color in colors.items()],
                  loc="lower center", ncol=min(len(colors), 5), fontsize=7, bbox_to_anchor=(0.5, -0.12))


def plot_sparsity(frame: pd.DataFrame, stem: str | Path, metric: str = "HR") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    part = frame[frame["metric"] == metric]
    datasets = list(dict.fromkeys(part["dataset"]))
    colors = label_colors(part["model"])
    figure, axes = plt.subplots(1, max(len(datasets), 1), figsize=(4 * max(len(datasets), 1), 3.2), squeeze=False)
    for axis, dataset in zip(axes[0], datasets):
        data = part[part["dataset"] == dataset]
        models = [m for m in colors if m in set(data["model"])]
        width = 0.8 / max(len(models), 1)
        for i, model in enumerate(models):
            rows = data[data["model"] == model].set_index("group").reindex(list(GROUPS))
            x = np.arange(len(GROUPS)) + i * width
            axis.bar(x, rows["value"], width, label=model, color=colors[model],
                     yerr=[rows["value"] - rows["ci_low"], rows["ci_high"] - rows["value"]], capsize=2)
        labels = [f"{g}\n{int(r.min_length)}-{int(r.max_length)}"
                  for g, r in data.drop_duplicates("group").set_index("group").reindex(list(GROUPS)).iterrows()]
        axis.set_xticks(np.arange(len(GROUPS)) + width * (len(models) - 1) / 2, labels)
        axis.set_title(paper_name(dataset))
        axis.set_ylabel(f"{metric}@10 (full ranking)")
    figure_legend(figure, colors)
    figure.suptitle("Figure 4: users by history length (equal thirds), 95% bootstrap intervals", y=1.04)
    save_figure(figure, stem)
    plt.close(figure)


def write_sparsity(run_dirs: list[str], dataset_dirs: list[str], out_csv: str | Path, figure_stem: str | Path,
                   models: list[str] | None = None) -> None:
    from .audit import verify_inputs

    verify_inputs(run_dirs, dataset_dirs)  # the terciles come from these datasets: they must be the runs' own
    frame = sparsity_groups(run_dirs, dataset_dirs, models)
    write_csv(out_csv, frame)
    plot_sparsity(frame, figure_stem)


def write_protocols(run_dirs: list[str], summary_csv: str | Path, flips_csv: str | Path) -> None:
    summary, flips = protocol_disagreement(run_dirs)
    write_csv(summary_csv, summary)
    write_csv(flips_csv, flips)


ABLATION_LABELS = {"default": "E4SRec (full)", "no-instruct": "no instruction tuning",
                   "bpr-embeddings": "BPR item embeddings + LLM", "no-llm": "SASRec emb., no LLM",
                   "bert-encoder": "SASRec emb. + MiniLM (BERT-class)",
                   "paper-batch": "E4SRec (full), 16 examples a batch"}  # the variant of config/gpu-budget.yaml


def ablation_table(metrics_csv: str | Path) -> pd.DataFrame:
    """Figure 3: test HR@{5,10,20} (full ranking) of E4SRec's variants, beside SASRec's."""
    metrics = pd.read_csv(metrics_csv, dtype={"k": "Int64"})
    part = metrics[(metrics["split"] == "test") & (metrics["protocol"] == "full") & (metrics["metric"] == "HR")
                   & metrics["k"].isin([5, 10, 20])
                   & ((metrics["model"] == "E4SRec") | ((metrics["model"] == "SASRec") & (metrics["variant"] == "default")))]
    part = part.assign(label=np.where(part["model"] == "SASRec", "SASRec (reference)",
                                      part["variant"].map(ABLATION_LABELS).fillna(part["variant"])))
    return part.groupby(["dataset", "label", "metric", "k"], as_index=False).agg(value=("value", "mean"),
                                                                                seeds=("seed", "count"))


def write_ablation(metrics_csv: str | Path, out_csv: str | Path, figure_stem: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = ablation_table(metrics_csv)
    write_csv(out_csv, frame)
    datasets = list(dict.fromkeys(frame["dataset"])) or ["(no runs)"]
    colors = label_colors(frame["label"])
    figure, axes = plt.subplots(1, len(datasets), figsize=(4 * len(datasets), 3.2), squeeze=False)
    for axis, dataset in zip(axes[0], datasets):
        data = frame[frame["dataset"] == dataset]
        labels = [label for label in colors if label in set(data["label"])]
        width = 0.8 / max(len(labels), 1)
        for i, label in enumerate(labels):
            rows = data[data["label"] == label].set_index("k").reindex([5, 10, 20])
            axis.bar(np.arange(3) + i * width, rows["value"], width, label=label, color=colors[label])
        axis.set_xticks(np.arange(3) + width * (len(labels) - 1) / 2, ["HR@5", "HR@10", "HR@20"])
        axis.set_title(paper_name(dataset))
    if colors:
        figure_legend(figure, colors)
    figure.suptitle("Figure 3: ablation (full ranking, test item)", y=1.04)
    save_figure(figure, figure_stem)
    plt.close(figure)
