"""DeepSpeed ZeRO-3 on CPU (gloo): base weights and GiVA vectors partitioned over the ranks.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 tests/dist/train_deepspeed.py OUT_DIR
"""

from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import sys  # noqa: E402

import deepspeed  # noqa: E402
import teardown  # noqa: E402
import torch.distributed as dist  # noqa: E402
from train_common import LR, finish, initialized_model, train  # noqa: E402

CONFIG = {
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 1,
    "optimizer": {"type": "AdamW", "params": {"lr": LR, "torch_adam": True}},
    "zero_optimization": {"stage": 3},
    "steps_per_print": 1000,
}


def main() -> None:
    # DeepSpeed JIT-compiles a shared-memory CPU collective with ninja on first use (minutes on 2 busy
    # cores, and a killed compile leaves a lock every later run waits on forever); gloo is enough here.
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # deepspeed.comm.torch is torch itself
    deepspeed.init_distributed(dist_backend="gloo")
    model, batches, report = initialized_model(dist.get_rank())
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=CONFIG
    )
    losses = train(engine, batches, engine.step, backward=engine.backward)
    params = list(engine.module.parameters())
    finish(
        engine, losses, {"calibration_loss": report.losses, "zero_stage": engine.zero_optimization_stage()},
        gathered=lambda: deepspeed.zero.GatheredParameters(params, modifier_rank=None),
    )
    teardown.end()  # every output is written: leave without finalisation (see teardown.py)


if __name__ == "__main__":
    main()
