"""Step-time comparison in one process, interleaved: every step, each method trains on the same batch.

Timing methods one after another on a shared 2-core machine lets background load favour
whichever ran in a quiet minute; interleaving (with the order rotated every step) exposes all
methods to the same load, so the ratios to LoRA are meaningful even when absolute times drift.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from ..finetune import is_head_parameter, parameter_groups
from .methods import build_model
from .schema import SCHEMA_VERSION
from .spec import Phase, SuiteSpec, load_method
from .tasks import TaskData
from .versions import versions


def run_speed_phase(suite: SuiteSpec, phase: Phase, task: TaskData, root: Any) -> dict[str, Any]:
    seed = phase.seeds[0]
    loader = task.train_loader(seed)
    batches = []
    while len(batches) < phase.steps:
        batches += list(loader)
    batches = batches[: phase.steps]
    entries: dict[str, dict[str, Any]] = {}
    for name in phase.methods:
        method = load_method(root, name)
        built = build_model(method, task, seed, calibration=task.train_loader(seed))
        model = built.model
        model.train()
        optimizer = None if method.kind == "floor" else torch.optim.AdamW(parameter_groups(model, method.lr, None, 0.0))
        params = [p for group in optimizer.param_groups for p in group["params"]] if optimizer else []
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        entries[name] = {
            "model": model,
            "optimizer": optimizer,
            "params": params,
            "times": [],
            "init_seconds": built.init_seconds,
            "gradient_seconds": built.gradient_seconds,
            "svd_seconds": built.svd_seconds,
            "trainable_adapter": sum(p.numel() for n, p in trainable if not is_head_parameter(n.replace("base_model.model.", ""))),
            "rank": method.rank,
            "family": method.family,
            "target_modules": method.targets(task.spec.target_modules),
        }
    names = list(entries)
    for step, batch in enumerate(batches):
        shift = step % len(names)
        for name in names[shift:] + names[:shift]:
            e = entries[name]
            start = time.perf_counter()
            loss = e["model"](**batch).loss
            loss.backward()
            if e["optimizer"] is not None:  # the floor has no parameters to update
                torch.nn.utils.clip_grad_norm_(e["params"], 1.0)
                e["optimizer"].step()
                e["optimizer"].zero_grad(set_to_none=True)
            e["times"].append(time.perf_counter() - start)
    lora = next((n for n in names if entries[n]["family"] == "lora"), None)
    floor = next((n for n in names if entries[n]["family"] == "floor"), None)
    medians = {n: statistics.median(entries[n]["times"][phase.warmup_steps:]) for n in names}
    methods = {}
    for n in names:
        e = entries[n]
        methods[n] = {
            "family": e["family"],
            "rank": e["rank"],
            "median_step_seconds": medians[n],
            "step_seconds": [round(t, 5) for t in e["times"]],
            "init_seconds": e["init_seconds"],
            "gradient_seconds": e["gradient_seconds"],
            "svd_seconds": e["svd_seconds"],
            "init_in_steps": e["init_seconds"] / medians[n],
            "init_in_lora_steps": e["init_seconds"] / medians[lora] if lora else None,
            # step time above the frozen model's own forward + backward, relative to that floor
            "overhead_above_floor": (medians[n] - medians[floor]) / medians[floor] if floor else None,
            "trainable_adapter": e["trainable_adapter"],
            "target_modules": e["target_modules"],
            "ratio_to_lora": medians[n] / medians[lora] if lora else None,
        }
    shapes = [tuple(b["input_ids"].shape) for b in batches]
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "speed",
        "run_id": f"speed__{phase.name}",
        "suite": suite.name,
        "phase": phase.name,
        "task": {"name": task.spec.name, "model": task.spec.model, "target_modules": list(task.spec.target_modules),
                 "batch_shapes": shapes[:3], "kind": task.spec.kind},
        "versions": versions(),
        "steps": phase.steps,
        "warmup_steps": phase.warmup_steps,
        "methods": methods,
    }
