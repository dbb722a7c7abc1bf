#!/bin/bash
# One device call on 2 x H200 (2026-11-28 03:48 UTC, at 8654d9c): `e4srec train` (SASRec, 29 seeded users, one epoch)
# under torchrun with NCCL, two processes, with e4srec/runs.py before and after the commit that calls
# accelerator.end_training() once training is done. Prints, per version, how many processes still held
# a process group after the run and how many NCCL warnings about destroy_process_group stderr holds.
export OMP_NUM_THREADS=1
nvidia-smi -L
mkdir -p /tmp/nccl /tmp/old && cp -r e4srec baselines /tmp/old/ && cp .d11/kit/runs_before.py /tmp/old/e4srec/runs.py
PYTHONPATH=$PWD:$PWD/tests python3 -c "
from helpers import prepare_tiny, random_sequences
prepare_tiny('/tmp/nccl/data', random_sequences(29, 40, seed=3, min_len=8, max_len=12), max_len=5)"
cat > /tmp/nccl/worker.py <<'PY'
import sys
import torch
from e4srec import cli

code = cli.main(sys.argv[1:])
print(f"process group after the run: {'held' if torch.distributed.is_initialized() else 'none'}", flush=True)
sys.exit(code)
PY
T='{"epochs": 1, "batch_size": 7, "learning_rate": 0.01, "patience": 10, "eval_batch_size": 64, "device": "cuda"}'
P='{"loss": "ce", "hidden_size": 16, "inner_size": 16}'
for version in before after; do
  root=$PWD; [ $version = before ] && root=/tmp/old
  PYTHONPATH=$root:$PWD/tests python3 -m torch.distributed.run --standalone --nproc_per_node 2 /tmp/nccl/worker.py \
    train --dataset-dir /tmp/nccl/data/prepared --model SASRec --params "$P" --train-params "$T" \
    --out /tmp/nccl/$version --threads 1 --no-progress > $OUT/$version.out 2> $OUT/$version.err
  echo "$version rc=$? held: $(grep -c 'after the run: held' $OUT/$version.out)" \
       "none: $(grep -c 'after the run: none' $OUT/$version.out) NCCL warnings: $(grep -c destroy_process_group $OUT/$version.err)"
  python3 -c "import json; r = json.load(open('/tmp/nccl/$version/run.json')); t = r['training']
print(t['world_size'], t['distributed_type'], r['machine']['gpus'], r['git'])"
done
grep -h destroy_process_group $OUT/*.err | head -3
