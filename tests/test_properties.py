"""Property-based tests (hypothesis) of one GiVA layer over random shapes, ranks, dtypes, variants and fused blocks.

Each example builds a one-layer model (``nn.Linear`` with or without bias, or transformers' ``Conv1D``) of a
drawn shape and base dtype (fp32 / bf16 / fp16), wraps it with a drawn ``GivaConfig`` (variant, r, seed,
output blocks and which of them are adapted), fills gradient bases with ``giva.initialize`` on a seeded
batch, and checks one property, for every variant. Examples are derandomised (the same ones on every run) and bounded so the
whole file runs in well under a minute on 2 cores.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import PeftModel, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

import giva
from giva import GivaConfig, GivaLayer

SETTINGS = settings(
    max_examples=4,  # per property and variant: 6 variants x 4 = 24 examples per property
    deadline=None,  # a loaded CI machine makes per-example timings meaningless; max_examples bounds the time
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Base outputs and merges are rounded to the base dtype: tolerances of a few units in its last place at O(1).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 6e-2, torch.float16: 8e-3}
ORTHONORMAL_B = ("Vr", "VrUr", "VrU2r", "random", "weight")  # VrUrand's B is an unnormalised Gaussian


@dataclass(frozen=True)
class Case:
    kind: str  # "linear", "linear-nobias" or "conv1d"
    in_features: int
    block_sizes: tuple[int, ...]
    adapt_blocks: tuple[int, ...]
    r: int
    variant: str
    dtype: str
    seed: int

    @property
    def out_features(self) -> int:
        return sum(self.block_sizes)

    def config(self) -> GivaConfig:
        fused = len(self.block_sizes) > 1
        return GivaConfig(
            r=self.r,
            target_modules=["proj"],
            variant=self.variant,
            seed=self.seed,
            block_sizes={"proj": list(self.block_sizes)} if fused else {},
            adapt_blocks={"proj": list(self.adapt_blocks)} if fused else {},
        )


@st.composite
def cases(draw: st.DrawFn, variant: str) -> Case:
    block_sizes = tuple(draw(st.lists(st.integers(2, 12), min_size=1, max_size=3)))
    adapt = draw(st.lists(st.integers(0, len(block_sizes) - 1), min_size=1, max_size=len(block_sizes), unique=True))
    return Case(
        kind=draw(st.sampled_from(["linear", "linear-nobias", "conv1d"])),
        in_features=draw(st.integers(2, 24)),
        block_sizes=block_sizes,
        adapt_blocks=tuple(sorted(adapt)),
        r=draw(st.integers(1, 8)),
        variant=variant,
        dtype=draw(st.sampled_from(sorted(DTYPES))),
        seed=draw(st.integers(0, 2**16)),
    )


def over_cases(check: Callable[[Case], None]) -> Callable[..., None]:
    """The test running ``check(case)`` on SETTINGS' examples of every variant."""

    @pytest.mark.parametrize("variant", giva.VARIANTS)
    @SETTINGS
    @given(data=st.data())
    def test(variant: str, data: st.DataObject) -> None:
        check(data.draw(cases(variant)))

    test.__name__, test.__qualname__, test.__doc__ = check.__name__, check.__qualname__, check.__doc__
    return test


class OneLayer(nn.Module):
    def __init__(self, case: Case) -> None:
        super().__init__()
        if case.kind == "conv1d":
            self.proj = Conv1D(case.out_features, case.in_features)
        else:
            self.proj = nn.Linear(case.in_features, case.out_features, bias=case.kind == "linear")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _base(case: Case) -> OneLayer:
    torch.manual_seed(case.seed)
    return OneLayer(case).to(DTYPES[case.dtype]).eval()


def _data(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(case.seed + 1)
    x = torch.randn(16, case.in_features, generator=generator)
    target = torch.randn(16, case.out_features, generator=generator)
    return x.to(DTYPES[case.dtype]), target


def _wrapped(case: Case, base: OneLayer | None = None) -> tuple[PeftModel, GivaLayer]:
    """The GiVA model of ``case`` with its bases filled (from the gradient of a seeded regression loss)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # rank clipped to a small block: expected here
        model = get_peft_model(base if base is not None else _base(case), case.config())
    if case.variant in giva.GRADIENT_VARIANTS:
        x, target = _data(case)
        loss = lambda m, b: (m(b["x"]).float() - b["target"]).square().mean()  # noqa: E731
        giva.initialize(model, [{"x": x, "target": target}], num_batches=1, loss_fn=loss, progress=False)
    return model.eval(), model.base_model.model.proj


def _with_trained_vectors(case: Case, layer: GivaLayer) -> None:
    """Vectors as after training: random, so delta_W is not zero."""
    generator = torch.Generator().manual_seed(case.seed + 2)
    with torch.no_grad():
        for vector in (layer.giva_lambda_s["default"], layer.giva_lambda_o["default"]):
            vector.copy_(torch.randn(vector.shape, generator=generator))


def _output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


@over_cases
def test_identity_at_creation(case: Case) -> None:
    base = _base(case)
    x, _ = _data(case)
    expected = _output(base, x)
    model, layer = _wrapped(case, base)
    assert torch.equal(_output(model, x), expected)
    assert set(layer.giva_lambda_o) == {"default"} and not layer.giva_lambda_o["default"].any()


@over_cases
def test_merge_equals_the_unmerged_forward_and_unmerge_restores_the_weight(case: Case) -> None:
    model, layer = _wrapped(case)
    _with_trained_vectors(case, layer)
    x, _ = _data(case)
    weight = layer.get_base_weight().detach().clone()
    unmerged = _output(model, x).float()
    layer.merge()
    merged = _output(model, x).float()
    scale = 1.0 + unmerged.abs().max().item()
    tolerance = TOLERANCE[weight.dtype] * scale
    assert (merged - unmerged).abs().max().item() <= tolerance
    delta = layer.delta_weight("default").abs().max().item()
    layer.unmerge()
    restored = layer.get_base_weight()
    assert restored.dtype == weight.dtype
    # fp32: exact up to the rounding of W + dW - dW; half precision: two roundings of W + dW.
    weight_tolerance = 2 * torch.finfo(weight.dtype).eps * (weight.abs().max().item() + delta)
    assert (restored.float() - weight.float()).abs().max().item() <= weight_tolerance


@over_cases
def test_save_and_reload_is_bit_identical(case: Case) -> None:
    model, layer = _wrapped(case)
    _with_trained_vectors(case, layer)
    x, _ = _data(case)
    expected = _output(model, x)
    with TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            loaded = PeftModel.from_pretrained(_base(case), Path(folder)).eval()
    loaded_layer = loaded.base_model.model.proj
    for name in ("giva_A", "giva_B", "giva_lambda_s", "giva_lambda_o"):
        assert torch.equal(getattr(loaded_layer, name)["default"], getattr(layer, name)["default"]), name
    assert torch.equal(_output(loaded, x), expected)


@over_cases
def test_bases_are_orthonormal_per_block(case: Case) -> None:
    _, layer = _wrapped(case)
    a_all, b_all = layer.giva_A["default"].float(), layer.giva_B["default"].float()
    assert a_all.dtype == torch.float32
    for block in layer.blocks["default"]:
        ranks = slice(block.rank_offset, block.rank_offset + block.rank)
        rows = slice(block.row_offset, block.row_offset + block.out_size)
        a, b = a_all[ranks], b_all[rows, ranks]
        eye = torch.eye(block.rank)
        assert torch.allclose(a @ a.mT, eye, atol=1e-5), f"A of block {block.index}"
        if case.variant in ORTHONORMAL_B:
            assert torch.allclose(b.mT @ b, eye, atol=1e-5), f"B of block {block.index}"
        # B is block-diagonal: nothing outside this block's rows and ranks
        assert not b_all[:, ranks].index_fill(0, torch.arange(rows.start, rows.stop), 0).any()


@over_cases
def test_initialisation_is_deterministic(case: Case) -> None:
    _, first = _wrapped(case)
    _, second = _wrapped(case)
    assert torch.equal(first.giva_A["default"], second.giva_A["default"])
    assert torch.equal(first.giva_B["default"], second.giva_B["default"])
