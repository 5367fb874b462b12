"""Bytes one extra adapter costs, in memory and on disk: GiVA r=8 (A fp32 / bf16), LoRA r=8, VeRA r=64.

    .venv/bin/python scripts/serving_memory.py     # MiniLM-L6 and SmolLM2-135M, every linear layer

In memory: the distinct tensors of the method's prefix after adding a second adapter, minus before (shared
bases count once). On disk: the adapter_model.safetensors of one adapter saved alone (no classifier head).
Writes benchmarks/results/serve/adapter_memory.{md,json}.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

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


def configs() -> dict[str, tuple[str, object, dict]]:
    """name -> (tensor-name prefix, config, save_pretrained kwargs)."""
    return {
        "GiVA r=8 (Vr, A fp32)": ("giva_", giva.GivaConfig(r=8, target_modules=TARGETS, init_weights=False), {}),
        "GiVA r=8 (Vr, A bf16)": (
            "giva_",
            giva.GivaConfig(r=8, target_modules=TARGETS, init_weights=False, bases_dtype="bfloat16"),
            {},
        ),
        "LoRA r=8": ("lora_", LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS), {}),
        "VeRA r=64 (save_projection=True)": ("vera_", VeraConfig(r=64, target_modules=TARGETS), {}),
        "VeRA r=64 (save_projection=False)": (
            "vera_",
            VeraConfig(r=64, target_modules=TARGETS, save_projection=False),
            {},
        ),
    }


def measure(load, prefix: str, config) -> dict[str, int]:
    torch.manual_seed(0)
    model = get_peft_model(load().eval(), config, adapter_name="t0")
    one = adapter_bytes(model, prefix)
    model.add_adapter("t1", config)
    two = adapter_bytes(model, prefix)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, selected_adapters=["t0"])
        disk = sum(f.stat().st_size for f in Path(tmp).rglob("*.safetensors"))
    return {"memory_first_adapter": one, "memory_per_extra_adapter": two - one, "disk_per_adapter": disk}


def main() -> None:
    rows = []
    for model_name, load in MODELS.items():
        for name, (prefix, config, _) in configs().items():
            rows.append({"model": model_name, "adapter": name, **measure(load, prefix, config)})
            print(rows[-1], flush=True)
    lora = {r["model"]: r for r in rows if r["adapter"] == "LoRA r=8"}
    lines = [
        "# Bytes per extra adapter (every linear layer; no classifier head)",
        "",
        "Command: `.venv/bin/python scripts/serving_memory.py`. In memory: what a second adapter adds to the distinct "
        "tensors of the method (shared bases counted once). On disk: adapter_model.safetensors of one adapter.",
        "",
        "| model | adapter | memory per extra adapter | vs LoRA r=8 | on disk per adapter | vs LoRA r=8 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        ref = lora[r["model"]]
        lines.append(
            f"| {r['model']} | {r['adapter']} | {r['memory_per_extra_adapter'] / 1024:,.0f} KiB | "
            f"{r['memory_per_extra_adapter'] / ref['memory_per_extra_adapter']:.2f} | {r['disk_per_adapter'] / 1024:,.0f} KiB | "
            f"{r['disk_per_adapter'] / ref['disk_per_adapter']:.2f} |"
        )
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "adapter_memory.md").write_text("\n".join(lines) + "\n")
    (OUT / "adapter_memory.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
