"""GivaInitCallback when the ranks disagree on which adapters still need bases. Under FSDP or ZeRO-3 the Trainer loads a
resumed checkpoint after wrapping the model, so nothing broadcasts it: a rank that resumed (its node's disk holds the
checkpoint) has bases when training begins, a rank that did not has none. Here a callback ahead of GivaInitCallback
fills rank 0's bases after the wrap, as that load does. Every rank must raise, naming both views; before, rank 1
entered initialize's collectives alone, pairing them with rank 0's gradient all-reduces.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 tests/dist/init_disagree.py OUT_DIR
"""

from __future__ import annotations

import json
import os

import teardown
import torch
from train_common import CALIBRATION_BATCHES, LR, STEPS, giva_model, out_dir
from train_trainer import _Rows
from transformers import Trainer, TrainerCallback, TrainingArguments

import giva


class _ResumedOnRankZero(TrainerCallback):
    """Rank 0's adapter gets bases after the model was wrapped, as a checkpoint only rank 0 finds would give it."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if int(os.environ["RANK"]) == 0:
            with torch.no_grad():
                for name, tensor in model.named_buffers():
                    if "giva_A" in name or "giva_B" in name:
                        tensor.normal_()


def main() -> None:
    rank = int(os.environ["RANK"])
    args = TrainingArguments(
        output_dir=str(out_dir() / "trainer"), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=LR,
        report_to=[], save_strategy="no", use_cpu=True, ddp_backend="gloo", ddp_timeout=60, seed=0, disable_tqdm=True,
        dataloader_num_workers=0,
    )
    callbacks = [_ResumedOnRankZero(), giva.GivaInitCallback(num_batches=CALIBRATION_BATCHES, progress=False)]
    trainer = Trainer(model=giva_model(), args=args, train_dataset=_Rows(), callbacks=callbacks)
    try:
        trainer.train()
        error = None
    except RuntimeError as err:
        error = str(err)
    (out_dir() / f"rank{rank}.json").write_text(json.dumps({"error": error}))
    teardown.end()


if __name__ == "__main__":
    main()
