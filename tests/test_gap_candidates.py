"""The opt-in configurations of issue 25's gap study: the r x r core, the flipped vector initialisation,
per-parameter LR scales. Each keeps GiVA's properties: an identity at init, merge == forward, exact reload."""

from __future__ import annotations

from tempfile import TemporaryDirectory

import pytest
import torch
from peft import PeftModel, get_peft_model

import giva
from giva import GivaConfig, GivaLayer
from giva.finetune import TrainConfig, parameter_groups
from tiny_models import VOCAB, tiny_gpt2, tiny_llama

TARGETS = {tiny_llama: ["q_proj", "v_proj", "gate_proj"], tiny_gpt2: ["c_attn", "c_fc"]}


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(seed))


def _perturbed_core_model(make) -> torch.nn.Module:
    model = get_peft_model(make(), GivaConfig(r=4, core=True, init_weights=False, target_modules=TARGETS[make]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "giva_core" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["linear", "conv1d-fused"])
def test_core_forward_equals_merged_delta_and_reloads_exactly(make) -> None:
    torch.manual_seed(0)
    model = _perturbed_core_model(make)
    ids = _ids()
    with torch.no_grad():
        out = model(input_ids=ids).logits
        model.merge_adapter()
        merged = model(input_ids=ids).logits
        model.unmerge_adapter()
    assert torch.allclose(out, merged, atol=1e-5)
    layers = [m for m in model.modules() if isinstance(m, GivaLayer)]
    assert layers and all(tuple(m.giva_core["default"].shape) == (m.r["default"],) * 2 for m in layers)
    with TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        reloaded = PeftModel.from_pretrained(make(), folder)
        with torch.no_grad():
            assert torch.equal(reloaded(input_ids=ids).logits, out)


def test_core_delta_is_diag_lo_b_core_diag_ls_a() -> None:
    torch.manual_seed(0)
    model = _perturbed_core_model(tiny_llama)
    layer = next(m for m in model.modules() if isinstance(m, GivaLayer))
    a, b = layer.giva_A["default"], layer.giva_B["default"]
    ls, lo, core = (p["default"].detach() for p in (layer.giva_lambda_s, layer.giva_lambda_o, layer.giva_core))
    expected = torch.diag(lo) @ b @ core @ torch.diag(ls) @ a
    assert torch.allclose(layer.delta_weight("default"), expected, atol=1e-6)
    assert not torch.allclose(core, torch.eye(core.shape[0]))  # the core is really used


def test_core_adds_r_squared_trainable_parameters_and_starts_as_identity(batches) -> None:
    from tiny_models import tiny_bert

    plain = get_peft_model(tiny_bert(), GivaConfig(r=4, target_modules=["query", "value"]))
    cored = get_peft_model(tiny_bert(), GivaConfig(r=4, core=True, target_modules=["query", "value"]))
    count = lambda m: sum(p.numel() for n, p in m.named_parameters() if p.requires_grad and "giva_" in n)  # noqa: E731
    layers = sum(isinstance(m, GivaLayer) for m in cored.modules())
    assert count(cored) - count(plain) == layers * 4 * 4
    giva.initialize(cored, batches, num_batches=2)
    batch = {k: v for k, v in batches[0].items() if k != "labels"}
    with torch.no_grad(), cored.disable_adapter():
        base = cored(**batch).logits
    with torch.no_grad():
        assert torch.equal(cored(**batch).logits, base)


def test_flipped_vectors_are_an_identity_at_init_and_train_lambda_s_first(batches) -> None:
    from tiny_models import tiny_bert

    model = get_peft_model(
        tiny_bert(), GivaConfig(r=4, lambda_s_init=0.0, lambda_o_init=1.0, target_modules=["query", "value"])
    )
    giva.initialize(model, batches, num_batches=2)
    batch = {k: v for k, v in batches[0].items() if k != "labels"}
    with torch.no_grad(), model.disable_adapter():
        base = model(**batch).logits
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, base)
    model(**batches[0]).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "giva_lambda" in n}
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "lambda_s" in n)
    assert all(g.abs().sum() == 0 for n, g in grads.items() if "lambda_o" in n)  # lambda_s = 0 blocks it at step 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lambda_o_init": 1.0}, "GivaConfig.lambda_o_init=1.0 needs lambda_s_init=0"),
        ({"lambda_o_init": float("nan"), "lambda_s_init": 0.0}, "GivaConfig.lambda_o_init must be a finite number"),
        ({"core": "yes"}, "GivaConfig.core must be True or False"),
        ({"lambda_s_init": 0.0}, "GivaConfig.lambda_s_init and lambda_o_init are both 0"),
        ({"lambda_s_init": 0.0, "core": True}, "GivaConfig.lambda_s_init and lambda_o_init are both 0"),
        ({"core": True, "lambda_s_init": 0.0, "lambda_o_init": 1.0}, "GivaConfig.core=True needs lambda_o_init=0"),
    ],
)
def test_bad_gap_options_name_the_field(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        GivaConfig(**kwargs)


def test_lr_scales_give_lambda_s_its_own_learning_rate() -> None:
    model = get_peft_model(tiny_llama(), GivaConfig(r=4, target_modules=["q_proj"]))
    groups = parameter_groups(model, 0.01, None, 0.0, {"giva_lambda_s": 10.0})
    by_lr = {g["lr"]: g["params"] for g in groups}
    names = {id(p): n for n, p in model.named_parameters()}
    assert set(by_lr) == {0.01, 0.1}
    assert all("giva_lambda_s" in names[id(p)] for p in by_lr[0.1])
    assert all("giva_lambda_o" in names[id(p)] for p in by_lr[0.01])
    with pytest.raises(ValueError, match="TrainConfig.lr_scales must map"):
        TrainConfig(lr_scales={"giva_lambda_s": -1.0})


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["linear", "conv1d-fused"])
def test_core_adapter_exports_to_an_exact_lora(make, tmp_path) -> None:
    from giva.export import export_lora

    torch.manual_seed(0)
    model = _perturbed_core_model(make)
    ids = _ids()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    export_lora(model, tmp_path / "lora")
    lora = PeftModel.from_pretrained(make(), tmp_path / "lora")
    with torch.no_grad():
        assert torch.allclose(lora(input_ids=ids).logits, expected, atol=1e-5)


def test_core_adapters_in_a_mixed_batch_match_each_row_run_alone() -> None:
    torch.manual_seed(0)
    model = _perturbed_core_model(tiny_llama)
    model.add_adapter("plain", GivaConfig(r=2, init_weights=False, target_modules=TARGETS[tiny_llama]))
    model.add_adapter("cored", GivaConfig(r=4, core=True, init_weights=False, target_modules=TARGETS[tiny_llama]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "giva_core.cored" in name:
                param.add_(0.1 * torch.randn_like(param))
    ids = torch.randint(0, VOCAB, (4, 7), generator=torch.Generator().manual_seed(1))
    names = ["default", "plain", "cored", "__base__"]
    model.eval()
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        for row, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    alone = model(input_ids=ids[row : row + 1]).logits
            else:
                model.set_adapter(name)
                alone = model(input_ids=ids[row : row + 1]).logits
            assert torch.allclose(mixed[row : row + 1], alone, atol=1e-5), name


def test_a_federated_round_sends_the_core_with_the_vectors() -> None:
    from giva.federated.task import load_trainable_state, trainable_state

    torch.manual_seed(0)
    model = _perturbed_core_model(tiny_llama)
    state = trainable_state(model)
    cores = [name for name in state if "giva_core" in name]
    assert cores and all(state[name].shape == (4, 4) for name in cores)
    assert all("giva_lambda" in name or "giva_core" in name for name in state)  # nothing but vectors and cores
    other = _perturbed_core_model(tiny_llama)
    load_trainable_state(other, state)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(other(input_ids=ids).logits, model(input_ids=ids).logits)


# --- candidate (e): the task head warmed up before the gradient (LP-FT's first stage) ---------------------------


def _bert_with_giva(seed: int = 0) -> torch.nn.Module:
    from tiny_models import tiny_bert

    return get_peft_model(tiny_bert(seed), GivaConfig(r=2, task_type="SEQ_CLS", seed=seed))


def test_head_warmup_trains_the_head_alone_and_the_gradient_then_sees_the_warmed_head(batches) -> None:
    from giva.bench.methods import strip_peft_prefix, warm_up_head
    from giva.finetune import is_head_parameter

    model = _bert_with_giva()
    model.eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    seconds = warm_up_head(model, batches, epochs=2, lr=5e-2)
    assert seconds > 0 and not model.training  # the mode is restored
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(is_head_parameter(strip_peft_prefix(n)) for n in moved), moved  # the head, nothing else
    assert all(not layer.disable_adapters for layer in model.modules() if isinstance(layer, GivaLayer))
    assert not giva.bases_initialized(model)

    giva.initialize(model, batches, num_batches=2, progress=False)
    cold = _bert_with_giva()
    giva.initialize(cold, batches, num_batches=2, progress=False)
    a = {n: b for n, b in model.named_buffers() if "giva_A" in n}
    a_cold = dict((n, b) for n, b in cold.named_buffers() if "giva_A" in n)
    assert a.keys() == a_cold.keys() and any(not torch.allclose(a[n], a_cold[n]) for n in a)  # another gradient


def test_head_warmup_refuses_a_model_without_head_or_lr(batches) -> None:
    from giva.bench.methods import warm_up_head

    with pytest.raises(ValueError, match="needs the task head's LR"):
        warm_up_head(_bert_with_giva(), batches, epochs=1, lr=None)
    llama = get_peft_model(tiny_llama(), GivaConfig(r=2, task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match="no trainable task head"):
        warm_up_head(llama, batches, epochs=1, lr=1e-2)


@pytest.mark.parametrize(
    ("init", "message"),
    [
        ({"head_warmup_epochs": 0}, "init.head_warmup_epochs must be a positive integer, got 0"),
        ({"head_warmup_epochs": True}, "init.head_warmup_epochs must be a positive integer, got True"),
        ({"bases_before_warmup": True}, "init.bases_before_warmup must be true or false, and needs init.head_warmup_epochs"),
        ({"head_warmup_epochs": 1, "bases_before_warmup": "yes"}, "init.bases_before_warmup must be true or false"),
    ],
)
def test_bad_head_warmup_settings_name_the_field(init, message) -> None:
    from giva.bench.spec import MethodSpec

    with pytest.raises(ValueError, match=message):
        MethodSpec("m", 1, "giva", "peft", 0.01, [0.01], "GIVA", {"r": 8}, init)


# --- candidate (h): rows of A held back, then grown from the gradient of the adapted model ---------------------


def _bert_grow(batches, rows: int = 2, r: int = 4) -> torch.nn.Module:
    from giva.bench.grow import hold_back_rows
    from tiny_models import tiny_bert

    model = get_peft_model(tiny_bert(0), GivaConfig(r=r, task_type="SEQ_CLS", seed=0))
    giva.initialize(model, batches, num_batches=2, progress=False)
    hold_back_rows(model, rows)
    return model


def test_held_back_rows_are_inert_until_grown(batches) -> None:
    model = _bert_grow(batches)
    layers = [m for m in model.modules() if isinstance(m, GivaLayer)]
    assert layers and all(not m.giva_A["default"][2:].any() and m.giva_A["default"][:2].any() for m in layers)
    with torch.no_grad():
        for layer in layers:  # lambda_o as after some training (at init its 0 gives lambda_s no gradient at all)
            layer.giva_lambda_o["default"].normal_(0.0, 0.1)
    model.train()
    model(**batches[0]).loss.backward()
    for layer in layers:
        grad = layer.giva_lambda_s["default"].grad
        assert torch.equal(grad[2:], torch.zeros(2)) and grad[:2].abs().sum() > 0
        assert torch.equal(layer.giva_lambda_s["default"].detach()[2:], torch.zeros(2))


def test_grown_rows_are_the_top_singular_vectors_of_the_deflated_gradient_and_change_nothing_else(batches) -> None:
    from giva.bench.grow import grow_bases

    model = _bert_grow(batches)
    with torch.no_grad():  # an adapted model: trained-looking vectors and head
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
        for layer in model.modules():
            if isinstance(layer, GivaLayer):
                layer.giva_lambda_s["default"][2:] = 0.0
    model.train()
    layers = [m for m in model.modules() if isinstance(m, GivaLayer)]
    weights = [m.get_base_layer().weight for m in layers]
    # the reference: dense dL/dW summed over the batches, dropout off, adapters on
    model.eval()
    for w in weights:
        w.requires_grad_(True)
    sums = [torch.zeros_like(w) for w in weights]
    for batch in batches:
        for total, grad in zip(sums, torch.autograd.grad(model(**batch).loss, weights)):
            total += grad
    for w in weights:
        w.requires_grad_(False)
    model.train()
    with torch.no_grad():
        before = model.eval()(**batches[0]).logits
    model.train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    seconds = grow_bases(model, batches, rows=2)
    assert seconds > 0 and model.training and torch.equal(torch.get_rng_state(), rng)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    for layer, gradient in zip(layers, sums):
        a = layer.giva_A["default"]
        assert torch.allclose(a @ a.T, torch.eye(4), atol=1e-5)  # the grown rows orthonormal, and to the used ones
        used = a[:2]
        rest = gradient - (gradient @ used.T) @ used
        expected = torch.linalg.svd(rest, full_matrices=False).Vh[:2]
        assert torch.allclose((a[2:] @ expected.T).abs(), torch.eye(2), atol=1e-4)  # the same vectors up to sign
    with torch.no_grad():
        assert torch.equal(model.eval()(**batches[0]).logits, before)  # lambda_s of the new rows is 0: same function
    model.train()
    model(**batches[0]).loss.backward()
    assert all(layer.giva_lambda_s["default"].grad[2:].abs().sum() > 0 for layer in layers)  # and they now train


def test_train_grows_once_at_the_set_step_and_the_runner_builds_the_hook(batches) -> None:
    from giva.bench.runner import grow_hook
    from giva.bench.spec import MethodSpec
    from giva.finetune import train

    model = _bert_grow(batches)
    method = MethodSpec("m", 1, "giva", "peft", 0.01, [0.01], "GIVA", {"r": 4}, {"grow_rows": 2, "grow_at": 0.5})
    config = TrainConfig(lr=1e-2, epochs=2.0)
    hook = grow_hook(method, model, config, len(batches), lambda: batches)
    assert hook is not None and hook.step == len(batches)  # half of 2 epochs
    calls = []
    real = hook.__call__

    def spy(step: int) -> None:
        calls.append(step)
        real(step)

    stats = train(model, batches, config, progress=False, on_step_end=spy)
    assert calls == list(range(1, len(stats.losses) + 1)) and hook.seconds is not None
    assert all(m.giva_A["default"][2:].any() for m in model.modules() if isinstance(m, GivaLayer))
    plain = MethodSpec("p", 1, "giva", "peft", 0.01, [0.01], "GIVA", {"r": 4})
    assert grow_hook(plain, model, config, len(batches), lambda: batches) is None


@pytest.mark.parametrize(
    ("peft", "init", "message"),
    [
        ({"r": 8}, {"grow_rows": 8, "grow_at": 0.5}, r"init.grow_rows must be an integer in \[1, r - 1\] = \[1, 7\], got 8"),
        ({"r": 8}, {"grow_rows": 4}, r"init.grow_at must be a fraction of the training steps in \(0, 1\), got None"),
        ({"r": 8}, {"grow_rows": 4, "grow_at": 1.0}, r"init.grow_at must be a fraction .* got 1.0"),
        ({"r": 8, "variant": "VrUr"}, {"grow_rows": 4, "grow_at": 0.5}, r"init.grow_rows needs a GiVA method with a variant in \('Vr', 'VrUrand'\)"),
    ],
)
def test_bad_grow_settings_name_the_field(peft, init, message) -> None:
    from giva.bench.spec import MethodSpec

    with pytest.raises(ValueError, match=message):
        MethodSpec("m", 1, "giva", "peft", 0.01, [0.01], "GIVA", peft, init)
