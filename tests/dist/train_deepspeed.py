"""DeepSpeed ZeRO-3 on CPU (gloo): base weights and GiVA vectors partitioned over the ranks.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 tests/dist/train_deepspeed.py OUT_DIR
"""

from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import sys  # noqa: E402

import deepspeed  # noqa: E402
import teardown  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from train_common import LR, finish, initialized_model, train  # noqa: E402

from giva.integrations.distributed import full_state_dict  # noqa: E402

CONFIG = {
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 1,
    "optimizer": {"type": "AdamW", "params": {"lr": LR, "torch_adam": True}},
    # Threshold 0: every parameter partitioned, the vectors too (below the default 1e5 elements ZeRO-3 keeps a
    # parameter whole on every rank after its first fetch, which hid partitioned reads).
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
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
    # Before the first forward every vector is partitioned: full_state_dict read each as an empty tensor (an adapter
    # of empty vectors saved without an error) until it gathered them itself.
    empty = sorted(name for name, tensor in full_state_dict(engine).items() if tensor.numel() == 0)
    losses = train(engine, batches, engine.step, backward=engine.backward)
    # Inside a GatheredParameters block of the caller's it gathers nothing more (DeepSpeed refuses a nested gather of
    # the same parameters) and reads what it reads outside.
    outside = full_state_dict(engine)
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        inside = full_state_dict(engine)
    same_inside = inside.keys() == outside.keys() and all(torch.equal(inside[k], outside[k]) for k in inside)
    # No GatheredParameters here: full_state_dict and replication_mismatches gather the partitioned vectors themselves
    # (they read them as empty tensors before, and saved an adapter of empty vectors).
    finish(engine, losses, {"calibration_loss": report.losses, "zero_stage": engine.zero_optimization_stage(),
                                "empty_before_training": empty, "same_inside_a_gather": same_inside})
    teardown.end()  # every output is written: leave without finalisation (see teardown.py)


if __name__ == "__main__":
    main()
