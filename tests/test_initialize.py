"""giva.initialize: the gradient it captures, what it leaves behind, and its errors."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers
from peft import PeftModel, get_peft_model
from torch import nn

import giva
from giva import GivaConfig
from giva.init import GradientInitError, compute_gradients, giva_layers
from tiny_models import TRANSFORMERS_4, text_batches, tiny_bert, tiny_gpt2, tiny_llama


def _autograd_weight_gradients(model: nn.Module, batches: list[dict], names: list[str]) -> dict[str, torch.Tensor]:
    """Reference dL/dW (out x in) by plain autograd on the weights, averaged over the batches."""
    weights = {name: model.get_submodule(name).weight for name in names}
    for w in weights.values():
        w.requires_grad_(True)
    grads = {name: torch.zeros_like(w) for name, w in weights.items()}
    for batch in batches:
        loss = model(**batch).loss
        for name, g in zip(weights, torch.autograd.grad(loss, list(weights.values()))):
            grads[name] += g / len(batches)
    return grads


@pytest.mark.parametrize(
    ("factory", "targets", "labels", "conv1d"),
    [(tiny_bert, ["query", "value", "dense"], "cls", False), (tiny_gpt2, ["c_attn", "c_fc"], "lm", True)],
)
def test_hook_gradient_equals_autograd_weight_gradient(factory, targets, labels, conv1d):
    batches = text_batches(n=2, labels=labels)
    reference_model = factory()
    model = get_peft_model(factory(), GivaConfig(r=2, target_modules=targets))
    layers = giva_layers(model)
    with model.disable_adapter():
        hooked, _ = compute_gradients(model, layers, batches, num_batches=2, progress=False)
    reference = _autograd_weight_gradients(reference_model, batches, list(layers))
    for name, g in hooked.items():
        expected = reference[name].T if conv1d else reference[name]  # Conv1D stores W as (in, out)
        torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-6)


def test_nothing_is_left_behind_and_modes_and_flags_are_restored(batches):
    model = get_peft_model(tiny_bert(), GivaConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    model.train()
    model.base_model.model.bert.embeddings.eval()  # a mixed train/eval state must survive as it was
    modes = {name: m.training for name, m in model.named_modules()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    attributes = {name: set(vars(m)) for name, m in model.named_modules()}
    giva.initialize(model, batches, progress=False)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert {name: set(vars(m)) for name, m in model.named_modules()} == attributes


def test_calibration_switches_modes_without_a_models_own_train_override(monkeypatch):
    """transformers' PreTrainedModel.train re-kernelizes a model loaded with use_kernels=True for inference or
    training: initialize flips the training flags only, so the model neither calibrates through inference kernels nor
    is left kernelized for inference while in train mode."""
    calls = []
    monkeypatch.setattr(transformers.PreTrainedModel, "train",
                        lambda self, mode=True: calls.append((type(self).__name__, mode)) or nn.Module.train(self, mode))
    model = get_peft_model(tiny_llama(), GivaConfig(r=4, target_modules=["q_proj"]))
    model.train()
    calls.clear()
    giva.initialize(model, text_batches(n=1, labels="lm"), num_batches=1, progress=False)
    assert calls == [] and all(m.training for m in model.modules())


def test_same_model_data_and_seed_give_identical_bases(batches):
    def bases():
        model = get_peft_model(tiny_bert(), GivaConfig(r=4, target_modules=["query", "value"], seed=7))
        giva.initialize(model, batches, progress=False)
        return {n: (m.giva_A["default"].clone(), m.giva_B["default"].clone()) for n, m in giva_layers(model).items()}

    first, second = bases(), bases()
    assert all(torch.equal(first[n][0], second[n][0]) and torch.equal(first[n][1], second[n][1]) for n in first)


def test_uses_exactly_k_batches_averaged(batches):
    consumed = []

    def loader():
        for i, batch in enumerate(batches):
            consumed.append(i)
            yield batch

    model = get_peft_model(tiny_bert(), GivaConfig(r=4, target_modules=["query"]))
    report = giva.initialize(model, loader(), num_batches=2, progress=False)
    assert consumed == [0, 1] and len(report.losses) == 2
    assert model.peft_config["default"].bases_info["num_batches"] == 2
    consumed.clear()
    with pytest.raises(GradientInitError, match="gave 4 batches but num_batches=5"):  # no len(): found as it runs out
        giva.initialize(model, loader(), num_batches=5, progress=False, force=True)
    assert consumed == [0, 1, 2, 3]


@pytest.mark.parametrize("mode", ["exact", "sketch"])
def test_a_sized_loader_shorter_than_num_batches_is_refused_before_any_batch(batches, mode):
    model = get_peft_model(tiny_bert(), GivaConfig(r=4, target_modules=["query"]))
    calls = []

    def loss_fn(m, batch):
        calls.append(1)
        return m(**batch).last_hidden_state.pow(2).mean()

    with pytest.raises(ValueError, match=r"num_batches=5 calibration batches were asked for, but the dataloader has 4 "
                                         r"\(len\(dataloader\)\); pass num_batches=4 or fewer, or num_batches='all'"):
        giva.initialize(model, batches, num_batches=5, loss_fn=loss_fn, mode=mode, progress=False)
    assert calls == []


def test_initialise_after_the_optimizer_exists_then_train(batches):
    model = get_peft_model(tiny_bert(), GivaConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    params_before = [id(p) for group in optimizer.param_groups for p in group["params"]]
    giva.initialize(model, batches, progress=False)
    assert [id(p) for group in optimizer.param_groups for p in group["params"]] == params_before
    model.train()
    losses = []
    for _ in range(10):
        loss = model(**batches[0]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_training_before_initialisation_is_an_error_but_inference_is_not(batches):
    model = get_peft_model(tiny_bert(), GivaConfig(r=4, target_modules=["query"], task_type="SEQ_CLS"))
    model.eval()
    with torch.no_grad():
        model(**batches[0])
    model.train()
    with torch.no_grad():
        model(**batches[0])
    with pytest.raises(giva.BasesNotInitializedError, match=r"giva.initialize\(peft_model, train_dataloader\)"):
        model(**batches[0])


def test_data_free_variants_need_no_initialisation(batches):
    model = get_peft_model(tiny_bert(), GivaConfig(r=4, target_modules=["query"], variant="random"))
    assert giva.bases_initialized(model)
    report = giva.initialize(model, batches, progress=False)
    assert report.adapters == []
    model.train()
    model(**batches[0]).loss.backward()


def test_gradient_is_taken_at_the_pretrained_checkpoint(batches):
    """A second adapter added after training the first gets the same bases as on a fresh model."""
    config = dict(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")
    fresh = get_peft_model(tiny_bert(), GivaConfig(**config))
    giva.initialize(fresh, batches, progress=False)

    model = get_peft_model(tiny_bert(), GivaConfig(**config))
    giva.initialize(model, batches, progress=False)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        model(**batches[0]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.add_adapter("second", GivaConfig(**config))
    giva.initialize(model, batches, adapter_name="second", progress=False)
    for name, layer in giva_layers(model).items():
        torch.testing.assert_close(layer.giva_A["second"], giva_layers(fresh)[name].giva_A["default"])


def test_non_finite_loss_names_the_batch(batches):
    model = get_peft_model(tiny_bert(), GivaConfig(r=4, target_modules=["query"]))
    calls = []

    def loss_fn(m, batch):
        calls.append(1)
        loss = m(**batch).loss
        return loss * float("nan") if len(calls) == 2 else loss

    with pytest.raises(GradientInitError, match="calibration batch 1 gave a non-finite loss"):
        giva.initialize(model, batches, num_batches=2, loss_fn=loss_fn, progress=False)
    assert not giva.bases_initialized(model)  # nothing half-written


class _TwoBranches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(8, 8)
        self.unused = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def test_layer_off_the_loss_path_is_named():
    torch.manual_seed(0)
    model = get_peft_model(_TwoBranches(), GivaConfig(r=2, target_modules=["used", "unused"]))
    data = [torch.randn(4, 8)]
    with pytest.raises(GradientInitError, match=r"\['unused'\] received no gradient"):
        giva.initialize(model, data, num_batches=1, loss_fn=lambda m, x: m(x).pow(2).mean(), progress=False)


def test_missing_loss_is_explained(batches):
    model = get_peft_model(tiny_bert(), GivaConfig(r=4, target_modules=["query"]))
    unlabeled = [{"input_ids": batches[0]["input_ids"]}]
    with pytest.raises(GradientInitError, match="returned no .loss: include labels"):
        giva.initialize(model, unlabeled, num_batches=1, progress=False)
    with pytest.raises(ValueError, match="no GiVA adapter named 'x'"):
        giva.initialize(model, batches, adapter_name="x", progress=False)


def _distributed_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        batches = text_batches(n=2)
        model = get_peft_model(tiny_bert(), GivaConfig(r=4, target_modules=["query", "value"]))
        giva.initialize(model, [batches[rank]], num_batches=1, progress=False)
        torch.save({n: m.giva_A["default"] for n, m in giva_layers(model).items()}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_ranks_get_identical_bases_from_the_summed_gradient(tmp_path):
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = torch.load(tmp_path / "0.pt"), torch.load(tmp_path / "1.pt")
    assert all(torch.equal(rank0[n], rank1[n]) for n in rank0)
    # Two ranks with one batch each == one process averaging both batches.
    model = get_peft_model(tiny_bert(), GivaConfig(r=4, target_modules=["query", "value"]))
    giva.initialize(model, text_batches(n=2), num_batches=2, progress=False)
    for name, layer in giva_layers(model).items():
        torch.testing.assert_close(rank0[name], layer.giva_A["default"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bad", [2.5, True, 0, -1, "4"])
def test_bad_num_batches_is_a_value_error_naming_it(batches, bad):
    model = get_peft_model(tiny_bert(), GivaConfig(r=4, target_modules=["query"]))
    with pytest.raises(ValueError, match="num_batches must be a positive int"):
        giva.initialize(model, batches, num_batches=bad, progress=False)


@pytest.mark.parametrize("mode", ["exact", "sketch"])
def test_num_batches_all_is_every_batch_of_the_loader_bit_for_bit(batches, mode):
    every, counted = (get_peft_model(tiny_bert(), GivaConfig(r=4, target_modules=["query", "value"])) for _ in range(2))
    report = giva.initialize(every, batches, num_batches="all", progress=False, mode=mode)
    giva.initialize(counted, batches, num_batches=len(batches), progress=False, mode=mode)
    assert report.num_batches == len(batches) == 4
    assert every.peft_config["default"].bases_info["num_batches"] == len(batches)
    pairs = [(giva_layers(every)[n], layer) for n, layer in giva_layers(counted).items()]
    assert all(torch.equal(a.giva_A["default"], b.giva_A["default"]) for a, b in pairs)
    # fewer batches give other bases: "all" really read past the default k of the batches it was given
    fewer = get_peft_model(tiny_bert(), GivaConfig(r=4, target_modules=["query", "value"]))
    giva.initialize(fewer, batches, num_batches=2, progress=False, mode=mode)
    assert not torch.equal(giva_layers(fewer)[pairs[0][1].layer_name].giva_A["default"], pairs[0][1].giva_A["default"])


def test_num_batches_all_needs_a_loader_with_a_length_and_a_batch(batches):
    model = get_peft_model(tiny_bert(), GivaConfig(r=4, target_modules=["query"]))
    with pytest.raises(ValueError, match=r"num_batches='all' averages every batch of the dataloader, but generator has no len\(\)"):
        giva.initialize(model, (b for b in batches), num_batches="all", progress=False)
    with pytest.raises(ValueError, match=r"num_batches='all': the dataloader is empty"):
        giva.initialize(model, [], num_batches="all", progress=False)
    # An empty sized loader with an int count: its own message (it advised "pass num_batches=0 or fewer, or 'all'").
    with pytest.raises(ValueError, match=r"num_batches=2 calibration batches were asked for, but the dataloader is empty"):
        giva.initialize(model, [], num_batches=2, progress=False)

    class Unsized(list):  # a loader whose __len__ raises other than TypeError: treated as unsized, on every rank
        def __len__(self):
            raise NotImplementedError

    giva.initialize(model, Unsized(batches), num_batches=2, progress=False)
    assert giva.bases_initialized(model)
    model = get_peft_model(tiny_bert(), GivaConfig(r=4, target_modules=["query"]))
    with pytest.raises(ValueError, match=r"num_batches must be a positive int .* or 'all' .*, got 'every'"):
        giva.initialize(model, batches, num_batches="every", progress=False)
    assert not giva.bases_initialized(model)


def test_compute_gradients_takes_num_batches_all(batches):
    model = get_peft_model(tiny_bert(), GivaConfig(r=4, target_modules=["query"]))
    layers = giva_layers(model)
    every, losses = compute_gradients(model, layers, batches, num_batches="all", progress=False)
    counted, _ = compute_gradients(model, layers, batches, num_batches=len(batches), progress=False)
    assert len(losses) == len(batches) and all(torch.equal(every[n], counted[n]) for n in counted)


def test_bad_mode_and_sketch_settings_are_named(batches):
    model = get_peft_model(tiny_bert(), GivaConfig(r=4, target_modules=["query"]))
    with pytest.raises(ValueError, match="mode must be 'auto', 'sketch' or 'exact', got 'fast'"):
        giva.initialize(model, batches, mode="fast", progress=False)
    with pytest.raises(ValueError, match="passes must be an int >= 2, got 1"):
        giva.initialize(model, batches, mode="sketch", passes=1, progress=False)
    with pytest.raises(ValueError, match="oversampling must be None or an int >= 0"):
        giva.initialize(model, batches, mode="sketch", oversampling=-3, progress=False)
    for settings in ({"passes": 5}, {"oversampling": 5}, {"passes": 5, "oversampling": 5}):
        with pytest.raises(ValueError, match="set the sketch; mode='exact' takes one pass"):
            giva.initialize(model, batches, mode="exact", progress=False, **settings)


@pytest.mark.parametrize("mode", ["exact", "sketch"])
def test_second_moment_statistic_takes_a_from_the_per_batch_autograd_gradients(batches, mode):
    """A = top-r eigenvectors of sum_b G_b^T G_b, G_b each batch's dL/dW by plain autograd; B the seeded one."""
    from giva.bases import top_eigenvectors
    from giva.init.sketch import principal_cosines

    config = dict(r=3, target_modules=["query", "value"], variant="Vr")
    model = get_peft_model(tiny_bert(), GivaConfig(**config))
    report = giva.initialize(model, batches, num_batches=3, progress=False, mode=mode, statistic="second-moment",
                             **({"passes": 5} if mode == "sketch" else {}))
    assert report.mode == mode and model.peft_config["default"].bases_info["statistic"] == "second-moment"
    reference_model = tiny_bert()
    mean_model = get_peft_model(tiny_bert(), GivaConfig(**config))
    giva.initialize(mean_model, batches, num_batches=3, progress=False, mode="exact")
    mean_layers = giva_layers(mean_model)
    for name, layer in giva_layers(model).items():
        per_batch = [_autograd_weight_gradients(reference_model, [batch], [name])[name] for batch in batches[:3]]
        moment = sum(g.double().mT @ g.double() for g in per_batch)
        expected = top_eigenvectors(moment, 3).mT
        a = layer.giva_A["default"]
        assert principal_cosines(a, expected).min() > (0.9999 if mode == "exact" else 0.999), name
        assert torch.equal(layer.giva_B["default"], mean_layers[name].giva_B["default"])  # the seeded B
        assert principal_cosines(a, mean_layers[name].giva_A["default"]).min() < 0.99  # not the mean's A


@pytest.mark.parametrize(("mode", "statistic"), [("exact", "mean"), ("sketch", "mean"), ("exact", "second-moment"),
                                                 ("sketch", "second-moment")])
def test_a_gradient_of_lower_rank_than_r_is_a_warning_naming_the_layer(mode, statistic):
    """Three calibration tokens give each layer a gradient of rank at most 3: with r=8, five rows of A were arbitrary
    directions, silently. A warning names the layers and what was found; the report lists them. Enough tokens: none."""
    model = get_peft_model(tiny_llama(), GivaConfig(r=8, target_modules=["q_proj", "down_proj"], variant="Vr"))
    few = [{"input_ids": torch.tensor([[5, 17, 42]]), "labels": torch.tensor([[5, 17, 42]])}]
    extra = {"passes": 3} if mode == "sketch" else {}
    with pytest.warns(UserWarning, match=r"'model.layers.0.self_attn.q_proj' \(block 0: [1-3] of 8\).*fewer non-zero "
                                         r"singular values.*calibrate on more data") as caught:
        report = giva.initialize(model, few, num_batches=1, progress=False, mode=mode, statistic=statistic, **extra)
    assert len([w for w in caught if "non-zero singular values" in str(w.message)]) == 1
    assert len(report.rank_deficient) == 4  # 2 layers x (q_proj, down_proj)
    assert all(1 <= found <= 3 and needed == 8 for found, needed in report.rank_deficient.values())

    model = get_peft_model(tiny_llama(), GivaConfig(r=8, target_modules=["q_proj", "down_proj"], variant="Vr"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        report = giva.initialize(model, text_batches(n=2, labels="lm"), num_batches=2, progress=False, mode=mode,
                                 statistic=statistic, **extra)
    assert report.rank_deficient == {}


def test_numerical_rank_counts_the_singular_values_above_rounding():
    from giva.bases import numerical_rank, top_singular_vectors

    generator = torch.Generator().manual_seed(0)
    low = torch.randn(64, 3, generator=generator) @ torch.randn(3, 32, generator=generator)
    full = torch.randn(64, 32, generator=generator)
    assert numerical_rank(top_singular_vectors(low, 8, method="exact")[1], (64, 32)) == 3
    assert numerical_rank(top_singular_vectors(full, 8, method="exact")[1], (64, 32)) == 8
    eigenvalues = torch.linalg.eigvalsh((low.mT @ low).double()).flip(0)[:8]  # of an fp32 second moment
    assert numerical_rank(eigenvalues, (32, 32), gram=True) == 3
    assert numerical_rank(torch.zeros(8), (64, 32)) == 0
    # A full-rank gradient with a steep spectrum (one direction, the rest at 0.008 of it): its second moment's
    # eigenvalues (0.008 squared) are far above rounding; the singular-value rule applied to them counted 1 of 8.
    n = 1024
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    spectrum = torch.cat([torch.ones(1, dtype=torch.float64), torch.linspace(0.008, 0.004, n - 1, dtype=torch.float64)])
    steep = ((u * spectrum) @ v.T).float()
    eigenvalues = torch.linalg.eigvalsh((steep.mT @ steep).double()).flip(0)[:8]
    assert numerical_rank(eigenvalues, (n, n), gram=True) == 8
    assert numerical_rank(top_singular_vectors(steep, 8, method="exact")[1], (n, n)) == 8


def test_a_targets_input_changed_in_place_after_the_layer_ran_is_an_error_naming_the_layer():
    """The layer input is a saved tensor of the graph, which autograd's version check guards: a model that changes it
    in place after the layer read it (a residual accumulated into it) gets a GradientInitError naming the layer. Before,
    the hook read the changed values, and the gradient was not the layer's, silently."""

    class InPlace(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.emb, self.fc, self.out = torch.nn.Linear(16, 32), torch.nn.Linear(32, 32), torch.nn.Linear(32, 1)

        def forward(self, x, y):
            h = torch.tanh(self.emb(x))
            z = self.fc(h)
            h.mul_(2.0)
            return ((self.out(z + h).squeeze(-1) - y) ** 2).mean()

    generator = torch.Generator().manual_seed(1)
    data = [{"x": torch.randn(64, 16, generator=generator), "y": torch.randn(64, generator=generator)}]
    model = get_peft_model(InPlace(), GivaConfig(r=2, target_modules=["fc"]))
    with pytest.raises(GradientInitError, match=r"the input of GiVA layer 'fc' was modified in place after the layer ran"):
        giva.initialize(model, data, num_batches=1, loss_fn=lambda m, batch: m(**batch), progress=False)
    assert not giva.bases_initialized(model)


class _SharedLayer(torch.nn.Module):
    """``lin`` runs twice per forward (shared weights, as in ALBERT)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.lin, self.head = torch.nn.Linear(6, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 1)

    def forward(self, x, y):
        u = torch.tanh(self.emb(x))
        h = torch.tanh(self.lin(u) + self.lin(-0.9 * u))
        return ((self.head(h).squeeze(-1) - y) ** 2).mean()


@pytest.mark.parametrize("mode", ["exact", "sketch"])
def test_second_moment_refuses_a_layer_that_runs_twice_in_a_batch(mode):
    """sum_b G_b^T G_b needs each batch's whole G_b = sum over the layer's calls: squaring per call drops the cross
    terms (principal cosines down to 0.28 against autograd's), so such a layer is refused, naming it; the mean,
    linear in G_b, stays right."""
    generator = torch.Generator().manual_seed(1)
    data = [{"x": torch.randn(8, 6, generator=generator), "y": torch.randn(8, generator=generator)} for _ in range(2)]
    config = GivaConfig(r=3, target_modules=["lin"], variant="Vr")
    model = get_peft_model(_SharedLayer(), config)
    with pytest.raises(GradientInitError, match=r"layer 'lin' ran more than once in calibration batch 0 .*'mean'"):
        giva.initialize(model, data, num_batches=2, loss_fn=lambda m, b: m(**b), progress=False, mode=mode,
                        statistic="second-moment", **({"passes": 3} if mode == "sketch" else {}))
    assert not giva.bases_initialized(model)
    giva.initialize(model, data, num_batches=2, loss_fn=lambda m, b: m(**b), progress=False, mode="exact")
    reference = _SharedLayer()
    for batch in data:
        reference(**batch).backward()
    expected = torch.linalg.svd(reference.lin.weight.grad.double())[2][:3]
    from giva.init.sketch import principal_cosines

    assert principal_cosines(giva_layers(model)["lin"].giva_A["default"], expected).min() > 0.9999


def test_second_moment_statistic_is_checked_before_any_batch(batches):
    def untouchable():
        raise AssertionError("a batch was drawn before the arguments were checked")
        yield

    model = get_peft_model(tiny_bert(), GivaConfig(r=4, target_modules=["query"], variant="VrUr"))
    with pytest.raises(ValueError, match=r"statistic='second-moment' gives A only .*\['VrUr'\]"):
        giva.initialize(model, untouchable(), statistic="second-moment", progress=False)
    with pytest.raises(ValueError, match="statistic must be one of \\('mean', 'second-moment'\\), got 'var'"):
        giva.initialize(model, untouchable(), statistic="var", progress=False)
    assert "statistic" not in (model.peft_config["default"].bases_info or {})


def test_inference_mode_is_a_clear_error(batches):
    model = get_peft_model(tiny_bert(), GivaConfig(r=4, target_modules=["query"]))
    with torch.inference_mode(), pytest.raises(RuntimeError, match="outside torch.inference_mode"):
        giva.initialize(model, batches, progress=False)
    assert not giva.bases_initialized(model)


def test_reinitialising_bases_or_trained_vectors_needs_force(batches):
    model = get_peft_model(tiny_bert(), GivaConfig(r=4, target_modules=["query"], task_type="SEQ_CLS"))
    giva.initialize(model, batches, progress=False)
    before = {n: m.giva_A["default"].clone() for n, m in giva_layers(model).items()}
    with pytest.raises(ValueError, match=r"\['default'\] already hold bases .* force=True"):
        giva.initialize(model, batches, num_batches=1, progress=False)
    assert all(torch.equal(before[n], m.giva_A["default"]) for n, m in giva_layers(model).items())
    giva.initialize(model, batches, num_batches=1, progress=False, force=True)
    assert not all(torch.equal(before[n], m.giva_A["default"]) for n, m in giva_layers(model).items())
    # Trained vectors with bases that were never set from data (e.g. loaded over zero bases) count too.
    fresh = get_peft_model(tiny_bert(), GivaConfig(r=4, target_modules=["query"]))
    with torch.no_grad():
        next(iter(giva_layers(fresh).values())).giva_lambda_o["default"].fill_(0.1)
    with pytest.raises(ValueError, match="force=True"):
        giva.initialize(fresh, batches, progress=False)


def test_a_new_adapter_beside_a_trained_one_is_named_in_the_refusal_not_force(batches):
    """After add_adapter, initialize without adapter_name selects the trained adapter too: the refusal points to
    adapter_name (force=True would recompute the trained adapter's bases under its vectors), and changes nothing."""
    model = get_peft_model(tiny_bert(), GivaConfig(r=4, target_modules=["query"], task_type="SEQ_CLS"))
    giva.initialize(model, batches, progress=False)
    model.add_adapter("task2", GivaConfig(r=4, target_modules=["query"], task_type="SEQ_CLS"))
    before = {n: m.giva_A["default"].clone() for n, m in giva_layers(model).items()}
    with pytest.raises(ValueError, match=r"\['default'\] already hold bases .*\. To initialise only \['task2'\], pass "
                                         r"adapter_name='task2'; force=True would recompute every selected adapter's bases"):
        giva.initialize(model, batches, progress=False)
    assert all(torch.equal(before[n], m.giva_A["default"]) for n, m in giva_layers(model).items())
    assert not giva.bases_initialized(model, "task2")
    giva.initialize(model, batches, adapter_name="task2", progress=False)
    assert all(torch.equal(before[n], m.giva_A["default"]) for n, m in giva_layers(model).items())


def test_requires_grad_flags_survive_initialisation(batches, tmp_path):
    """A tensor the user froze stays frozen, and an adapter loaded for inference stays non-trainable."""
    model = get_peft_model(tiny_bert(), GivaConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    frozen = next(iter(giva_layers(model).values())).giva_lambda_s["default"]
    frozen.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    giva.initialize(model, batches, progress=False)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert not frozen.requires_grad

    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path / "adapter")  # is_trainable=False
    loaded.add_adapter("second", GivaConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    flags = {name: p.requires_grad for name, p in loaded.named_parameters()}
    assert not any(flags[name] for name in flags if ".default" in name)
    giva.initialize(loaded, batches, adapter_name="second", progress=False)
    giva.initialize(loaded, batches, adapter_name="default", progress=False, force=True)
    assert {name: p.requires_grad for name, p in loaded.named_parameters()} == flags


def test_non_finite_gradient_with_a_finite_loss_names_the_layer_and_batch(batches):
    model = get_peft_model(tiny_bert(), GivaConfig(r=4, target_modules=["query"], task_type="SEQ_CLS"))
    calls = []

    def loss_fn(m, batch):
        calls.append(1)
        logits = m(**batch).logits
        if len(calls) == 2:  # sqrt at 0: a finite loss (0) whose gradient is inf
            return torch.sqrt(logits - logits.detach()).sum()
        return torch.nn.functional.cross_entropy(logits, batch["labels"])

    with pytest.raises(GradientInitError, match=r"layer '.*query' received a non-finite .* calibration batch 1"):
        giva.initialize(model, batches, num_batches=2, loss_fn=loss_fn, progress=False)
    assert not giva.bases_initialized(model)


@pytest.mark.parametrize("reentrant", [False, True, None])
def test_calibration_keeps_activation_checkpointing(batches, reentrant):
    """With gradient checkpointing on, each checkpointed layer is recomputed in the backward (its GiVA layers
    run twice per batch), and the bases equal those of the same model without checkpointing. Reentrant
    checkpointing (TRL's choice under ZeRO-3) runs non-reentrantly during calibration and is given back."""
    data = text_batches(n=2, labels="lm")
    plain = get_peft_model(tiny_llama(), GivaConfig(r=4, target_modules=["q_proj", "down_proj"]))
    giva.initialize(plain, data, num_batches=2, progress=False, mode="exact")

    base = tiny_llama()
    # None: not given, so torch's checkpoint runs reentrantly by its own default
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={} if reentrant is None else {"use_reentrant": reentrant})
    functions = {m: m._gradient_checkpointing_func for m in base.modules() if getattr(m, "gradient_checkpointing", 0)}
    model = get_peft_model(base, GivaConfig(r=4, target_modules=["q_proj", "down_proj"]))
    model.train()
    calls = []
    layer = giva_layers(model)["model.layers.0.self_attn.q_proj"]
    handle = layer.register_forward_hook(lambda *args: calls.append(1))
    try:
        giva.initialize(model, data, num_batches=2, progress=False, mode="exact")
    finally:
        handle.remove()
    assert len(calls) == 4  # 2 batches x (forward + recomputation)
    assert all(m.training for m in model.modules())  # modes restored
    assert functions and all(m._gradient_checkpointing_func is f for m, f in functions.items())
    for name, layer in giva_layers(model).items():
        torch.testing.assert_close(layer.giva_A["default"], giva_layers(plain)[name].giva_A["default"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("checkpointing", [None, False, True])
def test_calibration_under_checkpointing_keeps_no_layer_input_past_the_forward(checkpointing):
    """Checkpointing frees a block's activations after its forward and recomputes them for its backward; the
    calibration kept each targeted layer's input in a hook's closure until that layer's backward, so under
    checkpointing it held every layer input a training step frees (7 GB at Llama-8B shapes, 4 x 1024 tokens). The
    inputs are now saved tensors of the graph, which checkpointing frees like the rest (``use_reentrant`` False, and
    True, which calibration runs non-reentrantly). Without checkpointing they are kept, as the backward needs them."""
    import gc

    from torch.multiprocessing.reductions import StorageWeakRef

    base = tiny_llama()
    if checkpointing is not None:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
    model = get_peft_model(base, GivaConfig(r=2, target_modules=["q_proj", "down_proj"]))
    model.train()
    inputs: list[StorageWeakRef] = []
    kept: list[int] = []

    def loss_fn(m, batch):
        inputs.clear()  # the forward's inputs, not the recomputation's
        loss = m(**batch).loss
        gc.collect()
        kept.append((len(inputs), sum(not ref.expired() for ref in inputs)))  # 2 layers x (q_proj, down_proj)
        return loss

    handles = [layer.register_forward_hook(lambda m, args, out: inputs.append(StorageWeakRef(args[0].untyped_storage())))
               for layer in giva_layers(model).values()]
    try:
        giva.initialize(model, text_batches(n=2, labels="lm"), num_batches=2, loss_fn=loss_fn, progress=False, mode="exact")
    finally:
        for handle in handles:
            handle.remove()
    assert kept == ([(4, 4)] * 2 if checkpointing is None else [(4, 0)] * 2)
    assert giva.bases_initialized(model)


def test_calibration_under_checkpointing_turns_off_layerdrop_too():
    """BART's encoder (LayerDrop 0.5, its own `layerdrop`) and wav2vec2's (`config.layerdrop`) check point their
    layers, so they stay in training mode, and skipped layers at random: bases changed from run to run and the
    caller's RNG moved. They equal the bases without checkpointing, the RNG is untouched, the rates come back."""
    from transformers import (
        BartConfig,
        BartForSequenceClassification,
        Wav2Vec2Config,
        Wav2Vec2ForSequenceClassification,
    )

    bart = BartConfig(vocab_size=100, d_model=32, encoder_layers=4, decoder_layers=1, encoder_attention_heads=4,
                      decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                      encoder_layerdrop=0.5, num_labels=2, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    wav2vec2 = Wav2Vec2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                              conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16,
                              num_conv_pos_embedding_groups=4, layerdrop=0.5, num_labels=2, mask_time_prob=0.0)
    generator = torch.Generator().manual_seed(3)
    tokens = [{"input_ids": torch.cat([torch.randint(3, 100, (4, 9), generator=generator), torch.full((4, 1), 2)], 1),
               "labels": torch.randint(0, 2, (4,), generator=generator)} for _ in range(4)]
    audio = [{"input_values": torch.randn(4, 400, generator=generator), "labels": torch.randint(0, 2, (4,), generator=generator)}
             for _ in range(4)]
    cases = [(BartForSequenceClassification, bart, ["fc1"], tokens),
             (Wav2Vec2ForSequenceClassification, wav2vec2, ["feed_forward.intermediate_dense"], audio)]
    # transformers 4.x: PEFT's checkpointing preparation calls wav2vec2's get_input_embeddings, which it lacks there
    for model_class, config, targets, data in cases[:1] if TRANSFORMERS_4 else cases:
        bases = []
        for checkpointing in (False, True, True):
            torch.manual_seed(0)
            base = model_class(config)
            if checkpointing:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            rates = {(n, k): v for n, m in base.named_modules() for k, v in vars(m).items() if k.endswith("layerdrop")}
            model = get_peft_model(base, GivaConfig(r=2, target_modules=targets))  # no task: wav2vec2 takes no input_ids
            model.train()
            torch.manual_seed(1)
            rng = torch.get_rng_state()
            giva.initialize(model, data, num_batches=4, progress=False, mode="exact")
            assert torch.equal(torch.get_rng_state(), rng), model_class.__name__
            assert {(n, k): v for n, m in base.named_modules() for k, v in vars(m).items() if k.endswith("layerdrop")} == rates
            assert getattr(base.config, "layerdrop", None) == getattr(config, "layerdrop", None)
            bases.append(torch.cat([layer.giva_A["default"] for layer in giva_layers(model).values()]))
        for other in bases[1:]:
            torch.testing.assert_close(other, bases[0], atol=1e-5, rtol=0, msg=model_class.__name__)


def test_initialize_leaves_the_callers_rng_as_it_was_with_a_dataloader():
    """A DataLoader without a generator of its own (the Trainer's) draws its base seed from torch's global RNG at
    every pass: a Trainer's run after GivaInitCallback drew other dropout masks than one with the same bases set
    beforehand."""
    data = text_batches(n=4, labels="lm")
    rows = [{k: v[i] for k, v in batch.items()} for batch in data for i in range(len(batch["input_ids"]))]
    loader = torch.utils.data.DataLoader(rows, batch_size=2)
    for mode in ("exact", "sketch"):
        model = get_peft_model(tiny_llama(), GivaConfig(r=2, target_modules=["q_proj"]))
        torch.manual_seed(5)
        state = torch.get_rng_state()
        giva.initialize(model, loader, num_batches=2, progress=False, mode=mode)
        assert torch.equal(torch.get_rng_state(), state), mode


def test_initialize_refuses_a_model_with_merged_adapters_before_any_batch(batches):
    """Calibration disables the adapters, and a disabled GiVA layer unmerges itself: a merged adapter came back
    unmerged (on a bf16 or quantised base, W rounded). Refused before any batch runs; the merge stays."""
    model = get_peft_model(tiny_bert(), GivaConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"),
                           adapter_name="a")
    giva.initialize(model, batches, num_batches=2, progress=False)
    model.add_adapter("b", GivaConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    model.merge_adapter(adapter_names=["a"])  # (PEFT's add_adapter and set_adapter unmerge first)
    weights = {n: p.clone() for n, p in model.named_parameters() if "base_layer.weight" in n}
    with pytest.raises(ValueError, match=r"GiVA adapter\(s\) \['a'\] are merged into the base weights; .* call "
                                         r"model.unmerge_adapter\(\) first"):
        giva.initialize(model, _counting(batches, calls := []), num_batches=2, progress=False, adapter_name="b")
    assert not calls and all(layer.merged for layer in giva_layers(model).values())
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters() if n in weights)
    model.unmerge_adapter()
    giva.initialize(model, batches, num_batches=2, progress=False, adapter_name="b")


def _counting(batches, calls):
    for batch in batches:
        calls.append(1)
        yield batch


def test_a_layer_run_without_autograd_in_calibration_is_a_clear_error():
    """Checkpointing giva cannot switch (a model's own torch.utils.checkpoint(use_reentrant=True)) runs the
    first forward with autograd off: that forward is skipped (a no_grad forward contributes no gradient), so the
    layer receives none, and the error names the layer and the fix, not PyTorch's hook error."""
    model = get_peft_model(tiny_llama(), GivaConfig(r=4, target_modules=["q_proj"]))
    layer = model.base_model.model.model.layers[0]
    forward = layer.forward
    layer.forward = lambda *args, **kwargs: torch.utils.checkpoint.checkpoint(
        lambda *a: forward(*a, **kwargs), *args, use_reentrant=True)
    with pytest.raises(GradientInitError, match=r"layer\(s\) \['model.layers.0.self_attn.q_proj'\] received no gradient .* use_reentrant=False"):
        giva.initialize(model, text_batches(n=1, labels="lm"), num_batches=1, progress=False)
    assert not giva.bases_initialized(model)


class _ReentrantNet(nn.Module):
    """``a`` and ``b`` run inside the model's own torch.utils.checkpoint(use_reentrant=True), which giva cannot
    switch; ``pre`` (when ``pre``) feeds the checkpoint an input that requires grad."""

    def __init__(self, pre: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.pre, self.a, self.b, self.head = (nn.Linear(16, 16) if pre else nn.Identity()), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 2)

    def forward(self, x, labels=None):
        h = torch.utils.checkpoint.checkpoint(lambda t: torch.relu(self.b(torch.relu(self.a(t)))), self.pre(x),
                                              use_reentrant=True)
        return type("Out", (), {"loss": nn.functional.cross_entropy(self.head(h), labels)})()


@pytest.mark.parametrize("pre", [False, True], ids=["loss-without-grad", "torch-grad-error"])
def test_targets_inside_a_users_reentrant_checkpoint_are_a_clear_error(pre):
    """Every target inside a reentrant checkpoint: its first forward runs with autograd off, so either the loss
    needs no gradient at all (nothing before it requires grad) or torch refuses autograd.grad through it. Both are
    GiVA's error naming the skipped layers and use_reentrant=False, not "check target_modules and loss_fn" or
    torch's own RuntimeError."""
    targets = ["pre", "a", "b", "head"] if pre else ["a", "b"]
    model = get_peft_model(_ReentrantNet(pre), GivaConfig(r=2, target_modules=targets))
    generator = torch.Generator().manual_seed(0)
    batches = [{"x": torch.randn(4, 16, generator=generator), "labels": torch.randint(0, 2, (4,), generator=generator)}]
    match = r"reentrant activation checkpointing.*use_reentrant=False"
    if not pre:
        match = r"layer\(s\) \['a', 'b'\] ran only with autograd off.*" + match
    with pytest.raises(GradientInitError, match=match) as caught:
        giva.initialize(model, batches, num_batches=1, progress=False)
    if pre:
        assert isinstance(caught.value.__cause__, RuntimeError) and "use_reentrant=True" in str(caught.value.__cause__)
    assert not giva.bases_initialized(model)


def test_sketch_mode_is_deterministic_and_auto_picks_exact_for_small_models(batches, monkeypatch):
    def run(mode):
        model = get_peft_model(tiny_bert(), GivaConfig(r=4, target_modules=["query", "value"], variant="VrUr", seed=5))
        report = giva.initialize(model, batches, progress=False, mode=mode)
        return report, {n: (m.giva_A["default"].clone(), m.giva_B["default"].clone()) for n, m in giva_layers(model).items()}

    (report, first), (_, second) = run("sketch"), run("sketch")
    assert report.mode == "sketch" and report.passes == giva.init.DEFAULT_PASSES
    assert all(torch.equal(first[n][0], second[n][0]) and torch.equal(first[n][1], second[n][1]) for n in first)
    assert run("auto")[0].mode == "exact"
    monkeypatch.setattr(giva.init, "AUTO_EXACT_MAX_BYTES", 0)
    assert run("auto")[0].mode == "sketch"


def test_initialize_warns_when_the_vectors_it_prepares_for_training_are_half_precision():
    """With autocast_adapter_dtype=False a bf16 model's vectors are bf16, where lambda_s (init 1) cannot take AdamW
    steps below 0.004: at lr 1e-3 none of its entries moves in 8 steps on a tiny Llama. initialize says so."""
    import warnings

    def train(autocast: bool) -> tuple[list[str], int, int]:
        torch.manual_seed(0)
        config = GivaConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        model = get_peft_model(tiny_llama().to(torch.bfloat16), config, autocast_adapter_dtype=autocast)
        batches = text_batches(8, labels="lm")
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            giva.initialize(model, batches, num_batches=1, progress=False)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        for batch in batches:
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        lambda_s = torch.cat([p.detach().flatten() for n, p in model.named_parameters() if "lambda_s" in n])
        messages = [str(w.message) for w in seen if "keep trainable vectors" in str(w.message)]
        return messages, int((lambda_s != 1).sum()), lambda_s.numel()

    messages, moved, total = train(autocast=False)
    assert len(messages) == 1 and messages[0].startswith("GiVA adapter(s) ['default'] keep trainable vectors in bfloat16")
    assert (moved, total) == (0, 16)  # what the warning is about
    assert train(autocast=True) == ([], 16, 16)  # PEFT's default: fp32 vectors on the bf16 model, no warning


@pytest.mark.parametrize(("mode", "held"), [("exact", 1), ("sketch", 5)])
def test_the_sketch_keeps_the_loaders_batches_until_its_last_pass_and_exact_keeps_none(mode, held):
    """What the docs say about memory and k: the sketch's passes need the same batches, so it holds all k of them (as
    the loader gave them) until its last pass; the exact path's single pass holds only the batch it runs. Neither
    holds a batch once initialize returns."""
    import gc
    import weakref

    alive: list[weakref.ref] = []
    seen: list[int] = []

    def loader():
        for seed in range(5):  # made one at a time: nothing here holds the batches already given
            batch = text_batches(n=1, labels="lm", seed=seed)[0]
            alive.append(weakref.ref(batch["input_ids"]))
            yield batch

    def loss_fn(model, batch):
        gc.collect()
        seen.append(sum(ref() is not None for ref in alive))
        return model(**batch).loss

    model = get_peft_model(tiny_llama(), GivaConfig(r=2, target_modules=["q_proj"], variant="VrUr"))
    report = giva.initialize(model, loader(), num_batches=5, loss_fn=loss_fn, progress=False, mode=mode)
    assert report.passes == (1 if mode == "exact" else 3) and len(seen) == 5 * report.passes
    assert max(seen) == held
    gc.collect()
    assert all(ref() is None for ref in alive)


def _bases(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: layer.giva_A["default"].clone() for name, layer in giva_layers(model).items()}


@pytest.mark.parametrize("mode", ["exact", "sketch"])
def test_initialize_leaves_the_rest_of_a_generator_to_the_training_loop(mode):
    """`yield from` over the caller's generator closed it once the calibration batches were taken: the training
    loop after initialize got no batch, silently."""
    model = get_peft_model(tiny_bert(), GivaConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    stream = (batch for batch in text_batches(8))
    giva.initialize(model, stream, num_batches=2, progress=False, mode=mode)
    assert sum(1 for _ in stream) == 6


def test_every_sketch_pass_draws_what_the_first_drew_at_each_batch():
    """A loss that draws random numbers (a diffusion loss's noise, masking inside loss_fn) saw other draws in every
    sketch pass, whose power iteration needs one gradient. The caller's RNG is still left as it was."""
    model = get_peft_model(tiny_bert(), GivaConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    draws = []

    def noisy_loss(model, batch):
        noise = torch.rand(())
        draws.append(noise.item())
        return model(**batch).loss * (1 + noise)

    torch.manual_seed(0)
    before = torch.get_rng_state()
    giva.initialize(model, text_batches(2), num_batches=2, progress=False, mode="sketch", passes=3, loss_fn=noisy_loss)
    assert len(draws) == 6 and len(set(draws)) == 2
    assert draws == draws[:2] * 3
    assert torch.equal(torch.get_rng_state(), before)


def test_namedtuple_and_batch_encoding_batches_reach_the_loss_fn_as_they_were_given():
    """to_device rebuilt a namedtuple from a generator (TypeError naming a missing field) and a BatchEncoding as a
    plain dict (a loss_fn's batch.input_ids raised AttributeError)."""
    from collections import namedtuple

    from transformers import BatchEncoding

    Batch = namedtuple("Batch", "input_ids labels")
    batches = text_batches(2)
    reference = get_peft_model(tiny_bert(), GivaConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    giva.initialize(reference, batches, num_batches=2, progress=False, mode="exact")
    for wrap in (lambda b: Batch(b["input_ids"], b["labels"]), BatchEncoding):
        model = get_peft_model(tiny_bert(), GivaConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
        giva.initialize(model, [wrap(b) for b in batches], num_batches=2, progress=False, mode="exact",
                        loss_fn=lambda m, b: m(input_ids=b.input_ids, labels=b.labels).loss)
        for name, a in _bases(model).items():
            torch.testing.assert_close(a, _bases(reference)[name], rtol=0, atol=0)


def test_a_model_returning_tuples_is_told_so():
    model = get_peft_model(tiny_bert(), GivaConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    model.config.return_dict = False
    with pytest.raises(GradientInitError, match=r"the model returned a tuple, not an output with \.loss "
                                                r"\(return_dict=False in its config or the batch\)"):
        giva.initialize(model, text_batches(1), num_batches=1, progress=False)


def test_sketch_settings_that_auto_does_not_use_are_said():
    """mode='auto' choosing exact ignored passes= and oversampling= without a word (mode='exact' refuses them)."""
    model = get_peft_model(tiny_bert(), GivaConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    with pytest.warns(UserWarning, match=r"passes=5 and oversampling=None set the sketch, but mode='auto' chose 'exact' "
                                         r"\(the dense gradients fit in 256 MiB\): they are unused"):
        report = giva.initialize(model, text_batches(1), num_batches=1, progress=False, passes=5, oversampling=None)
    assert report.mode == "exact"
