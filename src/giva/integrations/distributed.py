"""GiVA under the distributed engines people run: torchrun DDP, Trainer, Accelerate, FSDP2.

Three small tools, each safe to call in a one-process run too:

* :func:`unwrap_model` strips DDP / Accelerate / ``torch.compile`` wrappers so GiVA code sees the
  ``PeftModel`` (``peft_config``, ``disable_adapter``, ``save_pretrained``).
* :func:`full_state_dict` gathers FSDP2's sharded DTensors of the adapters (GiVA's tensors, a
  trained head, trained biases) into plain tensors (a collective: every rank calls it), so rank 0
  can save an adapter that reloads in one process.
* :func:`launcher_mismatch` says when the training loop sees fewer processes than torchrun
  started (the Trainer on CPU without ``use_cpu=True``): each process would train on its own.
* :func:`replication_mismatches` compares every GiVA tensor across ranks (names, shapes and dtypes,
  then the bytes of those alike) and lists those that are not bit-identical (a collective): the
  check that data-parallel training kept the replicas in step.

gloo scrambles non-contiguous tensors in collectives, so everything sent here is made
contiguous first.
"""

from __future__ import annotations

import logging
import os
import zlib
from typing import Optional

import torch
import torch.distributed as dist
from peft.utils import AuxiliaryTrainingWrapper
from torch import nn

from ..init.distributed import collective_device, gather_bytes
from ..peft_compat import state_dict_name, unwrap_model  # noqa: F401 - unwrap_model: this module's name for it

logger = logging.getLogger(__name__)

GIVA_PREFIX = "giva_"


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def every_rank(value: object) -> list:
    """``value`` as each rank of the process group has it, rank 0 first (a collective: every rank calls it);
    ``[value]`` outside a process group of more than one rank. For small picklable values (names, steps)."""
    if not is_distributed():
        return [value]
    values: list = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor holding the whole value (FSDP2 DTensors are gathered: a collective)."""
    full_tensor = getattr(tensor, "full_tensor", None)
    if full_tensor is not None:
        tensor = full_tensor()
    return tensor.detach()


def full_state_dict(model: nn.Module, prefix: Optional[str] = GIVA_PREFIX) -> dict[str, torch.Tensor]:
    """The state dict with every DTensor gathered, and every DeepSpeed ZeRO-3 partitioned parameter (every rank must
    call this; all get the same dict).

    ``prefix`` keeps the keys with that name part, and the other tensors PEFT's save of the adapters
    reads (see :func:`_trained_besides`): by default GiVA's tensors and those, enough for
    ``PeftModel.save_pretrained(path, state_dict=...)``. ``None`` keeps everything. The keys are
    those of ``unwrap_model(model).state_dict()``.
    """
    inner = unwrap_model(model)
    state = inner.state_dict()
    besides = _trained_besides(inner, state) if prefix is not None else set()
    kept = [name for name in state if prefix is None or prefix in name or name in besides]
    partitioned = _zero3_partitioned(inner, set(kept))
    if not partitioned:
        return {name: _local(state[name]).cpu() for name in kept}
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):  # a collective, like FSDP2's gather
        state = inner.state_dict()  # the whole values, copied: leaving the block partitions them again
        return {name: _local(state[name]).cpu().clone() for name in kept}


def _zero3_partitioned(model: nn.Module, names: set[str]) -> list[nn.Parameter]:
    """The parameters among ``names`` that DeepSpeed ZeRO-3 holds partitioned right now (outside a gather each rank
    has only its slice, and ``state_dict()`` gives empty tensors for them); none without ZeRO-3 or inside a
    ``GatheredParameters`` block of the caller's, which this must not end early."""
    found = [p for name, p in model.named_parameters() if name in names and hasattr(p, "ds_tensor")]
    if not found:
        return []
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    # half fetched (inside a forward, or a hook) on any rank: every rank raises, none is left waiting in the gather
    if any(every_rank(any(p.ds_status == ZeroParamStatus.INFLIGHT for p in found))):
        raise RuntimeError("full_state_dict: DeepSpeed ZeRO-3 is still fetching some of the adapter's parameters "
                           "(called from inside a forward or a hook?); call it between training steps")
    return [p for p in found if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]


def _trained_besides(model: nn.Module, state: dict[str, torch.Tensor]) -> set[str]:
    """Keys of ``state`` that PEFT's save of the model's adapters reads besides their layers' tensors.

    Each adapter's trained copy of a ``modules_to_save`` module (the classifier head of a SEQ_CLS model) or its
    trainable tokens, as the wrapper maps them for loading, and every bias when a config trains biases
    (``bias`` other than ``"none"``). Without them the save raises ``KeyError`` (a head) or writes an adapter
    that reloads with other outputs (biases).
    """
    configs = getattr(model, "peft_config", None) or {}
    keys = {
        f"{state_dict_name(module_name)}.{key}"
        for module_name, module in model.named_modules()
        if isinstance(module, AuxiliaryTrainingWrapper)
        for adapter_name in configs
        for key in module.adapter_state_dict_load_map(adapter_name).values()
    }
    if any(getattr(config, "bias", "none") != "none" for config in configs.values()):
        keys.update(name for name in state if name.endswith(".bias"))
    return keys


def replication_mismatches(model: nn.Module, prefix: str = GIVA_PREFIX) -> list[str]:
    """Names of the adapter tensors (GiVA's vectors and bases, a trained head or biases: those of
    :func:`full_state_dict`) that differ between ranks, sorted; [] if all match.

    A collective: every rank must call it, and every rank gets the same list. In a one-process run it returns [].
    A tensor that some rank lacks, or holds with another shape or dtype (a rank built with another ``r``), is
    named without sending its values; the others are compared bitwise.
    """
    state = full_state_dict(model, prefix)
    if not is_distributed():
        return []
    # NCCL cannot gather CPU tensors: compare on the model's device (a clear error for a CPU model under NCCL).
    params = [p for p in unwrap_model(model).parameters()]
    device = collective_device(dist.get_backend(), params[0].device if params else torch.device("cpu"))
    world = dist.get_world_size()
    # Names, shapes and dtypes first: the per-tensor gathers below need the same size on every rank (gloo aborts
    # the process, NCCL hangs, on unequal sizes). A checksum, then the text itself only when the checksums differ.
    layout = "\n".join(f"{name}\t{tuple(state[name].shape)} {state[name].dtype}" for name in sorted(state)).encode()
    digest = torch.tensor([zlib.crc32(layout), len(layout)], dtype=torch.int64, device=device)
    digests = [torch.empty_like(digest) for _ in range(world)]
    dist.all_gather(digests, digest)
    differing: set[str] = set()
    if any(not torch.equal(other, digest) for other in digests):
        texts = gather_bytes(layout, [int(other[1]) for other in digests], device)
        layouts = [dict(line.split("\t") for line in text.decode().splitlines()) for text in texts]
        differing = {name for name in set().union(*layouts) if len({held.get(name) for held in layouts}) > 1}
    mismatches = set(differing)
    for name in sorted(set(state) - differing):  # held alike by every rank: the same names, in the same order
        # Compare the raw bytes: NaN != NaN and -0.0 == 0.0 would fool a float comparison.
        local = state[name].to(device).contiguous().view(-1).view(torch.uint8)
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local)
        if any(not torch.equal(other, local) for other in gathered):
            mismatches.add(name)
    return sorted(mismatches)


def launcher_mismatch(world_size_seen: int, who: str) -> Optional[str]:
    """A message if ``who`` sees fewer processes than the launcher started (``WORLD_SIZE``), else None.

    Under ``torchrun`` on a machine without GPUs, ``TrainingArguments()`` without ``use_cpu=True``
    reports world size 1: every process then trains its own full replica on all the data, and
    nothing fails. ``accelerate launch --cpu --num_processes 2`` starts one process only.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size_seen == launched:
        return None
    return (
        f"{who} sees {world_size_seen} process(es) but the launcher started WORLD_SIZE={launched}: each process "
        "would train on its own. On CPU pass TrainingArguments(use_cpu=True) (the Trainer then uses gloo); "
        "launch Accelerate CPU scripts with torchrun."
    )
