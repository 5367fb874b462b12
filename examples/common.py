"""Model, data and training loop shared by the distributed examples (all offline: SmolLM2 and the
Pang & Lee sentences). What is GiVA-specific stays in each example; this file holds the rest.

``--model tiny`` is a 2-layer randomly initialised Llama with SmolLM2's tokenizer (seconds per
step on a laptop CPU); ``--model smollm2`` is the real SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

# giva before peft: PEFT imports bitsandbytes when it is installed (its "Failed to load CPU gemm_4bit_forward" line
# on every rank); giva keeps it unimported until a quantised model is asked for.
import giva  # noqa: F401

# isort: split
import torch
import torch.distributed as dist
from peft import get_peft_model
from torch.utils.data import DataLoader, DistributedSampler
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from giva import GivaConfig
from giva.assets import smollm2_path
from giva.data import load_bundled
from giva.integrations.distributed import full_state_dict, replication_mismatches, unwrap_model


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8, help="per rank")
    parser.add_argument("--lr", type=float, default=2e-2)
    parser.add_argument("--output-dir", default="outputs/giva-distributed-example")
    return parser.parse_args()


def init_distributed() -> torch.device:
    """Join torchrun's process group (nccl on GPUs, gloo on CPU); returns this rank's device."""
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", dist.get_rank() % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


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


def rank_loader(batch_size: int) -> DataLoader:
    """:class:`Sentences` with a ``DistributedSampler``: each rank gets its own shard of the rows."""
    data = Sentences()
    return DataLoader(data, batch_size=batch_size, sampler=DistributedSampler(data, seed=0))


def train(
    model: torch.nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, steps: int, *, verbose: bool,
    device: torch.device | None = None, backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
) -> None:
    """The ordinary training loop, the same under every engine: ``steps`` batches from ``loader``
    (moved to ``device`` if given), ``backward`` being the engine's (e.g. ``accelerator.backward``)."""
    model.train()
    for step, batch in zip(range(steps), loader):
        if device is not None:
            batch = {k: v.to(device) for k, v in batch.items()}
        loss = model(**batch).loss
        backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if verbose and step % 5 == 0:
            print(f"step {step}: loss {loss.item():.3f}")


def check_and_save(model: torch.nn.Module, output_dir: str) -> None:
    """Call on every rank after training (both steps are collectives): check that GiVA's tensors are
    bit-identical on all ranks, gather them whole (FSDP2 shards them), and save the adapter on rank 0.
    ``model`` may be DDP-wrapped or sharded; the saved adapter loads in one process."""
    assert not replication_mismatches(model), "GiVA tensors differ across ranks"
    state = full_state_dict(model)
    if dist.get_rank() == 0:
        unwrap_model(model).save_pretrained(output_dir, state_dict=state)
        print(f"world size {dist.get_world_size()}; adapter saved to {output_dir}")
