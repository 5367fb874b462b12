"""`giva merge`: a saved GiVA adapter merged into its base model's weights, written as a plain transformers model
folder that ``AutoModelFor...from_pretrained`` loads alone (no PEFT, no giva): for servers and converters that take a
whole model (vLLM or TGI without adapters, llama.cpp's GGUF conversion). To serve several adapters over one base,
export each as a LoRA instead (``giva export-lora``).

Every check :func:`giva.export.plan_base` makes runs before the base model's weights load. The merge itself is
PEFT's ``merge_and_unload(safe_merge=True)`` in float32 (the delta added at full precision and rounded once, to
``dtype``); a non-finite merged weight is refused by PEFT and nothing is written. The folder is written beside
``out_dir`` and swapped in whole (:func:`giva.checkpoint.atomic_directory`), with ``giva_merge.json`` saying what it
was made from; an earlier merge (that file) is replaced only with ``overwrite``, any other folder is refused.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .checkpoint import atomic_directory, nested_or_same
from .export import ExportError, _read_adapter_config, _side_files, plan_base
from .finetune import check_output_dir
from .layer import GivaLayer

logger = logging.getLogger(__name__)

MERGE_RECORD = "giva_merge.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _check_output(out: Path, adapter_dir: Path, overwrite: bool) -> None:
    """``out`` may be new, empty (hidden entries aside), or an earlier merge (with ``overwrite``); never the adapter's
    folder or one inside or around it, a file, a folder this process cannot create or write, or a folder of something
    else."""
    if nested_or_same(out, adapter_dir):
        raise ExportError(f"output folder {out} and the adapter folder {adapter_dir} are the same folder or one holds "
                          "the other; write the merged model to a folder of its own")
    try:
        check_output_dir(out)  # a file, a path under a file, a parent this process cannot write in
    except OSError as err:
        raise ExportError(str(err)) from None
    if out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir()):
        if not (out / MERGE_RECORD).is_file():
            raise ExportError(f"output folder {out} is not empty and holds no earlier merge ({MERGE_RECORD}); write the "
                              "merged model to a new or empty folder")
        if not overwrite:
            raise ExportError(f"output folder {out} holds an earlier merge; pass --overwrite to replace it, or give "
                              "another folder")


def _saved_dtype(model_config: Any) -> torch.dtype:
    """The dtype the base checkpoint's config names (``dtype``, or ``torch_dtype`` before transformers 5), else fp32."""
    saved = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None)
    if isinstance(saved, str):
        saved = DTYPES.get(saved.replace("torch.", ""))
    return saved if isinstance(saved, torch.dtype) and saved in DTYPES.values() else torch.float32


def _untie_adapted_weights(peft_model: Any, adapter_dir: Path) -> list[str]:
    """Give each adapted layer whose weight is tied to the input embeddings (``tie_word_embeddings``: the output
    layer, ``lm_head``) a copy of its own, so that the merge changes that layer alone and not the embeddings with it
    (PEFT's ``merge_and_unload`` only warns: the merged model's outputs were not the adapter's). Returns their names.
    A layer tied to any other parameter is refused: its tie would not come undone in the saved model."""
    base = peft_model.get_base_model()
    holders: dict[int, list[str]] = {}
    for name, param in base.named_parameters(remove_duplicate=False):
        holders.setdefault(id(param), []).append(name)
    embeddings = base.get_input_embeddings()
    untied = []
    for name, module in base.named_modules():
        if not isinstance(module, GivaLayer):
            continue
        layer = module.get_base_layer()
        weight = getattr(layer, "weight", None)
        others = [n for n in holders.get(id(weight), []) if not n.startswith(f"{name}.")]
        if not others:
            continue
        if embeddings is None or weight is not getattr(embeddings, "weight", None):
            raise ExportError(f"{adapter_dir}: the adapted layer {name!r} shares its weight with {others[0]!r}; merging "
                              "would change both. Serve the adapter itself, or its LoRA export (giva export-lora)")
        layer.weight = torch.nn.Parameter(weight.detach().clone(), requires_grad=False)
        untied.append(name)
    return untied


def merge_dir(adapter_dir: Union[str, Path], out_dir: Union[str, Path], base_model: Optional[str] = None,
              dtype: str = "auto", overwrite: bool = False) -> dict[str, Any]:
    """Merge the GiVA adapter saved in ``adapter_dir`` into its base model and write the whole model to ``out_dir``.

    ``base_model``: a local folder or one of :data:`giva.assets.MODEL_ALIASES` (default: the adapter config's
    ``base_model_name_or_path``). ``dtype``: ``auto`` (the base checkpoint's own), ``float32``, ``bfloat16`` or
    ``float16``. The adapter folder's tokenizer files go along; without them, the base model's tokenizer is saved
    if it has one. An adapter trained on a 4-bit base merges into the unquantised base (as QLoRA adapters are
    merged), so the merged model is not the 4-bit one it was trained against. Returns the record written to
    ``giva_merge.json``."""
    from transformers import AutoConfig, AutoTokenizer

    from . import __version__

    adapter_dir, out = Path(adapter_dir), Path(out_dir)
    if dtype != "auto" and dtype not in DTYPES:
        raise ExportError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    config = _read_adapter_config(adapter_dir)
    _check_output(out, adapter_dir, overwrite)
    plan = plan_base(adapter_dir, config, base_model)
    base_config = AutoConfig.from_pretrained(plan.path)
    quantization = getattr(base_config, "quantization_config", None)
    if quantization:  # transformers loads it quantised, and a quantised model cannot be cast or saved as a plain one
        method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else type(quantization).__name__
        raise ExportError(f"the base model {plan.base_name!r} is saved quantised ({method}; config.json's "
                          "quantization_config): giva merge writes a plain model, so merge into the unquantised "
                          "model it was quantised from (--base-model FOLDER), as QLoRA adapters are merged")
    target = _saved_dtype(base_config) if dtype == "auto" else DTYPES[dtype]
    peft_model = plan.load(dtype=torch.float32)
    untied = _untie_adapted_weights(peft_model, adapter_dir)
    try:
        merged = peft_model.merge_and_unload(safe_merge=True).to(target)
    except ValueError as err:  # PEFT's safe_merge: a merged weight that is not finite
        raise ExportError(f"merging {adapter_dir} into {plan.base_name!r} failed: {err}") from None
    if untied:  # saved as two matrices, and loaded so: not tied again on load (transformers 4 would tie them)
        for config in {id(c): c for c in (merged.config, merged.config.get_text_config(decoder=True))}.values():
            config.tie_word_embeddings = False
        logger.warning("giva merge: %s was tied to the input embeddings; the merged model has its own (merged) copy of "
                       "it, and tie_word_embeddings=False in its config.json", ", ".join(untied))
    side_files = _side_files(adapter_dir)
    own_tokenizer = any(p.name != "labels.json" for p in side_files)
    tokenizer = None
    if not own_tokenizer:
        try:
            tokenizer = AutoTokenizer.from_pretrained(plan.path)
        except (OSError, ValueError, TypeError):  # a base folder without tokenizer files
            logger.warning("giva merge: neither %s nor the base model %s holds a tokenizer; the merged folder has "
                           "none", adapter_dir, plan.base_name)
    record = {"adapter": os.path.abspath(adapter_dir), "base_model": plan.base_name,
              "dtype": str(target).replace("torch.", ""), "model_class": type(merged).__name__, "giva": __version__,
              "tokenizer": "adapter" if own_tokenizer else "base model" if tokenizer is not None else None,
              "untied": untied}
    # everything an earlier merge wrote goes (its weight shards and index among them); hidden entries stay
    with atomic_directory(out, replaced=lambda name: not name.startswith(".")) as tmp:
        merged.save_pretrained(str(tmp))
        for source in side_files:
            if source.name != "labels.json":  # the class names are in config.json now
                shutil.copy2(source, tmp / source.name)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        (tmp / MERGE_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    logger.info("merged %s into %s (%s) at %s", adapter_dir, plan.base_name, record["dtype"], out)
    return record
