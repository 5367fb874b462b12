"""Exploratory diagnostic behind gap candidate (f): how far the input directions of the per-batch gradients
(top-r eigenvectors of sum_b G_b^T G_b) are from those of their sum (top-r right singular vectors of sum_b G_b),
on every linear layer of MiniLM, with the evidence suite's task, seed-0 head and training batches (no validation
or test data is read).

Usage: .venv/bin/python benchmarks/diagnostics/moment_subspace.py [sst|uncertainty]   (about 2 min on 2 cores)
Prints, per layer, the mean principal cosine between the two r=8 subspaces and the share of the batch gradients'
energy (trace of A S A^T over trace of S) each captures; the last line averages them over the layers.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

from giva.bases import top_eigenvectors
from giva.bench.methods import load_base
from giva.bench.spec import load_suite
from giva.bench.tasks import load_task
from giva.init.sketch import principal_cosines

RANK = 8


def main(task_name: str) -> None:
    torch.set_num_threads(1)
    task = load_task(load_suite(Path(__file__).parents[1], "evidence").tasks[task_name])
    model = load_base(task, seed=0)
    targets = {
        name: module for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and "classifier" not in name and "pooler" not in name
    }
    for param in model.parameters():
        param.requires_grad_(False)
    for module in targets.values():
        module.weight.requires_grad_(True)
    model.eval()
    total = {name: torch.zeros_like(m.weight, dtype=torch.float64) for name, m in targets.items()}
    moment = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for name, m in targets.items()}
    for batch in task.train_loader(0):
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        for name, module in targets.items():
            grad = module.weight.grad.double()
            total[name] += grad
            moment[name] += grad.mT @ grad
    rows = []
    for name in targets:
        a_sum = torch.linalg.svd(total[name], full_matrices=False)[2][:RANK].float()
        a_moment = top_eigenvectors(moment[name], RANK).mT
        trace = moment[name].trace()

        def energy(a: torch.Tensor, name: str = name, trace: torch.Tensor = trace) -> float:
            return float((a.double() @ moment[name] @ a.double().mT).trace() / trace)

        rows.append((float(principal_cosines(a_sum, a_moment).mean()), energy(a_sum), energy(a_moment)))
        print(f"{name:50s} cosine {rows[-1][0]:.3f}  batch-gradient energy: sum's A {rows[-1][1]:.3f}, moment's A {rows[-1][2]:.3f}")
    means = [statistics.mean(row[i] for row in rows) for i in range(3)]
    print(f"mean over {len(rows)} layers: cosine {means[0]:.3f}, energy sum's A {means[1]:.3f}, moment's A {means[2]:.3f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "sst")
