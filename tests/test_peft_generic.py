"""PEFT's own generic tuner tests (tests/test_custom_models.py of the installed PEFT version) on GiVA.

The upstream module is fetched from the package registry (see tests/peft_upstream.py) and its test
functions are collected here with GiVA's cases in place of PEFT's case lists, the way PEFT adds a
method: "Vanilla MLP" / "Embedding + Conv1D" rows of ``TEST_CASES``, "Same" / "Different" rows of
``MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES``, rows of ``MIXED_ADAPTER_TEST_CASES`` and of the mixed-batch
tests with explicit configs, ``GivaConfig`` in the tests parametrised over every config class, and
the ``test_requires_grad_<method>_{same,different}_targets`` pair written for each method.

Upstream tests that are about one other method (DoRA, IA3, trainable tokens, LoRA's weighted
adapters, ...) are not collected. Only upstream functions run: nothing of their bodies is copied.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import types
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _pytest.fixtures import FixtureFunctionDefinition
from peft import get_peft_model

import giva
from giva import GivaConfig
from peft_upstream import load

upstream = load()
# Module-level fixtures the upstream classes use by name (PEFT 0.22's ``fsdp_process_group``): visible here too.
globals().update({name: obj for name, obj in vars(upstream).items() if isinstance(obj, FixtureFunctionDefinition)})

# "Vanilla MLP" (lin0: 10 -> 20, lin1: 20 -> 2) and "Embedding + Conv1D" (conv1d: 5 -> 1) cases, as for VeRA,
# plus one case per data-free variant, a gradient variant with its own B, and a fused layer split into blocks.
GIVA_TEST_CASES = [
    ("Vanilla MLP 1 GiVA", "MLP", GivaConfig, {"target_modules": "lin0"}),
    ("Vanilla MLP 2 GiVA", "MLP", GivaConfig, {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3 GiVA", "MLP", GivaConfig, {"target_modules": ["lin1"], "r": 2}),
    ("Vanilla MLP 4 GiVA", "MLP", GivaConfig, {"target_modules": ["lin0", "lin1"], "r": 2}),
    ("Vanilla MLP 5 GiVA", "MLP", GivaConfig, {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("Vanilla MLP 6 GiVA random", "MLP", GivaConfig, {"target_modules": ["lin0", "lin1"], "r": 2, "variant": "random"}),
    ("Vanilla MLP 7 GiVA weight", "MLP", GivaConfig, {"target_modules": ["lin0"], "variant": "weight"}),
    ("Vanilla MLP 8 GiVA VrU2r", "MLP", GivaConfig, {"target_modules": ["lin0"], "r": 4, "variant": "VrU2r"}),
    (
        "Vanilla MLP 9 GiVA fused blocks",
        "MLP",
        GivaConfig,
        {"target_modules": ["lin0"], "r": 4, "block_sizes": {"lin0": [8, 12]}, "adapt_blocks": {"lin0": [1]}},
    ),
    ("Embedding + transformers Conv1D 1 GiVA", "EmbConv1D", GivaConfig, {"target_modules": ["conv1d"], "r": 1}),
]

# GiVA layers hold per-layer bases (not VeRA's shared ones), so two adapters may target different layers.
GIVA_MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES = [
    (
        "GiVA Same",
        "giva",
        GivaConfig,
        {"target_modules": ["lin0"], "init_weights": False},
        {"target_modules": ["lin0"], "init_weights": False},
    ),
    (
        "GiVA Different",
        "giva",
        GivaConfig,
        {"target_modules": ["lin0"], "init_weights": False},
        {"target_modules": ["lin1"], "r": 2, "init_weights": False},
    ),
    (
        "GiVA Same random",
        "giva",
        GivaConfig,
        {"target_modules": ["lin0"], "variant": "random", "init_weights": False},
        {"target_modules": ["lin0"], "variant": "random", "seed": 1, "init_weights": False},
    ),
]

GIVA_MIXED_ADAPTER_TEST_CASES = [
    (
        "GiVA mixed adapter",
        GivaConfig(target_modules=["lin0"], init_weights=False),
        GivaConfig(target_modules=["lin0"], r=4, variant="VrUr", init_weights=False),
    ),
]

# Upstream tests parametrised with explicit configs of other methods: GiVA's rows for the same check.
GIVA_ROWS_BY_TEST: dict[str, list[Any]] = {
    "test_mixed_adapter_batches_different_target_layers": [
        (
            "GiVA mixed adapter with different target layers",
            GivaConfig(target_modules=["lin0"], init_weights=False),
            GivaConfig(target_modules=["lin1"], r=2, init_weights=False),
        )
    ],
    "test_mixed_adapter_batches_multiple_modules_to_save": [
        (
            "GiVA mixed adapter with modules to save",
            GivaConfig(target_modules=["lin0"], modules_to_save=["lin1"], init_weights=False),
            GivaConfig(target_modules=["lin0"], modules_to_save=["lin1"], init_weights=False),
        )
    ],
    "test_mixed_adapter_batches_partly_overlapping_target_layers": [
        (
            "GiVA mixed adapter with overlapping layers",
            GivaConfig(target_modules=["lin0"], init_weights=False),
            GivaConfig(target_modules=["lin0", "lin1"], r=2, init_weights=False),
        )
    ],
    # These two run a train-mode forward on a second adapter made by add_adapter (never initialised): a
    # data-free variant keeps the check (switching adapters with and without modules_to_save) meaningful.
    "test_multiple_adapters_mixed_modules_to_save": [partial(GivaConfig, variant="random")],
    "test_multiple_adapters_mixed_modules_to_save_order_switched": [partial(GivaConfig, variant="random")],
    "test_adapter_name_makes_no_difference": [GivaConfig(target_modules=["lin0"], init_weights=False)],
    # PEFT >= 0.22: merges, unmerges and disable_adapter under FSDP2 after a forward left the parameters unsharded.
    "test_merge_and_unmerge_reach_shards": [
        (lambda: GivaConfig(target_modules=["lin0", "lin1"], r=2, init_weights=False), safe_merge)
        for safe_merge in (False, True)
    ],
    "test_merge_reaches_shards_embedding_and_conv": [
        (upstream.ModelEmbConv1D, "conv1d", GivaConfig(target_modules=["conv1d", "lin0"], init_weights=False), torch.arange(90).view(9, 10))
    ] if hasattr(upstream, "ModelEmbConv1D") else [],
    "test_disable_adapter_unmerges_merged_layers": [
        lambda: GivaConfig(target_modules=["lin0", "lin1"], r=2, init_weights=False)
    ],
}

# The case lists of the upstream module, by identity, and GiVA's replacement for each.
GIVA_ROWS_BY_LIST: dict[int, list[Any]] = {
    id(upstream.TEST_CASES): GIVA_TEST_CASES,
    id(upstream.ALL_PEFT_CONFIG_CLASSES): [GivaConfig],
    id(upstream.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES): GIVA_MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES,
    id(upstream.MIXED_ADAPTER_TEST_CASES): GIVA_MIXED_ADAPTER_TEST_CASES,
}

# Generic tests that cannot apply to GiVA, each with its reason: (test function, case name or None for all).
NOT_APPLICABLE: dict[tuple[str, str | None], str] = {}

# Parametrisations of an upstream test (by a parameter's value) that cannot apply to GiVA, each with its reason.
NOT_APPLICABLE_PARAMS: dict[str, tuple[Callable[[dict[str, Any]], bool], str]] = {
    # PEFT 0.22: every float tensor of a merged model must take `model.to(dtype=torch.float64)`'s dtype. GiVA's bases
    # keep the config's `bases_dtype` through every cast, by design: a checkpoint records it and a load checks it,
    # and a narrowing cast would round them (test_layer_hardening: test_casting_the_wrapped_model_keeps_fp32_...,
    # test_a_widening_cast_keeps_the_bases_at_bases_dtype_and_the_save_reloads). The "device" case runs.
    "test_merge_layers_dtype_device_conversion": (
        lambda params: "dtype" in params.get("conversion_kwargs", {}),
        "GiVA's bases keep the config's bases_dtype through model casts (recorded in the checkpoint, checked at load)",
    ),
}


def _get_peft_model_then_initialize(model: torch.nn.Module, peft_config: Any, *args: Any, **kwargs: Any) -> Any:
    """``get_peft_model``, then ``giva.initialize`` on one batch when GiVA's bases need data, as a user does.

    Training a gradient variant before its bases exist raises ``BasesNotInitializedError`` by design; with
    ``init_weights=False`` (most generic tests) stand-in random bases are drawn instead and this is a no-op.
    Only models whose forward can run are calibrated: upstream's ``MLP`` casts its input to its ``dtype``
    attribute (fp32 unless a test sets it along with the weights' dtype), and ``DeepMLP.forward`` cannot run
    at all, so the tests that build those never call a forward.
    """
    calibratable = isinstance(model, upstream.ModelEmbConv1D) or (
        isinstance(model, upstream.MLP) and all(p.dtype == model.dtype for p in model.parameters())
    )
    peft_model = get_peft_model(model, peft_config, *args, **kwargs)
    needs_data = (
        calibratable
        and isinstance(peft_config, GivaConfig)
        and peft_config.init_weights
        and peft_config.variant in giva.GRADIENT_VARIANTS
    )
    if needs_data:
        device = next(peft_model.parameters()).device
        batch = {"X": torch.arange(90).view(9, 10).to(device), "y": torch.arange(9).remainder(2).to(device)}
        giva.initialize(peft_model, [batch], num_batches=1, loss_fn=lambda m, b: F.nll_loss(m(X=b["X"]).float(), b["y"]), progress=False)
    return peft_model


@pytest.fixture(autouse=True)
def _initialise_gradient_bases(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in (upstream, importlib.import_module(upstream.__package__ + ".testing_common")):
        monkeypatch.setattr(module, "get_peft_model", _get_peft_model_then_initialize)
    # Tests parametrised over config classes pick "a representative case" from TEST_CASES in their body.
    monkeypatch.setattr(upstream, "TEST_CASES", GIVA_TEST_CASES)


def _with_giva_rows(test: Callable) -> Callable | None:
    """A copy of the upstream test function whose case parametrisation holds GiVA's rows (None: not generic)."""
    marks = list(getattr(test, "pytestmark", []))
    new_marks, replaced = [], False
    for mark in marks:
        rows = None
        if mark.name == "parametrize":
            rows = GIVA_ROWS_BY_LIST.get(id(mark.args[1]))
            if rows is None and test.__name__ in GIVA_ROWS_BY_TEST and "config" in mark.args[0]:
                rows = GIVA_ROWS_BY_TEST[test.__name__]
        if rows is None:
            new_marks.append(mark)
            continue
        replaced = True
        params = []
        for row in rows:
            case = row[0] if isinstance(row, tuple) and isinstance(row[0], str) else None
            reason = NOT_APPLICABLE.get((test.__name__, case)) or NOT_APPLICABLE.get((test.__name__, None))
            skip = [pytest.mark.skip(reason=reason)] if reason else []
            params.append(pytest.param(*row, marks=skip) if isinstance(row, tuple) else pytest.param(row, marks=skip))
        new_marks.append(pytest.mark.parametrize(mark.args[0], params, **mark.kwargs).mark)
    if not replaced:
        return None
    copy = types.FunctionType(test.__code__, test.__globals__, test.__name__, test.__defaults__, test.__closure__)
    copy.__kwdefaults__ = test.__kwdefaults__
    copy.__dict__.update({k: v for k, v in test.__dict__.items() if k != "pytestmark"})
    if test.__name__ in NOT_APPLICABLE_PARAMS:
        applies, reason = NOT_APPLICABLE_PARAMS[test.__name__]
        body = copy

        @functools.wraps(body)
        def copy(*args: Any, **kwargs: Any) -> Any:  # pytest passes the parameters by name
            if applies(kwargs):
                pytest.skip(reason)
            return body(*args, **kwargs)

        del copy.__dict__["__wrapped__"]  # pytest reads the signature through it: keep the upstream one
        copy.__signature__ = inspect.signature(body)
    copy.pytestmark = new_marks
    return copy


def _giva_class(base: type) -> dict[str, Any]:
    """Class body for a subclass of an upstream test class: its generic tests with GiVA rows, the others removed."""
    body: dict[str, Any] = {}
    for name, test in vars(base).items():
        if name.startswith("test_") and callable(test):
            body[name] = _with_giva_rows(test)  # None hides the upstream test from collection
    return body


TestGivaCustomModel = type("TestGivaCustomModel", (upstream.TestPeftCustomModel,), _giva_class(upstream.TestPeftCustomModel))
TestGivaMultipleActiveAdapters = type(
    "TestGivaMultipleActiveAdapters",
    (upstream.TestMultipleActiveAdapters,),
    _giva_class(upstream.TestMultipleActiveAdapters),
)
TestGivaMixedAdapterBatches = type(
    "TestGivaMixedAdapterBatches", (upstream.TestMixedAdapterBatches,), _giva_class(upstream.TestMixedAdapterBatches)
)

TestGivaFsdpStateDict = type(
    "TestGivaFsdpStateDict", (upstream.TestPeftFsdpStateDict,), _giva_class(upstream.TestPeftFsdpStateDict)
)
if hasattr(upstream, "TestFsdp2UnshardedParams"):  # PEFT >= 0.22
    TestGivaFsdp2UnshardedParams = type(
        "TestGivaFsdp2UnshardedParams", (upstream.TestFsdp2UnshardedParams,), _giva_class(upstream.TestFsdp2UnshardedParams)
    )
if hasattr(upstream, "TestPeftCheckpointWrapperStateDict"):  # PEFT >= 0.22: activation-checkpointed models
    TestGivaCheckpointWrapperStateDict = type(
        "TestGivaCheckpointWrapperStateDict",
        (upstream.TestPeftCheckpointWrapperStateDict,),
        _giva_class(upstream.TestPeftCheckpointWrapperStateDict),
    )


class TestGivaRequiresGrad(upstream.TestRequiresGrad):
    """Upstream's generic requires-grad tests on GiVA, plus the same/different-targets pair PEFT writes per method."""

    locals().update(_giva_class(upstream.TestRequiresGrad))

    def test_requires_grad_giva_different_targets(self) -> None:
        # Only the active adapter's vectors train; the bases (buffers) never do.
        model = get_peft_model(upstream.MLP_2x_same_shape(), GivaConfig(target_modules=["lin1"]))
        model.add_adapter("adapter1", GivaConfig(target_modules=["lin2"]))
        default = ("base_model.model.lin1.giva_lambda_s.default", "base_model.model.lin1.giva_lambda_o.default")
        other = ("base_model.model.lin2.giva_lambda_s.adapter1", "base_model.model.lin2.giva_lambda_o.adapter1")
        self.check_requires_grad(model, *default)
        model.set_adapter("default")
        self.check_requires_grad(model, *default)
        model.set_adapter("adapter1")
        self.check_requires_grad(model, *other)
        with model.disable_adapter():
            self.check_requires_grad(model)
        self.check_requires_grad(model, *other)

    def test_requires_grad_giva_same_targets(self) -> None:
        model = get_peft_model(upstream.MLP_2x_same_shape(), GivaConfig(target_modules=["lin1", "lin2"]))
        model.add_adapter("adapter1", GivaConfig(target_modules=["lin1", "lin2"]))

        def vectors(adapter: str) -> list[str]:
            return [f"base_model.model.{m}.giva_lambda_{v}.{adapter}" for m in ("lin1", "lin2") for v in ("s", "o")]

        self.check_requires_grad(model, *vectors("default"))
        model.set_adapter("default")
        self.check_requires_grad(model, *vectors("default"))
        model.set_adapter("adapter1")
        self.check_requires_grad(model, *vectors("adapter1"))
        with model.disable_adapter():
            self.check_requires_grad(model)
        self.check_requires_grad(model, *vectors("adapter1"))
