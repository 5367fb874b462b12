"""GiVA with a plain DDP loop under torchrun (CPU: gloo; GPU: nccl).

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 examples/ddp_torchrun.py --model tiny

Every rank initialises the bases from its own shard of the data: ``giva.initialize`` all-reduces
the small per-layer sums, so all ranks end with the same bases. Then the usual DDP loop.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from common import check_and_save, giva_model, init_distributed, parse_args, rank_loader, train
from torch.nn.parallel import DistributedDataParallel

import giva


def main() -> None:
    args = parse_args(__doc__)
    device = init_distributed()
    rank = dist.get_rank()
    loader = rank_loader(args.batch_size)  # each rank its own shard of the data
    model = giva_model(args.model).to(device)
    giva.initialize(model, loader, progress=rank == 0)  # before DDP wraps it; the loader's batches move to the model's device
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=args.lr)
    train(ddp, loader, optimizer, args.steps, device=device, verbose=rank == 0)
    check_and_save(ddp, args.output_dir)  # the GiVA tensors gathered, checked equal on all ranks, saved by rank 0
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
