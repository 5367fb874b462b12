"""The PEFT tuner: which modules get a GiVA layer, how, and what a checkpoint holds."""

from __future__ import annotations

import copy
import logging
import re
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import (
    BaseTuner,
    BaseTunerLayer,
    _get_in_out_features,
    _maybe_include_all_linear_layers,
    check_target_module_exists,
)
from peft.utils import TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING
from peft.utils.constants import INCLUDE_LINEAR_LAYERS_SHORTHAND
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn
from transformers.pytorch_utils import Conv1D

from .bases import SEEDED_B_VARIANTS
from .config import DEFAULT_TARGET_MODULES, GivaConfig
from .layer import GivaLayer, Linear, values_crc32
from .peft_compat import is_peft_wrapper_name, state_dict_name
from .quant import QuantLinear, keep_4bit_layers_trainable, quantization_backend
from .serving import BASE_ADAPTER_NAME, generation_rows_per_input, mixed_batch_hooks

# Fused projections recognised without `block_sizes` (name -> how to split the outputs).
_EQUAL_SPLIT_FUSED = {"gate_up_proj": 2}
# Every tensor a GiVA layer saves, per adapter.
_GIVA_TENSORS = ("giva_A", "giva_B", "giva_lambda_s", "giva_lambda_o", "giva_core")
# Checkpoint entry (one int64 per layer) holding the CRC32 of the bases a checkpoint omits because they are
# regenerated from (seed, layer name): a different regeneration is caught at load instead of changing outputs.
SEEDED_CHECKSUM = "giva_seeded_crc32"
# TRL's DPO/KTO/GRPO/RLOO trainers, given a PeftModel and no ref_model, call model.add_adapter(REFERENCE_ADAPTER,
# model.peft_config[REFERENCE_SOURCE]) (the same config object) and copy the parameters named ".default." into it.
REFERENCE_ADAPTER, REFERENCE_SOURCE = "ref", "default"

logger = logging.getLogger(__name__)


def _lookup(mapping: dict[str, Any], module_key: str) -> Optional[Any]:
    """The entry of ``mapping`` whose key equals ``module_key`` or is a dotted suffix of it; of several, the most
    specific (longest) key, whatever the dict's order: ``{'c_attn': [0, 2], 'h.1.attn.c_attn': [0]}`` gives layer 1
    ``[0]``."""
    matches = [name for name in mapping if module_key == name or module_key.endswith("." + name)]
    return mapping[max(matches, key=len)] if matches else None


def _block_sizes_hint(module_key: str) -> str:
    leaf = module_key.rsplit(".", 1)[-1]
    return (
        f"pass GivaConfig(block_sizes={{{leaf!r}: [size, ...]}}) with the output size of each fused matrix, or "
        f"block_sizes={{{leaf!r}: 1}} to treat the layer as one matrix"
    )


def _equal_blocks(n_blocks: int, out_features: int, module_key: str) -> list[int]:
    if out_features % n_blocks:
        raise ValueError(
            f"cannot split the {out_features} outputs of {module_key!r} into {n_blocks} equal blocks; "
            + _block_sizes_hint(module_key)
        )
    return [out_features // n_blocks] * n_blocks


def _qkv_sizes(model_config: Any) -> Optional[list[int]]:
    """``[q, k, v]`` output sizes of a fused ``qkv_proj`` from the model config (grouped-query attention included)."""
    heads = getattr(model_config, "num_attention_heads", None)
    hidden = getattr(model_config, "hidden_size", None)
    if not heads or not hidden:
        return None
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    head_dim = getattr(model_config, "head_dim", None) or hidden // heads
    return [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]


def fused_block_sizes(
    module_key: str,
    base_layer: nn.Module,
    out_features: int,
    config: GivaConfig,
    model_config: Any,
    parent: Optional[nn.Module] = None,
) -> list[int]:
    """Output block sizes of a layer: from ``config.block_sizes``, else known fused names, else one block.

    A known fused name whose blocks cannot be derived from the module's role (its parent module, the model
    config) is an error asking for ``block_sizes``, never a guess.
    """
    explicit = _lookup(config.block_sizes, module_key)
    if isinstance(explicit, list):
        return list(explicit)
    if isinstance(explicit, int):
        return _equal_blocks(explicit, out_features, module_key)
    leaf = module_key.rsplit(".", 1)[-1]
    # a Conv1D quantised by transformers (bitsandbytes, HQQ) is a quantised linear layer that names it as source_cls
    was_conv1d = isinstance(base_layer, Conv1D) or _is_subclass(getattr(base_layer, "source_cls", None), Conv1D)
    if leaf == "c_attn" and was_conv1d:
        # GPT-2: self-attention's c_attn stacks Q, K, V; cross-attention's (is_cross_attention) only K, V, its Q
        # being the separate q_attn. The same split on a 4-bit GPT-2, so that its adapter fits the unquantised one.
        n_blocks = 2 if getattr(parent, "is_cross_attention", False) else 3
        in_features = _get_in_out_features(base_layer)[0]
        if out_features != n_blocks * in_features:
            raise ValueError(
                f"{module_key!r} looks like GPT-2's fused c_attn ({n_blocks} blocks of {in_features}), but it has "
                f"{out_features} outputs; " + _block_sizes_hint(module_key)
            )
        return [in_features] * n_blocks
    if leaf in _EQUAL_SPLIT_FUSED:
        return _equal_blocks(_EQUAL_SPLIT_FUSED[leaf], out_features, module_key)
    if leaf == "qkv_proj":
        sizes = _qkv_sizes(model_config)
        if sizes is None or sum(sizes) != out_features:
            raise ValueError(
                f"cannot tell the Q, K, V blocks of fused layer {module_key!r}: it has {out_features} outputs, but the "
                f"model config gives {sizes if sizes else 'no attention sizes'} (num_attention_heads, "
                "num_key_value_heads, head_dim); " + _block_sizes_hint(module_key)
            )
        return sizes
    return [out_features]


def _is_subclass(cls: Any, parent: type) -> bool:
    return isinstance(cls, type) and issubclass(cls, parent)


def _layer_index(key: str, layers_pattern: Any) -> Optional[int]:
    """The layer number ``layers_to_transform`` reads from a module key (the same rule as PEFT's)."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or [])
    regexes = [rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\." for pattern in patterns] or [r".*?\.[^.]*\.(?P<idx>\d+)\."]
    for regex in regexes:
        match = re.match(regex, key)
        if match is not None:
            return int(match["idx"])
    return None


def _wanted_layers(config: GivaConfig) -> list[int]:
    layers = config.layers_to_transform
    return [] if layers is None else [layers] if isinstance(layers, int) else list(layers)


def _giva_layers(model: nn.Module) -> Iterator[tuple[str, GivaLayer]]:
    """The GiVA layers of ``model`` under the names their state-dict keys carry (without FSDP1's or activation
    checkpointing's wrapper parts, which ``named_modules()`` shows and ``state_dict()`` leaves out)."""
    for name, module in model.named_modules():
        if isinstance(module, GivaLayer):
            yield state_dict_name(name), module


def _giva_tensor(key: str) -> Optional[tuple[str, str]]:
    """(layer, tensor name) of a state-dict key holding a GiVA tensor, with or without the adapter name after it."""
    parts = key.split(".")
    index = next((i for i, part in enumerate(parts) if part in _GIVA_TENSORS), None)
    return None if index is None else (".".join(parts[:index]).removeprefix("base_model.model."), parts[index])


def _summarise(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def seeded_bases_checksum(layer: GivaLayer, adapter_name: str, names: tuple[str, ...]) -> int:
    """CRC32 of the bytes of a layer's regenerated bases (fp32, in ``names`` order), as a save records it
    (:meth:`GivaLayer.unmodified_seeded_bases`)."""
    crc = 0
    for name in names:
        crc = values_crc32(getattr(layer, name)._buffers[adapter_name], crc)
    return crc


def _linear_names(model: nn.Module, refused: Mapping[str, str]) -> str:
    """The names (last dotted part) of the model's linear layers that may be targeted, for error messages."""
    leaves = sorted(
        {
            key.rsplit(".", 1)[-1]
            for key, module in model.named_modules()
            if isinstance(module, (nn.Linear, Conv1D)) and not is_peft_wrapper_name(key) and key not in refused
        }
    )
    return _summarise(leaves, 12)


def check_options_match_the_model(config: GivaConfig, model: nn.Module, refused: Optional[Mapping[str, str]] = None) -> None:
    """Before any layer is replaced, options that would be silently ignored are refused, naming them.

    Every name of a listed ``target_modules`` matches a module (PEFT's rule: the module's name or a dotted suffix
    of it; PEFT itself only refuses when no name matches); ``layers_to_transform`` names layers the model has;
    every key of ``block_sizes`` / ``adapt_blocks`` names a module the adapter will adapt ('all-linear' as PEFT
    expands it: not the output layer, an excluded module or one inside PEFT's wrappers), and the blocks they give
    add up to the layer's outputs and exist. A regex string is not checked name by name. ``model`` may be a
    skeleton on the meta device (no weights loaded). ``refused`` names modules the caller cannot adapt
    (:func:`check_targets_before_loading` refuses them): they are not offered among the linear layers.
    """
    refused = refused or {}
    keys = [key for key, _ in model.named_modules()]
    targets = DEFAULT_TARGET_MODULES if config.target_modules is None else config.target_modules
    if targets is not None and not isinstance(targets, str):
        # PEFT's 'all-linear' of a second adapter lists the first one's wrapper parts (a head's modules_to_save copies),
        # which a fresh base model does not have and PEFT never adapts: not names the user gave
        unmatched = sorted(name for name in targets if not is_peft_wrapper_name(name)
                           and not any(key == name or key.endswith("." + name) for key in keys))
        if unmatched:
            raise ValueError(
                f"GivaConfig.target_modules names module(s) {unmatched} that match no module of this model (a name "
                f"matches a module's name or a dotted suffix of it); its linear layers are named "
                f"{_linear_names(model, refused)}"
            )
    wanted = _wanted_layers(config)
    if wanted:
        present = {index for index in (_layer_index(key, config.layers_pattern) for key in keys) if index is not None}
        missing = sorted(set(wanted) - present)
        if missing:
            has = f"layers {min(present)}..{max(present)}" if present else "no numbered layer list"
            raise ValueError(
                f"GivaConfig.layers_to_transform={config.layers_to_transform} names layer(s) {missing} that this "
                f"model does not have (it has {has}"
                + (f" under {config.layers_pattern!r}" if config.layers_pattern else "")
                + ")"
            )
    if not config.block_sizes and not config.adapt_blocks:
        return
    if targets == INCLUDE_LINEAR_LAYERS_SHORTHAND:  # PEFT's own expansion: every linear layer but the output one
        expanded = copy.copy(config)
        expanded.target_modules = INCLUDE_LINEAR_LAYERS_SHORTHAND  # also where it is unset (None)
        expanded = _maybe_include_all_linear_layers(expanded, model)
        expanded.target_modules = {name for name in expanded.target_modules if not is_peft_wrapper_name(name)}
        candidates = [key for key in keys if key and GivaModel._check_target_module_exists(expanded, key)]
    else:  # a targeted module of a type GiVA cannot adapt is refused, with its type, once PEFT reaches it
        candidates = [key for key in keys if key and GivaModel._check_target_module_exists(config, key)]
    for option in ("block_sizes", "adapt_blocks"):
        unknown = [name for name in getattr(config, option) if not any(key == name or key.endswith("." + name) for key in candidates)]
        if unknown:
            raise ValueError(
                f"GivaConfig.{option} names module(s) {unknown} that match no targeted module of this model; keys "
                "are module names or their dotted suffixes (e.g. 'c_attn' or 'h.0.attn.c_attn'), and 'all-linear' "
                "leaves out the output layer, the classifier head and excluded modules"
            )
    for key in candidates:
        _check_blocks(config, model, key)


def _check_blocks(config: GivaConfig, model: nn.Module, key: str) -> None:
    """The blocks ``block_sizes`` / ``adapt_blocks`` give layer ``key`` add up to its outputs and exist: refused
    here, before any layer is built (a `weight` adapter would otherwise take an SVD of W per layer first)."""
    explicit = _lookup(config.adapt_blocks, key)
    if explicit is None and _lookup(config.block_sizes, key) is None:
        return
    module = model.get_submodule(key)
    base_layer = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
    if not isinstance(base_layer, (nn.Linear, Conv1D)):
        return  # refused with its type once PEFT reaches it (or a quantised layer: checked as it is built)
    _, out_features = _get_in_out_features(base_layer)
    parent = model.get_submodule(key.rpartition(".")[0])
    sizes = fused_block_sizes(key, base_layer, out_features, config, getattr(model, "config", None), parent)
    if sum(sizes) != out_features:
        raise ValueError(
            f"GivaConfig.block_sizes gives layer {key!r} blocks {sizes}, which sum to {sum(sizes)}, but the layer has "
            f"{out_features} outputs; " + _block_sizes_hint(key)
        )
    if explicit is not None and max(explicit) >= len(sizes):
        raise ValueError(
            f"GivaConfig.adapt_blocks gives layer {key!r} blocks {list(explicit)}, but it has {len(sizes)} block(s) "
            f"(sizes {sizes}): indices run from 0 to {len(sizes) - 1}"
        )


def check_targets_before_loading(config: GivaConfig, skeleton: nn.Module, refused: Optional[Mapping[str, str]] = None) -> None:
    """:func:`check_options_match_the_model` on the model built from its config without weights
    (``giva.finetune.model_skeleton``), and every module the targets match is one GiVA can wrap: a linear layer,
    Conv1D or a quantised linear layer (:func:`giva.quant.quantization_backend`, the test ``get_peft_model``
    applies; in the skeleton a layer that loads quantised is still an ``nn.Linear``). Without it a module such as
    an embedding or BERT's pooler was refused only once the weights had loaded, with a ``TypeError``.
    ``refused`` maps module names the caller cannot adapt to why (the LM head under TRL's SFTTrainer): a target
    matching one is refused with that reason, and they are not offered among the linear layers."""
    refused = refused or {}
    check_options_match_the_model(config, skeleton, refused)
    targets = DEFAULT_TARGET_MODULES if config.target_modules is None else config.target_modules
    if targets == DEFAULT_TARGET_MODULES:  # 'all-linear' leaves the output layer out and matches only linear layers
        return
    for key, module in skeleton.named_modules():
        if not key or not GivaModel._check_target_module_exists(config, key):
            continue
        if key in refused:
            raise ValueError(f"GivaConfig.target_modules matches {key!r}, {refused[key]}; leave it out (the other "
                             f"linear layers are named {_linear_names(skeleton, refused)})")
        try:
            quantization_backend(module, key, skeleton)
        except TypeError:
            kind = type(module)
            raise ValueError(
                f"GivaConfig.target_modules matches {key!r}, a {kind.__module__}.{kind.__name__}, which GiVA cannot "
                "adapt: it adapts linear layers (torch.nn.Linear, transformers Conv1D and quantised linear layers); "
                f"this model's linear layers are named {_linear_names(skeleton, refused)}"
            ) from None


class GivaModel(BaseTuner):
    """Wraps a transformers model so its targeted linear layers carry GiVA adapters.

    Use through PEFT: ``get_peft_model(model, GivaConfig(...))`` after ``import giva``.
    """

    prefix: str = "giva_"
    tuner_layer_cls = GivaLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING

    def _prepare_adapter_config(self, peft_config: GivaConfig, model_config: dict) -> GivaConfig:
        """``target_modules=None`` means every linear layer (PEFT's 'all-linear': the LM / classifier head
        excluded), not VeRA's per-architecture query/value: on the benchmark's headline task that gave
        GiVA r=8 74.5 % against 71.9 % for query/value (3 seeds each, benchmarks/README.md)."""
        if peft_config.target_modules is None:
            peft_config.target_modules = DEFAULT_TARGET_MODULES
        self._check_options_match_the_model(peft_config)
        return peft_config

    def _prepare_model(self, peft_config: GivaConfig, model: nn.Module) -> None:
        """Before any layer is wrapped: every bitsandbytes 4-bit layer keeps kernels that pass gradients back
        (``giva.quant.keep_4bit_layers_trainable``); a model without one is walked once and left alone."""
        keep_4bit_layers_trainable(model)

    def _check_options_match_the_model(self, config: GivaConfig) -> None:
        check_options_match_the_model(config, self.model)

    @staticmethod
    def _check_target_module_exists(peft_config: GivaConfig, key: str) -> Any:
        """PEFT's matching, plus ``layers_to_transform`` for targets named exactly (as 'all-linear' expands to),
        which PEFT would adapt in every layer."""
        result = check_target_module_exists(peft_config, key)
        wanted = _wanted_layers(peft_config)
        targets = peft_config.target_modules
        if result and wanted and isinstance(targets, (set, list)) and key in targets:
            return _layer_index(key, peft_config.layers_pattern) in wanted
        return result

    def _create_and_replace(
        self,
        peft_config: GivaConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if current_key is None:
            raise ValueError("GiVA needs the module key of every target")
        base_layer = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        # Before anything is built: refuses a layer that is neither linear nor a quantised linear layer PEFT covers.
        backend = quantization_backend(base_layer, current_key, self.model)
        # PEFT's reading of the sizes also covers a DeepSpeed ZeRO-3 partitioned Conv1D (empty weight, `ds_shape`).
        _, out_features = _get_in_out_features(base_layer)
        model_config = getattr(self.model, "config", None)
        block_sizes = fused_block_sizes(current_key, base_layer, out_features, peft_config, model_config, parent)
        adapt_blocks = _lookup(peft_config.adapt_blocks, current_key)
        adapt_blocks = list(range(len(block_sizes))) if adapt_blocks is None else list(adapt_blocks)

        if isinstance(target, GivaLayer):
            target.update_layer(adapter_name, block_sizes, adapt_blocks, peft_config)
            return
        if isinstance(target, BaseTunerLayer):
            raise TypeError(f"{current_key!r} already holds a {type(target).__name__} adapter of another method")
        if backend is not None:
            new_module: Linear = QuantLinear(
                target, adapter_name, current_key, block_sizes, adapt_blocks, peft_config, backend=backend
            )
        else:
            new_module = Linear(
                target,
                adapter_name,
                layer_name=current_key,
                block_sizes=block_sizes,
                adapt_blocks=adapt_blocks,
                config=peft_config,
                fan_in_fan_out=isinstance(base_layer, Conv1D),
            )
        new_module.train(target.training)  # a fresh module would otherwise be in train mode in an eval model
        if adapter_name not in self.active_adapters:
            # An additional adapter is not trainable until it is made active.
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        if adapter_name == BASE_ADAPTER_NAME:  # its rows of a mixed batch would get this adapter, not the base model
            raise ValueError(f"adapter name {BASE_ADAPTER_NAME!r} is PEFT's name for the base model in mixed batches "
                             "(adapter_names=[...]); give the adapter another name")
        existing = {id(module) for module in model.modules() if isinstance(module, GivaLayer)}
        # PEFT wraps modules_to_save / trainable tokens last and may still refuse there (a missing token target).
        wrappers = {id(module): list(module.active_adapters)
                    for module in model.modules() if isinstance(module, AuxiliaryTrainingWrapper)}
        targeted = list(self.targeted_module_names)
        trainable = [(param, param.requires_grad) for param in model.parameters()]
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
            self._drop_wrapper_targets(adapter_name)
            self._mirror_reference_adapter(adapter_name)
        except Exception:
            self._withdraw_failed_adapter(model, adapter_name, existing, trainable, wrappers)
            self.targeted_module_names[:] = targeted
            raise

    def _drop_wrapper_targets(self, adapter_name: str) -> None:
        """PEFT's 'all-linear' of a second adapter lists the modules inside the first one's wrappers (a head's
        ``modules_to_save`` copies), which it never adapts: kept in the config, they were saved, and a fresh base
        model has no such module (:func:`check_options_match_the_model` refused the folder)."""
        config = self.peft_config.get(adapter_name)
        targets = getattr(config, "target_modules", None)
        if isinstance(targets, set) and any(is_peft_wrapper_name(name) for name in targets):
            config.target_modules = {name for name in targets if not is_peft_wrapper_name(name)}

    @staticmethod
    def _withdraw_failed_adapter(
        model: nn.Module, adapter_name: str, existing: set[int], trainable: list[tuple[nn.Parameter, bool]],
        wrappers: Optional[dict[int, list[str]]] = None,
    ) -> None:
        """Undo an injection refused part-way (a layer too small for the variant, a `weight` adapter on a merged
        layer, a missing ``trainable_token_indices`` target...): PEFT then only drops the config, so the layers already
        built would keep the adapter's tensors and the next save of another adapter would write them. Each GiVA layer
        holding ``adapter_name`` loses it (:meth:`GivaLayer.delete_adapter`: bases, shared-basis entries, vectors,
        caches); a layer wrapped by this injection becomes the module it wrapped again; so does each
        modules_to_save / trainable-tokens wrapper created by it, and one that existed before (``wrappers``: id ->
        its active adapters then) drops ``adapter_name``; ``requires_grad`` flags are restored."""
        wrappers = wrappers or {}
        for name, module in list(model.named_modules()):
            if not isinstance(module, AuxiliaryTrainingWrapper):
                continue
            if id(module) in wrappers:
                if adapter_name in module._get_available_adapters():
                    module.delete_adapter(adapter_name, wrappers[id(module)])
            else:
                parent_name, _, child_name = name.rpartition(".")
                setattr(model.get_submodule(parent_name), child_name, module.original_module)
        for name, module in list(model.named_modules()):
            if not isinstance(module, GivaLayer):
                continue
            holds = adapter_name in module.r or any(
                adapter_name in getattr(module, attr) for attr in (*module.basis_names, *module.adapter_layer_names)
            )
            if id(module) not in existing:
                parent_name, _, child_name = name.rpartition(".")
                setattr(model.get_submodule(parent_name), child_name, module.base_layer)
            elif holds:
                module.delete_adapter(adapter_name)
        for param, requires_grad in trainable:
            param.requires_grad_(requires_grad)

    def _mirror_reference_adapter(self, adapter_name: str) -> None:
        """TRL's reference adapter starts as an exact copy of "default" (the initial policy).

        TRL's DPO/KTO/GRPO/RLOO trainers add ``"ref"`` with the very config object of ``"default"`` and then copy the
        parameters whose names contain ``".default."``: GiVA's vectors (``...giva_lambda_o.default``) do not match, and
        its bases are buffers, so without this the reference would be the base model. Only that pattern is mirrored
        (the name ``"ref"`` and the identical config object); any other adapter, shared config or not, is fresh. A
        ``"default"`` not yet initialised (zero bases, lambda_o = 0) gives an identity copy, which is the right
        reference then: the initial policy is the base model (``GivaInitCallback`` leaves such a mirror alone).
        """
        source = self.peft_config.get(REFERENCE_SOURCE)
        if adapter_name != REFERENCE_ADAPTER or source is None or self.peft_config.get(adapter_name) is not source:
            return
        layers = [layer for _, layer in self.giva_layers() if {REFERENCE_SOURCE, adapter_name} <= set(layer.giva_lambda_o)]
        for layer in layers:
            layer.copy_adapter(REFERENCE_SOURCE, adapter_name)
        self.giva_mirrors[adapter_name] = REFERENCE_SOURCE
        logger.info(
            "GiVA: adapter %r was added with the config object of %r (TRL's frozen reference adapter): it starts as a "
            "copy of %r on %d layers (bases, vectors, core)", adapter_name, REFERENCE_SOURCE, REFERENCE_SOURCE, len(layers),
        )

    @property
    def giva_mirrors(self) -> dict[str, str]:
        """Adapters made copies of another at creation (:meth:`_mirror_reference_adapter`): name -> source."""
        mirrors = self.__dict__.get("_giva_mirrors")
        if mirrors is None:
            mirrors = self.__dict__["_giva_mirrors"] = {}
        return mirrors

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.giva_mirrors.pop(adapter_name, None)

    def giva_layers(self) -> Iterator[tuple[str, GivaLayer]]:
        """All GiVA layers of the model with their module names."""
        for name, module in self.model.named_modules():
            if isinstance(module, GivaLayer):
                yield name, module

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any):
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        # The model's adapters (each has GiVA layers: PEFT refuses one that matches none); walking every layer's
        # adapters here would cost layers x adapters per forward, which a decoding step waits for.
        known = set(self.peft_config)
        hooked = (GivaLayer, AuxiliaryTrainingWrapper)
        # A forward's keywords or generate's: the names fit either layout (generation_rows_per_input).
        rows_per_input = generation_rows_per_input(self.model, kwargs)
        with mixed_batch_hooks(self, adapter_names, known, hooked, rows_per_input):
            yield

    @staticmethod
    def _regenerable_bases(config: GivaConfig) -> tuple[str, ...]:
        """Basis names a checkpoint can omit because they regenerate bit-exactly from (seed, layer name)."""
        if config.variant == "random":
            return ("giva_A", "giva_B")
        return ("giva_B",) if config.variant in SEEDED_B_VARIANTS else ()

    @classmethod
    def _get_adapter_state_dict(
        cls,
        model: nn.Module,
        config: GivaConfig,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
        unwanted_adapter_names: list[str],
    ) -> dict[str, torch.Tensor]:
        to_return = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        if config.variant == "weight":
            # An adapter built for loading defers its SVD to first use; saving before that must not write zeros.
            for name, module in _giva_layers(model):
                if adapter_name in module.giva_A:
                    module.ensure_bases(adapter_name)
                    for basis in module.basis_names:
                        key = f"{name}.{basis}.{adapter_name}"
                        if key in to_return:
                            to_return[key] = getattr(module, basis)[adapter_name].detach()
        regenerable = cls._regenerable_bases(config)
        if regenerable:
            # A seeded basis is omitted (and its CRC32 recorded) only where it still is what regeneration gives: one
            # written since (set_block_bases, a state-dict load) is saved like a data-dependent one, and a load uses it.
            for name, module in _giva_layers(model):
                if adapter_name in module.giva_A:
                    omitted, crc = module.unmodified_seeded_bases(adapter_name, config, regenerable)
                    for basis in omitted:
                        to_return.pop(f"{name}.{basis}.{adapter_name}", None)
                    if omitted:
                        to_return[f"{name}.{SEEDED_CHECKSUM}.{adapter_name}"] = torch.tensor(crc, dtype=torch.int64)
        return to_return

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: GivaConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        suffix = "." + SEEDED_CHECKSUM
        checksums = {k.removesuffix(suffix): int(v) for k, v in state_dict.items() if k.endswith(suffix)}
        state_dict = {k: v for k, v in state_dict.items() if not k.endswith(suffix)}
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        own = model.state_dict()
        cls._check_checkpoint_covers_the_model(model, config, adapter_name, remapped, own)
        for key, value in remapped.items():
            if key in own and own[key].shape != value.shape:
                layer = key.rsplit(".giva_", 1)[0].removeprefix("base_model.model.")
                raise ValueError(
                    f"GiVA adapter {adapter_name!r} does not fit this base model: layer {layer!r} has "
                    f"{key.rsplit('.', 2)[-2]} of shape {tuple(own[key].shape)} here but {tuple(value.shape)} in the "
                    "checkpoint. Load it into the base model it was trained on."
                )
        # Seeded bases the checkpoint omits: the freshly built layers already regenerated them. One it holds (written
        # after creation) is loaded as saved.
        regenerable = cls._regenerable_bases(config)
        omitted = {
            name: (module, tuple(basis for basis in regenerable if f"{name}.{basis}.{adapter_name}" not in remapped))
            for name, module in _giva_layers(model)
            if adapter_name in module.giva_A
        }
        regenerated = tuple(f".{name}.{adapter_name}" for name in regenerable)
        for key, value in own.items():
            if key.endswith(regenerated) and key not in remapped:
                remapped[key] = value
        cls._verify_seeded_bases(model, config, adapter_name, checksums, omitted)
        return remapped

    @classmethod
    def _check_checkpoint_covers_the_model(
        cls,
        model: nn.Module,
        config: GivaConfig,
        adapter_name: str,
        remapped: dict[str, torch.Tensor],
        own: dict[str, torch.Tensor],
    ) -> None:
        """The checkpoint holds every GiVA tensor of this adapter the model has, and none for layers it lacks.

        PEFT would only warn about missing keys (a missing basis stays zero and outputs change) and drop
        unexpected ones (an adapter for a deeper model loads into a shallower one, silently).
        """
        stored = tuple(name for name in _GIVA_TENSORS if name not in cls._regenerable_bases(config))
        # this adapter's GiVA tensors in the model: key -> (layer, tensor name)
        mine = {key: named for key in own if key.endswith("." + adapter_name) and (named := _giva_tensor(key))}
        expected = [key for key, (_, name) in mine.items() if name in stored]
        # checkpoint tensors this model has no place for (PEFT 0.22 leaves their keys without the adapter name)
        unknown = [(key, named) for key in remapped if key not in own and (named := _giva_tensor(key))]
        layers = {layer for layer, _ in mine.values()}
        # a tensor of a layer the adapter has, which its config does not make: the r x r core of GivaConfig(core=True)
        unmade = sorted({name for _, (layer, name) in unknown if layer in layers})
        if unmade:
            made_by = " (the r x r core of GivaConfig(core=True))" if unmade == ["giva_core"] else ""
            raise ValueError(
                f"GiVA checkpoint of adapter {adapter_name!r} holds {', '.join(unmade)}{made_by}, which this adapter's "
                f"config does not make (core={config.core}): it was saved with another GivaConfig, the one beside it"
            )
        extra = sorted({layer for _, (layer, _) in unknown})
        if extra:
            raise ValueError(
                f"GiVA checkpoint of adapter {adapter_name!r} holds tensors for layer(s) this model does not have: "
                f"{_summarise(extra)}. It was saved from another base model (another depth or architecture); load it "
                "into that one."
            )
        missing = [key for key in expected if key not in remapped]
        if missing:
            by_layer: dict[str, list[str]] = {}
            for key in missing:
                layer, name = mine[key]
                by_layer.setdefault(layer, []).append(name)
            described = [f"{layer} ({', '.join(names)})" for layer, names in by_layer.items()]
            raise ValueError(
                f"GiVA checkpoint of adapter {adapter_name!r} lacks tensors this model needs: {_summarise(described)}. "
                "The checkpoint is incomplete, or was saved from another base model / config (e.g. fewer layers)."
            )
        unadapted = sorted(
            key.removeprefix("base_model.model.")
            for key, module in ((state_dict_name(name), module) for name, module in model.named_modules())
            if isinstance(module, (nn.Linear, Conv1D))
            and not isinstance(module, GivaLayer)
            and not key.endswith(".base_layer")
            and cls._check_target_module_exists(config, key.removeprefix("base_model.model."))
        )
        if unadapted:
            raise ValueError(
                f"GiVA adapter {adapter_name!r} targets layer(s) of this model that the checkpoint does not adapt: "
                f"{_summarise(unadapted)}. It was saved from another base model (e.g. fewer layers)."
            )

    @classmethod
    def _verify_seeded_bases(
        cls,
        model: nn.Module,
        config: GivaConfig,
        adapter_name: str,
        checksums: dict[str, int],
        omitted: Optional[dict[str, tuple[GivaLayer, tuple[str, ...]]]] = None,
    ) -> None:
        """Compare the regenerated seeded bases with the checksums the saving run recorded.

        ``omitted``: per layer (module name), the layer and the seeded bases the checkpoint lacks (default: all of
        them); a basis the checkpoint holds is loaded as saved and not checked.
        """
        regenerable = cls._regenerable_bases(config)
        if not regenerable:
            return
        if omitted is None:
            omitted = {
                name: (module, regenerable)
                for name, module in _giva_layers(model)
                if adapter_name in module.giva_A
            }
        layers = {name.removeprefix("base_model.model."): entry for name, entry in omitted.items() if entry[1]}
        if not layers:
            return  # the checkpoint holds every seeded basis: nothing is regenerated
        recorded = {key.removeprefix("base_model.model."): crc for key, crc in checksums.items()}
        if not recorded:
            warnings.warn(
                f"GiVA checkpoint of adapter {adapter_name!r} records no checksum of its seeded bases (saved by an "
                "older giva): their regeneration cannot be verified."
            )
            return
        differing = [
            name
            for name, (layer, names) in layers.items()
            if name in recorded and seeded_bases_checksum(layer, adapter_name, names) != recorded[name]
        ]
        if differing:
            raise ValueError(
                f"GiVA adapter {adapter_name!r}: the seeded bases ({', '.join(regenerable)}, seed {config.seed}) of "
                f"layer(s) {_summarise(differing)} regenerate differently here than in the run that saved the "
                "checkpoint (checksum mismatch), so its outputs would change. Either another giva version regenerates "
                "them differently (load it with the giva version that saved it), or the checkpoint was saved by an "
                "older giva from an adapter whose seeded basis was modified after creation (set_block_bases, a "
                "state-dict load): that giva omitted the written basis, which is lost; train or initialise it again."
            )
