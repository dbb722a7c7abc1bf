# The paper's tables, rendered as CSV (long form), Markdown and LaTeX beside the paper's values.


rule paper_tables:
    input:
        metrics=rules.metrics.output,
        intervals=rules.significance.output.intervals,
        significance=rules.significance.output.tests,
        paper="paper/paper_targets.tsv",
    output:
        report(f"{OUT}/tables/table3.csv", caption="../report/table3.rst", category="Tables"),
        multiext(f"{OUT}/tables/table3", ".md", ".tex"),
        report(f"{OUT}/tables/table6.csv", caption="../report/table6.rst", category="Tables"),
        multiext(f"{OUT}/tables/table6", ".md", ".tex"),
    params:
        out_dir=lambda wildcards, output: Path(output[0]).parent,
        datasets=config["datasets"],
    log:
        f"{OUT}/logs/paper_tables.log",
    conda:
        "../envs/e4srec.yaml"
    shell:
        "e4srec tables --metrics {input.metrics} --paper {input.paper} --datasets {params.datasets} "
        "--intervals {input.intervals} --significance {input.significance} --out-dir {params.out_dir} 2> {log}"


rule paper:
    input:
        rules.table2.output,
        rules.paper_tables.output,
