"""HF Trainer launched by torchrun (DDP on CPU, gloo), bases filled by giva.GivaInitCallback.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 tests/dist/train_trainer.py OUT_DIR
"""

from __future__ import annotations

import teardown
import torch
import torch.distributed as dist
from train_common import CALIBRATION_BATCHES, LR, STEPS, finish, giva_model, out_dir, rank_batches
from transformers import Trainer, TrainingArguments

import giva


class _Rows(torch.utils.data.Dataset):
    """One dataset for all ranks; the Trainer's distributed sampler gives each rank its own rows."""

    def __init__(self) -> None:
        self.rows = [
            {"input_ids": ids, "labels": ids}
            for seed in range(2)
            for batch in rank_batches(seed, STEPS)
            for ids in batch["input_ids"]
        ]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


class _LossRecordingTrainer(Trainer):
    """Keeps this rank's own losses (the Trainer's logs average them over ranks)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rank_losses: list[float] = []

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        loss = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        self.rank_losses.append(float((loss[0] if return_outputs else loss).detach()))
        return loss


def main() -> None:
    args = TrainingArguments(
        output_dir=str(out_dir() / "trainer"), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=LR,
        report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, ddp_backend="gloo", seed=0,
        disable_tqdm=True, dataloader_num_workers=0,
    )
    callback = giva.GivaInitCallback(num_batches=CALIBRATION_BATCHES, progress=False)
    trainer = _LossRecordingTrainer(model=giva_model(), args=args, train_dataset=_Rows(), callbacks=[callback])
    trainer.train()
    assert dist.is_initialized(), "the Trainer did not start a process group"
    finish(trainer.model_wrapped, trainer.rank_losses, {"calibration_loss": callback.report.losses})
    teardown.end()  # every output is written: leave without finalisation (see teardown.py)


if __name__ == "__main__":
    main()
