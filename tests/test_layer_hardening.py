"""Issue 7 hardening of the layer, the tuner and the config: each test failed before its fix."""

from __future__ import annotations

import math

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

import giva
import giva.layer
from giva import BasesNotInitializedError, GivaConfig
from giva.bases import layer_generator, seeded_output_basis
from tiny_models import VOCAB, text_batches, tiny_bert, tiny_gpt2


def _bert(layers: int = 2, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64,
    )
    return BertForSequenceClassification(config).eval()


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"]).logits


def _layers(model) -> dict[str, giva.GivaLayer]:
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, giva.GivaLayer)}


def _config(**kwargs) -> GivaConfig:
    return GivaConfig(**{"r": 4, "target_modules": ["query", "value"], "task_type": "SEQ_CLS", **kwargs})


# ---------------------------------------------------------------------------------------------------------------------
# 1. Casting the wrapped model keeps the bases in float32


@pytest.mark.parametrize("cast", ["bfloat16", "half"])
def test_casting_the_wrapped_model_keeps_fp32_orthonormal_bases(batches, cast):
    model = get_peft_model(_bert(), _config())
    seeded_b = {name: layer.giva_B["default"].clone() for name, layer in _layers(model).items()}
    model = model.to(torch.bfloat16) if cast == "bfloat16" else model.half()
    dtype = torch.bfloat16 if cast == "bfloat16" else torch.float16
    layer = _layers(model)["bert.encoder.layer.0.attention.self.query"]
    assert layer.base_layer.weight.dtype == dtype and layer.giva_lambda_o["default"].dtype == dtype
    giva.initialize(model, batches, num_batches=1, progress=False)
    for name, layer in _layers(model).items():
        a, b = layer.giva_A["default"], layer.giva_B["default"]
        assert a.dtype == b.dtype == torch.float32
        assert torch.allclose(a @ a.mT, torch.eye(4), atol=1e-6), name
        assert torch.equal(b, seeded_b[name])  # the seeded B was not rounded through the cast
    assert model.peft_config["default"].bases_info["dtype"] == str(a.dtype).removeprefix("torch.")
    assert _logits(model, batches[0]).dtype == dtype  # bases cast at use


def test_a_widening_cast_keeps_the_bases_at_bases_dtype_and_the_save_reloads(tmp_path):
    """``model.to(torch.float64)`` leaves the bases at the config's ``bases_dtype``, which the checkpoint records: when
    the cast reached them (tried for PEFT 0.22's generic dtype test), the save stored float64 bases under a config
    saying float32, and the load refused it as hand-edited."""
    model = get_peft_model(_bert(), _config(variant="random", init_weights=False)).eval()
    model.to(torch.float64)
    assert all(layer.giva_A["default"].dtype == torch.float32 for layer in _layers(model).values())
    assert all(layer.giva_lambda_o["default"].dtype == torch.float64 for layer in _layers(model).values())
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(_bert(), str(tmp_path)).eval()
    batch = text_batches(n=1)[0]
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"]).logits
        torch.testing.assert_close(reloaded(input_ids=batch["input_ids"]).logits, expected.float(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# 3. Loading: missing basis tensors, other depths


def test_bases_initialized_checks_b_too():
    model = get_peft_model(_bert(), _config(variant="VrUr"))
    layer = _layers(model)["bert.encoder.layer.0.attention.self.query"]
    with torch.no_grad():
        layer.giva_A["default"].copy_(torch.eye(4, 32))  # A filled, B (U_r) still zero
    assert not layer.bases_initialized("default")


@pytest.mark.parametrize(("variant", "dropped"), [("VrUr", "giva_B"), ("VrU2r", "giva_B"), ("Vr", "giva_A"), ("weight", "giva_A")])
def test_checkpoint_missing_a_basis_tensor_raises_naming_it(batches, variant, dropped):
    model = get_peft_model(_bert(), _config(variant=variant, r=2))
    if variant != "weight":
        giva.initialize(model, batches, num_batches=1, progress=False)
    state = get_peft_model_state_dict(model)
    key = "base_model.model.bert.encoder.layer.1.attention.self.value." + dropped
    assert key in state
    del state[key]
    fresh = get_peft_model(_bert(), _config(variant=variant, r=2))
    with pytest.raises(ValueError, match=rf"lacks tensors .*bert\.encoder\.layer\.1\.attention\.self\.value \({dropped}\)"):
        set_peft_model_state_dict(fresh, state)


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_loading_into_a_base_model_of_another_depth_names_the_layers(tmp_path, batches, low_cpu_mem_usage):
    model = get_peft_model(_bert(layers=2), _config())
    giva.initialize(model, batches, num_batches=1, progress=False)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"layer\(s\) this model does not have: bert\.encoder\.layer\.1\.attention"):
        PeftModel.from_pretrained(_bert(layers=1), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
    with pytest.raises(ValueError, match=r"bert\.encoder\.layer\.2\.attention\.self\.query"):
        PeftModel.from_pretrained(_bert(layers=3), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
    loaded = PeftModel.from_pretrained(_bert(layers=2), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
    assert torch.equal(_logits(loaded, batches[0]), _logits(model, batches[0]))


# ---------------------------------------------------------------------------------------------------------------------
# 6. Seeded bases are bit-identical on any thread count, and checked at load


@pytest.mark.parametrize("variant", ["Vr", "VrUrand"])
def test_seeded_b_is_bit_identical_on_any_thread_count(variant):
    threads = torch.get_num_threads()
    drawn = {}
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            drawn[count] = seeded_output_basis(variant, 768, 64, layer_generator(0, "h.0.attn.c_attn", 1))
            assert torch.get_num_threads() == count  # restored after the single-threaded generation
    finally:
        torch.set_num_threads(threads)
    assert drawn[1].dtype == torch.float32 and drawn[1].shape == (768, 64)
    assert torch.equal(drawn[1], drawn[2])
    if variant == "Vr":
        b = drawn[1].double()
        assert torch.allclose(b.mT @ b, torch.eye(64, dtype=torch.float64), atol=1e-6)


def test_a_seeded_basis_that_regenerates_differently_is_caught_at_load(tmp_path, batches, monkeypatch):
    model = get_peft_model(_bert(), _config(variant="Vr"))
    giva.initialize(model, batches, num_batches=1, progress=False)
    model.save_pretrained(tmp_path)
    assert torch.equal(_logits(PeftModel.from_pretrained(_bert(), tmp_path), batches[0]), _logits(model, batches[0]))

    def other_draw(variant, out_features, r, generator):
        return -seeded_output_basis(variant, out_features, r, generator)

    monkeypatch.setattr(giva.layer, "seeded_output_basis", other_draw)
    with pytest.raises(ValueError, match=r"layer\(s\) bert\.encoder\.layer\.0\.attention\.self\.query.* regenerate differently"):
        PeftModel.from_pretrained(_bert(), tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# 8. Fused layers: blocks from the module's role, or an error asking for block_sizes


def test_gpt2_cross_attention_c_attn_is_split_into_k_and_v():
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, add_cross_attention=True))
    model = get_peft_model(base, GivaConfig(r=2, target_modules=["c_attn"], init_weights=False))
    layers = _layers(model)
    assert [b.out_size for b in layers["transformer.h.0.attn.c_attn"].blocks["default"]] == [32, 32, 32]
    assert [b.out_size for b in layers["transformer.h.0.crossattention.c_attn"].blocks["default"]] == [32, 32]


def _phi3(kv_heads: int):
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    config = Phi3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=64, pad_token_id=0,
    )
    return Phi3ForCausalLM(config).eval()


def test_qkv_proj_whose_config_does_not_add_up_asks_for_block_sizes():
    base = _phi3(kv_heads=1)  # qkv_proj: 32 + 8 + 8 = 48 outputs
    base.config.num_key_value_heads = 2  # the config now says 32 + 16 + 16
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.qkv_proj.*48 outputs.*block_sizes=\{'qkv_proj'"):
        get_peft_model(base, GivaConfig(r=2, target_modules=["qkv_proj"]))
    model = get_peft_model(_phi3(kv_heads=1), GivaConfig(r=2, target_modules=["qkv_proj"], block_sizes={"qkv_proj": [32, 8, 8]}))
    assert [b.out_size for b in _layers(model)["model.layers.0.self_attn.qkv_proj"].blocks["default"]] == [32, 8, 8]


# ---------------------------------------------------------------------------------------------------------------------
# 10. The `weight` variant: no SVD at load; DeepSpeed ZeRO-3 partitioned weights


def test_weight_variant_does_no_svd_at_load(tmp_path, batches, monkeypatch):
    model = get_peft_model(_bert(), _config(variant="weight", init_weights=False))
    expected = _logits(model, batches[0])
    model.save_pretrained(tmp_path)
    calls = []
    real = giva.layer.bases_from_weight
    monkeypatch.setattr(giva.layer, "bases_from_weight", lambda *args: calls.append(1) or real(*args))
    loaded = PeftModel.from_pretrained(_bert(), tmp_path)
    assert torch.equal(_logits(loaded, batches[0]), expected)
    assert calls == []
    # Built for inference without a checkpoint: the SVD happens at first use, giving the eager bases.
    lazy = get_peft_model(_bert(), _config(variant="weight", inference_mode=True))
    eager = get_peft_model(_bert(), _config(variant="weight"))
    assert calls == [1] * 4  # eager only
    _logits(lazy, batches[0])
    for name, layer in _layers(lazy).items():
        assert torch.equal(layer.giva_A["default"], _layers(eager)[name].giva_A["default"])


def test_weight_variant_built_for_inference_saves_its_bases(tmp_path, batches):
    # Saved before any forward: the deferred SVD must run at save time, not leave zero bases in the file.
    lazy = get_peft_model(_bert(), _config(variant="weight", inference_mode=True))
    lazy.save_pretrained(tmp_path)
    eager = get_peft_model(_bert(), _config(variant="weight"))
    loaded = PeftModel.from_pretrained(_bert(), tmp_path)
    for name, layer in _layers(loaded).items():
        assert layer.giva_A["default"].any()
        assert torch.equal(layer.giva_A["default"], _layers(eager)[name].giva_A["default"])
        assert torch.equal(layer.giva_B["default"], _layers(eager)[name].giva_B["default"])


def _zero3_partitioned(model: torch.nn.Module) -> torch.nn.Module:
    """Fake DeepSpeed ZeRO-3: every weight is an empty tensor with its full shape in `ds_shape`."""
    for module in model.modules():
        if hasattr(module, "nf"):  # Conv1D
            shape = module.weight.shape
            module.weight = torch.nn.Parameter(torch.empty(0))
            module.weight.ds_shape = shape
    return model


def test_zero3_partitioned_conv1d_wraps_and_weight_variant_explains():
    model = get_peft_model(_zero3_partitioned(tiny_gpt2()), GivaConfig(r=2, target_modules=["c_attn", "c_fc"]))
    layers = _layers(model)
    c_attn = layers["transformer.h.0.attn.c_attn"]
    assert (c_attn.in_features, c_attn.out_features) == (32, 96)
    assert [b.out_size for b in c_attn.blocks["default"]] == [32, 32, 32]
    assert layers["transformer.h.1.mlp.c_fc"].giva_B["default"].shape == (128, 2)
    with pytest.raises(ValueError, match=r"'weight' needs the full weight of layer 'transformer\.h\.0\.attn\.c_attn'.*ZeRO-3"):
        get_peft_model(_zero3_partitioned(tiny_gpt2()), GivaConfig(r=2, target_modules=["c_attn"], variant="weight"))


# ---------------------------------------------------------------------------------------------------------------------
# 11. Training in eval mode before the bases exist


def test_eval_mode_training_before_initialize_raises_but_inference_is_allowed(batches):
    model = get_peft_model(_bert(), _config()).eval()
    with pytest.raises(BasesNotInitializedError, match="before its bases were initialised"):
        model(**batches[0]).loss.backward()
    base = _logits(_bert(), batches[0])
    assert torch.equal(_logits(model, batches[0]), base)  # no_grad
    with torch.inference_mode():
        assert torch.equal(model(input_ids=batches[0]["input_ids"]).logits, base)
    for name, param in model.named_parameters():
        if "giva_lambda" in name:
            param.requires_grad_(False)
    assert torch.equal(model(input_ids=batches[0]["input_ids"]).logits.detach(), base)  # frozen vectors
    for name, param in model.named_parameters():
        if "giva_lambda" in name:
            param.requires_grad_(True)
    giva.initialize(model, batches, num_batches=1, progress=False)
    model(**batches[0]).loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "giva_lambda" in n)


# ---------------------------------------------------------------------------------------------------------------------
# 13. Config values and options that match nothing


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lambda_s_init": math.nan}, r"GivaConfig.lambda_s_init must be a finite number, got nan"),
        ({"lambda_s_init": math.inf}, r"GivaConfig.lambda_s_init must be a finite number, got inf"),
        ({"lambda_s_init": "1"}, r"GivaConfig.lambda_s_init must be a finite number"),
        ({"seed": "abc"}, r"GivaConfig.seed must be a signed 64-bit integer, got 'abc'"),
        ({"seed": True}, r"GivaConfig.seed must be a signed 64-bit integer, got True"),
        ({"seed": 1.5}, r"GivaConfig.seed must be a signed 64-bit integer"),
        ({"seed": 2**63}, r"GivaConfig.seed must be a signed 64-bit integer, got 9223372036854775808"),
        ({"r": True}, r"GivaConfig.r must be a positive integer, got True"),
        ({"r": -2}, r"GivaConfig.r must be a positive integer, got -2"),
        ({"giva_dropout": "0.1"}, r"GivaConfig.giva_dropout must be a number in \[0, 1\)"),
        ({"giva_dropout": math.nan}, r"GivaConfig.giva_dropout must be in \[0, 1\)"),
        ({"giva_dropout": -0.1}, r"GivaConfig.giva_dropout must be in \[0, 1\)"),
        ({"init_weights": "yes"}, r"GivaConfig.init_weights must be True or False"),
        ({"layers_to_transform": [-1]}, r"GivaConfig.layers_to_transform must be a layer index or a non-empty list"),
        ({"layers_to_transform": [True]}, r"GivaConfig.layers_to_transform must be"),
        ({"layers_to_transform": "1"}, r"GivaConfig.layers_to_transform must be"),
        ({"layers_to_transform": [0], "target_modules": ".*query"}, r"cannot be used when target_modules is a string"),
        ({"layers_to_transform": [0], "target_modules": "all-linear"}, r"leave target_modules None"),
        ({"layers_pattern": 3, "layers_to_transform": [0]}, r"GivaConfig.layers_pattern must be a string"),
        ({"block_sizes": None}, r"GivaConfig.block_sizes must be a dict"),
        ({"block_sizes": {"c_attn": [16, True]}}, r"GivaConfig.block_sizes\['c_attn'\] must be"),
        ({"adapt_blocks": {"c_attn": [False]}}, r"GivaConfig.adapt_blocks\['c_attn'\] must be"),
    ],
)
def test_bad_config_values_raise_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GivaConfig(**kwargs)


@pytest.mark.parametrize("targets", [None, ["query"]])
def test_layers_to_transform_beyond_the_model_raises(targets):
    with pytest.raises(ValueError, match=r"layers_to_transform=\[1, 99\] names layer\(s\) \[99\] .*layers 0\.\.1"):
        get_peft_model(_bert(), GivaConfig(r=2, target_modules=targets, layers_to_transform=[1, 99]))


def test_layers_to_transform_applies_to_the_default_all_linear_targets():
    model = get_peft_model(_bert(), GivaConfig(r=2, layers_to_transform=[1], task_type="SEQ_CLS"))
    adapted = sorted(_layers(model))
    assert adapted and all(name.startswith("bert.encoder.layer.1.") for name in adapted)
    assert len(adapted) == 6  # q, k, v, attention output, intermediate, output


@pytest.mark.parametrize("option", ["block_sizes", "adapt_blocks"])
def test_block_options_naming_no_targeted_module_raise(option):
    value = {"c_atn": 3} if option == "block_sizes" else {"c_atn": [0]}
    with pytest.raises(ValueError, match=rf"GivaConfig.{option} names module\(s\) \['c_atn'\]"):
        get_peft_model(tiny_gpt2(), GivaConfig(r=2, target_modules=["c_attn"], **{option: value}))
    # A module that exists but is not targeted is a mistake too.
    value = {"c_fc": 1} if option == "block_sizes" else {"c_fc": [0]}
    with pytest.raises(ValueError, match=rf"GivaConfig.{option} names module\(s\) \['c_fc'\]"):
        get_peft_model(tiny_gpt2(), GivaConfig(r=2, target_modules=["c_attn"], **{option: value}))


def test_target_module_names_matching_no_module_raise_naming_them():
    """PEFT refuses target_modules only when no name matches: one typo among good names was silently ignored."""
    with pytest.raises(ValueError, match=r"target_modules names module\(s\) \['qeury'\] that match no module .* its "
                                         r"linear layers are named classifier, dense, key, query, value$"):
        get_peft_model(tiny_bert(), GivaConfig(r=2, target_modules=["qeury", "value"]))
    with pytest.raises(ValueError, match=r"\['c_atn', 'mlp.c_fcc'\]"):
        get_peft_model(tiny_gpt2(), GivaConfig(r=2, target_modules=["c_atn", "c_proj", "mlp.c_fcc"]))
    # PEFT's rule: a name matches a module's name or a dotted suffix of it; regex strings and 'all-linear' stand
    model = get_peft_model(tiny_bert(), GivaConfig(r=2, target_modules=["attention.self.query", "bert.pooler.dense"]))
    assert sorted(n for n, m in model.named_modules() if isinstance(m, giva.GivaLayer))[-1] == "base_model.model.bert.pooler.dense"
    for targets in (r".*\.(query|value)", "all-linear"):
        assert any(isinstance(m, giva.GivaLayer) for m in get_peft_model(tiny_bert(), GivaConfig(r=2, target_modules=targets)).modules())


def test_initialize_still_works_on_every_tiny_model_family():
    model = get_peft_model(tiny_gpt2(), GivaConfig(r=2, target_modules=["c_attn", "c_proj"]))
    giva.initialize(model, text_batches(labels="lm"), num_batches=1, progress=False)
    assert giva.bases_initialized(model)
    bert = get_peft_model(tiny_bert(), _config())
    giva.initialize(bert, text_batches(), num_batches=1, progress=False)
    assert giva.bases_initialized(bert)


def test_a_giva_layer_prints_its_module_tree_as_peft_layers_do():
    """repr names the base layer and the adapter's parts (it printed `giva.<giva.layer.Linear object at 0x...>`)."""
    model = get_peft_model(tiny_gpt2(), GivaConfig(r=4, target_modules=["c_attn"], init_weights=False))
    layer = next(m for m in model.modules() if isinstance(m, giva.GivaLayer))
    text = repr(layer)
    assert text.startswith("giva.Linear(") and "(base_layer): Conv1D(" in text and "object at 0x" not in text
    assert "giva.Linear(" in repr(model)


@pytest.mark.parametrize("setting", ["bf16 model", "bf16 bases"])
def test_an_evaluation_under_inference_mode_does_not_stop_training(batches, setting):
    """``A`` cast to the compute dtype is cached; cast first under ``torch.inference_mode()`` (an evaluation, a
    pipeline) the copy must still serve the next training step, which gets the same gradients as without it."""
    kwargs = {"bases_dtype": "bfloat16"} if setting == "bf16 bases" else {}

    def model():
        m = get_peft_model(_bert(), _config(init_weights=False, **kwargs))
        return m.to(torch.bfloat16) if setting == "bf16 model" else m

    def step(m):
        m.train()
        m(input_ids=batches[0]["input_ids"]).logits.float().square().sum().backward()
        return {n: p.grad for n, p in m.named_parameters() if "giva_lambda" in n}

    evaluated = model()
    with torch.inference_mode():
        evaluated(input_ids=batches[0]["input_ids"])
    after_eval, fresh = step(evaluated), step(model())
    assert after_eval and after_eval.keys() == fresh.keys()
    assert all(torch.equal(after_eval[n], fresh[n]) for n in fresh)


def test_weight_adapters_first_used_under_inference_mode_keep_ordinary_bases(batches):
    """Two deferred `weight` adapters share their zero bases until first use; un-sharing them under
    ``torch.inference_mode()`` must not leave an inference tensor as an adapter's stored ``A`` (a later
    ``load_state_dict`` into it would fail)."""
    lazy = get_peft_model(_bert(), _config(variant="weight", inference_mode=True), adapter_name="a")
    lazy.add_adapter("b", _config(variant="weight", inference_mode=True))
    lazy.eval()
    with torch.inference_mode():
        lazy(input_ids=batches[0]["input_ids"], adapter_names=["a", "b"] * (len(batches[0]["input_ids"]) // 2))
    stored = [layer.giva_A[name] for layer in _layers(lazy).values() for name in ("a", "b")]
    assert stored and not any(a.is_inference() for a in stored)
    state = {k: v.clone() + 1.0 for k, v in lazy.state_dict().items() if "giva_A.a" in k}
    lazy.load_state_dict(state, strict=False)
    assert all(torch.equal(layer.giva_A["a"], state[f"base_model.model.{n}.giva_A.a"]) for n, layer in _layers(lazy).items())


def test_a_weight_adapter_is_not_added_over_a_merged_w(batches):
    """The `weight` variant's bases are the SVD of W: with another adapter merged into W they would be that sum's.
    Refused with the merged adapters named, and nothing of the new adapter is left behind; unmerged, it adds and
    gets the pristine W's bases."""
    model = get_peft_model(_bert(), _config(init_weights=False))
    model.merge_adapter()
    with pytest.raises(RuntimeError, match=r"variant 'weight'.*adapters \['default'\] merged into W: unmerge them"):
        model.add_adapter("w", _config(variant="weight"))
    assert "w" not in model.peft_config and all("w" not in layer.giva_A for layer in _layers(model).values())
    model.unmerge_adapter()
    model.add_adapter("w", _config(variant="weight"))
    pristine = get_peft_model(_bert(), _config(variant="weight"))
    for name, layer in _layers(model).items():
        # unmerge restores W to float round-off, hence not bit for bit (merged, A was 0.66 away)
        torch.testing.assert_close(layer.giva_A["w"], _layers(pristine)[name].giva_A["default"], atol=1e-4, rtol=0)


def test_the_options_check_takes_unset_target_modules_as_every_linear_layer():
    """target_modules=None (the default) means 'all-linear'; the check, which giva finetune runs on a skeleton before
    get_peft_model resolves None, crashed on it (PEFT's matcher needs the resolved config)."""
    from giva.model import check_options_match_the_model

    check_options_match_the_model(GivaConfig(r=2), tiny_bert())
    check_options_match_the_model(GivaConfig(r=2, block_sizes={"query": 16}), tiny_bert())
    with pytest.raises(ValueError, match=r"GivaConfig.block_sizes names module\(s\) \['nosuch'\]"):
        check_options_match_the_model(GivaConfig(r=2, block_sizes={"nosuch": 16}), tiny_bert())


# ---------------------------------------------------------------------------------------------------------------------
# Fuzzing review: an added adapter's dropout follows the model's mode (F2); fp64 merges do not round W (F4)


def test_an_adapter_added_to_a_wrapped_layer_of_an_eval_model_has_its_dropout_off():
    torch.manual_seed(0)
    model = get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(8, 8)).eval(),
        GivaConfig(r=2, target_modules=["0"], variant="random", init_weights=False),
    ).eval()
    model.add_adapter("b", GivaConfig(r=2, target_modules=["0"], variant="random", init_weights=False, giva_dropout=0.3))
    model.base_model.set_adapter(["b"])
    layer = model.base_model.model[0]
    assert not layer.giva_dropout["b"].training
    x = torch.randn(4, 8)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    model.train()  # and an adapter added in train mode trains with dropout
    model.add_adapter("c", GivaConfig(r=2, target_modules=["0"], variant="random", init_weights=False, giva_dropout=0.3))
    assert layer.giva_dropout["c"].training


@pytest.mark.parametrize("core", [False, True])
def test_merge_and_unmerge_of_a_float64_model_keep_float64_precision(core):
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(16, 16)).double().eval()
    w0 = base[0].weight.detach().clone()
    model = get_peft_model(
        base, GivaConfig(r=4, target_modules=["0"], variant="random", init_weights=False, core=core)
    ).eval()
    layer = model.base_model.model[0]
    with torch.no_grad():
        for name in ("giva_lambda_s", "giva_lambda_o"):
            getattr(layer, name)["default"].mul_(1 + 1e-9)  # bits below fp32's precision
        if core:
            layer.giva_core["default"].add_(torch.randn(4, 4, dtype=layer.giva_core["default"].dtype) * 0.1)
    x = torch.randn(5, 16, dtype=torch.float64)
    with torch.no_grad():
        unmerged = model(x)
    vectors = [getattr(layer, n)["default"].detach().double() for n in ("giva_lambda_o", "giva_lambda_s")]
    a, b = layer.giva_A["default"].double(), layer.giva_B["default"].double()
    c = layer.giva_core["default"].detach().double() if core else torch.eye(4, dtype=torch.float64)
    reference = (vectors[0][:, None] * (b @ c)) @ (vectors[1][:, None] * a)
    torch.testing.assert_close(layer.get_delta_weight("default"), reference, rtol=0, atol=1e-15)
    model.base_model.merge_adapter()
    with torch.no_grad():  # (the unmerged forward forms its factor F in fp32: equal to that precision only)
        torch.testing.assert_close(model(x), unmerged, rtol=0, atol=1e-5)
    model.base_model.unmerge_adapter()
    assert (layer.get_base_layer().weight.detach() - w0).abs().max().item() < 1e-15


# ---------------------------------------------------------------------------------------------------------------------
# FSDP2-sharded vectors outside a merge


@pytest.fixture
def one_rank_group():
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_a_delta_of_sharded_vectors_outside_a_merge_raises_instead_of_waiting_for_the_other_ranks(one_rank_group):
    """Gathering FSDP2-sharded vectors is a collective: a merge runs on every rank and may gather them, but an export
    or ``get_delta_weight`` called on one rank would wait for the others forever; it says what to do instead."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = get_peft_model(_bert(), _config(variant="random", init_weights=False)).eval()
    layer = _layers(model)["bert.encoder.layer.0.attention.self.query"]
    expected = layer.get_delta_weight("default")
    fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
    assert type(layer.giva_lambda_o["default"].data).__name__ == "DTensor"
    with pytest.raises(RuntimeError, match=r"sharded by FSDP2 \(DTensor\).*full_state_dict"):
        layer.get_delta_weight("default")
    model.merge_adapter()  # every rank merges: gathered there
    merged = layer.get_base_layer().weight.full_tensor().clone()  # one rank: full_tensor may be the shard itself
    model.unmerge_adapter()
    torch.testing.assert_close(merged - layer.get_base_layer().weight.full_tensor(), expected, rtol=1e-5, atol=1e-6)


def test_merge_and_unload_under_fsdp2_after_a_forward_reaches_the_shards_once_resharded(one_rank_group):
    """After a forward FSDP2's root leaves its parameters unsharded: a merge then writes into that temporary copy,
    which the next reshard drops (PEFT's ``PeftModel.merge_adapter`` reshards first from 0.22 on; ``merge_and_unload``
    does not, for any PEFT method). The documented recipe, ``model.reshard()`` on every rank first, puts delta_W into
    the shards that FSDP2 keeps and a state dict reads."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = get_peft_model(_bert(), _config(variant="random", init_weights=False)).eval()
    layer = _layers(model)["bert.encoder.layer.0.attention.self.query"]
    w0, expected = layer.get_base_layer().weight.detach().clone(), layer.get_delta_weight("default").detach()
    fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
    with torch.no_grad():
        model(input_ids=torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0)))
    assert type(layer.get_base_layer().weight.data).__name__ != "DTensor"  # the unsharded copy, until a reshard
    model.reshard()
    base = model.merge_and_unload()
    weight = base.bert.encoder.layer[0].attention.self.query.weight
    assert type(weight.data).__name__ == "DTensor"
    torch.testing.assert_close(weight.full_tensor() - w0, expected, rtol=1e-5, atol=1e-6)
