# E4SRec, stages 2 to 4: backbone, instruction tuning, per-dataset training and components.


rule e4srec:
    input:
        [f"{run}/ranks.parquet" for run in e4srec_runs()],
