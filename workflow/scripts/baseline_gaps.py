#!/usr/bin/env python
"""Every baseline cell of Table 3 (HR@10, NDCG@10, full ranking) more than 10% away from the paper,
with the explanation the committed runs support, or "unexplained".

Reads ``<out>/tables/table3.csv`` (written by ``e4srec rebuild``) and writes
``<out>/tables/baseline_gaps.csv`` and ``.md``. The reasons are tested in this order:

1. ``history masking``: the cell is within tolerance under ``full_masked``. The paper's baseline rows
   come from the S3-Rec/ICLRec code lineage, whose full ranking removes the user's history items.
2. ``Yelp repeats``: ours is higher on Yelp, where the test item is already in the history of 6.7%
   of users (it counts only without masking).
3. ``loss``: GRU4Rec or CL4SRec higher. Ours train with cross-entropy over all items (CL4SRec's own
   paper uses a softmax too), the lineage's code with BCE and one negative. A BCE run of each would
   test this; none was made.
4. ``pretraining``: S3-Rec lower. Ours pretrains with mask-item prediction only (no attributes), as
   the issue asks; the paper's S3-Rec uses all four objectives.
5. ``under-trained in the lineage``: BERT4Rec higher. Its numbers in that lineage are known to be
   under-trained (Petrov and Macdonald, RecSys 2022).

Usage: ``python workflow/scripts/baseline_gaps.py results/paper``
"""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from e4srec import provenance  # noqa: E402
from e4srec.files import write_json, write_text  # noqa: E402

BASELINES = ["POP", "BPR", "GRU4Rec", "Caser", "SASRec", "BERT4Rec", "S3-Rec", "CL4SRec", "ICLRec"]


def reason(row: pd.Series, masked_verdict: str | None) -> str:
    higher = row["verdict"] == "higher than paper"
    if masked_verdict == "reproduced":
        return "history masking"
    if row["dataset"] == "Yelp" and higher:
        return "Yelp repeats"
    if row["model"] in ("GRU4Rec", "CL4SRec") and higher:
        return "loss"
    if row["model"] == "S3-Rec" and not higher:
        return "pretraining"
    if row["model"] == "BERT4Rec" and higher:
        return "under-trained in the lineage"
    return "unexplained"


def main(out: str) -> int:
    tables = Path(out) / "tables"
    table = pd.read_csv(tables / "table3.csv")
    table = table[(table.k == 10) & (table.variant == "default") & table.model.isin(BASELINES)
                  & table.paper_value.notna()]
    key = ["dataset", "model", "metric"]
    masked = table[table.protocol == "full_masked"].set_index(key)
    full = table[(table.protocol == "full") & (table.verdict != "reproduced")].copy()
    full["masked_value"] = [masked.loc[tuple(r[k] for k in key), "value"] for _, r in full.iterrows()]
    full["masked_verdict"] = [masked.loc[tuple(r[k] for k in key), "verdict"] for _, r in full.iterrows()]
    full["reason"] = [reason(r, r["masked_verdict"]) for _, r in full.iterrows()]
    columns = ["dataset", "model", "metric", "seeds", "value", "paper_value", "relative_difference", "verdict",
               "masked_value", "masked_verdict", "reason"]
    full = full[columns].sort_values(["reason", "model", "dataset", "metric"])
    write_text(tables / "baseline_gaps.csv", full.to_csv(index=False, float_format="%.4f"))
    counts = full.reason.value_counts()
    lines = ["# Baseline cells of Table 3 (HR@10, NDCG@10, full ranking) outside the 10% tolerance", "",
             f"{len(full)} of {len(table[table.protocol == 'full'])} cells; reasons (see "
             "workflow/scripts/baseline_gaps.py): " + ", ".join(f"{k} {v}" for k, v in counts.items()), "",
             full.to_markdown(index=False, floatfmt=".4f"), ""]
    write_text(tables / "baseline_gaps.md", "\n".join(lines))
    write_json(tables / "baseline_gaps.provenance.json",
               provenance.record(table="baseline cells of Table 3 outside the tolerance, with reasons",
                                 source=str(tables / "table3.csv"), reasons=dict(counts.items())))
    print("\n".join(lines[:3]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "results/paper"))
