"""giva.initialize in reduced precision: the fp16 calibration backward is loss-scaled (as AMP's GradScaler does),
and the statistic sums, the sketch maths and the SVDs run outside any autocast the caller opened.

fp16: with a realistic vocabulary, dL/dlogits = (p - y) / T (p ~ 1 / vocab, T tokens) is ~1.5e-8 here, below
fp16's smallest subnormal (6e-8): unscaled, most of it rounded to zero and the bases of the layers it reaches
were far from fp32's (smallest principal cosine 0.46 on k_proj). Autocast: a call inside
``torch.autocast('cpu', dtype=torch.bfloat16)`` crashed (the first batch's sum in bf16, then an fp32 ``addmm_``
into it) or gave bases orthonormal only to ~5e-3 (bf16 randomized SVD and sketch products).
"""

from __future__ import annotations

import sys

import pytest
import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import giva
from giva import GivaConfig
from giva.init import GradientInitError, LossScale, accumulate, compute_gradients, giva_layers
from giva.init.accumulate import GROWTH_INTERVAL, LOSS_SCALE, _Sums
from giva.init.session import Request, RequestItem
from giva.init.sketch import principal_cosines
from tiny_models import text_batches, tiny_llama

LARGE_VOCAB, BATCH, LENGTH = 32_000, 4, 512


def _large_vocab_llama(dtype: torch.dtype) -> LlamaForCausalLM:
    """A 2-layer Llama with a 32k vocabulary, its weights rounded to fp16 whatever ``dtype`` (the same numbers in
    the fp32 reference and the fp16 runs)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=LARGE_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=LENGTH,
    )
    return LlamaForCausalLM(config).to(torch.float16).to(dtype).eval()


@pytest.fixture(scope="module")
def long_batches() -> list[dict]:
    ids = torch.randint(0, LARGE_VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": ids, "labels": ids}]


def _bases(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {name: (layer.giva_A["default"].float(), layer.giva_B["default"].float()) for name, layer in giva_layers(model).items()}


def _initialised(model, batches, variant: str = "VrUr", **kwargs) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    peft_model = get_peft_model(model, GivaConfig(r=4, variant=variant, **kwargs.pop("config", {})))
    giva.initialize(peft_model, batches, num_batches=len(batches), progress=False, **kwargs)
    return _bases(peft_model)


def _worst_cosine(found: dict, reference: dict, which: int = 0) -> float:
    """Smallest principal cosine between the row spaces of A (``which=0``) or the column spaces of B (1), over the layers."""
    assert found.keys() == reference.keys() and found
    pick = (lambda t: t) if which == 0 else (lambda t: t.mT)
    return min(principal_cosines(pick(found[k][which]), pick(reference[k][which])).min().item() for k in found)


def _orthonormality_error(bases: dict, which: int) -> float:
    """max |A A^T - I| (``which=0``) or max |B^T B - I| (1), over the layers."""
    errors = []
    for a, b in bases.values():
        rows = (a if which == 0 else b.mT).double()
        errors.append((rows @ rows.mT - torch.eye(rows.shape[0], dtype=torch.float64)).abs().max().item())
    return max(errors)


def _fp16_autocast_loss(model, batch):
    """The forward under fp16 autocast, as Accelerate wraps model.forward for Trainer(fp16=True) / `giva sft --fp16`."""
    with torch.autocast("cpu", dtype=torch.float16):
        return model(**batch).loss


# ---------------------------------------------------------------------------------------------- fp16 loss scaling


@pytest.mark.parametrize("mode", ["exact", "sketch"])
@pytest.mark.parametrize("precision", ["fp16 weights", "fp32 weights, fp16 autocast"])
def test_fp16_calibration_with_a_large_vocabulary_gives_the_bases_of_fp32(long_batches, precision, mode):
    reference = _initialised(_large_vocab_llama(torch.float32), long_batches, mode=mode)
    if precision == "fp16 weights":
        found = _initialised(_large_vocab_llama(torch.float16), long_batches, mode=mode)
    else:
        found = _initialised(_large_vocab_llama(torch.float32), long_batches, mode=mode, loss_fn=_fp16_autocast_loss)
    assert _worst_cosine(found, reference, 0) > 0.99  # was 0.46 (k_proj) unscaled
    assert _worst_cosine(found, reference, 1) > 0.99


def test_fp16_second_moment_statistic_gives_the_bases_of_fp32(long_batches):
    reference = _initialised(_large_vocab_llama(torch.float32), long_batches, "Vr", mode="exact", statistic="second-moment")
    found = _initialised(_large_vocab_llama(torch.float16), long_batches, "Vr", mode="exact", statistic="second-moment")
    assert _worst_cosine(found, reference, 0) > 0.99


def _overflowing_loss(calls: list):
    """A loss 2**12 times the model's: at the first loss scale (2**16) its fp16 output gradients overflow to inf."""
    def loss_fn(model, batch):
        calls.append(1)
        return model(**batch).loss * 2**12
    return loss_fn


@pytest.mark.parametrize("mode", ["exact", "sketch"])
def test_an_fp16_batch_that_overflows_is_redone_at_a_smaller_scale_and_counted_once(mode):
    batches = text_batches(n=2, labels="lm")
    reference = _initialised(tiny_llama().to(torch.float16).float(), batches, mode=mode)
    calls: list = []
    found = _initialised(tiny_llama().to(torch.float16), batches, mode=mode, loss_fn=_overflowing_loss(calls))
    passes = 1 if mode == "exact" else 3
    assert len(calls) > passes * len(batches)  # some batches ran again, at a smaller scale
    assert _worst_cosine(found, reference, 0) > 0.99
    assert _worst_cosine(found, reference, 1) > 0.99

    # The partial sums: every batch and token counted once, equal (up to fp16 rounding) to the fp32 model's.
    def sums(model, loss_fn=None):
        peft_model = get_peft_model(model, GivaConfig(r=4, target_modules=["q_proj"]))
        items = {name: RequestItem(name, 0, layer.out_features, "dense") for name, layer in giva_layers(peft_model).items()}
        return accumulate(peft_model, batches, Request(0, 1, items), loss_fn=loss_fn)

    fp16 = sums(tiny_llama().to(torch.float16), _overflowing_loss([]))
    fp32 = sums(tiny_llama().to(torch.float16).float(), lambda model, batch: model(**batch).loss * 2**12)
    assert (fp16.batches, fp16.tokens) == (fp32.batches, fp32.tokens) == (2, 2 * 4 * 10)
    for key, total in fp32.sums.items():
        assert torch.isfinite(fp16.sums[key]).all()
        torch.testing.assert_close(fp16.sums[key], total, rtol=0.05, atol=0.05 * total.abs().max().item())


def test_the_fp16_loss_scale_is_kept_from_pass_to_pass():
    """As GradScaler keeps it: the sketch's later passes start at the scale where the first one settled, so only the
    first pass halves it down from 2**16 (the exact path's one pass shows how many times); it is doubled once after
    GROWTH_INTERVAL batches without an overflow, which costs this model one more attempt."""
    batches = text_batches(n=2, labels="lm")
    one_pass: list = []
    three_passes: list = []
    _initialised(tiny_llama().to(torch.float16), batches, mode="exact", loss_fn=_overflowing_loss(one_pass))
    found = _initialised(tiny_llama().to(torch.float16), batches, mode="sketch", passes=3,
                         loss_fn=_overflowing_loss(three_passes))
    retries = len(one_pass) - len(batches)
    assert retries > 0  # 9 here: 2**16 down to 2**8 overflowed
    # Batch 0's clean re-run at 2**7 and batch 1, then pass 1's two batches: GROWTH_INTERVAL (4) in a row without an
    # overflow double the scale to 2**8, where pass 2's batch 0 overflows once more: 16 forwards. A fresh scale per
    # pass took 3 * (len(batches) + retries) = 33; a scale that never grew back 15.
    assert GROWTH_INTERVAL == 4
    assert len(three_passes) == 3 * len(batches) + retries + 1
    reference = _initialised(tiny_llama().to(torch.float16).float(), batches, mode="sketch", passes=3)
    assert _worst_cosine(found, reference, 0) > 0.99
    assert _worst_cosine(found, reference, 1) > 0.99


def test_the_dense_statistics_keep_the_fp16_loss_scale_from_batch_to_batch(monkeypatch):
    """The federated clients' dense statistics (``--init-mode dense``) take one compute_gradients call per batch; each
    call started from a fresh loss scale, so every batch halved it down from 2**16 again. One scale for all the calls,
    as the sketch's passes share one: only the first batch runs again, as many times as in one call over all of them
    (3 batches are fewer than GROWTH_INTERVAL: the scale is not doubled again here).
    The sums of an fp32 model are those of the per-batch calls bit for bit; an fp16 model's are finite and close."""
    import giva.federated.statistics as statistics
    from giva.init import compute_gradients

    batches = text_batches(n=3, labels="lm")
    forwards: list = []

    def overflowing(*args, **kwargs):
        return compute_gradients(*args, loss_fn=_overflowing_loss(forwards), **kwargs)

    monkeypatch.setattr(statistics, "compute_gradients", overflowing)

    def dense(dtype):
        model = get_peft_model(tiny_llama().to(torch.float16).to(dtype), GivaConfig(r=4, target_modules=["q_proj", "v_proj"]))
        return model, statistics.dense_statistics(model, batches)

    model, (fp16, count) = dense(torch.float16)
    assert count == 3 * 4
    one_call: list = []
    compute_gradients(model, giva_layers(model), batches, num_batches=len(batches), loss_fn=_overflowing_loss(one_call),
                      progress=False)
    retries = len(one_call) - len(batches)
    assert retries > 0  # 9 here: 2**16 down to 2**7
    assert len(batches) < GROWTH_INTERVAL
    assert len(forwards) == len(batches) + retries  # was len(batches) * (1 + retries): 30 forwards
    model, (fp32, _) = dense(torch.float32)
    per_batch = [compute_gradients(model, giva_layers(model), [batch], num_batches=1, progress=False,  # fresh scales
                                   loss_fn=lambda model, batch: model(**batch).loss * 2**12)[0] for batch in batches]
    for key, total in fp32.items():
        layer = key.split(":", 1)[1].rsplit("#", 1)[0]  # "default:<layer>#0": one block per layer here
        assert torch.equal(total, sum(gradients[layer].double() * 4 for gradients in per_batch))
        assert torch.isfinite(fp16[key]).all()
        torch.testing.assert_close(fp16[key], total, rtol=0.05, atol=0.05 * total.abs().max().item())


def _spiked_loss(spike: dict, calls: list):
    """Batch ``spike``'s loss times 2**12 (its fp16 gradients overflow at 2**16 down to 2**8: the scale settles at
    2**7), every other batch's times 2**-16: small gradients, as a large vocabulary and many tokens give, which fp16
    holds to ~0.2 % at 2**16 but not at 2**7 (60 % off)."""
    def loss_fn(model, batch):
        calls.append(1)
        factor = 2.0**12 if torch.equal(batch["input_ids"], spike["input_ids"]) else 2.0**-16
        return model(**batch).loss * factor
    return loss_fn


def _relative_errors(found: dict, reference: dict) -> dict[str, float]:
    assert found.keys() == reference.keys() and found
    return {k: ((found[k].double() - reference[k].double()).norm() / reference[k].double().norm()).item() for k in found}


# Batch 0 halves the scale 9 times (2**16 -> 2**7); its clean re-run and the next 35 batches grow it back 9 times.
SPIKE_RECOVERY = 9 * GROWTH_INTERVAL - 1


def test_the_fp16_loss_scale_grows_back_after_one_overflowing_batch(monkeypatch):
    """One batch that overflows halved the scale for every later batch and pass (it was never doubled again): later
    batches with small gradients lost them to fp16's subnormals (relative error of their sums vs fp32 0.60 here, 0.002
    at a fresh scale). As GradScaler does, GROWTH_INTERVAL batches in a row without an overflow double it, up to its
    start: after the overflowing batch and SPIKE_RECOVERY small ones it is back at 2**16, and the sums of the next
    batches are fp32's to ~0.2 %. Checked through compute_gradients (one scale over several calls, as the federated
    dense statistics take it) and giva.initialize (the scale its passes share)."""
    batches = text_batches(n=1 + SPIKE_RECOVERY + 2, labels="lm")
    recovering, last = batches[: 1 + SPIKE_RECOVERY], batches[1 + SPIKE_RECOVERY :]

    def gradients(dtype):
        model = get_peft_model(tiny_llama().to(torch.float16).to(dtype), GivaConfig(r=4, target_modules=["q_proj", "v_proj"]))
        scale = LossScale()
        calls: list = []
        loss_fn = _spiked_loss(batches[0], calls)
        compute_gradients(model, giva_layers(model), recovering, len(recovering), loss_fn, progress=False, scale=scale)
        assert scale.value == LOSS_SCALE  # 2**7 before: kept low for every later batch
        assert len(calls) == len(recovering) + (9 if dtype == torch.float16 else 0)
        return compute_gradients(model, giva_layers(model), last, len(last), loss_fn, progress=False, scale=scale)[0]

    errors = _relative_errors(gradients(torch.float16), gradients(torch.float32))
    assert max(errors.values()) < 0.01, errors  # 0.002 (as at a fresh scale); 0.60 on q_proj before

    # giva.initialize: its passes share one scale, which ends where compute_gradients's did.
    init = sys.modules["giva.init"]
    scales: list[LossScale] = []
    monkeypatch.setattr(init, "LossScale", lambda: scales.append(LossScale()) or scales[-1])
    used: list = []
    real_run_pass = init.run_pass
    # run_pass(model, batches, request, num_batches, loss_fn, comm, progress, scale, rng)
    monkeypatch.setattr(init, "run_pass", lambda *args: used.append(args[7]) or real_run_pass(*args))
    calls = []
    _initialised(tiny_llama().to(torch.float16), recovering, mode="exact", loss_fn=_spiked_loss(batches[0], calls))
    assert [s.value for s in scales] == [LOSS_SCALE] and used == scales  # the one scale, handed to the pass
    assert len(calls) == len(recovering) + 9


def test_the_dense_statistics_loss_scale_grows_back_after_one_overflowing_batch(monkeypatch):
    """The federated clients' dense statistics (one compute_gradients call per batch, one scale for all): after a batch
    that overflows, the scale grows back, and the sums of the batches after SPIKE_RECOVERY are fp32's to ~0.2 % (they
    were 0.60 off: the scale stayed at 2**7)."""
    import giva.federated.statistics as statistics

    batches = text_batches(n=1 + SPIKE_RECOVERY + 2, labels="lm")
    scales: list[LossScale] = []
    monkeypatch.setattr(statistics, "LossScale", lambda: scales.append(LossScale()) or scales[-1])

    def last_sums(dtype):
        model = get_peft_model(tiny_llama().to(torch.float16).to(dtype), GivaConfig(r=4, target_modules=["q_proj", "v_proj"]))
        every, _ = statistics.dense_statistics(model, batches)
        first, _ = statistics.dense_statistics(model, batches[: 1 + SPIKE_RECOVERY])  # the same scales for these
        return {key: every[key] - first[key] for key in every}

    starts: list = []  # the scale each batch's call starts from, in the first (fp16, every batch) call

    def recorded(*args, scale, **kwargs):
        starts.append((id(scale), scale.value))
        return compute_gradients(*args, scale=scale, loss_fn=_spiked_loss(batches[0], []), **kwargs)

    monkeypatch.setattr(statistics, "compute_gradients", recorded)
    fp16 = last_sums(torch.float16)
    first = starts[: len(batches)]
    assert len({key for key, _ in first}) == 1  # one scale for every batch of the call
    assert first[0][1] == LOSS_SCALE and first[1][1] == 2.0**7  # batch 0 settled it low, batch 1 starts there
    assert scales[0].value == LOSS_SCALE  # and it grew back, to 2**16 after batch SPIKE_RECOVERY
    errors = _relative_errors(fp16, last_sums(torch.float32))
    assert max(errors.values()) < 0.01, errors  # 0.002 (as at a fresh scale); 0.60 on q_proj before


def test_a_model_that_overflows_at_twice_its_settled_scale_pays_one_attempt_per_growth_interval():
    """GradScaler's trade-off: the scale doubles after GROWTH_INTERVAL clean batches, even where the model overflows
    there again: one extra attempt per GROWTH_INTERVAL batches, never more; and never above its start value."""
    scale = LossScale()
    attempts = 0
    for _ in range(1 + 4 * GROWTH_INTERVAL):
        while True:  # as run_pass does with the agreed flag: overflows above 2**7
            attempts += 1
            overflowed = scale.value > 2**7
            scale.update(overflowed)
            if not overflowed:
                break
    assert attempts == (1 + 4 * GROWTH_INTERVAL) + 9 + 4  # the batches, batch 0's 9 halvings, one per interval
    assert scale.value == 2**7
    scale = LossScale(value=2.0**15, limit=2.0**15)
    for _ in range(2 * GROWTH_INTERVAL):
        scale.update(False)
    assert (scale.value, scale.clean) == (2.0**15, 0)  # capped at its start


class _AmplifiedGradient(torch.autograd.Function):
    """The identity, whose backward multiplies the gradient by 2**12: at the first loss scale (2**16) it overflows fp16."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * 2**12


def test_an_fp16_rerun_after_some_layers_overflowed_adds_the_finite_layers_products_once(monkeypatch):
    """Only layer 0's output gradients overflow (its MLP's output gradient is amplified): layer 1's products are in the
    sums after the first attempt at batch 0, and the attempts at smaller scales must not add them again."""
    batches = text_batches(n=2, labels="lm")
    retried_with_some_done: list[int] = []
    attempt_error = _Sums.attempt_error

    def spy(self, batch_index):
        error, again = attempt_error(self, batch_index)
        if again:
            retried_with_some_done.append(len(self.done))
        return error, again

    monkeypatch.setattr(_Sums, "attempt_error", spy)

    def sums(model):
        peft_model = get_peft_model(model, GivaConfig(r=4, target_modules=["q_proj", "down_proj"]))
        peft_model.base_model.model.model.layers[0].mlp.register_forward_hook(
            lambda module, args, output: _AmplifiedGradient.apply(output)
        )
        items = {name: RequestItem(name, 0, layer.out_features, "dense") for name, layer in giva_layers(peft_model).items()}
        return accumulate(peft_model, batches, Request(0, 1, items))

    fp16 = sums(tiny_llama().to(torch.float16))
    # Batch 0 ran again at smaller scales, each time with layer 1's two products already added and layer 0's not.
    assert retried_with_some_done and set(retried_with_some_done) == {2}
    retried_with_some_done.clear()
    fp32 = sums(tiny_llama().to(torch.float16).float())
    assert not retried_with_some_done
    assert (fp16.batches, fp16.tokens) == (fp32.batches, fp32.tokens) == (2, 2 * 4 * 10)
    assert {key.split(".")[2] for key in fp32.sums} == {"0", "1"}
    for key, total in fp32.sums.items():
        # Layer 1's batch-0 products added at every attempt (2**16 down to 2**7) counted batch 0 ten times there.
        torch.testing.assert_close(fp16.sums[key], total, rtol=0.05, atol=0.05 * total.abs().max().item())


def test_an_fp16_gradient_non_finite_at_every_scale_is_the_named_error_after_bounded_retries():
    model = get_peft_model(tiny_llama().to(torch.float16), GivaConfig(r=4, target_modules=["q_proj"]))
    calls = []

    def loss_fn(m, batch):
        calls.append(1)
        output = m(**batch)
        if len(calls) >= 2:  # sqrt at 0: a finite loss (0) whose gradient is inf at any scale
            return torch.sqrt(output.logits - output.logits.detach()).sum()
        return output.loss

    with pytest.raises(GradientInitError, match=r"layer '.*layers\.0\.self_attn\.q_proj' received a non-finite .* calibration "
                       r"batch 1 although the loss was finite \(fp16, with the loss scale halved down to 1\)"):
        giva.initialize(model, text_batches(n=2, labels="lm"), num_batches=2, loss_fn=loss_fn, progress=False, mode="exact")
    assert 2 < len(calls) <= 1 + 17  # batch 1 at the scales 2**16, 2**15, ..., 1, then the error
    assert not giva.bases_initialized(model)


def test_fp32_and_bf16_calibration_run_unscaled(monkeypatch):
    """Only an fp16 output gradient is scaled: the fp32 and bf16 backwards are seeded with 1, as before."""
    seeds = []
    grad = torch.autograd.grad

    def recording(outputs, inputs, grad_outputs=None, **kwargs):
        seeds.append(None if grad_outputs is None else float(grad_outputs))
        return grad(outputs, inputs, grad_outputs=grad_outputs, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", recording)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        model = get_peft_model(tiny_llama().to(dtype), GivaConfig(r=4, target_modules=["q_proj"]))
        giva.initialize(model, text_batches(n=1, labels="lm"), num_batches=1, progress=False, mode="exact")
    assert seeds[:2] in ([None, None], [1.0, 1.0]) and seeds[2] == 2.0**16


# ------------------------------------------------------------------------------------- under the caller's autocast


AUTOCAST_CASES = [
    dict(mode="exact"),  # the default SVD (exact on these widths)
    dict(mode="exact", config=dict(svd="randomized")),
    dict(mode="sketch"),
    dict(mode="exact", statistic="second-moment", variant="Vr"),
    dict(mode="sketch", statistic="second-moment", variant="Vr"),
]


@pytest.mark.parametrize("case", AUTOCAST_CASES, ids=["exact", "exact-randomized-svd", "sketch", "exact-second-moment",
                                                      "sketch-second-moment"])
def test_initialize_inside_bf16_autocast_gives_orthonormal_bases_close_to_those_without(case):
    batches = text_batches(n=4, labels="lm")
    variant = case.get("variant", "VrUr")
    kwargs = {k: v for k, v in case.items() if k != "variant"}
    model = lambda: tiny_llama(hidden_size=64, intermediate_size=128)  # noqa: E731
    reference = _initialised(model(), batches, variant, **dict(kwargs))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        found = _initialised(model(), batches, variant, **dict(kwargs))
    assert _orthonormality_error(found, 0) < 1e-5  # was 4.7e-3 (randomized SVD under autocast)
    if variant == "VrUr":
        assert _orthonormality_error(found, 1) < 1e-5  # was 5e-3 (sketch)
    # Only the model's forward ran in bf16: the bases are those of a slightly different gradient.
    assert _worst_cosine(found, reference, 0) > 0.98


@pytest.mark.parametrize("kind", ["dense", "gram"])
def test_the_sums_are_fp32_and_exact_under_the_callers_autocast(kind):
    """The statistic's sums (the mean's ``G``, the second moment's ``sum_b G_b^T G_b``) under bf16 autocast equal those
    of the same bf16-autocast forward accumulated outside it (the sink runs with autocast off), in fp32."""
    batches = text_batches(n=2, labels="lm")
    peft_model = get_peft_model(tiny_llama(), GivaConfig(r=4, target_modules=["q_proj", "down_proj"]))
    layers = giva_layers(peft_model)
    items = {name: RequestItem(name, 0, layer.out_features, kind) for name, layer in layers.items()}

    def bf16_forward(model, batch):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(**batch).loss

    outside = accumulate(peft_model, batches, Request(0, 1, items), loss_fn=bf16_forward)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = accumulate(peft_model, batches, Request(0, 1, items))
    for key, total in outside.sums.items():
        assert inside.sums[key].dtype == torch.float32
        torch.testing.assert_close(inside.sums[key], total, rtol=1e-5, atol=1e-6)


class _Fp32Middle(torch.nn.Module):
    """Two linear layers around a matmul kept in fp32 under autocast (as transformers' SDPA attention runs on CPU
    under bf16 autocast on torch 2.6-2.8): the gradient reaching ``first`` goes through that matmul's backward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first, self.second = torch.nn.Linear(16, 32), torch.nn.Linear(32, 8)
        self.register_buffer("mix", torch.randn(32, 32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x)
        with torch.autocast("cpu", enabled=False):
            h = h.float() @ self.mix
        return self.second(h)


def test_the_calibration_backward_runs_outside_the_callers_autocast():
    """A backward run under the caller's autocast recasts the fp32 matmuls of the backward to bf16 (torch 2.6-2.8 did so
    with transformers' attention: the sums of the test above were off by 2.4e-6). The gradient then differs from the one
    a Trainer computes, whose backward runs outside autocast: here by about 1e-3 at ``first`` before the fix."""
    peft_model = get_peft_model(_Fp32Middle(), GivaConfig(r=4, target_modules=["first", "second"]))
    batches = [{"x": torch.randn(4, 16, generator=torch.Generator().manual_seed(i))} for i in range(2)]
    items = {name: RequestItem(name, 0, layer.out_features, "dense") for name, layer in giva_layers(peft_model).items()}

    def bf16_forward(model, batch):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**batch)
        return out.float().square().mean()

    def forward(model, batch):
        return model(**batch).float().square().mean()

    outside = accumulate(peft_model, batches, Request(0, 1, items), loss_fn=bf16_forward)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = accumulate(peft_model, batches, Request(0, 1, items), loss_fn=forward)
    assert outside.sums.keys() == inside.sums.keys() and len(outside.sums) == 2
    for key, total in outside.sums.items():
        torch.testing.assert_close(inside.sums[key], total, rtol=0, atol=0)
