"""Time the mixed-adapter forward against itself: stacks reused vs rebuilt, and an older implementation.

    .venv/bin/python scripts/mixed_batch_timing.py --model MiniLM-L6 --ns 8 128 --baseline-rev 10a448c^

For each N (adapters in memory, every linear layer, r=8; each row of the batch a random adapter among N, the
serve benchmark's batch shape, adapters and rows), times interleaved (as `giva bench --suite serve`, one torch
thread): the base model, GiVA as it is (stacked adapter tensors reused across forwards, as in the serve
benchmark and in every decoding step of `generate`), GiVA with the stacks rebuilt in every forward (a new mix
of adapters in every batch), GiVA's `mixed_batch_forward` from ``--baseline-rev`` (read from git), and PEFT
LoRA r=8. Writes ``mixed_batch_timing.json`` / ``.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from peft import get_peft_model

import giva.layer
from giva import serving
from giva.bench.serve import (
    DEFAULT_MODELS,
    _config,
    _forward,
    _threads,
    add_adapter_to_layers,
    fill_stand_in,
    stand_in_shapes,
    time_interleaved,
    tuner_layers,
)

ROOT = Path(__file__).resolve().parents[1]


def baseline_forward(rev: str) -> Callable[..., Any]:
    """``mixed_batch_forward`` of ``src/giva/serving.py`` at git revision ``rev``."""
    source = subprocess.run(
        ["git", "show", f"{rev}:src/giva/serving.py"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as handle:
        handle.write(source)
    spec = importlib.util.spec_from_file_location("giva_serving_baseline", handle.name)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    finally:
        Path(handle.name).unlink()
    return module.mixed_batch_forward


def with_forward(forward: Callable[..., Any], run: Callable[[], Any]) -> Callable[[], Any]:
    def call() -> Any:
        current = giva.layer.mixed_batch_forward
        giva.layer.mixed_batch_forward = forward
        try:
            return run()
        finally:
            giva.layer.mixed_batch_forward = current

    return call


def rebuilt(run: Callable[[], Any]) -> Callable[[], Any]:
    def call() -> Any:
        serving.clear_mixed_batch_cache()
        return run()

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="MiniLM-L6", choices=[m.name for m in DEFAULT_MODELS])
    parser.add_argument("--ns", type=int, nargs="+", default=[8, 128])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--baseline-rev", default=None, help="git revision whose mixed_batch_forward to time too")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve")
    args = parser.parse_args()
    if args.ns != sorted(set(args.ns)) or min(args.ns) < 2:
        sys.exit(f"--ns must be increasing adapter counts >= 2, got {args.ns}")
    spec = next(m for m in DEFAULT_MODELS if m.name == args.model)
    baseline = baseline_forward(args.baseline_rev) if args.baseline_rev else None
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec.vocab_size, (spec.batch_size, spec.seq_len), generator=generator)
    base = spec.load().eval()
    models = {}
    for method in ("giva", "lora"):
        torch.manual_seed(0)
        models[method] = get_peft_model(spec.load().eval(), _config(method, spec.target_modules, 8, False), adapter_name="t0")
    shapes = stand_in_shapes(models["giva"], "t0")
    layers = {method: tuner_layers(model) for method, model in models.items()}
    fill_stand_in(models["giva"], "t0", shapes)
    rows, count = [], 1
    with _threads(1):
        for n in args.ns:
            while count < n:
                for method, model in models.items():
                    add_adapter_to_layers(model, f"t{count}", _config(method, spec.target_modules, 8, False), layers[method])
                fill_stand_in(models["giva"], f"t{count}", shapes)
                count += 1
            names = [f"t{i}" for i in torch.randint(0, n, (spec.batch_size,), generator=generator).tolist()]
            for model in models.values():
                model.eval()
            giva_run = _forward(models["giva"], ids, adapter_names=names)
            fns = {"base model": _forward(base, ids), "GiVA (stacks reused)": giva_run, "GiVA (stacks rebuilt)": rebuilt(giva_run)}
            if baseline is not None:
                fns[f"GiVA at {args.baseline_rev}"] = with_forward(baseline, giva_run)
            fns["LoRA r=8"] = _forward(models["lora"], ids, adapter_names=names)
            times = time_interleaved(fns, args.rounds)
            base_times = times["base model"]
            for label, seconds in times.items():
                rows.append({
                    "model": spec.name, "n_adapters": n, "distinct_in_batch": len(set(names)), "method": label,
                    "tokens_per_s": statistics.median(ids.numel() / s for s in seconds),
                    "vs_base_per_round": statistics.median(b / s for b, s in zip(base_times, seconds)),
                    "vs_lora_per_round": statistics.median(lo / s for lo, s in zip(times["LoRA r=8"], seconds)),
                    "seconds_per_round": seconds,
                })
                print(f"{spec.name} N={n} {label}: {rows[-1]['tokens_per_s']:.0f} tokens/s", flush=True)
    write(args, spec, rows)


def write(args: argparse.Namespace, spec: Any, rows: list[dict[str, Any]]) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"mixed_batch_timing_{spec.name}"
    meta = {"command": " ".join(sys.argv), "torch": torch.__version__, "threads": 1, "rounds": args.rounds,
            "batch": [spec.batch_size, spec.seq_len]}
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        f"# Mixed-batch forward variants, {spec.name}",
        "",
        f"Command: `{meta['command']}`; batch {spec.batch_size} x {spec.seq_len} tokens, one torch thread, "
        f"{args.rounds} interleaved rounds after a warm-up round; ratios are medians of per-round ratios.",
        "",
        "| N | distinct in batch | method | tokens/s | / base model | / LoRA r=8 |",
        "|---:|---:|---|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['n_adapters']} | {row['distinct_in_batch']} | {row['method']} | {row['tokens_per_s']:.0f} | "
            f"{row['vs_base_per_round']:.2f} | {row['vs_lora_per_round']:.2f} |"
        )
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
