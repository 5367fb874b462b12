"""Reruns committed evidence runs with today's code and compares each with its record, prediction by prediction on
the test sentences: the table both ``rerun_*.py`` diagnostics write."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from giva.bench.runner import RunSpec, execute_run, load_task
from giva.bench.spec import load_method, load_suite
from giva.bench.versions import versions

BENCH = Path(__file__).resolve().parents[1]


def rerun_table(title: str, script: str, runs: list[RunSpec], then: Callable[[dict], str], differs: str,
                out: Path) -> bool:
    """Reruns ``runs`` (evidence-suite runs with committed records), writes the comparison to ``out`` and prints it.

    ``then`` says which versions a record ran with; ``differs`` is the closing sentence when some rerun predicts
    otherwise than its record. Returns whether every rerun predicted exactly as its record did."""
    suite = load_suite(BENCH, "evidence")
    torch.set_num_threads(suite.threads)
    lines = [f"# {title}", "", f"`python benchmarks/diagnostics/{script}`; versions now: {json.dumps(versions())}.", "",
             "| run | versions then | test accuracy then / now | test predictions identical | final training loss then / now |",
             "|---|---|---|---|---|"]
    same_everywhere = True
    for run in runs:
        old = json.loads((BENCH / "results" / "evidence" / "runs" / f"{run.run_id}.json").read_text())
        new = execute_run(suite, load_task(suite.tasks[run.task]), load_method(BENCH, run.method), run, False)
        same = all(new["metrics"][key] == old["metrics"][key] for key in ("test_correct", "test_predictions"))
        same_everywhere &= same
        lines.append(f"| {run.run_id} | {then(old)}, started {old['started_at']} | {old['metrics']['test_accuracy']:.2%} / "
                     f"{new['metrics']['test_accuracy']:.2%} | {'yes' if same else 'NO'} | "
                     f"{old['train_loss'][-1]} / {new['train_loss'][-1]} |")
    lines += ["", "Every rerun predicts as its committed record did." if same_everywhere else
              f"Some rerun differs from its committed record (NO above): {differs}", ""]
    out.write_text("\n".join(lines))
    print(out.read_text())
    return same_everywhere
