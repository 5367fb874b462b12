"""FSDP2 (``torch.distributed.fsdp.fully_shard``) on CPU with gloo: GiVA vectors and base weights sharded.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 tests/dist/train_fsdp2.py OUT_DIR
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from train_common import STEPS, finish, giva_model, rank_batches

import giva


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = giva_model()
    batches = rank_batches(rank)
    report = giva.initialize(model, batches, num_batches=2, progress=False)
    # One FSDP unit per decoder layer, then the root: parameters become DTensors sharded over ranks.
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    sharded = sum(1 for p in model.parameters() if type(p.data).__name__ == "DTensor")
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for step in range(STEPS):
        loss = model(**batches[step]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    finish(model, losses, {"calibration_loss": report.losses, "dtensor_parameters": sharded})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
