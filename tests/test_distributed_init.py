"""giva.initialize on 2 gloo ranks (torchrun): identical bases, equal to one process over the union of the
ranks' batches, and before that identical all-reduced sums, equal to one process's; DDP- and FSDP2-wrapped models; and every rank raising the same named error, promptly, when
one rank fails. One launch of tests/dist/init_ranks.py runs every scenario; this file checks what the
ranks wrote."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model

import giva
from giva import GivaConfig
from giva.init import accumulate
from giva.init.accumulate import GROWTH_INTERVAL
from giva.init.session import Request, RequestItem
from giva.init.sketch import principal_cosines
from tiny_models import tiny_llama

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from init_ranks import (  # noqa: E402
    FP16_WEIGHT,
    NUM_BATCHES,
    TARGETS,
    bases_of,
    head_batches,
    head_loss,
    model,
    rank_batches,
    two_heads,
)
from launch import TORCHRUN, Ranks, run_torchrun  # noqa: E402

pytestmark = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to the interpreter")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> Ranks:
    return run_torchrun("init_ranks.py", tmp_path_factory.mktemp("init_ranks"))


def _load(ranks: Ranks, scenario: str) -> list[dict]:
    return ranks.tensors(f"{scenario}_rank{{rank}}.pt")


def _one_process(mode: str, statistic: str = "mean") -> dict[str, torch.Tensor]:
    """One process over the union of both ranks' batches."""
    m = model("Vr" if statistic == "second-moment" else "VrUr")
    union = rank_batches(0) + rank_batches(1)
    giva.initialize(m, union, num_batches=2 * NUM_BATCHES, progress=False, mode=mode, statistic=statistic)
    return bases_of(m)


SCENARIOS = ["plain_exact", "plain_sketch", "all_exact", "ddp_sketch", "fsdp2_exact", "fsdp2_sketch",
             "moment_exact", "moment_sketch"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_ranks_get_bit_identical_bases_equal_to_one_process_over_all_batches(ranks, scenario):
    rank0, rank1 = _load(ranks, scenario)
    mode = scenario.split("_")[1]
    assert rank0["mode"] == rank1["mode"] == mode
    assert rank0["bases"].keys() == rank1["bases"].keys() and len(rank0["bases"]) == 16
    assert all(torch.equal(rank0["bases"][k], rank1["bases"][k]) for k in rank0["bases"])
    reference = _one_process(mode, "second-moment" if scenario.startswith("moment") else "mean")
    for key, tensor in rank0["bases"].items():
        if mode == "exact":
            torch.testing.assert_close(tensor, reference[key], atol=2e-4, rtol=0)
        else:
            a, b = (tensor, reference[key]) if key.endswith(".A") else (tensor.mT, reference[key].mT)
            assert principal_cosines(a, b).min() > 0.999, key


@pytest.mark.parametrize("scenario", ["fp16_exact", "fp16_sketch", "fp16fsdp2_exact"])
def test_an_fp16_overflow_on_one_rank_runs_the_batch_again_on_every_rank_in_step(ranks, scenario):
    """fp16 models; rank 1's loss is FP16_WEIGHT times larger, so only its gradients overflow at the first loss scale.
    Every rank runs that batch again (the same number of forwards: the ranks stay in step through the collectives,
    those of the FSDP2 forward too), each batch and token is counted once, and the bases are bit-identical on both
    ranks and those of one fp32 process over both ranks' batches with the same weights."""
    mode = scenario.split("_")[1]
    rank0, rank1 = _load(ranks, scenario)
    calls = ranks.json(f"{scenario}_calls_rank{{rank}}.json")
    passes = 1 if mode == "exact" else 3
    assert calls[0] == calls[1] > passes * NUM_BATCHES
    if mode == "sketch":  # the loss scale is kept from pass to pass: the later passes do not halve it down again
        retries = ranks.json("fp16_exact_calls_rank{rank}.json")[0] - NUM_BATCHES
        # Pass 0's clean re-run of batch 0 and batch 1, then pass 1's two batches: GROWTH_INTERVAL (4) without an
        # overflow on any rank double the scale on both ranks, at which rank 1's first batch of pass 2 overflows once
        # more; both ranks run it again (a scale that never grew back ran passes * NUM_BATCHES + retries).
        assert GROWTH_INTERVAL == 4 and NUM_BATCHES == 2
        assert calls[0] == passes * NUM_BATCHES + retries + 1
    assert all(torch.equal(rank0["bases"][k], rank1["bases"][k]) for k in rank0["bases"])
    assert [(p["batches"], p["tokens"]) for p in rank0["passes"]] == [(2 * NUM_BATCHES, 2 * NUM_BATCHES * 4 * 12)] * passes
    ones = rank_batches(1)

    def weighted(m, batch):
        loss = m(**batch).loss
        return loss * FP16_WEIGHT if any(torch.equal(batch["input_ids"], b["input_ids"]) for b in ones) else loss

    reference = get_peft_model(tiny_llama(seed=0).half().float(), GivaConfig(r=4, target_modules=TARGETS, variant="VrUr", seed=3))
    giva.initialize(reference, rank_batches(0) + ones, num_batches=2 * NUM_BATCHES, progress=False, mode=mode, loss_fn=weighted)
    for key, tensor in bases_of(reference).items():
        a, b = (tensor, rank0["bases"][key]) if key.endswith(".A") else (tensor.mT, rank0["bases"][key].mT)
        assert principal_cosines(a, b).min() > 0.99, key


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_rank_holds_the_same_all_reduced_sums_equal_to_one_process_over_all_batches(ranks, scenario):
    """Each pass's sums as the session receives them (after the all-reduce, before the QR/SVD and broadcast)."""
    rank0, rank1 = (record["passes"] for record in _load(ranks, scenario))
    assert len(rank0) == len(rank1) == (1 if scenario.endswith("exact") else 3)
    union = rank_batches(0) + rank_batches(1)
    for seen0, seen1 in zip(rank0, rank1):
        where = f"pass {seen0['pass_index']}"
        # Both ranks accumulated for the same request: the same targets and bit-identical test matrices.
        assert seen0["items"].keys() == seen1["items"].keys() and len(seen0["items"]) == 8, where
        for key, (*item0, matrix0) in seen0["items"].items():
            *item1, matrix1 = seen1["items"][key]
            assert item0 == item1 and (matrix0 is None) == (matrix1 is None), (where, key)
            assert matrix0 is None or torch.equal(matrix0, matrix1), (where, key)
        assert seen0["sums"].keys() == seen1["sums"].keys() == seen0["items"].keys(), where
        assert all(torch.equal(seen0["sums"][k], seen1["sums"][k]) for k in seen0["sums"]), where
        assert seen0["batches"] == seen1["batches"] == 2 * NUM_BATCHES, where
        request = Request(seen0["pass_index"], seen0["passes"], {k: RequestItem(*i) for k, i in seen0["items"].items()})
        reference = accumulate(model(), union, request, num_batches=len(union))  # the request names the kind of sum
        assert seen0["tokens"] == reference.tokens, where
        for key, total in reference.sums.items():
            error = (seen0["sums"][key] - total).norm() / total.norm()
            assert error < 1e-5, (where, key, float(error))


@pytest.mark.parametrize("mode", ["exact", "sketch"])
def test_a_head_only_some_ranks_batches_reach_gets_the_bases_of_one_process_over_all_batches(ranks, mode):
    """Rank 0's batches reach head_a only, rank 1's head_b only: each rank adds zeros for the head it never reached,
    so both get bit-identical bases, those of one process over both ranks' batches (not an error on every rank)."""
    rank0, rank1 = _load(ranks, f"heads_{mode}")
    assert "error" not in rank0 and "error" not in rank1, rank0.get("error")
    assert rank0["bases"].keys() == rank1["bases"].keys() and len(rank0["bases"]) == 6
    assert all(torch.equal(rank0["bases"][k], rank1["bases"][k]) for k in rank0["bases"])
    m = two_heads()
    union = head_batches(0) + head_batches(1)
    giva.initialize(m, union, num_batches=len(union), loss_fn=head_loss, progress=False, mode=mode)
    for key, expected in bases_of(m).items():
        torch.testing.assert_close(rank0["bases"][key], expected, atol=2e-4, rtol=0)


def test_sketch_all_reduces_only_small_sums(ranks):
    exact, sketch = _load(ranks, "plain_exact")[0], _load(ranks, "plain_sketch")[0]
    assert 0 < sketch["sums_bytes"] < exact["sums_bytes"]  # per pass, what each rank holds and all-reduces


CAUSES = {
    "dataloader_error": (1, "the dataloader raised OSError for calibration batch 1: injected loader failure"),
    "loss_fn_error": (1, "KeyError: 'injected loss_fn failure'"),
    "forward_error": (1, "IndexError: index out of range"),
    "nan_loss": (1, "calibration batch 1 gave a non-finite loss"),
    "too_few_batches": (1, "the dataloader gave 1 batches but num_batches=2"),
    "too_few_sized_batches": (1, r"ValueError: num_batches=2 calibration batches were asked for, but the dataloader has 1 "
                                 r"\(len\(dataloader\)\); pass num_batches=1 or fewer"),
    "layer_without_gradient": (0, r"model.layers.1.mlp.down_proj'.* received no gradient.*\(also failed: ranks \[1\]\)"),
    "all_zero_gradient": (0, "all-zero gradient"),
    "svd_failure": (1, "injected SVD failure"),
    "all_without_len": (1, r"num_batches='all' averages every batch of the dataloader, but list_iterator has no len\(\)"),
    "invalid_mode_on_one_rank": (1, r"ValueError: mode must be 'auto', 'sketch' or 'exact', got 'dense'"),
    "unknown_adapter_on_one_rank": (1, r"ValueError: no GiVA adapter named 'other'; the model has \['default'\]"),
    "invalid_num_batches_on_one_rank": (1, r"ValueError: num_batches must be a positive int .*got 0"),
}
# Causes that are a ValueError on the failing rank: every rank raises DistributedValueError, which is both a
# DistributedInitError and a ValueError (``except ValueError`` works as in one process).
VALUE_ERRORS = {"all_without_len", "too_few_sized_batches", "invalid_mode_on_one_rank", "unknown_adapter_on_one_rank", "invalid_num_batches_on_one_rank"}


def test_every_ranks_reason_reaches_every_rank_whatever_its_length(ranks):
    """Both ranks fail, with reasons of other byte lengths (a long non-ASCII one, an empty one): each rank raises the
    same error, naming rank 0's reason, and holds every failed rank's reason as it was."""
    records = [record["reasons_of_other_lengths"] for record in ranks.json("failures_rank{rank}.json")]
    reason = "KeyError: '" + "Grüße vom Rang 0, " * 20 + "'"
    assert [r["raised"] for r in records] == ["DistributedInitError", "DistributedInitError"], records
    assert [r["message"] for r in records] == [f"GiVA initialisation failed on rank 0 of 2: {reason} (also failed: ranks [1])"] * 2
    assert [r["reasons"] for r in records] == [{"0": reason, "1": ""}] * 2


def test_num_batches_all_is_every_batch_of_each_ranks_loader_bit_for_bit(ranks):
    """num_batches="all" on loaders of NUM_BATCHES batches gives the bases of num_batches=NUM_BATCHES, on every rank."""
    for all_batches, counted in zip(_load(ranks, "all_exact"), _load(ranks, "plain_exact")):
        assert all_batches["bases"].keys() == counted["bases"].keys()
        assert all(torch.equal(all_batches["bases"][k], counted["bases"][k]) for k in counted["bases"])


@pytest.mark.parametrize(("case", "requested"), [("all_unequal_lengths", ("'all'", "'all'")), ("unequal_num_batches", ("2", "1"))])
def test_ranks_that_would_run_unequal_batch_counts_raise_together_before_any_batch(ranks, case, requested):
    """Unequal loader lengths under num_batches='all', or unequal ints: every rank raises the same counts, promptly."""
    records = [record[case] for record in ranks.json("failures_rank{rank}.json")]
    assert [r["raised"] for r in records] == ["GradientInitError", "GradientInitError"]
    for record, asked in zip(records, requested):
        assert f"the ranks would run [2, 1] calibration batches (rank order, num_batches={asked} here)" in record["message"]
    assert max(r["seconds"] for r in records) < 30


def test_ranks_whose_models_adapt_other_blocks_raise_together_before_any_batch(ranks):
    records = [record["different_targets_on_one_rank"] for record in ranks.json("failures_rank{rank}.json")]
    assert [r["raised"] for r in records] == ["GradientInitError", "GradientInitError"]
    assert "rank(s) [1] would initialise other GiVA blocks, or with other settings, than rank 0 (8 blocks here" in records[0]["message"]
    assert "rank(s) [1] would initialise other GiVA blocks, or with other settings, than rank 0 (2 blocks here" in records[1]["message"]
    assert max(r["seconds"] for r in records) < 30


def test_ranks_asked_for_another_statistic_raise_together_before_any_batch(ranks):
    records = [record["different_statistic_on_one_rank"] for record in ranks.json("failures_rank{rank}.json")]
    assert [r["raised"] for r in records] == ["GradientInitError", "GradientInitError"]
    assert "rank(s) [1] would initialise other GiVA blocks, or with other settings" in records[0]["message"]
    assert "'exact', 3, None, 'mean')" in records[0]["message"] and "'second-moment')" in records[1]["message"]
    assert max(r["seconds"] for r in records) < 30


@pytest.mark.parametrize("case", sorted(CAUSES))
def test_a_failure_on_one_rank_raises_the_same_named_error_on_every_rank_promptly(ranks, case):
    records = [record[case] for record in ranks.json("failures_rank{rank}.json")]
    failing_rank, cause = CAUSES[case]
    kind = "DistributedValueError" if case in VALUE_ERRORS else "DistributedInitError"
    assert [r["raised"] for r in records] == [kind, kind]
    assert [r["value_error"] for r in records] == [case in VALUE_ERRORS] * 2
    assert records[0]["message"] == records[1]["message"]
    assert f"failed on rank {failing_rank} of 2" in records[0]["message"]
    assert re.search(cause, records[0]["message"]), records[0]["message"]
    assert max(r["seconds"] for r in records) < 30  # not a collective timeout


@pytest.mark.parametrize("case", ["forward", "loss_fn", "backward"])
def test_a_failure_inside_one_ranks_sharded_forward_or_backward_raises_on_every_rank_promptly(tmp_path, case):
    """FSDP2: rank 1 raises where rank 0 waits in a parameter all-gather (or is about to); both raise the
    same DistributedInitError within seconds, not a transport error at the group's timeout (60 s here)."""
    records = run_torchrun("init_fsdp_failure.py", tmp_path, args=[case]).json()
    assert [r["raised"] for r in records] == ["DistributedInitError", "DistributedInitError"], records
    assert records[0]["message"] == records[1]["message"]
    assert records[0]["message"] == f"GiVA initialisation failed on rank 1 of 2: ValueError: injected {case} failure"
    assert max(r["seconds"] for r in records) < 30


def test_fsdp1_with_original_parameters_is_sharded_so_a_failure_before_a_layers_all_gather_reaches_every_rank(tmp_path):
    """FSDP1 with use_orig_params=True (the Accelerate and Trainer default) shows plain Parameters: taken for an
    unsharded model, rank 1's failure before its second layer's all-gather left rank 0 waiting there until the group's
    timeout (60 s here), then gloo transport errors. Sharded, both raise the same DistributedInitError within seconds."""
    records = run_torchrun("init_fsdp_failure.py", tmp_path, args=["forward", "fsdp1"], timeout_s=150).json()
    assert [r["raised"] for r in records] == ["DistributedInitError", "DistributedInitError"], records
    assert records[0]["message"] == records[1]["message"] == "GiVA initialisation failed on rank 1 of 2: ValueError: injected forward failure"
    assert max(r["seconds"] for r in records) < 30


def test_a_nan_loss_on_one_rank_of_a_sharded_model_is_agreed_on_and_the_group_stays_usable(tmp_path):
    """A non-finite loss is checked after the forward, outside the sharded model's collectives: the ordinary
    agreement step, not the store and an abort."""
    records = run_torchrun("init_fsdp_failure.py", tmp_path, args=["nan_loss"]).json()
    assert [r["raised"] for r in records] == ["DistributedInitError", "DistributedInitError"], records
    assert records[0]["message"] == records[1]["message"]
    assert records[0]["message"].startswith("GiVA initialisation failed on rank 1 of 2: calibration batch 0 gave a non-finite loss")
    assert [r["group_sum"] for r in records] == [2.0, 2.0]
