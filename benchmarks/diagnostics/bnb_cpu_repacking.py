"""Diagnostic behind docs/quantization.md's section on CPUs with AVX512-BF16: what bitsandbytes' inference repacking
does to training and merging of a 4-bit model, with and without GiVA's fix, and to PEFT's LoRA.

A seeded tiny Llama (hidden 64, 2 layers) is loaded in NF4 (fp32 compute). Each case trains nothing: it takes the
adapter's parameter gradients of one batch, runs one eval-mode forward under ``torch.no_grad()`` (what an evaluation
does), and takes them again; then, for GiVA, merges and compares the logits. "GiVA without the fix" wraps the model
with ``keep_4bit_layers_trainable`` turned into a no-op. It also prints bitsandbytes' CPU round-trip error of a
32 x 32 and a 64 x 64 weight (NF4, block 64), relative to each block's absmax, and how far each 4-bit weight of
the model is from where it was after a repacking and bitsandbytes' own inverse, with and without GiVA's mend.

Usage: .venv/bin/python benchmarks/diagnostics/bnb_cpu_repacking.py > benchmarks/results/diagnostics/bnb_cpu_repacking.txt
(about 5 s; needs bitsandbytes; the committed output was made on a 2-core Xeon with AVX512-BF16)
On a CPU without AVX512-BF16 bitsandbytes never repacks, and the script says so and measures only the round trip.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed, imported by transformers, logs its guess to stdout

import torch  # noqa: E402

import giva  # noqa: E402
import giva.model  # noqa: E402
from giva.quant import keep_4bit_layers_trainable  # noqa: E402


def round_trip_error(size: int) -> float:
    """Largest |dequantise(quantise(w)) - w| over a block's absmax, NF4, block 64, w ~ N(0, 0.02^2), seed 0."""
    import bitsandbytes.functional as F

    torch.manual_seed(0)
    w = torch.randn(size, size) * 0.02
    q, state = F.quantize_4bit(w, quant_type="nf4", blocksize=64)
    blocks, restored = w.reshape(-1, 64), F.dequantize_4bit(q, state).float().reshape(-1, 64)
    return ((restored - blocks).abs().max(1).values / blocks.abs().max(1).values).max().item()


def inverse_error(folder: str) -> tuple[float, float]:
    """Largest error of every 4-bit weight (NF4, no double quantisation) after bitsandbytes' repacking and its own
    inverse, over the largest weight: as bitsandbytes leaves it, and after ``keep_4bit_layers_trainable``."""
    import bitsandbytes.functional as F
    from bitsandbytes.functional import _convert_weight_packed_for_cpu, _convert_weight_packed_for_cpu_inverse
    from bitsandbytes.nn import Linear4bit
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    errors = ([], [])
    for mended, error in zip((False, True), errors):
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, dtype=torch.float32)
        layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
        before = [F.dequantize_4bit(m.weight.data, m.weight.quant_state) for m in layers]
        for m in layers:  # what each layer's first eval-mode forward does on an AVX512-BF16 CPU
            m.weight.data, m.weight.quant_state = _convert_weight_packed_for_cpu(m.weight.data, m.weight.quant_state)
        if mended:
            keep_4bit_layers_trainable(model)
        else:
            for m in layers:
                m.weight.data, m.weight.quant_state = _convert_weight_packed_for_cpu_inverse(m.weight.data, m.weight.quant_state)
        for m, w in zip(layers, before):
            error.append(((F.dequantize_4bit(m.weight.data, m.weight.quant_state) - w).abs().max() / w.abs().max()).item())
    return max(errors[0]), max(errors[1])


def gradients(model: Any, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def case(folder: str, config: Any, ids: torch.Tensor, merge: bool) -> str:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, dtype=torch.float32)
    torch.manual_seed(1)
    model = get_peft_model(base, config)
    before = gradients(model, ids)
    evaluated = logits(model, ids)  # the evaluation pass
    after = gradients(model, ids)
    moved = max(((before[k] - after[k]).abs().max() / before[k].abs().max()).item() for k in after) if after else None
    line = f"{len(after)} of {len(before)} trainable tensors get a gradient after it"
    line += f", largest change {moved:.2f} of the entry's largest" if moved is not None else ""
    if merge:
        with model.disable_adapter():
            effect = (evaluated - logits(model, ids)).abs().max().item()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.merge_adapter()
        line += f"; merge moves the logits by {(logits(model, ids) - evaluated).abs().max().item():.2f}"
        line += f" against an adapter effect of {effect:.2f}"
    return line


def main() -> None:
    from bitsandbytes.functional import has_avx512bf16
    from peft import LoraConfig
    from transformers import LlamaConfig, LlamaForCausalLM

    warnings.filterwarnings("ignore")  # transformers' deprecations; torch's about gemv_4bit's missing backward is the point
    print(f"bitsandbytes NF4 round trip, largest error / block absmax: 32 x 32 {round_trip_error(32):.2f}, "
          f"64 x 64 {round_trip_error(64):.2f}")
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    qv = ["q_proj", "v_proj"]
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        LlamaForCausalLM(config).save_pretrained(folder)
        raw, mended = inverse_error(folder)
        print(f"repacked then restored (NF4, no double quantisation), largest error / largest weight: bitsandbytes' "
              f"inverse {raw:.2f}, with GiVA's mend {mended:.4f}")
        if not has_avx512bf16():
            print("this CPU has no AVX512-BF16: bitsandbytes never repacks here, nothing more to measure")
            return
        for fixed in (False, True):
            giva.model.keep_4bit_layers_trainable = keep_4bit_layers_trainable if fixed else (lambda model: None)
            label = "with the fix" if fixed else "without the fix"
            for targets, name in ((qv, "q/v"), (None, "every linear layer")):
                config = giva.GivaConfig(r=4, init_weights=False, target_modules=targets)
                print(f"GiVA r=4 on {name}, {label}: {case(folder, config, ids, merge=True)}")
        for targets, name in ((qv, "q/v"), ("all-linear", "every linear layer")):
            config = LoraConfig(r=4, target_modules=targets, init_lora_weights=False)
            print(f"PEFT LoRA r=4 on {name}: {case(folder, config, ids, merge=False)}")


if __name__ == "__main__":
    main()
