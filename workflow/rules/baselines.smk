# Baselines: one job per (dataset, model, variant, seed), each writing a run folder.

TRAIN_SHELL = TRAIN_COMMAND + (  # `e4srec train`, or its launch over several GPUs (common.smk)
    " --dataset-dir {params.dataset_dir} --model {wildcards.model} --variant {wildcards.variant} "
    "--seed {wildcards.seed} --params '{params.model_params}' --train-params '{params.train_params}' "
    "--ties {params.ties} --out {params.out} --threads {threads} --no-progress 2> {log}"
)


rule train_baseline:
    input:
        unpack(dataset_files),
    output:
        ranks=f"{OUT}/runs/{{dataset}}/{{model}}/{{variant}}/seed~{{seed}}/ranks.parquet",
        record=f"{OUT}/runs/{{dataset}}/{{model}}/{{variant}}/seed~{{seed}}/run.json",
    wildcard_constraints:
        model="|".join(m for m in ["POP", "GRU4Rec", "Caser", "BERT4Rec", "S3-Rec", "CL4SRec", "ICLRec"]),
    params:
        dataset_dir=lambda wildcards: dataset_dir(wildcards.dataset),
        model_params=baseline_params,
        train_params=baseline_train_params,
        out=lambda wildcards, output: Path(output.ranks).parent,
        ties=config["ties"],
    threads: 1
    log:
        f"{OUT}/logs/runs/{{dataset}}/{{model}}/{{variant}}/seed~{{seed}}.log",
    benchmark:
        f"{OUT}/benchmarks/runs/{{dataset}}/{{model}}/{{variant}}/seed~{{seed}}.tsv"
    resources:
        gpu=TRAIN_GPUS,
    conda:
        "../envs/e4srec.yaml"
    shell:
        TRAIN_SHELL


use rule train_baseline as train_embedding_baseline with:
    output:
        ranks=f"{OUT}/runs/{{dataset}}/{{model}}/{{variant}}/seed~{{seed}}/ranks.parquet",
        record=f"{OUT}/runs/{{dataset}}/{{model}}/{{variant}}/seed~{{seed}}/run.json",
        item_embeddings=f"{OUT}/runs/{{dataset}}/{{model}}/{{variant}}/seed~{{seed}}/item_embeddings.safetensors",
    wildcard_constraints:
        model="|".join(EMBEDDING_MODELS),


rule baselines:
    input:
        [f"{run_dir(*run)}/ranks.parquet" for run in baseline_runs()],
