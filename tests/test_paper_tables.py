"""Tables 3 and 6 as the paper prints them (one per dataset), Figures 3 and 4, and the generated results
page: on tiny synthetic frames and fake run folders, so the tests stay fast."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from e4srec import analysis, results_page, tables

ROOT = Path(__file__).resolve().parent.parent
PAPER = ROOT / "paper" / "paper_targets.tsv"
# (model, variant, HR@10 mean); the std is 10% of it, POP has one seed
ROWS = [("E4SRec", "default", 0.050), ("SASRec", "ce", 0.060), ("POP", "default", 0.010), ("SASRec", "default", 0.040),
        ("E4SRec", "no-llm", 0.030), ("E4SRec", "paper-batch", 0.055), ("BPR", "default", 0.020),
        ("GRU4Rec", "bce", 0.015)]


def long_table(dataset: str = "Beauty") -> pd.DataFrame:
    """Table 3's long form (as paper_table + add_verdicts give it) for full ranking, rows in no order."""
    cells = []
    for model, variant, value in ROWS:
        for metric, k in tables.TABLE3["metrics"]:
            scale = k / 10 if metric == "HR" else k / 20
            cells.append({"dataset": dataset, "model": model, "variant": variant, "protocol": "full", "metric": metric,
                          "k": k, "value": value * scale, "std": np.nan if model == "POP" else value * scale / 10,
                          "seeds": 1 if model == "POP" else 3,
                          "paper_value": 0.07 * scale if variant == "default" else np.nan})
    frame = pd.DataFrame(cells)
    frame["k"] = frame["k"].astype("Int64")
    return frame


def significance(dataset: str = "Beauty", p: float = 1e-5) -> pd.DataFrame:
    """E4SRec (default, paper-batch) against every baseline row; the best baseline is SASRec (ce)."""
    rows = []
    table = long_table(dataset)
    baselines = table[table["model"] != "E4SRec"]
    for variant in ("default", "paper-batch"):
        mine = table[(table["model"] == "E4SRec") & (table["variant"] == variant)]
        for _, cell in mine.iterrows():
            for _, other in baselines[(baselines["metric"] == cell["metric"]) & (baselines["k"] == cell["k"])].iterrows():
                rows.append({"table": "table3", "dataset": dataset, "protocol": "full", "metric": cell["metric"],
                             "k": cell["k"], "model": "E4SRec", "model_variant": variant, "baseline": other["model"],
                             "baseline_variant": other["variant"], "model_value": cell["value"],
                             "baseline_value": other["value"], "mean_difference": cell["value"] - other["value"],
                             "wilcoxon_p_holm": p if cell["metric"] == "HR" else 0.5})
    frame = pd.DataFrame(rows)
    frame["k"] = frame["k"].astype("Int64")
    return frame


def test_rows_in_the_paper_order_extras_then_e4srec():
    order = tables.row_order([(m, v) for m, v, _ in ROWS])
    assert order == [("POP", "default"), ("BPR", "default"), ("SASRec", "default"), ("GRU4Rec", "bce"),
                     ("SASRec", "ce"), ("E4SRec", "paper-batch"), ("E4SRec", "default")]  # no-llm: Figure 3's


def test_by_dataset_cells_bold_and_marks():
    frame = tables.by_dataset(long_table(), significance(), tables.TABLE3, "full")
    assert list(dict.fromkeys(frame["row"])) == ["POP", "BPR", "SASRec", "GRU4Rec (bce)", "SASRec (ce)",
                                                 "E4SRec (paper-batch)", "E4SRec"]
    assert list(frame["metric"].cat.categories) == ["HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20"]
    best = frame[frame["best"]]
    assert set(best["row"]) == {"SASRec (ce)"} and len(best) == 6  # the best of ours per column
    e4srec = frame[frame["row"] == "E4SRec"].set_index("metric")
    # lower than the best baseline, significant for HR (p 1e-5 < 0.01), not for NDCG (0.5)
    assert e4srec.loc["HR@10", "mark"] == tables.MARK_WORSE and e4srec.loc["NDCG@10", "mark"] == ""
    assert e4srec.loc["HR@10", "best_baseline"] == "SASRec (ce)"
    assert (frame.loc[~frame["model"].eq("E4SRec"), "mark"] == "").all()
    printed = tables._printed(frame, latex=False)
    assert list(printed.columns) == ["seeds", "HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20"]
    assert printed.loc["E4SRec", "HR@10"] == "0.0500‡ ± 0.0050 (0.0700)"
    assert printed.loc["SASRec (ce)", "HR@10"] == "**0.0600** ± 0.0060"
    assert printed.loc["POP", "HR@10"] == "0.0100 (0.0700)"  # one seed: no ±


def test_a_better_e4srec_gets_the_dagger():
    table = long_table()
    table.loc[table["model"].eq("E4SRec") & table["variant"].eq("default"), "value"] *= 2
    sig = significance()
    sig["mean_difference"] = sig["mean_difference"].abs()
    frame = tables.by_dataset(table, sig, tables.TABLE3, "full")
    e4srec = frame[frame["row"] == "E4SRec"].set_index("metric")
    assert e4srec.loc["HR@5", "mark"] == tables.MARK_BETTER and bool(e4srec.loc["HR@5", "best"])


def test_written_files_markdown_csv_and_booktabs_latex(tmp_path):
    table = pd.concat([long_table("Beauty"), long_table("Yelp")], ignore_index=True)
    sig = pd.concat([significance("Beauty"), significance("Yelp")], ignore_index=True)
    written = tables.write_by_dataset(table, sig, tables.TABLE3, "full", "Table 3: full ranking", tmp_path, "table3")
    assert {p.name for p in written} == {"table3_by_dataset.md", "table3_by_dataset.csv", "table3_Beauty.csv",
                                         "table3_Beauty.tex", "table3_Yelp.csv", "table3_Yelp.tex"}
    markdown = (tmp_path / "table3_by_dataset.md").read_text()
    assert markdown.index("## Beauty") < markdown.index("## Yelp")
    assert "Holm" in markdown and "p < 0.01" in markdown and "†" in markdown  # the rule, in a footnote line
    latex = (tmp_path / "table3_Beauty.tex").read_text()
    for rule in (r"\toprule", r"\midrule", r"\bottomrule"):
        assert latex.count(rule) == 1, rule
    assert r"\textbf{0.0600}" in latex and r"$^{\ddagger}$" in latex and r"$\pm$" in latex
    assert "±" not in latex.split(r"\begin{table}")[1]  # LaTeX body: no bare unicode
    wide = pd.read_csv(tmp_path / "table3_Beauty.csv", index_col="model")
    assert list(wide.index) == ["POP", "BPR", "SASRec", "GRU4Rec (bce)", "SASRec (ce)", "E4SRec (paper-batch)", "E4SRec"]
    assert wide.loc["E4SRec", "HR@10"] == pytest.approx(0.05) and wide.loc["E4SRec", "HR@10_paper_value"] == 0.07
    assert json.loads((tmp_path / "table3_by_dataset.provenance.json").read_text())["protocol"] == "full"


def sparsity_frame() -> pd.DataFrame:
    rows = []
    for model, value in (("E4SRec", 0.06), ("SASRec", 0.05), ("SASRec (ce)", 0.08), ("POP", 0.01), ("E4SRec (no-llm)", 0.09)):
        for g, group in enumerate(analysis.GROUPS):
            for metric in ("HR", "NDCG"):
                v = value * (1 + g / 10) / (1 if metric == "HR" else 2)
                rows.append({"dataset": "Beauty", "model": model, "group": group, "users": 10, "min_length": 4 + g,
                             "max_length": 5 + g, "metric": metric, "k": 10, "value": v, "ci_low": v * 0.9,
                             "ci_high": v * 1.1, "seeds": 3})
    return pd.DataFrame(rows)


def test_figure4_shows_e4srec_sasrec_and_the_strongest_other_baseline(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    frame = sparsity_frame()
    assert analysis.sparsity_models_shown(frame) == {"Beauty": ["E4SRec", "SASRec", "SASRec (ce)"]}
    gains = analysis.relative_gains(frame).set_index("group")["gain"]
    assert gains["short"] == pytest.approx(0.2)
    figures = []
    monkeypatch.setattr(analysis, "save_figure", lambda figure, stem: figures.append(figure))
    monkeypatch.setattr(plt, "close", lambda figure: None)
    analysis.plot_sparsity_figures(frame, tmp_path / "figure4")
    assert len(figures) == 2  # HR@10 and NDCG@10, one idea each
    axis = figures[0].axes[0]
    assert [c.get_label() for c in axis.containers] == ["E4SRec", "SASRec", "SASRec (ce)"]
    assert {t.get_text() for t in axis.texts} == {"+20.0%"}
    colours = {c.get_label(): c.patches[0].get_facecolor()[:3] for c in axis.containers}
    import matplotlib.colors as mcolors

    assert {mcolors.to_hex(c) for c in colours.values()} <= {c.lower() for c in analysis.OKABE_ITO.values()}
    legend = figures[0].legends[0]
    assert all(not axis.get_legend() for axis in figures[0].axes)  # one legend, outside the panels


def test_figure_files_are_written(tmp_path):
    analysis.plot_sparsity_figures(sparsity_frame(), tmp_path / "figure4")
    assert all((tmp_path / name).stat().st_size > 0 for name in
               ("figure4.png", "figure4.pdf", "figure4_ndcg.png", "figure4_ndcg.pdf"))


def write_run(root: Path, dataset: str, model: str, variant: str, seed: int, gpus: list[str] | None) -> None:
    folder = root / "runs" / dataset / model / variant / f"seed~{seed}"
    folder.mkdir(parents=True)
    record = {"dataset": dataset, "model": model, "variant": variant, "seed": seed, "date": f"2026-01-0{seed + 1}T00:00:00",
              "git": {"commit": ("abc1234" if gpus else "def5678") + "0" * 33, "dirty": False},
              "machine": {"gpus": gpus, "cpu_count": 2} if gpus else {"cpu_count": 2}}
    (folder / "run.json").write_text(json.dumps(record))
    (folder / "ranks.parquet").write_bytes(b"")


def test_results_page_lists_existing_files_and_counts_the_runs(tmp_path):
    root = tmp_path / "results" / "paper"
    for seed in (0, 1, 2):
        write_run(root, "Beauty", "E4SRec", "default", seed, ["NVIDIA H200"])
        write_run(root, "Yelp", "SASRec", "default", seed, None)
    write_run(root, "Yelp", "SASRec", "ce", 0, None)
    (root / "runs" / "Yelp" / "POP" / "default" / "seed~0").mkdir(parents=True)  # no run.json: not a run
    (root / "tables").mkdir()
    for name in ("table3_by_dataset.md", "table3_Beauty.csv", "table3.md", "significance.csv"):
        (root / "tables" / name).write_text("x")
    assert results_page.default_page(root) == tmp_path / "results" / "README.md"
    page = results_page.write_results_page(root, results_page.default_page(root), PAPER).read_text()
    assert "**7 runs**: 2 datasets (Beauty, Yelp)" in page and "seeds 0, 1, 2" in page
    assert "NVIDIA H200: 3 runs" in page and "CPU, 2 cores: 4 runs" in page and "2 commits" in page
    links = set(re.findall(r"\]\(([^)]+)\)", page))
    for name in ("table3_by_dataset.md", "table3_Beauty.csv", "table3.md", "significance.csv"):
        assert f"paper/tables/{name}" in links, name
    assert not any("table6" in link for link in links)  # not built: named, not linked
    for link in links:
        assert (tmp_path / "results" / link).exists(), link
    assert "not built" in page
    from test_docs import FORBIDDEN  # the words the documents must not use

    assert not FORBIDDEN.search(page)
    index = pd.read_csv(root / "runs_index.csv")
    assert len(index) == 7 and set(index["machine"]) == {"NVIDIA H200", "CPU, 2 cores"}
    assert (root / index["run_json"]).map(Path.exists).all()


def test_committed_page_counts_match_the_committed_runs():
    """results/README.md says as many runs as there are committed run folders."""
    page = (ROOT / "results" / "README.md").read_text()
    runs = results_page.run_folders(ROOT / "results" / "paper")
    if "Generated by `e4srec results-page`" not in page:
        pytest.skip("results/README.md not generated yet")
    assert f"**{len(runs)} runs**" in page
    for link in re.findall(r"\]\((paper/[^)]+)\)", page):
        assert (ROOT / "results" / link).exists(), link
