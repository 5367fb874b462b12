"""Exploratory diagnostic beside gap candidate (h): how far the input directions grown mid-training (from the
gradient of the adapted model, with the first 8 rows' span removed) are from those the pretrained gradient ranks
9th to 16th (what the control row 'r16' trains from the start), on every linear layer of MiniLM.

It runs (h)'s own recipe for one seed: giva-k100-r8 at r=16 with 8 rows held back, the evidence suite's task,
training batches, head LR and schedule, at the LR given (default: the LR the row 'grow' chose on validation), and
stops right after the bases have grown (half the steps): seed 0 of that row up to that point. No validation or test data is read.

Usage: .venv/bin/python benchmarks/diagnostics/grow_subspace.py [sst|uncertainty] [LR]   (about 3 min on 2 cores)
Prints, per layer: the mean principal cosine between the grown rows and the pretrained gradient's rows 9-16; the share
of the adapted model's gradient G (squared Frobenius norm) in the span of rows 1-8 (the pretrained directions still
in use); and the share of the rest of G (its component outside rows 1-8) that the grown rows capture (the most any 8
directions can) against the share the pretrained rows 9-16 capture. The last line averages them over the layers.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

from giva.bench.grow import GrowHook, adapted_gradients, hold_back_rows
from giva.bench.methods import build_model
from giva.bench.runner import RunSpec, load_runs, shared_head_lr, train_config_for
from giva.bench.spec import Ablation, load_method, load_suite
from giva.bench.tasks import load_task
from giva.finetune import train
from giva.init.sketch import principal_cosines
from giva.layer import GivaLayer

ROOT = Path(__file__).parents[1]
CHOSEN_LR = {"sst": 0.04, "uncertainty": 0.04}  # the row 'grow' (phases gap-grow*): LR chosen on validation


class Stop(Exception):
    pass


def main(task_name: str, lr: float) -> None:
    suite = load_suite(ROOT, "evidence")
    task = load_task(suite.tasks[task_name])
    ablation = Ablation("grow", {"r": 16}, {})  # held back by hand below, after reading the pretrained rows
    method = load_method(ROOT, "giva-k100-r8").with_overrides(ablation.peft, ablation.init)
    head_lr, _ = shared_head_lr(suite, ROOT, load_runs(ROOT / "results" / "evidence" / "runs"), task_name, method)
    run = RunSpec("diagnostic", task_name, method.name, 0, lr, ablation, head_lr)
    config = train_config_for(suite, task, run, method.train)
    model = build_model(method, task, 0, calibration=task.train_loader(0), head_lr=head_lr).model
    layers = {name: m for name, m in model.named_modules() if isinstance(m, GivaLayer)}
    pretrained = {name: m.giva_A["default"].float().clone() for name, m in layers.items()}  # 16 x in, orthonormal
    hold_back_rows(model, 8)
    loader = task.train_loader(0)
    hook = GrowHook(model, lambda: task.train_loader(0), 8, 0.5, len(loader))

    def grow_then_stop(step: int) -> None:
        hook(step)
        if hook.seconds is not None:
            raise Stop

    try:
        train(model, loader, config, progress=False, on_step_end=grow_then_stop)
    except Stop:
        pass
    # the gradient the growth used (the grown rows' lambda_s are 0: the model, hence its gradient, is unchanged)
    gradients = adapted_gradients(model, task.train_loader(0), list(layers.values()))
    rows = []
    for (name, layer), gradient in zip(layers.items(), gradients):
        used, grown, late = pretrained[name][:8], layer.giva_A["default"][8:].float(), pretrained[name][8:]
        rest = gradient - (gradient @ used.T) @ used

        def share(a: torch.Tensor, g: torch.Tensor) -> float:
            return float((g @ a.T).square().sum() / g.square().sum())

        rows.append((float(principal_cosines(grown, late).mean()), share(used, gradient), share(grown, rest), share(late, rest)))
        print(f"{name:60s} cosine {rows[-1][0]:.3f}  share of G in rows 1-8 {rows[-1][1]:.3f}; "
              f"of the rest in the grown rows {rows[-1][2]:.3f}, in pretrained rows 9-16 {rows[-1][3]:.3f}")
    means = [statistics.mean(row[i] for row in rows) for i in range(4)]
    print(f"mean over {len(rows)} layers (task {task_name}, LR {lr}, grown after step {hook.step}): cosine between grown rows "
          f"and pretrained rows 9-16 {means[0]:.3f}; share of the adapted gradient G in rows 1-8 {means[1]:.3f}; of the "
          f"rest of G in the grown rows {means[2]:.3f}, in pretrained rows 9-16 {means[3]:.3f}")


if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 else "sst"
    main(name, float(sys.argv[2]) if len(sys.argv) > 2 else CHOSEN_LR[name])
