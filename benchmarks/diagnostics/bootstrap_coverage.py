"""How often does the evidence suite's 95 % paired bootstrap interval cover the true difference, with 5 seeds?

Two methods identical in distribution (the true difference is exactly 0) answer 1000 test examples over 5 seeds,
each example with its own difficulty and each seed with its own shift (the seed-to-seed spread). At a small spread
(per-seed accuracy sd about 1.5 points, as GiVA r=8 on Pang & Lee) and a large one (about 4.4 points, as LoRA r=8
on SmolLM2's tasks), this counts how many of the intervals the suite's own function gives contain 0. A percentile
bootstrap over 5 seeds treats their spread as known, so it is expected to cover less as the spread grows. Nothing
here feeds back into results.md: it is a check of how to read it.

    .venv/bin/python benchmarks/diagnostics/bootstrap_coverage.py   # a few minutes; writes the .md below
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from giva.bench.stats import paired_bootstrap_intervals

SEEDS, EXAMPLES, REPLICATES, DRAWS = 5, 1000, 400, 2000
SPREADS = (0.12, 0.45)  # sd of a seed's shift on the logit scale: small, and as large as SmolLM2 LoRA's seeds
OUT = Path(__file__).resolve().parents[1] / "results" / "diagnostics" / "bootstrap_coverage.md"


def coverage(spread: float, rng: np.random.Generator) -> tuple[int, float]:
    """(intervals containing 0 out of REPLICATES, mean per-seed accuracy sd in points) at one seed spread."""
    hits, sds = 0, []
    for replicate in range(REPLICATES):
        difficulty = rng.normal(1.7, 3.0, size=EXAMPLES)

        def answers() -> np.ndarray:  # (seeds, examples) 0/1, one shift per seed
            shift = rng.normal(0, spread, size=(SEEDS, 1))
            return (rng.random((SEEDS, EXAMPLES)) < 1 / (1 + np.exp(-(difficulty + shift)))).astype(float)

        a, b = answers(), answers()
        (interval,) = paired_bootstrap_intervals(a, b, [0.95], n_boot=DRAWS, seed=replicate)
        hits += interval.low <= 0 <= interval.high
        sds.append(100 * a.mean(axis=1).std(ddof=1))
    return hits, float(np.mean(sds))


def main() -> None:
    rng = np.random.default_rng(11)
    lines = ["# Coverage of the evidence suite's 95 % paired bootstrap interval at 5 seeds x 1000 examples", "",
             "Made by `python benchmarks/diagnostics/bootstrap_coverage.py` (two identical methods; true difference 0; "
             f"{REPLICATES} replicates of {DRAWS} draws each).", "",
             "| seed shift sd (logit) | per-seed accuracy sd (points) | intervals containing 0 | coverage |",
             "|---:|---:|---:|---:|"]
    for spread in SPREADS:
        hits, sd = coverage(spread, rng)
        lines.append(f"| {spread:.2f} | {sd:.2f} | {hits} / {REPLICATES} | {hits / REPLICATES:.3f} |")
        print(lines[-1], flush=True)
    OUT.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
