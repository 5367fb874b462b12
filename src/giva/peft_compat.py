"""The one place that touches PEFT internals: adding GIVA to `PeftType` and registering the method."""

from __future__ import annotations

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
