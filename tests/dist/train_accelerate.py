"""An Accelerate training script, launched with torchrun (``accelerate launch --cpu
--num_processes 2`` silently runs one process).

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 tests/dist/train_accelerate.py OUT_DIR
"""

from __future__ import annotations

from accelerate import Accelerator
from accelerate.utils import DistributedType
from teardown import end
from train_common import CALIBRATION_BATCHES, adamw, finish, giva_model, optimizer_step, rank_batches, train

import giva


def main() -> None:
    accelerator = Accelerator(cpu=True)
    if accelerator.distributed_type != DistributedType.MULTI_CPU or accelerator.num_processes != 2:
        raise RuntimeError(f"expected 2 CPU processes, got {accelerator.distributed_type} x {accelerator.num_processes}")
    model = giva_model()
    batches = rank_batches(accelerator.process_index)
    model, optimizer = accelerator.prepare(model, adamw(model))
    # initialize needs the PeftModel, not the DDP wrapper prepare() returned.
    report = giva.initialize(accelerator.unwrap_model(model), batches, num_batches=CALIBRATION_BATCHES, progress=False)
    losses = train(model, batches, optimizer_step(optimizer), backward=accelerator.backward)
    finish(model, losses, {"calibration_loss": report.losses})
    accelerator.end_training()
    end()


if __name__ == "__main__":
    main()
