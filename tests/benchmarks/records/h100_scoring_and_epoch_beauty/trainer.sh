#!/bin/bash
# One device call on ONE H100 (2026-11-28 05:48 UTC, commit c93a021), after the first call left the GGUF's first half in /tmp/bb; ONE H100,
# alone. Issue "Performance", goal 1 by the trainer itself: `e4srec train`, Beauty, packed, 64 users a batch,
# learning rate 6e-4 (the setting of the 2026-11-27 H200 runs at f386853, seed 1), compiled step, two epochs: epoch 0
# compiles the three width buckets, epoch 1 is the trainer's own warm epoch. The backbone is the embedded
# one without instruction tuning (timing only; the metrics of this setting are the H200 runs' records).
cp .gpu/b/* /tmp/bb/ && cat /tmp/bb/part_* > /tmp/bb/SmolLM2-135M-Instruct.Q4_1.gguf
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl
export PYTHONPATH=/tmp/site:$PWD E4SREC_GIT_COMMIT=$(cat .d12/kit/commit) E4SREC_GIT_DIRTY=0 OMP_NUM_THREADS=4 \
  PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi -L; date -u +%FT%TZ
python3 -m e4srec.cli backbone --spec /tmp/bb/SmolLM2-135M-Instruct.Q4_1.gguf --out /tmp/bbres > $OUT/backbone.log 2>&1
echo "backbone rc=$?"
T='{"batch_size": 64, "epochs": 2, "learning_rate": 0.0006, "warmup_steps": 25, "scheduler": "cosine", "weight_decay": 0.1, "eval_batch_size": 256, "patience": 100, "group_by_length": true, "device": "cuda"}'
timeout 480 python3 -m e4srec.cli train --dataset-dir .d12/kit/data --model E4SRec --backbone /tmp/bbres \
  --item-embeddings .d12/kit/items.safetensors --no-progress --seed 1 \
  --params '{"training":"packed","compile_scope":"step"}' --train-params "$T" --out $OUT/trainer64 > $OUT/train.log 2>&1
echo "train rc=$? $(date -u +%T)"; rm -rf $OUT/trainer64/components $OUT/trainer64/checkpoints
grep -h "epoch\|HR" $OUT/train.log | tail -8
