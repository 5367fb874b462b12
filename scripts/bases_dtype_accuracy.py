"""What storing A in bf16 (`GivaConfig(bases_dtype="bfloat16")`) does to accuracy, on the VALIDATION split only.

Per seed, two `giva finetune` runs (MiniLM, Pang & Lee, every linear layer, r=8) that differ only in
`bases_dtype`: validation accuracy of each, their paired difference (bf16 - fp32), mean and std over seeds.
Then the fp32-trained adapter alone, evaluated twice on the validation rows: with its fp32 A and with the same
A rounded to bf16 (vectors and head unchanged): max / mean absolute difference of the logits and the accuracy.
The test split is never scored.

    .venv/bin/python scripts/bases_dtype_accuracy.py                 # 3 seeds, giva finetune's defaults
    .venv/bin/python scripts/bases_dtype_accuracy.py --seeds 0 --epochs 0.25 --max-train-samples 200  # smoke

Resumable: finished runs are kept in benchmarks/results/serve/bases_dtype_accuracy.json (same arguments).
Writes that file and bases_dtype_accuracy.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from giva import GivaConfig, GivaLayer
from giva.data import deduplicate, load_text_classification, split_dataset
from giva.finetune import DEFAULT_TARGETS, TrainConfig, finetune, load_finetuned, make_loader

OUT = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "serve" / "bases_dtype_accuracy"
DTYPES = ("float32", "bfloat16")


def validation_logits(model: torch.nn.Module, loader: Any) -> tuple[torch.Tensor, torch.Tensor]:
    logits, labels = [], []
    with torch.inference_mode():
        for batch in loader:
            logits.append(model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float())
            labels.append(batch["labels"])
    return torch.cat(logits), torch.cat(labels)


def rounding_effect(folder: str, max_length: int) -> dict[str, float]:
    """Logits of one fp32-A adapter on the validation rows, with its A as trained vs rounded to bf16."""
    model, tokenizer = load_finetuned(folder)
    # finetune's split (repeats dropped, seed 0); only the validation part is used.
    _, val_set, _ = split_dataset(deduplicate(load_text_classification("pang-lee")), test_size=1000, val_size=400, seed=0)
    loader = make_loader(tokenizer, val_set, 64, max_length, False)
    exact, labels = validation_logits(model, loader)
    for layer in (m for m in model.modules() if isinstance(m, GivaLayer)):
        for name in list(layer.giva_A.keys()):
            layer.giva_A[name] = layer.giva_A[name].to(torch.bfloat16).float()
    rounded, _ = validation_logits(model, loader)
    diff = (rounded - exact).abs()
    return {
        "logits_max_abs_diff": diff.max().item(),
        "logits_mean_abs_diff": diff.mean().item(),
        "logits_mean_abs": exact.abs().mean().item(),
        "predictions_changed": int((rounded.argmax(-1) != exact.argmax(-1)).sum()),
        "val_accuracy_fp32_A": (exact.argmax(-1) == labels).float().mean().item(),
        "val_accuracy_A_rounded_to_bf16": (rounded.argmax(-1) == labels).float().mean().item(),
        "n_val": len(labels),
    }


def run(seed: int, dtype: str, args: argparse.Namespace) -> dict[str, Any]:
    config = GivaConfig(r=8, target_modules=DEFAULT_TARGETS, task_type="SEQ_CLS", seed=seed, bases_dtype=dtype)
    train_config = TrainConfig(epochs=args.epochs, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        folder = str(Path(tmp) / "out")
        result = finetune(
            giva_config=config,
            train_config=train_config,
            max_train_samples=args.max_train_samples,
            output_dir=folder,
            progress=False,
        )
        row = {"seed": seed, "bases_dtype": dtype, "val_accuracy": result.accuracy_after,
               "n_train": result.config["n_train"], "n_val": result.config["n_val"],
               "train_seconds": result.train_seconds, "adapter_bytes": result.adapter_bytes}
        if dtype == "float32":
            row["rounding"] = rounding_effect(folder, train_config.max_length)
    return row


def summarise(runs: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    acc = {(r["seed"], r["bases_dtype"]): r["val_accuracy"] for r in runs}
    done = [s for s in seeds if all((s, d) in acc for d in DTYPES)]
    if not done:
        return {}

    def mean_std(values: list[float]) -> dict[str, float]:
        return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}

    rounding = [r["rounding"] for r in runs if "rounding" in r and r["seed"] in done]
    return {
        "seeds": done,
        "val_accuracy": {d: mean_std([acc[(s, d)] for s in done]) for d in DTYPES},
        "paired_difference_bf16_minus_fp32": mean_std([acc[(s, "bfloat16")] - acc[(s, "float32")] for s in done]),
        "rounding_logits_max_abs_diff": max(r["logits_max_abs_diff"] for r in rounding),
        "rounding_logits_mean_abs_diff": statistics.mean(r["logits_mean_abs_diff"] for r in rounding),
        "rounding_predictions_changed": sum(r["predictions_changed"] for r in rounding),
    }


def write_markdown(path: Path, args: argparse.Namespace, runs: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    lines = [
        "# Accuracy with A stored in bf16 (`bases_dtype=\"bfloat16\"`), validation split",
        "",
        f"Command: `.venv/bin/python scripts/bases_dtype_accuracy.py --seeds {' '.join(map(str, args.seeds))} "
        f"--epochs {args.epochs:g}" + (f" --max-train-samples {args.max_train_samples}" if args.max_train_samples else "") + "`. "
        "MiniLM-L6, Pang & Lee, GiVA r=8 on every linear layer, `giva finetune`'s defaults otherwise; the two runs "
        "of a seed differ only in `bases_dtype`. The test split is never scored.",
        "",
        "| seed | val acc, A fp32 | val acc, A bf16 | bf16 - fp32 | fp32-trained adapter with A rounded to bf16: "
        "max / mean abs logit change (mean abs logit) | predictions changed | val acc with rounded A |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by = {(r["seed"], r["bases_dtype"]): r for r in runs}
    for seed in args.seeds:
        fp32, bf16 = by.get((seed, "float32")), by.get((seed, "bfloat16"))
        if not (fp32 and bf16):
            continue
        rd = fp32["rounding"]
        lines.append(
            f"| {seed} | {fp32['val_accuracy']:.2%} | {bf16['val_accuracy']:.2%} | "
            f"{(bf16['val_accuracy'] - fp32['val_accuracy']) * 100:+.2f} pt | {rd['logits_max_abs_diff']:.2e} / "
            f"{rd['logits_mean_abs_diff']:.2e} ({rd['logits_mean_abs']:.2f}) | {rd['predictions_changed']} of {rd['n_val']} | "
            f"{rd['val_accuracy_A_rounded_to_bf16']:.2%} |"
        )
    if summary:
        va, diff = summary["val_accuracy"], summary["paired_difference_bf16_minus_fp32"]
        lines += [
            "",
            f"Over {len(summary['seeds'])} seeds: validation accuracy A fp32 {va['float32']['mean']:.2%} ± "
            f"{va['float32']['std']:.2%}, A bf16 {va['bfloat16']['mean']:.2%} ± {va['bfloat16']['std']:.2%} (mean ± std); "
            f"paired difference bf16 - fp32 {diff['mean'] * 100:+.2f} ± {diff['std'] * 100:.2f} pt. Rounding a trained "
            f"fp32 A to bf16: logits change by at most {summary['rounding_logits_max_abs_diff']:.2e} "
            f"(mean {summary['rounding_logits_mean_abs_diff']:.2e}); {summary['rounding_predictions_changed']} validation "
            "prediction(s) changed in all.",
        ]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=float, default=TrainConfig().epochs)
    parser.add_argument("--max-train-samples", type=int, default=None, help="default: the whole training split")
    parser.add_argument("--output", default=str(OUT), help="path stem of the .json / .md results")
    args = parser.parse_args()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    key = {"epochs": args.epochs, "max_train_samples": args.max_train_samples}
    json_path = out.with_suffix(".json")
    runs: list[dict[str, Any]] = []
    if json_path.is_file():
        previous = json.loads(json_path.read_text())
        if previous.get("args", {}).get("epochs") == key["epochs"] and previous["args"].get("max_train_samples") == key["max_train_samples"]:
            runs = previous.get("runs", [])
    for seed in args.seeds:
        for dtype in DTYPES:
            if any(r["seed"] == seed and r["bases_dtype"] == dtype for r in runs):
                continue
            runs.append(run(seed, dtype, args))
            print(runs[-1], flush=True)
            summary = summarise(runs, args.seeds)
            json_path.write_text(json.dumps({"args": {**key, "seeds": args.seeds}, "runs": runs, "summary": summary}, indent=2) + "\n")
            write_markdown(out.with_suffix(".md"), args, runs, summary)
    summary = summarise(runs, args.seeds)
    json_path.write_text(json.dumps({"args": {**key, "seeds": args.seeds}, "runs": runs, "summary": summary}, indent=2) + "\n")
    write_markdown(out.with_suffix(".md"), args, runs, summary)
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
