# Helpers shared by the rules (no rules here): paths, run lists and per-run parameters.
import json
import re
import types
from pathlib import Path

from e4srec.tables import E4SREC_ABLATIONS  # Figure 3's ablations (the schema's enum of e4srec.ablations)

KNOWN_DATASETS = ["Beauty", "Sports_and_Outdoors", "Toys_and_Games", "Yelp"]
EMBEDDING_MODELS = ["SASRec", "BPR"]  # baselines whose item embeddings E4SRec can take
OUT = config["out"]
RES = config["resources"]
# GPUs of a training job, one process each; more than one: data-parallel (DDP) through accelerate,
# the global batch unchanged (README, "Several GPUs (DDP)"). One: `e4srec train` as a single process.
TRAIN_GPUS = 0 if config["device"] == "cpu" else config["gpus_per_job"]
ONE_GPU = 0 if config["device"] == "cpu" else 1  # the other GPU jobs (instruction tuning, new items)


def on_gpus(command, gpus):
    """``command`` run on ``gpus`` GPUs of its own (`e4srec gpu-slot`: CUDA_VISIBLE_DEVICES, at most
    jobs_per_gpu jobs a GPU), so that jobs Snakemake runs side by side spread over the machine's GPUs
    (README, "GPU and cluster"); as it is without GPUs."""
    if not gpus:
        return command
    return f"e4srec gpu-slot --gpus {gpus} --jobs-per-gpu {config['jobs_per_gpu']} -- {command}"


# distributed: fsdp shards the weights over those processes instead (FSDP2, paper/DISTRIBUTED.md)
FSDP_LAUNCH = ("--use_fsdp --fsdp_version 2 --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP "
               "--fsdp_reshard_after_forward true --fsdp_cpu_ram_efficient_loading false")
TRAIN_COMMAND = on_gpus("e4srec train" if TRAIN_GPUS <= 1 else (
    f"accelerate launch {FSDP_LAUNCH if config['distributed'] == 'fsdp' else '--multi_gpu'} "
    f"--num_processes {TRAIN_GPUS} --num_machines 1 --mixed_precision no "
    "--dynamo_backend no --main_process_port 0 -m e4srec.cli train"), TRAIN_GPUS)

for _name in config["datasets"]:
    if _name not in KNOWN_DATASETS and _name not in config["custom_datasets"]:
        raise ValueError(f"config key 'datasets': unknown dataset {_name!r}; known: {KNOWN_DATASETS}, "
                         f"or add it under 'custom_datasets' as name: path")


def as_json(value):
    """A JSON argument for the shell (single-quoted by the rule)."""
    return json.dumps(value, sort_keys=True)


def dataset_dir(dataset):
    return f"{OUT}/data/{dataset}"


def dataset_files(wildcards):
    folder = dataset_dir(wildcards.dataset)
    return {"sequences": f"{folder}/sequences.parquet", "negatives": f"{folder}/negatives.parquet",
            "record": f"{folder}/dataset.json"}


def run_dir(dataset, model, variant, seed):
    return f"{OUT}/runs/{dataset}/{model}/{variant}/seed~{seed}"


def baseline_runs():
    """(dataset, model, variant, seed) of every baseline run of this profile."""
    runs = []
    for dataset in config["datasets"]:
        for model in config["baselines"]["models"]:
            variants = ["default", *config["baselines"]["variants"].get(model, {})]
            for variant in variants:
                seeds = [0] if model == "POP" else config["seeds"]
                runs += [(dataset, model, variant, seed) for seed in seeds]
    return runs


def variant_settings(wildcards) -> dict:
    """A baseline variant's config entry: model parameters, and training settings under "train"."""
    if wildcards.variant == "default":
        return {}
    return config["baselines"]["variants"][wildcards.model][wildcards.variant]


def baseline_params(wildcards):
    params = dict(config["baselines"]["params"].get(wildcards.model, {}))
    params.update({key: value for key, value in variant_settings(wildcards).items() if key != "train"})
    return as_json(params)


def baseline_train_params(wildcards):
    import importlib
    from e4srec.runs import model_class

    model_module = importlib.import_module(model_class(wildcards.model).__module__)
    # the model's defaults, its variant's, then the profile's (a small profile caps every run)
    settings = {"device": config["device"], **getattr(model_module, "TRAIN_DEFAULTS", {}),
                **variant_settings(wildcards).get("train", {}),
                **config["baselines"]["train"], **config["baselines"]["train_overrides"].get(wildcards.model, {})}
    return as_json(settings)


def fetch_source(wildcards):
    if wildcards.dataset in config["custom_datasets"]:
        return f"--path {config['custom_datasets'][wildcards.dataset]}"
    return f"--mirror {config['data_mirror']}" if config["data_mirror"] else ""


# A variant that a later config file disables is dropped (config/paper-exact.yaml drops paper-batch).
config["e4srec"]["variants"] = {name: settings for name, settings in config["e4srec"]["variants"].items()
                                if settings.get("enabled", True)}
for _name in config["e4srec"]["variants"]:
    if _name == "default" or _name in E4SREC_ABLATIONS or not re.fullmatch(r"[A-Za-z0-9_.-]+", _name):
        raise ValueError(f"config key 'e4srec.variants': {_name!r} is not a valid variant name (letters, digits, "
                         f"'_', '.', '-'; not 'default' nor an ablation: {', '.join(E4SREC_ABLATIONS)})")
E4SREC_VARIANTS = ["default", *E4SREC_ABLATIONS, *config["e4srec"]["variants"]]


def e4srec_runs():
    """E4SRec runs: every seed of the full model and of each configured variant, and each ablation
    (Figure 3) with ablation_seeds."""
    if not config["e4srec"]["enabled"]:
        return []
    runs = [run_dir(d, "E4SRec", v, s) for d in config["datasets"] for v in ["default", *config["e4srec"]["variants"]]
            for s in config["e4srec"]["seeds"]]
    seeds = config["e4srec"]["ablation_seeds"] or config["e4srec"]["seeds"][:1]
    return runs + [run_dir(d, "E4SRec", a, s) for d in config["datasets"] for a in config["e4srec"]["ablations"]
                   for s in seeds]


def all_runs():
    runs = [run_dir(*run) for run in baseline_runs()]
    return [*runs, *e4srec_runs()]



def sparsity_models():
    """Figure 4 compares E4SRec with SASRec (the paper); with either missing, every model is shown."""
    wanted = ["SASRec", "E4SRec"] if config["e4srec"]["enabled"] else ["SASRec"]
    if "SASRec" in config["baselines"]["models"] and len(wanted) == 2:
        return wanted
    return []


# E4SRec ------------------------------------------------------------------------------------------
BACKBONE_ID = re.sub(r"[^A-Za-z0-9_.-]+", "_", config["e4srec"]["backbone"]).strip("_")
ENCODER_ID = re.sub(r"[^A-Za-z0-9_.-]+", "_", config["e4srec"]["encoder"]).strip("_")


def e4srec_backbone_dir(wildcards):
    """The backbone E4SRec trains on: instruction-tuned (stage 2) unless switched off, or for the
    "no-instruct" ablation; the BERT-class encoder for "bert-encoder"; none for "no-llm"."""
    if wildcards.variant == "no-llm":
        return []
    if wildcards.variant == "bert-encoder":
        return f"{RES}/encoders/{ENCODER_ID}"
    tuned = config["e4srec"]["instruction_tuning"]["enabled"] and wildcards.variant != "no-instruct"
    suffix = "-instruct" if tuned else ""
    return f"{RES}/backbones/{BACKBONE_ID}{suffix}"


def instruction_data_args():
    tuning = config["e4srec"]["instruction_tuning"]
    if tuning["data"] != "self-instruct-seed":
        return f"--data {tuning['data']}"
    mirror = config["instructions_mirror"]
    return f"--self-instruct fetch --mirror {mirror}" if mirror else "--self-instruct fetch"


def e4srec_item_embeddings(wildcards):
    """SASRec's item table (the configured run), or BPR's for the "bpr-embeddings" ablation."""
    chosen = dict(config["e4srec"]["item_embeddings"])
    if wildcards.variant == "bpr-embeddings":
        chosen.update(model="BPR", variant="default")
    return f"{run_dir(wildcards.dataset, chosen['model'], chosen['variant'], chosen['seed'])}/item_embeddings.safetensors"


SENSITIVITY_VARIANTS = {}  # name -> {params, train} of the sensitivity study's runs (sensitivity.smk)


def e4srec_variant_settings(wildcards, key):
    """A configured E4SRec variant's or ablation's ``params`` or ``train`` entry ({} for the default and
    for an ablation without ``ablation_settings``); for a point of the sensitivity study, its settings."""
    if wildcards.variant in SENSITIVITY_VARIANTS:
        return SENSITIVITY_VARIANTS[wildcards.variant].get(key, {})
    settings = config["e4srec"]["ablation_settings" if wildcards.variant in E4SREC_ABLATIONS else "variants"]
    return settings.get(wildcards.variant, {}).get(key, {})


def e4srec_model_params(wildcards):
    """E4SRec's params for a variant (a configured variant's over the profile's): a bidirectional
    encoder cannot pack, so bert-encoder trains on examples and scores padded whatever ``training``
    and ``scoring`` say (recorded in its run.json)."""
    params = {**config["e4srec"]["params"], **e4srec_variant_settings(wildcards, "params")}
    if wildcards.variant == "bert-encoder":
        for key, unpacked in (("training", "examples"), ("scoring", "padded")):
            if params.get(key) == "packed":
                params[key] = unpacked
    return as_json(params)


def e4srec_train_params(wildcards):
    settings = {"device": config["device"], **config["e4srec"]["train"],
                **config["e4srec"]["train_per_dataset"].get(wildcards.dataset, {}),
                **e4srec_variant_settings(wildcards, "train")}
    return as_json(settings)


def serving_inputs():
    """The backbone and every dataset's first-seed E4SRec components (none without E4SRec or with one dataset)."""
    if not config["e4srec"]["enabled"] or len(config["datasets"]) < 2:
        return {}
    seed = config["e4srec"]["seeds"][0]
    components = [f"{run_dir(d, 'E4SRec', 'default', seed)}/components" for d in config["datasets"]]
    return {"backbone": e4srec_backbone_dir(types.SimpleNamespace(variant="default")), "components": components}


def new_items_setup():
    """Extensibility (a), new items: its dataset (the first unless named), seeds (the first E4SRec seed;
    SASRec's of the item table) and inputs, or None (E4SRec or the experiment off, or a table not SASRec's)."""
    settings = config["e4srec"]["new_items"]
    chosen = config["e4srec"]["item_embeddings"]
    if not (config["e4srec"]["enabled"] and settings["enabled"]) or chosen["model"] != "SASRec":
        return None
    dataset = settings["dataset"] or config["datasets"][0]
    if dataset not in config["datasets"]:
        raise ValueError(f"config e4srec.new_items.dataset: {dataset!r} is not among datasets {config['datasets']}")
    seed = config["e4srec"]["seeds"][0]
    sasrec = types.SimpleNamespace(dataset=dataset, model="SASRec", variant=chosen["variant"], seed=chosen["seed"])
    e4srec = types.SimpleNamespace(dataset=dataset, model="E4SRec", variant="default", seed=seed)
    full_run = run_dir(dataset, "E4SRec", "default", seed)
    sasrec_run = run_dir(dataset, "SASRec", chosen["variant"], chosen["seed"])
    return {"dataset": dataset, "seed": seed, "sasrec": sasrec, "e4srec": e4srec,
            "inputs": {**dataset_files(e4srec), "backbone": e4srec_backbone_dir(e4srec),
                       "full_ranks": f"{full_run}/ranks.parquet", "full_record": f"{full_run}/run.json",
                       "sasrec_record": f"{sasrec_run}/run.json"}}


NEW_ITEMS = new_items_setup()  # the new_items rule (analysis.smk) exists only when set
