"""Aggregate the run JSONs of a suite into results.json, a markdown table, headline lines and PNG plots.

LR selection: for every (task, method, ablation) the LR with the best MEAN VALIDATION accuracy over
the seeds that every tried LR ran (seed 0 alone for a sweep run on seed 0 only) is chosen; the table
reports the TEST accuracy of that LR, as mean ± std over the seeds run at it. The suite's claims get
paired intervals over seeds and test examples (stats.py). Everything here is computed from
the run JSONs alone.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from .runner import (
    choose_lr,
    load_runs,
    lr_key,
    probe_rule_applies,
    runner_up_lr,
    validation_by_lr,
    write_json_atomically,
)
from .spec import (
    DEFAULT_HEADLINE_PAIRS,
    DEFAULT_HEADLINE_SIZES,
    SuiteSpec,
    benchmarks_dir,
    load_method,
)
from .stats import (
    CONFIDENCE,
    MIN_SEEDS,
    RULES,
    combination,
    end_to_end_ratio,
    evaluate_claims,
    evaluate_second_look,
    split_ref,
)

PLOTS = ("acc_vs_params.png", "acc_vs_rank.png", "step_time.png", "loss_curves.png")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value, NaN for none)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _at_shared_head_lr(groups: dict[tuple, list[dict[str, Any]]], probe_rule: bool) -> dict[tuple, list[dict[str, Any]]]:
    """Each row's runs as the runner counts them (:func:`giva.bench.runner.shared_head_lr`): under the suite's 'probe'
    rule (``probe_rule``), a trained row of a task with a new head and a linear probe keeps only the runs whose head
    trained at the probe's chosen LR (a run left from an earlier head LR is not the row's). Never two runs of one
    (LR, seed), which would count a seed twice (``ValueError`` naming the row)."""
    probe_lr = {
        task: choose_lr(validation_by_lr(group))
        for (task, _, ablation), group in groups.items() if ablation is None and group[0]["method"]["kind"] == "probe"
    } if probe_rule else {}
    kept = {}
    for key, group in groups.items():
        shared, first = probe_lr.get(key[0]), group[0]
        if shared is not None and probe_rule_applies("probe", first["method"]["kind"], first["task"].get("kind", "classification")):
            group = [r for r in group if lr_key(r["head_lr"]) == lr_key(shared)]
        seen: set[tuple[float, int]] = set()
        for r in group:
            run = (lr_key(r["lr"]), r["seed"])
            if run in seen:
                raise ValueError(f"row {'/'.join(k for k in key if k)} has two runs at LR {run[0]:g}, seed {run[1]} "
                                 f"(one is {r.get('run_id')!r}): remove the one that is not the row's")
            seen.add(run)
        if group:
            kept[key] = group
    return kept


def aggregate(runs: list[dict[str, Any]], probe_rule: bool = False) -> list[dict[str, Any]]:
    """One row per (task, method, ablation): the chosen LR and the test accuracy over its seeds. ``probe_rule``: the
    suite's heads train at the linear probe's LR (``train.head_lr == "probe"``), so a row counts those runs only."""
    groups: dict[tuple[str, str, Optional[str]], list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        if r.get("kind") == "train":
            groups[(r["task"]["name"], r["method"]["name"], r["ablation"])].append(r)
    rows = []
    for (task, method, ablation), group in _at_shared_head_lr(groups, probe_rule).items():
        vals = validation_by_lr(group)
        lr = choose_lr(vals)
        if lr is None:  # no seed common to the LRs and no seed 0: take the LR the group ran at
            lr = group[0]["lr"]
        common = sorted(set.intersection(*(set(v) for v in vals.values())))
        runner_up = runner_up_lr(vals, lr)
        chosen = sorted((r for r in group if lr_key(r["lr"]) == lr_key(lr)), key=lambda r: r["seed"])
        tests = [r["metrics"]["test_accuracy"] for r in chosen]
        mean, std = mean_std(tests)
        first, first_seed = chosen[0], min(r["seed"] for r in group)  # seed 0, or a second look's first seed
        rows.append({
            "task": task,
            "model": first["task"]["model"],
            "task_kind": first["task"].get("kind", "classification"),
            "method": method,
            "family": first["method"]["family"],
            "kind": first["method"]["kind"],
            "rank": first["method"]["rank"],
            "variant": first["method"]["peft_kwargs"].get("variant"),
            "ablation": ablation,
            "overrides": first.get("overrides", {}),
            "lr": lr,
            "lr_key": f"{lr:g}",
            "runner_up_lr": None if runner_up is None else f"{runner_up:g}",
            "lrs_tried": sorted({r["lr"] for r in group if r["seed"] == first_seed}),
            "val_by_lr": {f"{r['lr']:g}": r["metrics"]["val_accuracy"] for r in group if r["seed"] == first_seed},
            "val_mean_by_lr": {f"{x:g}": statistics.fmean(v[s] for s in common) for x, v in sorted(vals.items())} if common else {},
            "lr_chosen_on_seeds": common,
            "head_lr": first.get("head_lr"),
            "test_correct_by_seed": {r["seed"]: r["metrics"]["test_correct"] for r in chosen if "test_correct" in r["metrics"]},
            "test_sha256_by_seed": {r["seed"]: r["data"].get("test_sha256") for r in chosen},
            "test_correct_by_lr": _by_lr(group, lambda r: r["metrics"].get("test_correct")),
            "test_sha256_by_lr": _by_lr(group, lambda r: r["data"].get("test_sha256")),
            "end_to_end_seconds": [r["timing"]["init_seconds"] + r["timing"]["train_seconds"] for r in group],
            "n_train": first["data"].get("n_train"),
            "batch_size": first["train_config"].get("batch_size"),
            "seeds": [r["seed"] for r in chosen],
            "test_accuracy": tests,
            "test_mean": mean,
            "test_std": std,
            "val_accuracy": first["metrics"]["val_accuracy"],
            "val_mean": statistics.fmean(r["metrics"]["val_accuracy"] for r in chosen),  # what chose LRs and defaults
            "trainable_adapter": first["parameters"]["trainable_adapter"],
            "trainable": first["parameters"]["trainable"],
            "adapter_bytes": first["adapter_bytes"],
            "trainable_state_bytes": first["trainable_state_bytes"],
            "median_step_seconds": statistics.median(r["timing"]["median_step_seconds"] for r in chosen),
            "init_seconds": statistics.median(r["timing"]["init_seconds"] for r in chosen),
            "train_seconds": statistics.median(r["timing"]["train_seconds"] for r in chosen),
            "total_seconds_all_runs": sum(r["timing"]["total_seconds"] for r in group),
            "peak_rss_mib": max(r["memory"]["peak_rss_bytes"] for r in chosen) / 2**20,
            "epochs": first["train_config"].get("epochs", 0),
            "steps": first["timing"]["steps"],
        })
    rows.sort(key=lambda row: (row["task"], row["ablation"] is not None, row["family"], row["method"], row["ablation"] or ""))
    return rows


def _by_lr(group: list[dict[str, Any]], value: Any) -> dict[str, dict[int, Any]]:
    """LR (as '%g') -> seed -> value(run), for the runs of one row that have the value."""
    out: dict[str, dict[int, Any]] = defaultdict(dict)
    for r in group:
        if value(r) is not None:
            out[f"{r['lr']:g}"][r["seed"]] = value(r)
    return dict(out)


def _find(rows: list[dict[str, Any]], task: str, method: str, ablation: Optional[str] = None) -> Optional[dict[str, Any]]:
    return next((r for r in rows if r["task"] == task and r["method"] == method and r["ablation"] == ablation), None)


def _split_tag(name: str) -> tuple[str, Optional[str]]:
    """'method' or 'method:ablation' (a headline pair may compare ablation rows, e.g. 'giva-r8:epochs-2')."""
    method, _, tag = name.partition(":")
    return method, tag or None


def _paired_difference(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float, int]:
    """Mean ± std of per-seed (a - b) test-accuracy differences over the seeds both ran."""
    sa, sb = dict(zip(a["seeds"], a["test_accuracy"])), dict(zip(b["seeds"], b["test_accuracy"]))
    diffs = [sa[s] - sb[s] for s in sorted(set(sa) & set(sb))]
    mean, std = mean_std(diffs)
    return mean, std, len(diffs)


def headlines(
    rows: list[dict[str, Any]], speeds: list[dict[str, Any]], task: str,
    pairs: Sequence[tuple[str, str]] = DEFAULT_HEADLINE_PAIRS, sizes: Sequence[str] = DEFAULT_HEADLINE_SIZES,
) -> list[str]:
    lines = []
    for first, second in pairs:
        a, b = _find(rows, task, *_split_tag(first)), _find(rows, task, *_split_tag(second))
        if a and b:
            mean, std, n = _paired_difference(a, b)
            what = "rank reduction" if b["family"] == "vera" else f"vs {b['family']}"
            lines.append(
                f"{what} ({task}): {first} {a['test_mean']:.2%} vs {second} {b['test_mean']:.2%}: "
                f"{mean * 100:+.2f} ± {std * 100:.2f} points (paired over {n} seed(s), LR chosen on validation)"
            )
    for speed in speeds:
        m = speed["methods"]
        parts = [f"{n}/LoRA {e['ratio_to_lora']:.2f}x" for n, e in m.items() if e["family"] != "lora" and e["ratio_to_lora"]]
        lora = next((n for n, e in m.items() if e["family"] == "lora"), None)
        init = [f"{n} init {e['init_seconds']:.2f} s = {e['init_in_steps']:.1f} steps" for n, e in m.items() if e["family"] == "giva"]
        if lora:
            lines.append(
                f"speed ({speed['phase']}, {speed['task']['model']}, interleaved, median of {speed['steps'] - speed['warmup_steps']} "
                f"steady steps): LoRA {m[lora]['median_step_seconds'] * 1000:.0f} ms/step; " + ", ".join(parts)
                + ("; " + ", ".join(init) if init else "")
            )
    sized = [r for name in sizes if (r := _find(rows, task, name))]
    if sized:
        lines.append(
            "size (" + task + ", adapter + head, safetensors as saved / trainable state): "
            + ", ".join(f"{r['method']} {r['adapter_bytes'] / 1024:.0f} KiB / {r['trainable_state_bytes'] / 1024:.1f} KiB" for r in sized)
        )
    return lines


def _fmt_lr(lr: float) -> str:
    return f"{lr:g}"


def _fmt_pair(pair: dict[str, Any]) -> str:
    """A claim pair's estimate and interval: points of accuracy, a step-time ratio, or bytes."""
    if "estimate" not in pair:
        return "-"
    if pair["test"] in ("speed-parity", "slower"):
        return f"{pair['estimate']:.3f}x [{pair['low']:.3f}, {pair['high']:.3f}]"
    if pair["test"] == "smaller":
        return f"{pair['a_value'] / 1024:.0f} KiB vs {pair['b_value'] / 1024:.0f} KiB"
    return f"{pair['estimate'] * 100:+.2f} [{pair['low'] * 100:+.2f}, {pair['high'] * 100:+.2f}] points"


def _fmt_family(pair: dict[str, Any]) -> str:
    """A decided pair's family-wise (Bonferroni) interval, in the units of :func:`_fmt_pair`."""
    if "family_low" not in pair or pair["test"] == "smaller":
        return "-"
    if pair["test"] in ("speed-parity", "slower"):
        interval = f"[{pair['family_low']:.3f}, {pair['family_high']:.3f}]"
    else:
        interval = f"[{pair['family_low'] * 100:+.2f}, {pair['family_high'] * 100:+.2f}]"
    return f"{interval} (m={pair['family_size']})"


def rules_markdown(tests: Sequence[str]) -> list[str]:
    """The verdict rule of each kind of claim in ``tests``, stated before any result in the report."""
    if not tests:
        return []
    return (["## Verdict rules", "",
             "One rule per kind of claim (`giva.bench.stats.RULES`), applied alike to every pair of that kind; a, b as in "
             f"each pair, paired {CONFIDENCE:.0%} intervals (family-wise: Bonferroni, below). These rules replaced, "
             "after this suite's results were known (issue 25), one that asked an accuracy pair to lie inside ±1 point "
             "and called any interval below 0 contradicted; the margin is that rule's 1 point. It is 10 of the 1000 test "
             "sentences, below the sampling error of one run's accuracy on them (1.4 points at 75 %, sqrt(p (1 - p) / 1000)): "
             "a loss a user could not see in one evaluation. It is also the 'within 1 point' of issue 25's target.", ""]
            + [f"- `{test}`: {RULES[test]}." for test in dict.fromkeys(tests)] + [""])


def claims_markdown(claims: list[dict[str, Any]]) -> list[str]:
    """The verdict rules, then the claims table: each pair's estimate, 95% interval, its seeds x examples, and verdict."""
    if not claims:
        return []
    out = rules_markdown([c["test"] for c in claims])
    out += ["## Claims", "",
            f"Paired 95% intervals: accuracy over seeds and test examples as crossed samples (t with Satterthwaite's degrees "
            "of freedom, `giva.bench.stats.crossed_variance`; until stop 40 a percentile bootstrap, which under-covered where "
            "the 5 seeds disagree and over-covered where they agree: docs/benchmarks.md); speed: bootstrap over interleaved steps (10,000 draws). "
            f"'pending': fewer than {MIN_SEEDS} paired seeds, or a row not run yet. A claim's verdict is its "
            "first pair's, declared in advance; the other pairs follow it. Family-wise: the same estimate and variance at the Bonferroni "
            "level 1 - 0.05/m for the claim's m pairs (every planned pair counts, run or not), the interval to read "
            "when one pair among several is singled out. LR-robust: whether the pair keeps its verdict with either row at "
            f"its runner-up validation LR (next table); a variant with fewer than {MIN_SEEDS} paired seeds is pending and "
            "decides nothing ('not shown (2 seeds)' when no variant has them).", "",
            "| claim | verdict | pair (a vs b) | a - b (or a / b) [95% CI] | seeds x examples | pair verdict "
            "| family-wise CI | family-wise verdict | LR-robust |",
            "|---|---|---|---|---|---|---|---|---|"]
    for claim in claims:
        for i, pair in enumerate(claim["pairs"]):
            sizes = f"{pair.get('n_seeds', 0)} x {pair.get('n_examples', 0)}" if "estimate" in pair else pair.get("why", "")
            if pair["test"] in ("speed-parity", "slower") and "estimate" in pair:
                sizes = f"{pair['n_examples']} steps"
            if pair["test"] == "smaller":
                sizes = "-"
            robust = _fmt_robust(pair)
            head = f"{claim['claim']} | **{claim['verdict']}**" if i == 0 else " | "
            out.append(f"| {head} | {pair['a']} vs {pair['b']} | {_fmt_pair(pair)} | {sizes} | {pair['verdict']} "
                       f"| {_fmt_family(pair)} | {pair.get('family_verdict', '-')} | {robust} |")
    return out + [""] + lr_variants_markdown(claims)


def second_look_markdown(look: Optional[dict[str, Any]]) -> list[str]:
    """The declared second look (``look``: the suite's ``second_look`` with its evaluated ``claims``), then its claims
    table, as the claims table."""
    if not look:
        return []
    claims = look["claims"]
    level, one_sided = look["confidence"], (1 - CONFIDENCE) / 2 + (1 - look["confidence"]) / 2
    out = ["## Second look: more seeds for undecided pairs", "",
           f"Declared {look['declared']}. Why: {look['why']}. Each row's seeds at its chosen LR are joined with those of its "
           f"`{look['seeds_tag']}` row (the same method at the same LR on further seeds), and each pair is decided at "
           f"{level:.1%} over at least {look['min_seeds']} paired seeds, by the rules above. The first look (the claims "
           f"table, 5 seeds at 95 %) already spent its error on these pairs, so a pair's verdict over the two looks errs "
           f"on its side at most {(1 - CONFIDENCE) / 2:.2%} + {(1 - level) / 2:.2%} = {one_sided:.2%} of the time (one-sided, "
           f"Bonferroni over the looks, at the intervals' nominal coverage), against {(1 - CONFIDENCE) / 2:.2%} for one look; "
           "each pair is its own claim, so this bounds each, not all of them at once. Family-wise: the same estimate at "
           f"1 - {1 - level:.3g}/m, m the pairs of the first-look claim the pair was singled out of (or of its own claim, "
           f"if more). 'pending': fewer than {look['min_seeds']} paired seeds. No LR variants: the runner-up LRs ran the "
           "sweep seeds only.", "",
           f"| claim | verdict | pair (a vs b) | a vs b, test (mean ± std over the seeds) | a - b [{level:.1%} CI] | seeds x examples "
           "| pair verdict | family-wise CI | family-wise verdict |", "|---|---|---|---|---|---|---|---|---|"]
    for claim in claims:
        for i, pair in enumerate(claim["pairs"]):
            sizes = f"{pair['n_seeds']} x {pair['n_examples']}" if "estimate" in pair else "-"
            if pair["verdict"] == "pending":
                sizes += f" ({pair['why']})"
            head = f"{claim['claim']} | **{claim['verdict']}**" if i == 0 else " | "
            means = (f"{pair['a_value']:.2%} ± {pair['a_std']:.2%} vs {pair['b_value']:.2%} ± {pair['b_std']:.2%}"
                     if "a_std" in pair else "-")
            out.append(f"| {head} | {pair['a']} vs {pair['b']} | {means} | {_fmt_pair(pair)} | {sizes} | {pair['verdict']} "
                       f"| {_fmt_family(pair)} | {pair.get('family_verdict', '-')} |")
    return out + [""]


def _fmt_robust(pair: dict[str, Any]) -> str:
    """'yes' when every runner-up variant with MIN_SEEDS seeds keeps the pair's verdict, else which reads what;
    variants below MIN_SEEDS decide nothing and are named as not shown; a pair with no variant was not tested."""
    if "lr_robust" not in pair:
        return "-"
    short = [v for v in pair["lr_variants"] if v["verdict"] == "pending"]
    if not pair["lr_variants"]:
        return "not tested (no runner-up LR)"
    if pair["lr_robust"] is None:
        return f"not shown ({'/'.join(str(n) for n in sorted({v['n_seeds'] for v in short}))} seeds)"
    text = "yes" if pair["lr_robust"] else "no: " + "; ".join(
        f"{v['verdict']} with {v['runner_up']} at {v[v['runner_up'] + '_lr']} ({v['n_seeds']} seeds)"
        for v in pair["lr_variants"] if v["verdict"] not in ("pending", pair["verdict"]))
    if short:
        text += "; not shown: " + ", ".join(f"{v['runner_up']} at {v[v['runner_up'] + '_lr']} ({v['n_seeds']} seeds)" for v in short)
    return text


def lr_variants_markdown(claims: list[dict[str, Any]]) -> list[str]:
    """Every decided accuracy pair again with one row at its runner-up validation LR."""
    lines = []
    for claim in claims:
        for pair in claim["pairs"]:
            for v in pair.get("lr_variants", []):
                row = pair[v["runner_up"]]
                interval = _fmt_pair({**v, "test": pair["test"]}) if "estimate" in v else v.get("why", "-")
                lines.append(f"| {pair['a']} vs {pair['b']} | {row} at {v['a_lr' if v['runner_up'] == 'a' else 'b_lr']} | "
                             f"{_fmt_gap(v['val_gap'])} | {v['a_lr']} vs {v['b_lr']} | {interval} | {v['n_seeds']} | "
                             f"{v.get('verdict', '-')} | {pair['verdict']} |")
    if not lines:
        return []
    return ["## Claims at the runner-up LR", "",
            "Each decided accuracy pair again, with one of its rows at the LR that its validation choice ranked second "
            "(mean validation over the sweep seeds; ties go to the smaller LR, so a tied LR is the runner-up), the other "
            "at its chosen LR, over the seeds both ran: a runner-up LR ran the 2 sweep seeds (0 and 1), and the claim "
            "seeds too where a 'runner-up' phase ran them; over 2 seeds its interval is wider for that alone, and below "
            f"{MIN_SEEDS} paired seeds it is shown without a verdict "
            "('pending', as for a pair): 2 seeds say too little of the seed-to-seed spread to decide. With "
            f"{MIN_SEEDS} seeds, a verdict that turns over (supported against contradicted) is what the LR choice decides. The run JSONs hold "
            "validation accuracy, not per-example validation answers, so an interval that redoes the choice on "
            "resampled validation examples cannot be computed from them.", "",
            "| pair (a vs b) | row at its runner-up LR | validation lead of the chosen LR (points) | LRs (a vs b) "
            "| a - b [95% CI] | seeds | verdict by the rule | declared pair's verdict |",
            "|---|---|---|---|---|---|---|---|"] + lines + [""]


def _fmt_gap(gap: float) -> str:
    return "0.00 (tie)" if abs(gap) < 1e-9 else f"{gap * 100:.2f}"


def comparisons_markdown(comparisons: list[dict[str, Any]], end_to_end: list[dict[str, Any]]) -> list[str]:
    """The README's statements beside the claims, each with its paired interval."""
    out = []
    if comparisons:
        out += ["## Comparisons beside the claims", "",
                "Stated in the README; no claim of the paper, so no verdict. Test accuracy, every row at its chosen LR, "
                "paired over the seeds all its rows ran (95% over seeds and test examples, as a claim pair).", "",
                "| comparison | rows: + | rows: - | estimate [95% CI] | seeds x examples |", "|---|---|---|---|---|"]
        for c in comparisons:
            interval = f"{c['estimate'] * 100:+.2f} [{c['low'] * 100:+.2f}, {c['high'] * 100:+.2f}] points" if "estimate" in c else c["why"]
            sizes = f"{c['n_seeds']} x {c['n_examples']}" if "estimate" in c else "-"
            out.append(f"| {c['what']} | {', '.join(c['plus'])} | {', '.join(c['minus'])} | {interval} | {sizes} |")
        out.append("")
    if end_to_end:
        out += ["## End to end: initialisation + training time", "",
                "Per task, `timing.init_seconds + timing.train_seconds` of every training run of each row (its LR sweep "
                "included: the LR changes no step's work): the median over a's runs and over b's, and their ratio with a "
                "bootstrap 95% interval that resamples each row's runs on its own. Separate runs on a shared machine, "
                "not interleaved (unlike the step-time claims): load differed between runs, and the median keeps one "
                "slowed run from moving the ratio.", "",
                "| task | a vs b | steps | a (s) | b (s) | a / b [95% CI] | runs (a, b) |", "|---|---|---|---|---|---|---|"]
        for e in end_to_end:
            if "estimate" not in e:
                continue
            out.append(f"| {e['task']} | {e['a']} vs {e['b']} | {e['steps']} | {e['a_seconds']:.1f} | {e['b_seconds']:.1f} | "
                       f"{e['estimate']:.3f}x [{e['low']:.3f}, {e['high']:.3f}] | {e['a_runs']}, {e['b_runs']} |")
        out.append("")
    return out


def markdown(rows: list[dict[str, Any]], speeds: list[dict[str, Any]], lines: list[str], suite: str,
             claims: Optional[list[dict[str, Any]]] = None, cost: Optional[tuple[int, float]] = None,
             comparisons: Sequence[dict[str, Any]] = (), end_to_end: Sequence[dict[str, Any]] = (),
             second_look: Optional[dict[str, Any]] = None) -> str:
    out = [f"# giva bench results: suite `{suite}`", ""]
    if cost is not None:
        n_runs, seconds = cost
        out += [f"Cost: {n_runs} runs; the training runs took {seconds:,.0f} s ({seconds / 3600:.1f} hours) of wall time.", ""]
    out += ["LR chosen per row by the mean validation accuracy over the seeds every tried LR ran (LRs tried in brackets); "
            "test accuracy of that LR, mean ± std over the seeds listed. Trainable = adapter only (the classification head "
            "is trained in every method and counted separately in results.json). Generated from the run JSONs only.", ""]
    out += claims_markdown(claims or [])
    out += second_look_markdown(second_look)
    out += comparisons_markdown(list(comparisons), list(end_to_end))
    out += ["## Headlines", ""] + [f"- {line}" for line in lines] + [""]
    for task in sorted({r["task"] for r in rows}):
        for title, selected in (("methods", [r for r in rows if r["task"] == task and r["ablation"] is None]),
                                ("ablations", [r for r in rows if r["task"] == task and r["ablation"] is not None])):
            if not selected:
                continue
            first = selected[0]
            metric = "exact match of the generated label" if first["task_kind"] == "clm" else "test accuracy"
            out += [f"## {task} ({first['model']}): {title} ({metric})", "", _regime(first), ""]
            out += ["| method | ablation | rank | LR [tried] | seeds | val acc | test acc | trainable | adapter bytes | step (ms) | init (s) |",
                    "|---|---|---|---|---|---|---|---|---|---|---|"]
            for r in selected:
                acc = f"{r['test_mean']:.2%} ± {r['test_std']:.2%}" if len(r["seeds"]) > 1 else f"{r['test_mean']:.2%}"
                tried = ", ".join(_fmt_lr(x) for x in r["lrs_tried"])
                out.append(
                    f"| {r['method']} | {r['ablation'] or ''} | {r['rank'] if r['rank'] is not None else '-'} | "
                    f"{_fmt_lr(r['lr']) + f' [{tried}]' if r['kind'] != 'none' else '-'} | {len(r['seeds'])} | "
                    f"{r['val_mean']:.2%} | {acc} | {r['trainable_adapter']:,} | "
                    f"{r['adapter_bytes']:,} | {r['median_step_seconds'] * 1000:.0f} | {r['init_seconds']:.2f} |"
                )
            out.append("")
    for speed in speeds:
        out += [f"## speed: {speed['phase']} ({speed['task']['model']})", "",
                "| method | targets | median step (ms) | ratio to LoRA | overhead above floor | init (s) | init in LoRA steps | trainable |",
                "|---|---|---|---|---|---|---|---|"]
        for name, e in speed["methods"].items():
            ratio = f"{e['ratio_to_lora']:.3f}" if e["ratio_to_lora"] else "-"
            floor = f"{e['overhead_above_floor']:+.1%}" if e.get("overhead_above_floor") is not None else "-"
            init_steps = e.get("init_in_lora_steps", e["init_in_steps"])
            targets = _speed_targets(name, e, speed["task"]["target_modules"])
            out.append(f"| {name} | {targets} | {e['median_step_seconds'] * 1000:.0f} | {ratio} | {floor} | {e['init_seconds']:.2f} | "
                       f"{init_steps:.2f} | {e['trainable_adapter']:,} |")
        out.append("")
    out += ["## Plots", ""] + [f"![{p}]({p})" for p in PLOTS] + [""]
    return "\n".join(out)


def _regime(row: dict[str, Any]) -> str:
    """How long a task's rows train, from their run JSONs."""
    epochs = row["epochs"] or 1
    return (f"{row['n_train']} training examples, batch {row['batch_size']}, {epochs} epoch(s): "
            f"{row['steps']} steps per run (`timing.steps`).")


def _speed_targets(name: str, entry: dict[str, Any], task_default: Sequence[str]) -> str:
    """A speed entry's adapted layers as text. Records written before entries named their targets get
    them from the method's definition in benchmarks/methods/ (the task's default only names the layers
    of methods without their own)."""
    targets = entry.get("target_modules")
    if targets is None:
        try:
            targets = load_method(benchmarks_dir(), name).targets(task_default)
        except (FileNotFoundError, ValueError):
            return "?"
    if isinstance(targets, str):
        return targets
    return ", ".join(targets) if targets else "-"


def plot(rows: list[dict[str, Any]], runs: list[dict[str, Any]], speeds: list[dict[str, Any]], task: str, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = [r for r in rows if r["task"] == task and r["ablation"] is None]
    colours = {"giva": "tab:red", "giva-random": "tab:orange", "vera": "tab:blue", "lora": "tab:green",
               "osora": "tab:purple", "probe": "grey", "zero-shot": "grey", "full": "black"}
    paths = []

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in main:
        x = max(r["trainable_adapter"], 1)
        ax.errorbar(x, r["test_mean"] * 100, yerr=r["test_std"] * 100, fmt="o", color=colours.get(r["family"], "k"), capsize=3)
        ax.annotate(r["method"], (x, r["test_mean"] * 100), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("trainable adapter parameters (log; head not counted, probe plotted at 1)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{task}: accuracy vs trainable parameters")
    ax.grid(alpha=0.3)
    paths.append(_save(fig, folder / PLOTS[0]))

    fig, ax = plt.subplots(figsize=(8, 5))
    by_series: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
    for r in rows:
        if r["task"] != task or r["rank"] is None or r["family"] not in ("giva", "giva-random", "vera", "osora"):
            continue
        if r["ablation"] is not None and not re.fullmatch(r"r\d+", r["ablation"]):  # rank ablations only
            continue
        if r["family"] == "giva" and (r["variant"] or "Vr") != "Vr":
            continue
        by_series[rank_series(r["method"])].append((r["rank"], r["test_mean"] * 100, r["test_std"] * 100))
    for series, points in by_series.items():
        points.sort()
        family = next(f for f in sorted(colours, key=len, reverse=True) if series.startswith(f))
        ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker="o",
                    color=colours.get(family), label=series, capsize=3, ls=_all_layers_style(series))
    for r in main:
        if r["family"] in ("lora", "probe", "zero-shot", "full"):
            ax.axhline(r["test_mean"] * 100, color=colours.get(r["family"]), ls="--", lw=0.8, label=r["method"])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rank r")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{task}: accuracy vs rank (gradient vs random bases, VeRA, OSoRA)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    paths.append(_save(fig, folder / PLOTS[1]))

    fig, axes = plt.subplots(1, max(1, len(speeds)) + 1, figsize=(5 * (len(speeds) + 1), 4.5), squeeze=False)
    ax = axes[0][0]
    ordered = sorted(main, key=lambda r: r["median_step_seconds"])
    ax.barh([r["method"] for r in ordered], [r["median_step_seconds"] * 1000 for r in ordered],
            color=[colours.get(r["family"], "k") for r in ordered])
    ax.set_xlabel("median step (ms), separate runs")
    ax.set_title(f"{task}: training runs")
    for ax, speed in zip(axes[0][1:], speeds):
        names = list(speed["methods"])
        ax.barh(names, [speed["methods"][n]["median_step_seconds"] * 1000 for n in names],
                color=[colours.get(speed["methods"][n]["family"], "k") for n in names])
        ax.set_xlabel("median step (ms), interleaved")
        ax.set_title(f"{speed['phase']} ({speed['task']['model']})")
    fig.tight_layout()
    paths.append(_save(fig, folder / PLOTS[2]))

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in main:
        run = next((x for x in runs if x.get("kind") == "train" and x["task"]["name"] == task and x["method"]["name"] == r["method"]
                    and x["ablation"] is None and x["lr"] == r["lr"] and x["seed"] == r["seeds"][0]), None)
        if run is None:
            continue
        loss = run["train_loss"]
        window = max(1, len(loss) // 20)
        smooth = [statistics.fmean(loss[max(0, i - window + 1): i + 1]) for i in range(len(loss))]
        ax.plot(smooth, color=colours.get(r["family"]), alpha=0.8, lw=1, label=r["method"])
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (moving average)")
    ax.set_title(f"{task}: training loss, chosen LR, first seed")
    ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3)
    paths.append(_save(fig, folder / PLOTS[3]))
    return paths


def _all_layers_style(series: str) -> str:
    """Dashed: adapters on every linear layer (the library default, and LoRA/VeRA on the same layers)."""
    return "--" if series.endswith("-all") or "-default" in series else "-"


def rank_series(method: str) -> str:
    """The line a method's row joins in the accuracy-vs-rank plot: its name without the rank
    ('giva-default-r32' -> 'giva-default', 'vera-r64-all' -> 'vera-all')."""
    return re.sub(r"-r\d+", "", method)


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def write_report(output_dir: Path, spec: SuiteSpec) -> dict[str, Any]:
    """Write results.json, results.md and the plots next to the runs/ folder; returns the results dict."""
    suite, headline_task = spec.name, spec.headline_task
    runs = load_runs(output_dir / "runs")
    rows = aggregate(runs, probe_rule=spec.train.get("head_lr") == "probe")
    speeds = [r for r in runs if r.get("kind") == "speed"]
    lines = headlines(rows, speeds, headline_task, spec.headline_pairs, spec.headline_sizes)
    claims = evaluate_claims(spec.claims, rows, speeds)
    look = asdict(spec.second_look) if spec.second_look else None
    second_look = {**look, "claims": evaluate_second_look(look, rows, spec.claims)} if look else None
    comparisons = [{"what": c.what, **combination(rows, c.plus, c.minus)} for c in spec.comparisons
                   if all(_find(rows, *split_ref(ref)) for ref in (*c.plus, *c.minus))]
    pair = spec.end_to_end
    end_to_end = [{"task": task, "steps": _find(rows, task, pair[0])["steps"],
                   **end_to_end_ratio(rows, *(f"{task}/{m}" for m in pair))}
                  for task in sorted({r["task"] for r in rows}) if pair and all(_find(rows, task, m) for m in pair)]
    per_example = ("test_correct_by_seed", "test_sha256_by_seed", "test_correct_by_lr", "test_sha256_by_lr")  # in the run JSONs; kept out of the summary
    results = {
        "suite": suite,
        "headline_task": headline_task,
        "headlines": lines,
        "claims": claims,
        **({"second_look": second_look} if second_look else {}),
        "comparisons": comparisons,
        "end_to_end": end_to_end,
        "rows": [{k: v for k, v in row.items() if k not in per_example} for row in rows],
        "speed": [{k: v for k, v in s.items()} for s in speeds],
        "n_runs": len(runs),
        "total_run_seconds": sum(r["timing"]["total_seconds"] for r in runs if r.get("kind") == "train"),
    }
    write_json_atomically(output_dir / "results.json", results)
    cost = (results["n_runs"], results["total_run_seconds"])
    (output_dir / "results.md").write_text(markdown(rows, speeds, lines, suite, claims, cost, comparisons, end_to_end, second_look))
    if rows:
        plot(rows, runs, speeds, headline_task, output_dir)
    return results
