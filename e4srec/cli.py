"""The ``e4srec`` command: one subcommand per stage (the Snakemake rules call these).

Every subcommand exits non-zero with a one-line message naming the file and the problem on bad
input, and writes its outputs atomically.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .files import InputError, read_json, write_json
from .gpu_slots import DEFAULT_LOCK_DIR

log = logging.getLogger("e4srec")


def _json_arg(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON: {err.msg}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def cmd_fetch(args) -> None:
    from . import data
    from .interactions import InputSpec

    spec = InputSpec.from_dict(args.input, "--input") if args.input is not None else None
    record = data.fetch_dataset(args.dataset, args.out, mirror=args.mirror, path=args.path)
    if spec is not None:  # how `e4srec prepare` reads the file (paper/DATA.md)
        record["input"] = spec.as_record()
    negatives_dir = Path(args.negatives_dir)
    negatives_dir.mkdir(parents=True, exist_ok=True)
    record["negatives"] = None
    if args.negatives == "auto" and not args.path:
        found = data.fetch_negatives(args.dataset, negatives_dir / f"{args.dataset}_sample.txt", args.mirror)
        if found:
            record["negatives"] = {**found, "file": f"{args.dataset}_sample.txt"}
    write_json(args.record, record)
    log.info("%s: sha256 %s (%s)", args.dataset, record["sha256"],
             "verified" if record["checksum_verified"] else "recorded, not checked")


def cmd_prepare(args) -> None:
    from . import data

    raw_record = read_json(args.record)
    negatives = raw_record.get("negatives")
    record = data.prepare(
        args.dataset, args.raw, args.out, raw_record=raw_record, max_len=args.max_len,
        min_interactions=args.min_interactions, short_user_policy=args.short_user_policy,
        subsample=args.subsample, subsample_seed=args.subsample_seed, n_negatives=args.negatives_count,
        negatives_seed=args.negatives_seed,
        negatives_path=Path(args.negatives_dir) / negatives["file"] if negatives else None,
        negatives_record=negatives, source=raw_record.get("input"))
    log.info("%s: %s", args.dataset, record["statistics"])


def cmd_gpu_slot(args) -> int:
    from .gpu_slots import run_on_gpus

    command = args.run[1:] if args.run[:1] == ["--"] else args.run
    return run_on_gpus(command, args.gpus, args.jobs_per_gpu, Path(args.lock_dir))


def cmd_train(args) -> None:
    import torch

    from . import runs

    if args.threads:
        torch.set_num_threads(args.threads)  # small steps slow down 5-15x when threads oversubscribe the cores
    context = {}
    if args.backbone:
        context["backbone_dir"] = args.backbone
    if args.item_embeddings:
        context["item_embeddings"] = args.item_embeddings
    record = runs.run(args.dataset_dir, args.model, args.out, variant=args.variant, seed=args.seed,
                      params=args.params, train_params=args.train_params, ties=args.ties,
                      progress=not args.no_progress, time_backbone=args.time_backbone, **context)
    if record is None:  # not the main process of several: it trained, the main one evaluated and wrote
        return
    test = record["metrics"]["test_full"]
    log.info("%s %s/%s seed %d: test HR@10 %.4f NDCG@10 %.4f", record["dataset"], args.model, args.variant,
             args.seed, test["HR@10"], test["NDCG@10"])


def cmd_metrics(args) -> None:
    from . import tables

    tables.write_metrics(args.runs, args.out)


def cmd_tables(args) -> None:
    from . import tables

    tables.write_paper_tables(args.metrics, args.paper, args.out_dir, datasets=args.datasets,
                              intervals_csv=args.intervals, significance_csv=args.significance, data_dir=args.data_dir)


def cmd_significance(args) -> None:
    from . import significance

    significance.write_significance(args.runs, args.out, args.intervals_out)


def cmd_sparsity(args) -> None:
    from . import analysis

    analysis.write_sparsity(args.runs, args.datasets, args.out, args.figure, models=args.models or None)


def cmd_ablation(args) -> None:
    from . import analysis

    analysis.write_ablation(args.metrics, args.out, args.figure)


def cmd_protocols(args) -> None:
    from . import analysis

    analysis.write_protocols(args.runs, args.out, args.flips_out)


def cmd_headline(args) -> None:
    from .headline import headline_markdown, write_readme

    if args.readme:
        changed = write_readme(args.readme, args.results)
        print(f"{args.readme}: headline table {'rewritten' if changed else 'already up to date'}")
    else:
        tables = Path(args.results) / "tables"
        print(headline_markdown(tables / "table3.csv", tables / "significance.csv"), end="")


def cmd_rebuild(args) -> None:
    """Every table and figure from the run folders present under a results folder (no training)."""
    from . import analysis, efficiency, significance, tables

    root = Path(args.results)
    runs = sorted(str(p.parent) for p in root.glob("runs/*/*/*/seed~*/run.json") if (p.parent / "ranks.parquet").exists())
    if not runs:
        raise InputError(f"{root}: no run folders (runs/DATASET/MODEL/VARIANT/seed~N with run.json and ranks.parquet)")
    from . import audit

    # refuse before writing anything when a run was not made from the prepared data (Figure 4) or item table at hand
    present = [str(root / "data" / d) for d in sorted({Path(r).parts[-4] for r in runs}) if (root / "data" / d).exists()]
    copies = audit.verify_inputs(runs, present)
    log.info("inputs verified: %d runs against %s (%d on a copy prepared elsewhere from the same raw file)",
             len(runs), ", ".join(present) or "no prepared data", len(copies))
    out = root / "tables"
    tables.write_metrics(runs, out / "metrics.csv")
    significance.write_significance(runs, out / "significance.csv", out / "intervals.csv")
    tables.write_paper_tables(out / "metrics.csv", args.paper, out, datasets=args.datasets,
                              intervals_csv=out / "intervals.csv", significance_csv=out / "significance.csv")
    analysis.write_protocols(runs, out / "sampled_vs_full.csv", out / "sampled_vs_full_flips.csv")
    analysis.write_ablation(out / "metrics.csv", out / "figure3_ablation.csv", root / "figures" / "figure3_ablation")
    dataset_dirs = [str(root / "data" / d) for d in {Path(r).parts[-4] for r in runs} if (root / "data" / d).exists()]
    if dataset_dirs:  # Figure 4 needs the prepared datasets (history lengths), which are not committed
        analysis.write_sparsity(runs, dataset_dirs, out / "figure4_sparsity.csv", root / "figures" / "figure4_sparsity")
    elif (out / "figure4_sparsity.csv").exists():  # without them: redrawn from the CSV they once gave
        import pandas as pd

        analysis.plot_sparsity_figures(pd.read_csv(out / "figure4_sparsity.csv"), root / "figures" / "figure4_sparsity")
    if efficiency.e4srec_run_paths(root / "runs"):  # Tables 4 and 5 describe E4SRec's runs
        efficiency.write_table4(root / "runs", out)
        efficiency.write_table5(root / "runs", out)
    if not args.no_page:
        from .results_page import default_page, write_results_page

        write_results_page(root, args.page or default_page(root), args.paper)
    log.info("rebuilt tables from %d runs under %s", len(runs), root)


def cmd_results_page(args) -> None:
    """The results landing page and the runs' index, from the run folders and the tables present."""
    from .results_page import default_page, write_results_page

    write_results_page(args.results, args.page or default_page(args.results), args.paper)


def cmd_audit(args) -> int:
    """Provenance audit of every run folder under a results folder; 1 if any run has a problem."""
    from . import audit

    return 1 if audit.report(args.results) else 0


def cmd_table2(args) -> None:
    from . import tables

    tables.write_table2(args.records, args.paper, args.out)


def cmd_table4(args) -> None:
    from . import efficiency

    efficiency.write_table4(args.runs, args.out_dir, args.paper)


def cmd_table5(args) -> None:
    from . import efficiency

    efficiency.write_table5(args.runs, args.out_dir, args.paper)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="e4srec", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("fetch", help="download (or copy from a mirror) and verify one dataset file")
    p.add_argument("--dataset", required=True, help="known benchmark name or custom name")
    p.add_argument("--out", required=True, help="where the verified file goes")
    p.add_argument("--record", required=True, help="JSON record of source and checksum")
    p.add_argument("--negatives-dir", required=True, help="folder for the S3-Rec negatives file, if reachable")
    p.add_argument("--mirror", help="local folder or URL base holding the files (default: canonical URL)")
    p.add_argument("--path", help="a custom dataset's file (checksum recorded, not checked)")
    p.add_argument("--negatives", choices=["auto", "draw"], default="auto",
                   help="auto: try to download S3-Rec's candidate file; draw: do not")
    p.add_argument("--input", type=_json_arg, default=None,
                   help="a custom dataset's format and log settings, a JSON object (paper/DATA.md), "
                        "kept in the record for `e4srec prepare`")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("prepare", help="validate, subsample, split and fix negatives of one dataset")
    p.add_argument("--dataset", required=True)
    p.add_argument("--raw", required=True, help="the fetched file")
    p.add_argument("--record", required=True, help="its fetch record")
    p.add_argument("--negatives-dir", required=True)
    p.add_argument("--out", required=True, help="output folder (sequences, negatives, dataset.json)")
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--min-interactions", type=int, default=3)
    p.add_argument("--short-user-policy", choices=["drop", "error"], default="drop")
    p.add_argument("--subsample", type=int, default=None, help="keep a seeded sample of this many users")
    p.add_argument("--subsample-seed", type=int, default=0)
    p.add_argument("--negatives-count", type=int, default=99)
    p.add_argument("--negatives-seed", type=int, default=2023)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train and evaluate one model on one dataset (one run folder)")
    p.add_argument("--dataset-dir", required=True, help="prepared dataset folder")
    p.add_argument("--model", required=True, help="POP, BPR, ..., SASRec, ..., E4SRec")
    p.add_argument("--variant", default="default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--params", type=_json_arg, default={}, help="model parameters, a JSON object")
    p.add_argument("--train-params", type=_json_arg, default={}, help="trainer settings, a JSON object")
    p.add_argument("--ties", choices=["pessimistic", "optimistic"], default="pessimistic")
    p.add_argument("--backbone", help="E4SRec: resolved backbone folder")
    p.add_argument("--item-embeddings", help="E4SRec: item embeddings safetensors")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's own choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--time-backbone", action="store_true",
                   help="E4SRec: also time the bare backbone on the same prompts (Table 4), after evaluating")
    cache = p.add_mutually_exclusive_group()
    cache.add_argument("--compile-cache", metavar="DIR",
                       help="torch.compile's FX graph, AOTAutograd, autotuning and Triton caches in DIR, shared by "
                            "runs and processes (e4srec.compile_cache; default: $E4SREC_COMPILE_CACHE, where set, "
                            "else torch's own settings)")
    cache.add_argument("--no-compile-cache", dest="compile_cache", action="store_const", const="",
                       help="switch the FX graph and AOTAutograd caches off (every compile starts from nothing)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("metrics", help="metrics of every run, long form CSV, from the ranks files")
    p.add_argument("--runs", nargs="+", required=True, help="run folders (ranks.parquet + run.json)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_metrics)

    p = sub.add_parser("tables", help="Tables 3 and 6 (CSV, Markdown, LaTeX) beside the paper's values")
    p.add_argument("--metrics", required=True)
    p.add_argument("--paper", required=True, help="paper_targets.tsv")
    p.add_argument("--datasets", nargs="*", help="datasets in table order")
    p.add_argument("--intervals", help="bootstrap intervals CSV (from `e4srec significance`)")
    p.add_argument("--significance", help="significance CSV (from `e4srec significance`)")
    p.add_argument("--data-dir", help="the prepared datasets' folder, for POP's recount in sampled_gaps "
                                      "(default: 'data' beside --out-dir)")
    p.add_argument("--out-dir", required=True)
    p.set_defaults(func=cmd_tables)

    p = sub.add_parser("significance", help="paired tests of E4SRec vs each baseline, bootstrap intervals")
    p.add_argument("--runs", nargs="+", required=True, help="run folders")
    p.add_argument("--out", required=True, help="tests CSV")
    p.add_argument("--intervals-out", required=True, help="intervals CSV")
    p.set_defaults(func=cmd_significance)

    p = sub.add_parser("sparsity", help="Figure 4: metrics per history-length tercile of users")
    p.add_argument("--runs", nargs="+", required=True, help="run folders")
    p.add_argument("--datasets", nargs="+", required=True, help="prepared dataset folders")
    p.add_argument("--models", nargs="*", help="model labels to show (default: all)")
    p.add_argument("--out", required=True, help="CSV")
    p.add_argument("--figure", required=True, help="figure path without suffix (PNG and PDF)")
    p.set_defaults(func=cmd_sparsity)

    p = sub.add_parser("ablation", help="Figure 3: E4SRec's ablation variants beside SASRec")
    p.add_argument("--metrics", required=True, help="metrics CSV (from `e4srec metrics`)")
    p.add_argument("--out", required=True, help="CSV")
    p.add_argument("--figure", required=True, help="figure path without suffix (PNG and PDF)")
    p.set_defaults(func=cmd_ablation)

    p = sub.add_parser("protocols", help="where sampled and full ranking order the models differently")
    p.add_argument("--runs", nargs="+", required=True, help="run folders")
    p.add_argument("--out", required=True, help="per-dataset Kendall tau CSV")
    p.add_argument("--flips-out", required=True, help="flipped model pairs CSV")
    p.set_defaults(func=cmd_protocols)

    p = sub.add_parser("rebuild", help="every table and figure from the committed run folders, no training")
    p.add_argument("results", nargs="?", default="results/paper", help="results folder (default results/paper)")
    p.add_argument("--paper", default="paper/paper_targets.tsv")
    p.add_argument("--datasets", nargs="*", default=["Beauty", "Sports_and_Outdoors", "Toys_and_Games", "Yelp"])
    p.add_argument("--page", help="the landing page to write (default: results/README.md for results/paper, "
                                  "else README.md inside the results folder)")
    p.add_argument("--no-page", action="store_true", help="write no landing page and no runs index")
    p.set_defaults(func=cmd_rebuild)

    p = sub.add_parser("results-page", help="the results landing page and the index of the runs, generated")
    p.add_argument("results", nargs="?", default="results/paper", help="results folder (default results/paper)")
    p.add_argument("--paper", default="paper/paper_targets.tsv")
    p.add_argument("--page", help="page to write (default: results/README.md for results/paper, "
                                  "else README.md inside the results folder)")
    p.set_defaults(func=cmd_results_page)

    p = sub.add_parser("headline", help="the README's headline table from a results folder's Table 3 and tests")
    p.add_argument("results", nargs="?", default="results/paper", help="results folder (default results/paper)")
    p.add_argument("--readme", help="rewrite this file's headline block instead of printing the table")
    p.set_defaults(func=cmd_headline)

    p = sub.add_parser("audit", help="check every run's provenance, validation-based selection, split and negatives")
    p.add_argument("results", nargs="?", default="results/paper", help="results folder (default results/paper)")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("gpu-slot", help="run a command on GPUs of its own (jobs side by side on one machine)",
                       description="Hold GPUS free GPU slots (at most JOBS_PER_GPU jobs share a GPU; file locks "
                                   "under LOCK_DIR) and run COMMAND with CUDA_VISIBLE_DEVICES naming only those "
                                   "GPUs; its exit status. Without a visible GPU, COMMAND runs as it is.")
    p.add_argument("--gpus", type=int, default=1, help="GPUs the command needs (default 1)")
    p.add_argument("--jobs-per-gpu", type=int, default=1, help="jobs that may share one GPU (default 1)")
    p.add_argument("--lock-dir", default=str(DEFAULT_LOCK_DIR), help=f"slot lock files (default {DEFAULT_LOCK_DIR})")
    p.add_argument("run", nargs=argparse.REMAINDER, metavar="-- COMMAND ...", help="the command and its arguments")
    p.set_defaults(func=cmd_gpu_slot)

    p = sub.add_parser("table2", help="Table 2, dataset statistics beside the paper's")
    p.add_argument("--records", nargs="+", required=True, help="dataset.json files")
    p.add_argument("--paper", required=True, help="paper_table2.tsv")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_table2)

    p = sub.add_parser("table4", help="Table 4, E4SRec's efficiency from the run records, beside the paper's")
    p.add_argument("--runs", required=True, help="runs folder (DATASET/MODEL/VARIANT/seed~N/run.json)")
    p.add_argument("--paper", default="paper/paper_table4.tsv")
    p.add_argument("--out-dir", required=True)
    p.set_defaults(func=cmd_table4)

    p = sub.add_parser("table5", help="Table 5, E4SRec's training configuration as run, beside the paper's")
    p.add_argument("--runs", required=True, help="runs folder (DATASET/MODEL/VARIANT/seed~N/run.json)")
    p.add_argument("--paper", default="paper/paper_table5.tsv")
    p.add_argument("--out-dir", required=True)
    p.set_defaults(func=cmd_table5)

    from . import commands  # stages 2 and 4: backbone, instruct, recommend, components-size

    commands.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from . import compile_cache, provenance

    provenance.git_state()  # the commit and dirty flag as the command starts, before it writes any tracked file
    # torch.compile's caches (e4srec.compile_cache): train's --compile-cache/--no-compile-cache, else the
    # workflow's E4SREC_COMPILE_CACHE (a folder; "": off); set before torch is imported, which reads them
    cache = getattr(args, "compile_cache", None)
    cache = os.environ.get(compile_cache.ENVIRONMENT) if cache is None else cache
    if cache is not None:
        compile_cache.configure(cache or None)
    try:
        return args.func(args) or 0
    except (InputError, FileNotFoundError, FloatingPointError) as err:
        print(f"e4srec {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
