#!/bin/bash
# One call on a fresh two-H200 machine (2026-11-28 07:34 UTC, commit cae95cd; the machine that ran
# driver_eager.sh was handed back before its last results came back): the random 13B backbone again (same
# seed), then D (DDP, 4-bit NF4) again, then E and F (compile_scope: layers, one GPU and DDP). Each result is copied to $OUT as soon
# as it exists.
set -u
rm -rf /tmp/e4s && mkdir -p /tmp/e4s && cp -r . /tmp/e4s/repo && cd /tmp/e4s/repo
O=$OUT; log() { echo "$* $(date -u +%T)" | tee -a $O/driver.log; }
log start
python3 -m pip install -q --no-index --no-deps --target /tmp/site .d13/kit/whl/*.whl >> $O/driver.log 2>&1
mkdir -p /tmp/site/bin && printf '#!/bin/sh\nexec python3 -m e4srec.cli "$@"\n' > /tmp/site/bin/e4srec && chmod +x /tmp/site/bin/e4srec
export PYTHONPATH=/tmp/site:/tmp/e4s/repo PATH=/tmp/site/bin:$PATH E4SREC_GIT_COMMIT=$(cat .d13/kit/commit) \
  E4SREC_GIT_DIRTY=0 OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
{ nvidia-smi -L; python3 -c "import torch, transformers, peft, accelerate, bitsandbytes as b; print(torch.__version__, transformers.__version__, peft.__version__, accelerate.__version__, b.__version__)"; } >> $O/driver.log 2>&1
K=.d13/kit; B=/tmp/e4s/random-13b; R=/tmp/e4s/runs
CUDA_VISIBLE_DEVICES=0 python3 workflow/scripts/random_backbone.py --preset 13b --seed 0 --tokenizer-from $K/tok \
  --out $B --device cuda > /tmp/e4s/random_backbone.log 2>&1
log "random-13b rc=$?"; cp $B/backbone.json $O/random-13b_backbone.json
T='{"batch_size": 16, "epochs": 2, "learning_rate": 0.0003, "warmup_steps": 25, "scheduler": "cosine", "weight_decay": 0.1, "eval_batch_size": 256, "patience": 100, "group_by_length": true, "oom_retry": true, "device": "cuda"}'
A=(--dataset-dir $K/data --model E4SRec --backbone $B --item-embeddings $K/items.safetensors --no-progress --seed 0 --train-params "$T")
DDP=(accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no --main_process_port 0 -m e4srec.cli train)
fin() { log "$1 rc=$2"; cp $R/$1/run.json $O/$1.json; grep -h "epoch\|HR@10\|Error" /tmp/e4s/$1.log | tail -4 | tee -a $O/driver.log; }
CUDA_VISIBLE_DEVICES=0,1 "${DDP[@]}" "${A[@]}" --params '{"training": "packed", "compile": "never", "load_in": "4bit"}' --out $R/nf4_two_gpus > /tmp/e4s/nf4_two_gpus.log 2>&1
fin nf4_two_gpus $?
L='{"training": "packed", "compile_scope": "layers", "load_in": "none"}'
CUDA_VISIBLE_DEVICES=0 e4srec train "${A[@]}" --params "$L" --out $R/bf16_layers_one_gpu > /tmp/e4s/bf16_layers_one_gpu.log 2>&1
fin bf16_layers_one_gpu $?
CUDA_VISIBLE_DEVICES=0,1 "${DDP[@]}" "${A[@]}" --params "$L" --out $R/bf16_layers_two_gpus > /tmp/e4s/bf16_layers_two_gpus.log 2>&1
fin bf16_layers_two_gpus $?
log done
