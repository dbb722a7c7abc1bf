# The paper's tables, rendered as CSV (long form), Markdown and LaTeX beside the paper's values.
from e4srec.data import paper_name
from e4srec.results_page import default_page as results_page_path


rule paper_tables:
    input:
        metrics=rules.metrics.output,
        intervals=rules.significance.output.intervals,
        significance=rules.significance.output.tests,
        paper="paper/paper_targets.tsv",
        data=[f"{dataset_dir(d)}/{name}" for d in config["datasets"]  # POP's recount in sampled_gaps
              for name in ("dataset.json", "sequences.parquet", "negatives.parquet")],
    output:
        report(f"{OUT}/tables/table3.csv", caption="../report/table3.rst", category="Tables"),
        multiext(f"{OUT}/tables/table3", ".md", ".tex"),
        report(f"{OUT}/tables/table6.csv", caption="../report/table6.rst", category="Tables"),
        multiext(f"{OUT}/tables/table6", ".md", ".tex"),
        # Tables 3 and 6 as the paper prints them: one per dataset (Markdown: all four; CSV and LaTeX: each)
        multiext(f"{OUT}/tables/table3_by_dataset", ".md", ".csv", ".provenance.json"),
        multiext(f"{OUT}/tables/table6_by_dataset", ".md", ".csv", ".provenance.json"),
        [f"{OUT}/tables/table{n}_{paper_name(d)}{ext}" for n in (3, 6) for d in config["datasets"] for ext in (".csv", ".tex")],
        report(f"{OUT}/tables/baseline_gaps.csv", caption="../report/baseline_gaps.rst", category="Tables"),
        multiext(f"{OUT}/tables/baseline_gaps", ".md", ".provenance.json"),
        report(f"{OUT}/tables/sampled_gaps.csv", caption="../report/baseline_gaps.rst", category="Tables"),
        multiext(f"{OUT}/tables/sampled_gaps", ".md", ".provenance.json"),
    params:
        out_dir=lambda wildcards, output: Path(output[0]).parent,
        data_dir=lambda wildcards, input: Path(input.data[0]).parent.parent,
        datasets=config["datasets"],
    log:
        f"{OUT}/logs/paper_tables.log",
    conda:
        "../envs/e4srec.yaml"
    shell:
        "e4srec tables --metrics {input.metrics} --paper {input.paper} --datasets {params.datasets} "
        "--intervals {input.intervals} --significance {input.significance} --data-dir {params.data_dir} "
        "--out-dir {params.out_dir} 2> {log}"


rule table4:
    input:
        records=[f"{run}/run.json" for run in all_runs()],
        paper="paper/paper_table4.tsv",
    output:
        report(f"{OUT}/tables/table4.csv", caption="../report/table4.rst", category="Tables"),
        multiext(f"{OUT}/tables/table4", ".md", ".tex", ".provenance.json"),
    params:
        runs=lambda wildcards, output: Path(output[0]).parent.parent / "runs",  # {OUT}/runs beside {OUT}/tables
        out_dir=lambda wildcards, output: Path(output[0]).parent,
    log:
        f"{OUT}/logs/table4.log",
    conda:
        "../envs/e4srec.yaml"
    shell:
        "e4srec table4 --runs {params.runs} --paper {input.paper} --out-dir {params.out_dir} 2> {log}"


rule table5:
    input:
        records=[f"{run}/run.json" for run in all_runs()],
        paper="paper/paper_table5.tsv",
    output:
        report(f"{OUT}/tables/table5.csv", caption="../report/table5.rst", category="Tables"),
        multiext(f"{OUT}/tables/table5", ".md", ".tex", ".provenance.json"),
    params:
        runs=lambda wildcards, output: Path(output[0]).parent.parent / "runs",  # {OUT}/runs beside {OUT}/tables
        out_dir=lambda wildcards, output: Path(output[0]).parent,
    log:
        f"{OUT}/logs/table5.log",
    conda:
        "../envs/e4srec.yaml"
    shell:
        "e4srec table5 --runs {params.runs} --paper {input.paper} --out-dir {params.out_dir} 2> {log}"


# The landing page (results/README.md for results/paper, else README.md in the results folder) and the
# index of the runs, generated from the run records once every table and figure is written.
rule results_page:
    input:
        rules.table2.output,
        rules.paper_tables.output,
        rules.table4.output if config["e4srec"]["enabled"] else [],
        rules.table5.output if config["e4srec"]["enabled"] else [],
        rules.analysis.input,
        records=[f"{run}/run.json" for run in all_runs()],
        paper="paper/paper_targets.tsv",
    output:
        page=results_page_path(OUT),
        index=multiext(f"{OUT}/runs_index", ".md", ".csv"),
    params:
        results=lambda wildcards, output: Path(output.index[0]).parent,  # {OUT}, where runs_index.* lie
    log:
        f"{OUT}/logs/results_page.log",
    conda:
        "../envs/e4srec.yaml"
    shell:
        "e4srec results-page {params.results} --paper {input.paper} --page {output.page} 2> {log}"


rule paper:
    input:
        rules.table2.output,
        rules.paper_tables.output,
        # Tables 4 and 5 describe E4SRec's runs
        rules.table4.output if config["e4srec"]["enabled"] else [],
        rules.table5.output if config["e4srec"]["enabled"] else [],
        rules.results_page.output,
