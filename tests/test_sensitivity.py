"""Appendix B's sensitivity study (e4srec/sensitivity.py, workflow/rules/sensitivity.smk): the expansion of
the config into runs, the verdict rules on hand-made per-user ranks, the tables and figures, a tiny real
chunk (per-epoch ranks through the trainer's epoch-end hook), and the workflow's planning of it."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from e4srec import sensitivity as S
from e4srec.files import write_json, write_parquet

ROOT = Path(__file__).resolve().parent.parent

SECTION = {"datasets": ["Beauty"], "seeds": [0, 1, 2], "base": {"params": {"training": "examples"}, "train": {}},
           "lora_alpha": "rank", "epochs_from_one_run": True,
           "packed": {"params": {"training": "packed", "compile_scope": "layers"}, "train": {"group_by_length": True}},
           "factors": {"batch_size": [4, 8, 16, 32, 64, "packed"], "lora_rank": [4, 8, 16, 32, 64],
                       "lora_dropout": [0, 0.05, 0.1, 0.2], "lora_modules": ["gate_up_down", "q_v", "all_linear"],
                       "epochs": [1, 2, 3, 4, 5, 6], "warmup_steps": [0, 50, 100, 200, 400]}}
PROFILE = {"params": {"compile_scope": "step"},
           "train": {"batch_size": 16, "epochs": 3, "warmup_steps": 100, "learning_rate": 3e-4, "patience": 100}}


def resolve(dataset, name, overrides):
    """The profile's settings with the run's over them (what the workflow's variant resolution does)."""
    return {"params": {**PROFILE["params"], **overrides["params"]}, "train": {**PROFILE["train"], **overrides["train"]}}


def with_factors(**changes):
    return {**SECTION, **changes}


# -- the plan ----------------------------------------------------------------------------------------


def test_expansion_one_factor_at_a_time_around_the_base():
    plan = S.expand(SECTION, resolve)["Beauty"]
    chunks = plan["chunks"]
    assert chunks["base"] == ["base"]
    # the reference values (16, 16, 0.05, gate/up/down, 100 warmup) are the base run, not runs of their own
    assert chunks["batch_size"] == ["batch_size~4", "batch_size~8", "batch_size~32", "batch_size~64", "batch_size~packed"]
    assert chunks["lora_rank"] == ["lora_rank~4", "lora_rank~8", "lora_rank~32", "lora_rank~64"]
    assert chunks["lora_dropout"] == ["lora_dropout~0", "lora_dropout~0.1", "lora_dropout~0.2"]
    assert chunks["lora_modules"] == ["lora_modules~q_v", "lora_modules~all_linear"]
    assert chunks["warmup_steps"] == ["warmup_steps~0", "warmup_steps~50", "warmup_steps~200", "warmup_steps~400"]
    assert chunks["epochs"] == ["epochs~6"]  # one 6-epoch run, ranked after every epoch
    assert sum(map(len, chunks.values())) == 20
    runs = plan["runs"]
    base = runs["base"]
    assert base["params"] == {"compile_scope": "step", "training": "examples"} and base["train"] == PROFILE["train"]
    # each point is the base with one setting changed
    assert runs["lora_rank~32"]["params"] == {**base["params"], "lora_r": 32, "lora_alpha": 32}
    assert runs["lora_dropout~0.1"]["params"] == {**base["params"], "lora_dropout": 0.1}
    assert runs["lora_modules~q_v"]["params"]["target_modules"] == ["q_proj", "v_proj"]
    assert len(runs["lora_modules~all_linear"]["params"]["target_modules"]) == 7
    assert runs["batch_size~8"]["train"] == {**base["train"], "batch_size": 8}
    assert runs["batch_size~packed"]["params"] == {"compile_scope": "layers", "training": "packed"}
    assert runs["batch_size~packed"]["train"] == {**base["train"], "group_by_length": True}
    assert runs["warmup_steps~0"]["train"] == {**base["train"], "warmup_steps": 0}
    epochs = runs["epochs~6"]
    assert epochs["epoch_ranks"] and epochs["train"]["epochs"] == 6 and epochs["train"]["patience"] == 100
    assert epochs["values"] == [1, 2, 3, 4, 5, 6]
    assert all(run["params"]["training"] == "examples" for name, run in runs.items() if name != "batch_size~packed")


def test_expansion_options():
    fixed = S.expand(with_factors(lora_alpha=32), resolve)["Beauty"]
    assert fixed["runs"]["lora_rank~4"]["params"]["lora_alpha"] == 32
    assert "lora_rank~16" in fixed["runs"]  # r 16 with alpha 32 is not the base's 16/16
    separate = S.expand(with_factors(epochs_from_one_run=False), resolve)["Beauty"]
    assert separate["chunks"]["epochs"] == ["epochs~1", "epochs~2", "epochs~4", "epochs~5", "epochs~6"]
    assert not separate["runs"]["epochs~4"]["epoch_ranks"]
    low = S.expand(with_factors(), lambda d, n, o: {"params": o["params"], "train": {"epochs": 3, "patience": 2,
                                                                                     **o["train"]}})
    assert low["Beauty"]["runs"]["epochs~6"]["train"]["patience"] == 6  # raised to the count: every epoch trains
    none = S.expand(with_factors(factors={"warmup_steps": [100], "lora_rank": []}), resolve)["Beauty"]
    assert none["chunks"] == {"base": ["base"]}
    with pytest.raises(ValueError, match="unknown factor"):
        S.expand(with_factors(factors={"learning_rate": [1e-3]}), resolve)
    with pytest.raises(ValueError, match="not among datasets"):
        S.workflow_section({**SECTION, "enabled": True, "datasets": ["Yelp"]}, ["Beauty"], True)
    assert S.workflow_section({**SECTION, "enabled": True, "datasets": None}, ["Toys", "Yelp"], True)["datasets"] == ["Toys"]


def test_plan_paths():
    plan = S.expand(with_factors(factors={"warmup_steps": [0, 100]}), resolve)
    assert S.chunk_manifests(plan, "out/sensitivity", [0, 1]) == [
        "out/sensitivity/chunks/Beauty/base/seed~0.json", "out/sensitivity/chunks/Beauty/base/seed~1.json",
        "out/sensitivity/chunks/Beauty/warmup_steps/seed~0.json", "out/sensitivity/chunks/Beauty/warmup_steps/seed~1.json"]
    assert S.run_dirs(plan, "o", [0]) == ["o/runs/Beauty/E4SRec/base/seed~0", "o/runs/Beauty/E4SRec/warmup_steps~0/seed~0"]
    assert [run["name"] for run in S.chunk_runs(plan, "Beauty", "warmup_steps")] == ["warmup_steps~0"]


# -- verdicts on hand-made ranks ---------------------------------------------------------------------

BASE_PARAMS = {"lora_r": 16, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["gate_proj", "up_proj", "down_proj"],
               "training": "examples"}
BASE_TRAIN = {"batch_size": 16, "epochs": 3, "warmup_steps": 100}
GOOD, BAD = 1, 50  # a user's test rank: NDCG@10 1.0 or 0


def ranks_frame(ranks) -> pd.DataFrame:
    ranks = np.asarray(ranks, dtype=np.int32)
    users = np.arange(1, len(ranks) + 1)
    return pd.DataFrame({"user_id": users, **{f"{split}_{protocol}": ranks for split in ("valid", "test")
                                              for protocol in ("full", "full_masked", "sampled")}})


def write_run(root: Path, name: str, seed: int, ranks, factor=None, value=None, values=(), epoch_ranks=None) -> Path:
    """A run folder as train_chunk leaves it (run.json, ranks.parquet, sensitivity.json; per-epoch ranks)."""
    folder = root / "runs" / "D" / "E4SRec" / name / f"seed~{seed}"
    write_parquet(folder / "ranks.parquet", ranks_frame(ranks if epoch_ranks is None else epoch_ranks[-1]))
    for k, epoch in enumerate(epoch_ranks or [], start=1):
        write_parquet(folder / S.EPOCH_RANKS / f"after~{k}.parquet", ranks_frame(epoch))
    write_json(folder / "run.json", {"dataset": "D", "model": "E4SRec", "variant": name, "seed": seed,
                                     "params": BASE_PARAMS, "training": {"config": BASE_TRAIN}})
    write_json(folder / S.SIDECAR, {"factor": factor or S.BASE, "value": value, "values": list(values),
                                    "epoch_ranks": epoch_ranks is not None, "overrides": {}})
    return folder


def rng_ranks(n: int, seed: int, good: float = 0.5) -> np.ndarray:
    return np.where(np.random.default_rng(seed).random(n) < good, GOOD, BAD)


N = 200
REFERENCE = rng_ranks(N, 0)
WORSE = np.full(N, BAD)  # every user loses the target: significant and far beyond the margin
BETTER = np.full(N, GOOD)


def noisy(seed: int, n: int = N) -> np.ndarray:
    """The reference with a few users flipped: neither a significant difference nor equivalent (TOST)."""
    ranks = REFERENCE[:n].copy()
    flip = np.random.default_rng(seed).choice(n, size=max(2, n // 40), replace=False)
    ranks[flip] = np.where(ranks[flip] == GOOD, BAD, GOOD)
    return ranks


def study(tmp_path: Path, points: dict, reference=REFERENCE, epochs=None) -> list[Path]:
    """Run folders: the base (``reference``) and ``points`` {factor: {value: ranks}}; ``epochs``: the
    per-epoch run's ranks after each epoch, 1 to len(epochs)."""
    dirs = [write_run(tmp_path, "base", 0, reference)]
    for factor, values in points.items():
        for value, ranks in values.items():
            dirs.append(write_run(tmp_path, S.point_name(factor, value), 0, ranks, factor, value, list(values)))
    if epochs is not None:
        dirs.append(write_run(tmp_path, f"epochs~{len(epochs)}", 0, None, "epochs", len(epochs),
                              list(range(1, len(epochs) + 1)), epoch_ranks=epochs))
    return dirs


def verdict_of(tmp_path, statement, **study_args) -> str:
    collected = S.collect(study(tmp_path, **study_args))
    frame = S.verdicts(collected, S.significance(collected))
    rows = frame[frame["statement"] == statement]
    assert set(rows["protocol"]) == {"full", "sampled"} and rows["verdict"].nunique() == 1  # same ranks: same verdict
    return rows["verdict"].iloc[0]


@pytest.mark.parametrize("others, expected", [
    ({4: WORSE, 8: WORSE, 32: WORSE, 64: WORSE, "packed": BETTER}, S.HOLDS),  # packed is not a batch size
    ({4: WORSE, 8: WORSE, 32: BETTER}, S.FAILS),
    ({4: WORSE, 8: REFERENCE.copy(), 32: WORSE}, S.INCONCLUSIVE),  # 8 is as good as 16
])
def test_batch_16_is_best(tmp_path, others, expected):
    assert verdict_of(tmp_path, "batch 16 is best", points={"batch_size": others}) == expected


@pytest.mark.parametrize("ranks, expected", [
    ({4: REFERENCE.copy(), 64: REFERENCE.copy()}, S.HOLDS),  # the same ranks: equivalent within any margin
    ({4: REFERENCE.copy(), 64: WORSE}, S.FAILS),
    ({4: noisy(1, 40), 64: noisy(2, 40)}, S.INCONCLUSIVE),  # 40 users, a few flipped: neither shown
])
def test_insensitive_to_lora_rank(tmp_path, ranks, expected):
    reference = REFERENCE[:len(next(iter(ranks.values())))]
    assert verdict_of(tmp_path, "insensitive to LoRA rank/alpha", points={"lora_rank": ranks},
                      reference=reference) == expected


@pytest.mark.parametrize("dropout, modules, expected", [
    ({0.2: WORSE}, {"q_v": WORSE}, S.HOLDS),
    ({0.2: REFERENCE.copy()}, {"q_v": WORSE}, S.FAILS),  # insensitive to dropout
    ({0.2: WORSE}, {"q_v": noisy(3)}, S.INCONCLUSIVE),
])
def test_sensitive_to_dropout_and_modules(tmp_path, dropout, modules, expected):
    assert verdict_of(tmp_path, "sensitive to LoRA dropout and modules",
                      points={"lora_dropout": dropout, "lora_modules": modules}) == expected


@pytest.mark.parametrize("warmup, expected", [
    ({0: WORSE, 400: REFERENCE.copy()}, S.HOLDS),
    ({0: REFERENCE.copy(), 400: REFERENCE.copy()}, S.FAILS),
    ({0: noisy(4), 400: REFERENCE.copy()}, S.INCONCLUSIVE),
])
def test_warmup_matters(tmp_path, warmup, expected):
    assert verdict_of(tmp_path, "warmup matters", points={"warmup_steps": warmup}) == expected


@pytest.mark.parametrize("after, expected", [
    ([WORSE, REFERENCE, BETTER, BETTER, BETTER, BETTER], S.HOLDS),  # 3 epochs reach what 6 reach
    ([WORSE, WORSE, REFERENCE, REFERENCE, REFERENCE, BETTER], S.FAILS),  # the 6th epoch still gains
    ([WORSE, WORSE, REFERENCE, REFERENCE, REFERENCE, noisy(5)], S.INCONCLUSIVE),
    ([WORSE, WORSE, REFERENCE, REFERENCE], S.INCONCLUSIVE),  # no count above 5
])
def test_epochs_suffice(tmp_path, after, expected):
    assert verdict_of(tmp_path, "2-5 epochs suffice", points={}, epochs=after) == expected


def test_paired_tests_and_holm_per_factor(tmp_path):
    collected = S.collect(study(tmp_path, points={"warmup_steps": {0: WORSE, 400: noisy(6)},
                                                  "lora_rank": {4: REFERENCE.copy()}}))
    tests = S.significance(collected)
    full = tests[(tests["protocol"] == "full") & (tests["metric"] == "NDCG")]
    assert set(full["factor"]) == {"warmup_steps", "lora_rank"} and (full["reference"] != full["value"]).all()
    warmup = full[full["factor"] == "warmup_steps"].set_index("value")
    assert warmup.loc["0", "mean_difference"] == pytest.approx(-REFERENCE.__eq__(GOOD).mean())
    # Holm over the factor's two values: the smaller p doubled, the larger at least it
    p = warmup["wilcoxon_p"].sort_values()
    assert warmup.loc[p.index[0], "wilcoxon_p_holm"] == pytest.approx(min(1, 2 * p.iloc[0]))
    assert warmup.loc[p.index[1], "wilcoxon_p_holm"] >= warmup.loc[p.index[0], "wilcoxon_p_holm"]
    rank = full[full["factor"] == "lora_rank"].iloc[0]  # a family of one: unchanged
    assert rank["wilcoxon_p_holm"] == rank["wilcoxon_p"] == 1.0 and rank["equivalence_p"] == 0.0


# -- tables and figures ------------------------------------------------------------------------------


def test_report_tables_and_figures(tmp_path):
    dirs = [write_run(tmp_path, "base", seed, rng_ranks(60, seed)) for seed in (0, 1)]
    dirs += [write_run(tmp_path, f"batch_size~{v}", seed, rng_ranks(60, 10 + seed), "batch_size", v, [4, 16, "packed"])
             for v in (4, "packed") for seed in (0, 1)]
    dirs += [write_run(tmp_path, "epochs~4", seed, None, "epochs", 4, [1, 2, 3, 4],
                       epoch_ranks=[rng_ranks(60, 20 + 4 * seed + k) for k in range(4)]) for seed in (0, 1)]
    out = tmp_path / "report"
    result = S.write_report(dirs, out)
    assert result["factors"] == ["batch_size", "epochs"]
    table = pd.read_csv(out / "tables" / "batch_size.csv")
    assert list(table["value"].astype(str)) == ["4", "16", "packed"]  # numbers in order, packed after them
    assert list(table["reference"]) == [False, True, False] and (table["seeds"] == 2).all()
    per_seed = [float((rng_ranks(60, seed) <= 10).mean()) for seed in (0, 1)]
    reference = table[table["reference"]].iloc[0]
    assert reference["HR@10_full_mean"] == pytest.approx(np.mean(per_seed))
    assert reference["HR@10_full_std"] == pytest.approx(np.std(per_seed, ddof=1), abs=1e-6)
    for column in ("NDCG@10_full_mean", "HR@10_sampled_mean", "NDCG@10_sampled_std"):
        assert column in table
    epochs = pd.read_csv(out / "tables" / "epochs.csv")
    assert list(epochs["value"]) == [1, 2, 3, 4] and list(epochs["reference"]) == [False, False, True, False]
    markdown = (out / "tables" / "batch_size.md").read_text()
    assert "| D | 16* |" in markdown and " ± " in markdown and "sampled-99" in markdown
    verdicts = (out / "tables" / "verdicts.md").read_text()
    for statement, rule in S.RULES.items():
        assert statement in verdicts and rule in verdicts  # each rule written beside the numbers
    frame = pd.read_csv(out / "tables" / "verdicts.csv")
    assert len(frame) == 2 * len(S.RULES) and set(frame["verdict"]) <= {S.HOLDS, S.FAILS, S.INCONCLUSIVE}
    assert len(pd.read_csv(out / "tables" / "significance.csv")) == 2 * 2 * (2 + 3)  # protocols x metrics x values
    for factor in ("batch_size", "epochs"):
        for suffix in (".png", ".pdf"):
            assert (out / "figures" / f"{factor}{suffix}").stat().st_size > 1000
    assert not [p for p in out.rglob(".*") if p.is_file()]  # atomic writes leave no temporary files


# -- a tiny real chunk -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny_llm import write_item_embeddings, write_tiny_backbone, write_tiny_dataset

    root = tmp_path_factory.mktemp("sensitivity")
    return {"root": root, "backbone": write_tiny_backbone(root / "backbone"),
            "items": write_item_embeddings(root / "items.safetensors", 30),
            "data": write_tiny_dataset(root / "data" / "tiny", n_items=30)}


TINY_PROFILE = {"params": {"lora_r": 4, "lora_alpha": 4, "compile": "never"},
                "train": {"epochs": 2, "batch_size": 8, "max_steps_per_epoch": 3, "learning_rate": 1e-3,
                          "eval_batch_size": 16, "device": "cpu", "warmup_steps": 2}}


def tiny_resolve(dataset, name, overrides):
    return {"params": {**TINY_PROFILE["params"], **overrides["params"]},
            "train": {**TINY_PROFILE["train"], **overrides["train"]}}


def test_chunk_trains_ranks_after_every_epoch_and_resumes(tiny):
    from e4srec import runs, trainer

    section = {**SECTION, "datasets": ["tiny"], "base": {"params": {}, "train": {}},
               "factors": {"epochs": [1, 2, 3], "warmup_steps": [0, 2]}}
    plan = S.expand(section, tiny_resolve)
    assert plan["tiny"]["chunks"] == {"base": ["base"], "epochs": ["epochs~3"], "warmup_steps": ["warmup_steps~0"]}
    runs_dir = tiny["root"] / "out" / "runs" / "tiny" / "E4SRec"
    manifest = tiny["root"] / "out" / "chunks" / "epochs.json"
    kwargs = dict(dataset_dir=tiny["data"], backbone=tiny["backbone"], item_embeddings=tiny["items"],
                  runs_dir=runs_dir, seed=0)
    result = S.train_chunk(S.chunk_runs(plan, "tiny", "epochs"), manifest=manifest, chunk="epochs", **kwargs)
    assert trainer.EPOCH_END_HOOKS == []  # the hook is gone once the run is over
    folder = runs_dir / "epochs~3" / "seed~0"
    assert result["runs"][0]["epoch_ranks"] == ["after~1.parquet", "after~2.parquet", "after~3.parquet"]
    assert json.loads(manifest.read_text())["runs"][0]["dir"] == str(folder)
    record = json.loads((folder / "run.json").read_text())
    assert [e["epoch"] for e in record["training"]["epochs"]] == [0, 1, 2]
    # the selected epoch's ranks are the run's ranks: the hook ranked the model as that epoch left it
    best = pd.read_parquet(folder / S.EPOCH_RANKS / f"after~{record['training']['best_epoch'] + 1}.parquet")
    pd.testing.assert_frame_equal(best, pd.read_parquet(folder / "ranks.parquet"))
    # ranking after every epoch changes no weights: the same run without the hook ranks the same
    run = plan["tiny"]["runs"]["epochs~3"]
    runs.run(tiny["data"], "E4SRec", tiny["root"] / "plain", variant="epochs~3", seed=0, params=run["params"],
             train_params=run["train"], progress=False, backbone_dir=str(tiny["backbone"]),
             item_embeddings=str(tiny["items"]))
    pd.testing.assert_frame_equal(pd.read_parquet(tiny["root"] / "plain" / "ranks.parquet"),
                                  pd.read_parquet(folder / "ranks.parquet"))
    # a rerun skips the finished run; other settings train it again
    written = (folder / "run.json").stat().st_mtime_ns
    S.train_chunk(S.chunk_runs(plan, "tiny", "epochs"), **kwargs)
    assert (folder / "run.json").stat().st_mtime_ns == written
    assert not S.finished(folder, {**run, "train": {**run["train"], "learning_rate": 5e-4}}, 0)
    assert not S.finished(folder, run, 1)
    # the report reads the per-epoch run, the base and the warmup point
    for chunk in ("base", "warmup_steps"):
        S.train_chunk(S.chunk_runs(plan, "tiny", chunk), **kwargs)
    report = S.write_report(S.run_dirs(plan, str(tiny["root"] / "out"), [0]), tiny["root"] / "out")
    assert report["factors"] == ["epochs", "warmup_steps"]
    epochs = pd.read_csv(tiny["root"] / "out" / "tables" / "epochs.csv")
    assert list(epochs["value"]) == [1, 2, 3] and list(epochs["reference"]) == [False, True, False]


# -- the workflow ------------------------------------------------------------------------------------


def dry_run(tmp_path, *configs, target="sensitivity") -> str:
    result = subprocess.run([sys.executable, "-m", "snakemake", "--nolock", "-n", "-p", "--configfile", *configs,
                             "--config", f"out={tmp_path}/results", f"resources={tmp_path}/resources", "--", target],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def planned(stdout: str, rule: str) -> int:
    match = re.search(rf"^{rule}\s+(\d+)$", stdout, flags=re.M)
    return int(match.group(1)) if match else 0


def test_workflow_plans_the_study_only_with_the_overlay(tmp_path):
    overlay = tmp_path / "sensitivity.yaml"
    overlay.write_text("sensitivity:\n  enabled: true\n  datasets: [TinyA]\n  seeds: [0, 1]\n"
                       "  factors: {batch_size: [4, 8, packed], lora_rank: [], lora_dropout: [0.05, 0.1],"
                       " lora_modules: [], epochs: [1, 2, 3], warmup_steps: []}\n")
    stdout = dry_run(tmp_path, ".test/config.yaml", str(overlay))
    # base, batch_size (4, packed; 8 is the profile's), lora_dropout (0.1), epochs: 4 chunks x 2 seeds
    assert planned(stdout, "train_sensitivity") == 8 and planned(stdout, "sensitivity_report") == 1
    commands = re.findall(r"python -m e4srec\.sensitivity train .*", stdout)
    batch = next(c for c in commands if "--chunk batch_size " in c and "--seed 0 " in c)
    names = [run["name"] for run in json.loads(re.search(r"--runs '(.*?)'", batch).group(1))]
    assert names == ["batch_size~4", "batch_size~packed"]
    assert f"--runs-dir {tmp_path}/results/sensitivity/runs/TinyA/E4SRec" in batch
    assert f"{tmp_path}/results/runs/TinyA/SASRec/default/seed~0/item_embeddings.safetensors" in batch
    assert planned(stdout, "train_e4srec") == 0  # the study needs neither the full model nor `all`

    default = dry_run(tmp_path, ".test/config.yaml", target="all")
    assert planned(default, "train_sensitivity") == 0 and "sensitivity" not in re.findall(r"^rule (\w+):", default, re.M)
    assert planned(dry_run(tmp_path, ".test/config.yaml"), "train_sensitivity") == 0  # the target is empty while off
    with_overlay_all = dry_run(tmp_path, ".test/config.yaml", str(overlay), target="all")
    assert planned(with_overlay_all, "train_sensitivity") == 0  # never part of `all`

    paper = dry_run(tmp_path, "config/config.yaml", "config/sensitivity.yaml")
    assert planned(paper, "train_sensitivity") == 7 * 3  # Beauty: base and six factors, three seeds
    assert "/sensitivity/runs/Beauty/E4SRec" in paper
