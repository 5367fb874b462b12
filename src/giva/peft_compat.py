"""The one place that touches PEFT internals: adding GIVA to `PeftType`, registering the method, and hooking
GiVA checkpoints into `PeftModel` saving/loading and transformers' `load_adapter` (the logic lives in
`giva.checkpoint`)."""

from __future__ import annotations

import functools
import importlib.abc
import importlib.metadata
import importlib.util
import sys
import types
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any, Optional

from packaging.version import Version

if TYPE_CHECKING:
    from torch import nn

# The oldest PEFT that GiVA works with: 0.21 added the tuner hooks GiVA's checkpoints go through
# (BaseTuner._get_adapter_state_dict / _remap_adapter_state_dict_for_load, absent in 0.20), and 0.18 / 0.19
# also lack BaseTunerLayer.get_base_weight. CI runs the PEFT API tests on exactly this version (tests/peft_min/).
MIN_PEFT_VERSION = "0.21.0"

# The oldest transformers GiVA is tested with: the floor of trl 1.16 (the sft extra), which also takes the ``dtype=``
# GiVA passes to from_pretrained (older 4.x only knew torch_dtype=). CI runs the integration tests on exactly this
# version (tests/transformers_min/); the 4.x differences are handled where they arise (grep "transformers 4.x").
MIN_TRANSFORMERS_VERSION = "4.56.2"


def check_peft_version(installed: Optional[str] = None) -> None:
    """Raise ``ImportError`` naming both versions if the installed PEFT is older than :data:`MIN_PEFT_VERSION`."""
    installed = installed or importlib.metadata.version("peft")
    if Version(installed) < Version(MIN_PEFT_VERSION):
        raise ImportError(
            f"giva needs peft>={MIN_PEFT_VERSION}, but peft {installed} is installed (older versions lack the tuner "
            f"hooks GiVA's layers and checkpoints use). Upgrade: pip install 'peft>={MIN_PEFT_VERSION}'"
        )


check_peft_version()  # before PEFT's internals are imported, so a too-old PEFT fails here with a clear message


class _LazyBitsandbytes(types.ModuleType):
    """Stands for ``bitsandbytes`` in ``peft.helpers``, importing it at the first attribute read."""

    def __getattr__(self, name: str) -> Any:
        return getattr(importlib.import_module("bitsandbytes"), name)


class _RefuseBitsandbytes(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "bitsandbytes" or name.startswith("bitsandbytes."):
            raise ModuleNotFoundError(f"{name} deferred by giva while PEFT imports", name=name)


@contextmanager
def bitsandbytes_deferred() -> Iterator[None]:
    """Import PEFT without importing bitsandbytes, which ``peft.helpers`` tries eagerly.

    bitsandbytes costs seconds of import (it loads torch's inductor) and, on CPUs with AVX512-BF16, logs "Failed
    to load CPU gemm_4bit_forward from kernels-community" on import: GiVA imports it only when a quantised model
    is asked for (PEFT's quantisation backends import it then). ``peft.helpers.bnb`` gets a stand-in that imports
    the real module at first use. A no-op when bitsandbytes is already imported or not installed.
    """
    if "bitsandbytes" in sys.modules or "peft" in sys.modules or importlib.util.find_spec("bitsandbytes") is None:
        yield
        return
    # transformers 4.x asks find_spec("bitsandbytes") (and its metadata) when its import_utils module is imported,
    # which PEFT's import triggers: the finder below would make that raise. Importing it first lets it see the real
    # spec; it does not import bitsandbytes itself, and PEFT imports transformers anyway (no extra import time).
    import transformers.utils.import_utils  # noqa: F401

    finder = _RefuseBitsandbytes()
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        helpers = sys.modules.get("peft.helpers")
        if helpers is not None and getattr(helpers, "bnb", None) is None:
            helpers.bnb = _LazyBitsandbytes("bitsandbytes")


with bitsandbytes_deferred():
    from peft.utils.peft_types import PeftType, register_peft_method  # noqa: E402


# The libraries whose deprecation notices a giva command's user cannot act on (PEFT's call of transformers'
# is_gradient_checkpointing printed a FutureWarning in the middle of every `giva finetune`); giva's own still show.
LIBRARY_MODULES = r"(transformers|peft|trl|accelerate|datasets|torch|flwr|ray)(\.|$)"


@contextmanager
def transformers_errors_only() -> Iterator[None]:
    """transformers' own log at ERROR for the block (its warnings, its weight-loading report among them, off), then
    the caller's verbosity back."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def ignore_library_deprecations() -> None:
    """Inside a caller's ``warnings.catch_warnings()`` (a CLI command, a federated run): FutureWarning and
    DeprecationWarning raised from the code of :data:`LIBRARY_MODULES` are not printed."""
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=LIBRARY_MODULES)


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


def install_checkpoint_hooks(
    save: Callable[..., None],
    checked_load: Callable[[Any, Optional[str], Any], AbstractContextManager],
    forget_checksum: Callable[[Any, str], None],
    load_weights: Callable[..., dict],
    config_differences: Callable[[Any, Any, Optional[str], str], Optional[str]],
    check_existing: Callable[[Any, Any, Optional[str], str], None],
) -> None:
    """Route ``PeftModel`` saving and loading of GiVA adapters through :mod:`giva.checkpoint` (idempotent).

    ``save_pretrained`` of a model holding a GiVA adapter calls ``save(original, model, directory, ...)``;
    models of other methods (LoRA, ...) keep PEFT's own save. ``from_pretrained`` and ``load_adapter`` run
    inside ``checked_load(model_id, subfolder, base_model)``, which only acts on local folders and GiVA configs;
    PEFT's ``load_peft_weights`` there is ``load_weights(original, model_id, ...)`` (it picks the checked file).
    A ``ValueError`` of a load into an adapter that already existed gets ``config_differences(model, model_id,
    subfolder, adapter_name)`` appended, where that names a difference; a load into an existing adapter first runs
    ``check_existing(model, model_id, subfolder, adapter_name)``, which refuses one that would change the checkpoint's
    values, before anything is loaded.
    """
    from peft import PeftModel, peft_model

    if getattr(PeftModel.save_pretrained, "_giva_hook", False):
        return
    original_save = PeftModel.save_pretrained
    original_from_pretrained = PeftModel.from_pretrained.__func__  # type: ignore[attr-defined]
    original_load_adapter = PeftModel.load_adapter

    @functools.wraps(original_save)
    def save_pretrained(self: PeftModel, save_directory: str, *args: Any, **kwargs: Any) -> None:
        if not any(config.peft_type == GIVA_PEFT_TYPE for config in self.peft_config.values()):
            return original_save(self, save_directory, *args, **kwargs)
        return save(original_save, self, save_directory, *args, **kwargs)

    @functools.wraps(original_from_pretrained)
    def from_pretrained(cls: type, model: Any, model_id: Any, adapter_name: str = "default", *args: Any, **kwargs: Any):
        with checked_load(model_id, kwargs.get("subfolder"), model):
            loaded = original_from_pretrained(cls, model, model_id, adapter_name, *args, **kwargs)
        forget_checksum(loaded, adapter_name)
        return loaded

    @functools.wraps(original_load_adapter)
    def load_adapter(self: PeftModel, model_id: Any, adapter_name: str, *args: Any, **kwargs: Any):
        added = adapter_name not in self.peft_config
        if not added:
            check_existing(self, model_id, kwargs.get("subfolder"), adapter_name)
        try:
            with checked_load(model_id, kwargs.get("subfolder"), self.get_base_model()):
                result = original_load_adapter(self, model_id, adapter_name, *args, **kwargs)
        except BaseException as error:
            # PEFT adds the adapter before its weights load: a refused load (another base model's shapes, a
            # checkpoint of another layout) would leave a fresh, half-made adapter behind, which the next save
            # would write. The model is given back as it was.
            if added and adapter_name in self.peft_config:
                try:
                    self.delete_adapter(adapter_name)
                except Exception:  # noqa: BLE001  the load's own error is the one to report
                    pass
            # Only a refusal is explained; the config is read for nothing else (not for a KeyboardInterrupt).
            note = None if added or not isinstance(error, ValueError) else config_differences(
                self, model_id, kwargs.get("subfolder"), adapter_name)
            if note is not None:
                raise _explained(error, note) from error
            raise
        forget_checksum(self, adapter_name)
        return result

    original_load_weights = peft_model.load_peft_weights

    @functools.wraps(original_load_weights)
    def load_peft_weights(model_id: Any, *args: Any, **kwargs: Any) -> dict:
        return load_weights(original_load_weights, model_id, *args, **kwargs)

    for hook in (save_pretrained, from_pretrained, load_adapter, load_peft_weights):
        hook._giva_hook = True  # type: ignore[attr-defined]
    peft_model.load_peft_weights = load_peft_weights
    PeftModel.save_pretrained = save_pretrained
    PeftModel.from_pretrained = classmethod(from_pretrained)
    PeftModel.load_adapter = load_adapter


def _explained(error: ValueError, note: str) -> ValueError:
    """``error`` with ``note`` appended, as the same class where it takes one message."""
    try:
        return type(error)(f"{error} {note}")
    except TypeError:  # a class whose constructor takes other arguments
        return ValueError(f"{error} {note}")


def install_transformers_load_hook(load_adapter: Callable[..., Any]) -> None:
    """Route transformers' ``PreTrainedModel.load_adapter`` (its ``PeftAdapterMixin``, also used by
    ``AutoModel*.from_pretrained`` of an adapter folder) through ``load_adapter(original, model, ...)`` (idempotent).

    transformers loads adapter weights with its own loader, not PEFT's, so the ``PeftModel`` hooks above
    do not see those loads.
    """
    from transformers.integrations.peft import PeftAdapterMixin

    original = PeftAdapterMixin.load_adapter
    if getattr(original, "_giva_hook", False):
        return

    @functools.wraps(original)
    def hooked(self: Any, *args: Any, **kwargs: Any) -> Any:
        return load_adapter(original, self, *args, **kwargs)

    hooked._giva_hook = True  # type: ignore[attr-defined]
    PeftAdapterMixin.load_adapter = hooked


# The name parts torch's FSDP1 and activation-checkpointing wrappers add to ``named_modules()`` (at any depth) and
# that ``state_dict()`` keys leave out. PEFT >= 0.22 strips them itself (``remove_torch_wrapper_names``).
WRAPPER_NAMES = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")


# Module-name parts of PEFT's own wrappers: a tuner layer's ``base_layer``, a ``modules_to_save`` head's
# ``original_module`` and ``modules_to_save.<adapter>`` copies. Not names a user targets, nor a fresh base model has.
PEFT_WRAPPER_PARTS = frozenset({"base_layer", "original_module", "modules_to_save"})


def is_peft_wrapper_name(name: str) -> bool:
    """A module name inside one of PEFT's wrappers (:data:`PEFT_WRAPPER_PARTS`)."""
    return bool(PEFT_WRAPPER_PARTS & set(name.split(".")))


def state_dict_name(module_name: str) -> str:
    """A module's name as the keys of ``state_dict()`` give it: ``module_name`` without torch's wrapper parts."""
    return ".".join(part for part in module_name.split(".") if part not in WRAPPER_NAMES)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP (``.module``), ``torch.compile`` (``._orig_mod``) and similar wrappers.

    FSDP2 (``fully_shard``) does not wrap: it changes the module's class in place, so the model is
    returned as it is.
    """
    from torch import nn  # here: importing this module stays free of torch

    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if isinstance(model, nn.parallel.DistributedDataParallel) or type(model).__name__ in (
            "DataParallel", "DeepSpeedEngine",
        ):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
    return model


def install_lora_conversion(
    convert: Callable[[Any, Any, str], Optional[tuple]],
    convert_model: Callable[..., tuple],
    save_as_lora: Callable[..., None],
) -> None:
    """Make ``peft.convert_to_lora`` / ``peft.save_as_lora`` exact for GiVA models (idempotent).

    PEFT has no per-method hook for this: its module-level ``_convert_module_to_lora`` SVDs ``get_delta_weight``
    for every method but MiSS. The wrapper asks ``convert(module, rank, adapter_name)`` first (exact factors for
    GiVA layers, ``None`` for others) and falls back to PEFT's own conversion. ``convert_to_lora`` and
    ``save_as_lora`` themselves become ``convert_model(original, ...)`` / ``save_as_lora(original, ...)`` (which
    call PEFT's own for models without GiVA layers), wherever PEFT exports them. No-op on PEFT without conversion.
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

    original_convert, original_save = conversion.convert_to_lora, conversion.save_as_lora

    @functools.wraps(original_convert)
    def convert_to_lora(model: Any, rank: Any, *args: Any, **kwargs: Any) -> tuple:
        return convert_model(original_convert, model, rank, *args, **kwargs)

    @functools.wraps(original_save)
    def save_as_lora_hooked(path: Any, model: Any, rank: Any, *args: Any, **kwargs: Any) -> None:
        return save_as_lora(original_save, path, model, rank, *args, **kwargs)

    for hook in (convert_module_to_lora, convert_to_lora, save_as_lora_hooked):
        hook._giva_hook = True  # type: ignore[attr-defined]
    conversion._convert_module_to_lora = convert_module_to_lora
    for name in ("peft", "peft.tuners", "peft.tuners.lora", "peft.tuners.lora.conversion"):
        namespace = sys.modules.get(name)
        if getattr(namespace, "convert_to_lora", None) is original_convert:
            namespace.convert_to_lora = convert_to_lora  # type: ignore[union-attr]
        if getattr(namespace, "save_as_lora", None) is original_save:
            namespace.save_as_lora = save_as_lora_hooked  # type: ignore[union-attr]


def task_model_classes() -> dict[str, Any]:
    """PEFT's task types and the transformers auto class each one's base model loads with: the targets of PEFT's
    ``AutoPeftModelFor*`` classes (``TOKEN_CLS``: ``AutoModelForTokenClassification``, ``FEATURE_EXTRACTION``:
    ``AutoModel``, ...)."""
    from peft import auto

    targets = {
        value._target_peft_class: value._target_class
        for value in vars(auto).values()
        if isinstance(value, type) and getattr(value, "_target_class", None) is not None
    }
    return {task: targets[peft_class] for task, peft_class in auto.MODEL_TYPE_TO_PEFT_MODEL_MAPPING.items() if peft_class in targets}
