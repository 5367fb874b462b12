"""torchrun DDP: giva.initialize on each rank's own batches, then a plain DDP training loop.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 tests/dist/train_ddp.py OUT_DIR
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from train_common import STEPS, finish, giva_model, rank_batches

import giva


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = giva_model()
    batches = rank_batches(rank)
    # Bases from the gradient summed over every rank's batches (all-reduced inside initialize).
    report = giva.initialize(model, batches, num_batches=2, progress=False)
    ddp = DistributedDataParallel(model)
    ddp.train()
    optimizer = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for step in range(STEPS):
        loss = ddp(**batches[step]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    finish(ddp, losses, {"calibration_loss": report.losses})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
