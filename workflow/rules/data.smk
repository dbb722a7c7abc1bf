# Datasets: fetch (URL or mirror, checksum-verified), validate and split, Table 2.


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
