"""GiVA trains under torchrun DDP, the HF Trainer, Accelerate, FSDP2 and DeepSpeed ZeRO-3 (2 gloo ranks on CPU).

Each test launches one tests/dist/train_*.py script with ``torchrun --nproc_per_node 2``; the
ranks see different data. Afterwards every rank must hold bit-identical GiVA tensors, the world
size must really have been 2, and rank 0's saved adapter, reloaded here in one process, must
reproduce rank 0's logits on a probe batch.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model

import giva
from tiny_models import text_batches, tiny_bert, tiny_llama

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from launch import TORCHRUN, run_torchrun  # noqa: E402
from replication import cases  # noqa: E402
from train_common import CALIBRATION_BATCHES, STEPS, adamw, giva_model, rank_batches  # noqa: E402

pytestmark = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to the interpreter")


def _check(records: list[dict], out: Path) -> PeftModel:
    assert [r["rank"] for r in records] == [0, 1]
    for record in records:
        assert record["world_size"] == 2 and record["env_world_size"] == 2
        assert record["mismatches"] == [], f"rank {record['rank']}: GiVA tensors differ across ranks: {record['mismatches']}"
        assert record["giva_tensors"] > 0
        assert record["lambda_o_abs_sum"] > 0  # the vectors moved away from their zero init: it trained
    # The ranks really saw different data, so equal vectors come from gradient synchronisation.
    assert records[0]["losses"][0] != records[1]["losses"][0]
    assert records[0]["lambda_o_abs_sum"] == records[1]["lambda_o_abs_sum"]

    reloaded = PeftModel.from_pretrained(tiny_llama(seed=0), str(out / "adapter")).eval()
    probe = text_batches(n=1, batch=2, length=12, labels="lm", seed=999)[0]
    with torch.no_grad():
        logits = reloaded(input_ids=probe["input_ids"]).logits
        base = tiny_llama(seed=0)(input_ids=probe["input_ids"]).logits
    expected = torch.load(out / "logits.pt")
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits, base, atol=1e-4)  # the adapter is not an identity
    return reloaded


def _one_process_reference() -> dict[str, torch.Tensor]:
    """GiVA vectors after the same training in one process, on the mean loss of both ranks' batches."""
    model = giva_model()
    ranks = [rank_batches(0), rank_batches(1)]
    calibration = [ranks[r][i] for i in range(CALIBRATION_BATCHES) for r in range(2)]
    giva.initialize(model, calibration, num_batches=len(calibration), progress=False)
    model.train()
    optimizer = adamw(model)
    for step in range(STEPS):
        loss = (model(**ranks[0][step]).loss + model(**ranks[1][step]).loss) / 2
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {n: p.detach() for n, p in model.named_parameters() if "giva_lambda" in n}


_DEEPSPEED = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed (extra 'distributed')")


@pytest.mark.parametrize(
    "script",
    ["train_ddp.py", "train_trainer.py", "train_accelerate.py", "train_fsdp2.py", pytest.param("train_deepspeed.py", marks=_DEEPSPEED)],
)
def test_two_rank_training_keeps_replicas_identical_and_reloads(script, tmp_path):
    out = tmp_path / script.removesuffix(".py")
    records = run_torchrun(script, out).json()
    reloaded = _check(records, out)
    if script == "train_deepspeed.py":  # full_state_dict gathered the partitioned vectors (it read them empty)
        assert [r["empty_before_training"] for r in records] == [[], []]
        assert [r["same_inside_a_gather"] for r in records] == [True, True]
    if script == "train_fsdp2.py":  # merge_adapter after a forward reached every rank's shards, and unmerge undid it
        for record in records:
            assert record["merged_weights_changed"] == record["base_weights"] > 0
            assert record["merged_logits_max_diff"] < 1e-4 and record["unmerged_logits_max_diff"] < 1e-4
            assert record["unmerged_weights_max_diff"] < 1e-6
    if script == "train_trainer.py":
        return  # the Trainer shuffles its rows: no hand-made reference batches to compare with
    # Data parallelism averaged the ranks' gradients (DDP, FSDP2's reduce-scatter, ZeRO-3's partitioned
    # reduction): the result is the one-process run on both ranks' data.
    trained = {n: p.detach() for n, p in reloaded.named_parameters() if "giva_lambda" in n}
    reference = _one_process_reference()
    assert trained.keys() == reference.keys() and len(trained) > 0
    for name, value in reference.items():
        torch.testing.assert_close(trained[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_the_trainer_callback_raises_on_every_rank_when_the_ranks_disagree_on_which_adapters_need_bases(tmp_path):
    """Rank 0's adapter has bases when training begins (a checkpoint only its node holds, loaded after the wrap as under
    FSDP or ZeRO-3), rank 1's has not: before, only rank 1 entered initialize's collectives, pairing them with rank 0's
    gradient all-reduces."""
    records = run_torchrun("init_disagree.py", tmp_path, timeout_s=180).json()
    for record in records:
        assert record["error"] is not None and "disagree on which adapters still need bases" in record["error"]
        assert "process 0: none" in record["error"] and "process 1: ['default']" in record["error"]


def _differing(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> list[str]:
    """The names two state dicts do not hold alike: on one side only, another shape or dtype, or other bytes."""
    def alike(a: torch.Tensor, b: torch.Tensor) -> bool:
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))

    return sorted(n for n in first.keys() | second.keys() if n not in first or n not in second or not alike(first[n], second[n]))


def test_replication_check_names_tensors_of_other_shapes_dtypes_values_or_names_without_crashing(tmp_path):
    """Ranks built with r=2 and r=4 hold the same names with other shapes: the per-tensor gathers had unequal sizes
    (gloo aborted the process, NCCL hangs). Every rank must get the same list of what differs, promptly."""
    from giva.integrations.distributed import full_state_dict

    records = run_torchrun("replication.py", tmp_path, timeout_s=120).json()
    expected = {case: _differing(full_state_dict(model), full_state_dict(cases(1)[case])) for case, model in cases(0).items()}
    assert expected["alike"] == [] and all(expected[case] for case in ("rank", "altered", "names"))
    assert len(expected["altered"]) == 2 and all(".q_proj." in name for name in expected["altered"])
    assert all(".v_proj." in name for name in expected["names"])
    for record in records:
        assert {case: result.get("mismatches", result.get("raised")) for case, result in record.items()} == expected
        assert max(result["seconds"] for result in record.values()) < 30


def test_launcher_mismatch_names_the_silent_one_process_cases(monkeypatch):
    from giva.integrations.distributed import launcher_mismatch

    monkeypatch.setenv("WORLD_SIZE", "2")
    message = launcher_mismatch(1, "the Trainer")
    assert message is not None and "WORLD_SIZE=2" in message and "use_cpu=True" in message
    assert launcher_mismatch(2, "the Trainer") is None
    monkeypatch.delenv("WORLD_SIZE")
    assert launcher_mismatch(1, "the Trainer") is None


def test_one_process_helpers_keep_giva_tensors_only_and_find_no_mismatch():
    from giva.integrations.distributed import full_state_dict, replication_mismatches, unwrap_model

    model = giva_model()
    state = full_state_dict(model)
    assert state and all("giva_" in name for name in state)
    assert replication_mismatches(model) == []
    assert unwrap_model(torch.compile(model)) is model  # compiling is lazy: nothing runs here


def test_full_state_dict_of_an_fsdp1_model_keeps_its_trained_head(tmp_path):
    """FSDP1 (``use_orig_params=True``, the Trainer's and Accelerate's default) puts ``_fsdp_wrapped_module.`` into
    module names but not into state-dict keys: the head's keys did not match, and the documented save raised
    ``KeyError: 'modules_to_save.default.weight'`` after training. A one-rank process group is enough to wrap."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel

    from giva.integrations.distributed import full_state_dict, unwrap_model

    torch.manual_seed(0)
    config = giva.GivaConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS", init_weights=False)
    model = get_peft_model(tiny_bert(), config)
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["default"].weight.normal_()
    plain = full_state_dict(model)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped = FullyShardedDataParallel(model, use_orig_params=True, device_id=torch.device("cpu"))
        state = full_state_dict(wrapped)
        assert state.keys() == plain.keys()
        unwrap_model(wrapped).save_pretrained(str(tmp_path / "adapter"), state_dict=state)
    finally:
        dist.destroy_process_group()
    reloaded = PeftModel.from_pretrained(tiny_bert(), str(tmp_path / "adapter")).eval()
    probe = text_batches(n=1)[0]["input_ids"]
    expected = get_peft_model(tiny_bert(), config)
    expected.load_state_dict(plain, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=probe).logits, expected.eval()(input_ids=probe).logits, rtol=0, atol=0)


@pytest.mark.parametrize("bias", ["none", "giva_only", "all"])
def test_the_documented_save_of_full_state_dict_keeps_a_trained_head_and_biases(tmp_path, bias):
    """``save_pretrained(path, state_dict=full_state_dict(model))`` of a SEQ_CLS model reloads bit-identically."""
    from giva.integrations.distributed import full_state_dict

    torch.manual_seed(0)
    config = giva.GivaConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS", init_weights=False, bias=bias)
    model = get_peft_model(tiny_bert(), config)
    with torch.no_grad():  # "trained": the head and the trainable biases move away from the base model's
        model.base_model.model.classifier.modules_to_save["default"].weight.normal_()
        for name, param in model.named_parameters():
            if name.endswith(".bias") and param.requires_grad:
                param.normal_()
    model.save_pretrained(str(tmp_path / "adapter"), state_dict=full_state_dict(model))
    reloaded = PeftModel.from_pretrained(tiny_bert(), str(tmp_path / "adapter")).eval()
    probe = text_batches(n=1)[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=probe).logits, model.eval()(input_ids=probe).logits, rtol=0, atol=0)
