#!/usr/bin/env python
"""Write a seeded, randomly initialised LLaMA backbone folder of a chosen size: for timing only.

Issue "Performance", goal 4, asks what DDP gains over one GPU. With the embedded 135M backbone a
training step is bound by per-step overhead, not arithmetic (``paper/PERFORMANCE.md``, "DDP scaling":
on 2 x H200 at commit b97aae9, 2026-11-27, DDP was not faster than one GPU at the same global batch), so no speed-up can
show there. A backbone large enough for the step to be compute-bound shows what DDP (or FSDP, or
4-bit loading) gives at the paper's scale, without downloading weights (no model hub here). Its
scores mean nothing: use it to time training and to check that DDP and one GPU agree (losses,
metrics), never for results.

The tokenizer (so the prompt's token count and the vocabulary) is that of a resolved backbone folder
(``--tokenizer-from``, e.g. ``resources/backbones/embedded``). The shape is a preset or given layer by
layer; the presets are LLaMA shapes: ``1b`` (22 layers, hidden 2048, intermediate 5632, 32 heads, 4
key-value heads: TinyLlama-1.1B's), ``7b`` (32, 4096, 11008, 32, 32: LLaMA2-7B's) and ``13b`` (40,
5120, 13824, 40, 40: LLaMA2-13B's, the paper's backbone). Weights are drawn with the model's own
initialiser (normal, std ``initializer_range``) after ``torch.manual_seed(--seed)``, on ``--device``
(``e4srec.backbone.random_llama``, as the tests' tiny backbone; a GPU builds a 13B model in seconds;
on the CPU the same seed gives the same weights, and a GPU's generator draws other numbers than the
CPU's). The LM head is tied to the token embeddings (E4SRec never reads it). The folder is written like ``e4srec backbone`` writes
one, atomically, with a ``backbone.json`` whose source is ``random-llama`` and which records the seed
and the shape::

    python workflow/scripts/random_backbone.py --preset 1b --tokenizer-from resources/backbones/embedded \\
        --out resources/backbones/random-1b
    e4srec train ... --backbone resources/backbones/random-1b ...
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from e4srec.backbone import DTYPES, load_tokenizer, random_llama, write_backbone_folder  # noqa: E402
from e4srec.files import InputError  # noqa: E402

SHAPE = ("layers", "hidden", "intermediate", "heads", "kv_heads")
PRESETS = {"1b": (22, 2048, 5632, 32, 4), "7b": (32, 4096, 11008, 32, 32), "13b": (40, 5120, 13824, 40, 40)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, help="the backbone folder to write")
    parser.add_argument("--tokenizer-from", required=True, help="a resolved backbone folder whose tokenizer to use")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a LLaMA shape (the options below override it)")
    for name in SHAPE:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cpu", help="where the weights are drawn (cpu, cuda)")
    return parser.parse_args(argv)


def shape_of(args: argparse.Namespace) -> dict[str, int]:
    """The model's shape: the preset's, with every size given on the command line over it."""
    shape = dict(zip(SHAPE, PRESETS[args.preset])) if args.preset else {}
    shape.update({name: getattr(args, name) for name in SHAPE if getattr(args, name) is not None})
    missing = [f"--{name.replace('_', '-')}" for name in SHAPE if name not in shape]
    if missing:
        raise InputError(f"give --preset or every size: missing {', '.join(missing)}")
    if any(value < 1 for value in shape.values()):
        raise InputError(f"every size must be at least 1: {shape}")
    if shape["hidden"] % shape["heads"] or shape["heads"] % shape["kv_heads"]:
        raise InputError(f"--hidden ({shape['hidden']}) must be a multiple of --heads ({shape['heads']}), "
                         f"and --heads of --kv-heads ({shape['kv_heads']})")
    return shape


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        shape = shape_of(args)
        tokenizer = load_tokenizer(args.tokenizer_from)
    except InputError as err:
        print(f"random_backbone: {err}", file=sys.stderr)
        return 2
    model = random_llama(tokenizer, shape["hidden"], shape["intermediate"], shape["layers"], shape["heads"],
                         shape["kv_heads"], args.seed, max_positions=4096, dtype=DTYPES[args.dtype], device=args.device)
    record = {"source": "random-llama", "source_sha256": f"seed {args.seed}",
              "random_init": {"seed": args.seed, **shape, "tokenizer_from": str(args.tokenizer_from),
                              "note": "random weights, for timing only: its scores mean nothing"}}
    written = write_backbone_folder(model, tokenizer, args.out, record, args.dtype)
    print(f"{args.out}: random LLaMA, {written['parameters'] / 1e9:.3g}B parameters ({shape}), seed {args.seed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
