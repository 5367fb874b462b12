"""giva.initialize on a DeepSpeed ZeRO-3 partitioned model (2 gloo ranks on CPU, tests/dist/init_deepspeed.py):
the weights stay partitioned (the hooks only need activations and dL/dy), and the ranks get bit-identical bases
equal to one process over the union of their batches."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model

import giva
from giva import GivaConfig
from giva.init.sketch import principal_cosines

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from init_ranks import NUM_BATCHES, TARGETS, bases_of, model, rank_batches  # noqa: E402
from launch import TORCHRUN, Ranks, run_torchrun  # noqa: E402

from tiny_models import tiny_llama  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to the interpreter"),
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed (extra 'distributed')"),
]
SCENARIOS = ["engine_exact", "engine_sketch", "zeroinit_exact", "zeroinit_sketch"]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> Ranks:
    return run_torchrun("init_deepspeed.py", tmp_path_factory.mktemp("init_deepspeed"))


def _one_process(ranks: Ranks, scenario: str) -> dict[str, torch.Tensor]:
    """The same model in one process, no DeepSpeed, over both ranks' batches."""
    if scenario.startswith("zeroinit"):
        base = tiny_llama(seed=0)
        base.load_state_dict(torch.load(ranks.out / "zeroinit_base.pt"))
        m = get_peft_model(base, GivaConfig(r=4, target_modules=TARGETS, variant="VrUr", seed=3))
    else:
        m = model()
    mode = scenario.split("_")[1]
    giva.initialize(m, rank_batches(0) + rank_batches(1), num_batches=2 * NUM_BATCHES, progress=False, mode=mode)
    return bases_of(m)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_zero3_ranks_get_bit_identical_bases_equal_to_one_process_over_all_batches(ranks, scenario):
    rank0, rank1 = ranks.tensors(f"{scenario}_rank{{rank}}.pt")
    assert rank0["mode"] == rank1["mode"] == scenario.split("_")[1]
    # Every GiVA layer's base weight was partitioned on both ranks while initialising.
    assert rank0["partitioned_weights"] == rank1["partitioned_weights"] == rank0["layers"] == 8
    assert rank0["bases"].keys() == rank1["bases"].keys() and len(rank0["bases"]) == 16
    assert all(torch.equal(rank0["bases"][k], rank1["bases"][k]) for k in rank0["bases"])
    reference = _one_process(ranks, scenario)
    for key, tensor in rank0["bases"].items():
        a, b = (tensor, reference[key]) if key.endswith(".A") else (tensor.mT, reference[key].mT)
        assert principal_cosines(a, b).min() > 0.999, key


@pytest.mark.parametrize("mode", ["exact", "sketch"])
def test_zero3_engine_trains_after_initialising_on_it_as_after_initialising_before_it(ranks, mode):
    """Calibrating on the engine (GivaInitCallback's order under the Trainer) must not leave its passes as ZeRO-3's
    parameter-fetch trace: the first training step failed ("tracing error at step 48 ... giva_lambda_o"). The steps
    give the losses of the documented order (initialize, then deepspeed.initialize), and a zero.Init model trains too."""
    for rank, (after, before, zeroinit) in enumerate(zip(
        *(ranks.tensors(f"{scenario}_{mode}_rank{{rank}}.pt") for scenario in ("engine", "before", "zeroinit"))
    )):
        assert "error" not in after["trained"], (rank, after["trained"])
        assert "error" not in zeroinit["trained"], (rank, zeroinit["trained"])
        assert len(after["trained"]["losses"]) == len(before["trained"]["losses"]) == 2  # init_deepspeed.TRAIN_STEPS
        torch.testing.assert_close(after["trained"]["losses"], before["trained"]["losses"], rtol=1e-4, atol=0)
        assert all(math.isfinite(loss) for loss in zeroinit["trained"]["losses"])


def test_zero3_partitioned_trained_vectors_are_seen_and_not_overwritten(ranks):
    for record in ranks.tensors("trained_rank{rank}.pt"):
        assert record["refused"].startswith("DistributedValueError: ")  # a DistributedInitError and a ValueError
        assert "already hold bases or trained vectors" in record["refused"]
