#!/bin/bash
# Driver on ONE H100 (2026-11-28 05:27 UTC, commit a6975cc), started detached (setsid) by the second call, after the
# first call left the GGUF's first half in /tmp/bb. Issue "Performance", goals 1 and 2, on the H100:
#   A. goal 2, speed: full-catalogue scoring of all 22,363 Beauty users in bf16: the padded reference
#      (batch 256), packed eager and packed compiled (one batch, 1,048,576 positions a pass), padded at
#      batch 16,384; the bare backbone.
#   B. goal 2, identity: the same in float64 throughout (e4srec.model.compute_in_float64): the padded
#      reference (batch 256), packed eager and packed compiled (262,144 positions a pass), user by user.
#   C. goal 1: the reference (eager, one prompt per example, batch 16: median step) and the packed,
#      compiled, length-grouped epoch at 64 users a batch (warm-up epoch compiles, then one timed).
# The GPU runs one part at a time; nothing else runs on the machine. Logs and JSON go to /tmp/e4s/out.
set -u
rm -rf /tmp/e4s && mkdir -p /tmp/e4s && cp -r . /tmp/e4s/repo && cd /tmp/e4s/repo
O=/tmp/e4s/out; mkdir -p $O /tmp/cache/e4srec
log() { echo "$* $(date -u +%T)" >> $O/driver.log; }
log start
cat /tmp/bb/part_* > /tmp/cache/e4srec/SmolLM2-135M-Instruct.Q4_1.gguf
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl >> $O/driver.log 2>&1
export PYTHONPATH=/tmp/site XDG_CACHE_HOME=/tmp/cache E4SREC_GIT_COMMIT=$(cat .d12/kit/commit) E4SREC_GIT_DIRTY=0 \
  OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
sha256sum /tmp/cache/e4srec/*.gguf >> $O/driver.log
nvidia-smi -L >> $O/driver.log; nproc >> $O/driver.log
python3 -c "import torch, transformers, peft, accelerate; print(torch.__version__, transformers.__version__, peft.__version__, accelerate.__version__)" >> $O/driver.log 2>&1
K=.d12/kit
bench() { local name=$1; shift
  python3 workflow/scripts/gpu_benchmark.py --dataset-dir $K/data --backbone embedded --backbone-cache /tmp/e4s/bb \
    --item-embeddings $K/items.safetensors --sasrec-losses --out $O/$name.json "$@" > $O/$name.log 2>&1
  log "$name rc=$?"; }
bench scoring_bf16 --trainings --eval-users 0 --eval-batch-size 256 --bare-backbone \
  --eval-settings 22363:1048576 22363:1048576:compiled 16384:1048576:padded
bench scoring_float64 --trainings --eval-users 0 --eval-batch-size 256 --skip-model-precision --eval-float64 \
  --eval-settings 22363:262144 22363:262144:compiled
bench epoch_reference_eager_examples16 --trainings examples --modes eager --batch-sizes 16 --eval-users 256 --eval-settings
bench epoch_packed_compiled_b64 --trainings --modes compiled --packed-batch-sizes 64 --epoch --eval-users 256 --eval-settings
log done; touch $O/DONE
