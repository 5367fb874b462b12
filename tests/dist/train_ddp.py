"""torchrun DDP: giva.initialize on each rank's own batches, then a plain DDP training loop.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 tests/dist/train_ddp.py OUT_DIR
"""

from __future__ import annotations

import teardown
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from train_common import adamw, finish, initialized_model, optimizer_step, train


def main() -> None:
    dist.init_process_group("gloo")
    model, batches, report = initialized_model(dist.get_rank())
    ddp = DistributedDataParallel(model)
    losses = train(ddp, batches, optimizer_step(adamw(ddp)))
    finish(ddp, losses, {"calibration_loss": report.losses})
    teardown.end()  # every output is written: leave without finalisation (see teardown.py)


if __name__ == "__main__":
    main()
