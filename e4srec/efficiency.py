"""Tables 4 (efficiency) and 5 (training configuration), read from the run records (``run.json``).

Nothing here trains or times anything: every number is what a run recorded about itself, read from
``RUNS/<dataset>/E4SRec/<variant>/seed~<n>/run.json`` (one row, or column, per such record), with the
paper's values beside ours from ``paper/paper_table4.tsv`` and ``paper/paper_table5.tsv``.

Table 4, efficiency (long form: variant, dataset, seed, quantity, value, paper_value), one section for
the default variant, then one for each variant that trains the full model another way
(:func:`configuration_variants`, e.g. ``paper-batch``, whose training time per epoch is the one at the
paper's batch):

- ``machine``: the GPU names of ``machine.gpus`` when ``training.device`` is CUDA, else ``CPU (N cores)``
  from ``machine.cpu_count``; paper: one A800.
- ``backbone``: ``backbone.parent.source`` (the backbone before instruction tuning; ``embedded`` is
  SmolLM2-135M-Instruct, see :mod:`e4srec.backbone`), its architecture, ``backbone.parameters`` and
  ``backbone.dtype``; paper: LLaMA2-13B in 8 bits.
- ``training rows per epoch``, ``epochs run``: ``training.epochs[*].examples`` (the batch rows: examples,
  or users under ``training: packed``) and the number of epochs recorded; ``training layout``:
  ``params.training`` (``examples`` when a record predates the setting).
- ``first epoch (s, includes compilation)``: ``training.epochs[0].seconds``, wall clock of the first
  epoch, which also pays for ``torch.compile`` and CUDA warm-up.
- ``later epochs, median (s)`` and ``training rows per second, later epochs (median)``: the median
  over the epochs after the first (the first when only one ran) of ``seconds`` and of
  ``examples / seconds``.
- ``training tokens per second, later epochs (median)``: the same median of ``tokens / seconds``, where
  ``tokens`` (recorded by the trainer from E4SRec's ``backbone_tokens``) counts the prompt positions
  the backbone read in the epoch, padding left out (empty for records that predate it).
- ``training total (s, with per-epoch validation)``: ``training.train_seconds``.
- ``peak memory in training (GiB)``: ``training.peak_memory_mb``: the peak GPU memory allocated by
  torch on a GPU, the process's peak resident memory on a CPU.
- ``SASRec later epochs, median (s)`` and ``SASRec machine``: the same median and machine for the
  reference baseline, from ``RUNS/<dataset>/SASRec/default/seed~0/run.json`` (empty when absent).
- ``evaluation pass (s)``, ``evaluation users``, ``evaluation users per second``: ``evaluation.seconds``
  and ``evaluation.users``. The pass ranks every user's validation and test items (two scorings of all
  items per user, batched) and derives the three protocols (full, full_masked, sampled) from the same
  scores. ``evaluation s per ranked instance`` is ``seconds / (2 x users)``, beside the paper's 0.23 s
  per instance (whose batching the paper does not state).
- ``bare backbone forward, users per second`` and ``s per instance``: ``evaluation.bare_backbone``
  (``e4srec train --time-backbone``): the backbone alone over every user's validation prompt, LoRA
  off, no prefix cache, no item scorer, at the evaluation batch size; beside the paper's 0.21 s for
  LLaMA2-13B alone. ``E4SRec / bare backbone, s per instance`` divides the two per-instance times
  (paper: 0.23 / 0.21). Empty for records without the timing.
- ``trainable parameters``, ``backbone parameters`` and their ratio: ``trainable_parameters`` (LoRA,
  input projection and item scorer) over ``backbone.parameters``; paper: "about 1%".
- ``backbone weights (GB)``, ``components (GB)``, ``E4SRec storage: backbone + components (GB)`` and
  ``components / backbone weights``: ``backbone.weights_bytes`` and ``components.size_bytes.total``
  (adapter, projections and item table; the breakdown in MB is a row of its own), GB = 10^9 bytes;
  paper: 12.12 GB and 12.23 GB.
- ``100 datasets on one backbone (x backbone)``: (backbone + 100 x components) / backbone, the storage
  of serving 100 datasets from one shared backbone (paper: about 2x); ``100 datasets, a tuned backbone
  each (x backbone)``: 100 x (backbone + components) / backbone, the alternative of fine-tuning one
  backbone copy per dataset.

Table 5, configuration as run (long form: dataset, setting, value, paper_value, same_as_paper, note):
one row per setting of :func:`configuration`, read from ``training.config`` (epochs, batch size,
learning rate, warmup steps, weight decay, scheduler), ``components.config`` (LoRA r, alpha, dropout,
target modules), ``backbone`` (name, weights, ``instruction_tuning``) and the seeds present.
``same_as_paper`` is yes/no, or n/a where the paper gives no value. The seeds of one dataset must
agree on every setting.
"""
from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from . import provenance
from .data import paper_name
from .files import InputError, read_json, write_json, write_text
from .tables import E4SREC_ABLATIONS, SPLITS, write_csv

PAPER_TABLE4 = "paper/paper_table4.tsv"
PAPER_TABLE5 = "paper/paper_table5.tsv"
MODEL = "E4SRec"
VARIANT = "default"
REFERENCE = ("SASRec", "default", 0)  # the baseline whose epoch time Table 4 shows for reference
N_DATASETS = 100  # the paper's "100 E4SRec models need about 2x the backbone's storage"
GB = 1e9
MB = 1e6

TABLE4_TITLE = "Table 4: efficiency of E4SRec from the run records"
TABLE4_CAPTION = (
    "One section for the default variant (the rows E4SRec of Tables 3 and 6), then one for each variant "
    "that trains the full model another way (e.g. paper-batch: one prompt per example, the paper's batch). "
    "Epoch and evaluation times are wall clock as each run recorded it (run.json), not a benchmark: the "
    "GPU may have been shared with other jobs (each run's machine and date are in its run.json; "
    "results/README.md says which runs shared a GPU), and CPU runs may have shared their cores, so these "
    "times are upper bounds on the time the work needs. The first epoch also "
    "pays for compilation and warm-up. The evaluation pass ranks each user's validation and test items "
    "under three protocols; per ranked instance = seconds / (2 x users). The paper measured on one A800 "
    "with LLaMA2-13B in 8 bits; its ratios, not its seconds or gigabytes, are comparable with ours.")
TABLE5_TITLE = "Table 5: E4SRec's training configuration as run, beside the paper's"
TABLE5_CAPTION = (
    "Read from the run records: training.config, components.config and backbone of each seed's run.json. "
    "same as paper: yes / no, or n/a where the paper gives no value. One section per dataset for the "
    "default variant (the rows E4SRec of Tables 3 and 6), then for each variant that trains the full model "
    "another way (e4srec.variants, e.g. paper-batch; not Figure 3's ablations).")


@dataclass(frozen=True)
class RunRecord:
    """One run.json, with lookups that name the file and the key when the key is missing."""

    path: Path
    data: dict

    @classmethod
    def read(cls, path: str | Path) -> RunRecord:
        return cls(Path(path), read_json(path))

    def has(self, key: str) -> bool:
        try:
            self.get(key)
        except InputError:
            return False
        return True

    def get(self, key: str):
        """The value at a dotted key (``training.epochs.0.seconds``; digits index lists)."""
        node = self.data
        for part in key.split("."):
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise InputError(f"{self.path}: missing key {key!r}")
        return node

    @property
    def dataset(self) -> str:
        return self.get("dataset")

    @property
    def seed(self) -> int:
        return self.get("seed")


def e4srec_run_paths(runs_root: str | Path, variant: str = VARIANT) -> list[Path]:
    """The run.json files of one E4SRec variant (the default) under a runs folder, every dataset and seed."""
    return sorted(Path(runs_root).glob(f"*/{MODEL}/{variant}/seed~*/run.json"))


def configuration_variants(runs_root: str | Path) -> list[str]:
    """E4SRec's variants other than the default that train the full model another way (not Figure 3's
    ablations), e.g. paper-batch, with runs under a runs folder."""
    found = {path.parts[-3] for path in Path(runs_root).glob(f"*/{MODEL}/*/seed~*/run.json")}
    return sorted(found - {VARIANT, *E4SREC_ABLATIONS})


def table_variants(runs_root: str | Path) -> dict[str, list[RunRecord]]:
    """The run records of Tables 4 and 5 by variant: the default's (an error when there are none), then
    those of each configuration variant (:func:`configuration_variants`)."""
    return {variant: e4srec_runs(runs_root, variant) for variant in [VARIANT, *configuration_variants(runs_root)]}


def e4srec_runs(runs_root: str | Path, variant: str = VARIANT) -> list[RunRecord]:
    """One E4SRec variant's run records (the default's), by dataset and seed; an error when there are none."""
    paths = e4srec_run_paths(runs_root, variant)
    if not paths:
        raise InputError(f"{runs_root}: no {MODEL} run records "
                         f"({runs_root}/DATASET/{MODEL}/{variant}/seed~N/run.json): train E4SRec first")
    return sorted((RunRecord.read(p) for p in paths), key=lambda run: (run.dataset, run.seed))


def reference_run(runs_root: str | Path, dataset: str) -> RunRecord | None:
    model, variant, seed = REFERENCE
    path = Path(runs_root) / dataset / model / variant / f"seed~{seed}" / "run.json"
    return RunRecord.read(path) if path.is_file() else None


def machine_name(run: RunRecord) -> str:
    """The GPUs a run trained on (``2x NVIDIA H100``), or ``CPU (N cores)``."""
    device = run.get("training.device")
    if device.startswith("cuda"):
        counts = Counter(run.get("machine.gpus"))
        return ", ".join(name if n == 1 else f"{n}x {name}" for name, n in counts.items())
    if device == "cpu":
        return f"CPU ({run.get('machine.cpu_count')} cores)"
    return device


def later_epochs(run: RunRecord) -> list[dict]:
    """The epochs after the first (which pays for compilation and warm-up), or the first alone."""
    epochs = run.get("training.epochs")
    if not epochs:
        raise InputError(f"{run.path}: key 'training.epochs' lists no epoch")
    return [{"seconds": run.get(f"training.epochs.{i}.seconds"), "examples": run.get(f"training.epochs.{i}.examples"),
             "tokens": optional(run, f"training.epochs.{i}.tokens")}
            for i in range(1 if len(epochs) > 1 else 0, len(epochs))]


def optional(run: RunRecord, key: str):
    """The value at ``key``, or None where the record predates it."""
    return run.get(key) if run.has(key) else None


def median_epoch_seconds(run: RunRecord) -> float:
    return statistics.median(epoch["seconds"] for epoch in later_epochs(run))


def backbone_name(run: RunRecord) -> str:
    """The backbone before instruction tuning, its architecture, size and dtype."""
    source = run.get("backbone.parent.source") if run.has("backbone.parent") else run.get("backbone.source")
    millions = run.get("backbone.parameters") / 1e6
    return f"{source} ({run.get('backbone.architecture')}, {millions:.4g}M parameters, {run.get('backbone.dtype')})"


# Table 4 ----------------------------------------------------------------------------------------------

PAPER_TABLE4_QUANTITIES = ("gpu", "backbone", "inference_seconds_per_instance", "backbone_inference_seconds_per_instance",
                           "storage_gb", "backbone_storage_gb", "extra_parameters_share", "storage_ratio_100_models")


def read_paper(paper_tsv: str | Path) -> pd.DataFrame:
    """A paper TSV with every cell a string (empty where the paper gives nothing)."""
    return pd.read_csv(paper_tsv, sep="\t", dtype=str, keep_default_na=False)


def paper_table4_values(paper_tsv: str | Path) -> dict[str, str]:
    """The paper's Table 4 by quantity; an error naming the file when one that Table 4 uses is missing."""
    paper = read_paper(paper_tsv)
    values = dict(zip(paper["quantity"], paper["value"]))
    missing = [q for q in PAPER_TABLE4_QUANTITIES if q not in values]
    if missing:
        raise InputError(f"{paper_tsv}: no row for quantity {', '.join(missing)}")
    return values


def efficiency_rows(run: RunRecord, reference: RunRecord | None, paper: dict[str, str]) -> list[tuple[str, object, object]]:
    """(quantity, ours, paper's) of one E4SRec run; see the module docstring for each quantity."""
    later = later_epochs(run)
    backbone_bytes = run.get("backbone.weights_bytes")
    sizes = {part: run.get(f"components.size_bytes.{part}") for part in ("adapter", "projections", "item_embeddings", "total")}
    share = sizes["total"] / backbone_bytes
    users = run.get("evaluation.users")
    eval_seconds = run.get("evaluation.seconds")
    paper_storage, paper_backbone = float(paper["storage_gb"]), float(paper["backbone_storage_gb"])
    per_instance = eval_seconds / (len(SPLITS) * users)
    tokens = [epoch["tokens"] / epoch["seconds"] for epoch in later if epoch["tokens"] is not None]
    peak_mb = optional(run, "training.peak_memory_mb")
    bare = optional(run, "evaluation.bare_backbone")
    bare_per_instance = bare["seconds"] / bare["users"] if bare else None
    paper_ratio = float(paper["inference_seconds_per_instance"]) / float(paper["backbone_inference_seconds_per_instance"])
    return [
        ("machine", machine_name(run), paper["gpu"]),
        ("backbone", backbone_name(run), paper["backbone"]),
        ("training layout", training_layout(run), "examples"),
        ("training rows per epoch", run.get("training.epochs.0.examples"), None),
        ("epochs run", len(run.get("training.epochs")), None),
        ("first epoch (s, includes compilation)", run.get("training.epochs.0.seconds"), None),
        ("later epochs, median (s)", median_epoch_seconds(run), None),
        ("training rows per second, later epochs (median)",
         statistics.median(epoch["examples"] / epoch["seconds"] for epoch in later), None),
        ("training tokens per second, later epochs (median)", statistics.median(tokens) if tokens else None, None),
        ("training total (s, with per-epoch validation)", run.get("training.train_seconds"), None),
        ("peak memory in training (GiB)", peak_mb / 1024 if peak_mb is not None else None, None),
        (f"{REFERENCE[0]} later epochs, median (s)", median_epoch_seconds(reference) if reference else None, None),
        (f"{REFERENCE[0]} machine", machine_name(reference) if reference else None, None),
        ("evaluation pass (s)", eval_seconds, None),
        ("evaluation users", users, None),
        ("evaluation users per second", users / eval_seconds, None),
        ("evaluation s per ranked instance", per_instance, float(paper["inference_seconds_per_instance"])),
        ("bare backbone forward, users per second", bare["users_per_second"] if bare else None, None),
        ("bare backbone forward, s per instance", bare_per_instance,
         float(paper["backbone_inference_seconds_per_instance"])),
        ("E4SRec / bare backbone, s per instance", per_instance / bare_per_instance if bare else None, paper_ratio),
        ("trainable parameters", run.get("trainable_parameters"), None),
        ("backbone parameters", run.get("backbone.parameters"), None),
        ("trainable / backbone parameters", run.get("trainable_parameters") / run.get("backbone.parameters"),
         float(paper["extra_parameters_share"])),
        ("backbone weights (GB)", backbone_bytes / GB, paper_backbone),
        ("components (GB)", sizes["total"] / GB, paper_storage - paper_backbone),
        ("components: adapter / projections / item table (MB)",
         " / ".join(f"{sizes[part] / MB:.4g}" for part in ("adapter", "projections", "item_embeddings")), None),
        ("E4SRec storage: backbone + components (GB)", (backbone_bytes + sizes["total"]) / GB, paper_storage),
        ("components / backbone weights", share, (paper_storage - paper_backbone) / paper_backbone),
        (f"{N_DATASETS} datasets on one backbone (x backbone)", 1 + N_DATASETS * share,
         float(paper["storage_ratio_100_models"])),
        (f"{N_DATASETS} datasets, a tuned backbone each (x backbone)", N_DATASETS * (1 + share), None),
    ]


def runs_with_references(runs_root: str | Path) -> list[tuple[RunRecord, RunRecord | None]]:
    """Each E4SRec run of Table 4 (the default's, then each configuration variant's, see
    :func:`table_variants`) with its dataset's reference baseline run (None when absent)."""
    return [(run, reference_run(runs_root, run.dataset))
            for runs in table_variants(runs_root).values() for run in runs]


def _table4_frame(pairs: list[tuple[RunRecord, RunRecord | None]], paper_tsv: str | Path) -> pd.DataFrame:
    paper = paper_table4_values(paper_tsv)
    return pd.DataFrame([{"variant": run.get("variant"), "dataset": run.dataset, "seed": run.seed,
                          "quantity": quantity, "value": value, "paper_value": paper_value}
                         for run, reference in pairs
                         for quantity, value, paper_value in efficiency_rows(run, reference, paper)])


def table4(runs_root: str | Path, paper_tsv: str | Path = PAPER_TABLE4) -> pd.DataFrame:
    """Table 4 in long form: one row per (E4SRec run, quantity), the paper's value beside; the
    default variant's runs first, then each configuration variant's."""
    return _table4_frame(runs_with_references(runs_root), paper_tsv)


# Table 5 ----------------------------------------------------------------------------------------------


def training_layout(run: RunRecord) -> str:
    """``examples`` (one prompt per example, the paper's) or ``packed`` (one per user), from ``params``."""
    return run.get("params.training") if run.has("params.training") else "examples"


def configuration(run: RunRecord) -> dict[str, object]:
    """E4SRec's settings as one run recorded them, named as in ``paper/paper_table5.tsv``; a packed
    run's batch size counts users ("16 users"), which never equals the paper's 16 examples."""
    tuned = run.has("backbone.instruction_tuning")
    load_in = run.get("components.config.load_in")
    layout = training_layout(run)
    batch = run.get("training.config.batch_size")
    return {
        "training layout": layout,
        "epochs": run.get("training.config.epochs"),
        "batch size": batch if layout == "examples" else f"{batch} users",
        "learning rate": run.get("training.config.learning_rate"),
        "warmup steps": run.get("training.config.warmup_steps"),
        "weight decay": run.get("training.config.weight_decay"),
        "scheduler": run.get("training.config.scheduler"),
        "LoRA r": run.get("components.config.lora_r"),
        "LoRA alpha": run.get("components.config.lora_alpha"),
        "LoRA dropout": run.get("components.config.lora_dropout"),
        "LoRA target modules": run.get("components.config.target_modules"),
        "backbone": backbone_name(run),
        "backbone weights": run.get("backbone.dtype") if load_in == "none" else load_in,
        "instruction tuning": "yes" if tuned else "no",
        "instruction tuning settings": instruction_tuning_settings(run) if tuned else "none",
    }


def instruction_tuning_settings(run: RunRecord) -> str:
    params = "backbone.instruction_tuning.params"
    data = "backbone.instruction_tuning.data"
    return (f"{run.get(f'{params}.epochs')} epoch(s), batch {run.get(f'{params}.batch_size')}, "
            f"lr {run.get(f'{params}.learning_rate'):g}, warmup {run.get(f'{params}.warmup_steps')}, "
            f"weight decay {run.get(f'{params}.weight_decay'):g}, LoRA {run.get(f'{params}.lora_r')}/"
            f"{run.get(f'{params}.lora_alpha')}/{run.get(f'{params}.lora_dropout'):g} on "
            f"{', '.join(run.get(f'{params}.target_modules'))}; {run.get(f'{data}.trained')} of "
            f"{run.get(f'{data}.records')} records of {Path(run.get(f'{data}.path')).name}")


def display(value) -> str:
    """A setting as the table shows it: lists joined with commas, floats in their shortest form."""
    if isinstance(value, list):
        return ", ".join(map(str, value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def same_as_paper(value, paper_value: str) -> str:
    """yes / no, comparing numbers numerically and lists as sets; n/a where the paper is silent."""
    if not paper_value:
        return "n/a"
    if isinstance(value, list):
        same = {str(v).casefold() for v in value} == {p.strip().casefold() for p in paper_value.split(",")}
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        same = math.isclose(value, float(paper_value), rel_tol=1e-9)
    else:
        same = str(value).casefold() == paper_value.casefold()
    return "yes" if same else "no"


def dataset_configuration(runs: list[RunRecord]) -> dict[str, object]:
    """The settings that every seed of one dataset ran with; an error naming two runs that differ."""
    first, settings = runs[0], configuration(runs[0])
    for run in runs[1:]:
        for setting, value in configuration(run).items():
            if value != settings[setting]:
                raise InputError(f"{run.path}: {setting} is {display(value)}, but {display(settings[setting])} "
                                 f"in {first.path}: seeds of one variant must share the configuration")
    return {**settings, "seeds": ", ".join(str(run.seed) for run in runs)}


def _table5_frame(runs: list[RunRecord], paper_tsv: str | Path, variant: str = VARIANT) -> pd.DataFrame:
    paper = read_paper(paper_tsv).set_index(["dataset", "setting"])
    by_dataset: dict[str, list[RunRecord]] = {}
    for run in runs:
        by_dataset.setdefault(run.dataset, []).append(run)
    rows = []
    for dataset, dataset_runs in by_dataset.items():
        for setting, value in dataset_configuration(dataset_runs).items():
            paper_value, note = paper.loc[(dataset, setting)] if (dataset, setting) in paper.index else ("", "")
            rows.append({"variant": variant, "dataset": dataset, "setting": setting, "value": display(value),
                         "paper_value": paper_value, "same_as_paper": same_as_paper(value, paper_value), "note": note})
    return pd.DataFrame(rows)


def table5(runs_root: str | Path, paper_tsv: str | Path = PAPER_TABLE5,
           by_variant: dict[str, list[RunRecord]] | None = None) -> pd.DataFrame:
    """Table 5 in long form: one row per (variant, dataset, setting), as run and as the paper states it."""
    by_variant = table_variants(runs_root) if by_variant is None else by_variant
    return pd.concat([_table5_frame(runs, paper_tsv, variant) for variant, runs in by_variant.items()],
                     ignore_index=True)


# Rendering --------------------------------------------------------------------------------------------


def format_cell(value) -> str:
    """Integers with thousands separators, floats to 4 significant digits, missing as --."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "--"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def table4_wide(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows quantity, one column per run of one variant (dataset, with the seed when a dataset has
    several), then the paper's."""
    several_seeds = frame.groupby("dataset")["seed"].nunique().gt(1).any()
    frame = frame.assign(run=[f"{paper_name(d)} seed {s}" if several_seeds else paper_name(d)
                              for d, s in zip(frame["dataset"], frame["seed"])],
                         cell=[format_cell(v) for v in frame["value"]])
    quantities = list(dict.fromkeys(frame["quantity"]))
    wide = frame.pivot(index="quantity", columns="run", values="cell").reindex(
        index=quantities, columns=list(dict.fromkeys(frame["run"])))
    wide["paper"] = frame.groupby("quantity", sort=False)["paper_value"].first().map(format_cell)
    wide.index.name = None
    wide.columns.name = None
    return wide


def _provenance(title: str, runs: list[RunRecord], paper_tsv: str | Path) -> dict:
    used = [{"run_record": str(run.path), "commit": run.get("git.commit"), "dirty": run.get("git.dirty")} for run in runs]
    return provenance.record(table=title, paper=str(paper_tsv), runs=used)


def write_table4(runs_root: str | Path, out_dir: str | Path, paper_tsv: str | Path = PAPER_TABLE4) -> pd.DataFrame:
    """table4.{csv,md,tex} and table4.provenance.json in ``out_dir``: rows quantity, columns dataset."""
    pairs = runs_with_references(runs_root)
    frame = _table4_frame(pairs, paper_tsv)
    sections, latex = [f"# {TABLE4_TITLE}\n\n{TABLE4_CAPTION}\n"], []
    for variant, part in frame.groupby("variant", sort=False):
        wide = table4_wide(part.drop(columns="variant"))
        sections.append(f"\n## {MODEL} ({variant})\n\n{wide.to_markdown()}\n")
        latex.append(f"% {MODEL} ({variant})\n{wide.to_latex(escape=True)}")
    sections.append(f"\n## The paper's Table 4 ({paper_tsv})\n\n{read_paper(paper_tsv).to_markdown(index=False)}\n")
    stem = Path(out_dir) / "table4"
    write_csv(stem.with_suffix(".csv"), frame)
    write_text(stem.with_suffix(".md"), "".join(sections))
    write_text(stem.with_suffix(".tex"), f"% {TABLE4_TITLE}\n% {TABLE4_CAPTION}\n" + "\n".join(latex))
    used = [run for pair in pairs for run in pair if run is not None]
    write_json(stem.with_suffix(".provenance.json"), _provenance(TABLE4_TITLE, used, paper_tsv))
    return frame


def write_table5(runs_root: str | Path, out_dir: str | Path, paper_tsv: str | Path = PAPER_TABLE5) -> pd.DataFrame:
    """table5.{csv,md,tex} and table5.provenance.json in ``out_dir``: one section per variant and dataset."""
    by_variant = table_variants(runs_root)
    frame = table5(runs_root, paper_tsv, by_variant)
    sections, latex = [f"# {TABLE5_TITLE}\n\n{TABLE5_CAPTION}\n"], []
    for (variant, dataset), part in frame.groupby(["variant", "dataset"], sort=False):
        heading = paper_name(dataset) if variant == VARIANT else f"{paper_name(dataset)}, variant {variant}"
        view = part.drop(columns=["variant", "dataset"]).rename(columns={"value": "ours", "paper_value": "paper",
                                                                         "same_as_paper": "same as paper"})
        sections.append(f"\n## {heading}\n\n{view.to_markdown(index=False)}\n")
        latex.append(f"% {heading}\n{view.to_latex(index=False, escape=True)}")
    stem = Path(out_dir) / "table5"
    write_csv(stem.with_suffix(".csv"), frame)
    write_text(stem.with_suffix(".md"), "".join(sections))
    write_text(stem.with_suffix(".tex"), f"% {TABLE5_TITLE}\n% {TABLE5_CAPTION}\n" + "\n".join(latex))
    write_json(stem.with_suffix(".provenance.json"),
               _provenance(TABLE5_TITLE, [run for runs in by_variant.values() for run in runs], paper_tsv))
    return frame
