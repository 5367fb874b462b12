"""GiVA under FSDP2 (``torch.distributed.fsdp.fully_shard``): base weights and GiVA vectors sharded.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 examples/fsdp2_torchrun.py --model tiny

The bases are computed before sharding (with ``mode="sketch"`` no rank ever holds a dense
gradient); after training, ``full_state_dict`` gathers the sharded vectors so rank 0 can save an
adapter that loads in one process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from common import Sentences, giva_model, parse_args
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, DistributedSampler

import giva
from giva.integrations.distributed import full_state_dict, replication_mismatches


def main() -> None:
    args = parse_args(__doc__)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank()
    if torch.cuda.is_available():
        torch.cuda.set_device(rank % torch.cuda.device_count())
    data = Sentences()
    loader = DataLoader(data, batch_size=args.batch_size, sampler=DistributedSampler(data, seed=0))
    model = giva_model(args.model)
    giva.initialize(model, loader, progress=rank == 0, mode="sketch")
    for layer in model.base_model.model.model.layers:  # one FSDP unit per decoder layer, then the root
        fully_shard(layer)
    fully_shard(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    device = next(model.parameters()).device
    for step, batch in zip(range(args.steps), loader):
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if rank == 0 and step % 5 == 0:
            print(f"step {step}: loss {loss.item():.3f}")
    assert not replication_mismatches(model), "GiVA tensors differ across ranks"
    state = full_state_dict(model)  # every rank takes part in the gather
    if rank == 0:
        model.save_pretrained(args.output_dir, state_dict=state)
        print(f"world size {dist.get_world_size()}; adapter saved to {args.output_dir}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
