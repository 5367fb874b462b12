#!/usr/bin/env bash
# `giva sft` on the real SmolLM2-135M (offline, `make setup` fetches it), CPU, fp32: the checks of
# docs/sft.md that the tests make on a tiny model, here on the real one and its chat template.
#   1. an uninterrupted run (6 steps of 4 rows in micro-batches of 2, a checkpoint every 2 steps);
#   2. the same command killed with SIGKILL as soon as checkpoint-4 is complete, then rerun with --resume:
#      every saved tensor of the two adapters is compared;
#   3. the same command under torchrun on 2 processes: its bases against the one-process run's.
# Usage: bash benchmarks/diagnostics/sft_resume.sh [WORK_DIR] > benchmarks/results/diagnostics/sft_resume_smollm2.txt
NAME=sft-resume; source "$(dirname "$0")/common.sh" "$@"
FLAGS=(--max-steps 6 --batch-size 4 --micro-batch-size 2 --val-size 8 --max-train-samples 48 --init-mode exact
       --save-steps 2 --no-progress --device cpu)
rm -rf "$WORK"/whole* "$WORK"/cut* "$WORK"/two*
mkdir -p "$WORK"
echo "giva sft ${FLAGS[*]} (SmolLM2-135M-Instruct, Pang & Lee as questions)"

"$GIVA" sft "${FLAGS[@]}" --output-dir "$WORK/whole" > "$WORK/whole.log" 2>&1
echo "1. uninterrupted: $(grep -E '^steps' "$WORK/whole.log")"

setsid "$GIVA" sft "${FLAGS[@]}" --output-dir "$WORK/cut" > "$WORK/cut.log" 2>&1 &  # (setsid: no job notice)
pid=$!
until [ -f "$WORK/cut-checkpoints/checkpoint-4/trainer_state.json" ]; do
    kill -0 "$pid" 2>/dev/null || { echo "the run ended before checkpoint-4"; exit 1; }
    sleep 0.2
done
kill -9 "$pid"
wait "$pid" 2>/dev/null || true
echo "2. killed (SIGKILL) with $(cd "$WORK/cut-checkpoints" && ls -d checkpoint-* | tr '\n' ' ')in the checkpoint folder, no adapter: $([ -e "$WORK/cut" ] && echo present || echo absent)"
"$GIVA" sft "${FLAGS[@]}" --output-dir "$WORK/cut" --resume > "$WORK/resume.log" 2>&1
echo "   resumed: $(grep -E '^steps' "$WORK/resume.log")"

OMP_NUM_THREADS=1 "$TORCHRUN" --standalone --nproc_per_node 2 -- "$GIVA" sft "${FLAGS[@]}" --output-dir "$WORK/two" \
    > "$WORK/two.log" 2>&1
echo "3. torchrun, 2 processes: $(grep -E '^steps' "$WORK/two.log")"

"$PYTHON" - "$WORK" <<'PY'
import sys
import torch
from safetensors.torch import load_file
work = sys.argv[1]
whole, resumed, two = (load_file(f"{work}/{name}/adapter_model.safetensors") for name in ("whole", "cut", "two"))
same = whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
print(f"resumed against uninterrupted: {len(whole)} tensors, bit-identical: {same}")
bases = [k for k in whole if "giva_A" in k]
gap = max((whole[k] - two[k]).abs().max().item() for k in bases)
print(f"torchrun bases against one process: {len(bases)} layers, largest difference {gap:.1e}")
PY
