"""Fine-tuning accuracy with sketched vs exact GiVA bases: `giva finetune --init-mode {sketch,exact} --seed S`.

Runs the grid (modes x seeds) one `giva finetune --no-progress --json` process at a time, appends each
run to the JSON as it finishes (an interrupted grid resumes where it stopped), and writes the table:
VALIDATION accuracy (the command never scores the test split) per run, mean +- std per mode, and the
paired difference sketch - exact over the seeds both modes finished.

    .venv/bin/python scripts/sketch_vs_exact_finetune.py --seeds 0 1 2 -- --epochs 1

Arguments after ``--`` go to every `giva finetune` run alike (both modes get the same recipe).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from finetune_cli import giva_finetune

MODES = ("sketch", "exact")
OUT = Path("benchmarks/results/scale/sketch_vs_exact_finetune.json")


def run(mode: str, seed: int, extra: list[str]) -> dict:
    result, wall = giva_finetune("--init-mode", mode, "--seed", str(seed), *extra)
    return {
        "mode": mode, "seed": seed, "accuracy_before": result["accuracy_before"], "val_accuracy": result["accuracy_after"],
        "init_seconds": result["init_seconds"], "train_seconds": result["train_seconds"],
        "wall_seconds": wall, "init_mode_used": result["config"]["init_mode_used"],
        "init_passes": result["config"]["init_passes"], "config": result["config"], "load_average": os.getloadavg()[0],
    }


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * std:.2f}"


def summarise(results: dict) -> dict:
    runs = results["runs"]
    by = {(r["mode"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    paired = [by["sketch", s]["val_accuracy"] - by["exact", s]["val_accuracy"] for s in seeds if ("sketch", s) in by and ("exact", s) in by]
    return {
        "per_mode": {m: [by[m, s]["val_accuracy"] for s in seeds if (m, s) in by] for m in MODES},
        "paired_seeds": [s for s in seeds if ("sketch", s) in by and ("exact", s) in by],
        "paired_differences": paired,
    }


def write_md(path: Path, results: dict) -> None:
    summary = results["summary"]
    lines = [
        "# Fine-tuning accuracy: sketched vs exact GiVA bases (`giva finetune`)",
        "",
        "Written by `scripts/sketch_vs_exact_finetune.py`; records in the JSON next to this file.",
        f"Command: `{results['command']}`",
        "",
        "Each run: `giva finetune --no-progress --json --init-mode MODE --seed SEED "
        + " ".join(results["extra"]) + "` (MiniLM-L6 + Pang & Lee unless the extra arguments say otherwise). "
        "Accuracy is on the VALIDATION split (the test split is never scored); the seed sets the GiVA seed, "
        "the head initialisation and the data order, the split is fixed. Times in s, measured on a shared 2-core "
        "machine (load average per run).",
        "",
        "| mode | seed | val accuracy before | val accuracy after | init s | train s | passes | load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results["runs"], key=lambda r: (r["mode"], r["seed"])):
        lines.append(
            f"| {r['mode']} | {r['seed']} | {100 * r['accuracy_before']:.2f} | {100 * r['val_accuracy']:.2f} | "
            f"{r['init_seconds']:.1f} | {r['train_seconds']:.1f} | {r['init_passes']} | {r['load_average']:.1f} |"
        )
    diffs = summary["paired_differences"]
    lines += [
        "",
        "| | validation accuracy, % (mean ± std over seeds) |",
        "|---|---|",
        *[f"| {m} | {_mean_std(v)} (n={len(v)}) |" for m, v in summary["per_mode"].items()],
        f"| sketch - exact, paired by seed | {_mean_std(diffs)} points (n={len(diffs)}; "
        + ", ".join(f"{100 * d:+.2f}" for d in diffs) + ") |",
    ]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no run that would end past this many seconds (judged by the runs so far); rerun to resume")
    args = parser.parse_args(own)
    started = time.perf_counter()
    results = json.loads(args.out.read_text()) if args.out.exists() else {"runs": []}
    if results.get("extra", extra) != extra:
        raise SystemExit(f"{args.out} holds runs with extra arguments {results['extra']}, not {extra}: use another --out")
    results.update(extra=extra, command=" ".join(["python", sys.argv[0], *argv]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for mode in MODES:
            if any(r["mode"] == mode and r["seed"] == seed for r in results["runs"]):
                continue
            walls = [r["wall_seconds"] for r in results["runs"]]
            if args.budget_s and walls and time.perf_counter() - started + max(walls) > args.budget_s:
                print(f"stopping: the next run would pass --budget-s {args.budget_s:.0f}; rerun to resume", flush=True)
                break
            record = run(mode, seed, extra)
            results["runs"].append(record)
            results["summary"] = summarise(results)
            args.out.write_text(json.dumps(results, indent=1))
            write_md(args.out.with_suffix(".md"), results)
            print(json.dumps({k: record[k] for k in ("mode", "seed", "val_accuracy", "init_seconds", "train_seconds")}), flush=True)
    results["summary"] = summarise(results)
    args.out.write_text(json.dumps(results, indent=1))
    write_md(args.out.with_suffix(".md"), results)


if __name__ == "__main__":
    main()
