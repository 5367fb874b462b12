"""Bytes one extra adapter costs, in memory and on disk, in fp32 and in bf16: GiVA r=8, LoRA r=8, VeRA r=64.

    .venv/bin/python scripts/serving_memory.py     # MiniLM-L6 and SmolLM2-135M, every linear layer

In memory: the distinct tensors of the method's prefix after adding a second adapter, minus before (shared
bases count once). On disk: the adapter_model.safetensors of one adapter saved alone (no classifier head).
"bf16" rows load the base model in bf16 and create the adapters in that dtype (`autocast_adapter_dtype=False`,
else PEFT upcasts them to fp32); "A bf16" is GiVA's `bases_dtype="bfloat16"` with fp32 vectors. The
dtypes each row actually holds are recorded. Per targeted layer (in -> out) an extra adapter holds, in elements:
GiVA r*in + r + out (A and the two vectors; B is shared), LoRA r*(in + out), VeRA r_v + out (its two vectors);
the "arithmetic" column is that count times the element size, and GiVA / LoRA in one dtype cannot go below
sum(r*in + r + out) / sum(r*(in + out)) (9/16 on a square layer at r=8).
Writes benchmarks/results/serve/adapter_memory.{md,json}.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from peft import LoraConfig, VeraConfig, get_peft_model
from transformers import AutoModel, AutoModelForCausalLM

import giva
from giva.assets import minilm_path, smollm2_path
from giva.bench.serve import adapter_bytes

OUT = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "serve"
MODELS = {
    "MiniLM-L6": lambda: AutoModel.from_pretrained(minilm_path()),
    "SmolLM2-135M": lambda: AutoModelForCausalLM.from_pretrained(smollm2_path()),
}
TARGETS = "all-linear"
R, VERA_R = 8, 64


def elements_per_extra(method: str, shapes: list[tuple[int, int]]) -> dict[str, int]:
    """Elements an extra adapter holds per tensor kind, from the targeted layers' (in, out) shapes."""
    if method == "giva":
        return {"A": sum(R * i for i, _ in shapes), "vectors": sum(R + o for _, o in shapes)}
    if method == "lora":
        return {"A+B": sum(R * (i + o) for i, o in shapes)}
    return {"vectors": sum(VERA_R + o for _, o in shapes)}


def configs() -> dict[str, tuple[str, str, Any, Optional[torch.dtype], dict[str, int]]]:
    """row name -> (method, tensor-name prefix, config, dtype the model is cast to (None: as created), bytes per element)."""
    giva_fp32 = giva.GivaConfig(r=R, target_modules=TARGETS, init_weights=False)
    giva_bf16 = giva.GivaConfig(r=R, target_modules=TARGETS, init_weights=False, bases_dtype="bfloat16")
    lora = LoraConfig(r=R, lora_alpha=2 * R, target_modules=TARGETS)
    vera = VeraConfig(r=VERA_R, target_modules=TARGETS, save_projection=False)
    vera_saved = VeraConfig(r=VERA_R, target_modules=TARGETS, save_projection=True)
    bf16 = torch.bfloat16
    return {
        "GiVA r=8, fp32": ("giva", "giva_", giva_fp32, None, {"A": 4, "vectors": 4}),
        "GiVA r=8, A bf16 + fp32 vectors": ("giva", "giva_", giva_bf16, None, {"A": 2, "vectors": 4}),
        "GiVA r=8, bf16": ("giva", "giva_", giva_bf16, bf16, {"A": 2, "vectors": 2}),
        "LoRA r=8, fp32": ("lora", "lora_", lora, None, {"A+B": 4}),
        "LoRA r=8, bf16": ("lora", "lora_", lora, bf16, {"A+B": 2}),
        "VeRA r=64 (save_projection=False), fp32": ("vera", "vera_", vera, None, {"vectors": 4}),
        "VeRA r=64 (save_projection=False), bf16": ("vera", "vera_", vera, bf16, {"vectors": 2}),
        "VeRA r=64 (save_projection=True), fp32": ("vera", "vera_", vera_saved, None, {"vectors": 4}),
    }


def measure(load: Callable[[], torch.nn.Module], prefix: str, config: Any, dtype: Optional[torch.dtype]) -> dict[str, Any]:
    torch.manual_seed(0)
    base = load().eval()
    # A bf16 row: the base model in bf16 and adapters created in its dtype (PEFT's autocast would make them fp32).
    keep = {} if dtype is None else {"autocast_adapter_dtype": False}
    model = get_peft_model(base if dtype is None else base.to(dtype), config, adapter_name="t0", **keep)
    one = adapter_bytes(model, prefix)
    model.add_adapter("t1", config, **keep)
    two = adapter_bytes(model, prefix)
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for n, t in tensors if prefix in n and (n.endswith(".t1") or ".t1." in n)})
    shapes = [(m.in_features, m.out_features) for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and name.endswith("base_layer")]
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, selected_adapters=["t0"])
        disk = sum(f.stat().st_size for f in Path(tmp).rglob("*.safetensors"))
    return {"memory_first_adapter": one, "memory_per_extra_adapter": two - one, "disk_per_adapter": disk,
            "extra_adapter_dtypes": dtypes, "layer_shapes": shapes}


def main() -> None:
    rows: list[dict[str, Any]] = []
    bounds: dict[str, dict[str, int]] = {}
    for model_name, load in MODELS.items():
        for name, (method, prefix, config, dtype, sizes) in configs().items():
            row = {"model": model_name, "adapter": name, "method": method, **measure(load, prefix, config, dtype)}
            elements = elements_per_extra(method, row["layer_shapes"])
            row["arithmetic_per_extra_adapter"] = sum(count * sizes[kind] for kind, count in elements.items())
            shapes = row.pop("layer_shapes")
            row["layers"] = len(shapes)
            rows.append(row)
            print(row, flush=True)
        g, lo = elements_per_extra("giva", shapes), elements_per_extra("lora", shapes)
        bounds[model_name] = {"giva_elements": sum(g.values()), "lora_elements": sum(lo.values())}
    write(rows, bounds)


def write(rows: list[dict[str, Any]], bounds: dict[str, dict[str, int]]) -> None:
    def ref(model: str, name: str) -> dict[str, Any]:
        return next(r for r in rows if r["model"] == model and r["adapter"] == name)

    lines = [
        "# Bytes per extra adapter (every linear layer; no classifier head)",
        "",
        "Command: `.venv/bin/python scripts/serving_memory.py`. In memory: what a second adapter adds to the distinct "
        "tensors of the method (shared bases counted once); arithmetic: the element count of that adapter's own tensors "
        "times their size (GiVA r*in + r + out per layer, LoRA r*(in + out), VeRA r + out). On disk: "
        "adapter_model.safetensors of one adapter. `bf16` rows: base model in bf16, adapters created in "
        "bf16 (`autocast_adapter_dtype=False`); `A bf16 + fp32 vectors`: GiVA's `bases_dtype=\"bfloat16\"`.",
        "",
        "| model | adapter | dtypes held | memory per extra adapter | arithmetic | vs LoRA r=8 fp32 | vs LoRA r=8 bf16 | "
        "on disk per adapter | vs LoRA fp32 | vs LoRA bf16 |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        l32, l16 = ref(r["model"], "LoRA r=8, fp32"), ref(r["model"], "LoRA r=8, bf16")
        mem, disk = r["memory_per_extra_adapter"], r["disk_per_adapter"]
        lines.append(
            f"| {r['model']} | {r['adapter']} | {', '.join(r['extra_adapter_dtypes'])} | {mem / 1024:,.0f} KiB | "
            f"{r['arithmetic_per_extra_adapter'] / 1024:,.0f} KiB | {mem / l32['memory_per_extra_adapter']:.3f} | "
            f"{mem / l16['memory_per_extra_adapter']:.3f} | {disk / 1024:,.0f} KiB | {disk / l32['disk_per_adapter']:.3f} | "
            f"{disk / l16['disk_per_adapter']:.3f} |"
        )
    lines += ["", "Like-for-like lower bound from the layer shapes (GiVA / LoRA r=8, same element size): "]
    for model, b in bounds.items():
        b["ratio"] = b["giva_elements"] / b["lora_elements"]
        lines.append(f"- {model}: {b['giva_elements']:,} / {b['lora_elements']:,} elements = {b['ratio']:.3f}")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "adapter_memory.md").write_text("\n".join(lines) + "\n")
    (OUT / "adapter_memory.json").write_text(json.dumps({"rows": rows, "like_for_like_bound": bounds}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
