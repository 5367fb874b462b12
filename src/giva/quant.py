"""GiVA on quantised base layers, through PEFT's own ``resolve_quantization_backend``.

A quantised linear layer (bitsandbytes ``Linear4bit`` / ``Linear8bitLt``, HQQ, torchao...) is wrapped like any
linear layer: the forward calls the base layer, whatever it is, and the adapter maths only needs ``x`` and the
layer's in/out sizes. Only reading W (the `weight` variant's SVD) and writing it (merge / unmerge) go through the
layer's :class:`peft.utils.quantization_utils.QuantizationBackend`, which dequantises and re-quantises.

This module never imports bitsandbytes itself: PEFT's backend does, and only for a layer that is not a plain
``nn.Linear`` / ``Conv1D`` whose class (or its weight's) comes from a quantisation package (so a model without
quantised layers never loads it, not even to refuse a target such as an embedding).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from peft.utils import get_quantization_kwargs, resolve_quantization_backend
from peft.utils.quantization_utils import QuantizationBackend, quantization_extra_repr
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import GivaConfig
from .layer import Linear

# What PEFT 0.21's resolve_quantization_backend covers (when the package is installed).
SUPPORTED_BACKENDS = (
    "bitsandbytes Linear8bitLt and Linear4bit (merge re-quantises), HQQ HQQLinear and torchao-quantised Linear "
    "(merge re-quantises); forward only (no merge, no 'weight' variant): AQLM, EETQ, GPTQ and AWQ (gptqmodel), "
    "Intel Neural Compressor, TransformerEngine"
)


# The packages whose layer classes (torchao: weight tensor classes) PEFT's resolve_quantization_backend looks for,
# importing each installed one to look, bitsandbytes first.
QUANTISATION_PACKAGES = ("bitsandbytes", "hqq", "torchao", "aqlm", "eetq", "gptqmodel", "neural_compressor",
                         "transformer_engine")


def _from_quantisation_package(base_layer: nn.Module) -> bool:
    """Whether the layer's class, or its weight's, comes from one of :data:`QUANTISATION_PACKAGES`: the only layers for
    which PEFT's resolution can find a backend (so none is asked, and nothing imported, for an embedding)."""
    classes = (*type(base_layer).__mro__, *type(getattr(base_layer, "weight", None)).__mro__)
    return any(cls.__module__.split(".")[0] in QUANTISATION_PACKAGES for cls in classes)


def _is_plain(base_layer: nn.Module) -> bool:
    """An unquantised ``nn.Linear`` / ``Conv1D`` with an ordinary weight: no need to ask PEFT (nor to import
    bitsandbytes, which PEFT's resolution does first). torchao keeps the ``nn.Linear`` and swaps its weight for a
    tensor subclass, hence the weight's type is checked too."""
    weight = getattr(base_layer, "weight", None)
    return type(base_layer) in (nn.Linear, Conv1D) and type(weight) in (torch.Tensor, nn.Parameter)


def quantization_backend(
    base_layer: nn.Module, layer_name: str, model: Optional[nn.Module] = None
) -> Optional[QuantizationBackend]:
    """PEFT's backend for ``base_layer`` (module ``layer_name`` of ``model``), ``None`` for an unquantised linear layer.

    Raises ``TypeError`` naming the layer, its type and the supported backends for a layer GiVA cannot adapt
    (neither a linear layer nor a quantised linear layer a backend covers).
    """
    if _is_plain(base_layer):
        return None
    backend = None
    if _from_quantisation_package(base_layer):  # else PEFT would import bitsandbytes and the rest to find none
        kwargs: dict[str, Any] = get_quantization_kwargs(model) if model is not None else {}
        backend = resolve_quantization_backend(base_layer, **kwargs)
    if backend is None and isinstance(base_layer, (nn.Linear, Conv1D)):
        return None  # a subclass of nn.Linear that is not quantised (e.g. MultiheadAttention's out_proj)
    if backend is None or backend.layer_type != "linear":
        why = (
            "no backend of PEFT's resolve_quantization_backend covers it"
            if backend is None
            else f"PEFT's {backend.backend_name!r} backend for it handles {backend.layer_type} layers"
        )
        raise TypeError(
            f"Target module {layer_name!r} is not supported by GiVA: it is a "
            f"{type(base_layer).__module__}.{type(base_layer).__name__} "
            f"and {why}. GiVA adapts torch.nn.Linear, transformers Conv1D and the quantised linear layers of these "
            f"backends: {SUPPORTED_BACKENDS}. Adjust target_modules."
        )
    return backend


def keep_4bit_layers_trainable(model: nn.Module) -> None:
    """Turn off bitsandbytes' CPU inference repacking on every 4-bit layer of ``model``, and undo it where it ran.

    On a CPU with AVX512-BF16, a bitsandbytes ``Linear4bit`` (0.50) repacks its weight in place the first time it
    runs in eval mode without gradients, and from then on computes with a kernel that has no backward. After one
    evaluation (``giva sft``'s "before" scores, a Trainer's eval loop, a generate call) no gradient would reach any
    layer below a repacked one, silently, and PEFT's dequantisation (merge, the `weight` variant) would read the
    repacked bytes in the standard layout. GiVA wraps a 4-bit model only to train or merge it, so every
    ``Linear4bit`` of the model (adapted or not: gradients pass through all of them) keeps bitsandbytes' standard
    layout and kernels; a weight already repacked is restored with bitsandbytes' own inverse (the one its
    ``state_dict`` uses, which keeps the absmax it rounded to bf16), whose absmax layout is mended where it leaves
    it wrong (a state without double quantisation). Other backends and GPUs are unaffected.
    """
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):  # bitsandbytes sets it from a C call: 1 or 0
            module.support_avx512bf16_for_cpu = False
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            nested = state.original_nested
            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
            if not nested:  # bitsandbytes 0.50's inverse restores a nested absmax only; this one stays (in/block x out)
                weight.quant_state.absmax = weight.quant_state.absmax.T.reshape(-1).float()


class QuantLinear(Linear):
    """GiVA on a quantised linear layer: W is read (dequantised) and written (re-quantised) by PEFT's backend."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        layer_name: str,
        block_sizes: list[int],
        adapt_blocks: list[int],
        config: GivaConfig,
        backend: QuantizationBackend,
    ) -> None:
        if config.variant == "weight" and not backend.supports_merge:
            raise ValueError(
                f"GiVA variant 'weight' needs the weight of layer {layer_name!r}, but its {backend.backend_name!r} "
                "quantisation cannot be dequantised by PEFT's backend; use a gradient variant (e.g. variant='VrUr')"
            )
        # Building the adapter may already read W (the `weight` variant's SVD), before Linear.__init__ returns and
        # while GivaLayer.__init__ has reset `quantization_backend`; this attribute is what the accessors below use.
        self._giva_backend = backend
        super().__init__(base_layer, adapter_name, layer_name, block_sizes, adapt_blocks, config, fan_in_fan_out=False)
        self.quantization_backend = backend  # what PEFT (repr, merge helpers) reads

    def get_base_weight(self) -> torch.Tensor:
        """The dequantised ``out x in`` weight (a new tensor: changing it leaves the layer alone).

        A forward-only backend (GPTQ, AWQ...) cannot dequantise: the layer's stored (packed) tensor stands in, as
        only its device is ever read then (merging and the `weight` variant are refused before W is needed).
        """
        if not self._giva_backend.supports_merge:
            return self._base_tensor()
        return self._giva_backend.get_base_weight(self.get_base_layer())

    def set_base_weight(self, weight_data: torch.Tensor) -> None:
        """Re-quantise ``weight_data`` into the base layer (HQQ replaces the base layer)."""
        self._giva_backend.set_base_weight(self, weight_data)

    def extra_repr(self) -> str:
        return quantization_extra_repr(self)

    def __repr__(self) -> str:
        return "giva." + nn.Module.__repr__(self)
