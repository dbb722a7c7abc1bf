#!/bin/bash
# Driver (2026-11-28 07:13 UTC, commit cae95cd), started detached (setsid) by the first call on a machine asked
# for as TWO H100s (it had two H200s).
# Issue "Performance", goal 4 at the paper's scale: a seeded random LLaMA2-13B-shaped backbone
# (workflow/scripts/random_backbone.py --preset 13b; timing only, its scores mean nothing), E4SRec on
# 2,000 sampled Beauty users (the quick profile's sampling, seed 0; all 12,101 items), packed, eager,
# 16 users a global batch (the paper's), two epochs, the same command throughout:
#   A. one GPU, bf16 weights          } side by side, each on its own GPU
#   B. one GPU, 4-bit NF4 (load_in)   }
#   C. two GPUs, DDP (the rules' `accelerate launch`), bf16 weights
#   D. two GPUs, DDP, 4-bit NF4
# oom_retry is on: a step that runs out of GPU memory is split into micro-batches (recorded).
set -u
rm -rf /tmp/e4s && mkdir -p /tmp/e4s && cp -r . /tmp/e4s/repo && cd /tmp/e4s/repo
O=/tmp/e4s/out; mkdir -p $O
log() { echo "$* $(date -u +%T)" >> $O/driver.log; }
log start
python3 -m pip install -q --no-index --no-deps --target /tmp/site .d13/kit/whl/*.whl >> $O/driver.log 2>&1
mkdir -p /tmp/site/bin && printf '#!/bin/sh\nexec python3 -m e4srec.cli "$@"\n' > /tmp/site/bin/e4srec && chmod +x /tmp/site/bin/e4srec
export PYTHONPATH=/tmp/site:/tmp/e4s/repo PATH=/tmp/site/bin:$PATH E4SREC_GIT_COMMIT=$(cat .d13/kit/commit) \
  E4SREC_GIT_DIRTY=0 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
{ nvidia-smi -L; nproc; free -g | head -2; df -h /tmp | tail -1; } >> $O/driver.log 2>&1
python3 -c "import torch, transformers, peft, accelerate, bitsandbytes as b; print(torch.__version__, transformers.__version__, peft.__version__, accelerate.__version__, b.__version__)" >> $O/driver.log 2>&1
K=.d13/kit; B=/tmp/e4s/random-13b; R=/tmp/e4s/runs
CUDA_VISIBLE_DEVICES=0 python3 workflow/scripts/random_backbone.py --preset 13b --seed 0 --tokenizer-from $K/tok \
  --out $B --device cuda > $O/random_backbone.log 2>&1
log "random-13b rc=$?"; cp $B/backbone.json $O/random-13b_backbone.json
params() { echo "{\"training\": \"packed\", \"compile\": \"never\", \"load_in\": \"$1\"}"; }
T='{"batch_size": 16, "epochs": 2, "learning_rate": 0.0003, "warmup_steps": 25, "scheduler": "cosine", "weight_decay": 0.1, "eval_batch_size": 256, "patience": 100, "group_by_length": true, "oom_retry": true, "device": "cuda"}'
A=(--dataset-dir $K/data --model E4SRec --backbone $B --item-embeddings $K/items.safetensors --no-progress --seed 0 --train-params "$T")
one() {  # name, GPU, load_in
  CUDA_VISIBLE_DEVICES=$2 timeout 540 e4srec train "${A[@]}" --params "$(params $3)" --out $R/$1 > $O/$1.log 2>&1
  log "$1 rc=$?"; cp $R/$1/run.json $O/$1.json; }
two() {  # name, load_in
  CUDA_VISIBLE_DEVICES=0,1 timeout 540 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
    --dynamo_backend no --main_process_port 0 -m e4srec.cli train "${A[@]}" --params "$(params $2)" --out $R/$1 > $O/$1.log 2>&1
  log "$1 rc=$?"; cp $R/$1/run.json $O/$1.json; }
one bf16_one_gpu 0 none &
sleep 2
one nf4_one_gpu 1 4bit &
wait
two bf16_two_gpus none
two nf4_two_gpus 4bit
log done; touch $O/DONE
