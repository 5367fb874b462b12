#!/usr/bin/env bash
# `giva sft` on the real SmolLM2-135M (offline, `make setup` fetches it), CPU, fp32, on 2 processes, as `accelerate
# launch` with a DeepSpeed configuration runs it: the variables it sets (ACCELERATE_USE_DEEPSPEED and the ZeRO stage),
# which the Trainer reads, under torchrun. (docs/sft.md, "Batches, gradient accumulation and torchrun")
#   1. plain torchrun (DDP);
#   2. the same under ZeRO-2: its losses and every saved tensor against run 1;
#   3. the same under ZeRO-3: refused before the model loads (exit status and the line);
#   4. the same with accelerate launch's FSDP variable (ACCELERATE_USE_FSDP), which Accelerate ignores on CPUs: refused
#      before the model loads too.
# DeepSpeed JIT-compiles its CPU collective on first use (minutes; ~/.cache/torch_extensions).
# Usage: bash benchmarks/diagnostics/sft_deepspeed.sh [WORK_DIR] > benchmarks/results/diagnostics/sft_deepspeed_smollm2.txt
NAME=sft-deepspeed; source "$(dirname "$0")/common.sh" "$@"
FLAGS=(--max-steps 6 --batch-size 4 --val-size 8 --max-train-samples 48 --init-mode exact --no-progress --device cpu --json)
rm -rf "$WORK"/ddp* "$WORK"/zero* "$WORK"/fsdp*
mkdir -p "$WORK"
echo "giva sft ${FLAGS[*]} (SmolLM2-135M-Instruct, Pang & Lee as questions), torchrun on 2 processes, giva $(git rev-parse --short HEAD)"
launch() {  # OUT, then environment assignments
    local out=$1; shift
    env OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu "$@" "$TORCHRUN" --standalone --nproc_per_node 2 -- "$GIVA" sft "${FLAGS[@]}" \
        --output-dir "$WORK/$out" > "$WORK/$out.json" 2> "$WORK/$out.log"
}
launch ddp
launch zero2 ACCELERATE_USE_DEEPSPEED=true ACCELERATE_DEEPSPEED_ZERO_STAGE=2
set +e
launch zero3 ACCELERATE_USE_DEEPSPEED=true ACCELERATE_DEEPSPEED_ZERO_STAGE=3
status=$?
set -e
echo "3. ZeRO-3: torchrun exit status $status, output folder $([ -e "$WORK/zero3" ] && echo present || echo absent); each process printed:"
grep -h "^giva sft: error" "$WORK/zero3.log" | sed 's/^/   /'
set +e
launch fsdp ACCELERATE_USE_FSDP=true
status=$?
set -e
echo "4. FSDP: torchrun exit status $status, output folder $([ -e "$WORK/fsdp" ] && echo present || echo absent); each process printed:"
grep -h "^giva sft: error" "$WORK/fsdp.log" | sed 's/^/   /'
"$PYTHON" - "$WORK" <<'PY'
import json
import sys

import torch
from safetensors.torch import load_file

work = sys.argv[1]
runs = {name: json.load(open(f"{work}/{name}.json")) for name in ("ddp", "zero2")}
for name, run in runs.items():
    print(f"{name}: processes {run['processes']}, validation loss {run['val_loss_before']:.6f} -> {run['val_loss_after']:.6f}, "
          f"mean training loss {run['train_loss']:.6f}, exact match {run['exact_match_before']} -> {run['exact_match_after']}")
ddp, zero2 = (load_file(f"{work}/{name}/adapter_model.safetensors") for name in ("ddp", "zero2"))
assert ddp.keys() == zero2.keys()
gap = max((ddp[k].double() - zero2[k].double()).abs().max().item() for k in ddp)
print(f"ZeRO-2 against DDP: {len(ddp)} tensors, largest difference {gap:.1e}")
PY
