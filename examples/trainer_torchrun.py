"""GiVA with the transformers Trainer, launched by torchrun (DDP; on CPU the Trainer picks gloo).

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 examples/trainer_torchrun.py --model tiny

``giva.GivaInitCallback`` fills the bases from the Trainer's own (per-rank) train dataloader
before the first step; the sums are all-reduced, so every rank gets the same bases.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from common import Sentences, giva_model, parse_args
from transformers import Trainer, TrainingArguments

import giva
from giva.integrations.distributed import launcher_mismatch, replication_mismatches


def main() -> None:
    args = parse_args(__doc__)
    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, logging_steps=5, save_strategy="no", report_to=[], seed=0,
        # Without use_cpu=True on a machine with no GPU, torchrun's processes each train alone.
        use_cpu=not torch.cuda.is_available(),
    )
    problem = launcher_mismatch(training_args.world_size, "the Trainer")
    if problem:
        raise RuntimeError(problem)
    model = giva_model(args.model)
    trainer = Trainer(model=model, args=training_args, train_dataset=Sentences(), callbacks=[giva.GivaInitCallback()])
    trainer.train()
    world = dist.get_world_size() if dist.is_initialized() else 1
    assert not replication_mismatches(model), "GiVA tensors differ across ranks"
    if trainer.is_world_process_zero():
        model.save_pretrained(args.output_dir)
        print(f"world size {world}; adapter saved to {args.output_dir}")


if __name__ == "__main__":
    main()
