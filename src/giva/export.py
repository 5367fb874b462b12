"""GiVA -> LoRA with the exact factors, so any LoRA server can serve a GiVA adapter.

For every adapted block ``delta_W = diag(lambda_o) B diag(lambda_s) A`` already is a rank-``r``
product, so no SVD is needed::

    lora_A = diag(lambda_s) A      (R x in)
    lora_B = diag(lambda_o) B (C)  (out x R, zero rows for outputs no block adapts; C: the opt-in core)
    lora_alpha = r                 (LoRA scaling alpha / r = 1)

A fused layer (GPT-2 ``c_attn``, ``qkv_proj``) with several adapted blocks becomes one LoRA of rank
``R = sum r_j`` whose factors are block-diagonal (LoRA has no per-block rank). ``transformers``'
``Conv1D`` needs no transposition: PEFT's LoRA keeps ``lora_A``/``lora_B`` as ``nn.Linear`` weights
(``r x in``, ``out x r``) for it too and only transposes the merged ``delta_W``.

PEFT's own ``peft.convert_to_lora`` / ``peft.save_as_lora`` use these factors for GiVA layers (see
:func:`giva.peft_compat.install_lora_conversion`). :func:`export_lora` also writes a config every LoRA
server reads: one rank for every layer (smaller layers zero-padded), ``lora_alpha = r``, and the
exported layers as ``target_modules``.

``modules_to_save`` (a classification head) is exported under the names PEFT's LoRA loader expects, module by
module (``classifier.dense.weight`` and ``classifier.out_proj.weight`` of a RoBERTa head stay two modules), and
only the exported adapter's own copy: PEFT's generic conversion flattens nested heads and takes whichever
adapter's head comes last. Both are fixed by :func:`convert_to_lora`, which PEFT's ``convert_to_lora`` /
``save_as_lora`` call for models holding GiVA adapters.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from peft import LoraConfig, PeftModel
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from peft.utils.other import ModulesToSaveWrapper
from safetensors.torch import save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import peft_compat
from .checkpoint import (
    PEFT_PREFIX,
    CheckpointError,
    atomic_directory,
    checked_adapter_tensors,
    embedding_layers,
    embedding_parameter,
    is_side_file,
)
from .layer import GivaLayer
from .peft_compat import is_peft_wrapper_name, state_dict_name, unwrap_model

logger = logging.getLogger(__name__)


class ExportError(ValueError):
    """The adapter cannot be exported to LoRA as asked (merged, unknown adapter, bad folder or option)."""


def lora_factors(layer: GivaLayer, adapter_name: str, rank: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact LoRA factors of one layer, in fp32: ``lora_A`` (``rank x in``) and ``lora_B`` (``out x rank``).

    ``lora_B @ lora_A`` equals ``delta_W`` (``out x in``, whatever the base layer's storage layout). ``rank``
    defaults to the adapter's rank ``R`` on this layer; a larger one pads with zeros, a smaller one is refused
    (the exact product needs ``R``).
    """
    if adapter_name not in layer.giva_lambda_o:
        raise ExportError(f"layer {layer.layer_name!r} has no GiVA adapter {adapter_name!r}")
    if adapter_name in layer.merged_adapters:
        raise ExportError(
            f"GiVA adapter {adapter_name!r} is merged into layer {layer.layer_name!r}; call unmerge_adapter() before "
            "exporting it, or the LoRA would apply it a second time"
        )
    layer.ensure_bases(adapter_name)
    a = layer.giva_A[adapter_name].float()  # R x in
    lambda_s = layer.giva_lambda_s[adapter_name].detach().float().to(a.device)
    lora_a = lambda_s[:, None] * a  # R x in
    lora_b = layer.output_factor(adapter_name).detach().to(a.device)  # O x R: diag(lambda_o) B (C)
    if adapter_name in layer.giva_out_index:
        # Outputs of blocks this adapter does not touch get zero rows.
        full = lora_b.new_zeros(layer.out_features, lora_b.shape[1])
        lora_b = full.index_copy_(0, layer.giva_out_index[adapter_name], lora_b)
    exact = lora_a.shape[0]
    rank = exact if rank is None else rank
    if rank < exact:
        raise ExportError(f"layer {layer.layer_name!r} needs LoRA rank >= {exact} to hold GiVA adapter {adapter_name!r} exactly")
    if rank > exact:
        lora_a = torch.cat([lora_a, lora_a.new_zeros(rank - exact, lora_a.shape[1])])
        lora_b = torch.cat([lora_b, lora_b.new_zeros(lora_b.shape[0], rank - exact)], dim=1)
    return lora_a.contiguous(), lora_b.contiguous()


def convert_module(module: nn.Module, rank: Union[int, float], adapter_name: str) -> Optional[tuple[torch.Tensor, torch.Tensor, int]]:
    """PEFT's per-layer conversion step for GiVA layers (``None`` for other layers).

    An int ``rank`` at least the layer's GiVA rank pads to it; a smaller one, or a float (PEFT's energy
    threshold), keeps the layer's exact rank, which PEFT then records in ``rank_pattern``.
    """
    if not isinstance(module, GivaLayer):
        return None
    if adapter_name not in module.giva_lambda_o:
        # A layer that only other adapters adapt: rank 0, which PEFT records in ``exclude_modules``.
        empty = module.giva_lambda_o[next(iter(module.giva_lambda_o))].new_zeros(0)
        return empty.new_zeros(0, module.in_features), empty.new_zeros(module.out_features, 0), 0
    exact = module.giva_A[adapter_name].shape[0]
    target = rank if isinstance(rank, int) and rank >= exact else exact
    lora_a, lora_b = lora_factors(module, adapter_name, target)
    return lora_a, lora_b, target


def _giva_layers(model: nn.Module, adapter_name: str) -> dict[str, GivaLayer]:
    """The GiVA layers holding ``adapter_name``, keyed by their name in the base model (as its ``state_dict()`` keys
    give it: without FSDP1's or activation checkpointing's wrapper parts)."""
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, GivaLayer) and adapter_name in module.giva_lambda_o:
            layers[state_dict_name(name).removeprefix(PEFT_PREFIX)] = module
    return layers


def _target_modules(model: nn.Module, exported: set[str]) -> list[str]:
    """Leaf names (``q_proj``...) when they select exactly the exported layers, else the full module names.

    A leaf name selects every module of the base model so named, of any type, as PEFT's LoRA matches it (a vision
    tower's ``Conv3d`` ``proj`` beside the adapted linear ``proj`` was loaded as a LoRA layer the file lacks):
    the modules are read as a fresh base model has them, without PEFT's wrappers (a GiVA layer's ``base_layer``, a
    head's ``modules_to_save`` copies) or torch's."""
    leaves = {name.rsplit(".", 1)[-1] for name in exported}
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    selected = set()
    for name, _ in base.named_modules():
        fresh = ".".join(part for part in state_dict_name(name).split(".") if part != "original_module")
        if name and fresh.rsplit(".", 1)[-1] in leaves and not is_peft_wrapper_name(fresh):  # a GiVA layer's base, a head copy
            selected.add(fresh)
    return sorted(leaves) if selected == exported else sorted(exported)


def _peft_keys(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict``'s keys as a ``PeftModel`` saves them: without torch's wrapper parts (activation checkpointing),
    and with PEFT's ``base_model.model.`` prefix for a model whose adapters were injected without a ``PeftModel``
    (``peft.inject_adapter_in_model``, transformers' ``load_adapter``), whose keys PEFT's LoRA loader would not find
    (every LoRA layer left at zero, with a missing-keys warning)."""
    prefix = "" if isinstance(model, PeftModel) else PEFT_PREFIX
    return {prefix + state_dict_name(key): value for key, value in state_dict.items()}


def _holds_giva(model: nn.Module) -> bool:
    return any(isinstance(module, GivaLayer) for module in model.modules())


def _adapter_names(model: nn.Module) -> list[str]:
    return sorted({name for module in model.modules() if isinstance(module, GivaLayer) for name in module.giva_lambda_o})


def _check_adapter(model: nn.Module, adapter_name: str) -> dict[str, GivaLayer]:
    layers = _giva_layers(model, adapter_name)
    if not layers:
        raise ExportError(
            f"the model holds no GiVA adapter named {adapter_name!r} (it holds: {', '.join(_adapter_names(model)) or 'none'})"
        )
    return layers


def _check_rank(rank: Any, needed: int, adapter_name: str) -> int:
    """The one LoRA rank of an export: an int at least the largest GiVA rank (exact factors need it)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < max(needed, 1):
        raise ExportError(
            f"rank must be an int >= {needed} (the largest GiVA rank of adapter {adapter_name!r}), got {rank!r}"
        )
    return rank


def _heads(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """``adapter_name``'s copy of every ``modules_to_save`` module, keyed as PEFT's LoRA loader expects.

    PEFT saves ``<wrapper>.modules_to_save.<adapter>.<path in the module>`` as ``<wrapper>.<path in the module>``;
    the path keeps nested submodules (``classifier.dense.weight``).
    """
    heads = {}
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            for key, value in module.modules_to_save[adapter_name].state_dict().items():
                heads[f"{name}.{key}"] = value.detach()
    return _peft_keys(model, heads)


def convert_to_lora(
    original: Callable[..., tuple[LoraConfig, dict[str, torch.Tensor]]],
    model: nn.Module,
    rank: Union[int, float],
    adapter_name: str = "default",
    progressbar: bool = False,
    compile_kwargs: Optional[dict] = None,
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """PEFT's ``convert_to_lora`` for a model holding GiVA adapters (``original`` is PEFT's own function).

    Checked before any work: ``adapter_name`` exists, ``rank`` is an int >= 1 or a float in (0, 1] (PEFT's
    meanings; every layer keeps its exact GiVA factors either way). Layers that only other adapters adapt are
    skipped, and the state dict holds this adapter's own ``modules_to_save`` with their nested names.
    """
    if not _holds_giva(model):
        return original(model, rank, adapter_name=adapter_name, progressbar=progressbar, compile_kwargs=compile_kwargs)
    model = unwrap_model(model)  # torch.compile's keys all began with _orig_mod.: a LoRA PEFT loads as a no-op
    layers = _check_adapter(model, adapter_name)
    if isinstance(rank, bool) or not isinstance(rank, (int, float)) or not (rank >= 1 if isinstance(rank, int) else 0 < rank <= 1):
        raise ExportError(f"rank must be an int >= 1 or a float in (0, 1] (an energy threshold), got {rank!r}")
    config = getattr(model, "peft_config", {}).get(adapter_name)
    if config is not None:
        _check_exportable(vars(config), f"GiVA adapter {adapter_name!r}")
    lora_config, state_dict = original(
        model, rank, adapter_name=adapter_name, progressbar=progressbar, compile_kwargs=compile_kwargs
    )
    state_dict = _peft_keys(model, {k: v for k, v in state_dict.items() if k.endswith((".lora_A.weight", ".lora_B.weight"))})
    heads = _heads(model, adapter_name)
    state_dict.update(heads)
    # the layers exported, named as a fresh base model has them (PEFT's names keep torch's wrapper parts, and its leaf
    # names dropped GiVA's exclude_modules: an excluded layer got a LoRA the file lacks)
    lora_config.target_modules = _target_modules(model, set(layers))
    lora_config.modules_to_save = list(config.modules_to_save or []) if heads and config is not None else None
    if config is not None:
        lora_config.task_type = config.task_type
    return lora_config, state_dict


def _check_exportable(config: dict[str, Any], source: str) -> None:
    """Refuse, before any work, the options whose trained state a LoRA export cannot carry (``source`` names the
    adapter or its config file).

    ``bias`` other than ``"none"`` trains the base model's biases and ``trainable_token_indices`` rows of an embedding
    layer: neither is a low-rank delta. PEFT's ``convert_to_lora`` refuses both (a ``ValueError`` for the bias, a
    ``TypeError`` naming ``TrainableTokensLayer``), but ``giva export-lora`` reached it only after loading the base
    model, and the ``TypeError`` came out as a traceback.
    """
    bias = config.get("bias") or "none"
    if bias != "none":
        raise ExportError(
            f"{source} sets bias={bias!r}: the trained biases of the base model are no low-rank delta, and PEFT's LoRA "
            "conversion refuses them, so a LoRA export cannot reproduce this adapter; train with bias='none' to export "
            "it, or serve the GiVA adapter itself"
        )
    tokens = config.get("trainable_token_indices")
    if tokens is not None:
        raise ExportError(
            f"{source} sets trainable_token_indices={tokens!r}: the trained embedding rows are no low-rank delta, and "
            "PEFT's LoRA conversion refuses them, so a LoRA export cannot reproduce this adapter; train without "
            "trainable_token_indices to export it, or serve the GiVA adapter itself"
        )


def _peft_convert_to_lora(model: nn.Module, rank: Union[int, float], adapter_name: str) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """PEFT's ``convert_to_lora`` as installed (with GiVA's hooks), looked up at call time."""
    from peft.tuners.lora import conversion

    return conversion.convert_to_lora(model, rank=rank, adapter_name=adapter_name)


def to_lora(model: PeftModel, adapter_name: str = "default", rank: Optional[int] = None) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The LoRA config and state dict of GiVA adapter ``adapter_name`` (exact factors, one rank for every layer).

    ``rank`` defaults to the largest per-layer GiVA rank (``r``, or ``sum r_j`` on fused layers); every layer is
    zero-padded to it, so servers that take a single rank (vLLM's ``max_lora_rank``) accept the result.
    """
    model = unwrap_model(model)
    layers = _check_adapter(model, adapter_name)
    needed = max(layer.giva_A[adapter_name].shape[0] for layer in layers.values())
    rank = _check_rank(needed if rank is None else rank, needed, adapter_name)
    lora_config, state_dict = _peft_convert_to_lora(model, rank, adapter_name)
    lora_config.rank_pattern, lora_config.alpha_pattern = {}, {}
    lora_config.layers_to_transform, lora_config.layers_pattern = None, None
    lora_config.exclude_modules = None
    lora_config.fan_in_fan_out = all(isinstance(layer.get_base_layer(), Conv1D) for layer in layers.values())
    return lora_config, state_dict


# The first line of the README.md every export writes (giva 0.1 wrote it too): what marks a folder as an earlier
# export, the one kind of adapter folder an export replaces.
_EXPORT_MARK = "# LoRA export of a GiVA adapter"


def _written_by_export(out: Path) -> bool:
    """Whether ``out`` holds a LoRA a giva export wrote: its README.md starts with :data:`_EXPORT_MARK`.

    A user's own LoRA (PEFT's ``save_pretrained`` writes a model card starting ``---``) is no export, and neither
    is a folder whose README was replaced; both are refused rather than overwritten. A README is a marker servers
    and the hub leave alone, unlike an extra field in ``adapter_config.json``, which PEFT warns about on every load.
    """
    try:
        with open(out / "README.md", encoding="utf-8") as readme:
            return readme.readline().rstrip("\r\n") == _EXPORT_MARK
    except (OSError, UnicodeDecodeError):
        return False


def _check_output(out: Path) -> None:
    """Refuse, before any work, an output that is a file, read-only, holds an adapter other than an earlier export (a
    GiVA adapter or the user's own LoRA would be lost, with its tokenizer files and labels.json), or is a non-empty
    folder with no adapter at all (its README.md, tokenizer files or labels.json would be replaced). An empty folder,
    or one holding only an older giva's staging folders, is fine."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"output {out} exists and is not a folder")
    if out.is_dir() and (not stat.S_IMODE(out.stat().st_mode) & 0o222 or not os.access(out, os.W_OK)):
        raise ExportError(f"output folder {out} is read-only; make it writable or write the LoRA to another folder")
    existing = next((folder for folder in (out.absolute(), *out.absolute().parents) if folder.exists()), None)
    if existing is not None and existing != out.absolute() and not os.access(existing, os.W_OK):
        raise ExportError(f"cannot create output folder {out}: {existing} is not writable")
    config_file = out / CONFIG_NAME
    # hidden entries (.gitkeep, .DS_Store, .ipynb_checkpoints, an older giva's staging folder) are not the user's files
    if out.is_dir() and not config_file.exists() and any(not p.name.startswith(".") for p in out.iterdir()):
        raise ExportError(f"output folder {out} is not empty and holds no adapter; the export would overwrite its files "
                          "(README.md among them): write the LoRA to a new or empty folder")
    if config_file.exists():
        try:
            peft_type = json.loads(config_file.read_text()).get("peft_type")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            peft_type = "unreadable"
        if peft_type != "LORA":
            raise ExportError(
                f"{config_file} belongs to a {peft_type!r} adapter, which the export would overwrite; write the LoRA "
                "to a new folder (only an earlier LoRA export is replaced)"
            )
        if not _written_by_export(out):
            raise ExportError(
                f"{config_file} belongs to a LoRA adapter that no giva export wrote (its README.md does not start with "
                f"{_EXPORT_MARK!r}), which the export would overwrite, dropping its tokenizer files and labels.json; "
                "write the LoRA to a new folder (only an earlier LoRA export is replaced)"
            )


_README = _EXPORT_MARK + """

Written by giva's exact export: `lora_B @ lora_A` equals the GiVA adapter's `delta_W` on every layer
({ranks}, so LoRA's scaling is 1). It is a stock PEFT LoRA; loading it needs no giva:

```python
{code}
```
"""


def _base_class_name(task_type: Optional[str], base_class: type) -> str:
    """The transformers class the README's snippet loads the base model with: PEFT's auto class of ``task_type``,
    else the base model's own class (``LlamaForCausalLM``) when transformers has it, else ``AutoModel``."""
    classes = peft_compat.task_model_classes()
    if task_type in classes:
        return classes[task_type].__name__
    return base_class.__name__ if base_class.__module__.startswith("transformers") else "AutoModel"


def _auto_mapping(lora_config: LoraConfig, base_class: type) -> Optional[dict[str, str]]:
    """What PEFT's own ``save_pretrained`` records for an adapter without ``task_type``, so that ``AutoPeftModel``
    finds the base model's class for the export as it does for the GiVA folder."""
    if lora_config.task_type is not None:
        return None
    return {"base_model_class": base_class.__name__, "parent_library": base_class.__module__}


def _loading_snippet(out: Path, lora_config: LoraConfig, auto: str, labels: Optional[dict] = None, tokenizer: bool = False,
                     num_labels: Optional[int] = None) -> str:
    """The README's loading code. ``num_labels``: the saved head's class count where the base checkpoint's config has
    another; the base then loads with a new head of that size (the adapter's saved head replaces it), as
    ``giva finetune`` loaded it (:func:`giva.finetune.load_classifier`)."""
    base = lora_config.base_model_name_or_path or "<the base model>"
    lines = ["from peft import PeftModel", f"from transformers import {auto}" + (", AutoTokenizer" if tokenizer else "")]
    if labels:
        lines += ["", "import json", f"labels = json.load(open({str(out / 'labels.json')!r}))",
                  f"base = {auto}.from_pretrained(", f"    {base!r},",
                  "    id2label={int(i): name for i, name in labels['id2label'].items()}, label2id=labels['label2id'],"]
        lines += ["    ignore_mismatched_sizes=True,"] if num_labels is not None else []
        lines.append(")")
    else:
        head = "" if num_labels is None else f", num_labels={num_labels}, ignore_mismatched_sizes=True"
        lines += ["", f"base = {auto}.from_pretrained({base!r}{head})"]
    lines.append(f"model = PeftModel.from_pretrained(base, {str(out)!r}).eval()")
    if tokenizer:
        lines.append(f"tokenizer = AutoTokenizer.from_pretrained({str(out)!r})")
    ranks = (f"r={lora_config.r}, lora_alpha={lora_config.r}" if not lora_config.rank_pattern  # peft.save_as_lora's
             else "each layer's rank in rank_pattern, lora_alpha equal to it")                # float rank sets these
    return _README.format(ranks=ranks, code="\n".join(lines))


def _write_lora(
    out: Path,
    lora_config: LoraConfig,
    state_dict: dict[str, torch.Tensor],
    extra: Optional[Callable[[Path], None]] = None,
    auto_mapping: Optional[dict[str, str]] = None,
) -> None:
    """Write the LoRA folder beside ``out`` and swap it in whole (:func:`giva.checkpoint.atomic_directory`).

    An export killed at any point leaves ``out`` as it was or as the new export, never new weights beside an
    old config. An earlier export's side files (labels, tokenizer) that this one does not write are dropped with
    it, so they never describe another adapter; other files of ``out`` are kept, except a weights file of the
    other format.
    """
    with atomic_directory(out, replaced=is_side_file) as tmp:
        save_file({k: v.detach().contiguous() for k, v in state_dict.items()}, tmp / SAFETENSORS_WEIGHTS_NAME)
        lora_config.save_pretrained(str(tmp), auto_mapping_dict=auto_mapping)
        if extra is not None:
            extra(tmp)
    logger.info("exported LoRA r=%d (%d layers) to %s", lora_config.r, sum(k.endswith(".lora_A.weight") for k in state_dict), out)


def export_lora(model: PeftModel, out_dir: Union[str, Path], adapter_name: str = "default", rank: Optional[int] = None,
                tokenizer: Any = None) -> LoraConfig:
    """Write GiVA adapter ``adapter_name`` as a stock PEFT LoRA folder (``adapter_config.json`` + safetensors +
    a ``README.md`` with the loading code), with ``tokenizer``'s files when one is given (its chat template among
    them), as ``giva export-lora`` copies an adapter folder's.

    ``out_dir`` is created if needed; it may hold an earlier LoRA export (replaced), never another adapter. A model
    whose vocabulary was resized is refused (:func:`_check_model_vocabulary`).
    """
    out = Path(out_dir)
    _check_output(out)
    model = unwrap_model(model)
    base_config = _check_model_vocabulary(model, adapter_name)
    lora_config, state_dict = to_lora(model, adapter_name, rank)
    _write_model_export(out, model, lora_config, state_dict, base_config, tokenizer)
    return lora_config


def _model_labels(config: Any) -> Optional[dict[str, Any]]:
    """A classifier's class names (``config.id2label`` / ``label2id``) as ``labels.json`` holds them, unless they are
    transformers' defaults (``LABEL_0``, ``LABEL_1``, ...), which any load of the base model gives anyway."""
    id2label = getattr(config, "id2label", None) or {}
    if id2label == {i: f"LABEL_{i}" for i in range(len(id2label))}:
        return None
    return {"id2label": {str(i): name for i, name in id2label.items()}, "label2id": dict(config.label2id)}


def _write_model_export(out: Path, model: nn.Module, lora_config: LoraConfig, state_dict: dict[str, torch.Tensor],
                        base_config: Optional[Any] = None, tokenizer: Any = None) -> None:
    """Write the export of a model in memory with its README.md (the loading code, and the mark of an export that a
    later export may replace) and, without ``task_type``, the base model's class in ``auto_mapping``. A SEQ_CLS
    model whose class count is not that of its base checkpoint's config (``base_config``; a 2-class classifier
    fine-tuned to 3 by :func:`giva.finetune.load_classifier`) gets loading code that names its class count, and
    one with class names of its own (``id2label`` not transformers' ``LABEL_i``) a ``labels.json`` that the
    loading code passes on, so that the loaded model predicts the same named labels; both as ``giva export-lora``
    writes them; with a ``tokenizer``, its files and the loading code's tokenizer line."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    classes = getattr(getattr(base, "config", None), "num_labels", None)
    head = lora_config.task_type == "SEQ_CLS" and base_config is not None and classes != base_config.num_labels
    labels = _model_labels(getattr(base, "config", None)) if lora_config.task_type == "SEQ_CLS" else None
    readme = _loading_snippet(out, lora_config, _base_class_name(lora_config.task_type, type(base)), labels,
                              tokenizer=tokenizer is not None, num_labels=classes if head else None)

    def extras(tmp: Path) -> None:
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        (tmp / "README.md").write_text(readme, encoding="utf-8")
        if labels is not None:
            (tmp / "labels.json").write_text(json.dumps(labels, indent=2) + "\n", encoding="utf-8")

    _write_lora(out, lora_config, state_dict, extras, _auto_mapping(lora_config, type(base)))


def save_as_lora(
    original: Callable[..., None],
    path: Union[str, os.PathLike],
    model: nn.Module,
    rank: Union[int, float],
    adapter_name: str = "default",
    progressbar: bool = False,
    compile_kwargs: Optional[dict] = None,
) -> None:
    """PEFT's ``save_as_lora`` for a model holding GiVA adapters: the same checks as ``giva export-lora`` before
    any work (``path`` not a file, not read-only, not another adapter's folder), then one atomic write, with the
    README.md of :func:`export_lora` (so that a later export may replace the folder)."""
    if not _holds_giva(model):
        return original(path, model, rank, adapter_name=adapter_name, progressbar=progressbar, compile_kwargs=compile_kwargs)
    out = Path(path)
    _check_output(out)
    model = unwrap_model(model)
    base_config = _check_model_vocabulary(model, adapter_name)
    from peft.tuners.lora import conversion

    lora_config, state_dict = conversion.convert_to_lora(
        model, rank=rank, adapter_name=adapter_name, progressbar=progressbar, compile_kwargs=compile_kwargs
    )
    _write_model_export(out, model, lora_config, state_dict, base_config)
    return None


def _read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """The config of a saved GiVA folder; anything else is a one-line error. The weights are checked once the base
    model's skeleton is known (:func:`_read_adapter_tensors`)."""
    config_file = adapter_dir / CONFIG_NAME
    if not adapter_dir.is_dir():
        raise ExportError(f"adapter folder {adapter_dir} does not exist")
    if not config_file.is_file():
        raise ExportError(f"{adapter_dir} holds no {CONFIG_NAME}: not a saved adapter folder")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ExportError(f"{config_file} is not valid JSON: {error}") from error
    if not isinstance(config, dict) or config.get("peft_type") != "GIVA":
        peft_type = config.get("peft_type") if isinstance(config, dict) else None
        raise ExportError(f"{config_file} is a {peft_type!r} adapter, not a GiVA one")
    return config


def _read_adapter_tensors(adapter_dir: Path, skeleton: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of a saved GiVA folder, checked as loading it into ``skeleton`` checks them (checksum, fields,
    tensors; the embedding layers PEFT may have saved are the skeleton's)."""
    try:
        return checked_adapter_tensors(adapter_dir.absolute(), skeleton)
    except CheckpointError as error:
        raise ExportError(str(error)) from None


def _layer_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """GiVA tensors by layer name in the base model (``bert.encoder.layer.0.attention.self.query``)."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        layer, _, kind = key.removeprefix(PEFT_PREFIX).rpartition(".")
        if kind.startswith("giva_"):
            layers.setdefault(layer, {})[kind] = value
    return layers


def _labels(adapter_dir: Path) -> Optional[dict[str, Any]]:
    """``labels.json`` as ``giva finetune`` writes it (``id2label``, ``label2id``), if the folder has a valid one."""
    path = adapter_dir / "labels.json"
    if not path.is_file():
        return None
    try:
        labels = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ExportError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(labels, dict) or not isinstance(labels.get("id2label"), dict) or not labels["id2label"]:
        raise ExportError(f"{path} has no id2label mapping (expected what giva finetune writes)")
    return labels


def _num_labels(tensors: dict[str, torch.Tensor], skeleton: nn.Module, modules_to_save: list[str]) -> Optional[int]:
    """Classes of the saved classification head where they are not the base config's: the out size of the head's
    matrix whose saved shape differs from ``skeleton``'s (built with the config's ``num_labels``), else ``None``.

    The label projection is the one matrix whose size depends on the class count: a RoBERTa head holds ``dense``
    (H x H) and ``out_proj`` (C x H), so the smallest out size, which this used to take, was H whenever C > H."""
    shapes = {name: tuple(param.shape) for name, param in skeleton.named_parameters()}
    sizes = {
        value.shape[0]
        for key, value in tensors.items()
        if (name := key.removeprefix(PEFT_PREFIX)) in shapes and value.dim() == 2 and tuple(value.shape) != shapes[name]
        and set(modules_to_save).intersection(name.split("."))
    }
    return sizes.pop() if len(sizes) == 1 else None


def _check_base_matches(model: nn.Module, layers: dict[str, dict[str, torch.Tensor]], base_name: str) -> None:
    """Every adapted layer exists in the base model as a linear layer of the saved shapes (``model`` on meta)."""
    modules = dict(model.named_modules())
    for name, saved in sorted(layers.items()):
        module = modules.get(name)
        if not isinstance(module, (nn.Linear, Conv1D)):
            raise ExportError(
                f"base model {base_name!r} does not match the adapter: it has no linear layer {name!r}; pass the base "
                "model the adapter was trained on (--base-model)"
            )
        in_features, out_features = (module.in_features, module.out_features) if isinstance(module, nn.Linear) else module.weight.shape
        a, lambda_o = saved.get("giva_A"), saved.get("giva_lambda_o")
        if (a is not None and a.shape[1] != in_features) or (lambda_o is not None and lambda_o.shape[0] > out_features):
            raise ExportError(
                f"base model {base_name!r} does not match the adapter: layer {name!r} is {in_features} -> {out_features} "
                f"there, but the adapter was saved from a layer of other size; pass the right --base-model"
            )


def _model_class(config: dict[str, Any], model_config: Any, config_file: Path) -> Any:
    """The transformers class the adapter was trained on, as ``AutoPeftModel`` would pick it.

    A ``task_type`` gives PEFT's auto class for it. Without one (``get_peft_model(model, GivaConfig(...))``, the
    common case), the class PEFT recorded in ``auto_mapping`` when saving, else the base model's
    ``architectures[0]``: either only if transformers has it and it takes the base model's config (another
    ``--base-model`` then falls through). ``AutoModel`` (no head) is the last resort, and a model without the
    adapted layers is refused by :func:`_check_base_matches`.
    """
    task_type = config.get("task_type")
    if task_type is not None:
        classes = peft_compat.task_model_classes()
        if task_type not in classes:
            raise ExportError(f"{config_file}: task_type={task_type!r} is none of PEFT's task types ({', '.join(sorted(classes))})")
        return classes[task_type]
    import transformers

    recorded = config.get("auto_mapping") if isinstance(config.get("auto_mapping"), dict) else {}
    names = [recorded.get("base_model_class")] if str(recorded.get("parent_library", "")).startswith("transformers") else []
    names += list(getattr(model_config, "architectures", None) or [])[:1]
    for name in names:
        found = getattr(transformers, str(name), None)
        if isinstance(found, type) and isinstance(model_config, getattr(found, "config_class", None) or ()):
            return found
    return transformers.AutoModel


def _skeleton(model_class: Any, model_config: Any) -> nn.Module:
    """The base model on the ``meta`` device: its module names and shapes, no weights read."""
    with torch.device("meta"):
        if hasattr(model_class, "from_config"):  # an auto class
            return model_class.from_config(model_config)
        return model_class(model_config)


def _embedding_tensors(tensors: dict[str, torch.Tensor], skeleton: nn.Module, base_name: str) -> dict[str, torch.Tensor]:
    """The embedding layers PEFT saved whole in the adapter folder (``save_embedding_layers``), carried into the LoRA
    as PEFT's LoRA saves them; refused when their shape is not the base model's (:func:`_check_vocabulary`)."""
    embeddings = embedding_layers(skeleton)
    carried = {key: value for key, value in tensors.items() if embedding_parameter(key, embeddings) is not None}
    _check_vocabulary(carried, skeleton, base_name)
    return carried


def _check_vocabulary(tensors: dict[str, torch.Tensor], skeleton: nn.Module, base_name: str) -> None:
    """Refuse embedding tensors among ``tensors`` (keyed as saved, or as the model in memory names them) whose shape
    is not that of the base model ``skeleton``: a vocabulary resized for training, which a LoRA cannot resize again.
    Other tensors are ignored."""
    embeddings = embedding_layers(skeleton)
    shapes = {name: tuple(param.shape) for name, param in skeleton.named_parameters(remove_duplicate=False)}
    for key, value in tensors.items():
        name = embedding_parameter(key, embeddings)  # lm_head.weight also for lm_head.base_layer.weight, not lm_head.giva_A
        shape = tuple(getattr(value, "ds_shape", value.shape))  # a ZeRO-3 partitioned weight is empty: its full shape
        if name is not None and shapes[name] != shape:
            raise ExportError(
                f"the adapter holds the embedding layer {name!r} of shape {shape}, but base model "
                f"{base_name!r} has {shapes[name]}: the vocabulary was resized (resize_token_embeddings) for training, "
                "which a LoRA export cannot carry; serve the GiVA adapter itself"
            )


def _base_config(model: nn.Module, adapter_name: str) -> Optional[tuple[str, Any]]:
    """The name and config of the base model of a model in memory, or ``None`` for a model that names none (built
    from a config).

    Found as PEFT's ``save_embedding_layers="auto"`` finds it, never downloaded: a local folder with ``config.json``
    or the hub cache, at the adapter's ``base_model_name_or_path``, else at the model's own ``name_or_path`` (the
    folder it was loaded from, where the adapter names a hub id to publish under). One named but found at neither (a
    hub id not in the cache, a moved folder or one without ``config.json``, a model loaded with ``cache_dir=`` or
    ``subfolder=``) is refused: a resized vocabulary would go unnoticed, and the LoRA would not load (a
    vocabulary-sized head) or not reproduce the model. The remedy names the model's ``name_or_path``, which only
    this lookup reads, so the export still records the adapter's ``base_model_name_or_path``."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    model_config = getattr(base, "config", None)
    peft_config = getattr(model, "peft_config", {}).get(adapter_name)
    named = getattr(peft_config, "base_model_name_or_path", None)
    loaded_from = getattr(model_config, "_name_or_path", None)
    names = list(dict.fromkeys(name for name in (named, loaded_from) if name))
    if model_config is None or not names:
        return None
    for name in names:
        folder = Path(os.path.expanduser(name))
        if folder.is_dir() and not (folder / "config.json").is_file():
            continue  # transformers builds a default config (LlamaConfig: 32000 x 4096) for a folder without one
        try:
            return name, type(model_config).from_pretrained(name, local_files_only=True)
        except (OSError, ValueError):
            continue
    source = "its base_model_name_or_path" + (f", the model loaded from {loaded_from!r}" if len(names) > 1 else "")
    raise ExportError(
        f"base model {names[0]!r} of GiVA adapter {adapter_name!r} ({source}) is neither a local "
        "folder with config.json nor in the Hugging Face cache, so the export cannot "
        "check that the vocabulary was not resized (resize_token_embeddings), which a LoRA export cannot carry; set "
        "model.config.name_or_path to the local folder holding the base model's config.json (for a model loaded with "
        "cache_dir= or subfolder=, the snapshot or subfolder there), which the export only reads, or "
        f"model.peft_config[{adapter_name!r}].base_model_name_or_path, which the export also records"
    )


def _check_model_vocabulary(model: nn.Module, adapter_name: str) -> Optional[Any]:
    """Refuse the export of a model in memory whose embedding layers differ in shape from its base model's, as
    ``giva export-lora`` refuses its folder (:func:`_check_vocabulary`); before any work. The base model is found
    by :func:`_base_config`, whose config this returns (``None`` for a model that names no base: not compared)."""
    found = _base_config(model, adapter_name)
    if found is None:
        return None
    base_name, base_config = found
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    try:
        skeleton = _skeleton(type(base), base_config)
    except (OSError, ValueError, TypeError):  # a class not built from its config
        return base_config
    _check_vocabulary(dict(base.named_parameters(remove_duplicate=False)), skeleton, base_name)
    return base_config


def _side_files(adapter_dir: Path) -> list[Path]:
    """Tokenizer files and labels.json that travel with the exported LoRA."""
    return sorted(path for path in adapter_dir.iterdir() if path.is_file() and is_side_file(path.name))


def export_lora_dir(
    adapter_dir: Union[str, Path],
    out_dir: Union[str, Path],
    base_model: Optional[str] = None,
    rank: Optional[int] = None,
) -> LoraConfig:
    """Load a saved GiVA adapter onto its base model and write it as a LoRA folder (``giva export-lora``).

    Everything that can be checked is checked before the base model's weights load: the adapter's config (and
    options a LoRA cannot carry: :func:`_check_exportable`), the output folder, the base model (built on the ``meta``
    device as the class the adapter was trained on: :func:`_model_class`), the adapter's weights as loading checks
    them, ``rank``, that the base model has every adapted layer in the saved shapes, and that ``labels.json`` names
    the saved classification head's class count. A base checkpoint whose head has other classes than the saved one
    loads as ``giva finetune`` loaded it (``ignore_mismatched_sizes``), and so does the README's code. The tokenizer
    files and ``labels.json`` of the adapter folder are copied, the class names go into the base model's config, and
    a ``README.md`` holds the plain-PEFT code that loads the export. Embedding layers PEFT saved whole in the adapter folder are carried into the LoRA. The base
    model defaults to ``base_model_name_or_path`` of the adapter's config; it must be a local folder or one of
    :data:`giva.assets.MODEL_ALIASES`.
    """
    adapter_dir, out = Path(adapter_dir), Path(out_dir)
    config = _read_adapter_config(adapter_dir)
    _check_exportable(config, str(adapter_dir / CONFIG_NAME))
    _check_output(out)
    plan = plan_base(adapter_dir, config, base_model, rank)
    peft_model = plan.load()
    lora_config, state_dict = to_lora(peft_model, rank=rank)
    state_dict.update(plan.embeddings)
    lora_config.base_model_name_or_path = config.get("base_model_name_or_path") or plan.base_name
    side_files = _side_files(adapter_dir)
    readme = _loading_snippet(
        out, lora_config, plan.model_class.__name__, plan.labels,
        tokenizer=any(p.name != "labels.json" for p in side_files), num_labels=plan.head_classes,
    )

    def extras(tmp: Path) -> None:
        for source in side_files:
            shutil.copy2(source, tmp / source.name)
        (tmp / "README.md").write_text(readme, encoding="utf-8")

    _write_lora(out, lora_config, state_dict, extras, _auto_mapping(lora_config, type(peft_model.get_base_model())))
    return lora_config


@dataclass
class BasePlan:
    """What :func:`plan_base` checked of a saved adapter and its base model, before any weight loads."""

    adapter_dir: Path
    base_name: str  # as given, or the adapter config's base_model_name_or_path
    path: str  # the base model's folder
    model_class: Any  # the transformers class the adapter was trained on
    load_kwargs: dict[str, Any]  # for model_class.from_pretrained: the classes of labels.json, a new head's size
    labels: Optional[dict[str, Any]]
    head_classes: Optional[int]  # the saved head's class count where the base checkpoint's config has another
    embeddings: dict[str, torch.Tensor]  # embedding layers PEFT saved whole in the adapter folder

    def load(self, **kwargs: Any) -> PeftModel:
        """The base model (``kwargs``: more for ``from_pretrained``, a ``dtype``) with the adapter loaded onto it."""
        model = self.model_class.from_pretrained(self.path, **self.load_kwargs, **kwargs)
        return PeftModel.from_pretrained(model, str(self.adapter_dir))


def plan_base(adapter_dir: Path, config: dict[str, Any], base_model: Optional[str] = None, rank: Optional[int] = None
              ) -> BasePlan:
    """Everything about the base model that can be checked before its weights load (``giva export-lora`` and
    ``giva merge``): the base model (``base_model``, else the adapter config's ``base_model_name_or_path``: a local
    folder or one of :data:`giva.assets.MODEL_ALIASES`), built on the ``meta`` device as the class the adapter was
    trained on; the adapter's weights as loading checks them; ``rank``; that the base model has every adapted layer
    in the saved shapes; and that ``labels.json`` names the saved classification head's class count."""
    from transformers import AutoConfig

    from .assets import MODEL_ALIASES, resolve_model

    labels = _labels(adapter_dir)
    base_name = base_model or config.get("base_model_name_or_path")
    if not base_name:
        raise ExportError(f"{adapter_dir / CONFIG_NAME} names no base_model_name_or_path; pass --base-model")
    if base_name not in MODEL_ALIASES and not Path(base_name).is_dir():
        raise ExportError(
            f"base model {base_name!r} is neither a local folder nor one of {sorted(MODEL_ALIASES)}; pass --base-model"
        )
    try:
        path = resolve_model(base_name)
    except (OSError, ValueError, ImportError) as error:  # a folder without config.json; an alias not installed
        raise ExportError(f"base model {base_name!r} cannot be read: {error}") from None
    extra: dict[str, Any] = {}
    head_classes: Optional[int] = None  # the saved head's class count where the base checkpoint's config has another
    if labels is not None and config.get("task_type") == "SEQ_CLS":
        extra = {
            "id2label": {int(i): name for i, name in labels["id2label"].items()},
            "label2id": labels.get("label2id") or {name: int(i) for i, name in labels["id2label"].items()},
        }
    try:
        base_config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ExportError(f"base model {base_name!r} cannot be read: {error}") from None
    model_config = copy.deepcopy(base_config)  # with labels.json's classes: what from_pretrained(path, **extra) makes
    model_config.update(extra)
    auto = _model_class(config, model_config, adapter_dir / CONFIG_NAME)
    try:
        skeleton = _skeleton(auto, model_config)
    except (OSError, ValueError) as error:
        raise ExportError(f"base model {base_name!r} cannot be read as a {auto.__name__}: {error}") from None
    tensors = _read_adapter_tensors(adapter_dir, skeleton)
    layers = _layer_tensors(tensors)
    needed = max((saved["giva_lambda_s"].shape[0] for saved in layers.values() if "giva_lambda_s" in saved), default=0)
    if rank is not None:
        _check_rank(rank, needed, "default")
    _check_base_matches(skeleton, layers, base_name)
    embeddings = _embedding_tensors(tensors, skeleton, base_name)
    if config.get("task_type") == "SEQ_CLS":
        num_labels = _num_labels(tensors, skeleton, list(config.get("modules_to_save") or ["classifier", "score"]))
        if labels is None:
            extra = {} if num_labels is None else {"num_labels": num_labels}
        elif num_labels is not None:  # the skeleton was built with labels.json's classes: the saved head has others
            raise ExportError(
                f"{adapter_dir / 'labels.json'} names {len(labels['id2label'])} classes, but the adapter's saved "
                f"classification head has {num_labels}; fix or remove labels.json"
            )
        classes = num_labels if num_labels is not None else model_config.num_labels
        if classes != base_config.num_labels:
            # A base checkpoint with a head for other classes (a 2-class classifier fine-tuned to 3) is refused with
            # a size mismatch unless its head is made anew, as giva finetune made it; the adapter's saved head
            # replaces it.
            extra["ignore_mismatched_sizes"] = True
            head_classes = classes
    del skeleton
    return BasePlan(adapter_dir, base_name, path, auto, extra, labels, head_classes, embeddings)
