"""The streaming sketch (giva.init.sketch) and the pass protocol (giva.init.InitSession) on their own, no model."""

from __future__ import annotations

import pytest
import torch

from giva.bases import bases_from_gradient, layer_generator, top_eigenvectors
from giva.init import GradientInitError, InitSession, Partial, Request, Target
from giva.init.exact import accumulate_dense, accumulate_gram
from giva.init.sketch import accumulate_g, accumulate_gt, principal_cosines, sketch_width
from giva.init.sketch import accumulate_gram as accumulate_gram_m

OUT, IN = 96, 80


def _token_blocks(n_blocks: int = 4, tokens: int = 48, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(x: T x in, g: T x out) blocks whose summed gradient G = sum g^T x has a decaying (1/j) spectrum plus noise,
    like a real layer gradient (see benchmarks/results/sketch/sketch_accuracy.md)."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(OUT, OUT, generator=gen))[0]
    v = torch.linalg.qr(torch.randn(IN, IN, generator=gen))[0]
    scale = (1.0 / torch.arange(1, IN + 1, dtype=torch.float32)).sqrt()
    blocks = []
    for _ in range(n_blocks):
        coef = torch.randn(tokens, IN, generator=gen) * scale
        x = coef @ v.mT + 0.01 * torch.randn(tokens, IN, generator=gen)
        g = coef @ u[:, :IN].mT + 0.01 * torch.randn(tokens, OUT, generator=gen)
        blocks.append((x, g))
    return blocks


def _target(rank: int = 6, variant: str = "VrUr", seed: int = 0, out_start: int = 0, out_size: int = OUT, block: int = 0) -> Target:
    return Target("default", "layer", block, out_start, out_size, IN, rank, variant, seed)


def _sums(request: Request, blocks) -> dict[str, torch.Tensor]:
    """What ``request`` asks for, summed over the ``(x, g)`` blocks."""
    sums = {}
    for key, item in request.items.items():
        total = None
        for x, g in blocks:
            rows = g[:, item.out_start : item.out_start + item.out_size]
            if item.kind == "dense":
                total = accumulate_dense(total, x, rows)
            elif item.kind == "gram":
                total = accumulate_gram(total, x, rows)
            elif item.kind == "gram_m":
                total = accumulate_gram_m(total, x, rows, item.matrix)
            elif item.kind == "gt":
                total = accumulate_gt(total, x, rows, item.matrix)
            else:
                total = accumulate_g(total, x, rows, item.matrix)
        sums[key] = total
    return sums


def _run(session: InitSession, blocks, split: int | None = None) -> None:
    """Drive a session over the blocks; ``split``: two 'processes' each summing part of them, then added."""
    while not session.done:
        request = session.next_request()
        parts = [blocks] if split is None else [blocks[:split], blocks[split:]]
        partials = [Partial(request.pass_index, _sums(request, part), batches=len(part)) for part in parts]
        total = partials[0]
        for partial in partials[1:]:
            total = total + partial
        session.receive(total)


def _dense(blocks) -> torch.Tensor:
    total = None
    for x, g in blocks:
        total = accumulate_dense(total, x, g)
    return total / len(blocks)


@pytest.mark.parametrize("variant", ["Vr", "VrUr", "VrU2r"])
def test_sketch_matches_the_exact_svd_without_forming_the_gradient(variant):
    blocks = _token_blocks()
    target = _target(variant=variant)
    session = InitSession([target], mode="sketch")
    _run(session, blocks)
    a, b = session.bases()[target.key]
    a_exact, b_exact = bases_from_gradient(_dense(blocks), 6, variant, layer_generator(0, "layer", 0), svd="exact")
    assert principal_cosines(a, a_exact).mean() >= 0.99
    assert torch.allclose(a @ a.mT, torch.eye(6), atol=1e-5)
    if variant == "Vr":
        assert torch.equal(b, b_exact)  # the same seeded B
    else:  # B from the sketch's left singular vectors (U[:, :r], or U[:, r:2r] for VrU2r)
        assert principal_cosines(b.mT, b_exact.mT).mean() >= 0.99


def test_memory_is_independent_of_the_number_of_batches_and_smaller_than_dense():
    target = _target(rank=4)
    sizes = set()
    for n_blocks in (1, 3, 6):
        session = InitSession([target], mode="sketch")
        while not session.done:
            request = session.next_request()
            before = session.nbytes()
            sums = {}
            item = request.items[target.key]
            for x, g in _token_blocks(n_blocks):
                add = accumulate_gt if item.kind == "gt" else accumulate_g
                sums[target.key] = add(sums.get(target.key), x, g, item.matrix)
            partial = Partial(request.pass_index, sums, batches=n_blocks)
            sizes.add((request.pass_index, before, partial.nbytes()))
            session.receive(partial)
    assert len(sizes) == session.passes  # the same bytes per pass whatever the number of batches
    width = sketch_width(4, OUT, IN)
    assert all(nbytes <= 4 * max(OUT, IN) * width < 4 * OUT * IN for _, _, nbytes in sizes)


def test_partials_from_several_processes_add_up():
    blocks = _token_blocks(n_blocks=6)
    for mode in ("exact", "sketch"):
        one, two = InitSession([_target()], mode=mode), InitSession([_target()], mode=mode)
        _run(one, blocks)
        _run(two, blocks, split=2)
        (a1, b1), (a2, b2) = one.bases()["default:layer#0"], two.bases()["default:layer#0"]
        assert principal_cosines(a1, a2).min() > 0.9999
        torch.testing.assert_close(a1, a2, atol=1e-4, rtol=0)
        torch.testing.assert_close(b1, b2, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("mode", "statistic", "passes"), [("exact", "mean", 3), ("exact", "second-moment", 3),
                                                         ("sketch", "mean", 4), ("sketch", "second-moment", 3)])
def test_sum_shape_is_the_shape_of_every_pass_sums_known_before_any_batch(mode, statistic, passes):
    """A rank whose batches never reached a target adds zeros of ``sum_shape`` (distributed.sum_partial): it must be
    the shape the other ranks' accumulated sums have, in every pass, for blocks of a fused layer too."""
    targets = [_target(variant="Vr", out_size=40), _target(variant="Vr", out_start=40, out_size=56, block=1)]
    session = InitSession(targets, mode=mode, passes=passes, statistic=statistic)
    seen = []
    while not session.done:
        request = session.next_request()
        sums = _sums(request, _token_blocks(n_blocks=2))
        seen.append({key: (tuple(total.shape), session.sum_shape(key)) for key, total in sums.items()})
        session.receive(Partial(request.pass_index, sums, batches=2))
    assert len(seen) == session.passes
    assert all(actual == expected for shapes in seen for actual, expected in shapes.values()), seen
    if statistic == "mean":  # the blocks' sums differ in shape (the second moment's are all in x in / in x l)
        assert len({shapes for pass_shapes in seen for shapes in pass_shapes.values()}) > 1


def test_requests_depend_only_on_seed_and_target():
    first = InitSession([_target(seed=1)]).next_request()
    second = InitSession([_target(seed=1)]).next_request()
    other = InitSession([_target(seed=2)]).next_request()
    key = _target().key
    assert torch.equal(first.items[key].matrix, second.items[key].matrix)
    assert not torch.equal(first.items[key].matrix, other.items[key].matrix)
    state = torch.random.get_rng_state()
    InitSession([_target(seed=1)])
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is not touched


def test_blocks_of_a_fused_layer_are_separate_targets():
    blocks = _token_blocks()
    targets = [_target(out_start=0, out_size=48, block=0), _target(out_start=48, out_size=48, block=1)]
    session = InitSession(targets, mode="sketch")
    _run(session, blocks)
    dense = _dense(blocks)
    for t in targets:
        a, _ = session.bases()[t.key]
        a_exact, _ = bases_from_gradient(dense[t.out_start : t.out_start + t.out_size], 6, "VrUr", layer_generator(0, "l"), svd="exact")
        assert principal_cosines(a, a_exact).mean() >= 0.99


def test_unusable_sums_are_named_errors():
    target = _target()
    session = InitSession([target], mode="sketch")
    request: Request = session.next_request()
    shape = (IN, request.items[target.key].matrix.shape[1])
    with pytest.raises(GradientInitError, match=r"\['layer'\] received no gradient"):
        session.receive(Partial(0, {}, batches=1))
    with pytest.raises(GradientInitError, match="'layer' .*all-zero gradient"):
        session.receive(Partial(0, {target.key: torch.zeros(shape)}, batches=1))
    with pytest.raises(GradientInitError, match="'layer' .*non-finite"):
        session.receive(Partial(0, {target.key: torch.full(shape, float("nan"))}, batches=1))
    with pytest.raises(ValueError, match="partial of pass 1"):
        session.receive(Partial(1, {target.key: torch.ones(shape)}, batches=1))
    with pytest.raises(ValueError, match="passes must be an int >= 2"):
        InitSession([target], mode="sketch", passes=1)
    with pytest.raises(ValueError, match="rank 99 does not fit"):
        _target(rank=99)


@pytest.mark.real
def test_sketch_matches_exact_on_real_minilm_gradients():
    """The streaming sketch through giva.initialize vs the SVD of the dense gradient, real model and sentences."""
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import giva
    from giva import GivaConfig
    from giva.assets import minilm_path
    from giva.data import load_bundled
    from giva.init import compute_gradients, giva_layers

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = load_bundled("pang-lee")
    batches = []
    for i in range(2):
        enc = tokenizer(data.texts[16 * i : 16 * (i + 1)], padding=True, truncation=True, max_length=48, return_tensors="pt")
        batches.append({**enc, "labels": torch.tensor(data.labels[16 * i : 16 * (i + 1)])})

    def fresh():
        torch.manual_seed(0)
        base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
        return get_peft_model(base, GivaConfig(r=8, target_modules=["query", "value"], task_type="SEQ_CLS"))

    reference = fresh()
    dense, _ = compute_gradients(reference, giva_layers(reference), batches, num_batches=2, progress=False)
    model = fresh()
    report = giva.initialize(model, batches, num_batches=2, progress=False, mode="sketch")
    assert report.mode == "sketch" and report.sums_bytes < sum(4 * g.numel() for g in dense.values()) / 4
    cosines = []
    for name, layer in giva_layers(model).items():
        exact_v = torch.linalg.svd(dense[name], full_matrices=False)[2][:8]
        cosines.append(principal_cosines(exact_v, layer.giva_A["default"]).mean())
    assert len(cosines) == 12 and torch.stack(cosines).mean() >= 0.99


@pytest.mark.parametrize("mode", ["exact", "sketch"])
def test_receive_takes_the_sums_without_copying_and_the_bases_ignore_their_scale(mode, monkeypatch):
    blocks = _token_blocks()
    target = _target()
    reference = InitSession([target], mode=mode)
    _run(reference, blocks)
    a_ref, b_ref = reference.bases()[target.key]
    seen = []
    advance = InitSession._advance

    def spy(self, t, total, final):
        seen.append(total)
        return advance(self, t, total, final)

    monkeypatch.setattr(InitSession, "_advance", spy)
    for factor in (4.0, 3.0):  # a power of two scales every float exactly; 3 rounds
        session = InitSession([target], mode=mode)
        while not session.done:
            request = session.next_request()
            sums = {key: total * factor for key, total in _sums(request, blocks).items()}
            kept = {key: value.clone() for key, value in sums.items()}
            seen.clear()
            session.receive(Partial(request.pass_index, sums, batches=len(blocks)))
            # the session read the partial's own tensor (no mean copied out of it) and left it as it was
            assert [t.data_ptr() for t in seen] == [sums[target.key].data_ptr()]
            assert torch.equal(sums[target.key], kept[target.key])
        a, b = session.bases()[target.key]
        if factor == 4.0:
            assert torch.equal(a, a_ref) and torch.equal(b, b_ref)
        else:
            torch.testing.assert_close(a, a_ref, atol=1e-4, rtol=0)
            torch.testing.assert_close(b, b_ref, atol=1e-4, rtol=0)


def test_non_finite_check_tells_an_overflowing_sum_from_a_non_finite_entry():
    target = _target()
    session = InitSession([target], mode="exact")
    huge = torch.full((OUT, IN), 3e38)  # every entry finite, their fp32 sum is not
    session.check(Partial(0, {target.key: huge}, batches=1))
    huge[5, 7] = float("inf")
    with pytest.raises(GradientInitError, match="'layer' .*non-finite"):
        session.check(Partial(0, {target.key: huge}, batches=1))


@pytest.mark.parametrize("passes", [2, 3, 4])
@pytest.mark.parametrize("variant", ["VrUr", "VrU2r"])
def test_bases_stay_orthonormal_when_the_test_matrices_travel_in_bfloat16(passes, variant):
    """The federated server sends every later pass's test matrix in bfloat16 and finishes with exactly the
    rounded matrix the clients used (server_app.setup_giva): A (and U-based B) must still be orthonormal to
    fp32 rounding, for an even last pass (G M) as for an odd one (G^T M)."""
    blocks = _token_blocks()
    session = InitSession([_target(rank=6, variant=variant)], mode="sketch", passes=passes)
    while not session.done:
        request = session.next_request()
        if request.pass_index > 0:  # as server_app does: round to bfloat16, keep what travelled
            rounded = {k: item.matrix.bfloat16().float() for k, item in request.items.items()}
            for key, matrix in rounded.items():
                session.set_state(key, (matrix,))
            request = session.next_request()
            assert all(torch.equal(item.matrix, rounded[k]) for k, item in request.items.items())
        session.receive(Partial(request.pass_index, _sums(request, blocks), batches=len(blocks)))
    (a, b), = session.bases().values()
    # fp32 rounding: about 40 ulps of 1 (2e-6 failed once on a clean CI clone at 2.03e-6, another BLAS path)
    assert (a @ a.mT - torch.eye(6)).abs().max() < 5e-6
    assert (b.mT @ b - torch.eye(6)).abs().max() < 5e-6
    fp32 = InitSession([_target(rank=6, variant=variant)], mode="sketch", passes=passes)
    _run(fp32, blocks)
    (reference, _), = fp32.bases().values()
    assert principal_cosines(a, reference).min() > 0.999  # the row space float32 transport finds


def _second_moment(blocks) -> torch.Tensor:
    """sum_b G_b^T G_b with each block's gradient G_b = g^T x formed densely (the reference)."""
    return sum((g.double().mT @ x.double()).mT @ (g.double().mT @ x.double()) for x, g in blocks)


def _sign_cancelling_blocks() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Blocks whose gradients point along input directions 0-1 with alternating signs (they cancel in the sum)
    while a weaker direction 2 keeps its sign: the mean and the second moment then disagree on purpose."""
    gen = torch.Generator().manual_seed(3)
    blocks = []
    for index in range(6):
        sign = 1.0 if index % 2 == 0 else -1.0
        x = torch.zeros(8, IN)
        x[:, 0], x[:, 1], x[:, 2] = 3.0 * sign, 2.0 * sign, 0.5
        x = x + 0.01 * torch.randn(8, IN, generator=gen)
        g = torch.ones(8, OUT) + 0.01 * torch.randn(8, OUT, generator=gen)
        blocks.append((x, g))
    return blocks


@pytest.mark.parametrize("mode", ["exact", "sketch"])
def test_second_moment_statistic_gives_the_top_eigenvectors_of_the_summed_batch_grams(mode):
    blocks = _token_blocks(n_blocks=5)
    target = _target(rank=4, variant="Vr")
    session = InitSession([target], mode=mode, passes=4, statistic="second-moment")
    _run(session, blocks, split=2)  # two processes' partials add up, as for the mean
    a, b = session.bases()[target.key]
    expected = top_eigenvectors(_second_moment(blocks), 4).mT
    assert torch.allclose(a @ a.mT, torch.eye(4), atol=1e-5)
    assert principal_cosines(a, expected).min() > (0.9999 if mode == "exact" else 0.99)
    _, b_mean = bases_from_gradient(_dense(blocks), 4, "Vr", layer_generator(0, "layer", 0), svd="exact")
    assert torch.equal(b, b_mean)  # B stays the seeded one: the statistic changes A only


def test_second_moment_keeps_directions_whose_signs_cancel_across_batches():
    blocks = _sign_cancelling_blocks()
    means, moments = InitSession([_target(rank=1, variant="Vr")], mode="exact"), InitSession(
        [_target(rank=1, variant="Vr")], mode="exact", statistic="second-moment"
    )
    _run(means, blocks)
    _run(moments, blocks)
    (a_mean, _), (a_moment, _) = means.bases()["default:layer#0"], moments.bases()["default:layer#0"]
    assert a_mean[0, 2].abs() > 0.9  # the sum keeps only the direction whose sign never changes
    assert a_moment[0, :2].norm() > 0.99  # the batches' own gradients live on directions 0-1


def test_second_moment_of_one_batch_is_the_mean_gradients_right_subspace():
    blocks = _token_blocks(n_blocks=1)
    means = InitSession([_target(rank=5, variant="Vr")], mode="exact")
    moments = InitSession([_target(rank=5, variant="Vr")], mode="exact", statistic="second-moment")
    _run(means, blocks)
    _run(moments, blocks)
    (a1, b1), (a2, b2) = means.bases()["default:layer#0"], moments.bases()["default:layer#0"]
    torch.testing.assert_close(a1, a2, atol=1e-4, rtol=0)  # G^T G's eigenvectors are G's right singular vectors
    assert torch.equal(b1, b2)


def test_second_moment_state_has_the_input_shape_and_a_gradient_b_is_refused():
    target = _target(rank=4, variant="Vr", out_size=OUT)
    session = InitSession([target], mode="sketch", statistic="second-moment")
    request = session.next_request()
    assert request.items[target.key].kind == "gram_m" and request.items[target.key].matrix.shape[0] == IN
    session.receive(Partial(0, _sums(request, _token_blocks()), batches=4))
    assert session.state_shapes(target.key) == [(IN, session.width(target.key))] == [tuple(session.state(target.key)[0].shape)]
    for variant in ("VrUr", "VrU2r"):
        with pytest.raises(ValueError, match=f"statistic='second-moment'.*{variant}"):
            InitSession([_target(variant=variant)], mode="exact", statistic="second-moment")
    with pytest.raises(ValueError, match="statistic must be one of"):
        InitSession([_target()], statistic="variance")


def test_the_shape_check_before_the_agreement_names_bad_sums_and_never_raises():
    """It runs on one rank before the ranks agree: raising there (a KeyError) would leave the others in the collective."""
    from giva.init.distributed import _wrong_shapes

    session = InitSession([_target(variant="Vr", out_size=40)], mode="exact")
    request = session.next_request()
    key = next(iter(request.items))
    good = torch.zeros(session.sum_shape(key))
    assert _wrong_shapes(Partial(0, {key: good}), session) is None
    error = _wrong_shapes(Partial(0, {key: good[:1], "layer:nosuch#0": good}), session)
    assert isinstance(error, GradientInitError)
    assert f"{key}: (1, " in str(error) and "layer:nosuch#0" in str(error) and "no target" in str(error)
