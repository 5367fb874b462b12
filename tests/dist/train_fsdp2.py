"""FSDP2 (``torch.distributed.fsdp.fully_shard``) on CPU with gloo: GiVA vectors and base weights sharded.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 tests/dist/train_fsdp2.py OUT_DIR
"""

from __future__ import annotations

import teardown
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from train_common import adamw, finish, initialized_model, optimizer_step, train


def main() -> None:
    dist.init_process_group("gloo")
    model, batches, report = initialized_model(dist.get_rank())
    # One FSDP unit per decoder layer, then the root: parameters become DTensors sharded over ranks.
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    sharded = sum(1 for p in model.parameters() if type(p.data).__name__ == "DTensor")
    losses = train(model, batches, optimizer_step(adamw(model)))
    finish(model, losses, {"calibration_loss": report.losses, "dtensor_parameters": sharded})
    teardown.end()  # every output is written: leave without finalisation (see teardown.py)


if __name__ == "__main__":
    main()
