"""The folded adapter forward (issue 23 item 1) and PEFT's input-dtype switch (issue 24 item 5).

The layer computes ``h = A dropout(x)`` in the compute dtype, ``lambda_s`` on the thin ``h`` and ``lambda_o``
folded into ``B' = lambda_o * B``; :func:`reference_forward` keeps the formula it replaced (x cast to the
vectors' dtype, ``lambda_o`` applied to the ``tokens x out`` product) so every test compares the two.
"""

from __future__ import annotations

import contextlib
import copy
import json
from contextlib import contextmanager
from typing import Iterator

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from peft.helpers import disable_input_dtype_casting
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.pytorch_utils import Conv1D

import giva
from giva import GivaConfig, GivaLayer
from tiny_models import text_batches, tiny_llama

IN, OUT, R = 24, 30, 4
# Relative (in norm) to float64 maths, for outputs and vector gradients: about 8 units of the dtype's last place.
# The folded maths in bf16 measured up to 1.3e-2 on the gradients here (the fp32-maths formula: 6e-3).
HALF_TOLERANCE = {torch.bfloat16: 2**-5, torch.float16: 2**-7}
TOKENS = (3, 7)  # batch x sequence


# ---------------------------------------------------------------------------------------------------------------------
# Helpers: one-layer models, the reference formula, an op recorder


class OneLayer(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.proj = Conv1D(OUT, IN) if kind == "conv1d" else nn.Linear(IN, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


# kind -> (base layer, block_sizes, adapt_blocks): "fused" adapts blocks 0 and 2 of three (index_add)
LAYOUTS = {
    "linear": ("linear", {}, {}),
    "conv1d": ("conv1d", {}, {}),
    "fused": ("conv1d", {"proj": [10, 12, 8]}, {"proj": [0, 2]}),
    "fused-linear": ("linear", {"proj": [10, 12, 8]}, {"proj": [1]}),
}


def _config(layout: str, variant: str = "Vr", **kwargs) -> GivaConfig:
    _, block_sizes, adapt_blocks = LAYOUTS[layout]
    return GivaConfig(
        r=R, target_modules=["proj"], variant=variant, block_sizes=block_sizes, adapt_blocks=adapt_blocks,
        init_weights=False, **kwargs,
    )


def _model(layout: str, dtype: torch.dtype = torch.float32, variant: str = "Vr", **kwargs) -> tuple[nn.Module, GivaLayer]:
    torch.manual_seed(0)
    base = OneLayer(LAYOUTS[layout][0]).to(dtype)
    model = get_peft_model(base, _config(layout, variant, **kwargs))
    return model, model.base_model.model.proj


def reference_delta(layer: GivaLayer, x: torch.Tensor, name: str) -> torch.Tensor:
    """The forward this change replaced: x cast to the vectors' dtype, lambda_o on the tokens x O product."""
    lambda_s, lambda_o = layer.giva_lambda_s[name], layer.giva_lambda_o[name]
    x = x.to(lambda_s.dtype)
    a, b = layer.giva_A[name].to(x.dtype), layer.giva_B[name].to(x.dtype)
    return lambda_o * F.linear(lambda_s * F.linear(layer.giva_dropout[name](x), a), b)


def reference_forward(layer: GivaLayer, x: torch.Tensor) -> torch.Tensor:
    result = layer.base_layer(x)
    if layer.merged:
        return result
    for name in layer.active_adapters:
        delta = reference_delta(layer, x, name).to(result.dtype)
        if name in layer.giva_out_index:
            result = result.index_add(-1, layer.giva_out_index[name], delta)
        else:
            result = result + delta
    return result


def _vectors(layer: GivaLayer) -> list[torch.Tensor]:
    return [p for name in layer.active_adapters for p in (layer.giva_lambda_s[name], layer.giva_lambda_o[name])]


def _output_and_grads(forward, layer: GivaLayer, x: torch.Tensor, seed: int = 0):
    torch.manual_seed(seed)  # the same dropout masks in both forwards
    out = forward(x)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, out.dtype)
    grads = torch.autograd.grad((out * weight).float().sum(), _vectors(layer))
    return out.detach(), grads


def _relative(new: torch.Tensor, ref: torch.Tensor) -> float:
    return ((new.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


VIEWS = {"view", "_unsafe_view", "t", "transpose", "expand", "unsqueeze", "squeeze", "reshape", "alias", "detach",
         "as_strided", "permute", "slice", "select", "unbind"}  # no data of their own


class OpRecorder(TorchDispatchMode):
    """Every aten op run under it that computes data (views left out), with its first output's shape and dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, tuple[int, ...], torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        first = out[0] if isinstance(out, (tuple, list)) and out else out
        if isinstance(first, torch.Tensor) and func.overloadpacket.__name__ not in VIEWS:
            self.ops.append((str(func.overloadpacket.__name__), tuple(first.shape), first.dtype))
        return out


@contextmanager
def recording() -> Iterator[OpRecorder]:
    recorder = OpRecorder()
    with recorder:
        yield recorder


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# ---------------------------------------------------------------------------------------------------------------------
# 1. Equal to the replaced formula: outputs and vector gradients, every layout, variant, dropout, dtype


def _float64_truth(layer: GivaLayer, x: torch.Tensor, seed: int = 0):
    """The layer's output and vector gradients in float64, on the same inputs and dropout masks (drawn in x's dtype)."""
    torch.manual_seed(seed)
    base = copy.deepcopy(layer.base_layer).double()
    result = base(x.double())
    vectors = []
    for name in layer.active_adapters:
        lambda_s = layer.giva_lambda_s[name].detach().double().requires_grad_()
        lambda_o = layer.giva_lambda_o[name].detach().double().requires_grad_()
        vectors += [lambda_s, lambda_o]
        xd = layer.giva_dropout[name](x).double()
        a, b = layer.giva_A[name].double(), layer.giva_B[name].double()
        delta = lambda_o * F.linear(lambda_s * F.linear(xd, a), b)
        if name in layer.giva_out_index:
            result = result.index_add(-1, layer.giva_out_index[name], delta)
        else:
            result = result + delta
    weight = torch.randn(result.shape, generator=torch.Generator().manual_seed(1)).to(x.device, x.dtype).double()
    return result.detach(), torch.autograd.grad((result * weight).sum(), vectors)


ROUNDING_ORDER = 3.0  # how much more one summation order may round than another, in fp32 (see below)


def _check_against_reference_and_truth(layer: GivaLayer, x: torch.Tensor, tolerance: float) -> None:
    """Outputs and vector gradients within ``tolerance`` (relative, in norm) of the replaced formula; where the two
    disagree by more, the folded forward must be the closer one to float64 maths (the replaced formula's own
    rounding is then the difference), and within ``tolerance`` of it, or of the replaced formula's own error
    against float64 times ROUNDING_ORDER: the two sum the same terms in different orders, and which order rounds
    less depends on the CPU's BLAS kernels (on an AVX512 CPU lambda_s's gradient on Conv1D, a sum of 630 terms
    with one entry conditioned at 180, came 1.42e-6 from float64, the replaced formula 5.78e-7)."""
    out, grads = _output_and_grads(layer, layer, x)
    ref_out, ref_grads = _output_and_grads(lambda t: reference_forward(layer, t), layer, x)
    true_out, true_grads = _float64_truth(layer, x)
    assert out.dtype == x.dtype
    for what, new, ref, truth in [("output", out, ref_out, true_out)] + [
        (f"gradient {i}", g, r, t) for i, (g, r, t) in enumerate(zip(grads, ref_grads, true_grads))
    ]:
        assert new.dtype == ref.dtype, what
        error, ref_error = _relative(new, truth), _relative(ref, truth)
        assert error < tolerance or error <= ROUNDING_ORDER * ref_error, (what, error, ref_error)
        assert _relative(new, ref) < tolerance or error <= ROUNDING_ORDER * ref_error, (
            what, _relative(new, ref), error, ref_error
        )


@pytest.mark.parametrize("variant", giva.VARIANTS)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fp32_outputs_and_vector_gradients_match_the_replaced_formula(layout, variant, dropout):
    model, layer = _model(layout, variant=variant, giva_dropout=dropout)
    model.train()
    _check_against_reference_and_truth(layer, torch.randn(*TOKENS, IN), 1e-6)


@pytest.mark.parametrize("variant", giva.VARIANTS)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize(("dtype", "dropout"), [(torch.bfloat16, 0.0), (torch.bfloat16, 0.3), (torch.float16, 0.0)])
def test_half_precision_outputs_and_gradients_within_its_tolerance(layout, variant, dtype, dropout):
    """The folded maths run in the input's dtype; the vectors (and their gradients) stay fp32."""
    model, layer = _model(layout, dtype, variant=variant, giva_dropout=dropout)
    model.train()
    assert layer.giva_lambda_s["default"].dtype == torch.float32  # PEFT's default autocast_adapter_dtype
    _check_against_reference_and_truth(layer, torch.randn(*TOKENS, IN).to(dtype), HALF_TOLERANCE[dtype])


cuda = pytest.mark.cuda  # skipped without a CUDA device (conftest.py); the device script runs -m cuda
DEVICES = ["cpu", pytest.param("cuda", marks=cuda)]


@cuda
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize(("dtype", "dropout"), [(torch.float32, 0.0), (torch.bfloat16, 0.0), (torch.bfloat16, 0.3), (torch.float16, 0.0)])
def test_on_cuda_outputs_and_gradients_within_the_dtypes_tolerance(layout, dtype, dropout):
    """The same checks on a GPU (cuBLAS, CUDA dropout masks): 1e-6 in fp32 (TF32 off, PyTorch's default)."""
    model, layer = _model(layout, dtype, giva_dropout=dropout)
    model.to("cuda").train()
    x = torch.randn(*TOKENS, IN).to("cuda", dtype)
    _check_against_reference_and_truth(layer, x, HALF_TOLERANCE.get(dtype, 1e-6))


@pytest.mark.parametrize("layout", ["linear", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_several_active_adapters_sum_their_outputs(layout, dtype):
    model, layer = _model(layout, dtype)
    model.add_adapter("second", _config(layout, "VrUr", giva_dropout=0.2))
    model.base_model.set_adapter(["default", "second"])
    model.train()
    assert layer.active_adapters == ["default", "second"] and len(_vectors(layer)) == 4
    _check_against_reference_and_truth(layer, torch.randn(*TOKENS, IN).to(dtype), HALF_TOLERANCE.get(dtype, 1e-6))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_merged_adapter_equals_the_unmerged_forward(layout):
    model, layer = _model(layout)
    model.eval()
    x = torch.randn(*TOKENS, IN)
    with torch.no_grad():
        unmerged = layer(x)
        assert _relative(unmerged, reference_forward(layer, x)) < 1e-6
        layer.merge()
        assert _relative(layer(x), unmerged) < 1e-5
        layer.unmerge()
        assert _relative(layer(x), unmerged) < 1e-6


# ---------------------------------------------------------------------------------------------------------------------
# 2. What the forward forms: no tokens x out op but the matmul and the add, no cast of x, A cast once


def _adapter_ops(layer: GivaLayer, x: torch.Tensor) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """The ops of the layer's forward that the base layer's forward does not run."""
    with torch.no_grad(), recording() as base:
        layer.base_layer(x)
    with torch.no_grad(), recording() as full:
        layer(x)
    ops = list(full.ops)
    for op in base.ops:
        ops.remove(op)
    return ops


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["linear", "conv1d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_forms_nothing_of_size_tokens_x_out_but_the_fused_product_and_add(layout, dtype, device):
    model, layer = _model(layout, dtype)
    model.to(device).eval()
    x = torch.randn(*TOKENS, IN).to(device, dtype)
    layer(x)  # any one-time cast of A happens here
    ops = _adapter_ops(layer, x)
    tokens = _numel(TOKENS)
    wide = [op for op in ops if _numel(op[1]) == tokens * OUT]
    assert wide == [("addmm", (tokens, OUT), dtype)], ops  # F.linear(h, F) and the add in one op, in the input's dtype
    assert not [op for op in ops if _numel(op[1]) == tokens * IN], ops  # no cast (or copy) of x
    assert not [op for op in ops if _numel(op[1]) == R * IN], ops  # no per-call cast of A
    thin = [op for op in ops if _numel(op[1]) == tokens * R]
    assert [op[0] for op in thin] == ["mm"], ops  # h = A x, nothing scales it: lambda_s is folded into F


def test_under_autocast_the_add_is_fused_too_and_the_output_within_bf16_tolerance():
    """An fp32 model under torch.autocast(bf16), as Trainer(bf16=True) runs one: the adapter's product and add
    run as autocast's one bf16 addmm, and the output stays within bf16 rounding of the fp32 forward."""
    model, layer = _model("linear")
    model.eval()
    x = torch.randn(*TOKENS, IN)
    with torch.no_grad():
        expected = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
        ops = _adapter_ops(layer, x)
        with torch.no_grad():
            out = layer(x)
    wide = [op for op in ops if _numel(op[1]) == _numel(TOKENS) * OUT]
    assert wide == [("addmm", (_numel(TOKENS), OUT), torch.bfloat16)], ops
    assert out.dtype == torch.bfloat16 and _relative(out, expected) < HALF_TOLERANCE[torch.bfloat16]


GEMMS = {"mm", "addmm", "bmm", "matmul", "linear"}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["linear", "conv1d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_step_runs_nothing_per_token_but_matmuls(layout, dtype, device):
    """Forward and backward: every op on a tokens x R or tokens x out tensor is a matmul (LoRA scales its
    tokens x out product and its gradient; the folded GiVA layer scales only O x R factors)."""
    model, layer = _model(layout, dtype)
    model.to(device).train()
    x = torch.randn(*TOKENS, IN, dtype=dtype, device=device)
    weight = torch.randn(*TOKENS, OUT, dtype=dtype, device=device)
    layer(x)
    with recording() as rec:
        (layer(x) * weight).sum().backward()
    tokens = _numel(TOKENS)
    per_token = [op for op in rec.ops if _numel(op[1]) in (tokens * R, tokens * OUT) and op[0] not in GEMMS]
    loss_ops = [("mul", (*TOKENS, OUT), dtype)] * 2  # the test's own loss (out * weight) and its backward
    assert per_token == loss_ops, rec.ops
    assert all(p.grad is not None for p in _vectors(layer))


def test_bfloat16_stored_a_is_cast_once_not_per_call():
    model, layer = _model("linear", bases_dtype="bfloat16")
    x = torch.randn(*TOKENS, IN)
    assert layer.giva_A["default"].dtype == torch.bfloat16
    with torch.no_grad():
        first = layer(x)
        ops = _adapter_ops(layer, x)
        assert torch.equal(layer(x), first)
    assert not [op for op in ops if _numel(op[1]) == R * IN], ops


@pytest.mark.parametrize("layout", ["linear", "fused"])
def test_backward_forms_no_gradient_for_a(layout):
    model, layer = _model(layout, torch.bfloat16)
    model.train()
    x = torch.randn(*TOKENS, IN, dtype=torch.bfloat16, requires_grad=True)
    out = layer(x)
    with recording() as rec:
        out.float().square().sum().backward()
    rank = layer.giva_A["default"].shape[0]
    assert not [op for op in rec.ops if sorted(op[1]) == sorted((rank, IN))], rec.ops
    assert x.grad is not None and all(p.grad is not None for p in _vectors(layer))


# ---------------------------------------------------------------------------------------------------------------------
# 3. The fp32 switch (GivaConfig.compute_dtype) and PEFT's disable_input_dtype_casting


def test_compute_dtype_is_validated_and_defaults_to_the_input_dtype():
    assert GivaConfig().compute_dtype == "input"
    with pytest.raises(ValueError, match=r"^GivaConfig\.compute_dtype must be one of \('input', 'float32'\), got 'bf16'$"):
        GivaConfig(compute_dtype="bf16")


def test_float32_compute_runs_the_adapter_maths_in_fp32_and_casts_back():
    model, layer = _model("linear", torch.bfloat16, compute_dtype="float32")
    model.eval()
    x = torch.randn(*TOKENS, IN).to(torch.bfloat16)
    with torch.no_grad():
        out = layer(x)
        ops = _adapter_ops(layer, x)
    assert out.dtype == torch.bfloat16
    tokens = _numel(TOKENS)
    assert [op[2] for op in ops if op[1] == (*TOKENS, IN)] == [torch.float32]  # x cast to fp32 once
    assert {op[2] for op in ops if op[1][-1] == R} == {torch.float32}  # h in fp32
    # The fp32 result cast back, then added: PEFT LoRA's default semantics.
    assert [op[2] for op in ops if _numel(op[1]) == tokens * OUT] == [torch.float32, torch.bfloat16, torch.bfloat16]
    # Same numbers as the replaced formula (which also ran in fp32 here), to the bf16 rounding of the add.
    assert torch.equal(out, reference_forward(layer, x))


def test_compute_dtype_is_saved_and_honoured_on_load(tmp_path):
    model, layer = _model("fused", torch.bfloat16, compute_dtype="float32")
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["compute_dtype"] == "float32"
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(OneLayer("conv1d").to(torch.bfloat16), tmp_path)
    loaded_layer = loaded.base_model.model.proj
    assert loaded_layer.giva_compute_dtype == {"default": "float32"}
    x = torch.randn(*TOKENS, IN).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        assert torch.equal(loaded(x), reference_forward(layer, x))  # fp32 maths, as the replaced formula


def test_a_config_saved_before_the_switch_loads_with_the_default(tmp_path):
    model, _ = _model("linear")
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    saved = json.loads(path.read_text())
    del saved["compute_dtype"]
    path.write_text(json.dumps(saved))
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(OneLayer("linear"), tmp_path)
    assert loaded.base_model.model.proj.giva_compute_dtype == {"default": "input"}


@pytest.mark.parametrize("compute_dtype", ["input", "float32"])
def test_disable_input_dtype_casting_keeps_x_in_its_dtype(compute_dtype):
    """PEFT's helper (issue 24 item 5): honoured as LoRA does, and a bf16 model never mixes dtypes in F.linear."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama().to(torch.bfloat16), GivaConfig(r=4, init_weights=False, compute_dtype=compute_dtype))
    batch = text_batches(labels="lm")[0]
    layers = [m for m in model.modules() if isinstance(m, GivaLayer)]
    assert all(layer.cast_input_dtype_enabled for layer in layers)
    with torch.no_grad():
        expected = model(**batch).logits
        with disable_input_dtype_casting(model):
            assert not any(layer.cast_input_dtype_enabled for layer in layers)
            with recording() as rec:
                logits = model(**batch).logits
            with model.disable_adapter(), recording() as base:
                model(**batch)
        assert all(layer.cast_input_dtype_enabled for layer in layers)
    assert logits.dtype == torch.bfloat16
    # The only fp32 matmuls the adapters add: lambda_o lambda_s^T of each layer (O x R, the vectors stay fp32). The
    # base model's own (transformers' rotary embedding is an fp32 bmm in some versions) are not GiVA's.
    factors = {(layer.giva_lambda_o["default"].numel(), layer.giva_lambda_s["default"].numel()) for layer in layers}
    fp32_gemms = [op for op in rec.ops if op[0] in ("mm", "addmm", "bmm") and op[2] == torch.float32]
    for op in base.ops:
        if op in fp32_gemms:
            fp32_gemms.remove(op)
    assert not [op for op in fp32_gemms if op[1] not in factors]
    # Without the cast, the "float32" maths run in bf16 and agree with them to bf16 rounding.
    assert _relative(logits, expected) < 2e-2
    if compute_dtype == "input":
        assert torch.equal(logits, expected)


# ---------------------------------------------------------------------------------------------------------------------
# 4. The cast copy of A follows the bases


def _bf16_layer_after_one_forward() -> tuple[nn.Module, GivaLayer, torch.Tensor]:
    model, layer = _model("linear", torch.bfloat16)
    model.eval()
    x = torch.randn(*TOKENS, IN).to(torch.bfloat16)
    with torch.no_grad():
        layer(x)
    assert len(layer._giva_cast_bases) == 1  # A (fp32) cast once to bf16
    return model, layer, x


def _assert_uses_current_bases(layer: GivaLayer, x: torch.Tensor) -> None:
    with torch.no_grad():
        fresh = F.linear(x, layer.giva_A["default"].to(x.dtype))
        cached = layer._input_basis("default", x.dtype, x.device)
        assert torch.equal(F.linear(x, cached), fresh)
        assert _relative(layer(x), reference_forward(layer, x)) < 1e-2


def test_the_cast_a_is_ready_on_every_stream_that_reads_it(monkeypatch):
    """The cast copy is filled by a kernel on the stream of the forward that made it: every forward that reads it
    goes through its stream guard (serving._OnDevice: another CUDA stream waits for the cast and is recorded on
    it; a no-op on the CPU)."""
    calls = []
    real = giva.serving._OnDevice.used_here
    monkeypatch.setattr(giva.serving._OnDevice, "used_here", lambda self: calls.append(self) or real(self))
    _, layer, x = _bf16_layer_after_one_forward()
    with torch.no_grad():
        layer(x)
    guards = [entry[2] for entry in layer._giva_cast_bases.values()]
    assert len(guards) == 1 and calls == [guards[0], guards[0]]  # the forward that cast it, and the next


@cuda
def test_the_cast_a_built_behind_a_long_kernel_is_read_right_from_another_stream():
    model, layer = _model("linear", torch.bfloat16)
    model.eval().cuda()
    x = torch.randn(*TOKENS, IN, device="cuda").to(torch.bfloat16)
    with torch.no_grad():
        expected = layer(x)
    layer._giva_cast_bases.clear()
    builder, reader = torch.cuda.Stream(), torch.cuda.Stream()
    builder.wait_stream(torch.cuda.current_stream())
    reader.wait_stream(torch.cuda.current_stream())
    with torch.no_grad():
        with torch.cuda.stream(builder):
            torch.cuda._sleep(200_000_000)  # about 0.1 s of device time queued before the cast
            layer(x)
        with torch.cuda.stream(reader):  # no wait_stream: only the cast's own event orders the two
            got = layer(x)
    torch.cuda.synchronize()
    assert torch.equal(got, expected)


def test_cast_a_follows_set_block_bases():
    _, layer, x = _bf16_layer_after_one_forward()
    block = layer.blocks["default"][0]
    a, _ = torch.linalg.qr(torch.randn(IN, R))
    layer.set_block_bases("default", block, a.T.contiguous(), layer.giva_B["default"].clone())
    _assert_uses_current_bases(layer, x)


def test_cast_a_follows_a_load():
    model, layer, x = _bf16_layer_after_one_forward()
    other, _ = _model("linear", torch.bfloat16)
    torch.manual_seed(5)
    other.add_adapter("other", _config("linear"))  # fresh random bases
    state = {k.replace(".other", ".default"): v for k, v in other.state_dict().items() if ".other" in k}
    assert not torch.equal(state["base_model.model.proj.giva_A.default"], layer.giva_A["default"])
    set_peft_model_state_dict(model, state)
    assert torch.equal(layer.giva_A["default"], state["base_model.model.proj.giva_A.default"])
    _assert_uses_current_bases(layer, x)


def test_cast_a_follows_initialize():
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama().to(torch.bfloat16), GivaConfig(r=4, init_weights=False))
    batches = text_batches(labels="lm")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 5, layer.in_features).to(torch.bfloat16)
    with torch.no_grad():
        layer(x)
    before = layer.giva_A["default"].clone()
    giva.initialize(model, batches, num_batches=1, progress=False, force=True)
    assert not torch.equal(layer.giva_A["default"], before)
    _assert_uses_current_bases(layer, x)


def test_cast_a_follows_to_and_in_place_writes():
    model, layer, x = _bf16_layer_after_one_forward()
    model.to(torch.float16)
    assert layer._giva_cast_bases == {}  # dropped: memory freed, device or dtype may have changed
    assert layer.giva_A["default"].dtype == torch.float32
    _assert_uses_current_bases(layer, x.to(torch.float16))
    model.to(torch.bfloat16)
    with torch.no_grad():
        layer(x)
        layer.giva_A["default"].mul_(-1)  # an in-place write outside every GiVA method (PyTorch counts it)
    _assert_uses_current_bases(layer, x)


# Ops after which the host has read a device value (a scalar, or a data-dependent output size): on CUDA each waits
# for every kernel queued before it, so one per layer per forward serialises the host with the GPU.
HOST_SYNC_OPS = frozenset(
    {"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "masked_select", "unique_consecutive",
     "_unique", "_unique2", "unique_dim"}
)


class NoHostSync(TorchDispatchMode):
    """Fails on the first aten op that makes the host read a device value (``bool(t)``, ``.item()``, ``t.any()`` in
    an ``if``, ``torch.equal``, boolean-mask indexing...). On the CPU these cost nothing, so only this sees them."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in HOST_SYNC_OPS:
            raise AssertionError(f"host synchronisation in a forward or backward: aten.{func.overloadpacket.__name__}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "case", ["bf16-model-fp32-bases", "bf16-model-under-autocast", "fp32-model-under-autocast", "mixed-batch-eval"]
)
def test_forward_and_backward_never_make_the_host_read_a_device_value(case):
    """Not once per forward, from the first training forward on: neither the cast-A cache path (every bf16 model
    with fp32 bases), nor autocast's, nor a mixed batch in eval (with autograd, and without: the stack cache). The
    whole model runs under the mode: tiny Llama's own forward and backward read none either, so no exemption."""
    torch.manual_seed(0)
    dtype = torch.float32 if case == "fp32-model-under-autocast" else torch.bfloat16
    model = get_peft_model(tiny_llama().to(dtype), GivaConfig(r=4, init_weights=False))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.giva_A["default"].dtype == torch.float32  # the bases stay fp32: the forward reads A cast
    kwargs = {}
    if case == "mixed-batch-eval":
        model.add_adapter("second", GivaConfig(r=4, init_weights=False))
        model.eval()
        kwargs["adapter_names"] = ["default", "second", "__base__", "default"]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled="autocast" in case)
    batch = text_batches(labels="lm")[0]
    for _ in range(2):  # the first forward builds the caches, the second reuses them
        with autocast, NoHostSync():
            model(**batch, **kwargs).loss.backward()
    if case == "mixed-batch-eval":
        for _ in range(2):
            with torch.no_grad(), NoHostSync():
                model(**batch, **kwargs)
    else:
        # The path meant was taken: A cast once to bf16 for a bf16 model; autocast's fp32 input reads A as stored.
        assert len(layer._giva_cast_bases) == (0 if case == "fp32-model-under-autocast" else 1)


# ---------------------------------------------------------------------------------------------------------------------
# 5. torch.compile: no graph break in the layer, trains and matches eager


def _initialised_llama() -> nn.Module:
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), GivaConfig(r=4, giva_dropout=0.0))
    giva.initialize(model, text_batches(labels="lm"), num_batches=1, progress=False)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_graph_break_inside_the_layer_forward(dtype):
    model = _initialised_llama().to(dtype)
    model.train()
    layers = [m for m in model.modules() if isinstance(m, GivaLayer)]
    fused = copy.deepcopy(layers[0])
    fused.update_layer("second", [16, 16], [1], _config("linear"))  # a partial block: the index_add path
    fused.set_adapter(["default", "second"])
    torch._dynamo.reset()
    for layer in (layers[0], fused):
        x = torch.randn(2, 5, layer.in_features).to(dtype)
        explanation = torch._dynamo.explain(layer)(x)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1
    torch._dynamo.reset()
    mixed = copy.deepcopy(layers[0])  # a mixed batch, with autograd on and off, as a server or an eval loop runs it
    mixed.update_layer("second", [mixed.out_features], [0], _config("linear"))
    mixed.eval()
    names = ["default", "second", "__base__"]
    x = torch.randn(3, 5, mixed.in_features).to(dtype)
    with torch.no_grad():
        eager = mixed(x, adapter_names=names)  # a warm stack cache, as on a server that ran eagerly first
    for context in (contextlib.nullcontext, torch.no_grad, torch.inference_mode):
        with context():
            explanation = torch._dynamo.explain(mixed)(x, adapter_names=names)
        assert explanation.graph_break_count == 0, (context.__name__, explanation.break_reasons)
        torch._dynamo.reset()
        with context():
            compiled = torch.compile(mixed, backend="aot_eager", fullgraph=True)(x, adapter_names=names)
        torch.testing.assert_close(compiled, eager)
        torch._dynamo.reset()
    batch = text_batches(labels="lm")[0]
    explanation = torch._dynamo.explain(lambda **kw: model(**kw).loss)(**batch)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def _train(model: nn.Module, step, steps: int = 3) -> tuple[list[float], dict[str, torch.Tensor]]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for batch in text_batches(n=steps, labels="lm", seed=3):
        loss = step(**batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_compiled_model_trains_and_matches_eager():
    eager = _initialised_llama()
    compiled = copy.deepcopy(eager)
    eager.train()
    compiled.train()
    torch._dynamo.reset()
    step = torch.compile(lambda **kw: compiled(**kw).loss, backend="aot_eager")
    eager_losses, eager_vectors = _train(eager, lambda **kw: eager(**kw).loss)
    compiled_losses, compiled_vectors = _train(compiled, step)
    assert eager_losses[-1] < eager_losses[0]  # it trains
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-5)
    assert eager_vectors.keys() == compiled_vectors.keys() and eager_vectors
    for name, value in eager_vectors.items():
        assert torch.allclose(compiled_vectors[name], value, rtol=1e-4, atol=1e-6), name


def test_compiled_blocks_of_a_bf16_model_compile_once_while_training():
    """Regional compilation as the GPU suite's `giva-compiled` row runs it: a bf16 base with fp32 bases, so every
    layer casts A. Only the first step compiles (block 0, whose input needs no gradient, gets a graph of its own);
    a cast cached while compiling broke the graphs' guards and every block compiled again on the second step."""
    from torch._dynamo.utils import clear_compilation_metrics, get_compilation_metrics

    torch.manual_seed(0)
    model = get_peft_model(tiny_llama().to(torch.bfloat16), GivaConfig(r=4, variant="random", giva_dropout=0.0))
    layers = [m for m in model.modules() if isinstance(m, GivaLayer)]
    assert {layer.giva_A["default"].dtype for layer in layers} == {torch.float32}  # the cast path
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    blocks = model.base_model.model.model.layers
    torch._dynamo.reset()
    clear_compilation_metrics()
    compiled_per_step = []
    try:
        for block in blocks:
            block.compile(backend="aot_eager")
        for batch in text_batches(n=3, labels="lm", seed=3):
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            # recompile_reason: torch 2.7 and later (its text names requires_grad from 2.9 on)
            compiled_per_step.append([(m.co_name, getattr(m, "recompile_reason", None))
                                      for m in get_compilation_metrics() if m.co_name])
            clear_compilation_metrics()
    finally:
        torch._dynamo.reset()
    first, *later = compiled_per_step
    assert later == [[], []], later
    assert len(first) == 2, first
    if tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 9):
        assert "requires_grad" in str(first[1][1]), first
    assert not any(layer._giva_cast_bases for layer in layers)  # nothing cached while compiling


# ---------------------------------------------------------------------------------------------------------------------
# 6. Under torch.autocast (what Trainer(bf16=True / fp16=True) and `giva sft --bf16` run): the factors are formed
# in fp32, compute_dtype="float32" keeps its fp32 maths, delta_W stays fp32


def _bf16_autocast() -> torch.autocast:
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _output_and_grads_exact_weights(layer: GivaLayer, x: torch.Tensor, autocast: bool = False, seed: int = 0):
    """As :func:`_output_and_grads`, the forward under bf16 autocast or not, the backward outside it (as Trainer and
    Accelerate run it), with loss weights that bf16 holds exactly: the gradient reaching a bf16 output under
    autocast is then the same as the one reaching an fp32 output without it."""
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = layer(x)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).float()
    grads = torch.autograd.grad((out.float() * weight).sum(), _vectors(layer))
    return out.detach(), grads


@pytest.mark.parametrize("layout", ["linear", "conv1d", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_under_autocast_float32_compute_keeps_the_adapter_maths_in_fp32(layout, dtype):
    """The switch is not undone by autocast: every product of the adapter maths runs in fp32 (only the base layer's
    is autocast's bf16), and the vectors' gradients are those of the same layer without autocast, to fp32 rounding
    (autocast used to run them all in bf16: gradients bit-identical to compute_dtype="input", 5e-3 off)."""
    model, layer = _model(layout, dtype, compute_dtype="float32", giva_dropout=0.2)
    model.train()
    x = torch.randn(*TOKENS, IN).to(dtype)
    _, expected = _output_and_grads_exact_weights(layer, x)
    with _bf16_autocast():
        layer(x)
        ops = _adapter_ops(layer, x)
    out, grads = _output_and_grads_exact_weights(layer, x, autocast=True)
    gemms = [op for op in ops if op[0] in GEMMS]
    assert gemms and {op[2] for op in gemms} == {torch.float32}, ops
    assert out.dtype == torch.bfloat16  # added to autocast's bf16 base output
    for got, want in zip(grads, expected):
        assert got.dtype == torch.float32 and _relative(got, want) < 1e-5, _relative(got, want)


def _perturbed(layer: GivaLayer) -> GivaLayer:
    """Vectors (and core) off the values bf16 holds: lambda_s near 1, as after a few small optimiser steps."""
    with torch.no_grad():
        layer.giva_lambda_s["default"].copy_(1 + 1e-3 * torch.randn(layer.giva_lambda_s["default"].shape))
        if "default" in layer.giva_core:
            layer.giva_core["default"].add_(0.01 * torch.randn(layer.giva_core["default"].shape))
    return layer


@pytest.mark.parametrize("layout", ["linear", "conv1d", "fused"])
@pytest.mark.parametrize("core", [False, True])
def test_under_autocast_the_factors_and_delta_w_are_formed_in_fp32(layout, core):
    """``adapter_factor``, ``output_factor`` and ``delta_weight`` (merge, unmerge, export) are the fp32 products
    they are without autocast, bit for bit: autocast ran their matmuls in bf16, which rounded lambda_s (and B C)
    to bf16 before the fold and gave merges a bf16 delta_W."""
    extra = {"core": True, "lambda_o_init": 0.0} if core else {}
    _, layer = _model(layout, **extra)
    _perturbed(layer)
    with torch.no_grad():
        expected = (layer.adapter_factor("default"), layer.output_factor("default"), layer.delta_weight("default"))
        with _bf16_autocast():
            got = (layer.adapter_factor("default"), layer.output_factor("default"), layer.delta_weight("default"))
    for g, e in zip(got, expected):
        assert g.dtype == torch.float32 and torch.equal(g, e)


def test_under_autocast_a_small_lambda_s_step_moves_the_output():
    """The fp32 factor rounded once to bf16: a lambda_s step of 0.003 from 1 changes the adapter's output by about
    that much (relative). With lambda_s rounded to bf16 before the fold (spacing 2^-7 at 1) it changed nothing."""
    model, layer = _model("linear")
    model.eval()
    with torch.no_grad():
        layer.base_layer.weight.zero_()  # the output is the adapter's alone, rounded at its own scale
        layer.base_layer.bias.zero_()
    x = torch.randn(64, IN)

    def output(value: float) -> torch.Tensor:
        with torch.no_grad(), _bf16_autocast():
            layer.giva_lambda_s["default"].fill_(value)
            return layer(x).float()

    before, after = output(1.0), output(1.003)
    assert 1e-3 < _relative(after, before) < 2e-2, _relative(after, before)


@pytest.mark.parametrize("layout", ["linear", "conv1d", "fused"])
def test_a_merge_outside_autocast_and_an_unmerge_inside_it_restore_w(layout):
    """Reference logits under autocast with the adapter disabled (the forward unmerges) must give W back: a bf16
    delta_W left it up to 9e-5 off for good. A merge under autocast is the fp32 merge too."""
    model, layer = _model(layout)
    model.eval()
    _perturbed(layer)
    weight = layer.base_layer.weight
    original = weight.detach().clone()
    x = torch.randn(*TOKENS, IN)
    with torch.no_grad():
        layer.merge()
        merged = weight.detach().clone()
        with model.disable_adapter(), _bf16_autocast():
            model(x)
        assert not layer.merged
        assert _relative(weight, original) < 1e-6, _relative(weight, original)
        with _bf16_autocast():
            layer.merge()
        assert torch.equal(weight, merged)
        with _bf16_autocast():
            layer.unmerge()
        assert _relative(weight, original) < 1e-6, _relative(weight, original)


@pytest.mark.parametrize("compute_dtype", ["input", "float32"])
def test_under_autocast_no_graph_break_inside_the_layer_forward(compute_dtype):
    """The autocast test and the autocast-disabled regions trace into the graph: one graph, no break, for the
    one-adapter forward, the index_add path and a mixed batch, and the compiled layer gives the eager numbers."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), GivaConfig(r=4, init_weights=False, compute_dtype=compute_dtype))
    model.train()
    layer = next(m for m in model.modules() if isinstance(m, GivaLayer))
    fused = copy.deepcopy(layer)
    fused.update_layer("second", [16, 16], [1], _config("linear", compute_dtype=compute_dtype))  # index_add
    fused.set_adapter(["default", "second"])
    mixed = copy.deepcopy(layer)
    mixed.update_layer("second", [mixed.out_features], [0], _config("linear"))  # "input": the batch follows default
    mixed.eval()
    cases = [(layer, {}), (fused, {}), (mixed, {"adapter_names": ["default", "second", "__base__"]})]
    for module, kwargs in cases:
        x = torch.randn(3, 5, module.in_features)
        torch._dynamo.reset()
        with _bf16_autocast():
            eager = module(x, **kwargs)
            explanation = torch._dynamo.explain(module)(x, **kwargs)
            assert explanation.graph_break_count == 0, explanation.break_reasons
            assert explanation.graph_count == 1
            torch._dynamo.reset()
            compiled = torch.compile(module, backend="aot_eager", fullgraph=True)(x, **kwargs)
        assert compiled.dtype == eager.dtype == torch.bfloat16
        torch.testing.assert_close(compiled, eager)
    torch._dynamo.reset()
