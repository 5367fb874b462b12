"""Paired bootstrap intervals and the verdicts of the paper's claims: pure functions, no models.

An accuracy difference between two rows is resampled at both levels it varies on: the seeds (a seed
fixes the head init, the data order and any random bases; the two rows are paired by seed) and the
test examples (the same examples for both rows). Each bootstrap draw picks seeds with replacement and
examples with replacement and recomputes ``mean(a) - mean(b)`` on the same draw for both rows; the 95%
interval is the 2.5th to 97.5th percentile of the draws. A step-time ratio is resampled over the
interleaved steps (paired: both methods trained on the same batch at about the same moment).

Verdicts (``test`` of a claim, ``a`` the row the claim is about):
- 'better': supported when the interval of a - b lies above 0, contradicted when it lies below 0;
- 'parity': supported when the interval lies within +-PARITY_MARGIN or above 0, contradicted when it
  lies below 0 (and outside the margin);
- 'speed-parity' (ratio a / b of step times): supported when the interval lies within 1 +- SPEED_MARGIN
  or below 1, contradicted when it lies above 1 (and outside the margin);
- 'slower' (ratio a / b): supported when the interval lies above 1, contradicted when below 1;
- 'smaller' (bytes on disk, no sampling): supported when a < b, contradicted when a > b;
otherwise 'undecided'. A pair with fewer than MIN_SEEDS seeds gets 'pending' (still running).

A claim is tested on several pairs (ranks, tasks, models). Its first pair is the one declared in advance
and decides the claim at 95%; every pair also gets a family-wise interval from the same bootstrap draws at
the Bonferroni level ``1 - 0.05 / m`` for the claim's m pairs (all m planned pairs count, run or not), so
that picking the one pair of m that came out decided is not mistaken for evidence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np

CONFIDENCE = 0.95
N_BOOT = 10_000
PARITY_MARGIN = 0.01  # accuracy within +-1 point counts as parity
SPEED_MARGIN = 0.10  # a step-time ratio within 1 +- 10 % counts as the same speed (shared-machine timing noise)
MIN_SEEDS = 5
TESTS = ("better", "parity", "speed-parity", "slower", "smaller")
VERDICTS = ("supported", "contradicted", "undecided", "pending")


@dataclass(frozen=True)
class Interval:
    """A point estimate and its bootstrap interval; sizes say what was resampled."""

    estimate: float
    low: float
    high: float
    n_seeds: int = 0
    n_examples: int = 0


def family_confidence(m: int, confidence: float = CONFIDENCE) -> float:
    """Bonferroni: the per-pair confidence that keeps the chance of any of ``m`` intervals missing at 1 - confidence."""
    if m < 1:
        raise ValueError(f"a family needs at least one pair, got m={m}")
    return 1 - (1 - confidence) / m


def _intervals(estimate: float, draws: np.ndarray, confidences: Sequence[float], n_seeds: int, n_examples: int) -> list[Interval]:
    out = []
    for confidence in confidences:
        low, high = np.quantile(draws, [(1 - confidence) / 2, (1 + confidence) / 2])
        out.append(Interval(estimate, float(low), float(high), n_seeds, n_examples))
    return out


def paired_bootstrap_intervals(
    a: np.ndarray, b: np.ndarray, confidences: Sequence[float], n_boot: int = N_BOOT, seed: int = 0, chunk: int = 2000,
) -> list[Interval]:
    """Intervals of ``mean(a) - mean(b)`` at each of ``confidences``, all from the same draws (so nested), for
    0/1 correctness matrices of shape (seeds, examples).

    Row i of ``a`` and of ``b`` come from the same seed, column j is the same test example. Every draw
    resamples seeds and examples with replacement, identically for both rows.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 2 or 0 in a.shape:
        raise ValueError(f"paired_bootstrap needs two equal (seeds, examples) matrices, got {a.shape} and {b.shape}")
    diff = a - b  # (S, N)
    n_seeds, n_examples = diff.shape
    rng = np.random.default_rng(seed)
    draws = []
    for start in range(0, n_boot, chunk):
        size = min(chunk, n_boot - start)
        seed_weights = rng.multinomial(n_seeds, np.full(n_seeds, 1 / n_seeds), size=size) / n_seeds  # (B, S)
        example_weights = rng.multinomial(n_examples, np.full(n_examples, 1 / n_examples), size=size) / n_examples  # (B, N)
        draws.append(((seed_weights @ diff) * example_weights).sum(axis=1))  # (B,)
    return _intervals(float(diff.mean()), np.concatenate(draws), confidences, n_seeds, n_examples)


def paired_bootstrap(
    a: np.ndarray, b: np.ndarray, n_boot: int = N_BOOT, confidence: float = CONFIDENCE, seed: int = 0, chunk: int = 2000,
) -> Interval:
    """Interval of ``mean(a) - mean(b)`` (see :func:`paired_bootstrap_intervals`) at one confidence level."""
    return paired_bootstrap_intervals(a, b, [confidence], n_boot, seed, chunk)[0]


def paired_ratio_bootstrap_intervals(
    a: Sequence[float], b: Sequence[float], confidences: Sequence[float], n_boot: int = N_BOOT, seed: int = 0,
) -> list[Interval]:
    """Intervals of ``median(a) / median(b)`` at each of ``confidences``, for step times paired by step
    (resampled together), all from the same draws."""
    a_arr, b_arr = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a_arr.shape != b_arr.shape or a_arr.ndim != 1 or len(a_arr) < 2:
        raise ValueError(f"paired_ratio_bootstrap needs two equal-length series of >= 2 steps, got {a_arr.shape} and {b_arr.shape}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a_arr), size=(n_boot, len(a_arr)))
    ratios = np.median(a_arr[idx], axis=1) / np.median(b_arr[idx], axis=1)
    return _intervals(float(np.median(a_arr) / np.median(b_arr)), ratios, confidences, 0, len(a_arr))


def paired_ratio_bootstrap(
    a: Sequence[float], b: Sequence[float], n_boot: int = N_BOOT, confidence: float = CONFIDENCE, seed: int = 0,
) -> Interval:
    """Interval of ``median(a) / median(b)`` (see :func:`paired_ratio_bootstrap_intervals`) at one level."""
    return paired_ratio_bootstrap_intervals(a, b, [confidence], n_boot, seed)[0]


def verdict(test: str, interval: Interval) -> str:
    """'supported', 'contradicted' or 'undecided' for one pair (see the module docstring for the rules)."""
    lo, hi = interval.low, interval.high
    if test == "better":
        return "supported" if lo > 0 else "contradicted" if hi < 0 else "undecided"
    if test == "parity":
        if (lo >= -PARITY_MARGIN and hi <= PARITY_MARGIN) or lo > 0:
            return "supported"
        return "contradicted" if hi < 0 else "undecided"
    if test == "speed-parity":
        if (lo >= 1 - SPEED_MARGIN and hi <= 1 + SPEED_MARGIN) or hi < 1:
            return "supported"
        return "contradicted" if lo > 1 else "undecided"
    if test == "slower":
        return "supported" if lo > 1 else "contradicted" if hi < 1 else "undecided"
    if test == "smaller":
        return "supported" if interval.estimate < 0 else "contradicted" if interval.estimate > 0 else "undecided"
    raise ValueError(f"unknown claim test {test!r}; expected one of {TESTS}")


# --- claims over run records ------------------------------------------------------------------------------


def _split_ref(ref: str) -> tuple[str, str, Optional[str]]:
    """'task/method' or 'task/method:ablation' (for speed claims: 'phase/method')."""
    where, sep, rest = ref.partition("/")
    if not sep or not rest:
        raise ValueError(f"claim row {ref!r} must be 'task/method' or 'task/method:ablation'")
    method, _, tag = rest.partition(":")
    return where, method, tag or None


def correctness_by_seed(rows: list[dict[str, Any]], ref: str) -> tuple[dict[int, str], dict[int, str], Optional[dict[str, Any]]]:
    """Seed -> test_correct string and seed -> test fingerprint of a row's runs at its chosen LR; and the row."""
    task, method, ablation = _split_ref(ref)
    row = next((r for r in rows if r["task"] == task and r["method"] == method and r["ablation"] == ablation), None)
    if row is None:
        return {}, {}, None
    return row.get("test_correct_by_seed", {}), row.get("test_sha256_by_seed", {}), row


def _with_family(result: dict[str, Any], test: str, family: Interval, m: int) -> dict[str, Any]:
    """A decided pair's family-wise interval and verdict (see the module docstring)."""
    return {**result, "family_size": m, "family_confidence": family_confidence(m), "family_low": family.low,
            "family_high": family.high, "family_verdict": verdict(test, family)}


def _accuracy_pair(rows: list[dict[str, Any]], test: str, a_ref: str, b_ref: str, m: int = 1) -> dict[str, Any]:
    a_correct, a_hash, a_row = correctness_by_seed(rows, a_ref)
    b_correct, b_hash, b_row = correctness_by_seed(rows, b_ref)
    out: dict[str, Any] = {"a": a_ref, "b": b_ref, "test": test}
    if test == "smaller":
        if a_row is None or b_row is None:
            return {**out, "verdict": "pending", "why": "a row has not run yet"}
        diff = float(a_row["adapter_bytes"] - b_row["adapter_bytes"])
        exact = Interval(diff, diff, diff)  # bytes: no sampling, so the family changes nothing
        result = {**out, **asdict(exact), "a_value": a_row["adapter_bytes"], "b_value": b_row["adapter_bytes"],
                  "verdict": verdict(test, exact)}
        return _with_family(result, test, exact, m)
    seeds = sorted(set(a_correct) & set(b_correct), key=int)
    if any(a_hash.get(s) != b_hash.get(s) for s in seeds):
        raise ValueError(f"{a_ref} and {b_ref} were scored on different test examples: they cannot be paired")
    if len(seeds) < 2:
        return {**out, "n_seeds": len(seeds), "verdict": "pending", "why": f"{len(seeds)} paired seed(s) with test predictions"}
    interval, family = paired_bootstrap_intervals(
        np.array([[c == "1" for c in a_correct[s]] for s in seeds]), np.array([[c == "1" for c in b_correct[s]] for s in seeds]),
        [CONFIDENCE, family_confidence(m)],
    )
    result = {**out, **asdict(interval), "a_value": a_row["test_mean"] if a_row else None, "b_value": b_row["test_mean"] if b_row else None}
    if len(seeds) < MIN_SEEDS:
        return {**result, "verdict": "pending", "why": f"{len(seeds)} of {MIN_SEEDS} seeds"}
    return _with_family({**result, "verdict": verdict(test, interval)}, test, family, m)


def _speed_pair(speeds: list[dict[str, Any]], test: str, a_ref: str, b_ref: str, m: int = 1) -> dict[str, Any]:
    out: dict[str, Any] = {"a": a_ref, "b": b_ref, "test": test}
    (phase_a, a, _), (phase_b, b, _) = _split_ref(a_ref), _split_ref(b_ref)
    if phase_a != phase_b:
        raise ValueError(f"speed claim rows {a_ref} and {b_ref} must come from the same (interleaved) phase")
    record = next((s for s in speeds if s["phase"] == phase_a), None)
    if record is None or a not in record["methods"] or b not in record["methods"]:
        return {**out, "verdict": "pending", "why": f"speed phase {phase_a} has not run"}
    skip = record["warmup_steps"]
    interval, family = paired_ratio_bootstrap_intervals(
        record["methods"][a]["step_seconds"][skip:], record["methods"][b]["step_seconds"][skip:], [CONFIDENCE, family_confidence(m)],
    )
    return _with_family({**out, **asdict(interval), "verdict": verdict(test, interval)}, test, family, m)


def evaluate_claims(claims: Sequence[dict[str, Any]], rows: list[dict[str, Any]], speeds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each claim with the interval and verdict of every pair, at 95% and family-wise (Bonferroni over the
    claim's pairs); the claim's verdict is its first (primary) pair's at 95%, the others are listed beside it."""
    results = []
    for claim in claims:
        test = claim["test"]
        if test not in TESTS:
            raise ValueError(f"claim {claim.get('claim')!r}: test must be one of {TESTS}, got {test!r}")
        pairs = []
        m = len(claim["pairs"])
        for a_ref, b_ref in claim["pairs"]:
            if test in ("speed-parity", "slower"):
                pairs.append(_speed_pair(speeds, test, a_ref, b_ref, m))
            else:
                pairs.append(_accuracy_pair(rows, test, a_ref, b_ref, m))
        counts = {v: sum(p["verdict"] == v for p in pairs) for v in VERDICTS}
        results.append({"claim": claim["claim"], "test": test, "verdict": pairs[0]["verdict"] if pairs else "pending",
                        "counts": counts, "pairs": pairs})
    return results
