#!/bin/bash
# Driver for a 2 x H200 machine (2026-11-28, commit 5fd052b), started once with setsid (it outlives the call).
# Issue "Every paper experiment": the paper profile's 11 missing Figure 3 ablation runs, all through the
# workflow (config/config.yaml + config/gpu-budget.yaml + .device/gpu.yaml), under CUDA MPS, four chains a
# GPU (jobs_per_gpu=4): no-instruct on Yelp (seeds 1, 2), bpr-embeddings on Yelp (0, 1, 2), bert-encoder on
# Sports then Yelp (0, 1, 2; compiled through the overlay's ablation_settings).
cd "$(dirname "$0")/.."
mkdir -p /tmp/e4s/repo && cp -r . /tmp/e4s/repo/ && cd /tmp/e4s/repo
source .device/setup.sh
export XDG_CACHE_HOME=/tmp/cache E4SREC_GIT_COMMIT=$(cat .device/commit) E4SREC_GIT_DIRTY=0 OMP_NUM_THREADS=1
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
L=/tmp/e4s/logs; mkdir -p $L /tmp/cache/e4srec /tmp/e4s/results/paper/runs $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
log() { echo "$* $(date +%T)" >> $L/driver.log; }
cp .device/gpu.yaml /tmp/e4s/gpu.yaml
cp /tmp/payload/gguf/* /tmp/payload/minilm/* /tmp/cache/e4srec/
sha256sum /tmp/cache/e4srec/* >> $L/driver.log
nvidia-smi -L >> $L/driver.log; nproc --all >> $L/driver.log
python3 -c "import torch, transformers, peft, accelerate, snakemake; print(torch.__version__, transformers.__version__, peft.__version__, accelerate.__version__, snakemake.__version__)" >> $L/driver.log 2>&1
nvidia-cuda-mps-control -d >> $L/driver.log 2>&1; log "mps rc=$?"
cp -r /tmp/payload/runs/* /tmp/e4s/results/paper/runs/
smk() { python3 -m snakemake "$@" --rerun-triggers mtime --keep-going --quiet rules --nolock --scheduler greedy \
    --configfile config/config.yaml config/gpu-budget.yaml /tmp/e4s/gpu.yaml; }
R=/tmp/e4s/results/paper/runs
B=/tmp/e4s/resources/backbones
log stage0a
CUDA_VISIBLE_DEVICES=0 smk data $B/embedded /tmp/e4s/resources/encoders/minilm --cores 32 --resources gpu=1 > $L/stage0a.log 2>&1
log "stage0a rc=$?"
find $R -exec touch {} +
touch /tmp/e4s/marker
run() { echo $R/$1/E4SRec/$2/seed~$3/ranks.parquet; }
chain() {  # $1: log name, $2: GPU; then the targets, one after another (four chains share a GPU)
  local name=$1 gpu=$2; shift 2
  for target in "$@"; do
    CUDA_VISIBLE_DEVICES=$gpu smk $target --cores 8 --config jobs_per_gpu=4 --resources gpu=1 >> $L/$name.log 2>&1
    log "$name $target rc=$?"
  done
}
log phase1
chain chainA 0 $(run Yelp no-instruct 1) &
chain chainE 1 $(run Yelp no-instruct 2) &
chain chainC 0 $(run Sports_and_Outdoors bert-encoder 0) $(run Yelp bert-encoder 0) &
chain chainG 1 $(run Sports_and_Outdoors bert-encoder 1) $(run Yelp bert-encoder 1) &
chain chainH 1 $(run Sports_and_Outdoors bert-encoder 2) $(run Yelp bert-encoder 2) &
CUDA_VISIBLE_DEVICES=0 smk $B/embedded-instruct --cores 8 --config jobs_per_gpu=4 --resources gpu=1 > $L/stage0b.log 2>&1
log "stage0b rc=$?"
chain chainB 0 $(run Yelp bpr-embeddings 0) &
chain chainD 0 $(run Yelp bpr-embeddings 2) &
chain chainF 1 $(run Yelp bpr-embeddings 1) &
wait
log "all done"
touch /tmp/e4s/DONE
