"""Whether committed evidence runs made under PEFT 0.21.2 (and the code before stop 51) are reproduced by today's code
under PEFT 0.22.0, before the evidence phases that run after the upgrade are pooled with them: reruns a GiVA run of
the gap rows (the kind the phases still to run add) and a LoRA run (PEFT's own code), and compares each with its
committed record, prediction by prediction on the 1000 test sentences.

    .venv/bin/python benchmarks/diagnostics/rerun_versions.py   # about 4 minutes on 2 cores; writes the .md below
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
OUT = BENCH / "results" / "diagnostics" / "rerun_versions.md"
# (phase, task, method, seed, LR, head LR)
RERUNS = (("gap", "sst", "giva-core-r8", 0, 0.04, 0.24), ("headline-r8", "sst", "lora-r8-all", 0, 0.001, 0.24))


def main() -> int:
    suite = load_suite(BENCH, "evidence")
    torch.set_num_threads(suite.threads)
    lines = ["# Evidence runs rerun with today's code and libraries", "",
             f"`python benchmarks/diagnostics/rerun_versions.py`; versions now: {json.dumps(versions())}.", "",
             "| run | versions then | test accuracy then / now | test predictions identical | final training loss then / now |",
             "|---|---|---|---|---|"]
    same_everywhere = True
    for phase, task_name, method, seed, lr, head_lr in RERUNS:
        run = RunSpec(phase, task_name, method, seed, lr, head_lr=head_lr)
        old = json.loads((BENCH / "results" / "evidence" / "runs" / f"{run.run_id}.json").read_text())
        new = execute_run(suite, load_task(suite.tasks[task_name]), load_method(BENCH, method), run, False)
        same = new["metrics"]["test_correct"] == old["metrics"]["test_correct"] and \
            new["metrics"]["test_predictions"] == old["metrics"]["test_predictions"]
        same_everywhere &= same
        then = f"PEFT {old['versions'].get('peft')}, transformers {old['versions'].get('transformers')}"
        lines.append(f"| {run.run_id} | {then}, started {old['started_at']} | {old['metrics']['test_accuracy']:.2%} / "
                     f"{new['metrics']['test_accuracy']:.2%} | {'yes' if same else 'NO'} | "
                     f"{old['train_loss'][-1]} / {new['train_loss'][-1]} |")
    lines += ["", "Every rerun predicts as its committed record did." if same_everywhere else
              "Some rerun differs from its committed record (NO above): runs before and after the upgrade did not run "
              "the same numerics.", ""]
    OUT.write_text("\n".join(lines))
    print(OUT.read_text())
    return 0 if same_everywhere else 1


if __name__ == "__main__":
    sys.exit(main())
