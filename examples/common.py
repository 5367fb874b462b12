"""Model and data shared by the distributed examples (all offline: SmolLM2 and the Pang & Lee sentences).

``--model tiny`` is a 2-layer randomly initialised Llama with SmolLM2's tokenizer (seconds per
step on a laptop CPU); ``--model smollm2`` is the real SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import argparse

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from giva import GivaConfig
from giva.assets import smollm2_path
from giva.data import load_bundled


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8, help="per rank")
    parser.add_argument("--lr", type=float, default=2e-2)
    parser.add_argument("--output-dir", default="giva-distributed-example")
    return parser.parse_args()


def tokenizer() -> AutoTokenizer:
    tok = AutoTokenizer.from_pretrained(smollm2_path())
    tok.pad_token = tok.pad_token or tok.eos_token
    return tok


def giva_model(name: str) -> torch.nn.Module:
    """The same model on every rank: the seed fixes the random weights and GiVA's seeded bases."""
    if name == "smollm2":
        base = AutoModelForCausalLM.from_pretrained(smollm2_path())
    else:
        torch.manual_seed(0)
        vocab = len(tokenizer())
        base = LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128,
        ))
    config = GivaConfig(r=8, task_type="CAUSAL_LM", seed=0)  # target_modules=None: every linear layer but the head
    return get_peft_model(base, config)


class Sentences(torch.utils.data.Dataset):
    """Pang & Lee movie-review sentences as causal-LM rows (padding masked out of the labels)."""

    def __init__(self, max_length: int = 48) -> None:
        tok = tokenizer()
        enc = tok(load_bundled("pang-lee").texts, max_length=max_length, truncation=True, padding="max_length", return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        self.rows = [
            {"input_ids": i, "attention_mask": m, "labels": lab}
            for i, m, lab in zip(enc["input_ids"], enc["attention_mask"], labels)
        ]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.rows[index]
