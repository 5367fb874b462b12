"""How often do the evidence suite's 95 % paired intervals cover the true difference, with 5 seeds?

Two methods answer 1000 test examples over 5 seeds; each example has its own difficulty, each seed its own shift
(the seed-to-seed spread), and, in two of the settings, each example a difference between the methods of its own
that averages out over examples (so the true difference is exactly 0 in every setting). At a small seed spread
(per-seed accuracy sd about 1.5 points, as GiVA r=8 on Pang & Lee) and a large one (about 4.4 points, as LoRA r=8
on SmolLM2's tasks), this counts how many intervals contain 0, for the suite's interval
(:func:`giva.bench.stats.paired_intervals`: crossed seeds and examples, t with Satterthwaite's degrees of freedom)
and for the percentile bootstrap over seeds and examples that the suite used until stop 40 (kept as it was in
`old_bootstrap.py`). The bootstrap treats the spread of 5 seeds as known, so it covers less as that spread grows; this
table is why it was replaced. Nothing here reads results.md.

    .venv/bin/python benchmarks/diagnostics/bootstrap_coverage.py   # about 10 minutes on one core; writes the .md below
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from old_bootstrap import old_bootstrap_intervals

from giva.bench.stats import paired_intervals

SEEDS, EXAMPLES, REPLICATES, DRAWS = 5, 1000, 1000, 1000
# (sd of a seed's shift, sd of an example's own difference between the methods), both on the logit scale
SETTINGS = ((0.12, 0.0), (0.45, 0.0), (0.12, 1.0), (0.45, 1.0))
OUT = Path(__file__).resolve().parents[1] / "results" / "diagnostics" / "bootstrap_coverage.md"


def coverage(spread: float, own: float, rng: np.random.Generator) -> dict[str, float]:
    """Hits and mean widths (points) of both intervals, and the mean per-seed accuracy sd (points)."""
    hits, widths, sds = {"t": 0, "bootstrap": 0}, {"t": 0.0, "bootstrap": 0.0}, []
    for replicate in range(REPLICATES):
        difficulty = rng.normal(1.7, 3.0, size=EXAMPLES)
        between = rng.normal(0, own, size=EXAMPLES)

        def answers(sign: int) -> np.ndarray:  # (seeds, examples) 0/1, one shift per seed
            shift = rng.normal(0, spread, size=(SEEDS, 1))
            logit = difficulty + sign * between + shift
            return (rng.random((SEEDS, EXAMPLES)) < 1 / (1 + np.exp(-logit))).astype(float)

        a, b = answers(1), answers(-1)
        (interval,) = paired_intervals(a, b, [0.95])
        (old,) = old_bootstrap_intervals(a, b, [0.95], n_boot=DRAWS, seed=replicate)
        for name, (low, high) in (("t", (interval.low, interval.high)), ("bootstrap", (old.low, old.high))):
            hits[name] += low <= 0 <= high
            widths[name] += 100 * (high - low) / REPLICATES
        sds.append(100 * a.mean(axis=1).std(ddof=1))
    return {"sd": float(np.mean(sds)), **{f"{k}_hits": v for k, v in hits.items()}, **{f"{k}_width": v for k, v in widths.items()}}


def main() -> None:
    rng = np.random.default_rng(11)
    lines = ["# Coverage of the evidence suite's 95 % paired intervals at 5 seeds x 1000 examples", "",
             "Made by `python benchmarks/diagnostics/bootstrap_coverage.py` (true difference 0; "
             f"{REPLICATES} replicates; the bootstrap with {DRAWS} draws each). 't (suite)': `giva.bench.stats.paired_intervals`, "
             "the suite's interval since stop 40; 'bootstrap (until stop 40)': the percentile bootstrap over seeds and examples "
             f"it replaced. With {REPLICATES} replicates a coverage near 0.95 carries about +-0.014 of simulation noise (95 %).", "",
             "| seed shift sd (logit) | example's own difference sd (logit) | per-seed accuracy sd (points) | "
             "t (suite): coverage | mean width (points) | bootstrap (until stop 40): coverage | mean width (points) |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for spread, own in SETTINGS:
        c = coverage(spread, own, rng)
        lines.append(f"| {spread:.2f} | {own:.1f} | {c['sd']:.2f} | {c['t_hits'] / REPLICATES:.3f} | {c['t_width']:.2f} | "
                     f"{c['bootstrap_hits'] / REPLICATES:.3f} | {c['bootstrap_width']:.2f} |")
        print(lines[-1], flush=True)
    OUT.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
