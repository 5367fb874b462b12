"""PEFT's own API on GiVA models: wrapping, saving/loading, merging, adapters, mixed batches."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import giva
from giva import GivaConfig
from tiny_models import TRANSFORMERS_4, text_batches, tiny_bert, tiny_gpt2, tiny_llama, tiny_vit


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"]).logits


def _trained(model, batches, steps: int = 3, lr: float = 0.05):
    """A few optimizer steps so the vectors are non-trivial."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    for i in range(steps):
        model(**batches[i % len(batches)]).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def _giva_bert(batches, **kwargs):
    kwargs = {"r": 4, "target_modules": ["query", "value"], "task_type": "SEQ_CLS", **kwargs}
    model = get_peft_model(tiny_bert(), GivaConfig(**kwargs))
    giva.initialize(model, batches, progress=False)
    return model


@pytest.mark.parametrize(
    ("factory", "targets", "batch_kind"),
    [
        (tiny_bert, ["query", "value", "dense"], "cls"),
        (tiny_gpt2, ["c_attn", "c_proj", "c_fc"], "lm"),  # Conv1D, fused c_attn
        (tiny_llama, ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"], "lm"),
    ],
)
def test_wrapped_model_equals_base_at_init_and_trains(factory, targets, batch_kind):
    batches = text_batches(labels=batch_kind)
    base = factory()
    reference = _logits(base, batches[0])
    model = get_peft_model(base, GivaConfig(r=4, target_modules=targets))
    assert torch.equal(_logits(model, batches[0]), reference)
    giva.initialize(model, batches, progress=False)
    assert torch.equal(_logits(model, batches[0]), reference)  # still an identity: lambda_o = 0
    _trained(model, batches)
    assert not torch.allclose(_logits(model, batches[0]), reference)


def test_vit_image_classifier():
    targets = ["query", "value"] if TRANSFORMERS_4 else ["q_proj", "v_proj"]  # transformers 5 renamed ViT's layers
    model = get_peft_model(tiny_vit(), GivaConfig(r=4, target_modules=targets, modules_to_save=["classifier"]))
    pixels = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    batch = {"pixel_values": pixels, "labels": torch.tensor([0, 1, 2, 0])}
    giva.initialize(model, [batch], num_batches=1, progress=False)
    vit = model.base_model.model.vit
    layer = vit.encoder.layer[0].attention.attention.query if TRANSFORMERS_4 else vit.layers[0].attention.q_proj
    a = layer.giva_A["default"]
    assert torch.allclose(a @ a.mT, torch.eye(4), atol=1e-5)


def test_trainable_parameters_are_r_plus_out_per_layer():
    model = get_peft_model(tiny_bert(), GivaConfig(r=4, target_modules=["query", "value"]))
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == 4 * (4 + 32)  # 2 layers x (query, value), each r + out
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("giva_lambda_" in n for n in names)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "giva_lambda_" not in n)


def test_no_matching_target_modules_is_an_error():
    with pytest.raises(ValueError, match="nonexistent"):
        get_peft_model(tiny_bert(), GivaConfig(target_modules=["nonexistent"]))


def test_rank_above_layer_size_is_clipped_with_a_warning_naming_the_layer():
    with pytest.warns(UserWarning, match=r"r=64 exceeds .*bert.encoder.layer.0.attention.self.query.*clipped to 32"):
        model = get_peft_model(tiny_bert(), GivaConfig(r=64, target_modules=["query"]))
    assert model.base_model.model.bert.encoder.layer[0].attention.self.query.giva_A["default"].shape == (32, 32)


def test_layers_to_transform_and_modules_to_save():
    config = GivaConfig(r=4, target_modules=["query"], layers_to_transform=[1], modules_to_save=["classifier"])
    model = get_peft_model(tiny_bert(), config)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, giva.GivaLayer)]
    assert wrapped == ["base_model.model.bert.encoder.layer.1.attention.self.query"]
    assert any("classifier.modules_to_save" in n and p.requires_grad for n, p in model.named_parameters())


@pytest.mark.parametrize("bias", ["all", "giva_only"])
def test_bias_training(bias):
    model = get_peft_model(tiny_bert(), GivaConfig(r=4, target_modules=["query"], bias=bias))
    query_bias = model.base_model.model.bert.encoder.layer[0].attention.self.query.base_layer.bias
    key_bias = model.base_model.model.bert.encoder.layer[0].attention.self.key.bias
    assert query_bias.requires_grad
    assert key_bias.requires_grad == (bias == "all")


def test_save_load_reproduces_outputs_and_omits_seeded_b(tmp_path, batches):
    model = _trained(_giva_bert(batches, variant="Vr"), batches)
    expected = _logits(model, batches[0])
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert any(k.endswith("giva_A") for k in saved)
    assert not any(k.endswith("giva_B") for k in saved)  # seeded: regenerated bit-exactly on load
    config = GivaConfig.from_pretrained(tmp_path)
    assert config.bases_info["source"] == "gradient" and config.bases_info["num_batches"] == 4

    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path).eval()
    assert torch.equal(_logits(loaded, batches[0]), expected)
    for name, module in model.named_modules():
        if isinstance(module, giva.GivaLayer):
            twin = loaded.get_submodule(name)
            assert torch.equal(twin.giva_A["default"], module.giva_A["default"])
            assert torch.equal(twin.giva_B["default"], module.giva_B["default"])


@pytest.mark.parametrize("variant", ["VrUr", "VrU2r", "weight"])
def test_data_dependent_b_is_saved(tmp_path, batches, variant):
    model = _trained(_giva_bert(batches, variant=variant, r=2), batches)
    expected = _logits(model, batches[0])
    model.save_pretrained(tmp_path)
    assert any(k.endswith("giva_B") for k in load_file(tmp_path / "adapter_model.safetensors"))
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path).eval()
    assert torch.equal(_logits(loaded, batches[0]), expected)


def test_reload_in_a_fresh_process_with_auto_peft_model(tmp_path, batches):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_bert().save_pretrained(base_dir)
    model = _giva_bert(batches)
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    model = _trained(model, batches)
    model.save_pretrained(adapter_dir)
    torch.save({"ids": batches[0]["input_ids"], "logits": _logits(model, batches[0])}, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import torch, giva
        from peft import AutoPeftModelForSequenceClassification
        model = AutoPeftModelForSequenceClassification.from_pretrained({str(adapter_dir)!r}).eval()
        expected = torch.load({str(tmp_path / 'expected.pt')!r})
        with torch.no_grad():
            logits = model(input_ids=expected["ids"]).logits
        assert torch.equal(logits, expected["logits"]), (logits - expected["logits"]).abs().max()
        print("identical")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "identical" in result.stdout


def test_loading_into_a_base_model_of_other_shapes_names_layer_and_shapes(tmp_path, batches):
    _giva_bert(batches).save_pretrained(tmp_path)
    other = tiny_bert()
    other.bert.encoder.layer[0].attention.self.query = torch.nn.Linear(32, 48)
    with pytest.raises(ValueError, match=r"layer 'bert.encoder.layer.0.attention.self.query'.*\(48,\) here but \(32,\)"):
        PeftModel.from_pretrained(other, tmp_path)


@pytest.mark.parametrize("safe_merge", [False, True])
def test_merge_unmerge_and_merge_and_unload(batches, safe_merge):
    model = _trained(_giva_bert(batches), batches)
    expected = _logits(model, batches[0])
    with model.disable_adapter():
        base_out = _logits(model, batches[0])
    model.merge_adapter(safe_merge=safe_merge)
    assert torch.allclose(_logits(model, batches[0]), expected, atol=1e-5)
    model.unmerge_adapter()
    assert torch.allclose(_logits(model, batches[0]), expected, atol=1e-5)
    with model.disable_adapter():
        assert torch.allclose(_logits(model, batches[0]), base_out, atol=1e-5)
    merged = model.merge_and_unload(safe_merge=safe_merge)
    assert not any(isinstance(m, giva.GivaLayer) for m in merged.modules())
    assert torch.allclose(_logits(merged, batches[0]), expected, atol=1e-5)


def test_safe_merge_refuses_a_broken_adapter_and_keeps_the_weight(batches):
    model = _giva_bert(batches)
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    before = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.giva_lambda_o["default"][0] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected .*attention.self.query"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, before)


def test_safe_merge_refuses_a_delta_that_overflows_an_fp16_weight(batches):
    """The sum is formed in fp32 and cast back: the finite check must see the fp16 result, where the sum overflows."""
    model = _giva_bert(batches).half()
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    before = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.giva_lambda_o["default"].fill_(6e4)
        layer.giva_lambda_s["default"].fill_(100.0)
    assert torch.isfinite(layer.delta_weight("default")).all()  # finite in fp32, beyond fp16's 65504 once added
    with pytest.raises(ValueError, match="NaNs detected .*attention.self.query"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, before) and not layer.merged_adapters


def test_an_unmerge_that_fails_keeps_the_adapter_recorded_as_merged(batches, monkeypatch):
    """W still holds the delta when computing it fails: the layer must go on saying so (a later unmerge can
    still take it out), not forget the adapter while W keeps it."""
    model = _giva_bert(batches)
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    before = layer.base_layer.weight.detach().clone()
    layer.merge()
    merged = layer.base_layer.weight.detach().clone()
    real = type(layer).delta_weight
    monkeypatch.setattr(type(layer), "delta_weight", lambda self, name: (_ for _ in ()).throw(MemoryError("no room")))
    with pytest.raises(MemoryError):
        layer.unmerge()
    assert layer.merged_adapters == ["default"] and torch.equal(layer.base_layer.weight, merged)
    monkeypatch.setattr(type(layer), "delta_weight", real)
    layer.unmerge()
    assert not layer.merged and torch.allclose(layer.base_layer.weight, before, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_base_model_merges_on_cpu_and_keeps_fp32_bases(batches, dtype):
    base = tiny_bert().to(dtype)
    model = get_peft_model(base, GivaConfig(r=4, target_modules=["query", "value"], init_weights=False))
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    assert layer.giva_A["default"].dtype == torch.float32
    a = layer.giva_A["default"]
    assert torch.allclose(a @ a.mT, torch.eye(4), atol=1e-6)
    expected = layer.base_layer.weight.float() + layer.delta_weight("default")
    merged = model.merge_and_unload()
    new_weight = merged.bert.encoder.layer[0].attention.self.query.weight
    assert new_weight.dtype == dtype
    assert torch.equal(new_weight, expected.to(dtype))


def test_conv1d_fused_blocks_get_their_own_bases_and_merge():
    batches = text_batches(labels="lm")
    model = get_peft_model(tiny_gpt2(), GivaConfig(r=4, target_modules=["c_attn"], adapt_blocks={"c_attn": [0, 2]}))
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert [(b.index, b.out_start, b.out_size) for b in layer.blocks["default"]] == [(0, 0, 32), (2, 64, 32)]
    assert model.get_nb_trainable_parameters()[0] == 2 * (2 * 4 + 2 * 32)
    giva.initialize(model, batches, progress=False)
    a = layer.giva_A["default"]
    # One orthonormal basis per block (rows of different blocks need not be orthogonal).
    assert torch.allclose(a[:4] @ a[:4].mT, torch.eye(4), atol=1e-5)
    assert torch.allclose(a[4:] @ a[4:].mT, torch.eye(4), atol=1e-5)
    _trained(model, batches)
    delta = layer.delta_weight("default")  # (in, out) Conv1D layout
    assert delta.shape == (32, 96)
    assert torch.count_nonzero(delta[:, 32:64]) == 0  # K untouched
    expected = _logits(model, batches[0])
    merged = model.merge_and_unload()
    assert torch.allclose(_logits(merged, batches[0]), expected, atol=1e-5)


def test_fused_linear_qkv_uses_model_config_block_sizes():
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    config = Phi3Config(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
    )
    model = get_peft_model(Phi3ForCausalLM(config).eval(), GivaConfig(r=2, target_modules=["qkv_proj", "gate_up_proj"]))
    attn = model.base_model.model.model.layers[0].self_attn.qkv_proj
    mlp = model.base_model.model.model.layers[0].mlp.gate_up_proj
    assert [b.out_size for b in attn.blocks["default"]] == [32, 16, 16]  # GQA: q 4 heads, k/v 2 heads
    assert [b.out_size for b in mlp.blocks["default"]] == [64, 64]
    giva.initialize(model, text_batches(labels="lm"), progress=False)
    assert all(m.bases_initialized("default") for m in (attn, mlp))


def test_several_adapters_each_with_their_own_bases(batches):
    model = _giva_bert(batches)
    model.add_adapter("other", GivaConfig(r=2, target_modules=["query", "value"], variant="VrUr", task_type="SEQ_CLS"))
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    assert isinstance(layer.base_layer, torch.nn.Linear)  # not nested
    assert not layer.bases_initialized("other")
    giva.initialize(model, batches, adapter_name="other", progress=False)
    assert layer.giva_A["other"].shape == (2, 32) and layer.bases_initialized("other")
    model.set_adapter("other")
    assert {n.split(".")[-1] for n, p in model.named_parameters() if p.requires_grad and "giva" in n} == {"other"}
    model.delete_adapter("other")
    assert "other" not in layer.giva_A and "other" not in layer.giva_lambda_o


def test_mixed_adapter_batches_match_single_adapter_outputs(batches):
    model = _trained(_giva_bert(batches), batches)
    model.add_adapter("other", GivaConfig(r=4, target_modules=["query", "value"], init_weights=False, task_type="SEQ_CLS"))
    model.eval()
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        model.set_adapter("default")
        out_default = model(input_ids=ids).logits
        model.set_adapter("other")
        out_other = model(input_ids=ids).logits
        with model.disable_adapter():
            out_base = model(input_ids=ids).logits
        mixed = model(input_ids=ids, adapter_names=["default", "other", "__base__", "default"]).logits
    assert torch.allclose(mixed[0], out_default[0], atol=1e-6)
    assert torch.allclose(mixed[1], out_other[1], atol=1e-6)
    assert torch.allclose(mixed[2], out_base[2], atol=1e-6)
    assert torch.allclose(mixed[3], out_default[3], atol=1e-6)
    with pytest.raises(ValueError, match="do not exist: nope"):
        model(input_ids=ids, adapter_names=["nope"] * 4)


def test_init_weights_false_makes_a_non_identity_adapter(batches):
    base = tiny_bert()
    reference = _logits(base, batches[0])
    model = get_peft_model(base, GivaConfig(r=4, target_modules=["query"], init_weights=False))
    assert not torch.allclose(_logits(model, batches[0]), reference)


def test_load_adapter_under_another_name_and_with_low_cpu_mem_usage(tmp_path, batches):
    model = _trained(_giva_bert(batches), batches)
    expected = _logits(model, batches[0])
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path, low_cpu_mem_usage=True).eval()
    assert torch.equal(_logits(loaded, batches[0]), expected)
    # Seeded B depends on (seed, layer name), not on the adapter name, so it regenerates under any name.
    loaded.load_adapter(tmp_path, adapter_name="renamed")
    loaded.set_adapter("renamed")
    assert torch.equal(_logits(loaded, batches[0]), expected)


@pytest.mark.parametrize(
    ("factory", "task_type", "head"),
    [(tiny_bert, "SEQ_CLS", "classifier"), (tiny_llama, "CAUSAL_LM", "lm_head"), (tiny_gpt2, "CAUSAL_LM", "lm_head")],
)
def test_default_targets_are_every_linear_layer_but_the_head(factory, task_type, head):
    from transformers.pytorch_utils import Conv1D

    base = factory()
    linear = {n for n, m in base.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D)) and not n.startswith(head)}
    model = get_peft_model(base, GivaConfig(r=2, task_type=task_type))
    adapted = {n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, giva.GivaLayer)}
    assert adapted == linear and len(adapted) >= 8
    assert model.peft_config["default"].target_modules is not None  # resolved, and saved as resolved


# ------------------------------------------------- an add_adapter refused part-way leaves nothing behind (F3)


class _ThreeLayers(torch.nn.Module):
    """``first`` and ``big`` can take any variant at r=2; ``tiny`` (one output) cannot take VrU2r."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first, self.big, self.tiny = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 1)

    def forward(self, x):
        return torch.cat([self.first(x), self.big(x), self.tiny(x)], -1)


def _refuse(model, case: str) -> None:
    if case == "rank":
        config = GivaConfig(r=2, target_modules=["first", "big", "tiny"], variant="VrU2r", init_weights=False)
        match = r"layer 'tiny' block 0 \(1 x 8\) is too small for variant 'VrU2r' at any rank: it needs min\(out, in\) >= 2 r"
    else:  # `weight` takes W's SVD: refused on big, whose W holds the merged "default" (after first was wrapped)
        config = GivaConfig(r=2, target_modules=["first", "big"], variant="weight", init_weights=False)
        match = r"layer 'big' has adapters \['default'\] merged into W"
    with pytest.raises((ValueError, RuntimeError), match=match):
        model.add_adapter("bad", config)


@pytest.mark.parametrize("case", ["rank", "merged"])
def test_an_add_adapter_refused_part_way_leaves_no_trace(tmp_path, case):
    """Layers already built for the refused adapter lose it again (a newly wrapped one is the original module
    again), so the model, its state dict and the next save are as before the call."""
    config = GivaConfig(r=2, target_modules=["big"], variant="random", init_weights=False)
    model = get_peft_model(_ThreeLayers().eval(), config).eval()
    if case == "merged":
        model.base_model.merge_adapter()
    first, tiny = model.base_model.model.first, model.base_model.model.tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = model(x)
    _refuse(model, case)
    assert list(model.peft_config) == ["default"]
    assert not [k for k in model.state_dict() if ".bad" in k]
    assert model.base_model.model.first is first and type(first) is torch.nn.Linear  # unwrapped: the original module
    assert model.base_model.model.tiny is tiny
    big = model.base_model.model.big
    assert set(big.giva_lambda_o) == set(big.giva_A) == set(big.giva_B) == set(big.giva_dropout) == set(big.r) == {"default"}
    assert big.active_adapters == ["default"] and big.merged == (case == "merged")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    state = model.state_dict()
    assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    if case == "merged":
        model.base_model.unmerge_adapter()
    model.save_pretrained(str(tmp_path / "adapter"))
    assert not [k for k in load_file(tmp_path / "adapter" / "adapter_model.safetensors") if "bad" in k]
    loaded = PeftModel.from_pretrained(_ThreeLayers().eval(), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        if case == "rank":
            assert torch.equal(loaded(x), expected)
        else:  # merge + unmerge rounded W through fp32
            torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=1e-6)
    model.add_adapter("bad", GivaConfig(r=2, target_modules=["first", "big", "tiny"], variant="random"))  # name free


@pytest.mark.parametrize("default_saves_head", [False, True])
def test_an_add_adapter_refused_after_peft_wrapped_modules_to_save_leaves_no_trace(tmp_path, default_saves_head):
    """PEFT wraps ``modules_to_save`` before ``trainable_token_indices`` and refuses a missing token target only then:
    the wrapper built for the refused adapter goes (the head is the original module again, or the wrapper
    "default" already had, without the refused adapter), and ``targeted_module_names`` is as before."""
    from peft.utils.other import ModulesToSaveWrapper

    extra = {"modules_to_save": ["lm_head"]} if default_saves_head else {}
    model = get_peft_model(tiny_llama(), GivaConfig(r=2, target_modules=["q_proj"], variant="random",
                                                    init_weights=False, **extra)).eval()
    head = model.base_model.model.lm_head
    assert isinstance(head, ModulesToSaveWrapper) == default_saves_head
    targeted = list(model.base_model.targeted_module_names)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    expected = _logits(model, {"input_ids": ids})
    with pytest.raises(ValueError, match="nonexistent_embed"):
        model.add_adapter("bad", GivaConfig(r=2, target_modules=["q_proj", "k_proj"], variant="random",
                                            modules_to_save=["lm_head"], trainable_token_indices={"nonexistent_embed": [1, 2]}))
    assert list(model.peft_config) == ["default"]
    assert model.base_model.model.lm_head is head
    if default_saves_head:
        assert set(head.modules_to_save) == {"default"} and head.active_adapters == ["default"]
    assert not [k for k in model.state_dict() if "bad" in k]
    assert model.base_model.targeted_module_names == targeted
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    state = model.state_dict()
    assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in before)
    assert torch.equal(_logits(model, {"input_ids": ids}), expected)
    model.save_pretrained(str(tmp_path / "adapter"))
    assert not [k for k in load_file(tmp_path / "adapter" / "adapter_model.safetensors") if "bad" in k]
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter")).eval()
    assert torch.equal(_logits(loaded, {"input_ids": ids}), expected)


def test_a_get_peft_model_refused_part_way_gives_the_base_modules_back():
    base = _ThreeLayers().eval()
    modules = dict(base.named_children())
    with pytest.raises(ValueError, match="too small for variant 'VrU2r'"):
        get_peft_model(base, GivaConfig(r=2, target_modules=["first", "big", "tiny"], variant="VrU2r"))
    assert dict(base.named_children()) == modules
    assert not [k for k in base.state_dict() if "giva" in k]
