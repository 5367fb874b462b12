"""giva.initialize on 2 gloo ranks (torchrun): identical bases, equal to one process over the union of the
ranks' batches; DDP- and FSDP2-wrapped models; and every rank raising the same named error, promptly, when
one rank fails. One launch of tests/dist/init_ranks.py runs every scenario; this file checks what the
ranks wrote."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import giva
from giva.init.sketch import principal_cosines

DIST = Path(__file__).parent / "dist"
sys.path.insert(0, str(DIST))
from init_ranks import NUM_BATCHES, bases_of, model, rank_batches  # noqa: E402

TORCHRUN = Path(sys.executable).parent / "torchrun"
TIMEOUT_S = 240

pytestmark = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to the interpreter")


@pytest.fixture(scope="module")
def ranks_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("init_ranks")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(DIST / "init_ranks.py"), str(out)]
    # Own session: on a timeout the whole group (torchrun and both ranks) is killed, no orphans.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"init_ranks.py did not finish in {TIMEOUT_S}s:\n{output[-4000:]}")
    assert proc.returncode == 0, f"init_ranks.py failed (rc {proc.returncode}):\n{output[-6000:]}"
    return out


def _load(out: Path, scenario: str) -> list[dict]:
    return [torch.load(out / f"{scenario}_rank{r}.pt") for r in range(2)]


def _one_process(mode: str) -> dict[str, torch.Tensor]:
    """One process over the union of both ranks' batches."""
    m = model()
    giva.initialize(m, rank_batches(0) + rank_batches(1), num_batches=2 * NUM_BATCHES, progress=False, mode=mode)
    return bases_of(m)


@pytest.mark.parametrize("scenario", ["plain_exact", "plain_sketch", "ddp_sketch", "fsdp2_exact", "fsdp2_sketch"])
def test_ranks_get_bit_identical_bases_equal_to_one_process_over_all_batches(ranks_dir, scenario):
    rank0, rank1 = _load(ranks_dir, scenario)
    mode = scenario.split("_")[1]
    assert rank0["mode"] == rank1["mode"] == mode
    assert rank0["bases"].keys() == rank1["bases"].keys() and len(rank0["bases"]) == 16
    assert all(torch.equal(rank0["bases"][k], rank1["bases"][k]) for k in rank0["bases"])
    reference = _one_process(mode)
    for key, tensor in rank0["bases"].items():
        if mode == "exact":
            torch.testing.assert_close(tensor, reference[key], atol=2e-4, rtol=0)
        else:
            a, b = (tensor, reference[key]) if key.endswith(".A") else (tensor.mT, reference[key].mT)
            assert principal_cosines(a, b).min() > 0.999, key


def test_sketch_all_reduces_only_small_sums(ranks_dir):
    exact, sketch = _load(ranks_dir, "plain_exact")[0], _load(ranks_dir, "plain_sketch")[0]
    assert 0 < sketch["sums_bytes"] < exact["sums_bytes"]  # per pass, what each rank holds and all-reduces


CAUSES = {
    "nan_loss": (1, "calibration batch 1 gave a non-finite loss"),
    "too_few_batches": (1, "the dataloader gave 1 batches but num_batches=2"),
    "layer_without_gradient": (1, "model.layers.1.mlp.down_proj'.* received no gradient"),
    "all_zero_gradient": (0, "all-zero gradient"),
    "svd_failure": (1, "injected SVD failure"),
}


@pytest.mark.parametrize("case", sorted(CAUSES))
def test_a_failure_on_one_rank_raises_the_same_named_error_on_every_rank_promptly(ranks_dir, case):
    records = [json.loads((ranks_dir / f"failures_rank{r}.json").read_text())[case] for r in range(2)]
    failing_rank, cause = CAUSES[case]
    assert [r["raised"] for r in records] == ["DistributedInitError", "DistributedInitError"]
    assert records[0]["message"] == records[1]["message"]
    assert f"failed on rank {failing_rank} of 2" in records[0]["message"]
    assert re.search(cause, records[0]["message"]), records[0]["message"]
    assert max(r["seconds"] for r in records) < 30  # not a collective timeout
