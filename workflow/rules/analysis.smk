# Analysis: every metric of every run, from the per-user ranks (the one source of truth).


rule metrics:
    input:
        ranks=[f"{run}/ranks.parquet" for run in all_runs()],
        records=[f"{run}/run.json" for run in all_runs()],
    output:
        f"{OUT}/tables/metrics.csv",
    params:
        runs=all_runs(),
    log:
        f"{OUT}/logs/metrics.log",
    conda:
        "../envs/e4srec.yaml"
    shell:
        "e4srec metrics --runs {params.runs} --out {output} 2> {log}"


rule significance:
    input:
        ranks=[f"{run}/ranks.parquet" for run in all_runs()],
    output:
        tests=report(f"{OUT}/tables/significance.csv", caption="../report/significance.rst", category="Significance"),
        intervals=f"{OUT}/tables/intervals.csv",
    params:
        runs=all_runs(),
    log:
        f"{OUT}/logs/significance.log",
    conda:
        "../envs/e4srec.yaml"
    shell:
        "e4srec significance --runs {params.runs} --out {output.tests} --intervals-out {output.intervals} 2> {log}"


rule sparsity_groups:
    input:
        ranks=[f"{run}/ranks.parquet" for run in all_runs()],
        datasets=expand(f"{OUT}/data/{{dataset}}/dataset.json", dataset=config["datasets"]),
    output:
        csv=f"{OUT}/tables/figure4_sparsity.csv",
        figure=report(multiext(f"{OUT}/figures/figure4_sparsity", ".png", ".pdf"), caption="../report/figure4.rst",
                      category="Figures"),
        ndcg=multiext(f"{OUT}/figures/figure4_sparsity_ndcg", ".png", ".pdf"),
    params:
        runs=all_runs(),
        datasets=[dataset_dir(d) for d in config["datasets"]],
        # every model's groups in the CSV; the figure shows E4SRec, SASRec and the strongest other baseline
        stem=lambda wildcards, output: Path(output.figure[0]).with_suffix(""),
    log:
        f"{OUT}/logs/sparsity.log",
    conda:
        "../envs/e4srec.yaml"
    shell:
        "e4srec sparsity --runs {params.runs} --datasets {params.datasets} "
        "--out {output.csv} --figure {params.stem} 2> {log}"


rule sampled_vs_full:
    input:
        ranks=[f"{run}/ranks.parquet" for run in all_runs()],
    output:
        summary=report(f"{OUT}/tables/sampled_vs_full.csv", caption="../report/protocols.rst", category="Analyses"),
        flips=f"{OUT}/tables/sampled_vs_full_flips.csv",
    params:
        runs=all_runs(),
    log:
        f"{OUT}/logs/sampled_vs_full.log",
    conda:
        "../envs/e4srec.yaml"
    shell:
        "e4srec protocols --runs {params.runs} --out {output.summary} --flips-out {output.flips} 2> {log}"


rule ablation_figure:
    input:
        rules.metrics.output,
    output:
        csv=f"{OUT}/tables/figure3_ablation.csv",
        figure=report(multiext(f"{OUT}/figures/figure3_ablation", ".png", ".pdf"), caption="../report/figure3.rst",
                      category="Figures"),
    params:
        stem=lambda wildcards, output: Path(output.figure[0]).with_suffix(""),
    log:
        f"{OUT}/logs/ablation.log",
    conda:
        "../envs/e4srec.yaml"
    shell:
        "e4srec ablation --metrics {input} --out {output.csv} --figure {params.stem} 2> {log}"


rule serving:
    input:
        **serving_inputs(),
    output:
        json=f"{OUT}/tables/extensibility_serving.json",
        table=report(f"{OUT}/tables/extensibility_serving.md", caption="../report/serving.rst", category="Tables"),
    params:
        components=lambda wildcards, input: " ".join(f"--components {c}" for c in input.components),
        device=config["device"],
    log:
        f"{OUT}/logs/serving.log",
    conda:
        "../envs/e4srec.yaml"
    shell:
        "e4srec serving --backbone {input.backbone} {params.components} --device {params.device} "
        "--out {output.json} > /dev/null 2> {log}"


# Extensibility (a): one dataset (the first unless e4srec.new_items.dataset), the first E4SRec seed.
if NEW_ITEMS:

    rule new_items:
        input:
            **NEW_ITEMS["inputs"],
        output:
            json=f"{OUT}/tables/extensibility_new_items.json",
            csv=f"{OUT}/tables/extensibility_new_items.csv",
            table=report(f"{OUT}/tables/extensibility_new_items.md", caption="../report/new_items.rst",
                         category="Tables"),
            work=directory(f"{OUT}/extensibility/new_items"),
        params:
            dataset_dir=lambda wildcards, input: Path(input.record).parent,
            fraction=config["e4srec"]["new_items"]["fraction"],
            selection_seed=config["e4srec"]["new_items"]["seed"],
            seed=NEW_ITEMS["seed"],
            sasrec_seed=NEW_ITEMS["sasrec"].seed,
            sasrec_params=baseline_params(NEW_ITEMS["sasrec"]),
            sasrec_train_params=baseline_train_params(NEW_ITEMS["sasrec"]),
            e4srec_params=as_json(config["e4srec"]["params"]),
            e4srec_train_params=e4srec_train_params(NEW_ITEMS["e4srec"]),
            extension=as_json(config["e4srec"]["new_items"]["extension"]),
            full_run=lambda wildcards, input: Path(input.full_record).parent,
            sasrec_run=lambda wildcards, input: Path(input.sasrec_record).parent,
            ties=config["ties"],
        threads: 8  # capped by --cores, as train_e4srec
        log:
            f"{OUT}/logs/new_items.log",
        benchmark:
            f"{OUT}/benchmarks/new_items.tsv"
        resources:
            gpu=ONE_GPU,
        conda:
            "../envs/e4srec.yaml"
        shell:
            on_gpus("e4srec new-items --dataset-dir {params.dataset_dir} --backbone {input.backbone} "
                    "--work-dir {output.work} --out {output.json} --fraction {params.fraction} "
                    "--selection-seed {params.selection_seed} --seed {params.seed} --sasrec-seed {params.sasrec_seed} "
                    "--sasrec-params '{params.sasrec_params}' --sasrec-train-params '{params.sasrec_train_params}' "
                    "--e4srec-params '{params.e4srec_params}' --e4srec-train-params '{params.e4srec_train_params}' "
                    "--extension '{params.extension}' --full-run {params.full_run} "
                    "--full-sasrec-run {params.sasrec_run} --ties {params.ties} --threads {threads}",
                    ONE_GPU) + " > /dev/null 2> {log}"


rule analysis:
    input:
        rules.serving.output if serving_inputs() else [],
        rules.new_items.output if NEW_ITEMS else [],
        rules.ablation_figure.output,
        rules.sparsity_groups.output,
        rules.sampled_vs_full.output,
        rules.metrics.output,
        rules.significance.output,
