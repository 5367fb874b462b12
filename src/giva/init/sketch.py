"""Pure functions for the streaming (sketched) SVD of a layer gradient that is never formed.

For a linear map ``y = W x`` the weight gradient of a block of output rows is
``G = sum_t g_t x_t^T`` (``out x in``; ``x_t`` the layer input, ``g_t = dL/dy_t`` for token ``t``).
Products with ``G`` are sums over tokens, so they are accumulated from ``(x, g)`` blocks as they
stream past, in ``O((in + out) * l)`` memory (``l = k + oversampling``)::

    G^T M = sum_t x_t (g_t^T M)     M: out x l  ->  in x l      (accumulate_gt)
    G   M = sum_t g_t (x_t^T M)     M: in x l   ->  out x l     (accumulate_g)

A randomized range finder alternates the two, one pass over the calibration batches each:
pass 1 ``Y = G^T Omega`` (Gaussian ``Omega``); pass 2 ``Z = G orth(Y)``; pass 3
``Y = G^T orth(Z)`` (one power iteration); ... After pass ``p >= 2`` the last test matrix ``M`` is
orthonormal and ``G`` is approximated by ``Z M^T`` (even p) or ``M Y^T`` (odd p), whose exact SVD
(of the small ``out x l`` / ``in x l`` product) gives both the right singular vectors (A) and the
left ones (B of `VrUr` / `VrU2r`). Halko, Martinsson & Tropp (2011), algorithms 4.3-4.4 and 5.1.

Nothing here knows about models, hooks or ranks: sums from several processes add up.
"""

from __future__ import annotations

import zlib

import torch

from ..bases import _canonical_signs, canonical_column_signs, top_eigenpairs

# Default settings: 3 passes (range, co-range, one power iteration) and l = k + max(2k, 32)
# columns. Real gradients have flat spectra (sigma_8 / sigma_9 ~ 1.02-1.3 on MiniLM), so the
# sketch needs width more than passes. Mean top-r principal cosine of A on SmolLM2-135M's real
# gradients at r=8: 3 passes l=24 0.980, 4 passes l=24 0.990, 5 passes l=24 0.999, 3 passes
# l=40 0.996 (the cheapest: no extra pass over the batches); for k >= 16 the floor of 32 extra
# columns changes nothing (l = 3k: 0.996 at r=32, 0.9995 at r=64 on SmolLM2)
# (benchmarks/results/sketch/sketch_accuracy.md, `giva bench --suite sketch`).
DEFAULT_PASSES = 3
DEFAULT_OVERSAMPLING = None  # None: max(2k, MIN_OVERSAMPLING) extra columns
MIN_OVERSAMPLING = 32


def sketch_width(k: int, rows: int, cols: int, oversampling: int | None = DEFAULT_OVERSAMPLING) -> int:
    """Columns ``l`` of the test matrices for the top-``k`` singular vectors of a ``rows x cols`` matrix."""
    extra = max(2 * k, MIN_OVERSAMPLING) if oversampling is None else oversampling
    if extra < 0:
        raise ValueError(f"oversampling must be >= 0, got {oversampling}")
    return min(k + extra, rows, cols)


def gaussian_test_matrix(rows: int, cols: int, seed: int, key: str) -> torch.Tensor:
    """Seeded Gaussian ``rows x cols`` (fp32, CPU) whose draw depends only on ``(seed, key)``.

    Every process (rank, federated client, server) that knows the seed and the target's key draws
    the same matrix, without touching the global RNG.
    """
    mixed = (int(seed) * 1_000_003 + zlib.crc32(f"sketch:{key}".encode())) % (2**63 - 1)
    generator = torch.Generator(device="cpu").manual_seed(mixed)
    return torch.randn(rows, cols, generator=generator, dtype=torch.float32)


def accumulate_gt(total: torch.Tensor | None, x: torch.Tensor, g: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``total + G_batch^T M`` with ``G_batch = g^T x``: x ``T x in``, g ``T x out``, M ``out x l`` -> ``in x l``."""
    product = x.float().mT @ (g.float() @ m)  # (in x T)(T x l); the T x l middle is all that is formed
    return product if total is None else total.add_(product)


def accumulate_g(total: torch.Tensor | None, x: torch.Tensor, g: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``total + G_batch M`` with ``G_batch = g^T x``: x ``T x in``, g ``T x out``, M ``in x l`` -> ``out x l``."""
    product = g.float().mT @ (x.float() @ m)
    return product if total is None else total.add_(product)


def accumulate_gram(total: torch.Tensor | None, x: torch.Tensor, g: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``total + G_b^T G_b M`` with ``G_b = g^T x`` never formed: x ``T x in``, g ``T x out``, M ``in x l`` -> ``in x l``.

    One batch's product with the second moment ``S = sum_b G_b^T G_b`` (``statistic="second-moment"``): both
    factors of ``G_b`` are in hand within a batch, so ``S M`` streams like ``G^T M``, in ``T x l`` and ``out x l``
    temporaries.
    """
    x = x.float()
    g = g.float()
    product = x.mT @ (g @ (g.mT @ (x @ m)))  # G_b M (out x l), back through G_b^T
    return product if total is None else total.add_(product)


def orthonormal_columns(y: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of the columns of ``y`` (``n x l``, ``n >= l``), Householder QR with fixed signs."""
    q, r = torch.linalg.qr(y.float())
    signs = torch.sign(torch.diagonal(r))
    return q * torch.where(signs == 0, torch.ones_like(signs), signs)


def singular_vectors_from_sketch(
    product: torch.Tensor, test_matrix: torch.Tensor, product_is_gt: bool, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` ``(U: out x k, S: k, V: in x k)`` of ``G`` from the last pass, canonical signs (``S``: the singular
    values of ``G`` projected on the sketch's span, descending).

    ``product_is_gt``: ``product = G^T M`` (``in x l``, M ``out x l``) else ``product = G M`` (``out x l``,
    M ``in x l``). The SVD is exact, of an ``l``-column matrix.

    ``M`` need not be orthonormal: a test matrix that travelled in bfloat16 (federated setup) is not, and
    would leave ``U M`` / ``M V`` with rows off orthonormal by ~1e-3. With ``M = Q R`` (fp32 QR),
    ``G Q = (G M) R^-1`` (and ``G^T Q = (G^T M) R^-1``) projects ``G`` onto exactly the span of the ``M``
    the sums were taken with, and ``Q`` is orthonormal to fp32 rounding, so both factors are too.
    """
    if product.shape[1] < k:
        raise ValueError(f"a sketch of width {product.shape[1]} cannot give {k} singular vectors")
    q, r = torch.linalg.qr(test_matrix.float())
    test_matrix = q
    product = torch.linalg.solve_triangular(r, product.float(), upper=True, left=False)  # product R^-1
    left, values, right_h = torch.linalg.svd(product, full_matrices=False)
    if product_is_gt:  # G ~ M Y^T = M (Uy S Vy^T)^T: V = Uy, U = M Vy
        u, v = test_matrix @ right_h.mT[:, :k], left[:, :k]
    else:  # G ~ Z M^T = Uz S (M Vz)^T: U = Uz, V = M Vz
        u, v = left[:, :k], test_matrix @ right_h.mT[:, :k]
    u, v = _canonical_signs(u, v)
    return u, values[:k], v


def eigenvectors_from_sketch(product: torch.Tensor, test_matrix: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` eigenvalues (descending) and eigenvectors (``in x k``, canonical signs) of a symmetric PSD ``S`` from
    ``product = S M``.

    ``M = Q R`` (fp32 QR, as in :func:`singular_vectors_from_sketch`, so an ``M`` that travelled in bfloat16 is
    handled): ``S Q = (S M) R^-1``, and the eigenvectors of the small ``Q^T S Q`` (``l x l``, symmetrised, :func:`~giva.bases.top_eigenvectors`), mapped
    back by ``Q``, are the Rayleigh-Ritz approximation of the top eigenvectors of ``S`` on the span of ``M``.
    """
    if product.shape[1] < k:
        raise ValueError(f"a sketch of width {product.shape[1]} cannot give {k} eigenvectors")
    q, r = torch.linalg.qr(test_matrix.float())
    product = torch.linalg.solve_triangular(r, product.float(), upper=True, left=False)
    values, vectors = top_eigenpairs(q.mT @ product, k)
    return values, canonical_column_signs(q @ vectors)


def principal_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between the row spaces of ``a`` and ``b`` (each ``r x n``, rows orthonormal)."""
    return torch.linalg.svdvals(a.double() @ b.double().mT).clamp(max=1.0)
