"""Whether committed evidence runs made under PEFT 0.21.2 (and the code before stop 51) are reproduced by today's code
under PEFT 0.22.0, before the evidence phases that run after the upgrade are pooled with them: reruns a GiVA run of
the gap rows (the kind the phases still to run add) and a LoRA run (PEFT's own code), and compares each with its
committed record, prediction by prediction on the 1000 test sentences.

    .venv/bin/python benchmarks/diagnostics/rerun_versions.py   # about 4 minutes on 2 cores; writes the .md below
"""

from __future__ import annotations

import sys

from reruns import BENCH, rerun_table

from giva.bench.runner import RunSpec

OUT = BENCH / "results" / "diagnostics" / "rerun_versions.md"
RERUNS = [RunSpec("gap", "sst", "giva-core-r8", 0, 0.04, head_lr=0.24),
          RunSpec("headline-r8", "sst", "lora-r8-all", 0, 0.001, head_lr=0.24)]


def main() -> int:
    same = rerun_table(
        "Evidence runs rerun with today's code and libraries", "rerun_versions.py", RERUNS,
        lambda old: f"PEFT {old['versions'].get('peft')}, transformers {old['versions'].get('transformers')}",
        "runs before and after the upgrade did not run the same numerics.", OUT)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
