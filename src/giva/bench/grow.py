"""Gap candidate (h): part of GiVA's input basis taken from the gradient of the *adapted* model, mid-training.

A GiVA method with ``init.grow_rows = m`` (and rank ``r``) starts as GiVA at rank ``r - m``: after
``giva.initialize``, the last ``m`` rows of each layer's ``A`` are zeroed and their ``lambda_s`` entries set to 0,
so they are inert (no output, no gradient). After the fraction ``init.grow_at`` of the training steps,
:func:`grow_bases` takes the loss gradient with respect to each adapted weight ``W`` at the current model (adapters
on, trained head, every training batch, dropout off, the same sum as ``initialize``), removes its component in the
span of the rows already in use, and writes the top-``m`` right singular vectors of the rest into the held-back
rows. Their ``lambda_s`` entries start at 0, so the model's function is unchanged at that step and training
continues; ``B`` (seeded) and every other tensor are untouched. It is the mechanism of the question "does a
subspace that follows training close the gap to LoRA?", within GiVA's parameter budget (``r`` + ``out`` vectors
per layer). Exploratory, benchmark-only: nothing in the library depends on it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..init.capture import calibration_mode
from ..layer import GivaLayer


def _layers(model: nn.Module, adapter: str) -> list[GivaLayer]:
    layers = [m for m in model.modules() if isinstance(m, GivaLayer) and adapter in m.giva_A]
    for layer in layers:
        if len(layer.blocks[adapter]) != 1 or layer.fan_in_fan_out:
            raise ValueError(f"init.grow_rows: layer {layer.layer_name!r} is fused or Conv1D; only plain nn.Linear layers grow")
    return layers


def _write_rows(layer: GivaLayer, adapter: str, rows: torch.Tensor) -> None:
    """The last ``len(rows)`` rows of the layer's (single-block) ``A`` replaced, through ``set_block_bases``."""
    (block,) = layer.blocks[adapter]
    a = layer.giva_A[adapter].float().clone()
    a[-len(rows):] = rows
    layer.set_block_bases(adapter, block, a, layer.giva_B[adapter].float())


@torch.no_grad()
def hold_back_rows(model: nn.Module, rows: int, adapter: str = "default") -> None:
    """Zero the last ``rows`` rows of every layer's ``A`` and their ``lambda_s`` entries (inert until grown)."""
    for layer in _layers(model, adapter):
        _write_rows(layer, adapter, torch.zeros(rows, layer.in_features))
        layer.giva_lambda_s[adapter][-rows:] = 0.0


def adapted_gradients(model: nn.Module, loader: DataLoader, layers: list[GivaLayer]) -> list[torch.Tensor]:
    """The loss gradient with respect to each layer's base ``W`` at the current model (adapters on), summed over
    ``loader``'s batches, dropout off, fp32. The global RNG, every ``requires_grad`` flag, every ``.grad`` and the
    train/eval modes are as before (the gradient goes to the base weights only, through ``autograd.grad``)."""
    weights = [layer.get_base_layer().weight for layer in layers]
    flags = [w.requires_grad for w in weights]
    sums = [torch.zeros(w.shape, dtype=torch.float32, device=w.device) for w in weights]
    try:
        for w in weights:
            w.requires_grad_(True)
        with torch.random.fork_rng(devices=[]), calibration_mode(model):
            for batch in loader:
                grads = torch.autograd.grad(model(**batch).loss, weights)
                for total, grad in zip(sums, grads):
                    total += grad.float()
    finally:
        for w, flag in zip(weights, flags):
            w.requires_grad_(flag)
    return sums


def grow_bases(model: nn.Module, loader: DataLoader, rows: int, adapter: str = "default") -> float:
    """Fill the ``rows`` held-back rows of every layer's ``A`` from :func:`adapted_gradients` (the component in the
    span of the rows in use removed); returns the seconds it took. Nothing else changes."""
    start = time.perf_counter()
    layers = _layers(model, adapter)
    sums = adapted_gradients(model, loader, layers)
    with torch.no_grad():
        for layer, gradient in zip(layers, sums):
            used = layer.giva_A[adapter][:-rows].float()  # (r - rows) x in, orthonormal rows
            rest = gradient - (gradient @ used.T) @ used
            _write_rows(layer, adapter, torch.linalg.svd(rest, full_matrices=False).Vh[:rows])
    return time.perf_counter() - start


class GrowHook:
    """``train``'s ``on_step_end``: grows the bases once, after step ``round(at * total_steps)`` (at least 1, at most
    the last step but one)."""

    def __init__(self, model: nn.Module, loader_factory: Callable[[], DataLoader], rows: int, at: float, total_steps: int):
        self.model, self.loader_factory, self.rows = model, loader_factory, rows
        self.step = max(1, min(total_steps - 1, round(at * total_steps)))
        self.seconds: Optional[float] = None

    def __call__(self, step: int) -> None:
        if step == self.step:
            self.seconds = grow_bases(self.model, self.loader_factory(), self.rows)
