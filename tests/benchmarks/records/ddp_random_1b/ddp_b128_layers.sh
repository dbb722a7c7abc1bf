#!/bin/bash
# 128 users a batch, regional compilation (compile_scope layers), 2 epochs, one GPU then DDP on two: the device
# call after ddp_b128_eager.sh on the same machine. It ran as phase 4 of the driver's log.
cd /tmp/e4s/repo && source .device/setup.sh > /dev/null && export XDG_CACHE_HOME=/tmp/cache E4SREC_GIT_COMMIT=$(cat .device/commit) E4SREC_GIT_DIRTY=0 OMP_NUM_THREADS=1
L=/tmp/e4s/logs
R=/tmp/e4s/results/paper/runs
echo "phase4 $(date +%T)" >> $L/driver.log
P='{"training": "packed", "compile_scope": "layers"}'
T='{"batch_size": 128, "epochs": 2, "learning_rate": 0.0006, "warmup_steps": 25, "scheduler": "cosine", "weight_decay": 0.1, "eval_batch_size": 256, "patience": 100, "group_by_length": true, "device": "cuda"}'
A=(--dataset-dir /tmp/e4s/results/paper/data/Beauty --model E4SRec --backbone /tmp/e4s/resources/backbones/random-1b --item-embeddings $R/Beauty/SASRec/default/seed~0/item_embeddings.safetensors --no-progress --seed 0 --params "$P" --train-params "$T")
CUDA_VISIBLE_DEVICES=0 timeout 220 e4srec train "${A[@]}" --out /tmp/e4s/ddp/one_gpu_b128_layers > $L/ddp_one_gpu_b128_layers.log 2>&1
echo "one_gpu_b128_layers rc=$? $(date +%T)" >> $L/driver.log
CUDA_VISIBLE_DEVICES=0,1 timeout 220 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no --main_process_port 0 -m e4srec.cli train "${A[@]}" --out /tmp/e4s/ddp/two_gpus_b128_layers > $L/ddp_two_gpus_b128_layers.log 2>&1
echo "two_gpus_b128_layers rc=$? $(date +%T)" >> $L/driver.log
tail -4 $L/ddp_*layers.log
bash /tmp/e4s/repo/.device/collect.sh 1 | tail -3
