"""Every interval and verdict of the evidence report under the percentile bootstrap used until stop 40 and under
the interval that replaced it (giva.bench.stats.paired_intervals), side by side, from the committed runs.

Lists every claim pair under both (marking those whose 95 % or family-wise verdict differs), every runner-up-LR
variant with 5 seeds whose verdict differs, and every comparison beside the claims whose interval changed side of 0
or of -1 point (the thresholds the docs read them against). Nothing here feeds results.md; it is the record of what the change moved.

    .venv/bin/python benchmarks/diagnostics/interval_change.py   # about 3 minutes; writes the .md below
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from unittest import mock

from old_bootstrap import old_bootstrap_intervals

from giva.bench import stats
from giva.bench.report import _find, aggregate
from giva.bench.runner import load_runs
from giva.bench.spec import load_suite
from giva.bench.stats import combination, evaluate_claims, split_ref

BENCH = Path(__file__).resolve().parents[1]
OUT = BENCH / "results" / "diagnostics" / "interval_change.md"
ACCURACY = ("non-inferior", "better")  # the tests read from accuracy intervals; speed ratios and bytes did not change


def evaluate(rows: list, speeds: list, spec) -> tuple[list, list]:
    claims = evaluate_claims(spec.claims, rows, speeds)
    comparisons = [{"what": c.what, **combination(rows, c.plus, c.minus)} for c in spec.comparisons
                   if all(_find(rows, *split_ref(ref)) for ref in (*c.plus, *c.minus))]
    return claims, comparisons


def fmt(p: dict, low: str = "low", high: str = "high") -> str:
    return f"{p['estimate'] * 100:+.2f} [{p[low] * 100:+.2f}, {p[high] * 100:+.2f}]"


def side(p: dict) -> tuple[bool, ...]:
    return p["low"] > 0, p["high"] < 0, p["low"] > -0.01, p["high"] < -0.01


def main() -> None:
    spec = load_suite(BENCH, "evidence")
    runs = load_runs(BENCH / "results" / "evidence" / "runs")
    rows = aggregate(runs, probe_rule=spec.train.get("head_lr") == "probe")
    speeds = [r for r in runs if r.get("kind") == "speed"]
    new_claims, new_comparisons = evaluate(rows, speeds, spec)
    with mock.patch.object(stats, "paired_intervals", old_bootstrap_intervals):
        old_claims, old_comparisons = evaluate(rows, speeds, spec)
    with mock.patch.object(stats, "crossed_variance", partial(stats.crossed_variance, truncate=False)):
        raw_claims, _ = evaluate(rows, speeds, spec)
    lines = ["# The evidence report's accuracy intervals: the bootstrap used until stop 40 against today's interval", "",
             "Made by `python benchmarks/diagnostics/interval_change.py` from `benchmarks/results/evidence/runs/`. 'until stop 40': "
             "the percentile bootstrap over seeds and test examples (10,000 draws, seed 0); 'today': `giva.bench.stats.paired_intervals` "
             "(seeds and examples as crossed samples, t with Satterthwaite's degrees of freedom), which results.md uses. Why it "
             "changed: `bootstrap_coverage.md` beside this file. 'no truncation': today's interval without taking a variance "
             "component estimated below 0 as 0 (`stats.crossed_variance`), shown where the two differ. Points; a - b.", "",
             "## Every claim pair", "",
             "| claim | a vs b | until stop 40: 95 % | verdict | family-wise | verdict | today: 95 % | verdict | family-wise | verdict | moved "
             "| no truncation: 95 % | verdict | family-wise | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    moved = 0
    truncated = 0
    for old, new, raw in zip(old_claims, new_claims, raw_claims):
        for po, pn, pr in zip(old["pairs"], new["pairs"], raw["pairs"]):
            if "low" not in pn or new["test"] not in ACCURACY:
                continue
            changed = (po["verdict"], po.get("family_verdict")) != (pn["verdict"], pn.get("family_verdict"))
            moved += changed
            lines.append(f"| {new['claim']} | {pn['a']} vs {pn['b']} | {fmt(po)} | {po['verdict']} | "
                         f"{fmt(po, 'family_low', 'family_high')} (m={po['family_size']}) | {po['family_verdict']} | {fmt(pn)} | "
                         f"{pn['verdict']} | {fmt(pn, 'family_low', 'family_high')} (m={pn['family_size']}) | {pn['family_verdict']} | {'**yes**' if changed else '-'} | "
                         + (f"{fmt(pr)} | {pr['verdict']} | {fmt(pr, 'family_low', 'family_high')} | {pr['family_verdict']} |"
                            if (pr["low"], pr["family_low"]) != (pn["low"], pn["family_low"]) else "- | - | - | - |"))
            truncated += (pr["low"], pr["family_low"]) != (pn["low"], pn["family_low"])
    pairs = sum("low" in p for c in new_claims if c["test"] in ACCURACY for p in c["pairs"])
    lines += ["", f"{moved} of {pairs} claim pairs with an interval changed a verdict; the claims' own verdicts (their first pairs' "
              "at 95 %): " + ", ".join(f"{n['verdict']}" + ("" if o["verdict"] == n["verdict"] else f" (was {o['verdict']})")
                                       for o, n in zip(old_claims, new_claims)) + f". {truncated} of the {pairs} pairs "
              "have a variance component estimated below 0 and taken as 0.", "",
              "## Runner-up-LR variants with 5 seeds whose verdict changed", "",
              "| a vs b | row at its runner-up LR | until stop 40 | verdict | today | verdict |", "|---|---|---|---|---|---|"]
    for old, new in zip(old_claims, new_claims):
        for po, pn in zip(old["pairs"], new["pairs"]):
            for vo, vn in zip(po.get("lr_variants", []), pn.get("lr_variants", [])):
                if vn["verdict"] != "pending" and vo["verdict"] != vn["verdict"]:
                    lines.append(f"| {pn['a']} vs {pn['b']} | {vn['runner_up']} at {vn['a_lr'] if vn['runner_up'] == 'a' else vn['b_lr']} | "
                                 f"{fmt(vo)} | {vo['verdict']} | {fmt(vn)} | {vn['verdict']} |")
    lines += ["", "## Comparisons beside the claims whose interval changed side of 0 or of -1 point", "",
              "| comparison | until stop 40 | today |", "|---|---|---|"]
    for co, cn in zip(old_comparisons, new_comparisons):
        if "low" in cn and side(co) != side(cn):
            lines.append(f"| {cn['what']} | {fmt(co)} | {fmt(cn)} |")
    changed = sum("low" in c for c in new_comparisons)
    lines += ["", f"Of {changed} comparisons, {sum('low' in c and side(o) != side(c) for o, c in zip(old_comparisons, new_comparisons))} "
              "changed side of a threshold."]
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
