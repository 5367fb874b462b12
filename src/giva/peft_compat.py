"""The one place that touches PEFT internals: adding GIVA to `PeftType` and registering the method."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Optional

from peft.utils.peft_types import PeftType, register_peft_method

MIN_PEFT_VERSION = "0.18.0"


def _extend_peft_type(name: str) -> PeftType:
    """Add a member to PEFT's closed `PeftType` enum (PEFT's registry requires one per method)."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType  # type: ignore[attr-defined]
    member._sort_order_ = len(PeftType._member_names_)  # type: ignore[attr-defined]
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)  # type: ignore[attr-defined]
    return member


GIVA_PEFT_TYPE = _extend_peft_type("GIVA")


def register(config_cls: type, model_cls: type) -> None:
    """Register GiVA with PEFT's mappings (idempotent, so re-importing is harmless)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    if PEFT_TYPE_TO_CONFIG_MAPPING.get(GIVA_PEFT_TYPE) is config_cls:
        return
    register_peft_method(name="giva", config_cls=config_cls, model_cls=model_cls, prefix="giva_")


def install_lora_conversion(convert: Callable[[Any, Any, str], Optional[tuple]]) -> None:
    """Make ``peft.convert_to_lora`` / ``peft.save_as_lora`` take GiVA layers' factors from ``convert`` (idempotent).

    PEFT has no per-method hook for this: its module-level ``_convert_module_to_lora`` SVDs ``get_delta_weight``
    for every method but MiSS. The wrapper asks ``convert(module, rank, adapter_name)`` first (exact factors for
    GiVA layers, ``None`` for others) and falls back to PEFT's own conversion. No-op on PEFT without conversion.
    """
    try:
        from peft.tuners.lora import conversion
    except ImportError:
        return
    original = conversion._convert_module_to_lora
    if getattr(original, "_giva_hook", False):
        return

    @functools.wraps(original)
    def convert_module_to_lora(module: Any, rank: Any, adapter_name: str = "default") -> tuple:
        converted = convert(module, rank, adapter_name)
        return original(module, rank, adapter_name) if converted is None else converted

    convert_module_to_lora._giva_hook = True  # type: ignore[attr-defined]
    conversion._convert_module_to_lora = convert_module_to_lora
