#!/usr/bin/env python
"""What one E4SRec training step keeps for its backward pass: a bf16 backbone against the dtypes of
the 4-bit path (issue "Performance", goal 4). A CPU experiment; no GPU and no bitsandbytes needed.

On two H200s (2026-11-28, commit cae95cd; ``paper/PERFORMANCE.md``, "4-bit NF4 against bf16 at 13B";
record ``tests/benchmarks/records/scale_13b``) a LLaMA2-13B-shaped backbone
loaded in 4-bit NF4 peaked at as much GPU memory on one GPU as in bf16, although its weights are a
quarter the size. ``load_in: 4bit`` goes through peft's ``prepare_model_for_kbit_training``, which
casts every weight that is not quantised (the token embeddings, the RMSNorms) to float32. E4SRec feeds
the backbone embeddings in the token embeddings' dtype, so the residual stream would then run in
float32, and the activations saved for backward would grow.

This script measures that on the CPU. It builds E4SRec twice on the same backbone folder, loaded in
bf16: (``bf16``) as ``load_in: none`` builds it; (``4-bit path dtypes``) through the same
``E4SRec._add_lora`` with the backbone marked as loaded in 4 bits, so that peft's preparation runs
exactly as it does for a 4-bit model, after which the linear layers' weights (which a 4-bit model keeps
quantised, untouched by the cast) are put back to bf16. Then it runs one training forward (packed
training, no shared prefix: as on a GPU) on the same batch under bf16 autocast and adds up the
tensors autograd saves for the backward pass (each storage once, parameters not counted), by dtype.
The 4-bit weights themselves and bitsandbytes' kernels are not modelled: only the dtypes around them.

    python workflow/scripts/kbit_saved_activations.py --backbone resources/backbones/embedded \\
        --dataset-dir results/paper/data/Beauty --item-embeddings ITEMS.safetensors --out saved.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from e4srec.backbone import load_backbone, load_tokenizer, read_backbone_record  # noqa: E402
from e4srec.data import SequenceData  # noqa: E402
from e4srec.files import InputError, sha256_file, write_json  # noqa: E402
from e4srec.model import E4SRec, E4SRecConfig  # noqa: E402
from e4srec.provenance import record  # noqa: E402
from e4srec.trainer import load_trainable_state, trainable_state, training_batches  # noqa: E402


def build(backbone_dir: Path, data: SequenceData, item_embeddings: Path, seed: int) -> dict[str, E4SRec]:
    """E4SRec on ``backbone_dir`` in bf16 (packed training, no shared prefix), and the same with the
    4-bit path's dtypes (see the module's docstring), starting from the same trainable weights."""
    config = E4SRecConfig(training="packed", share_prefix="never", compile="never", backbone_dtype="bfloat16")
    torch.manual_seed(seed)
    bf16 = E4SRec(data.n_items, data.n_users, data.max_len, config=config, item_embeddings=str(item_embeddings),
                  backbone_dir=str(backbone_dir))  # as load_in: none builds it
    base = load_backbone(backbone_dir, dtype=torch.bfloat16)
    base.is_loaded_in_4bit = True  # _add_lora then prepares it as it prepares a 4-bit model
    linear_weights = [module.weight for module in base.modules() if isinstance(module, torch.nn.Linear)]
    backbone = bf16._add_lora(base, bf16.adapter_name)
    for weight in linear_weights:  # quantised in a 4-bit model, so never cast to float32 there
        weight.data = weight.data.to(torch.bfloat16)
    kbit = E4SRec(data.n_items, data.n_users, data.max_len, config=config, item_embeddings=str(item_embeddings),
                  backbone=backbone, tokenizer=load_tokenizer(backbone_dir),
                  backbone_record=read_backbone_record(backbone_dir))
    load_trainable_state(kbit, trainable_state(bf16), "the bf16 model")
    return {"bf16": bf16.train(), "4-bit path dtypes": kbit.train()}


def one_step(model: E4SRec, batch: dict) -> dict:
    """One training forward under bf16 autocast: the bytes of the tensors autograd saves for backward
    (each storage once, parameters left out), in total and by dtype; the dtype of the hidden states
    between decoder layers (the residual stream); and the loss."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple[str, int]] = {}
    residual: list[torch.dtype] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters and storage.nbytes():
            seen[storage.data_ptr()] = (str(tensor.dtype).removeprefix("torch."), storage.nbytes())
        return tensor

    hook = model.backbone.get_base_model().layers[0].register_forward_hook(
        lambda module, args, output: residual.append((output[0] if isinstance(output, tuple) else output).dtype))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(batch)
    finally:
        hook.remove()
    by_dtype: dict[str, int] = {}
    for dtype, nbytes in seen.values():
        by_dtype[dtype] = by_dtype.get(dtype, 0) + nbytes
    return {"saved_bytes": sum(by_dtype.values()), "by_dtype": dict(sorted(by_dtype.items())),
            "loss": float(loss.detach().float()), "residual_stream_dtype": str(residual[0]).removeprefix("torch.")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--backbone", required=True, help="a resolved backbone folder")
    parser.add_argument("--dataset-dir", required=True, help="a prepared dataset folder")
    parser.add_argument("--item-embeddings", required=True, help="a SASRec item table (safetensors)")
    parser.add_argument("--users", type=int, default=16, help="users in the batch (the paper's batch: 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="the JSON record to write")
    args = parser.parse_args(argv)
    try:
        data = SequenceData.load(args.dataset_dir)
        models = build(Path(args.backbone), data, Path(args.item_embeddings), args.seed)
    except (InputError, OSError) as err:  # a missing or malformed input
        print(f"kbit_saved_activations: {err}", file=sys.stderr)
        return 2
    _, batches = training_batches(models["bf16"], data, args.users, args.seed, 0, "cpu", group_by_length=False)
    batch = next(batches)
    results = {}
    for variant, model in models.items():
        torch.manual_seed(args.seed)
        results[variant] = one_step(model, batch)
    ratio = results["4-bit path dtypes"]["saved_bytes"] / results["bf16"]["saved_bytes"]
    write_json(args.out, record(
        experiment="saved-for-backward bytes of one E4SRec training step: bf16 against the 4-bit path's dtypes (CPU)",
        backbone=read_backbone_record(args.backbone), dataset=data.name,
        inputs={"sequences.parquet": sha256_file(Path(args.dataset_dir) / "sequences.parquet"),
                "item_embeddings": sha256_file(args.item_embeddings)}, users=len(batch["user"]),
        positions=int((batch["sequence"] > 0).sum()), seed=args.seed, results=results, ratio=ratio))
    for variant, result in results.items():
        print(f"{variant}: {result['saved_bytes'] / 2**20:.1f} MiB saved for backward "
              f"({', '.join(f'{k} {v / 2**20:.1f}' for k, v in result['by_dtype'].items())}), residual stream "
              f"{result['residual_stream_dtype']}, loss {result['loss']:.4f}")
    print(f"ratio: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
