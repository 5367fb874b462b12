"""The percentile bootstrap the evidence suite's accuracy intervals used until stop 40, kept as it was so that the
diagnostics beside this file can put it next to the interval that replaced it (giva.bench.stats.paired_intervals).

Each of ``n_boot`` draws resamples the seeds and the test examples with replacement, alike for both rows, and
recomputes mean(a) - mean(b); the interval is the draws' (1 - c) / 2 and (1 + c) / 2 quantiles (seed 0, draws in
chunks of 2000, the draws as whole-number numerators over seeds x examples: bit for bit the suite's old numbers).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from giva.bench.stats import Interval


def old_bootstrap_intervals(a: np.ndarray, b: np.ndarray, confidences: Sequence[float], n_boot: int = 10_000,
                            seed: int = 0, chunk: int = 2000) -> list[Interval]:
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    n_seeds, n_examples = diff.shape
    rng = np.random.default_rng(seed)
    draws = []
    for start in range(0, n_boot, chunk):
        size = min(chunk, n_boot - start)
        seed_counts = rng.multinomial(n_seeds, np.full(n_seeds, 1 / n_seeds), size=size)
        example_counts = rng.multinomial(n_examples, np.full(n_examples, 1 / n_examples), size=size)
        draws.append(((seed_counts @ diff) * example_counts).sum(axis=1))
    draws, scale = np.concatenate(draws), n_seeds * n_examples
    out = []
    for confidence in confidences:
        low, high = np.quantile(draws, [(1 - confidence) / 2, (1 + confidence) / 2])
        out.append(Interval(float(diff.mean()), float(low) / scale, float(high) / scale, n_seeds, n_examples))
    return out
