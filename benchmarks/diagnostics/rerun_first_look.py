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
# (phase, task, method, seed, LR): the last first-look seed of each of the four rows the second look extends
RERUNS = (("clm", "sst-clm", "giva-default-r8", 4, 0.005), ("clm", "sst-clm", "lora-r8-all", 4, 0.004),
          ("clm-nf4", "sst-clm-nf4", "giva-default-r8", 4, 0.005), ("clm-nf4", "sst-clm-nf4", "lora-r8-all", 4, 0.004))


def main() -> int:
    same = rerun_table(
        "First-look runs rerun with today's code", "rerun_first_look.py", [RunSpec(*run) for run in RERUNS],
        lambda old: f"transformers {old['versions'].get('transformers')}",
        "for that row the two looks' seeds did not run the same numerics.", OUT)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
