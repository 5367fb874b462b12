"""The last step of every rank script: leave the process group, then exit without Python's finalisation.

In one full-suite run, rank 0 of ``init_ranks.py`` aborted after ``destroy_process_group()``. It had
already written every output, and it printed "terminate called without an active exception" (SIGABRT).
So C++ threads of the gloo backend were still being torn down while the interpreter finalised: a race
in torch's teardown, not in the code under test (pytorch/pytorch pull request #179291, closed
unmerged, describes a related one: gloo worker threads crashing at finalisation). The abort
failed the test module although every rank had finished. It did not recur in 10 standalone runs. The
same abort hit rank 1 of ``train_accelerate.py`` (then the one rank script without ``end()``) in two
full-suite runs.

A rank that reaches ``end()`` has written and closed all its outputs, so skipping finalisation loses
nothing. A rank that fails before ``end()`` still exits non-zero through its exception.
"""

from __future__ import annotations

import os
import sys

import torch.distributed as dist


def end() -> None:
    """``destroy_process_group()`` (unless a library already did, as Accelerate's ``end_training``), flush stdout
    and stderr, then ``os._exit(0)``."""
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
