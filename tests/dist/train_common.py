"""Shared pieces of the tests/dist/train_*.py scripts (each is launched by torchrun with 2 ranks).

Every script builds the same tiny GiVA Llama (:func:`initialized_model` fills its bases from
every rank's batches), trains it with :func:`train` on data that differs per rank, then calls
:func:`finish`, which writes ``<out>/rank<r>.json`` (world size, per-rank losses, the GiVA
tensors that differ between ranks) and, on rank 0, the adapter and its logits on a probe batch.
tests/test_distributed_train.py reloads that adapter in one process and compares.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from peft import get_peft_model
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for tiny_models

import giva  # noqa: E402
from giva import GivaConfig  # noqa: E402
from giva.integrations.distributed import full_state_dict, replication_mismatches, unwrap_model  # noqa: E402
from tiny_models import text_batches, tiny_llama  # noqa: E402

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
STEPS = 4
CALIBRATION_BATCHES = 2
LR = 5e-2
PROBE_SEED = 999


def out_dir() -> Path:
    path = Path(sys.argv[1])
    path.mkdir(parents=True, exist_ok=True)
    return path


def giva_model() -> nn.Module:
    """The same tiny Llama on every rank (seeded), with GiVA r=4 on attention and MLP projections."""
    config = GivaConfig(r=4, target_modules=TARGETS, task_type="CAUSAL_LM", seed=0)
    return get_peft_model(tiny_llama(seed=0), config)


def rank_batches(rank: int, n: int = STEPS) -> list[dict]:
    """Different data on each rank, so that only gradient synchronisation keeps the replicas equal."""
    return text_batches(n=n, batch=4, length=12, labels="lm", seed=100 + rank)


def initialized_model(rank: int) -> tuple[nn.Module, list[dict], giva.InitReport]:
    """:func:`giva_model` with bases from every rank's first batches (all-reduced inside initialize),
    this rank's batches, and the init report. Call it on every rank before wrapping the model."""
    model = giva_model()
    batches = rank_batches(rank)
    report = giva.initialize(model, batches, num_batches=CALIBRATION_BATCHES, progress=False)
    return model, batches, report


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    """AdamW over the trainable (GiVA) parameters; build it after any wrapper that replaces them (FSDP2)."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)


def optimizer_step(optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    def step() -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def train(
    model: nn.Module, batches: list[dict], step: Callable[[], None],
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
) -> list[float]:
    """:data:`STEPS` steps, one of this rank's batches each; returns this rank's losses.

    ``backward`` and ``step`` are the engine's (``accelerator.backward``, ``engine.step``, ...).
    """
    model.train()
    losses = []
    for i in range(STEPS):
        loss = model(**batches[i]).loss
        backward(loss)
        step()
        losses.append(loss.item())
    return losses


def probe_batch() -> dict:
    return text_batches(n=1, batch=2, length=12, labels="lm", seed=PROBE_SEED)[0]


def finish(model: nn.Module, losses: list[float], extra: dict | None = None) -> None:
    """Check replication, save rank 0's adapter + probe logits, write this rank's JSON (all ranks call it)."""
    out = out_dir()
    rank, world = dist.get_rank(), dist.get_world_size()
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=probe_batch()["input_ids"]).logits  # a collective under FSDP2 / ZeRO-3
    mismatches = replication_mismatches(model)
    state = full_state_dict(model)  # a collective under FSDP2 and ZeRO-3
    inner = unwrap_model(model)
    if rank == 0:
        inner.save_pretrained(str(out / "adapter"), state_dict=state)
        torch.save(logits.detach().cpu(), out / "logits.pt")
    record = {
        "rank": rank,
        "world_size": world,
        "env_world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "losses": losses,
        "mismatches": mismatches,
        "giva_tensors": len(state),
        "lambda_o_abs_sum": float(sum(t.abs().sum() for k, t in state.items() if "giva_lambda_o" in k)),
        **(extra or {}),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(record, indent=1))
    dist.barrier()
