"""How much do the evidence suite's verdicts rest on the bootstrap's own Monte-Carlo noise?

The suite's intervals come from 10,000 paired bootstrap draws with a fixed seed (0). A 95 % bound that lies
close to its verdict threshold (0 for "beats", -1 point for "matches") could fall on the other side with
other draws. For every accuracy claim pair whose 95 % bound lies within --near points of its threshold, this
recomputes the interval with 40x the draws (same seed) and with --seeds other seeds at 10,000 draws each, and
writes how often the verdict changes. Nothing here feeds back into results.md: it is a check of it.

    .venv/bin/python benchmarks/diagnostics/bootstrap_stability.py   # a few minutes; writes the .md below
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from giva.bench.report import aggregate
from giva.bench.runner import load_runs
from giva.bench.stats import (
    CONFIDENCE,
    MARGIN,
    N_BOOT,
    Interval,
    correctness_by_seed,
    paired_bootstrap_intervals,
    verdict,
)

ROOT = Path(__file__).resolve().parents[2]
EVIDENCE = ROOT / "benchmarks" / "results" / "evidence"
OUT = ROOT / "benchmarks" / "results" / "diagnostics" / "bootstrap_stability.md"


def matrices(rows: list[dict], a_ref: str, b_ref: str) -> tuple[np.ndarray, np.ndarray]:
    (a, _, _), (b, _, _) = correctness_by_seed(rows, a_ref), correctness_by_seed(rows, b_ref)
    seeds = sorted(set(a) & set(b), key=int)
    return tuple(np.array([[c == "1" for c in side[s]] for s in seeds]) for side in (a, b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--near", type=float, default=0.3, help="points from the threshold that count as close")
    parser.add_argument("--seeds", type=int, default=40, help="other bootstrap seeds at the suite's draws")
    args = parser.parse_args()
    rows = aggregate(load_runs(EVIDENCE / "runs"))
    results = json.loads((EVIDENCE / "results.json").read_text())
    lines = [
        "# Bootstrap stability of the verdicts near their thresholds",
        "",
        f"Made by `benchmarks/diagnostics/bootstrap_stability.py` from the runs of `benchmarks/results/evidence/`. Pairs of "
        f"the accuracy claims whose 95 % bound lies within {args.near:g} points of its threshold; the suite's interval "
        f"({N_BOOT:,} draws, seed 0), the same with {40 * N_BOOT:,} draws, and how many of {args.seeds} other seeds "
        f"(1-{args.seeds}, {N_BOOT:,} draws each) give another verdict.",
        "",
        "| claim | a - b | suite: 95 % [draws, seed 0] | verdict | 40x draws | verdict | other seeds with another verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    close = 0
    for claim in results["claims"]:
        if claim["test"] not in ("better", "non-inferior"):
            continue
        threshold = 0.0 if claim["test"] == "better" else -MARGIN
        for pair in claim["pairs"]:
            if "low" not in pair or min(abs(pair["low"] - threshold), abs(pair["high"] - threshold)) > args.near / 100:
                continue
            close += 1
            a, b = matrices(rows, pair["a"], pair["b"])
            suite = paired_bootstrap_intervals(a, b, [CONFIDENCE])[0]
            many = paired_bootstrap_intervals(a, b, [CONFIDENCE], n_boot=40 * N_BOOT)[0]
            others = [paired_bootstrap_intervals(a, b, [CONFIDENCE], seed=s)[0] for s in range(1, args.seeds + 1)]
            changed = sum(verdict(claim["test"], i) != verdict(claim["test"], suite) for i in others)

            def shown(i: Interval) -> str:
                return f"{100 * i.estimate:+.2f} [{100 * i.low:+.2f}, {100 * i.high:+.2f}]"

            lines.append(f"| {claim['claim']} | {pair['a']} - {pair['b']} | {shown(suite)} | {verdict(claim['test'], suite)} | "
                         f"{shown(many)} | {verdict(claim['test'], many)} | {changed} of {args.seeds} |")
    if not close:
        lines.append(f"| (no pair within {args.near:g} points) | | | | | | |")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(OUT.read_text())


if __name__ == "__main__":
    main()
