"""The exact path's accumulation: one fp32 ``out x in`` sum per target, added to in place, no per-batch temporary.

A per-batch ``out x in`` product next to the sums cost 1.1 GB of peak RSS on a 0.5B Llama (glibc kept
the freed products as heap free space; benchmarks/results/scale). These tests count the tensors the
accumulation allocates, through a dispatch mode that sees every ATen op; they time nothing.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import giva
from giva import GivaConfig
from giva.init import Request, RequestItem, accumulate, giva_layers
from giva.init.exact import accumulate_dense
from tiny_models import text_batches, tiny_bert, tiny_llama


class _NewTensors(TorchDispatchMode):
    """Records the shape and dtype of every op output whose storage is not one of the op's inputs' (a new allocation)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[tuple[int, ...], torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.shapes.append((tuple(t.shape), t.dtype))
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_later_batch_is_added_in_place_without_an_out_by_in_temporary(dtype):
    gen = torch.Generator().manual_seed(0)
    out_size, in_size, tokens = 48, 40, 6
    batches = [(torch.randn(tokens, in_size, generator=gen).to(dtype), torch.randn(tokens, out_size, generator=gen).to(dtype))
               for _ in range(3)]
    total = accumulate_dense(None, *batches[0])
    assert total.shape == (out_size, in_size) and total.dtype == torch.float32
    pointer = total.data_ptr()
    for x, g in batches[1:]:
        with _NewTensors() as seen:
            result = accumulate_dense(total, x, g)
        assert result is total and total.data_ptr() == pointer
        # only the T-row fp32 casts of bf16 inputs are new; nothing of the sum's size
        assert all(shape != (out_size, in_size) and (len(shape) < 2 or tokens in shape) for shape, _ in seen.shapes), seen.shapes
        if dtype == torch.float32:
            assert seen.shapes == []
    expected = sum(g.double().mT @ x.double() for x, g in batches)
    torch.testing.assert_close(total.double(), expected, atol=1e-4, rtol=1e-5)


def test_a_calibration_pass_allocates_each_dense_sum_once_whatever_the_number_of_batches():
    model = get_peft_model(tiny_llama(), GivaConfig(r=2, target_modules=["q_proj", "k_proj", "up_proj", "down_proj"], seed=0))
    layers = giva_layers(model)
    request = Request(0, 1, {name: RequestItem(name, 0, layer.out_features, "dense") for name, layer in layers.items()})
    # 4 x 10 = 40 tokens per batch: no activation of this model is 2-D with a weight's shape
    shapes = {(layer.out_features, layer.in_features) for layer in layers.values()}
    counts = []
    for k in (1, 3):
        with _NewTensors() as seen:
            partial = accumulate(model, text_batches(n=k, labels="lm"), request)
        assert partial.batches == k and set(partial.sums) == set(layers)
        counts.append(sum(1 for shape, dtype in seen.shapes if shape in shapes and dtype == torch.float32))
    # one allocation per sum (the first batch's product becomes it); later batches add to it in place
    assert counts == [len(layers), len(layers)]


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "zero"])
@pytest.mark.parametrize("position", [0, 37, -1])
def test_the_sums_check_finds_any_non_finite_entry_and_an_all_zero_sum_with_one_reduction(bad, position):
    from giva.init import GradientInitError, InitSession, Partial, Target

    target = Target("default", "layer", 0, 0, 48, 40, 4, "Vr", 0)
    session = InitSession([target], mode="exact")
    total = torch.zeros(48, 40)
    total.view(-1)[position] = -1e-30  # one tiny non-zero entry anywhere is enough
    with _NewTensors() as seen:
        session.check(Partial(0, {target.key: total}, batches=1))
    assert all(shape != (48, 40) for shape, _ in seen.shapes)  # no sums-sized temporary
    if bad == "zero":
        total.zero_()
        total.view(-1)[position] = -0.0
    else:
        total.normal_().view(-1)[position] = float(bad)
    with pytest.raises(GradientInitError, match="all-zero" if bad == "zero" else "non-finite"):
        session.check(Partial(0, {target.key: total}, batches=1))


@pytest.mark.parametrize("bases_dtype", ["float32", "bfloat16"])
def test_bases_info_reports_the_dtype_a_is_stored_in(bases_dtype):
    model = get_peft_model(tiny_bert(), GivaConfig(r=4, target_modules=["query"], bases_dtype=bases_dtype))
    giva.initialize(model, text_batches(n=1), num_batches=1, progress=False)
    a = next(layer.giva_A["default"] for layer in giva_layers(model).values())
    assert model.peft_config["default"].bases_info["dtype"] == bases_dtype == str(a.dtype).removeprefix("torch.")


@pytest.mark.parametrize("mode", ["exact", "sketch"])
def test_in_one_process_a_failing_loader_raises_its_own_exception_and_leaves_the_model_as_it_was(mode):
    model = get_peft_model(tiny_bert(), GivaConfig(r=4, target_modules=["query"]))
    model.train()
    batches = text_batches(n=2)

    def loader():
        yield batches[0]
        raise OSError("disk gone")

    with pytest.raises(OSError, match="^disk gone$"):
        giva.initialize(model, loader(), num_batches=2, progress=False, mode=mode)
    assert all(module.training for module in model.modules())
    assert not giva.init.bases_initialized(model)
