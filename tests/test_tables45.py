"""Tables 4 (efficiency) and 5 (configuration as run), from fake run records and the committed runs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from e4srec import efficiency
from e4srec.cli import main
from e4srec.files import InputError

ROOT = Path(__file__).resolve().parent.parent
PAPER4 = ROOT / "paper" / "paper_table4.tsv"
PAPER5 = ROOT / "paper" / "paper_table5.tsv"
COMMITTED_RUNS = ROOT / "results" / "paper" / "runs"


def e4srec_record(dataset: str = "Beauty", seed: int = 0) -> dict:
    """A run.json shaped like a real E4SRec one, with round numbers (Table 5's Beauty settings)."""
    lora = {"lora_r": 16, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["gate_proj", "up_proj", "down_proj"]}
    return {
        "dataset": dataset, "model": "E4SRec", "variant": "default", "seed": seed,
        "git": {"commit": "a" * 40, "dirty": False},
        "machine": {"gpus": ["NVIDIA H200"], "cpu_count": 16},
        "backbone": {"architecture": "LlamaForCausalLM", "dtype": "bfloat16", "parameters": 1000,
                     "weights_bytes": 10**9, "source": "instruction-tuned /tmp/embedded",
                     "parent": {"source": "embedded"},
                     "instruction_tuning": {"params": {"epochs": 1, "batch_size": 16, "learning_rate": 3e-4,
                                                       "warmup_steps": 0, "weight_decay": 0.0, **lora},
                                            "data": {"path": "/tmp/x/instructions.json", "records": 10, "trained": 9}}},
        "components": {"config": {**lora, "load_in": "none"},
                       "size_bytes": {"adapter": 2 * 10**6, "projections": 7 * 10**6, "item_embeddings": 10**6,
                                      "total": 10**7}},
        "trainable_parameters": 50,
        "training": {"device": "cuda", "train_seconds": 70.0,
                     "config": {"epochs": 3, "batch_size": 16, "learning_rate": 0.0003, "warmup_steps": 100,
                                "weight_decay": 0.1, "scheduler": "cosine"},
                     "epochs": [{"epoch": i, "examples": 120, "seconds": s} for i, s in enumerate([30.0, 10.0, 14.0, 12.0])]},
        "evaluation": {"seconds": 20.0, "users": 100},
    }


def sasrec_record(dataset: str = "Beauty") -> dict:
    return {"dataset": dataset, "model": "SASRec", "variant": "default", "seed": 0,
            "git": {"commit": "b" * 40, "dirty": True}, "machine": {"cpu_count": 2},
            "training": {"device": "cpu", "epochs": [{"epoch": i, "examples": 100, "seconds": s}
                                                     for i, s in enumerate([3.0, 1.0, 2.0])]}}


def write_run(runs: Path, record: dict) -> Path:
    path = runs / record["dataset"] / record["model"] / record["variant"] / f"seed~{record['seed']}" / "run.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return path


def values(frame) -> tuple[dict, dict]:
    """Ours and the paper's value by quantity, of a one-run Table 4."""
    return dict(zip(frame["quantity"], frame["value"])), dict(zip(frame["quantity"], frame["paper_value"]))


def test_table4_quantities(tmp_path):
    write_run(tmp_path, e4srec_record())
    write_run(tmp_path, sasrec_record())
    ours, paper = values(efficiency.table4(tmp_path, PAPER4))
    assert ours["machine"] == "NVIDIA H200" and paper["machine"] == "A800"
    assert ours["first epoch (s, includes compilation)"] == 30.0
    assert ours["later epochs, median (s)"] == 12.0  # the first epoch is left out of the median
    assert ours["training rows per second, later epochs (median)"] == 10.0
    assert ours["training layout"] == "examples"
    assert ours["SASRec later epochs, median (s)"] == 1.5
    assert ours["SASRec machine"] == "CPU (2 cores)"
    assert ours["evaluation users per second"] == 5.0
    assert ours["evaluation s per ranked instance"] == pytest.approx(0.1)  # valid + test per user
    assert paper["evaluation s per ranked instance"] == 0.23
    assert ours["trainable / backbone parameters"] == pytest.approx(0.05)
    assert paper["trainable / backbone parameters"] == 0.01
    assert ours["components / backbone weights"] == pytest.approx(0.01)
    assert paper["components / backbone weights"] == pytest.approx(0.11 / 12.12)
    assert ours["100 datasets on one backbone (x backbone)"] == pytest.approx(2.0)
    assert paper["100 datasets on one backbone (x backbone)"] == 2.0
    assert ours["100 datasets, a tuned backbone each (x backbone)"] == pytest.approx(101.0)
    assert ours["components: adapter / projections / item table (MB)"] == "2 / 7 / 1"
    # records that predate the token count, the peak memory and the bare backbone: empty cells
    for quantity in ("training tokens per second, later epochs (median)", "peak memory in training (GiB)",
                     "bare backbone forward, users per second", "E4SRec / bare backbone, s per instance"):
        assert ours[quantity] is None
    assert paper["bare backbone forward, s per instance"] == 0.21
    assert paper["E4SRec / bare backbone, s per instance"] == pytest.approx(0.23 / 0.21)


def test_table4_tokens_memory_and_bare_backbone(tmp_path):
    record = e4srec_record()
    for epoch in record["training"]["epochs"]:
        epoch["tokens"] = 6000  # 500, 600 (median), 428.6 tokens/s after the first epoch
    record["training"]["peak_memory_mb"] = 2048.0
    record["evaluation"]["bare_backbone"] = {"seconds": 5.0, "users": 100, "users_per_second": 20.0}
    write_run(tmp_path, record)
    ours, _ = values(efficiency.table4(tmp_path, PAPER4))
    assert ours["training tokens per second, later epochs (median)"] == pytest.approx(500.0)
    assert ours["peak memory in training (GiB)"] == 2.0
    assert ours["bare backbone forward, users per second"] == 20.0
    assert ours["bare backbone forward, s per instance"] == pytest.approx(0.05)
    assert ours["E4SRec / bare backbone, s per instance"] == pytest.approx(0.1 / 0.05)


def test_table4_without_the_reference_baseline(tmp_path):
    write_run(tmp_path, e4srec_record())
    ours, _ = values(efficiency.table4(tmp_path, PAPER4))
    assert ours["SASRec later epochs, median (s)"] is None and ours["SASRec machine"] is None


def test_table4_has_a_section_per_configuration_variant(tmp_path):
    """paper-batch (the full model trained at the paper's batch) gets its own columns and section after
    the default's; Figure 3's ablations (no-llm) get none."""
    write_run(tmp_path, e4srec_record())
    for variant, epoch_seconds in (("paper-batch", 40.0), ("no-llm", 1.0)):
        record = e4srec_record()
        record["variant"] = variant
        for epoch in record["training"]["epochs"]:
            epoch["seconds"] = epoch_seconds
        write_run(tmp_path, record)
    frame = efficiency.table4(tmp_path, PAPER4)
    assert list(dict.fromkeys(frame["variant"])) == ["default", "paper-batch"]
    median = frame[frame["quantity"] == "later epochs, median (s)"].set_index("variant")["value"]
    assert median.to_dict() == {"default": 12.0, "paper-batch": 40.0}
    out = tmp_path / "tables"
    efficiency.write_table4(tmp_path, out, PAPER4)
    markdown = (out / "table4.md").read_text()
    assert markdown.index("## E4SRec (default)\n") < markdown.index("## E4SRec (paper-batch)\n") \
        < markdown.index("## The paper's Table 4")
    assert "no-llm" not in markdown and "% E4SRec (paper-batch)" in (out / "table4.tex").read_text()
    assert len(json.loads((out / "table4.provenance.json").read_text())["runs"]) == 2


def test_table5_flags_each_setting_against_the_paper(tmp_path):
    record = e4srec_record()
    record["training"]["config"]["batch_size"] = 64
    write_run(tmp_path, record)
    frame = efficiency.table5(tmp_path, PAPER5).set_index("setting")
    assert frame.loc["batch size", ["value", "paper_value", "same_as_paper"]].tolist() == ["64", "16", "no"]
    assert frame.loc["learning rate", "same_as_paper"] == "yes"  # 0.0003 against 3e-4 printed as 0.0003
    assert frame.loc["LoRA target modules", "same_as_paper"] == "yes"  # order differs, same modules
    assert frame.loc["backbone", "same_as_paper"] == "no"
    assert frame.loc["instruction tuning", "value"] == "yes"
    assert frame.loc["seeds", ["value", "same_as_paper"]].tolist() == ["0", "n/a"]
    assert frame.loc["training layout", ["value", "same_as_paper"]].tolist() == ["examples", "yes"]


def test_table5_counts_a_packed_batch_in_users(tmp_path):
    """A packed run's batch of 16 users is not the paper's 16 examples: both rows say so."""
    record = e4srec_record()
    record.setdefault("params", {})["training"] = "packed"
    write_run(tmp_path, record)
    frame = efficiency.table5(tmp_path, PAPER5).set_index("setting")
    assert frame.loc["training layout", ["value", "paper_value", "same_as_paper"]].tolist() == ["packed", "examples", "no"]
    assert frame.loc["batch size", ["value", "same_as_paper"]].tolist() == ["16 users", "no"]
    ours, _ = values(efficiency.table4(tmp_path, PAPER4))
    assert ours["training layout"] == "packed"


def test_table5_shows_configuration_variants_not_ablations(tmp_path):
    """A variant that trains the full model another way (paper-batch) gets rows of its own, and a
    section in the Markdown; Figure 3's ablations (no-llm) do not."""
    packed = e4srec_record()
    packed.setdefault("params", {})["training"] = "packed"
    write_run(tmp_path, packed)
    for variant in ("paper-batch", "no-llm"):
        record = e4srec_record()
        record["variant"] = variant
        write_run(tmp_path, record)
    frame = efficiency.table5(tmp_path, PAPER5)
    assert list(dict.fromkeys(frame["variant"])) == ["default", "paper-batch"]
    layout = frame[frame["setting"] == "training layout"].set_index("variant")
    assert layout.loc["default", "same_as_paper"] == "no" and layout.loc["paper-batch", "same_as_paper"] == "yes"
    out = tmp_path / "tables"
    efficiency.write_table5(tmp_path, out, PAPER5)
    markdown = (out / "table5.md").read_text()
    assert "## Beauty\n" in markdown and "## Beauty, variant paper-batch\n" in markdown and "no-llm" not in markdown
    provenance = json.loads((out / "table5.provenance.json").read_text())
    assert len(provenance["runs"]) == 2


def test_table5_needs_the_seeds_of_a_dataset_to_agree(tmp_path):
    write_run(tmp_path, e4srec_record(seed=0))
    other = e4srec_record(seed=1)
    other["training"]["config"]["learning_rate"] = 0.001
    path = write_run(tmp_path, other)
    with pytest.raises(InputError, match="learning rate") as err:
        efficiency.table5(tmp_path, PAPER5)
    assert str(path) in str(err.value)


def test_a_missing_key_names_the_file_and_the_key(tmp_path):
    record = e4srec_record()
    del record["training"]["config"]["batch_size"]
    path = write_run(tmp_path, record)
    with pytest.raises(InputError, match="training.config.batch_size") as err:
        efficiency.table5(tmp_path, PAPER5)
    assert str(path) in str(err.value)


def test_no_e4srec_run_is_a_clear_error(tmp_path, capsys):
    write_run(tmp_path, sasrec_record())  # baselines alone
    with pytest.raises(InputError, match="no E4SRec run records"):
        efficiency.table4(tmp_path, PAPER4)
    assert main(["table5", "--runs", str(tmp_path), "--paper", str(PAPER5), "--out-dir", str(tmp_path / "t")]) == 2
    assert "no E4SRec run records" in capsys.readouterr().err


def test_cli_writes_tables_with_provenance(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "tables"
    e4srec_path = write_run(runs, e4srec_record())
    sasrec_path = write_run(runs, sasrec_record())
    for table, paper in (("table4", PAPER4), ("table5", PAPER5)):
        assert main([table, "--runs", str(runs), "--paper", str(paper), "--out-dir", str(out)]) == 0
        assert all((out / f"{table}{suffix}").is_file() for suffix in (".csv", ".md", ".tex"))
    used = json.loads((out / "table4.provenance.json").read_text())["runs"]
    assert {(u["run_record"], u["commit"]) for u in used} == {(str(e4srec_path), "a" * 40), (str(sasrec_path), "b" * 40)}
    assert "may have been shared" in (out / "table4.md").read_text()  # the caption: times are upper bounds
    assert "| batch size" in (out / "table5.md").read_text()


def test_committed_runs_show_how_each_dataset_trained():
    """The committed E4SRec runs: Beauty and Yelp packed at 16 users (3 seeds); paper-batch as Table 5
    trains, one prompt per example, 16 examples a batch (3 seeds on every dataset)."""
    frame = efficiency.table5(COMMITTED_RUNS, PAPER5).set_index(["variant", "dataset", "setting"])
    packed = frame.loc["default"]
    assert packed.loc[("Beauty", "batch size"), ["value", "paper_value", "same_as_paper"]].tolist() == ["16 users", "16", "no"]
    assert packed.loc[("Beauty", "training layout"), "value"] == "packed"
    assert packed.loc[("Beauty", "seeds"), "value"] == "0, 1, 2"
    assert packed.loc[("Yelp", "batch size"), "value"] == "16 users" and packed.loc[("Yelp", "training layout"), "value"] == "packed"
    paper_batch = frame.loc["paper-batch"]
    datasets = ("Beauty", "Sports_and_Outdoors", "Toys_and_Games", "Yelp")
    assert set(paper_batch.index.get_level_values("dataset")) == set(datasets)
    for dataset in datasets:
        for setting in ("training layout", "batch size", "epochs", "learning rate", "warmup steps"):
            assert paper_batch.loc[(dataset, setting), "same_as_paper"] == "yes", (dataset, setting)
        assert paper_batch.loc[(dataset, "seeds"), "value"] == "0, 1, 2"


def test_baseline_gaps_give_each_missed_cell_its_first_reason():
    """Cells outside the tolerance get the first reason they meet (masking first); reproduced ones none."""
    from e4srec import tables

    def cell(dataset, model, protocol, verdict, metric="HR"):
        return {"dataset": dataset, "model": model, "variant": "default", "protocol": protocol, "metric": metric,
                "k": 10, "value": 0.05, "seeds": 3, "paper_value": 0.04, "relative_difference": 0.25,
                "verdict": verdict}

    rows = [cell("Beauty", "ICLRec", "full", "lower than paper"), cell("Beauty", "ICLRec", "full_masked", "reproduced"),
            cell("Yelp", "BPR", "full", "higher than paper"), cell("Yelp", "BPR", "full_masked", "higher than paper"),
            cell("Toys_and_Games", "CL4SRec", "full", "higher than paper"),
            cell("Toys_and_Games", "CL4SRec", "full_masked", "higher than paper"),
            cell("Beauty", "S3-Rec", "full", "lower than paper"), cell("Beauty", "S3-Rec", "full_masked", "lower than paper"),
            cell("Beauty", "Caser", "full", "lower than paper"), cell("Beauty", "Caser", "full_masked", "lower than paper"),
            cell("Beauty", "SASRec", "full", "reproduced"), cell("Beauty", "SASRec", "full_masked", "reproduced"),
            cell("Beauty", "E4SRec", "full", "lower than paper"), cell("Beauty", "E4SRec", "full_masked", "lower than paper"),
            cell("Toys_and_Games", "SASRec", "full", "lower than paper"),
            cell("Toys_and_Games", "SASRec", "full_masked", "lower than paper"),
            {**cell("Toys_and_Games", "SASRec", "full_masked", None), "variant": "long", "value": 0.041,
             "paper_value": float("nan")}]  # the long variant reaches the default's paper value under masking
    gaps = tables.baseline_gaps(pd.DataFrame(rows))
    assert gaps.set_index(["dataset", "model"])["reason"].to_dict() == {
        ("Beauty", "ICLRec"): "history masking", ("Yelp", "BPR"): "Yelp repeats", ("Toys_and_Games", "CL4SRec"): "loss",
        ("Beauty", "S3-Rec"): "pretraining", ("Beauty", "Caser"): "unexplained",
        ("Toys_and_Games", "SASRec"): "early stopping"}  # Beauty SASRec is reproduced; E4SRec is not a baseline
    long = gaps.set_index(["dataset", "model"]).loc[("Toys_and_Games", "SASRec")]
    assert long.long_masked_value == 0.041 and pd.isna(long.long_value)


def test_paper_row_consistency_and_its_gap_reason():
    """One ranking bounds NDCG@10 - NDCG@5 by (HR@10 - HR@5)/log2(11) and /log2(7) (and likewise at 5 and 20);
    a paper row outside the bounds marks its missed cells "paper row inconsistent"."""
    from e4srec import tables

    ranks = np.array([1, 3, 6, 8, 12, 15, 30, 40, 60, 100])  # one real ranking
    real = {(metric, k): float(np.mean(np.where(ranks <= k, 1.0 if metric == "HR" else 1 / np.log2(ranks + 1), 0)))
            for metric in ("HR", "NDCG") for k in (5, 10, 20)}
    assert tables.paper_row_consistent({key: round(value, 4) for key, value in real.items()})
    assert not tables.paper_row_consistent({**real, ("NDCG", 10): real["NDCG", 10] + 0.01})  # too much from ranks 6-10
    assert not tables.paper_row_consistent({**real, ("HR", 5): 0.9})  # NDCG@5 below HR@5 / log2(6)
    assert tables.paper_row_consistent({("HR", 10): 0.1})  # incomplete rows are not judged
    rows = [{"dataset": "Beauty", "model": "BPR", "variant": "default", "protocol": protocol, "metric": metric, "k": k,
             "value": 0.05, "seeds": 3, "paper_value": real[metric, k] + (0.01 if (metric, k) == ("NDCG", 10) else 0),
             "relative_difference": 0.5, "verdict": "lower than paper"}
            for protocol in ("full", "full_masked") for metric in ("HR", "NDCG") for k in (5, 10, 20)]
    gaps = tables.baseline_gaps(pd.DataFrame(rows))
    assert gaps.reason.tolist() == ["paper row inconsistent"] * 2 and not gaps.paper_consistent.any()
