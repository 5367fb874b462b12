"""`giva sft` as a user launches it under torchrun, then exact match split over the processes.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 tests/dist/sft_cli.py OUT_DIR SFT_ARGS...

Each rank writes rank<r>.json: the CLI's exit code and what it printed, and the exact match that
``giva.sft.exact_match`` reports on every rank for a stub model whose right answers are known.
"""

from __future__ import annotations

import io
import json
import os
import sys
from contextlib import redirect_stdout
from pathlib import Path

import teardown
import torch
from transformers import AutoTokenizer

from giva.cli import main
from giva.sft import exact_match


class _Echo(torch.nn.Module):
    """Answers each prompt with the prompt's last token: right exactly where the reference is that word."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def generate(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.cat([input_ids, input_ids[:, -1:]], dim=1)


def run() -> None:
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    printed = io.StringIO()
    with redirect_stdout(printed):
        code = main(argv)
    tokenizer = AutoTokenizer.from_pretrained(argv[argv.index("--model") + 1])
    words = ["good", "bad", "great", "awful", "film", "plot", "review"]  # 7 prompts: the two ranks get 4 and 3
    references = [w if i % 3 else "positive" for i, w in enumerate(words)]  # right on 4 of 7
    prompts = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in words]
    score = exact_match(_Echo(), tokenizer, prompts, references, batch_size=2)
    record = {"rank": int(os.environ["RANK"]), "code": code, "stdout": printed.getvalue(), "exact_match": score,
              "expected": sum(w == r for w, r in zip(words, references)) / len(words)}
    (out / f"rank{record['rank']}.json").write_text(json.dumps(record))
    teardown.end()


if __name__ == "__main__":
    run()
