# Datasets: fetch (URL or mirror, checksum-verified), validate and split, Table 2.
# A custom dataset given as a mapping (path, format, columns, ...: paper/DATA.md) reaches
# `e4srec fetch --input JSON`, which keeps the settings in the fetch record for `e4srec prepare`;
# its fetched copy is named DATASET.txt whatever its format. Formats that number ids anew also
# write user_ids.tsv and item_ids.tsv beside dataset.json.
from e4srec.data import check_dataset_name, fetch_arguments
from e4srec.files import InputError

for _name in [*config["datasets"], *config["custom_datasets"]]:
    try:
        check_dataset_name(_name)
    except InputError as _err:
        raise ValueError(f"config key 'datasets' or 'custom_datasets': {_err}") from None


rule fetch_dataset:
    output:
        raw=f"{RES}/raw/{{dataset}}.txt",
        record=f"{RES}/raw/{{dataset}}.json",
        negatives=directory(f"{RES}/raw/{{dataset}}_negatives"),
    params:
        # a custom dataset given as a mapping: --path and --input JSON; else fetch_source (mirror, URL, path)
        source=lambda wildcards: (fetch_arguments(config["custom_datasets"][wildcards.dataset])
                                  if isinstance(config["custom_datasets"].get(wildcards.dataset), dict)
                                  else fetch_source(wildcards)),
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
        out=lambda wildcards, output: Path(output.record).parent,
        subsample=f"--subsample {config['subsample_users']}" if config["subsample_users"] else "",
        max_len=config["max_len"],
        min_interactions=config["min_interactions"],
        short_user_policy=config["short_user_policy"],
        subsample_seed=config["subsample_seed"],
        negatives_count=config["negatives"]["count"],
        negatives_seed=config["negatives"]["seed"],
    log:
        f"{OUT}/logs/prepare/{{dataset}}.log",
    conda:
        "../envs/e4srec.yaml"
    shell:
        "e4srec prepare --dataset {wildcards.dataset} --raw {input.raw} --record {input.record} "
        "--negatives-dir {input.negatives} --out {params.out} --max-len {params.max_len} "
        "--min-interactions {params.min_interactions} --short-user-policy {params.short_user_policy} "
        "{params.subsample} --subsample-seed {params.subsample_seed} "
        "--negatives-count {params.negatives_count} --negatives-seed {params.negatives_seed} 2> {log}"


rule table2:
    input:
        expand(f"{OUT}/data/{{dataset}}/dataset.json", dataset=config["datasets"]),
    output:
        report(f"{OUT}/tables/table2.csv", caption="../report/table2.rst", category="Tables"),
    log:
        f"{OUT}/logs/table2.log",
    conda:
        "../envs/e4srec.yaml"
    shell:
        "e4srec table2 --records {input} --paper paper/paper_table2.tsv --out {output} 2> {log}"
