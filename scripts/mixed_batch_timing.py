"""Time one mixed-adapter forward: N GiVA r=8 vs N PEFT LoRA r=8 adapters on MiniLM-L6 (every linear layer).

    .venv/bin/python scripts/mixed_batch_timing.py --n 32 --batch 32 --seq 32

Each row of the batch uses a random adapter among N; prints the wall time of 3 forwards per method after a warm-up.
A quick stand-in for `giva bench --suite serve` when the machine has no time for the whole grid.
"""

from __future__ import annotations

import argparse
import time

import torch
from peft import get_peft_model

import giva  # noqa: F401  (registers GiVA with PEFT)
from giva.bench.serve import _config, _minilm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    ids = torch.randint(0, 30000, (args.batch, args.seq))
    for method in ("giva", "lora"):
        model = get_peft_model(_minilm().eval(), _config(method, "all-linear", 8), adapter_name="t0")
        for i in range(1, args.n):
            model.add_adapter(f"t{i}", _config(method, "all-linear", 8))
        model.eval()
        names = [f"t{i}" for i in torch.randint(0, args.n, (args.batch,)).tolist()]
        with torch.inference_mode():
            model(input_ids=ids, adapter_names=names)
            for _ in range(3):
                start = time.perf_counter()
                model(input_ids=ids, adapter_names=names)
                print(method, f"{time.perf_counter() - start:.2f} s", flush=True)


if __name__ == "__main__":
    main()
