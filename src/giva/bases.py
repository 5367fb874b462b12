"""Pure functions that turn a matrix into frozen GiVA bases.

Nothing here knows about models or PEFT: every function takes tensors (and a seeded
``torch.Generator``) and returns tensors, so the maths can be tested on its own.

Shapes, for one adapted (block of a) linear map ``W`` of shape ``out x in``:

* ``A``: ``r x in``, rows orthonormal (the input basis),
* ``B``: ``out x r`` (the output basis).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal, get_args

import torch

from .precision import autocast_off

Variant = Literal["Vr", "VrUr", "VrU2r", "VrUrand", "random", "weight"]
VARIANTS: tuple[str, ...] = get_args(Variant)
GRADIENT_VARIANTS: tuple[str, ...] = ("Vr", "VrUr", "VrU2r", "VrUrand")
# Variants whose B (and, for `random`, A) is a function of the seed and the layer name only,
# so a checkpoint does not need to store it.
SEEDED_B_VARIANTS: tuple[str, ...] = ("Vr", "VrUrand", "random")
SvdMethod = Literal["auto", "exact", "randomized"]
SVD_METHODS: tuple[str, ...] = get_args(SvdMethod)
# From this smaller dimension on, `svd="auto"` uses randomized SVD: on SmolLM2-135M (576-wide
# layers) exact SVDs made initialisation cost 5.3 training steps, randomized ones 1.7
# (benchmarks/results/full, speed-smollm2). MiniLM's 384-wide layers stay exact.
AUTO_RANDOMIZED_MIN_DIM = 512


def layer_generator(seed: int, layer_name: str, block: int = 0) -> torch.Generator:
    """A CPU generator whose stream depends only on (seed, layer name, block index).

    The adapter name is deliberately not part of the key: an adapter loaded under another
    name must regenerate the very same seeded bases.
    """
    key = zlib.crc32(f"{layer_name}#{block}".encode())
    return torch.Generator(device="cpu").manual_seed((int(seed) * 1_000_003 + key) % (2**63 - 1))


def max_rank(variant: str, out_features: int, in_features: int) -> int:
    """Largest rank a variant supports for an ``out x in`` block (VrU2r needs 2r singular vectors)."""
    smallest = min(out_features, in_features)
    return smallest // 2 if variant == "VrU2r" else smallest


@contextmanager
def _single_thread() -> Iterator[None]:
    """Run torch CPU ops on one thread (restored after), so reductions add up in one fixed order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextmanager
def seeded_rng(seed: int, devices: tuple[torch.device, ...] = ()) -> Iterator[None]:
    """Seed the global RNG of the CPU and of the given CUDA devices only; all of them are restored after.

    ``torch.manual_seed`` would reseed every GPU while ``fork_rng`` restores only the devices it is
    given: in a ``device_map`` run the other GPUs' streams would be left reset to ``seed``.
    """
    with torch.random.fork_rng(devices=cuda_indices(devices)):
        seed_devices(seed, devices)
        yield


def cuda_indices(devices: tuple[torch.device, ...]) -> list[int]:
    return sorted({torch.cuda.current_device() if d.index is None else d.index for d in devices if d.type == "cuda"})


def seed_devices(seed: int, devices: tuple[torch.device, ...] = ()) -> None:
    """Seed the CPU's global RNG and those of the given CUDA devices (not every GPU, as torch.manual_seed does)."""
    torch.default_generator.manual_seed(seed)
    for index in cuda_indices(devices):
        torch.cuda.default_generators[index].manual_seed(seed)


def _gram_schmidt_twice(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning those of ``x`` (``rows x cols``, float64), by Gram-Schmidt applied twice.

    Written with elementwise products and sums instead of LAPACK's QR: threaded LAPACK changes the
    rounding with the thread count (r=64 on 768 rows: 1.5e-7 between 1 and 2 threads), and so would
    change a seeded basis between the run that saved an adapter and the one that reloads it. The
    column signs are those of a QR with a positive diagonal in R.
    """
    q = x.clone()
    for j in range(q.shape[1]):
        v = q[:, j]
        for _ in range(2):  # "twice is enough": the second pass removes what rounding left of the first
            previous = q[:, :j]  # rows x j
            v = v - (previous * (previous * v[:, None]).sum(0)).sum(1)
        q[:, j] = v / v.square().sum().sqrt()
    return q


def random_orthonormal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """A ``rows x cols`` matrix with orthonormal columns (``rows >= cols``), fp32 CPU, bit-exact on any thread count.

    A float64 Gaussian draw (float32 draws take a CPU-specific vectorised path), orthonormalised in
    float64 on one thread, then rounded to float32: the float64 rounding noise (~1e-16) stays far
    below float32's resolution, so the result also matches across machines in all but rare ties.
    """
    with _single_thread():
        gaussian = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
        return _gram_schmidt_twice(gaussian).to(torch.float32)


def seeded_output_basis(variant: str, out_features: int, r: int, generator: torch.Generator) -> torch.Tensor:
    """The data-independent B (``out x r``) of the `Vr`, `VrUrand` and `random` variants."""
    if variant == "VrUrand":
        with _single_thread():
            return torch.randn(out_features, r, generator=generator, dtype=torch.float64).to(torch.float32)
    if variant in ("Vr", "random"):
        return random_orthonormal(out_features, r, generator)
    raise ValueError(f"variant {variant!r} has no seeded output basis; expected one of {SEEDED_B_VARIANTS}")


def _column_signs(v: torch.Tensor) -> torch.Tensor:
    """+-1 per column of ``v``: the sign of its largest-magnitude entry (+1 for an all-zero column)."""
    idx = v.abs().argmax(dim=0)
    signs = torch.sign(v[idx, torch.arange(v.shape[1])])
    return torch.where(signs == 0, torch.ones_like(signs), signs)


def _canonical_signs(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each singular pair so the largest-magnitude entry of each column of ``v`` is positive.

    Singular vectors are defined up to a joint sign; fixing it makes the bases reproducible
    across SVD backends (exact vs randomized, CPU vs GPU) up to rounding.
    """
    signs = _column_signs(v)
    return u * signs, v * signs


def canonical_column_signs(v: torch.Tensor) -> torch.Tensor:
    """``v`` with each column flipped so its largest-magnitude entry is positive (eigenvectors' sign convention)."""
    return v * _column_signs(v)


def top_singular_vectors(
    matrix: torch.Tensor, k: int, method: str = "auto", seed: int = 0, niter: int = 4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` singular triplets of ``matrix`` (``m x n``) in fp32: ``U (m x k), S (k), V (n x k)``.

    ``method="randomized"`` uses ``torch.svd_lowrank`` with oversampling ``q = min(4k, min(m, n))``
    and ``niter`` power iterations, drawing its test matrix from a generator seeded with ``seed``.
    """
    if method not in SVD_METHODS:
        raise ValueError(f"svd method must be one of {SVD_METHODS}, got {method!r}")
    matrix = matrix.detach().to(torch.float32)
    smallest = min(matrix.shape)
    if k > smallest:
        raise ValueError(f"cannot take {k} singular vectors of a {tuple(matrix.shape)} matrix")
    randomized = method == "randomized" or (method == "auto" and smallest >= AUTO_RANDOMIZED_MIN_DIM)
    with autocast_off(matrix.device):  # svd_lowrank's products under bf16 autocast left U, V orthonormal to ~5e-3
        if randomized:
            q = min(4 * k, smallest)
            with seeded_rng(seed, (matrix.device,)):
                u, s, v = torch.svd_lowrank(matrix, q=q, niter=niter)
        else:
            u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
            v = vh.mT
    u, v = _canonical_signs(u[:, :k], v[:, :k])
    return u, s[:k], v


def bases_from_gradient(
    gradient: torch.Tensor,
    r: int,
    variant: str,
    generator: torch.Generator,
    svd: str = "auto",
    svd_seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GiVA bases from the loss gradient ``G = dL/dW`` (``out x in``); returns fp32 ``(A, B)`` on CPU.

    ``A = V[:, :r]^T`` for every variant; B is seeded random orthonormal (`Vr`), ``U[:, :r]``
    (`VrUr`), ``U[:, r:2r]`` (`VrU2r`, as in LoRA-GA) or seeded unnormalised Gaussian (`VrUrand`).
    """
    a, b, _ = gradient_bases(gradient, r, variant, generator, svd, svd_seed)
    return a, b


def gradient_bases(
    gradient: torch.Tensor, r: int, variant: str, generator: torch.Generator, svd: str = "auto", svd_seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`bases_from_gradient` and the singular values it used (``r``, or ``2r`` for `VrU2r`, descending), for
    :func:`numerical_rank`. ``gradient``: any positive multiple of ``G`` (a sum or a mean)."""
    if variant not in GRADIENT_VARIANTS:
        raise ValueError(f"variant must be one of {GRADIENT_VARIANTS} for gradient bases, got {variant!r}")
    out_features, in_features = gradient.shape
    if r < 1 or r > max_rank(variant, out_features, in_features):
        raise ValueError(
            f"rank {r} is not in [1, {max_rank(variant, out_features, in_features)}] for variant {variant!r} "
            f"and a {out_features} x {in_features} gradient"
        )
    k = 2 * r if variant == "VrU2r" else r
    u, values, v = top_singular_vectors(gradient, k, method=svd, seed=svd_seed)
    return (*bases_from_singular_vectors(u, v, r, variant, generator), values)


def bases_from_singular_vectors(
    u: torch.Tensor, v: torch.Tensor, r: int, variant: str, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` from the top singular vectors of a gradient (``U: out x k``, ``V: in x k``, k >= r or 2r).

    Shared by the exact SVD above and the streaming sketch (``giva.init.sketch``), which never forms G.
    """
    a = v[:, :r].mT.contiguous().cpu()
    if variant == "VrUr":
        b = u[:, :r]
    elif variant == "VrU2r":
        b = u[:, r : 2 * r]
    else:
        b = seeded_output_basis(variant, u.shape[0], r, generator)
    return a, b.contiguous().cpu()


def bases_from_input_vectors(
    v: torch.Tensor, out_features: int, r: int, variant: str, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` from input directions alone (``V: in x k``, k >= r), for the variants whose B is seeded.

    The second-moment statistic (``giva.initialize(statistic="second-moment")``) gives right vectors only:
    ``A = V[:, :r]^T`` and B as :func:`seeded_output_basis` draws it.
    """
    if variant not in SEEDED_B_VARIANTS:
        raise ValueError(f"variant {variant!r} takes B from the gradient's left singular vectors; expected one of {SEEDED_B_VARIANTS}")
    return v[:, :r].mT.contiguous().cpu(), seeded_output_basis(variant, out_features, r, generator).contiguous().cpu()


def top_eigenpairs(matrix: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` eigenvalues (descending) and eigenvectors (``n x k``, canonical signs) of a symmetric ``n x n``
    matrix, fp32 (exact ``eigh``, float64)."""
    if k > matrix.shape[0]:
        raise ValueError(f"cannot take {k} eigenvectors of a {tuple(matrix.shape)} matrix")
    symmetric = matrix.detach().double()
    values, vectors = torch.linalg.eigh((symmetric + symmetric.mT) / 2)  # ascending eigenvalues
    return values[-k:].flip(-1).float(), canonical_column_signs(vectors[:, -k:].flip(-1).float())


def top_eigenvectors(matrix: torch.Tensor, k: int) -> torch.Tensor:
    """Top-``k`` eigenvectors (``n x k``, fp32, canonical signs) of a symmetric ``n x n`` matrix (exact ``eigh``, float64)."""
    return top_eigenpairs(matrix, k)[1]


def numerical_rank(values: torch.Tensor, shape: tuple[int, int], gram: bool = False) -> int:
    """How many of ``values`` stand above rounding. ``values``: the top singular values (descending) of an fp32 matrix
    of ``shape``, counted above the largest times ``max(shape)`` fp32 epsilons (numpy's ``matrix_rank`` rule); with
    ``gram``, the top eigenvalues of an fp32 ``n x n`` second moment ``sum_b G_b^T G_b`` (``shape = (n, n)``), counted
    above the largest times ``sqrt(n)`` epsilons: its rounding leaves eigenvalues under one epsilon of the largest
    (measured), and the singular-value rule on eigenvalues (``n`` epsilons, as squared singular values a ratio of
    ``sqrt(n * eps)``, 0.011 at n = 1024) called steep but full-rank gradients deficient. A gradient summed over ``T``
    tokens has rank at most ``T``: singular vectors past its rank are arbitrary directions the loss never reached."""
    values = values.detach().double().abs().cpu()
    if values.numel() == 0 or values[0] == 0:
        return 0
    factor = max(shape) ** 0.5 if gram else max(shape)
    return int((values > values[0] * factor * torch.finfo(torch.float32).eps).sum())


def random_bases(out_features: int, in_features: int, r: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Data-free ablation: seeded orthonormal ``A`` (rows) and ``B`` (columns), i.e. VeRA with per-layer bases."""
    a = random_orthonormal(in_features, r, generator).mT.contiguous()
    b = seeded_output_basis("random", out_features, r, generator)
    return a, b


def bases_from_weight(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Data-free OSoRA-style bases from the SVD of ``W`` (``out x in``): ``A = V_r^T``, ``B = U_r``."""
    u, _, v = top_singular_vectors(weight, r, method="exact")
    return v.mT.contiguous().cpu(), u.contiguous().cpu()
