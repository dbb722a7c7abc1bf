# E4SRec, stages 2 to 4: backbone, instruction tuning, per-dataset training and components.


def e4srec_runs():
    if not config["e4srec"]["enabled"]:
        return []
    return [run_dir(d, "E4SRec", "default", s) for d in config["datasets"] for s in config["e4srec"]["seeds"]]


rule e4srec:
    input:
        [f"{run}/ranks.parquet" for run in e4srec_runs()],
