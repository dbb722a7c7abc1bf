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
        tests=f"{OUT}/tables/significance.csv",
        intervals=f"{OUT}/tables/intervals.csv",
    params:
        runs=all_runs(),
    log:
        f"{OUT}/logs/significance.log",
    conda:
        "../envs/e4srec.yaml"
    shell:
        "e4srec significance --runs {params.runs} --out {output.tests} --intervals-out {output.intervals} 2> {log}"


rule analysis:
    input:
        rules.metrics.output,
        rules.significance.output,
