"""The serve suite's byte counts: what one extra adapter costs in memory and on disk (``adapter_memory.{json,md}``).

Table 1, per model, every linear layer, no classifier head: GiVA r=8, LoRA r=8, VeRA r=64, in fp32 and in bf16.
In memory: the distinct tensors of the method's prefix after adding a second adapter, minus before (shared
bases count once). On disk: the adapter_model.safetensors of one adapter saved alone. "bf16" rows load the
base model in bf16 and create the adapters in that dtype (``autocast_adapter_dtype=False``, else PEFT upcasts
them to fp32); "A bf16" is GiVA's ``bases_dtype="bfloat16"`` with fp32 vectors. The dtypes each row actually
holds are recorded. Per targeted layer (in -> out) an extra adapter holds, in elements: GiVA r*in + r + out
(A and the two vectors; B is shared), LoRA r*(in + out), VeRA r_v + out (its two vectors); the "arithmetic"
column is that count times the element size, and GiVA / LoRA in one dtype cannot go below
sum(r*in + r + out) / sum(r*(in + out)) (9/16 on a square layer at r=8).

Table 2: the adapter files (``*.safetensors`` of ``save_pretrained``) of GiVA (``Vr``, ``VrUr``), LoRA and VeRA
on MiniLM-L6's ``query,value`` with its 2-class head, and their trainable parameters.

Byte counting only (deterministic; about 40 s for the default tables on a shared 2-core CPU). A rerun keeps every model already recorded
with the same settings and measures only the missing ones (:func:`plan_adapter_memory` lists them).
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from .runner import write_text_atomically

logger = logging.getLogger(__name__)

MEMORY_FILE = "adapter_memory"  # adapter_memory.json and adapter_memory.md in the serve suite's folder
R, VERA_R = 8, 64
FILE_TARGETS = ("query", "value")


def adapter_bytes(model: nn.Module, prefix: str) -> int:
    """Bytes of the distinct tensors (parameters and buffers) whose name contains ``prefix`` (shared ones once)."""
    seen: dict[tuple[int, int], int] = {}
    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, tensor in tensors:
        if prefix in name:
            storage = tensor.untyped_storage()
            seen[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
    return sum(seen.values())


def load_minilm() -> nn.Module:
    from transformers import AutoModel

    from ..assets import minilm_path

    return AutoModel.from_pretrained(minilm_path())


def load_smollm2() -> nn.Module:
    from transformers import AutoModelForCausalLM

    from ..assets import smollm2_path

    return AutoModelForCausalLM.from_pretrained(smollm2_path())


def load_minilm_classifier() -> nn.Module:
    from transformers import AutoModelForSequenceClassification

    from ..assets import minilm_path

    return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)


@dataclass(frozen=True)
class MemoryModel:
    """A model of the byte counts: its name in the tables, how to load it, which layers get adapters."""

    name: str
    load: Callable[[], nn.Module]
    target_modules: Any = "all-linear"


@dataclass(frozen=True)
class Adapter:
    """One row of table 1: the method, its tensor-name prefix, a config factory, the dtype the model is cast to
    (None: as loaded) and the bytes per element of each kind of tensor an extra adapter holds."""

    method: str
    prefix: str
    config: Callable[[Any], Any]  # target_modules -> config
    dtype: Optional[torch.dtype]
    element_bytes: dict[str, int]


def _giva(bases_dtype: str = "float32") -> Callable[[Any], Any]:
    def make(targets: Any) -> Any:
        from ..config import GivaConfig

        return GivaConfig(r=R, target_modules=targets, init_weights=False, bases_dtype=bases_dtype)

    return make


def _lora(targets: Any) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=R, lora_alpha=2 * R, target_modules=targets)


def _vera(save_projection: bool) -> Callable[[Any], Any]:
    def make(targets: Any) -> Any:
        from peft import VeraConfig

        return VeraConfig(r=VERA_R, target_modules=targets, save_projection=save_projection)

    return make


ADAPTERS: dict[str, Adapter] = {
    "GiVA r=8, fp32": Adapter("giva", "giva_", _giva(), None, {"A": 4, "vectors": 4}),
    "GiVA r=8, A bf16 + fp32 vectors": Adapter("giva", "giva_", _giva("bfloat16"), None, {"A": 2, "vectors": 4}),
    "GiVA r=8, bf16": Adapter("giva", "giva_", _giva("bfloat16"), torch.bfloat16, {"A": 2, "vectors": 2}),
    "LoRA r=8, fp32": Adapter("lora", "lora_", _lora, None, {"A+B": 4}),
    "LoRA r=8, bf16": Adapter("lora", "lora_", _lora, torch.bfloat16, {"A+B": 2}),
    "VeRA r=64 (save_projection=False), fp32": Adapter("vera", "vera_", _vera(False), None, {"vectors": 4}),
    "VeRA r=64 (save_projection=False), bf16": Adapter("vera", "vera_", _vera(False), torch.bfloat16, {"vectors": 2}),
    "VeRA r=64 (save_projection=True), fp32": Adapter("vera", "vera_", _vera(True), None, {"vectors": 4}),
}
LORA_FP32, LORA_BF16 = "LoRA r=8, fp32", "LoRA r=8, bf16"

def _with_head(method: str, **fields: Any) -> Callable[[Any], Any]:
    """A factory of one table-2 config: ``method``'s config with ``fields``, on the given targets, for SEQ_CLS."""
    def make(targets: Any) -> Any:
        from peft import LoraConfig, VeraConfig

        from ..config import GivaConfig

        config = {"giva": GivaConfig, "lora": LoraConfig, "vera": VeraConfig}[method]
        return config(target_modules=targets if isinstance(targets, str) else list(targets), task_type="SEQ_CLS", **fields)

    return make


# Table 2: the adapter files with the classifier head (row name -> config factory of the targets).
FILE_ADAPTERS: dict[str, Callable[[Any], Any]] = {
    "GiVA r=8 (Vr: B regenerated from seed)": _with_head("giva", r=R),
    "GiVA r=8 (VrUr: B stored)": _with_head("giva", r=R, variant="VrUr"),
    "LoRA r=8": _with_head("lora", r=R, lora_alpha=2 * R),
    "VeRA r=256 (projections saved)": _with_head("vera", r=256),
    "VeRA r=1024 (projections saved)": _with_head("vera", r=1024),
}
GIVA_VR_FILE = "GiVA r=8 (Vr: B regenerated from seed)"


DEFAULT_MEMORY_MODELS: tuple[MemoryModel, ...] = (MemoryModel("MiniLM-L6", load_minilm), MemoryModel("SmolLM2-135M", load_smollm2))
DEFAULT_FILE_MODELS: tuple[MemoryModel, ...] = (MemoryModel("MiniLM-L6", load_minilm_classifier, FILE_TARGETS),)


@dataclass(frozen=True)
class MemoryTables:
    """What adapter_memory.{json,md} holds: the models of table 1 (bytes per extra adapter, ``adapters`` of
    :data:`ADAPTERS`) and of table 2 (adapter files with a 2-class head, every row of :data:`FILE_ADAPTERS`)."""

    models: tuple[MemoryModel, ...] = DEFAULT_MEMORY_MODELS
    file_models: tuple[MemoryModel, ...] = DEFAULT_FILE_MODELS
    adapters: tuple[str, ...] = field(default_factory=lambda: tuple(ADAPTERS))

    def __post_init__(self) -> None:
        for kind in ("models", "file_models"):
            names = [m.name for m in getattr(self, kind)]
            if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
                raise ValueError(f"MemoryTables.{kind} must have distinct, non-empty names, got {names!r}")
        unknown = [a for a in self.adapters if a not in ADAPTERS]
        if unknown or not self.adapters:
            raise ValueError(f"MemoryTables.adapters must be among {list(ADAPTERS)}, got {list(self.adapters)!r}")

    def settings(self) -> dict[str, Any]:
        """What a record must have been measured with to be kept (the JSON's ``meta.settings``)."""
        return {
            "r": R, "vera_r": VERA_R,
            "models": {m.name: m.target_modules for m in self.models},
            "file_models": {m.name: m.target_modules for m in self.file_models},
        }


def elements_per_extra(method: str, shapes: Sequence[tuple[int, int]]) -> dict[str, int]:
    """Elements an extra adapter holds per tensor kind, from the targeted layers' (in, out) shapes."""
    if method == "giva":
        return {"A": sum(R * i for i, _ in shapes), "vectors": sum(R + o for _, o in shapes)}
    if method == "lora":
        return {"A+B": sum(R * (i + o) for i, o in shapes)}
    return {"vectors": sum(VERA_R + o for _, o in shapes)}


def measure_adapter(spec: MemoryModel, adapter: Adapter) -> tuple[dict[str, Any], list[tuple[int, int]]]:
    """Bytes of the first adapter, of an extra one and of one saved alone; and the (in, out) of the targeted layers."""
    from peft import get_peft_model

    torch.manual_seed(0)
    base = spec.load().eval()
    # A bf16 row: the base model in bf16 and adapters created in its dtype (PEFT's autocast would make them fp32).
    keep = {} if adapter.dtype is None else {"autocast_adapter_dtype": False}
    config = adapter.config(spec.target_modules)
    model = get_peft_model(base if adapter.dtype is None else base.to(adapter.dtype), config, adapter_name="t0", **keep)
    one = adapter_bytes(model, adapter.prefix)
    model.add_adapter("t1", adapter.config(spec.target_modules), **keep)
    two = adapter_bytes(model, adapter.prefix)
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    dtypes = sorted({
        str(t.dtype).removeprefix("torch.") for n, t in tensors
        if adapter.prefix in n and (n.endswith(".t1") or ".t1." in n)
    })
    shapes = [(m.in_features, m.out_features) for name, m in model.named_modules()
              if isinstance(m, nn.Linear) and name.endswith("base_layer")]
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, selected_adapters=["t0"])
        disk = sum(f.stat().st_size for f in Path(tmp).rglob("*.safetensors"))
    elements = elements_per_extra(adapter.method, shapes)
    row = {
        "memory_first_adapter": one, "memory_per_extra_adapter": two - one, "disk_per_adapter": disk,
        "extra_adapter_dtypes": dtypes,
        "arithmetic_per_extra_adapter": sum(count * adapter.element_bytes[kind] for kind, count in elements.items()),
        "layers": len(shapes),
    }
    return row, shapes


def measure_file(spec: MemoryModel, name: str) -> dict[str, Any]:
    """Trainable parameters and ``*.safetensors`` bytes of one adapter (with the model's head) saved by PEFT."""
    from peft import get_peft_model

    from ..finetune import directory_bytes
    from ..layer import GivaLayer

    torch.manual_seed(0)
    config = FILE_ADAPTERS[name](spec.target_modules)
    model = get_peft_model(spec.load(), config)
    if getattr(config, "variant", None) == "VrUr":
        with torch.no_grad():
            for layer in (m for m in model.modules() if isinstance(m, GivaLayer)):
                layer.giva_A["default"].normal_()  # stand-in bases: the size does not depend on their values
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        size = directory_bytes(tmp)
    trainable, _ = model.get_nb_trainable_parameters()
    return {"model": spec.name, "adapter": name, "trainable_params": trainable, "file_bytes": size}


def _empty(tables: MemoryTables) -> dict[str, Any]:
    return {"meta": {"settings": tables.settings()}, "rows": [], "like_for_like_bound": {}, "files": []}


def _recorded(path: Path, tables: MemoryTables) -> dict[str, Any]:
    """The records of ``path`` measured with ``tables``'s settings (else none: they would not be comparable)."""
    if not path.is_file():
        return _empty(tables)
    try:
        results = json.loads(path.read_text())
        settings = results["meta"]["settings"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return _empty(tables)
    if settings != json.loads(json.dumps(tables.settings())):
        return _empty(tables)
    return results


def _missing(results: dict[str, Any], tables: MemoryTables) -> tuple[list[MemoryModel], list[MemoryModel]]:
    """The models of table 1 and of table 2 with a row not recorded in ``results``."""
    rows = {(r["model"], r["adapter"]) for r in results["rows"]}
    files = {(r["model"], r["adapter"]) for r in results["files"]}
    memory = [m for m in tables.models if m.name not in results["like_for_like_bound"]
              or any((m.name, a) not in rows for a in tables.adapters)]
    disk = [m for m in tables.file_models if any((m.name, a) not in files for a in FILE_ADAPTERS)]
    return memory, disk


def plan_adapter_memory(output_dir: Path, tables: Optional[MemoryTables] = None) -> list[str]:
    """What :func:`run_adapter_memory` would measure now into ``output_dir`` (models already recorded are kept)."""
    tables = tables or MemoryTables()
    memory, disk = _missing(_recorded(Path(output_dir) / f"{MEMORY_FILE}.json", tables), tables)
    return [f"serve: adapter memory: {m.name}, {len(tables.adapters)} adapters, in memory and on disk" for m in memory] + [
        f"serve: adapter files: {m.name} ({_targets(m.target_modules)}, with its head), {len(FILE_ADAPTERS)} adapters" for m in disk
    ]


def run_adapter_memory(output_dir: Path, tables: Optional[MemoryTables] = None) -> dict[str, Any]:
    """Measure the models not yet recorded in ``output_dir/adapter_memory.json``, then write it and the .md.

    Returns the records and ``ran``: the ``model/adapter`` rows measured now (empty when all were recorded).
    """
    from .versions import versions

    tables = tables or MemoryTables()
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"serve output folder {out} is a file")
    path = out / f"{MEMORY_FILE}.json"
    results = _recorded(path, tables)
    memory, disk = _missing(results, tables)
    ran: list[str] = []
    for spec in memory:
        kept = [r for r in results["rows"] if r["model"] != spec.name]
        rows = []
        for name in tables.adapters:
            adapter = ADAPTERS[name]
            measured, shapes = measure_adapter(spec, adapter)
            rows.append({"model": spec.name, "adapter": name, "method": adapter.method, **measured})
            logger.info("adapter memory %s / %s: %s", spec.name, name, measured)
            ran.append(f"{spec.name}/{name}")
        giva, lora = elements_per_extra("giva", shapes), elements_per_extra("lora", shapes)
        results["like_for_like_bound"][spec.name] = {
            "giva_elements": sum(giva.values()), "lora_elements": sum(lora.values()),
            "ratio": sum(giva.values()) / sum(lora.values()),
        }
        results["rows"] = kept + rows
    for spec in disk:
        kept = [r for r in results["files"] if r["model"] != spec.name]
        results["files"] = kept + [measure_file(spec, name) for name in FILE_ADAPTERS]
        ran += [f"{spec.name}/{name} (file)" for name in FILE_ADAPTERS]
    if ran:
        results["meta"]["versions"] = versions()
    write_text_atomically(path, json.dumps(results, indent=2) + "\n")
    write_text_atomically(out / f"{MEMORY_FILE}.md", memory_report(results))
    return {**results, "ran": ran}


def _targets(target_modules: Any) -> str:
    return target_modules if isinstance(target_modules, str) else ",".join(target_modules)


def _ratio(value: int, ref: Optional[dict[str, Any]], key: str) -> str:
    return "" if ref is None else f"{value / ref[key]:.3f}"


def memory_report(results: dict[str, Any]) -> str:
    """adapter_memory.md, from the records alone."""
    def ref(model: str, name: str) -> Optional[dict[str, Any]]:
        return next((r for r in results["rows"] if r["model"] == model and r["adapter"] == name), None)

    lines = [
        "# Bytes per extra adapter (every linear layer; no classifier head)",
        "",
        "Command: `giva bench --suite serve` (this file is written beside results.md; a rerun measures only the models "
        "not recorded here). In memory: what a second adapter adds to the distinct "
        "tensors of the method (shared bases counted once); arithmetic: the element count of that adapter's own tensors "
        "times their size (GiVA r*in + r + out per layer, LoRA r*(in + out), VeRA r + out). On disk: "
        "adapter_model.safetensors of one adapter. `bf16` rows: base model in bf16, adapters created in "
        "bf16 (`autocast_adapter_dtype=False`); `A bf16 + fp32 vectors`: GiVA's `bases_dtype=\"bfloat16\"`.",
        "",
        "| model | adapter | dtypes held | memory per extra adapter | arithmetic | vs LoRA r=8 fp32 | vs LoRA r=8 bf16 | "
        "on disk per adapter | vs LoRA fp32 | vs LoRA bf16 |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        l32, l16 = ref(r["model"], LORA_FP32), ref(r["model"], LORA_BF16)
        mem, disk = r["memory_per_extra_adapter"], r["disk_per_adapter"]
        lines.append(
            f"| {r['model']} | {r['adapter']} | {', '.join(r['extra_adapter_dtypes'])} | {mem / 1024:,.0f} KiB | "
            f"{r['arithmetic_per_extra_adapter'] / 1024:,.0f} KiB | {_ratio(mem, l32, 'memory_per_extra_adapter')} | "
            f"{_ratio(mem, l16, 'memory_per_extra_adapter')} | {disk / 1024:,.0f} KiB | {_ratio(disk, l32, 'disk_per_adapter')} | "
            f"{_ratio(disk, l16, 'disk_per_adapter')} |"
        )
    lines += ["", "Like-for-like lower bound from the layer shapes (GiVA / LoRA r=8, same element size): "]
    for model, b in results["like_for_like_bound"].items():
        lines.append(f"- {model}: {b['giva_elements']:,} / {b['lora_elements']:,} elements = {b['ratio']:.3f}")
    if results["files"]:
        lines += [
            "",
            "## Adapter files with the classifier head",
            "",
            "`save_pretrained` of one adapter with the model's 2-class head (`task_type=\"SEQ_CLS\"`; the head is saved "
            "with it): the bytes of its `.safetensors`, and the trainable parameters (adapter and head). `Vr` stores "
            "`A` and a checksum of the seeded `B` per layer and regenerates `B` from the seed; `VrUr` stores `B` too.",
            "",
            "| model | targets | adapter | trainable params | adapter file | file / GiVA r=8 Vr file |",
            "|---|---|---|---:|---:|---:|",
        ]
        targets = results["meta"]["settings"]["file_models"]
        for r in results["files"]:
            vr = next((x for x in results["files"] if x["model"] == r["model"] and x["adapter"] == GIVA_VR_FILE), None)
            ratio = "" if vr is None else f"{r['file_bytes'] / vr['file_bytes']:.2f}"
            lines.append(
                f"| {r['model']} | {_targets(targets.get(r['model'], ''))} | {r['adapter']} | "
                f"{r['trainable_params']:,} | {r['file_bytes'] / 1024:.1f} KiB | {ratio} |"
            )
    return "\n".join(lines) + "\n"
