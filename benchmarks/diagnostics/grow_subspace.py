"""Exploratory diagnostic beside gap candidate (h): how far the input directions grown mid-training (from the
gradient of the adapted model, with the first 8 rows' span removed) are from those the pretrained gradient ranks
9th to 16th (what the control row 'r16' trains from the start), on every linear layer of MiniLM.

It runs (h)'s own recipe for one seed: giva-k100-r8 at r=16 with 8 rows held back, the evidence suite's task,
training batches, head LR and schedule, at the LR given (default: (b)'s chosen LR on the task), and stops right
after the bases have grown (half the steps). No validation or test data is read.

Usage: .venv/bin/python benchmarks/diagnostics/grow_subspace.py [sst|uncertainty] [LR]   (about 3 min on 2 cores)
Prints, per layer, the mean principal cosine between the grown rows and the pretrained gradient's rows 9-16, and
between the grown rows and the pretrained top-16 span; the last line averages them over the layers.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from giva.bench.grow import GrowHook, hold_back_rows
from giva.bench.methods import build_model
from giva.bench.runner import RunSpec, load_runs, shared_head_lr, train_config_for
from giva.bench.spec import Ablation, load_method, load_suite
from giva.bench.tasks import load_task
from giva.finetune import train
from giva.init.sketch import principal_cosines
from giva.layer import GivaLayer

ROOT = Path(__file__).parents[1]
CHOSEN_LR = {"sst": 0.04, "uncertainty": 0.08}  # (b)'s LR chosen on validation (results.md, gap study)


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
    rows = []
    for name, layer in layers.items():
        grown = layer.giva_A["default"][8:].float()
        rows.append((float(principal_cosines(grown, pretrained[name][8:]).mean()),
                     float(principal_cosines(grown, pretrained[name]).mean())))
        print(f"{name:60s} cosine with pretrained rows 9-16 {rows[-1][0]:.3f}, with the pretrained top-16 span {rows[-1][1]:.3f}")
    means = [statistics.mean(row[i] for row in rows) for i in range(2)]
    print(f"mean over {len(rows)} layers (task {task_name}, LR {lr}, grown after step {hook.step}, {hook.seconds:.0f} s): "
          f"cosine with pretrained rows 9-16 {means[0]:.3f}, with the pretrained top-16 span {means[1]:.3f}")


if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 else "sst"
    main(name, float(sys.argv[2]) if len(sys.argv) > 2 else CHOSEN_LR[name])
