"""GiVA -> LoRA with the exact factors, so any LoRA server can serve a GiVA adapter.

For every adapted block ``delta_W = diag(lambda_o) B diag(lambda_s) A`` already is a rank-``r``
product, so no SVD is needed::

    lora_A = diag(lambda_s) A      (R x in)
    lora_B = diag(lambda_o) B      (out x R, zero rows for outputs no block adapts)
    lora_alpha = r                 (LoRA scaling alpha / r = 1)

A fused layer (GPT-2 ``c_attn``, ``qkv_proj``) with several adapted blocks becomes one LoRA of rank
``R = sum r_j`` whose factors are block-diagonal (LoRA has no per-block rank). ``transformers``'
``Conv1D`` needs no transposition: PEFT's LoRA keeps ``lora_A``/``lora_B`` as ``nn.Linear`` weights
(``r x in``, ``out x r``) for it too and only transposes the merged ``delta_W``.

PEFT's own ``peft.convert_to_lora`` / ``peft.save_as_lora`` use these factors for GiVA layers (see
:func:`giva.peft_compat.install_lora_conversion`). :func:`export_lora` also writes a config every LoRA
server reads: one rank for every layer (smaller layers zero-padded), ``lora_alpha = r``, and the
exported layers as ``target_modules``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import torch
from peft import LoraConfig, PeftModel, convert_to_lora
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from .layer import GivaLayer

logger = logging.getLogger(__name__)
_PEFT_PREFIX = "base_model.model."


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
    b = layer.giva_B[adapter_name].float()  # O x R
    lambda_s = layer.giva_lambda_s[adapter_name].detach().float().to(a.device)
    lambda_o = layer.giva_lambda_o[adapter_name].detach().float().to(a.device)
    lora_a = lambda_s[:, None] * a  # R x in
    lora_b = lambda_o[:, None] * b  # O x R
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
    exact = module.giva_A[adapter_name].shape[0]
    target = rank if isinstance(rank, int) and rank >= exact else exact
    lora_a, lora_b = lora_factors(module, adapter_name, target)
    return lora_a, lora_b, target


def _giva_layers(model: nn.Module, adapter_name: str) -> dict[str, GivaLayer]:
    """The GiVA layers holding ``adapter_name``, keyed by their name in the base model."""
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, GivaLayer) and adapter_name in module.giva_lambda_o:
            layers[name.removeprefix(_PEFT_PREFIX)] = module
    return layers


def _target_modules(model: nn.Module, exported: set[str]) -> list[str]:
    """Leaf names (``q_proj``...) when they select exactly the exported layers, else the full module names."""
    leaves = {name.rsplit(".", 1)[-1] for name in exported}
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    selected = {
        name
        for name, module in base.named_modules()
        if name.rsplit(".", 1)[-1] in leaves and (isinstance(module, (nn.Linear, Conv1D, GivaLayer)))
    }
    return sorted(leaves) if selected == exported else sorted(exported)


def to_lora(model: PeftModel, adapter_name: str = "default", rank: Optional[int] = None) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The LoRA config and state dict of GiVA adapter ``adapter_name`` (exact factors, one rank for every layer).

    ``rank`` defaults to the largest per-layer GiVA rank (``r``, or ``sum r_j`` on fused layers); every layer is
    zero-padded to it, so servers that take a single rank (vLLM's ``max_lora_rank``) accept the result.
    """
    layers = _giva_layers(model, adapter_name)
    if not layers:
        raise ExportError(f"the model holds no GiVA adapter named {adapter_name!r}")
    needed = max(layer.giva_A[adapter_name].shape[0] for layer in layers.values())
    if rank is None:
        rank = needed
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < needed:
        raise ExportError(f"rank must be an int >= {needed} (the largest GiVA rank of adapter {adapter_name!r}), got {rank!r}")
    lora_config, state_dict = convert_to_lora(model, rank=rank, adapter_name=adapter_name)
    lora_config.target_modules = _target_modules(model, set(layers))
    lora_config.rank_pattern, lora_config.alpha_pattern = {}, {}
    lora_config.layers_to_transform, lora_config.layers_pattern = None, None
    lora_config.exclude_modules = None
    lora_config.fan_in_fan_out = all(isinstance(layer.get_base_layer(), Conv1D) for layer in layers.values())
    giva_config = model.peft_config[adapter_name]
    lora_config.task_type = giva_config.task_type
    return lora_config, state_dict


def _check_output(out: Path) -> None:
    """Refuse an output that is a file or holds an adapter other than LoRA (a GiVA adapter would be lost)."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"output {out} exists and is not a folder")
    config_file = out / CONFIG_NAME
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


def _write_lora(out: Path, lora_config: LoraConfig, state_dict: dict[str, torch.Tensor]) -> None:
    """Write both files next to their targets first, then move them in: a failed export leaves ``out`` as it was."""
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".giva-export-", dir=out))
    try:
        save_file({k: v.detach().contiguous() for k, v in state_dict.items()}, staging / SAFETENSORS_WEIGHTS_NAME)
        lora_config.save_pretrained(str(staging))
        for name in (SAFETENSORS_WEIGHTS_NAME, CONFIG_NAME):
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("exported LoRA r=%d (%d layers) to %s", lora_config.r, len(state_dict) // 2, out)


def export_lora(model: PeftModel, out_dir: Union[str, Path], adapter_name: str = "default", rank: Optional[int] = None) -> LoraConfig:
    """Write GiVA adapter ``adapter_name`` as a stock PEFT LoRA folder (``adapter_config.json`` + safetensors).

    ``out_dir`` is created if needed; it may hold an earlier LoRA export (replaced), never another adapter.
    """
    out = Path(out_dir)
    _check_output(out)
    lora_config, state_dict = to_lora(model, adapter_name, rank)
    _write_lora(out, lora_config, state_dict)
    return lora_config


def _read_adapter_folder(adapter_dir: Path) -> dict[str, Any]:
    config_file = adapter_dir / CONFIG_NAME
    if not adapter_dir.is_dir():
        raise ExportError(f"adapter folder {adapter_dir} does not exist")
    if not config_file.is_file():
        raise ExportError(f"{adapter_dir} holds no {CONFIG_NAME}: not a saved adapter folder")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ExportError(f"{config_file} is not valid JSON: {error}") from error
    if config.get("peft_type") != "GIVA":
        raise ExportError(f"{config_file} is a {config.get('peft_type')!r} adapter, not a GiVA one")
    if not (adapter_dir / SAFETENSORS_WEIGHTS_NAME).is_file():
        raise ExportError(f"{adapter_dir} holds no {SAFETENSORS_WEIGHTS_NAME}")
    return config


def _num_labels(adapter_dir: Path, modules_to_save: list[str]) -> Optional[int]:
    """Number of classes of a classification adapter, from the saved head's weight."""
    with safe_open(str(adapter_dir / SAFETENSORS_WEIGHTS_NAME), framework="pt") as weights:
        for key in weights.keys():
            module = key.removesuffix(".weight")
            if key.endswith(".weight") and any(module.endswith(name) or f".{name}." in key for name in modules_to_save):
                return int(weights.get_slice(key).get_shape()[0])
    return None


def export_lora_dir(
    adapter_dir: Union[str, Path],
    out_dir: Union[str, Path],
    base_model: Optional[str] = None,
    rank: Optional[int] = None,
) -> LoraConfig:
    """Load a saved GiVA adapter onto its base model and write it as a LoRA folder (``giva export-lora``).

    The base model defaults to ``base_model_name_or_path`` of the adapter's config; it must be a local folder
    or one of :data:`giva.assets.MODEL_ALIASES`.
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    from .assets import MODEL_ALIASES, resolve_model

    adapter_dir, out = Path(adapter_dir), Path(out_dir)
    config = _read_adapter_folder(adapter_dir)
    _check_output(out)
    base_name = base_model or config.get("base_model_name_or_path")
    if not base_name:
        raise ExportError(f"{adapter_dir / CONFIG_NAME} names no base_model_name_or_path; pass --base-model")
    if base_name not in MODEL_ALIASES and not Path(base_name).is_dir():
        raise ExportError(
            f"base model {base_name!r} is neither a local folder nor one of {sorted(MODEL_ALIASES)}; pass --base-model"
        )
    path = resolve_model(base_name)
    task_type = config.get("task_type")
    if task_type == "SEQ_CLS":
        num_labels = _num_labels(adapter_dir, list(config.get("modules_to_save") or ["classifier", "score"]))
        extra = {} if num_labels is None else {"num_labels": num_labels}
        model = AutoModelForSequenceClassification.from_pretrained(path, **extra)
    elif task_type == "CAUSAL_LM":
        model = AutoModelForCausalLM.from_pretrained(path)
    else:
        model = AutoModel.from_pretrained(path)
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    lora_config, state_dict = to_lora(peft_model, rank=rank)
    lora_config.base_model_name_or_path = config.get("base_model_name_or_path") or base_name
    _write_lora(out, lora_config, state_dict)
    return lora_config
