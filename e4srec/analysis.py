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
            # no creation date in the PDF: the same figure gives the same bytes
            figure.savefig(tmp, dpi=150, bbox_inches="tight", metadata={"CreationDate": None} if suffix == ".pdf" else None)


# Okabe and Ito's colour-blind-safe palette (Wong, Nature Methods 8:441, 2011), in its usual order.
OKABE_ITO = {"orange": "#E69F00", "sky blue": "#56B4E9", "bluish green": "#009E73", "yellow": "#F0E442",
             "blue": "#0072B2", "vermillion": "#D55E00", "reddish purple": "#CC79A7", "black": "#000000"}
E4SREC_COLOUR, SASREC_COLOUR, OTHER_COLOUR = OKABE_ITO["vermillion"], OKABE_ITO["blue"], OKABE_ITO["bluish green"]


def label_colors(labels) -> dict[str, str]:
    """One colour per bar label, the same in every panel of a figure (Okabe-Ito, then black)."""
    cycle = [OKABE_ITO[name] for name in ("vermillion", "orange", "reddish purple", "yellow", "bluish green",
                                          "sky blue", "blue", "black")]
    return {label: cycle[i % len(cycle)] for i, label in enumerate(dict.fromkeys(labels))}


def figure_legend(figure, colors: dict[str, str], ncol: int = 4) -> None:
    """One legend for the whole figure, above the panels (outside every data area), each label once."""
    from matplotlib.patches import Patch

    figure.legend(handles=[Patch(facecolor=color, edgecolor="black", linewidth=0.5, label=label)
                           for label, color in colors.items()],
                  loc="upper center", ncol=min(len(colors), ncol), fontsize=9, frameon=False,
                  bbox_to_anchor=(0.5, 1 - 0.55 / figure.get_figheight()))


def _panels(count: int):
    """A grid of ``count`` panels (two columns from three on), spares hidden; (figure, flat axes)."""
    import matplotlib.pyplot as plt

    columns = count if count < 3 else 2
    rows = -(-count // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.3 * rows + 1.1), squeeze=False)
    axes = axes.ravel()
    for axis in axes[count:]:
        axis.set_visible(False)
    return figure, axes[:count], columns


def _layout(figure, legend_rows: int = 1) -> None:
    """Panels below the title and the legend: the top margin in inches, whatever the figure's height."""
    figure.tight_layout()
    height = figure.get_figheight()
    figure.subplots_adjust(top=1 - (0.95 + 0.22 * legend_rows) / height, hspace=0.45)


def _style(axis) -> None:
    axis.spines[["top", "right"]].set_visible(False)
    axis.yaxis.grid(True, color="0.9", linewidth=0.8)
    axis.set_axisbelow(True)


def overall_values(frame: pd.DataFrame, metric: str = "HR") -> pd.DataFrame:
    """(dataset, model) -> the metric over all users, from the per-group means weighted by group size."""
    part = frame[frame["metric"] == metric]
    weighted = part.assign(total=part["value"] * part["users"]).groupby(["dataset", "model"])[["total", "users"]].sum()
    return (weighted["total"] / weighted["users"]).rename("value").reset_index()


def sparsity_models_shown(frame: pd.DataFrame) -> dict[str, list[str]]:
    """Per dataset, Figure 4's bars: E4SRec, SASRec and the strongest other baseline (the non-E4SRec
    model label, variants included, with the highest HR@10 over all users), each where present."""
    overall = overall_values(frame, "HR")
    shown = {}
    for dataset, rows in overall.groupby("dataset", sort=False):
        labels = [m for m in ("E4SRec", "SASRec") if m in set(rows["model"])]
        baselines = rows[~rows["model"].str.startswith("E4SRec")]
        if len(baselines):
            best = baselines.loc[baselines["value"].idxmax(), "model"]
            if best not in labels:
                labels.append(best)
        shown[dataset] = labels
    return shown


def relative_gains(frame: pd.DataFrame, metric: str = "HR") -> pd.DataFrame:
    """E4SRec's relative gain over SASRec per dataset and group (value / SASRec's - 1)."""
    part = frame[(frame["metric"] == metric) & frame["model"].isin(["E4SRec", "SASRec"])]
    wide = part.pivot_table(index=["dataset", "group"], columns="model", values="value").reset_index()
    if not {"E4SRec", "SASRec"} <= set(wide.columns):
        return pd.DataFrame(columns=["dataset", "group", "gain"])
    return wide.assign(gain=wide["E4SRec"] / wide["SASRec"] - 1)[["dataset", "group", "gain"]]


def _length_range(low, high) -> str:
    """'4–7 items' (one number where the group's lengths are all equal)."""
    if pd.isna(low):
        return ""
    return f"{int(low)} items" if int(low) == int(high) else f"{int(low)}–{int(high)} items"


def plot_sparsity(frame: pd.DataFrame, stem: str | Path, metric: str = "HR") -> None:
    """Figure 4: per dataset and history-length tercile, E4SRec beside SASRec and the strongest other
    baseline, with 95% bootstrap intervals and E4SRec's relative gain over SASRec above each group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    part = frame[frame["metric"] == metric]
    datasets = list(dict.fromkeys(part["dataset"])) or ["(no runs)"]
    shown = sparsity_models_shown(frame)
    gains = relative_gains(frame, metric).set_index(["dataset", "group"])["gain"]
    colours = {"E4SRec": E4SREC_COLOUR, "SASRec": SASREC_COLOUR}
    figure, axes, columns = _panels(len(datasets))
    for index, (axis, dataset) in enumerate(zip(axes, datasets)):
        data = part[part["dataset"] == dataset]
        models = shown.get(dataset, [])
        width = 0.8 / max(len(models), 1)
        tops = np.zeros(len(GROUPS))
        for i, model in enumerate(models):
            rows = data[data["model"] == model].set_index("group").reindex(list(GROUPS))
            x = np.arange(len(GROUPS)) - 0.4 + width * (i + 0.5)
            colour = colours.get(model, OTHER_COLOUR)
            axis.bar(x, rows["value"], width * 0.92, label=model, color=colour, edgecolor="black", linewidth=0.5)
            axis.vlines(x, rows["ci_low"], rows["ci_high"], color="black", linewidth=1.1)
            tops = np.fmax(tops, rows["ci_high"].to_numpy(dtype=float))
        for g, group in enumerate(GROUPS):
            gain = gains.get((dataset, group), np.nan)
            if np.isfinite(gain) and np.isfinite(tops[g]):
                axis.annotate(f"{gain:+.1%}", (g, tops[g]), xytext=(0, 4), textcoords="offset points",
                              ha="center", va="bottom", fontsize=9, fontweight="bold", color=E4SREC_COLOUR)
        bounds = data.drop_duplicates("group").set_index("group").reindex(list(GROUPS))
        axis.set_xticks(np.arange(len(GROUPS)),
                        [f"{g}\n{_length_range(r.min_length, r.max_length)}" for g, r in bounds.iterrows()])
        if np.isfinite(tops).any():
            axis.set_ylim(0, np.nanmax(tops) * 1.2)
        other = [m for m in models if m not in colours]
        axis.set_title(paper_name(dataset) + (f"  (strongest other baseline: {other[0]})" if other else ""),
                       fontsize=10)
        if index % columns == 0:
            axis.set_ylabel(f"{metric}@10, full ranking (test)")
        _style(axis)
    legend = {"E4SRec": E4SREC_COLOUR, "SASRec": SASREC_COLOUR}
    if any(m not in legend for models in shown.values() for m in models):
        legend["strongest other baseline by HR@10 (named in each panel)"] = OTHER_COLOUR
    figure_legend(figure, legend)
    figure.suptitle(f"Figure 4: {metric}@10 by history length (users in three equal groups)\n"
                    "above each group: E4SRec's relative gain over SASRec; black lines: 95% bootstrap intervals",
                    fontsize=11, y=0.995)
    _layout(figure)
    save_figure(figure, stem)
    plt.close(figure)


SPARSITY_FIGURES = {"HR": "", "NDCG": "_ndcg"}  # Figure 4's files: stem + suffix per metric


def plot_sparsity_figures(frame: pd.DataFrame, stem: str | Path) -> None:
    """Figure 4 for HR@10 (``stem``) and for NDCG@10 (``stem`` + ``_ndcg``), one idea each."""
    for metric, suffix in SPARSITY_FIGURES.items():
        plot_sparsity(frame, f"{stem}{suffix}", metric)


def write_sparsity(run_dirs: list[str], dataset_dirs: list[str], out_csv: str | Path, figure_stem: str | Path,
                   models: list[str] | None = None) -> None:
    from .audit import verify_inputs

    verify_inputs(run_dirs, dataset_dirs)  # the terciles come from these datasets: they must be the runs' own
    frame = sparsity_groups(run_dirs, dataset_dirs, models)
    write_csv(out_csv, frame)
    plot_sparsity_figures(frame, figure_stem)


def write_protocols(run_dirs: list[str], summary_csv: str | Path, flips_csv: str | Path) -> None:
    summary, flips = protocol_disagreement(run_dirs)
    write_csv(summary_csv, summary)
    write_csv(flips_csv, flips)


ABLATION_LABELS = {"default": "E4SRec (full)", "no-instruct": "no instruction tuning",
                   "bpr-embeddings": "BPR item embeddings + LLM", "no-llm": "SASRec emb., no LLM",
                   "bert-encoder": "SASRec emb. + MiniLM (BERT-class)",
                   "paper-batch": "E4SRec (full), 16 examples a batch"}  # the variant of config/gpu-budget.yaml


# Figure 3's bars, in this order: the full model (two ways of training it), then what each ablation removes,
# then SASRec, the reference; labels not listed here follow in the order they come.
ABLATION_ORDER = ("E4SRec (full)", "E4SRec (full), 16 examples a batch", "no instruction tuning",
                  "BPR item embeddings + LLM", "SASRec emb. + MiniLM (BERT-class)", "SASRec emb., no LLM",
                  "SASRec (reference)")
ABLATION_COLOURS = dict(zip(ABLATION_ORDER, [OKABE_ITO[name] for name in (
    "vermillion", "orange", "reddish purple", "yellow", "bluish green", "sky blue", "blue")]))


def ablation_table(metrics_csv: str | Path) -> pd.DataFrame:
    """Figure 3: test HR@{5,10,20} (full ranking) of E4SRec's variants, beside SASRec's: mean and
    standard deviation over seeds."""
    metrics = pd.read_csv(metrics_csv, dtype={"k": "Int64"})
    part = metrics[(metrics["split"] == "test") & (metrics["protocol"] == "full") & (metrics["metric"] == "HR")
                   & metrics["k"].isin([5, 10, 20])
                   & ((metrics["model"] == "E4SRec") | ((metrics["model"] == "SASRec") & (metrics["variant"] == "default")))]
    part = part.assign(label=np.where(part["model"] == "SASRec", "SASRec (reference)",
                                      part["variant"].map(ABLATION_LABELS).fillna(part["variant"])))
    return part.groupby(["dataset", "label", "metric", "k"], as_index=False).agg(value=("value", "mean"),
                                                                                seeds=("seed", "count"),
                                                                                std=("value", "std"))


def plot_ablation(frame: pd.DataFrame, figure_stem: str | Path) -> None:
    """Figure 3: per dataset, HR@5/10/20 of each variant in :data:`ABLATION_ORDER`, a colour per label
    in every panel, lines: the standard deviation over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(frame["dataset"])) or ["(no runs)"]
    present = set(frame["label"])
    labels = [label for label in ABLATION_ORDER if label in present] + \
             [label for label in dict.fromkeys(frame["label"]) if label not in ABLATION_ORDER]
    spare = itertools.cycle([OKABE_ITO["black"], "#999999"])  # labels beyond the seven known
    colors = {label: ABLATION_COLOURS.get(label) or next(spare) for label in labels}
    figure, axes, columns = _panels(len(datasets))
    for index, (axis, dataset) in enumerate(zip(axes, datasets)):
        data = frame[frame["dataset"] == dataset]
        shown = [label for label in colors if label in set(data["label"])]
        width = 0.84 / max(len(shown), 1)
        for i, label in enumerate(shown):
            rows = data[data["label"] == label].set_index("k").reindex([5, 10, 20])
            x = np.arange(3) - 0.42 + width * (i + 0.5)
            axis.bar(x, rows["value"], width * 0.92, label=label, color=colors[label], edgecolor="black",
                     linewidth=0.5)
            spread = rows["std"] if "std" in rows else pd.Series(np.nan, index=rows.index)
            axis.vlines(x, rows["value"] - spread, rows["value"] + spread, color="black", linewidth=1.0)
        axis.set_xticks(np.arange(3), ["HR@5", "HR@10", "HR@20"])
        axis.set_title(paper_name(dataset), fontsize=10)
        if index % columns == 0:
            axis.set_ylabel("HR@k, full ranking (test)")
        _style(axis)
    if colors:
        figure_legend(figure, colors, ncol=4)
    figure.suptitle("Figure 3: ablation of E4SRec, beside SASRec\n"
                    "bars: mean over seeds; black lines: ± one standard deviation", fontsize=11, y=0.995)
    _layout(figure, legend_rows=-(-len(colors) // 4))
    save_figure(figure, figure_stem)
    plt.close(figure)


def write_ablation(metrics_csv: str | Path, out_csv: str | Path, figure_stem: str | Path) -> None:
    frame = ablation_table(metrics_csv)
    write_csv(out_csv, frame)
    plot_ablation(frame, figure_stem)
