"""The Snakemake workflow: lint-clean, the root Snakefile plans jobs, and the .test profile runs
end to end offline (every target, tiny data) into a temporary folder."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent


def snakemake(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    # --nolock: these runs write only into temporary folders, so they may run beside a real one.
    return subprocess.run([sys.executable, "-m", "snakemake", "--nolock", *args], cwd=cwd, capture_output=True, text=True)


def test_lint_is_clean():
    result = snakemake("--lint", "--configfile", ".test/config.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Lints for" not in result.stdout + result.stderr


def test_root_snakefile_plans_every_stage(tmp_path):
    """The include trap: a root Snakefile that only includes would plan nothing."""
    result = snakemake("-n", "--configfile", ".test/config.yaml", "--config", f"out={tmp_path}/results",
                       f"resources={tmp_path}/resources")
    assert result.returncode == 0, result.stderr
    for rule in ("fetch_dataset", "prepare_dataset", "train_baseline", "metrics", "paper_tables", "table2"):
        assert rule in result.stdout, f"{rule} not planned:\n{result.stdout}"


def test_unknown_config_key_is_a_schema_error(tmp_path):
    result = snakemake("-n", "--configfile", ".test/config.yaml", "--config", "max_lenn=3")
    assert result.returncode != 0
    assert "max_lenn" in result.stderr + result.stdout


def test_wrong_type_is_a_schema_error():
    result = snakemake("-n", "--configfile", ".test/config.yaml", "--config", "max_len=abc")
    assert result.returncode != 0
    assert "max_len" in result.stderr + result.stdout


def test_unknown_dataset_is_an_error():
    result = snakemake("-n", "--configfile", ".test/config.yaml", "--config", "datasets=[Nope]")
    assert result.returncode != 0
    assert "Nope" in result.stderr + result.stdout


@pytest.mark.slow
def test_test_profile_runs_end_to_end(tmp_path):
    out = tmp_path / "results"
    result = snakemake("--cores", "2", "--configfile", ".test/config.yaml", "--config", f"out={out}",
                       f"resources={tmp_path}/resources", "-q")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for table in ("table2", "table3", "table6"):
        frame = pd.read_csv(out / "tables" / f"{table}.csv")
        assert len(frame) > 0
    table3 = pd.read_csv(out / "tables" / "table3.csv")
    assert set(table3["dataset"]) == {"TinyA", "TinyB"}
    assert set(table3["protocol"]) == {"full", "full_masked"}
    assert table3["value"].between(0, 1).all()
    # Nothing left to do: a second run plans no job.
    again = snakemake("-n", "--configfile", ".test/config.yaml", "--config", f"out={out}",
                      f"resources={tmp_path}/resources")
    assert "Nothing to be done" in again.stdout + again.stderr


def test_slurm_profile_plans_gpu_jobs(tmp_path):
    """The SLURM workflow profile parses and gives training rules a GPU (dry run, no cluster)."""
    pytest.importorskip("snakemake_executor_plugin_slurm")
    result = snakemake("-n", "--workflow-profile", "workflow/profiles/slurm", "--configfile", ".test/config.yaml",
                       "--config", f"out={tmp_path}/results", f"resources={tmp_path}/resources")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "slurm_extra=--gres=gpu:1" in result.stdout


TRAINING_RULES = {"train_baseline", "train_embedding_baseline", "train_e4srec"}


def planned_training_jobs(stdout: str) -> list[tuple[str, str, str]]:
    """(rule, resources line, shell command) of every planned training job of a dry run with -p."""
    jobs = re.findall(r"^rule (\w+):\n(.*?)^Shell command: (.*?)$", stdout, flags=re.M | re.S)
    return [(rule, re.search(r"resources: (.*)", body).group(1), command)
            for rule, body, command in jobs if rule in TRAINING_RULES]


@pytest.mark.parametrize("gpus, jobs_per_gpu", [(1, 1), (2, 1), (1, 3)])
def test_gpus_per_job_launches_data_parallel_training(tmp_path, gpus, jobs_per_gpu):
    """gpus_per_job: N > 1 runs every training job through `accelerate launch` over N processes and asks
    for N GPUs; 1 (the default) keeps the one-process `e4srec train` and one GPU. Either way the job runs
    under `e4srec gpu-slot`, which gives it GPUs of its own, at most jobs_per_gpu jobs a GPU (dry run)."""
    result = snakemake("-n", "-p", "--configfile", ".test/config.yaml", "--config", f"out={tmp_path}/results",
                       f"resources={tmp_path}/resources", "device=cuda", f"gpus_per_job={gpus}",
                       f"jobs_per_gpu={jobs_per_gpu}")
    assert result.returncode == 0, result.stderr[-2000:]
    jobs = planned_training_jobs(result.stdout)
    assert {rule for rule, _, _ in jobs} == TRAINING_RULES
    slot = f"e4srec gpu-slot --gpus {gpus} --jobs-per-gpu {jobs_per_gpu} -- "
    launch = ("accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no "
              "--dynamo_backend no --main_process_port 0 -m e4srec.cli train --dataset-dir ")
    for rule, resources, command in jobs:
        assert command.startswith(slot + (launch if gpus > 1 else "e4srec train --dataset-dir ")), (rule, command)
        assert f"gpu={gpus}" in resources.split(", "), (rule, resources)
    assert re.search(rf"^Shell command: {re.escape(slot.replace(f'--gpus {gpus}', '--gpus 1'))}e4srec instruct ",
                     result.stdout, flags=re.M)


def test_cpu_profiles_run_commands_as_they_are(tmp_path):
    """With device: cpu no job goes through `e4srec gpu-slot` (dry run)."""
    result = snakemake("-n", "-p", "--configfile", ".test/config.yaml", "--config", f"out={tmp_path}/results",
                       f"resources={tmp_path}/resources")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "gpu-slot" not in result.stdout and "e4srec train --dataset-dir" in result.stdout


def planned_with(tmp_path, extra_config: str) -> list[str]:
    """Shell commands of the training jobs that a dry run of .test plus ``extra_config`` (YAML) plans."""
    config = tmp_path / "extra.yaml"
    config.write_text(extra_config)
    result = snakemake("-n", "-p", "--configfile", ".test/config.yaml", str(config), "--config",
                       f"out={tmp_path}/results", f"resources={tmp_path}/resources")
    assert result.returncode == 0, result.stderr[-2000:]
    return [command for _, _, command in planned_training_jobs(result.stdout)]


def json_argument(command: str, flag: str) -> dict:
    """The JSON value of ``--params`` or ``--train-params`` in a planned command."""
    return json.loads(re.search(rf"{flag} '(.*?)'", command).group(1))


def test_variant_train_settings_and_ablation_seeds(tmp_path):
    """A variant's "train" entry reaches its runs' training settings, not its model parameters; and
    every ablation runs with each of ablation_seeds (dry run)."""
    commands = planned_with(tmp_path, "baselines:\n  variants:\n    SASRec: {long: {train: {epochs: 7, learning_rate: 0.005}, "
                            "loss: ce}}\ne4srec:\n  ablation_seeds: [0, 1]\n  ablations: [no-llm]\n")
    long = [c for c in commands if "--model SASRec --variant long" in c]
    default = [c for c in commands if "--model SASRec --variant default" in c]
    assert len(long) == 2 and len(default) == 2  # TinyA, TinyB
    for command in long:
        params = json_argument(command, "--params")
        train = json_argument(command, "--train-params")
        assert params == {"loss": "ce"} and train["learning_rate"] == 0.005
        assert train["epochs"] == 3  # the profile's train settings still cap the variant's
    assert all(json_argument(c, "--train-params")["learning_rate"] == 0.001
               for c in default)
    ablations = {re.search(r"--seed (\d+)", c).group(1) for c in commands if "--variant no-llm" in c}
    assert ablations == {"0", "1"}


def test_e4srec_variants_run_every_seed_with_their_settings(tmp_path):
    """A configured E4SRec variant runs with every E4SRec seed; its params and train settings go over
    the profile's (per dataset too), with the full model's backbone and item table (dry run)."""
    commands = [c for c in planned_with(tmp_path, "e4srec:\n  seeds: [0, 1]\n  ablations: []\n  variants:\n"
                                        "    big: {params: {lora_r: 4}, train: {batch_size: 5, epochs: 2}}\n")
                if "--model E4SRec" in c]
    big = [c for c in commands if "--variant big " in c]
    default = [c for c in commands if "--variant default " in c]
    assert len(big) == len(default) == 4  # TinyA, TinyB; seeds 0 and 1
    for command in big:
        params = json_argument(command, "--params")
        train = json_argument(command, "--train-params")
        assert params["lora_r"] == 4 and train["batch_size"] == 5 and train["epochs"] == 2
        run = [re.search(pattern, command).group(0) for pattern in (r"--dataset-dir \S+", r"--seed \d+")]
        twin = next(c for c in default if all(part in c for part in run))
        for flag in ("--backbone", "--item-embeddings"):
            assert re.search(rf"{flag} \S+", command).group(0) == re.search(rf"{flag} \S+", twin).group(0)
        default_params = json_argument(twin, "--params")
        assert {k: v for k, v in params.items() if k != "lora_r"} == {k: v for k, v in default_params.items() if k != "lora_r"}


def test_ablation_settings_reach_only_their_ablation(tmp_path):
    """``e4srec.ablation_settings`` goes over the profile's settings for that ablation's runs only, as a
    variant's would (dry run); a name that is not an ablation is a schema error."""
    commands = [c for c in planned_with(tmp_path, "e4srec:\n  ablations: [no-instruct, no-llm]\n  ablation_settings:\n"
                                        "    no-instruct: {params: {lora_r: 4}, train: {epochs: 1}}\n")
                if "--model E4SRec" in c]
    tuned = [c for c in commands if "--variant no-instruct " in c]
    others = [c for c in commands if "--variant no-instruct " not in c]
    assert tuned and others
    for command in tuned:
        assert json_argument(command, "--params")["lora_r"] == 4
        assert json_argument(command, "--train-params")["epochs"] == 1
    for command in others:
        assert json_argument(command, "--params").get("lora_r") != 4
        assert json_argument(command, "--train-params")["epochs"] != 1

    config = tmp_path / "bad.yaml"
    config.write_text("e4srec:\n  ablation_settings:\n    paper-batch: {params: {lora_r: 4}}\n")
    result = snakemake("-n", "--configfile", ".test/config.yaml", str(config), "--config",
                       f"out={tmp_path}/results", f"resources={tmp_path}/resources")
    assert result.returncode != 0
    assert "paper-batch" in result.stdout + result.stderr


@pytest.mark.parametrize("name", ["default", "no-llm", "a b"])
def test_e4srec_variant_names_that_clash_are_errors(tmp_path, name):
    config = tmp_path / "extra.yaml"
    config.write_text(f"e4srec:\n  variants:\n    '{name}': {{params: {{lora_r: 4}}}}\n")
    result = snakemake("-n", "--configfile", ".test/config.yaml", str(config), "--config",
                       f"out={tmp_path}/results", f"resources={tmp_path}/resources")
    assert result.returncode != 0
    assert f"'e4srec.variants': {name!r}" in result.stdout + result.stderr


def test_paper_profiles_plan_valid_e4srec_parameters(tmp_path):
    """The paper profile, alone and with the paper-exact overlay: every planned E4SRec run's
    parameters build its model's configuration (the BERT encoder's unpacked). The default packs and
    compiles by layers, runs paper-batch (Table 5's training) beside it and compiles the BERT
    encoder's step through ablation_settings; paper-exact trains every run as Table 5 does and drops
    paper-batch (dry run)."""
    from e4srec.runs import model_class

    for overlay in ([], ["config/paper-exact.yaml"]):
        result = snakemake("-n", "-p", "--configfile", "config/config.yaml", *overlay, "--config",
                           f"out={tmp_path}/results", f"resources={tmp_path}/resources")
        assert result.returncode == 0, result.stderr[-2000:]
        runs = [command for _, _, command in planned_training_jobs(result.stdout) if "--model E4SRec" in command]
        # four datasets: three seeds, four ablations with three seeds; the default's paper-batch, three seeds
        assert len(runs) == 4 * 3 + 4 * 4 * 3 + (0 if overlay else 4 * 3)
        for command in runs:
            variant = re.search(r"--variant (\S+)", command).group(1)
            params = json_argument(command, "--params")
            train = json_argument(command, "--train-params")
            config = model_class("E4SRec", variant).config_class(**params)
            if variant == "bert-encoder":  # ablation_settings: compiled whole, whatever the layout
                assert (config.training, config.compile, config.compile_scope) == ("examples", "always", "step")
            elif variant == "paper-batch" or overlay:  # Table 5's training
                assert not overlay or variant != "paper-batch"
                assert (config.training, config.compile_scope, train["batch_size"]) == ("examples", "step", 16)
                assert train["group_by_length"] is False and "--dataset-dir" in command
            else:
                assert (config.training, config.compile_scope) == ("packed", "layers")
                assert "compile" not in params
