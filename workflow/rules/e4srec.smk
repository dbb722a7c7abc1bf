# E4SRec, stages 2 to 4: backbone, instruction tuning, per-dataset training and pluggable components.
import os

# torch.compile's caches in one folder for every E4SRec job and each of its processes (config key
# compile_cache; "": off; e4srec/compile_cache.py). Passed through the environment, which every job's
# shell and each process of `accelerate launch` inherit (and which this file sets again where a job runs
# in a Snakemake process of its own), not as an argument of the shell commands: a new argument would
# count as a code change and mark every finished run out of date. The `e4srec` command reads it first.
_COMPILE_CACHE = f"{RES}/compile_cache" if config["compile_cache"] == "auto" else config["compile_cache"]
# (set here, not read: no envvars directive)
os.environ.update(E4SREC_COMPILE_CACHE=str(Path(_COMPILE_CACHE).resolve()) if _COMPILE_CACHE else "")

E4SREC_TRAIN_SHELL = TRAIN_COMMAND + (  # `e4srec train`, or its launch over several GPUs (common.smk)
    " --dataset-dir {params.dataset_dir} --model E4SRec --variant {wildcards.variant} "
    "--seed {wildcards.seed} --params '{params.model_params}' --train-params '{params.train_params}' "
    "{params.backbone} --item-embeddings {input.item_embeddings} --ties {params.ties} "
    "{params.time_backbone} --out {params.out} --threads {threads} --no-progress 2> {log}"
)


rule resolve_backbone:
    output:
        directory(f"{RES}/backbones/{{backbone}}"),
    wildcard_constraints:
        backbone=BACKBONE_ID,
    params:
        spec=config["e4srec"]["backbone"],
    log:
        f"{OUT}/logs/backbone/{{backbone}}.log",
    conda:
        "../envs/e4srec.yaml"
    shell:
        "e4srec backbone --spec {params.spec} --out {output} 2> {log}"


rule resolve_encoder:
    output:
        directory(f"{RES}/encoders/{ENCODER_ID}"),
    params:
        spec=config["e4srec"]["encoder"],
    log:
        f"{OUT}/logs/backbone/encoder-{ENCODER_ID}.log",
    conda:
        "../envs/e4srec.yaml"
    shell:
        "e4srec backbone --spec {params.spec} --out {output} --dtype float32 2> {log}"


rule instruction_tune:
    input:
        f"{RES}/backbones/{BACKBONE_ID}",
    output:
        directory(f"{RES}/backbones/{BACKBONE_ID}-instruct"),
    params:
        data=instruction_data_args(),
        params=" ".join(f"--param {k}={v}" for k, v in config["e4srec"]["instruction_tuning"]["params"].items()),
        converted=lambda wildcards, output: f"{output}.alpaca.json",
    log:
        f"{OUT}/logs/backbone/{BACKBONE_ID}-instruct.log",
    benchmark:
        f"{OUT}/benchmarks/backbone/{BACKBONE_ID}-instruct.tsv"
    resources:
        gpu=ONE_GPU,
    conda:
        "../envs/e4srec.yaml"
    shell:
        on_gpus("e4srec instruct --backbone {input} {params.data} --converted {params.converted} --out {output} "
                "{params.params}", ONE_GPU) + " 2> {log}"


rule train_e4srec:
    input:
        unpack(dataset_files),
        backbone=e4srec_backbone_dir,
        item_embeddings=e4srec_item_embeddings,
    wildcard_constraints:
        variant="|".join(map(re.escape, E4SREC_VARIANTS)),
    output:
        ranks=f"{OUT}/runs/{{dataset}}/E4SRec/{{variant}}/seed~{{seed}}/ranks.parquet",
        record=f"{OUT}/runs/{{dataset}}/E4SRec/{{variant}}/seed~{{seed}}/run.json",
        components=directory(f"{OUT}/runs/{{dataset}}/E4SRec/{{variant}}/seed~{{seed}}/components"),
    params:
        dataset_dir=lambda wildcards: dataset_dir(wildcards.dataset),
        model_params=e4srec_model_params,
        train_params=e4srec_train_params,
        out=lambda wildcards, output: Path(output.ranks).parent,
        ties=config["ties"],
        backbone=lambda wildcards, input: f"--backbone {input.backbone}" if input.backbone else "",  # none: no-llm
        time_backbone=lambda wildcards: "--time-backbone" if config["e4srec"]["time_backbone"] and
        wildcards.variant == "default" else "",
    threads: 8  # capped by --cores; the LLM's matrix work uses them on a CPU
    log:
        f"{OUT}/logs/runs/{{dataset}}/E4SRec/{{variant}}/seed~{{seed}}.log",
    benchmark:
        f"{OUT}/benchmarks/runs/{{dataset}}/E4SRec/{{variant}}/seed~{{seed}}.tsv"
    resources:
        gpu=TRAIN_GPUS,
    conda:
        "../envs/e4srec.yaml"
    shell:
        E4SREC_TRAIN_SHELL


rule e4srec:
    input:
        [f"{run}/ranks.parquet" for run in e4srec_runs()],
