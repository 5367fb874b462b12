"""giva.initialize on a DeepSpeed ZeRO-3 partitioned model, 2 gloo ranks on CPU.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 tests/dist/init_deepspeed.py OUT_DIR

Scenarios (each rank writes ``<out>/<scenario>_rank<r>.pt``: its bases, the report's mode and the
number of GiVA-layer weights it held whole while initialising):

* ``engine_<mode>``: the GiVA model wrapped by ``deepspeed.initialize`` (ZeRO-3 partitions every
  parameter, base weights included), then ``giva.initialize(engine, ...)``;
* ``zeroinit_<mode>``: the base model built inside ``deepspeed.zero.Init`` (weights partitioned from the
  start, sizes only in ``ds_shape``), wrapped by ``get_peft_model``, then the engine as above, and
  ``giva.initialize(engine.module, ...)`` (the module, as the Trainer hands it to its callbacks);
* ``before_<mode>``: ``giva.initialize`` on the model, then the engine (the order that never records a calibration
  pass as ZeRO-3's parameter-fetch trace): the reference for training after ``engine_<mode>``;
* ``trained``: an engine whose GiVA vectors are non-zero only in the ranks' partitions (``ds_tensor``):
  ``giva.initialize`` without ``force`` must refuse (``<out>/trained_rank<r>.pt`` holds the message).

The hooks see whole activations; the weights stay partitioned throughout (only the engine's own
forward/backward hooks gather them, layer by layer). After initialising, each engine trains TRAIN_STEPS steps;
the record holds their losses, or the error the first failing step raised.
"""

from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import deepspeed  # noqa: E402
import teardown  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from init_ranks import NUM_BATCHES, TARGETS, bases_of, model, rank_batches  # noqa: E402
from peft import get_peft_model  # noqa: E402

import giva  # noqa: E402
from giva import GivaConfig  # noqa: E402
from giva.init import giva_layers  # noqa: E402

CONFIG = {
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 1,
    "optimizer": {"type": "AdamW", "params": {"lr": 5e-2, "torch_adam": True}},
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},  # partition even tiny tensors
    "steps_per_print": 1000,
}


def engine_of(m):
    engine, *_ = deepspeed.initialize(model=m, model_parameters=[p for p in m.parameters() if p.requires_grad], config=CONFIG)
    return engine


TRAIN_STEPS = 2


def train(engine, batches: list[dict]) -> dict:
    """TRAIN_STEPS optimizer steps on the engine: {"losses": [...]}, or {"error": ...} from the step that failed."""
    engine.train()
    losses = []
    try:
        for step in range(TRAIN_STEPS):
            loss = engine(**batches[step % len(batches)]).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
    except Exception as exc:  # noqa: BLE001  recorded for the test to judge
        return {"error": f"step {len(losses)}: {type(exc).__name__}: {str(exc).splitlines()[0]}"}
    return {"losses": losses}


def partitioned_weights(m) -> int:
    """GiVA layers whose base weight this rank holds only a partition of (an empty tensor, ``ds_shape`` the full size)."""
    return sum(
        1 for layer in giva_layers(m).values()
        if hasattr(layer.get_base_layer().weight, "ds_shape") and layer.get_base_layer().weight.numel() == 0
    )


def zero_init_model(out: Path):
    """The tiny Llama built partitioned; rank 0 saves its whole weights (zero.Init draws them differently
    from a plain build) so that the test can run the one-process reference on the same model."""
    from tiny_models import tiny_llama

    with deepspeed.zero.Init(config_dict_or_path=CONFIG):
        base = tiny_llama(seed=0)
    assert all(p.numel() == 0 and hasattr(p, "ds_shape") for p in base.parameters())
    with deepspeed.zero.GatheredParameters(list(base.parameters()), modifier_rank=None):
        if dist.get_rank() == 0:
            torch.save({k: v.detach().clone() for k, v in base.state_dict().items()}, out / "zeroinit_base.pt")
    return get_peft_model(base, GivaConfig(r=4, target_modules=TARGETS, variant="VrUr", seed=3))


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    # DeepSpeed JIT-compiles a shared-memory CPU collective on first use (minutes); gloo is enough here.
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    batches = rank_batches(rank)
    for build, scenario in ((model, "engine"), (lambda: zero_init_model(out), "zeroinit")):
        for mode in ("exact", "sketch"):
            engine = engine_of(build())
            inner = engine.module
            held = partitioned_weights(inner)
            report = giva.initialize(engine, batches, num_batches=NUM_BATCHES, progress=False, mode=mode)
            record = {"bases": bases_of(inner), "mode": report.mode, "sums_bytes": report.sums_bytes,
                      "partitioned_weights": held, "layers": len(giva_layers(inner))}
            record["trained"] = train(engine, batches)
            torch.save(record, out / f"{scenario}_{mode}_rank{rank}.pt")
            dist.barrier()
    for mode in ("exact", "sketch"):
        m = model()
        giva.initialize(m, batches, num_batches=NUM_BATCHES, progress=False, mode=mode)
        torch.save({"trained": train(engine_of(m), batches)}, out / f"before_{mode}_rank{rank}.pt")
        dist.barrier()
    # Trained vectors live only in the ranks' partitions: initialize must still see them and refuse.
    engine = engine_of(model())
    for name, param in engine.module.named_parameters():
        if "giva_lambda_o" in name:
            param.ds_tensor.data.fill_(0.5)
    try:
        giva.initialize(engine, batches, num_batches=NUM_BATCHES, progress=False)
        refused = ""
    except Exception as exc:  # noqa: BLE001  every rank raises DistributedInitError naming the ValueError
        refused = f"{type(exc).__name__}: {exc}"
    torch.save({"refused": refused}, out / f"trained_rank{rank}.pt")
    dist.barrier()
    teardown.end()  # every output is written: leave without finalisation (see teardown.py)


if __name__ == "__main__":
    main()
