#!/bin/bash
# Driver for a 4 x H200 machine (2026-11-27, commit 293a1f5), started once with setsid (it outlives the call).
# E4SRec's paper-batch variant on Yelp, three seeds, each alone on GPU 0, 1 or 2 (jobs_per_gpu=1); on GPU 3,
# two chains of ablation runs side by side under CUDA MPS (jobs_per_gpu=2). All through the workflow.
cd "$(dirname "$0")/.."
mkdir -p /tmp/e4s/repo && cp -r . /tmp/e4s/repo/ && cd /tmp/e4s/repo
source .device/setup.sh
export XDG_CACHE_HOME=/tmp/cache E4SREC_GIT_COMMIT=$(cat .device/commit) E4SREC_GIT_DIRTY=0 OMP_NUM_THREADS=1
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
L=/tmp/e4s/logs; mkdir -p $L /tmp/cache/e4srec /tmp/e4s/results/paper/runs $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
log() { echo "$* $(date +%T)" >> $L/driver.log; }
cp .device/gpu.yaml /tmp/e4s/gpu.yaml
cat /tmp/bb/part_* > /tmp/cache/e4srec/SmolLM2-135M-Instruct.Q4_1.gguf
sha256sum /tmp/cache/e4srec/* >> $L/driver.log
nvidia-smi -L >> $L/driver.log; nproc --all >> $L/driver.log
nvidia-cuda-mps-control -d >> $L/driver.log 2>&1; log "mps rc=$?"
cp -r .device/runs/* /tmp/e4s/results/paper/runs/
smk() { python3 -m snakemake "$@" --rerun-triggers mtime --keep-going --quiet rules --nolock \
    --configfile config/config.yaml config/gpu-budget.yaml /tmp/e4s/gpu.yaml; }
R=/tmp/e4s/results/paper/runs
log stage0
smk data /tmp/e4s/resources/backbones/embedded-instruct /tmp/e4s/resources/backbones/embedded --cores 32 \
    --resources gpu=1 > $L/stage0.log 2>&1
log "stage0 rc=$?"
find $R -exec touch {} +
touch /tmp/e4s/marker
run() { echo $R/$1/E4SRec/$2/seed~$3/ranks.parquet; }
log phaseA
(CUDA_VISIBLE_DEVICES=0,1,2 smk $(for s in 0 1 2; do run Yelp paper-batch $s; done) --cores 48 \
    --config jobs_per_gpu=1 --resources gpu=3 > $L/phaseA.log 2>&1; log "phaseA rc=$?") &
chain() {  # $1: log name; then the targets, one after another on GPU 3 (two chains share it)
  local name=$1; shift
  for target in "$@"; do
    CUDA_VISIBLE_DEVICES=3 smk $target --cores 8 --config jobs_per_gpu=2 --resources gpu=1 >> $L/$name.log 2>&1
    log "$name $target rc=$?"
  done
}
chain chainA $(run Yelp no-instruct 0) $(run Toys_and_Games no-instruct 1) &
sleep 5
chain chainB $(run Sports_and_Outdoors bpr-embeddings 0) $(run Toys_and_Games bpr-embeddings 2) \
    $(run Toys_and_Games no-instruct 2) &
wait
log "all done"
touch /tmp/e4s/DONE
