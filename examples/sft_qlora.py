"""GiVA in your own TRL script, QLoRA style: an NF4 base, bf16, GiVA r=8 on every linear layer but the head.

    python examples/sft_qlora.py                                   # offline SmolLM2-135M-Instruct on Pang & Lee (make setup)
    python examples/sft_qlora.py --model PATH --data my.jsonl      # prompt/completion or chat 'messages' rows
    torchrun --nproc_per_node 8 -- examples/sft_qlora.py ...       # one process per GPU

Three things differ from a LoRA script: the config is ``giva.GivaConfig``, ``giva.GivaInitCallback`` fills the
bases from the trainer's first batches before the first step (k=4), and keeps the vectors in fp32 where TRL casts a
quantised model's trainable parameters to bf16; and ``import giva`` registers GiVA with PEFT (in the process that
reloads the adapter too). `giva sft` runs these same calls and adds the checks before loading, the validation and
exact match, checkpoints and the atomic save (docs/sft.md).
"""

from __future__ import annotations

import argparse
import os

import torch
from datasets import Dataset, load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from trl import SFTConfig, SFTTrainer

import giva
from giva.assets import resolve_model
from giva.sft.data import load_sft_data


def quantisation() -> BitsAndBytesConfig:
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def rows(data: str) -> Dataset:
    """A JSONL file through datasets, or one of giva's bundled sets ('pang-lee') as prompt/completion rows."""
    if data.endswith((".jsonl", ".json")):
        return load_dataset("json", data_files=data, split="train")
    return Dataset.from_list(load_sft_data(data, val_size=0.1, seed=0, chat=True).train)


def main(argv: list[str] | None = None) -> SFTTrainer:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="a folder, a hub id, or 'smollm2' (offline)")
    parser.add_argument("--data", default="pang-lee", help="a JSONL file, or 'pang-lee' (offline)")
    parser.add_argument("--output-dir", default="outputs/sft-qlora-example")
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-2)
    args = parser.parse_args(argv)

    path = resolve_model(args.model)
    cuda = torch.cuda.is_available()
    device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if cuda else "cpu"  # under torchrun: this process's GPU
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantisation(), dtype=torch.bfloat16,
                                                 device_map={"": device})
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
                       learning_rate=args.lr, bf16=True,
                       gradient_checkpointing=True,  # named activation_checkpointing in newer transformers, which warn here
                       logging_steps=5, save_strategy="no", report_to=[], use_cpu=not cuda),
        train_dataset=rows(args.data),
        processing_class=AutoTokenizer.from_pretrained(path),
        peft_config=giva.GivaConfig(r=8, target_modules="all-linear"),  # TRL leaves the LM head out
        callbacks=[giva.GivaInitCallback()],  # k=4 batches by default; num_batches=1 is the paper's
    )
    trainer.train()
    trainer.save_model(args.output_dir)  # the adapter only: PeftModel.from_pretrained(4-bit base, output_dir)
    return trainer


if __name__ == "__main__":
    main()
