"""GiVA under FSDP2 (``torch.distributed.fsdp.fully_shard``): base weights and GiVA vectors sharded.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 examples/fsdp2_torchrun.py --model tiny

The bases are computed before sharding (with ``mode="sketch"`` no rank ever holds a dense
gradient); after training, ``full_state_dict`` gathers the sharded vectors so rank 0 can save an
adapter that loads in one process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from common import check_and_save, giva_model, init_distributed, parse_args, rank_loader, train
from torch.distributed.fsdp import fully_shard

import giva


def main() -> None:
    args = parse_args(__doc__)
    device = init_distributed()
    rank = dist.get_rank()
    loader = rank_loader(args.batch_size)  # each rank its own shard of the data
    model = giva_model(args.model)
    giva.initialize(model, loader, progress=rank == 0, mode="sketch")
    for layer in model.base_model.model.model.layers:  # one FSDP unit per decoder layer, then the root
        fully_shard(layer)
    fully_shard(model)  # moves the shards to this rank's device
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    train(model, loader, optimizer, args.steps, device=device, verbose=rank == 0)
    check_and_save(model, args.output_dir)  # the GiVA tensors gathered, checked equal on all ranks, saved by rank 0
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
