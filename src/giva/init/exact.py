"""The exact path: accumulate the dense block gradient ``G = sum_t g_t x_t^T`` (``out x in``, fp32), then SVD.

Memory is 4 bytes per targeted weight (held for every target at once, independent of the number
of batches); one pass over the calibration batches. ``mode="sketch"`` (``sketch.py``) avoids the
dense matrix for large models.
"""

from __future__ import annotations

import torch

from ..bases import bases_from_gradient


def accumulate_dense(total: torch.Tensor | None, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``total + g^T x``: x ``T x in``, g ``T x out`` -> ``out x in`` (fp32)."""
    product = g.float().mT @ x.float()
    return product if total is None else total.add_(product)


def bases_from_dense(
    gradient: torch.Tensor, rank: int, variant: str, generator: torch.Generator, svd: str, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` from the block gradient (``out x in``; any positive multiple: a sum or a mean) by its SVD (``svd``: GivaConfig.svd)."""
    return bases_from_gradient(gradient, rank, variant, generator, svd=svd, svd_seed=seed)
