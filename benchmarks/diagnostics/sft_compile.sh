#!/usr/bin/env bash
# `giva sft --torch-compile` against eager on the real SmolLM2-135M (offline, `make setup` fetches it), CPU, fp32, one
# process: each run for 10 and for 40 optimizer steps, so that (time of 40 - time of 10) / 30 is the step time once
# compiled and the difference of the 10-step times is what compiling cost. Each compiled run starts from an empty
# inductor cache of its own (TORCHINDUCTOR_CACHE_DIR): with the first run's cache the second compiled in less time,
# and the difference meant nothing. Then the two 40-step adapters against each other. train_seconds: the Trainer's loop (GiVA's initialisation, eager in both, is init_seconds). Last, `giva generate`
# with the eager 10-step adapter and without it (--base), on a review of the form the run trained on.
# (docs/sft.md, "Compiling the step")
# Usage: bash benchmarks/diagnostics/sft_compile.sh [WORK_DIR] > benchmarks/results/diagnostics/sft_compile_smollm2.txt
NAME=sft-compile; source "$(dirname "$0")/common.sh" "$@"
FLAGS=(--batch-size 8 --val-size 16 --max-train-samples 320 --init-mode sketch --no-progress --device cpu --json)
rm -rf "$WORK"/eager-* "$WORK"/compiled-*
mkdir -p "$WORK"
echo "giva sft ${FLAGS[*]} (SmolLM2-135M-Instruct, Pang & Lee as questions), $(nproc) CPUs, giva $(git rev-parse --short HEAD)"
for steps in 10 40; do
    "$GIVA" sft "${FLAGS[@]}" --max-steps "$steps" --output-dir "$WORK/eager-$steps" > "$WORK/eager-$steps.json" 2> "$WORK/eager-$steps.log"
    rm -rf "$WORK/inductor-$steps"
    TORCHINDUCTOR_CACHE_DIR="$WORK/inductor-$steps" "$GIVA" sft "${FLAGS[@]}" --max-steps "$steps" --torch-compile \
        --output-dir "$WORK/compiled-$steps" > "$WORK/compiled-$steps.json" 2> "$WORK/compiled-$steps.log"
done
"$PYTHON" - "$WORK" <<'PY'
import json
import sys

from safetensors.torch import load_file

work = sys.argv[1]
runs = {f"{kind}-{steps}": json.load(open(f"{work}/{kind}-{steps}.json")) for kind in ("eager", "compiled") for steps in (10, 40)}
for name, run in runs.items():
    print(f"{name:12s} train {run['train_seconds']:7.1f} s, validation loss {run['val_loss_before']:.6f} -> "
          f"{run['val_loss_after']:.6f}, mean training loss {run['train_loss']:.6f}, versions {run['versions']['torch']}")
step = {kind: (runs[f"{kind}-40"]["train_seconds"] - runs[f"{kind}-10"]["train_seconds"]) / 30 for kind in ("eager", "compiled")}
print(f"step time over steps 11-40: eager {step['eager']:.3f} s, compiled {step['compiled']:.3f} s "
      f"({step['compiled'] / step['eager']:.3f}x eager)")
print(f"compiling cost (10-step runs, compiled - eager): {runs['compiled-10']['train_seconds'] - runs['eager-10']['train_seconds']:.1f} s")
eager, compiled = (load_file(f"{work}/{kind}-40/adapter_model.safetensors") for kind in ("eager", "compiled"))
assert eager.keys() == compiled.keys() and eager
same = [k for k in eager if not eager[k].is_floating_point() or k.endswith(".giva_A")]  # checksums; the bases
trained = [k for k in eager if k not in same]
print(f"40-step adapters: {len(eager)} tensors; the {len(same)} bases and checksums "
      f"{'identical' if all(eager[k].equal(compiled[k]) for k in same) else 'NOT identical'}; the {len(trained)} trained "
      "vectors' largest difference, over the tensor's largest entry: "
      f"{max(((eager[k] - compiled[k]).abs().max() / eager[k].abs().max()).item() for k in trained):.1e}")
PY
echo "giva generate $WORK/eager-10 (review, greedy) --base:"
"$GIVA" generate "$WORK/eager-10" "$(printf 'Review: a gorgeous, moving film.\nIs this review positive or negative? Answer with one word.')" \
    --base --max-new-tokens 16 --device cpu --no-progress 2> "$WORK/generate.log"
