"""GiVA in an Accelerate training script. Launch it with torchrun on CPU:

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 examples/accelerate_torchrun.py --model tiny

(``accelerate launch --cpu --num_processes 2`` silently runs ONE process; on GPUs
``accelerate launch --num_processes 2`` works.) The script stops if Accelerate sees fewer processes
than the launcher started.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from common import Sentences, giva_model, parse_args, train
from torch.utils.data import DataLoader

import giva
from giva.integrations.distributed import launcher_mismatch, replication_mismatches


def main() -> None:
    args = parse_args(__doc__)
    # On a machine without GPUs, Accelerator() without cpu=True also sees one process under torchrun.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    problem = launcher_mismatch(accelerator.num_processes, "Accelerate")
    if problem:
        raise RuntimeError(problem)
    model = giva_model(args.model)
    loader = DataLoader(Sentences(), batch_size=args.batch_size, shuffle=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)  # the loader is now per rank
    giva.initialize(accelerator.unwrap_model(model), loader, progress=accelerator.is_main_process)
    train(model, loader, optimizer, args.steps, backward=accelerator.backward, verbose=accelerator.is_main_process)
    assert not replication_mismatches(model), "GiVA tensors differ across ranks"
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(args.output_dir)
        print(f"world size {accelerator.num_processes}; adapter saved to {args.output_dir}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
