"""Whether the second look's seeds come from the same procedure as the first look's: reruns the last first-look seed
of each row the second look extends with today's code (the first look's `sst-clm` runs date from 2026-12-01,
transformers 5.24, its `sst-clm-nf4` runs from 2026-12-05; the second look's from 2026-12-06, transformers 5.25 and
later commits) and compares each with its committed record, prediction by prediction on the 1000 test sentences.

    .venv/bin/python benchmarks/diagnostics/rerun_first_look.py   # about 8 minutes on 2 cores; writes the .md below
"""

from __future__ import annotations

import sys

from reruns import BENCH, rerun_table

from giva.bench.runner import RunSpec

OUT = BENCH / "results" / "diagnostics" / "rerun_first_look.md"
# the last first-look seed (4) of each of the four rows the second look extends, at the LR that row chose
RERUNS = [RunSpec(phase, task, method, 4, lr) for phase, task in (("clm", "sst-clm"), ("clm-nf4", "sst-clm-nf4"))
          for method, lr in (("giva-default-r8", 0.005), ("lora-r8-all", 0.004))]


def main() -> int:
    same = rerun_table(
        "First-look runs rerun with today's code", "rerun_first_look.py", RERUNS,
        lambda old: f"transformers {old['versions'].get('transformers')}",
        "for that row the two looks' seeds did not run the same numerics.", OUT)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
