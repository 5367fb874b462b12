#!/usr/bin/env bash
# `giva sft` on the real SmolLM2-135M (offline, `make setup` fetches it), CPU, fp32, on 2 processes, as `accelerate
# launch` with a DeepSpeed configuration runs it: the variables it sets (ACCELERATE_USE_DEEPSPEED and the ZeRO stage),
# which the Trainer reads, under torchrun. (docs/sft.md, "Sharding the base: DeepSpeed ZeRO-3")
#   1. plain torchrun (DDP);
#   2. the same under ZeRO-2;
#   3. the same under ZeRO-3 (the base loaded partitioned, half of it on each process), with DeepSpeed's defaults, and
#      again from a DeepSpeed config file that keeps at most 1e7 gathered parameters live (stage3_max_live_parameters;
#      the default, 1e9, holds all of a 135M model gathered once fetched) and partitions every parameter;
#   4. the same with accelerate launch's FSDP variable (ACCELERATE_USE_FSDP), which Accelerate ignores on CPUs: refused
#      before the model loads (exit status and the line).
# Runs 2 and 3 are compared with run 1: losses, exact match, every saved tensor. Each process's peak resident memory
# (GNU time's maximum RSS) is printed per run: one run at a time, nothing else running.
# DeepSpeed JIT-compiles its CPU collective on first use (minutes; ~/.cache/torch_extensions).
# Usage: bash benchmarks/diagnostics/sft_deepspeed.sh [WORK_DIR] > benchmarks/results/diagnostics/sft_deepspeed_smollm2.txt
NAME=sft-deepspeed; source "$(dirname "$0")/common.sh" "$@"
FLAGS=(--max-steps 6 --batch-size 4 --val-size 8 --max-train-samples 48 --init-mode exact --no-progress --device cpu --json)
rm -rf "$WORK"/ddp* "$WORK"/zero* "$WORK"/fsdp*
mkdir -p "$WORK"
echo "giva sft ${FLAGS[*]} (SmolLM2-135M-Instruct, Pang & Lee as questions), torchrun on 2 processes, giva $(git rev-parse --short HEAD)"
launch() {  # OUT, then environment assignments; each process under GNU time, its peak RSS in OUT.rss.RANK
    local out=$1; shift
    env OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu RSS="$WORK/$out.rss" "$@" "$TORCHRUN" --standalone --nproc_per_node 2 \
        --no-python -- sh -c '/usr/bin/time -f %M -o "$RSS.$RANK" "$@"' sh "$GIVA" sft "${FLAGS[@]}" \
        --output-dir "$WORK/$out" > "$WORK/$out.json" 2> "$WORK/$out.log"
}
launch ddp
launch zero2 ACCELERATE_USE_DEEPSPEED=true ACCELERATE_DEEPSPEED_ZERO_STAGE=2
launch zero3 ACCELERATE_USE_DEEPSPEED=true ACCELERATE_DEEPSPEED_ZERO_STAGE=3
cat > "$WORK/zero3-live.ds.json" <<'JSON'
{"zero_optimization": {"stage": 3, "stage3_max_live_parameters": 1e7, "stage3_prefetch_bucket_size": 1e7,
                       "stage3_param_persistence_threshold": 0, "reduce_bucket_size": 1e7},
 "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
 "gradient_clipping": "auto"}
JSON
launch zero3-live ACCELERATE_USE_DEEPSPEED=true ACCELERATE_DEEPSPEED_CONFIG_FILE="$WORK/zero3-live.ds.json"
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
names = ("ddp", "zero2", "zero3", "zero3-live")
runs = {name: json.load(open(f"{work}/{name}.json")) for name in names}
for name, run in runs.items():
    rss = [int(open(f"{work}/{name}.rss.{rank}").read().split()[-1]) / 1024 for rank in (0, 1)]
    print(f"{name}: processes {run['processes']}, validation loss {run['val_loss_before']:.6f} -> {run['val_loss_after']:.6f}, "
          f"mean training loss {run['train_loss']:.6f}, exact match {run['exact_match_before']} -> {run['exact_match_after']}, "
          f"peak RSS per process {rss[0]:.0f} / {rss[1]:.0f} MiB")
ddp = load_file(f"{work}/ddp/adapter_model.safetensors")
for name in names[1:]:
    other = load_file(f"{work}/{name}/adapter_model.safetensors")
    assert ddp.keys() == other.keys() and all(ddp[k].shape == other[k].shape for k in ddp)
    gaps = {}
    for key in ddp:
        kind = key.rsplit(".", 1)[-1]
        gaps[kind] = max(gaps.get(kind, 0.0), (ddp[key].double() - other[key].double()).abs().max().item())
    top = max(ddp[k].double().abs().max().item() for k in ddp if "giva_lambda" in k)
    print(f"{name} against DDP: {len(ddp)} tensors, largest difference "
          + ", ".join(f"{kind} {gap:.1e}" for kind, gap in sorted(gaps.items())) + f" (largest |vector entry| {top:.2f})")
PY
