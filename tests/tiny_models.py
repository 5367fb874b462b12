"""Tiny seeded models and batches shared by the tests (all build in milliseconds, no downloads)."""

from __future__ import annotations

import torch
import transformers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    ViTConfig,
    ViTForImageClassification,
)

import giva  # noqa: F401  (registers GiVA with PEFT)

VOCAB = 100
# The oldest supported transformers (MIN_TRANSFORMERS_VERSION, tests/transformers_min/) is a 4.x: the few tests whose
# fixtures or expectations differ there (module names, logged loss, log lines) branch on this, with the reason.
TRANSFORMERS_4 = int(transformers.__version__.split(".")[0]) < 5


def tiny_bert(seed: int = 0, num_labels: int = 2) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        num_labels=num_labels, max_position_embeddings=64,
    )
    return BertForSequenceClassification(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()


# bitsandbytes' CPU 4-bit kernels quantise a layer with fewer inputs than their block (64) to garbage on AVX512
# CPUs (relative error 0.87 against 0.15); real models never have one. Tiny models that get quantised use these.
QUANTISABLE = dict(hidden_size=64, intermediate_size=128)


def tiny_llama(seed: int = 0, hidden_size: int = 32, intermediate_size: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def tiny_vit(seed: int = 0) -> ViTForImageClassification:
    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=16, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=3,
    )
    return ViTForImageClassification(config).eval()


def text_batches(n: int = 4, batch: int = 4, length: int = 10, labels: str = "cls", seed: int = 0) -> list[dict]:
    """Seeded token batches; ``labels`` is 'cls' (class ids) or 'lm' (the inputs, for causal LMs)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (batch, length), generator=generator)
        target = torch.randint(0, 2, (batch,), generator=generator) if labels == "cls" else ids.clone()
        out.append({"input_ids": ids, "labels": target})
    return out
