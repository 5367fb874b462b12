"""Cost per element of the checks a dense fp32 sum can get (one thread): the old Tensor.any, the pre-package
torch.any(g != 0), and torch.aminmax (giva.init.session.InitSession.check since 0e7ee39).

    OMP_NUM_THREADS=1 python scripts/scale_check_cost.py > benchmarks/results/scale/exact_peak_diagnosis/check_cost.txt
"""
import time

import torch

torch.set_num_threads(1)
a = torch.randn(1536, 576)  # one SmolLM2 MLP sum
n = 200
checks = {
    "isfinite(sum)": lambda: torch.isfinite(a.sum()),
    "Tensor.any": lambda: a.any(),
    "torch.any(g != 0)": lambda: torch.any(a != 0),
    "torch.aminmax": lambda: torch.aminmax(a),
}
for name, check in checks.items():
    check()
    start = time.perf_counter()
    for _ in range(n):
        check()
    print(f"{name}: {(time.perf_counter() - start) / n / a.numel() * 1e9:.2f} ns per element")
