"""One rank of an FSDP2-sharded model fails inside its forward, its loss_fn or its backward (tests/test_distributed_init.py).

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 tests/dist/init_fsdp_failure.py OUT_DIR CASE [fsdp1]

CASE is ``forward`` (rank 1 raises inside the second decoder layer, while rank 0 waits in that
layer's parameter all-gather), ``loss_fn`` (rank 1's loss_fn raises after the forward),
``backward`` (rank 1 raises in the backward) or ``nan_loss`` (rank 1's loss is NaN: an ordinary
agreement, after which the process group still works). Each rank writes ``<out>/rank<r>.json``: what it raised,
the message and how long it took. The process group is aborted by an exception: one case per launch.
With ``fsdp1`` the model is wrapped by FSDP1 with ``use_orig_params=True`` (the Accelerate and Trainer default:
plain Parameters, no flat parameter in sight) instead of FSDP2's ``fully_shard``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from init_ranks import NUM_BATCHES, model, rank_batches
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import fully_shard

import giva


def main() -> None:
    out, case = Path(sys.argv[1]), sys.argv[2]
    engine = sys.argv[3] if len(sys.argv) > 3 else "fsdp2"
    # A short group timeout: a rank left waiting fails the test in 60 s instead of 30 minutes.
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    m = model()
    layers = m.base_model.model.model.layers
    if engine == "fsdp1":
        for i, layer in enumerate(layers):
            layers[i] = FSDP(layer, use_orig_params=True, device_id=torch.device("cpu"))
        m = FSDP(m, use_orig_params=True, device_id=torch.device("cpu"))
    else:
        for layer in layers:
            fully_shard(layer)
        fully_shard(m)
    loss_fn = None
    if rank == 1 and case == "forward":
        def broken(module, args):
            raise ValueError("injected forward failure")
        # FSDP1: on the second layer's wrapper, whose all-gather runs in its forward (after this hook), so rank 0
        # waits in it; FSDP2: inside the second layer, after its all-gather.
        (layers[1] if engine == "fsdp1" else layers[1].mlp).register_forward_pre_hook(broken)
    elif rank == 1 and case == "loss_fn":
        def loss_fn(mm, batch):
            mm(**batch)
            raise ValueError("injected loss_fn failure")
    elif rank == 1 and case == "nan_loss":
        def loss_fn(mm, batch):
            return mm(**batch).loss * float("nan")
    elif rank == 1 and case == "backward":
        def loss_fn(mm, batch):
            def broken(grad):
                raise ValueError("injected backward failure")
            loss = mm(**batch).loss
            loss.register_hook(broken)
            return loss
    start = time.perf_counter()
    try:
        giva.initialize(m, rank_batches(rank), num_batches=NUM_BATCHES, progress=False, loss_fn=loss_fn, mode="sketch")
        record = {"raised": None, "message": ""}
    except Exception as exc:  # noqa: BLE001  recorded for the test to judge
        record = {"raised": type(exc).__name__, "message": str(exc)}
    record["seconds"] = time.perf_counter() - start
    if case == "nan_loss":  # agreed on at the step after the forward: the process group still works
        total = torch.ones(1)
        dist.all_reduce(total)
        record["group_sum"] = float(total)
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the group may be aborted: nothing to tear down (see teardown.py)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
