"""GPU-only checks (skipped without CUDA; run on the device machine): the compiled packed training
step of E4SRec, as the trainer drives it, never waits for the GPU."""
from __future__ import annotations

import pytest
import torch

from e4srec import trainer
from e4srec.data import SequenceData
from e4srec.model import E4SRec, E4SRecConfig
from tiny_llm import write_item_embeddings, write_tiny_backbone, write_tiny_dataset

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_compiled_packed_steps_make_no_host_sync(tmp_path, monkeypatch):
    """Batches (host-trimmed, pinned, copied without waiting), the compiled loss and backward, AdamW,
    the token count and the loss bookkeeping of whole epochs run under CUDA's sync debug mode "error":
    any host sync would raise. The first epochs compile every width bucket and record the CUDA graphs."""
    data = SequenceData.load(write_tiny_dataset(tmp_path / "data", n_users=64, n_items=30))
    torch.manual_seed(0)
    model = E4SRec(data.n_items, len(data.user_ids), data.max_len, E4SRecConfig(training="packed", compile="always"),
                   backbone_dir=write_tiny_backbone(tmp_path / "backbone"),
                   item_embeddings=write_item_embeddings(tmp_path / "items.safetensors", data.n_items))
    config = trainer.TrainConfig(device="cuda", batch_size=8, group_by_length=True)
    accelerator = trainer.make_accelerator(config)
    model.to(accelerator.device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.1)
    monkeypatch.setattr(trainer, "LOSS_CHECK_STEPS", 10**9)  # read back at the end of the epoch only

    def epoch(number: int) -> tuple[trainer.StepLosses, torch.Tensor]:
        losses, tokens = trainer.StepLosses(number), torch.zeros((), dtype=torch.long, device=accelerator.device)
        _, batches = trainer.training_batches(model, data, config.batch_size, 0, number, accelerator.device, True)
        for index, batch in enumerate(batches):
            loss = trainer.accumulate_gradients(model, batch, 1.0, 1, accelerator, optimizer, terms=model.loss_terms)
            optimizer.step()
            losses.add(loss, index, index, batch["user"])
            tokens += model.backbone_tokens(batch)
        return losses, tokens

    for number in range(3):  # compiling and CUDA graph recording synchronise
        epoch(number)[0].check()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses, tokens = epoch(3)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(losses.pending) == trainer.training_batches(model, data, 8, 0, 3, "cpu")[0]
    assert losses.check() > 0 and int(tokens) > 0
