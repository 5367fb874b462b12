"""The exact path: accumulate the dense block gradient ``G = sum_t g_t x_t^T`` (``out x in``, fp32); the session
takes its SVD (:func:`giva.bases.gradient_bases`).

Memory is 4 bytes per targeted weight (held for every target at once, independent of the number
of batches); one pass over the calibration batches. ``mode="sketch"`` (``sketch.py``) avoids the
dense matrix for large models.
"""

from __future__ import annotations

import torch


def accumulate_dense(total: torch.Tensor | None, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``total + g^T x``: x ``T x in``, g ``T x out`` -> ``out x in`` (fp32), in place into ``total``.

    The first batch's product becomes the sum; every later batch is added by the matrix multiply
    itself (``addmm_``: GEMM with beta=1 writes into ``total``), so no ``out x in`` temporary is ever
    formed next to the sums. A per-batch product (``total.add_(g^T x)``, as before) was freed after
    each layer, and glibc did not reuse those blocks: on the 0.5B Llama the heap's free space grew
    by ~1.1 GB over the second batch (peak RSS 5.4 against 4.3 GB before giva.init). Only the
    ``T``-row inputs are cast to fp32 (a copy only when they are not fp32 already).
    """
    if total is None:
        return g.float().mT @ x.float()
    return total.addmm_(g.float().mT, x.float())


def accumulate_gram(total: torch.Tensor | None, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``total + G_b^T G_b`` with ``G_b = g^T x`` (this batch's gradient): ``in x in`` (fp32), in place into ``total``.

    The second moment of the batch gradients (``statistic="second-moment"``): its top eigenvectors are the input
    directions the per-batch gradients use most, whether or not their signs agree across batches. ``G_b`` (``out x
    in``) is formed once per layer per batch, next to the ``in x in`` sum.
    """
    batch = g.float().mT @ x.float()
    if total is None:
        return batch.mT @ batch
    return total.addmm_(batch.mT, batch)

