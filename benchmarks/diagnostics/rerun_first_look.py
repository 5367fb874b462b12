"""Whether the second look's seeds come from the same procedure as the first look's: reruns the last first-look seed
of each row the second look extends with today's code (the first look's `sst-clm` runs date from 2026-12-01,
transformers 5.24, its `sst-clm-nf4` runs from 2026-12-05; the second look's from 2026-12-06, transformers 5.25 and
later commits) and compares each with its committed record, prediction by prediction on the 1000 test sentences.

    .venv/bin/python benchmarks/diagnostics/rerun_first_look.py   # about 8 minutes on 2 cores; writes the .md below
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from giva.bench.runner import RunSpec, execute_run, load_task
from giva.bench.spec import load_method, load_suite
from giva.bench.versions import versions

BENCH = Path(__file__).resolve().parents[1]
OUT = BENCH / "results" / "diagnostics" / "rerun_first_look.md"
# (phase, task, method, seed, LR): the last first-look seed of each of the four rows the second look extends
RERUNS = (("clm", "sst-clm", "giva-default-r8", 4, 0.005), ("clm", "sst-clm", "lora-r8-all", 4, 0.004),
          ("clm-nf4", "sst-clm-nf4", "giva-default-r8", 4, 0.005), ("clm-nf4", "sst-clm-nf4", "lora-r8-all", 4, 0.004))


def main() -> int:
    suite = load_suite(BENCH, "evidence")
    torch.set_num_threads(suite.threads)
    lines = ["# First-look runs rerun with today's code", "", f"`python benchmarks/diagnostics/rerun_first_look.py`; "
             f"versions now: {json.dumps(versions())}.", "",
             "| run | versions then | test accuracy then / now | test predictions identical | final training loss then / now |",
             "|---|---|---|---|---|"]
    same_everywhere = True
    for phase, task_name, method, seed, lr in RERUNS:
        run = RunSpec(phase, task_name, method, seed, lr)
        old = json.loads((BENCH / "results" / "evidence" / "runs" / f"{run.run_id}.json").read_text())
        new = execute_run(suite, load_task(suite.tasks[task_name]), load_method(BENCH, method), run, False)
        same = new["metrics"]["test_correct"] == old["metrics"]["test_correct"] and new["metrics"]["test_predictions"] == old["metrics"]["test_predictions"]
        same_everywhere &= same
        lines.append(f"| {run.run_id} | transformers {old['versions'].get('transformers')}, started {old['started_at']} | "
                     f"{old['metrics']['test_accuracy']:.2%} / {new['metrics']['test_accuracy']:.2%} | {'yes' if same else 'NO'} | "
                     f"{old['train_loss'][-1]} / {new['train_loss'][-1]} |")
    lines += ["", "Every rerun predicts as its committed record did." if same_everywhere else
              "Some rerun differs from its committed record (NO above): for that row the two looks' seeds did not run the "
              "same numerics.", ""]
    OUT.write_text("\n".join(lines))
    print(OUT.read_text())
    return 0 if same_everywhere else 1


if __name__ == "__main__":
    sys.exit(main())
