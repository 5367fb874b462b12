#!/usr/bin/env bash
# `giva sft` then `giva merge` on the real SmolLM2-135M (offline, `make setup` fetches it), CPU: the merged folder,
# loaded by transformers alone, against the adapted model it came from (logits on one chat prompt, greedy answer).
# Usage: bash benchmarks/diagnostics/merge_smollm2.sh [WORK_DIR] > benchmarks/results/diagnostics/merge_smollm2.txt
NAME=merge; source "$(dirname "$0")/common.sh" "$@"
rm -rf "$WORK/out" "$WORK/merged"
mkdir -p "$WORK"
FLAGS=(--max-steps 6 --batch-size 4 --val-size 16 --max-train-samples 64 --no-progress --device cpu)
echo "giva sft ${FLAGS[*]}; giva merge OUT MERGED --dtype float32 (SmolLM2-135M-Instruct, giva $(git rev-parse --short HEAD))"
"$GIVA" sft "${FLAGS[@]}" --output-dir "$WORK/out" > "$WORK/sft.log" 2>&1
/usr/bin/time -f "giva merge: %e s wall, %M KB peak resident memory" -o "$WORK/merge.time" "$GIVA" merge "$WORK/out" "$WORK/merged" --dtype float32 > "$WORK/merge.log" 2>&1
cat "$WORK/merge.time"
"$PYTHON" - "$WORK" <<'PY' 2>/dev/null
import sys

import torch
from transformers import AutoModelForCausalLM

from giva.sft.run import load_sft_adapter

work = sys.argv[1]
adapted, tok = load_sft_adapter(f"{work}/out")
merged = AutoModelForCausalLM.from_pretrained(f"{work}/merged").eval()
messages = [{"role": "user", "content": "Review: a gorgeous, witty film.\nIs this review positive or negative? "
                                         "Answer with one word."}]
ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
ids = ids["input_ids"] if hasattr(ids, "keys") else ids
with torch.no_grad():
    a, m = adapted(input_ids=ids).logits, merged(input_ids=ids).logits
    ga = adapted.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
    gm = merged.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
print(f"logits over {ids.shape[1]} prompt tokens: max |merged - adapted| {(a - m).abs().max().item():.3g}, "
      f"largest |logit| {a.abs().max().item():.3g}")
print(f"greedy answers: adapted {tok.decode(ga[0, ids.shape[1]:])!r}, merged {tok.decode(gm[0, ids.shape[1]:])!r}, "
      f"token for token equal: {torch.equal(ga, gm)}")
PY
