"""Interleaved timing (base, GiVA, LoRA alternate each round) of MiniLM mixed batches at N adapters: separates method from load noise.

Usage: OMP_NUM_THREADS=1 python scripts/serve_interleaved.py N ROUNDS [MODEL_INDEX: 0 MiniLM-L6 (default), 1 SmolLM2-135M]
"""
import statistics
import sys
import time

import torch
from peft import get_peft_model

from giva.bench.serve import DEFAULT_MODELS, _config, _forward

spec = DEFAULT_MODELS[int(sys.argv[3]) if len(sys.argv) > 3 else 0]
n, rounds = int(sys.argv[1]), int(sys.argv[2])
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, spec.vocab_size, (spec.batch_size, spec.seq_len), generator=g)
names = [f"t{i}" for i in torch.randint(0, n, (spec.batch_size,), generator=g).tolist()]
base = spec.load().eval()
fns = {"base": _forward(base, ids)}
for method in ("giva", "lora"):
    torch.manual_seed(0)
    m = get_peft_model(spec.load().eval(), _config(method, spec.target_modules, 8), adapter_name="t0")
    for i in range(1, n):
        m.add_adapter(f"t{i}", _config(method, spec.target_modules, 8))
    m.eval()
    fns[method] = _forward(m, ids, adapter_names=names)
times = {k: [] for k in fns}
for k, f in fns.items():
    f()
for _ in range(rounds):
    for k, f in fns.items():
        start = time.perf_counter()
        f()
        times[k].append(time.perf_counter() - start)
print(f"{spec.name} N={n} distinct={len(set(names))} rounds={rounds} threads={torch.get_num_threads()}",
      {k: round(ids.numel() / statistics.median(v)) for k, v in times.items()}, "tokens/s (median)")
