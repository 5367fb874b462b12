"""Where the distributed collectives run, and whose RNG a seeded step touches, checked without GPUs.

This machine has no GPU, so the NCCL cases run against a mocked ``torch.distributed`` (backend name,
rank, world and the collectives are replaced; nothing is sent). The real gloo paths run in
tests/test_distributed_init.py and tests/test_distributed_train.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from peft import get_peft_model

import giva
from giva import GivaConfig
from giva.bases import top_singular_vectors
from giva.init.distributed import TorchCollective, collective_device
from giva.integrations import distributed as integration
from tiny_models import tiny_llama


@pytest.fixture
def nccl(monkeypatch):
    """A 2-rank NCCL group as torch.distributed reports it; every collective recorded, none run."""
    calls: list[tuple[str, list[torch.device]]] = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 2)
    monkeypatch.setattr(dist, "get_rank", lambda *a, **k: 1)
    monkeypatch.setattr(dist, "get_backend", lambda *a, **k: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # a launcher that never called set_device

    def gather(outputs, tensor, *a, **k):
        calls.append(("all_gather", [tensor.device]))
        for out in outputs:
            out.copy_(tensor)

    def gather_object(outputs, obj, *a, **k):
        calls.append(("all_gather_object", [torch.device("cuda", torch.cuda.current_device())]))
        outputs[:] = [obj] * len(outputs)

    monkeypatch.setattr(dist, "all_gather", gather)
    monkeypatch.setattr(dist, "all_gather_object", gather_object)
    return calls


def test_nccl_collectives_run_on_the_models_gpu_not_the_current_device(nccl):
    comm = TorchCollective(torch.device("cuda", 1))
    assert comm.device == torch.device("cuda", 1)  # was cuda:0 on every rank (torch.cuda.current_device())


def test_nccl_with_a_cpu_model_is_a_clear_error_before_any_collective(nccl):
    with pytest.raises(ValueError, match=r"^the process group uses NCCL, which needs CUDA tensors, but the model's "
                                         r"parameters are on cpu: move the model"):
        TorchCollective(torch.device("cpu"))
    model = get_peft_model(tiny_llama(), GivaConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="the process group uses NCCL"):
        integration.replication_mismatches(model)
    assert nccl == []  # nothing was sent: CPU tensors never reach an NCCL all-gather


def test_nccl_with_a_cpu_model_on_a_rank_with_a_gpu_is_agreed_on_so_every_rank_raises(nccl, monkeypatch):
    """Rank 1's model was left on the CPU while rank 0's is on its GPU: raising alone would leave rank 0 waiting in
    the first collective. With a GPU visible, the agreement runs there and carries the error to every rank."""
    from giva.init.distributed import DistributedValueError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    comm = TorchCollective(torch.device("cpu"))
    assert comm.device == torch.device("cuda", 0) and "the process group uses NCCL" in str(comm.setup_error)

    # The real agreement, its tensors on the CPU (no GPU here), in a group where the other rank has no error.
    build = TorchCollective.__init__

    def on_cpu(self, *args, **kwargs):
        build(self, *args, **kwargs)
        self.device = torch.device("cpu")

    reduced: list[list[int]] = []
    monkeypatch.setattr(TorchCollective, "__init__", on_cpu)
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, *a, **k: reduced.append(tensor.tolist()))
    model = get_peft_model(tiny_llama(), GivaConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(DistributedValueError, match=r"failed on rank 1 of 2: ValueError: the process group uses NCCL"):
        giva.initialize(model, [], progress=False)
    # The first collective, the agreement (each rank's reason length), carried it; nothing ran before it.
    assert len(reduced) == 1 and reduced[0][0] == 0 and reduced[0][1] > 0


def test_agreeing_on_a_failure_sends_the_reason_as_bytes_on_the_collective_device(nccl, monkeypatch):
    """A rank's failure reaches the others through an all-reduce of lengths and an all-gather of bytes on the
    collective's device, never through ``all_gather_object`` (pickles, and under NCCL gathers on
    ``torch.cuda.current_device()``: GPU 0 of every rank when the launcher never called set_device)."""
    from giva.init import distributed as init_distributed
    from giva.init.distributed import DistributedValueError

    # The CPU stands in for this rank's GPU (none here); the other rank (0) had no error.
    monkeypatch.setattr(init_distributed, "collective_device", lambda backend, device: torch.device("cpu"))
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, *a, **k: nccl.append(("all_reduce", [tensor.device])))
    comm = TorchCollective(torch.device("cuda", 1))
    with pytest.raises(DistributedValueError, match=r"^GiVA initialisation failed on rank 1 of 2: ValueError: größer$") as info:
        comm.agree(ValueError("größer"))
    assert info.value.reasons == {1: "ValueError: größer"}
    assert nccl == [("all_reduce", [torch.device("cpu")]), ("all_gather", [torch.device("cpu")])]


def test_replication_check_gathers_on_the_device_collectives_run_on(nccl, monkeypatch):
    """What ``replication_mismatches`` sends goes where :func:`collective_device` says (the model's GPU under
    NCCL); with a mocked device choice the CPU-only machine can see it: no CPU tensor, no all_gather_object."""
    model = get_peft_model(tiny_llama(), GivaConfig(r=2, target_modules=["q_proj"]))
    monkeypatch.setattr(integration, "collective_device", lambda backend, device: torch.device("meta"))
    monkeypatch.setattr(torch, "equal", lambda a, b: True)  # meta tensors hold no values to compare
    assert integration.replication_mismatches(model) == []
    assert nccl and all(kind == "all_gather" and devices == [torch.device("meta")] for kind, devices in nccl)


def test_collective_device_keeps_the_models_device_for_gloo():
    assert collective_device("gloo", torch.device("cpu")) == torch.device("cpu")
    assert collective_device("nccl", torch.device("cuda", 3)) == torch.device("cuda", 3)


def test_the_seeded_randomized_svd_reseeds_no_gpu_and_restores_the_cpu_stream(monkeypatch):
    """``torch.manual_seed`` reseeds every GPU; fork_rng restored only the matrix's device, so in a device_map
    run the other GPUs' streams were left reset. Only the CPU (and the matrix's GPU) may be seeded."""
    reseeded: list[int] = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    matrix = torch.randn(40, 30, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(123)
    reseeded.clear()
    state = torch.get_rng_state()
    first = top_singular_vectors(matrix, 3, method="randomized", seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    second = top_singular_vectors(matrix, 3, method="randomized", seed=7)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert reseeded == []


def test_a_reason_that_is_not_valid_unicode_still_reaches_the_collective(nccl, monkeypatch):
    """A reason with a lone surrogate (a non-UTF-8 file name as Python decodes it) must not raise while encoding on the
    failing rank only: the other ranks would wait in the all-reduce it never entered."""
    from giva.init import distributed as init_distributed
    from giva.init.distributed import DistributedValueError

    monkeypatch.setattr(init_distributed, "collective_device", lambda backend, device: torch.device("cpu"))
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, *a, **k: nccl.append(("all_reduce", [tensor.device])))
    comm = TorchCollective(torch.device("cuda", 1))
    with pytest.raises(DistributedValueError, match=r"cannot read /data/caf\\udce9\.jsonl"):
        comm.agree(ValueError("cannot read /data/caf\udce9.jsonl"))
    assert [kind for kind, _ in nccl] == ["all_reduce", "all_gather"]


def test_the_zero3_trace_reset_degrades_to_a_warning_without_deepspeeds_private_method(caplog):
    """The reset uses DeepSpeed's private _invalidate_trace; a DeepSpeed without it must not turn a calibration that
    succeeded into an AttributeError: a warning says what to do instead."""
    from torch import nn

    from giva.init.distributed import zero3_trace_reset

    class Coordinator:  # a later DeepSpeed's coordinator, its private method renamed
        def is_invalid_trace(self) -> bool:
            return False

    class Offload:
        def get_param_coordinator(self) -> Coordinator:
            return Coordinator()

    class DeepSpeedEngine(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = nn.Linear(2, 2)
            self.module.weight.ds_tensor = torch.zeros(1)  # a ZeRO-3 partitioned parameter
            self.optimizer = type("Optimizer", (), {"parameter_offload": Offload()})()

    calibrated = False
    with caplog.at_level("WARNING", logger="giva.init.distributed"), zero3_trace_reset(DeepSpeedEngine()):
        calibrated = True
    assert calibrated
    assert "could not reset DeepSpeed ZeRO-3's parameter-fetch trace" in caplog.text
