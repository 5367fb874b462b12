"""The pure maths: gradient/weight/random matrices -> bases."""

import pytest
import torch

from giva.bases import (
    bases_from_gradient,
    bases_from_weight,
    layer_generator,
    max_rank,
    random_bases,
    top_singular_vectors,
)


def _gradient(out: int = 24, inp: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))


def _orthonormal_rows(m: torch.Tensor) -> bool:
    return torch.allclose(m @ m.mT, torch.eye(m.shape[0]), atol=1e-5)


@pytest.mark.parametrize("variant", ["Vr", "VrUr", "VrU2r", "VrUrand"])
def test_gradient_bases_shapes_and_a_is_top_right_singular_subspace(variant):
    g = _gradient()
    a, b = bases_from_gradient(g, 4, variant, layer_generator(0, "layer"))
    assert a.shape == (4, 16) and b.shape == (24, 4)
    assert a.dtype == torch.float32 and b.dtype == torch.float32
    assert _orthonormal_rows(a)
    _, _, vh = torch.linalg.svd(g)
    # Same subspace as the exact top-4 right singular vectors (signs are free).
    assert torch.allclose((a @ vh[:4].mT).abs(), torch.eye(4), atol=1e-4)


def test_output_basis_per_variant():
    g = _gradient()
    u, _, _ = torch.linalg.svd(g, full_matrices=False)
    _, b_ur = bases_from_gradient(g, 4, "VrUr", layer_generator(0, "l"))
    _, b_u2r = bases_from_gradient(g, 4, "VrU2r", layer_generator(0, "l"))
    _, b_vr = bases_from_gradient(g, 4, "Vr", layer_generator(0, "l"))
    _, b_rand = bases_from_gradient(g, 4, "VrUrand", layer_generator(0, "l"))
    assert torch.allclose((b_ur.mT @ u[:, :4]).abs(), torch.eye(4), atol=1e-4)
    assert torch.allclose((b_u2r.mT @ u[:, 4:8]).abs(), torch.eye(4), atol=1e-4)
    assert _orthonormal_rows(b_vr.mT)
    assert not _orthonormal_rows(b_rand.mT)  # unnormalised Gaussian


def test_seeded_bases_are_deterministic_and_layer_specific():
    g = _gradient()
    a1, b1 = bases_from_gradient(g, 4, "Vr", layer_generator(3, "layer.0"))
    a2, b2 = bases_from_gradient(g, 4, "Vr", layer_generator(3, "layer.0"))
    _, b3 = bases_from_gradient(g, 4, "Vr", layer_generator(3, "layer.1"))
    _, b4 = bases_from_gradient(g, 4, "Vr", layer_generator(4, "layer.0"))
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert not torch.allclose(b1, b3) and not torch.allclose(b1, b4)


def test_randomized_svd_spans_the_same_subspace_as_exact():
    # A gradient with a clear spectral gap, as real gradients have.
    gen = torch.Generator().manual_seed(1)
    u = torch.linalg.qr(torch.randn(300, 300, generator=gen))[0]
    v = torch.linalg.qr(torch.randn(200, 200, generator=gen))[0]
    s = torch.cat([torch.tensor([50.0, 40, 30, 20]), 0.1 * torch.rand(196, generator=gen)])
    g = u[:, :200] @ torch.diag(s) @ v.mT
    _, _, v_exact = top_singular_vectors(g, 4, method="exact")
    _, _, v_rand = top_singular_vectors(g, 4, method="randomized", seed=0)
    assert torch.allclose(v_exact, v_rand, atol=1e-3)  # canonical signs make them equal, not just parallel
    _, _, again = top_singular_vectors(g, 4, method="randomized", seed=0)
    assert torch.equal(v_rand, again)


def test_random_and_weight_bases():
    a, b = random_bases(24, 16, 4, layer_generator(0, "x"))
    assert _orthonormal_rows(a) and _orthonormal_rows(b.mT)
    w = _gradient(seed=5)
    a_w, b_w = bases_from_weight(w, 4)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    assert torch.allclose(b_w.mT @ w @ a_w.mT, torch.diag(s[:4]), atol=1e-4)


def test_rank_limits():
    assert max_rank("Vr", 24, 16) == 16 and max_rank("VrU2r", 24, 16) == 8
    with pytest.raises(ValueError, match="rank 9 is not in \\[1, 8\\]"):
        bases_from_gradient(_gradient(), 9, "VrU2r", layer_generator(0, "l"))
    with pytest.raises(ValueError, match="variant must be one of"):
        bases_from_gradient(_gradient(), 4, "random", layer_generator(0, "l"))


def test_auto_svd_is_exact_for_small_layers_and_randomized_for_large_ones():
    g = _gradient(600, 520, seed=2)
    exact = top_singular_vectors(g, 4, method="exact")[2]
    assert torch.equal(top_singular_vectors(g, 4, method="auto")[2], top_singular_vectors(g, 4, method="randomized")[2])
    assert not torch.equal(top_singular_vectors(g, 4, method="auto")[2], exact)
    small = _gradient(384, 384, seed=2)
    assert torch.equal(top_singular_vectors(small, 4, method="auto")[2], top_singular_vectors(small, 4, method="exact")[2])
