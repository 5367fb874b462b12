"""Print the on-disk size of GiVA, LoRA and VeRA adapters for the same model and target modules.

    .venv/bin/python scripts/adapter_sizes.py            # MiniLM-L6, query+value, with the classifier head
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from peft import LoraConfig, VeraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification

import giva
from giva.assets import resolve_model
from giva.finetune import directory_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--targets", default="query,value")
    args = parser.parse_args()
    targets = args.targets.split(",")
    configs = {
        "GiVA r=8 (Vr: B regenerated from seed)": giva.GivaConfig(r=8, target_modules=targets, task_type="SEQ_CLS"),
        "GiVA r=8 (VrUr: B stored)": giva.GivaConfig(r=8, variant="VrUr", target_modules=targets, task_type="SEQ_CLS"),
        "LoRA r=8": LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type="SEQ_CLS"),
        "VeRA r=256 (projections saved)": VeraConfig(r=256, target_modules=targets, task_type="SEQ_CLS"),
        "VeRA r=1024 (projections saved)": VeraConfig(r=1024, target_modules=targets, task_type="SEQ_CLS"),
    }
    path = resolve_model(args.model)
    print(f"| adapter ({args.model}, {args.targets}, classifier head included) | trainable params | adapter file |")
    print("|---|---:|---:|")
    for name, config in configs.items():
        torch.manual_seed(0)
        model = get_peft_model(AutoModelForSequenceClassification.from_pretrained(path, num_labels=2), config)
        if isinstance(config, giva.GivaConfig) and config.variant == "VrUr":
            for layer in (m for m in model.modules() if isinstance(m, giva.GivaLayer)):
                layer.giva_A["default"].normal_()  # stand-in bases: the size does not depend on their values
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            size = directory_bytes(tmp)
        trainable, _ = model.get_nb_trainable_parameters()
        print(f"| {name} | {trainable:,} | {size / 1024:.1f} KiB |")


if __name__ == "__main__":
    main()
