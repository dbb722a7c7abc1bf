# Datasets: fetch (URL or mirror, checksum-verified), validate and split, Table 2.


def fetch_source(wildcards):
    if wildcards.dataset in config["custom_datasets"]:
        return f"--path {config['custom_datasets'][wildcards.dataset]}"
    return f"--mirror {config['data_mirror']}" if config["data_mirror"] else ""


rule fetch_dataset:
    output:
        raw=f"{RES}/raw/{{dataset}}.txt",
        record=f"{RES}/raw/{{dataset}}.json",
        negatives=directory(f"{RES}/raw/{{dataset}}_negatives"),
    params:
        source=fetch_source,
        negatives=config["negatives"]["source"],
    log:
        f"{OUT}/logs/fetch/{{dataset}}.log",
    conda:
        "../envs/e4srec.yaml"
    shell:
        "e4srec fetch --dataset {wildcards.dataset} --out {output.raw} --record {output.record} "
        "--negatives-dir {output.negatives} --negatives {params.negatives} {params.source} 2> {log}"


rule prepare_dataset:
    input:
        raw=rules.fetch_dataset.output.raw,
        record=rules.fetch_dataset.output.record,
        negatives=rules.fetch_dataset.output.negatives,
    output:
        sequences=f"{OUT}/data/{{dataset}}/sequences.parquet",
        negatives=f"{OUT}/data/{{dataset}}/negatives.parquet",
        record=f"{OUT}/data/{{dataset}}/dataset.json",
    params:
        out=lambda wildcards: dataset_dir(wildcards.dataset),
        subsample=f"--subsample {config['subsample_users']}" if config["subsample_users"] else "",
    log:
        f"{OUT}/logs/prepare/{{dataset}}.log",
    conda:
        "../envs/e4srec.yaml"
    shell:
        "e4srec prepare --dataset {wildcards.dataset} --raw {input.raw} --record {input.record} "
        "--negatives-dir {input.negatives} --out {params.out} --max-len {config[max_len]} "
        "--min-interactions {config[min_interactions]} --short-user-policy {config[short_user_policy]} "
        "{params.subsample} --subsample-seed {config[subsample_seed]} "
        "--negatives-count {config[negatives][count]} --negatives-seed {config[negatives][seed]} 2> {log}"


rule table2:
    input:
        expand(f"{OUT}/data/{{dataset}}/dataset.json", dataset=config["datasets"]),
    output:
        f"{OUT}/tables/table2.csv",
    log:
        f"{OUT}/logs/table2.log",
    conda:
        "../envs/e4srec.yaml"
    shell:
        "e4srec table2 --records {input} --paper paper/paper_table2.tsv --out {output} 2> {log}"
