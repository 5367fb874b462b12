"""Peak memory and step time of one adapter on the 4-bit SmolLM2-135M (CPU, bitsandbytes), one method per process.

    nice python scripts/quant_step.py --method giva  --steps 6 --json
    nice python scripts/quant_step.py --method qlora --steps 6 --json

Both methods see the same NF4 (double-quantised, fp32 compute) model, the same seeded token batches and AdamW;
GiVA r=8 and LoRA r=8 adapt every linear layer (PEFT's 'all-linear'). The peak is the process's resident set
(VmHWM), reset after the model is loaded and wrapped, so it covers initialisation (GiVA) and training only.
Run each method in its own process: a peak is per process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    """Reset VmHWM to the current resident set (Linux: clear_refs value 5)."""
    Path("/proc/self/clear_refs").write_text("5")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=["giva", "qlora"], required=True)
    parser.add_argument("--steps", type=int, default=6, help="training steps; the first is not timed")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error(f"--steps must be >= 2 (the first step is not timed), got {args.steps}")

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import giva
    from giva.assets import smollm2_path

    torch.manual_seed(0)
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32
    )
    base = AutoModelForCausalLM.from_pretrained(smollm2_path(), quantization_config=quant, dtype=torch.float32)
    if args.method == "giva":
        model = get_peft_model(base, giva.GivaConfig(r=args.r, task_type="CAUSAL_LM"))
    else:
        model = get_peft_model(base, LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules="all-linear", task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.steps):
        ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), generator=generator)
        batches.append({"input_ids": ids, "labels": ids})
    loaded_kib = _rss_kib("VmRSS")
    _reset_peak()

    init_s = 0.0
    if args.method == "giva":
        start = time.perf_counter()
        giva.initialize(model, batches, num_batches=1, mode="sketch", progress=False)
        init_s = time.perf_counter() - start
    init_peak_kib = _rss_kib("VmHWM")
    _reset_peak()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    times, losses = [], []
    for batch in batches:
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(round(loss.item(), 4))
    result = {
        "method": args.method,
        "r": args.r,
        "batch": [args.batch, args.seq],
        "steps": args.steps,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "rss_after_load_mib": round(loaded_kib / 1024, 1),
        "init_peak_rss_mib": round(init_peak_kib / 1024, 1),
        "init_s": round(init_s, 2),
        "train_peak_rss_mib": round(_rss_kib("VmHWM") / 1024, 1),
        "median_step_s": round(statistics.median(times[1:]), 3),
        "losses": losses,
        "torch": torch.__version__,
        "bitsandbytes": __import__("bitsandbytes").__version__,
    }
    print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
