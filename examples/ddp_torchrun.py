"""GiVA with a plain DDP loop under torchrun (CPU: gloo; GPU: nccl).

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 examples/ddp_torchrun.py --model tiny

Every rank initialises the bases from its own shard of the data: ``giva.initialize`` all-reduces
the small per-layer sums, so all ranks end with the same bases. Then the usual DDP loop.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from common import Sentences, giva_model, parse_args
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

import giva
from giva.integrations.distributed import full_state_dict, replication_mismatches


def main() -> None:
    args = parse_args(__doc__)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if torch.cuda.is_available() else torch.device("cpu")
    data = Sentences()
    loader = DataLoader(data, batch_size=args.batch_size, sampler=DistributedSampler(data, seed=0))
    model = giva_model(args.model).to(device)
    giva.initialize(model, loader, progress=rank == 0)  # before DDP wraps it; the loader's batches move to the model's device
    ddp = DistributedDataParallel(model)
    ddp.train()
    optimizer = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=args.lr)
    for step, batch in zip(range(args.steps), loader):
        loss = ddp(**{k: v.to(device) for k, v in batch.items()}).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if rank == 0 and step % 5 == 0:
            print(f"step {step}: loss {loss.item():.3f}")
    assert not replication_mismatches(ddp), "GiVA tensors differ across ranks"
    state = full_state_dict(ddp)
    if rank == 0:
        model.save_pretrained(args.output_dir, state_dict=state)
        print(f"world size {dist.get_world_size()}; adapter saved to {args.output_dir}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
