# Appendix B, sensitivity: E4SRec around Table 5's setting, one factor at a time (config key sensitivity,
# e4srec/sensitivity.py). Planned only when sensitivity.enabled (config/sensitivity.yaml); target `sensitivity`.
from e4srec import sensitivity as sensitivity_module

SENS = sensitivity_module.workflow_section(config["sensitivity"], config["datasets"], config["e4srec"]["enabled"])
SENS_OUT = f"{OUT}/sensitivity"
SENS_FACTORS = [factor for factor, values in SENS["factors"].items() if values]
# dataset -> {runs, chunks}: each run's settings resolved as an E4SRec variant's (common.smk)
SENS_PLAN = sensitivity_module.expand(SENS, sensitivity_module.variant_resolver(
    SENSITIVITY_VARIANTS, e4srec_model_params, e4srec_train_params)) if SENS["enabled"] else {}


# One job per (dataset, chunk, seed): the chunk's points one after the other in one process (e.g. the four
# other warmup values), each into its own run folder; finished points are skipped when a job is rerun.
# The manifest (each run's run.json sha256) is the job's output: the run folders are not, so that
# Snakemake never deletes the finished points of a chunk cut short.
rule train_sensitivity:
    input:
        unpack(dataset_files),
        backbone=lambda wildcards: e4srec_backbone_dir(types.SimpleNamespace(variant="default")),
        item_embeddings=lambda wildcards: e4srec_item_embeddings(
            types.SimpleNamespace(dataset=wildcards.dataset, variant="default")),
    output:
        f"{SENS_OUT}/chunks/{{dataset}}/{{chunk}}/seed~{{seed}}.json",
    wildcard_constraints:
        chunk="|".join(["base", *sensitivity_module.FACTORS]),
    params:
        dataset_dir=lambda wildcards: dataset_dir(wildcards.dataset),
        runs=lambda wildcards: as_json(sensitivity_module.chunk_runs(SENS_PLAN, wildcards.dataset, wildcards.chunk)),
        runs_dir=lambda wildcards, output: Path(output[0]).parents[3] / "runs" / wildcards.dataset / "E4SRec",
        ties=config["ties"],
    threads: 8  # as train_e4srec
    log:
        f"{SENS_OUT}/logs/{{dataset}}/{{chunk}}/seed~{{seed}}.log",
    benchmark:
        f"{SENS_OUT}/benchmarks/{{dataset}}/{{chunk}}/seed~{{seed}}.tsv"
    resources:
        gpu=ONE_GPU,
    conda:
        "../envs/e4srec.yaml"
    shell:
        on_gpus("python -m e4srec.sensitivity train --dataset-dir {params.dataset_dir} --backbone {input.backbone} "
                "--item-embeddings {input.item_embeddings} --runs-dir {params.runs_dir} --runs '{params.runs}' "
                "--seed {wildcards.seed} --ties {params.ties} --chunk {wildcards.chunk} --manifest {output} "
                "--threads {threads}", ONE_GPU) + " 2> {log}"


rule sensitivity_report:
    input:
        sensitivity_module.chunk_manifests(SENS_PLAN, SENS_OUT, SENS["seeds"]),
    output:
        tables=[f"{SENS_OUT}/tables/{factor}{ext}" for factor in SENS_FACTORS for ext in (".csv", ".md")],
        tests=f"{SENS_OUT}/tables/significance.csv",
        verdicts=multiext(f"{SENS_OUT}/tables/verdicts", ".csv", ".md"),
        figures=[f"{SENS_OUT}/figures/{factor}{ext}" for factor in SENS_FACTORS for ext in (".png", ".pdf")],
    params:
        runs=sensitivity_module.run_dirs(SENS_PLAN, SENS_OUT, SENS["seeds"]),
        factors=SENS_FACTORS,
        alpha=SENS["alpha"],
        margin=SENS["margin"],
        metric=SENS["verdict_metric"],
        out_dir=lambda wildcards, output: Path(output.tests).parent.parent,
    log:
        f"{SENS_OUT}/logs/report.log",
    conda:
        "../envs/e4srec.yaml"
    shell:
        "python -m e4srec.sensitivity report --runs {params.runs} --out-dir {params.out_dir} --factors {params.factors} "
        "--alpha {params.alpha} --margin {params.margin} --verdict-metric {params.metric} 2> {log}"
