"""GivaConfig options as the tuner reads them: none is accepted and then ignored or misread, a bad one is refused
before any layer is built, and what a save writes loads again (from a read-only review of model.py / config.py)."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from giva import GivaConfig
from giva.layer import GivaLayer
from tiny_models import text_batches, tiny_bert, tiny_gpt2


def _adapted_blocks(model: torch.nn.Module) -> dict[str, list[int]]:
    return {name.removeprefix("base_model.model."): [block.index for block in module.blocks["default"]]
            for name, module in model.named_modules() if isinstance(module, GivaLayer)}


def _perturb(model: torch.nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "giva_" in name and param.requires_grad:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))


def test_a_second_all_linear_adapter_saves_a_config_a_fresh_base_model_loads(tmp_path):
    """PEFT's 'all-linear' of the second adapter listed the first one's head copies (classifier.modules_to_save.default,
    classifier.original_module), which the save wrote and the load of that folder into a fresh model refused."""
    model = get_peft_model(tiny_bert(), GivaConfig(r=4, variant="random", task_type="SEQ_CLS"))
    model.add_adapter("b", GivaConfig(r=4, variant="random", task_type="SEQ_CLS"))
    model.set_adapter("b")
    _perturb(model)
    inputs = text_batches(1)[0]["input_ids"]
    model.eval()
    expected = model(inputs).logits
    model.save_pretrained(tmp_path)
    assert not any("modules_to_save" in t or "original_module" in t for t in model.peft_config["b"].target_modules)
    reloaded = PeftModel.from_pretrained(tiny_bert(), tmp_path / "b", adapter_name="b").eval()
    torch.testing.assert_close(reloaded(inputs).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("order", ["general first", "specific first"])
def test_the_most_specific_block_key_wins_whatever_the_order(order):
    general, specific = ("c_attn", [0, 2]), ("h.1.attn.c_attn", [0])
    items = [general, specific] if order == "general first" else [specific, general]
    model = get_peft_model(tiny_gpt2(), GivaConfig(r=4, variant="random", target_modules=["c_attn"],
                                                   adapt_blocks=dict(items)))
    assert _adapted_blocks(model) == {"transformer.h.0.attn.c_attn": [0, 2], "transformer.h.1.attn.c_attn": [0]}


def test_tuple_target_modules_keep_to_layers_to_transform_and_reload(tmp_path):
    keys = ("bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.attention.self.query")
    model = get_peft_model(tiny_bert(), GivaConfig(r=4, variant="random", target_modules=keys, layers_to_transform=[1]))
    assert list(_adapted_blocks(model)) == ["bert.encoder.layer.1.attention.self.query"]
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    assert list(_adapted_blocks(reloaded)) == ["bert.encoder.layer.1.attention.self.query"]


@pytest.mark.parametrize("value", ["classifier", [""], 3])
def test_modules_to_save_must_be_a_list_of_names(value):
    """A string was taken character by character: nothing was trained or saved besides the GiVA layers."""
    with pytest.raises(ValueError, match=r"GivaConfig\.modules_to_save must be a list of module names"):
        GivaConfig(r=4, task_type="SEQ_CLS", modules_to_save=value)
    assert GivaConfig(r=4, modules_to_save=("classifier",)).modules_to_save == ("classifier",)


def _core_adapter() -> tuple[PeftModel, torch.Tensor, dict]:
    model = get_peft_model(tiny_gpt2(), GivaConfig(r=4, core=True, variant="random", target_modules=["c_fc"]))
    _perturb(model)
    inputs = text_batches(1, labels="lm")[0]["input_ids"]
    return model, inputs, get_peft_model_state_dict(model)


def test_a_core_checkpoint_is_refused_by_an_adapter_without_a_core(tmp_path):
    """The core was dropped with PEFT's "unexpected keys" warning: the outputs changed by the core's whole effect."""
    model, inputs, _ = _core_adapter()
    model.save_pretrained(tmp_path)
    plain = get_peft_model(tiny_gpt2(), GivaConfig(r=4, variant="random", target_modules=["c_fc"])).eval()
    before = plain(inputs).logits
    with pytest.raises(ValueError, match=r"holds giva_core \(the r x r core of GivaConfig\(core=True\)\)"):
        plain.load_adapter(str(tmp_path), "default")
    torch.testing.assert_close(plain(inputs).logits, before, rtol=0, atol=0)
    fresh = get_peft_model(tiny_gpt2(), GivaConfig(r=4, variant="random", target_modules=["c_fc"]))
    with pytest.raises(ValueError, match=r"holds giva_core"):
        set_peft_model_state_dict(fresh, get_peft_model_state_dict(model))


def test_a_core_adapter_refuses_a_checkpoint_without_its_core():
    """The core stayed the identity, no error."""
    model, _, state = _core_adapter()
    other = get_peft_model(tiny_gpt2(), GivaConfig(r=4, core=True, variant="random", target_modules=["c_fc"]))
    with pytest.raises(ValueError, match=r"lacks tensors .*transformer\.h\.0\.mlp\.c_fc \(giva_core\)"):
        set_peft_model_state_dict(other, {k: v for k, v in state.items() if "giva_core" not in k})


@pytest.mark.parametrize(("model", "options", "named"), [
    (tiny_gpt2, {"task_type": "CAUSAL_LM", "block_sizes": {"lm_head": 2}}, r"block_sizes names module\(s\) \['lm_head'\]"),
    (tiny_bert, {"task_type": "SEQ_CLS", "block_sizes": {"classifier": 2}}, r"block_sizes names module\(s\) \['classifier'\]"),
    (tiny_gpt2, {"exclude_modules": ["c_attn"], "adapt_blocks": {"c_attn": [0, 2]}},
     r"adapt_blocks names module\(s\) \['c_attn'\]"),
], ids=["output layer", "classifier head", "excluded"])
def test_block_options_for_a_module_all_linear_leaves_out_are_refused(model, options, named):
    base = model()
    with pytest.raises(ValueError, match=named):
        get_peft_model(base, GivaConfig(r=4, variant="random", **options))
    assert not any(isinstance(module, GivaLayer) for module in base.modules())


@pytest.mark.parametrize(("options", "message"), [
    ({"adapt_blocks": {"h.1.attn.c_attn": [0, 3]}}, r"adapt_blocks gives layer 'transformer\.h\.1\.attn\.c_attn' "
                                                     r"blocks \[0, 3\], but it has 3 block\(s\)"),
    ({"block_sizes": {"h.1.attn.c_attn": [32, 32]}}, r"block_sizes gives layer 'transformer\.h\.1\.attn\.c_attn' "
                                                      r"blocks \[32, 32\], which sum to 64, but the layer has 96"),
], ids=["adapt_blocks", "block_sizes"])
def test_blocks_that_do_not_fit_a_layer_are_refused_before_any_layer_is_built(monkeypatch, options, message):
    """With variant 'weight' each layer before the bad one took an SVD of W first (minutes on a large model)."""
    built = []
    monkeypatch.setattr(GivaLayer, "update_layer", lambda self, *a, **k: built.append(self.layer_name))
    base = tiny_gpt2()
    with pytest.raises(ValueError, match=message):
        get_peft_model(base, GivaConfig(r=4, variant="weight", target_modules=["c_attn"], **options))
    assert built == []


def test_blocks_that_fit_still_build():
    model = get_peft_model(tiny_gpt2(), GivaConfig(r=4, variant="random", target_modules=["c_attn"],
                                                   adapt_blocks={"h.1.attn.c_attn": [2]}, block_sizes={"h.0.attn.c_attn": 3}))
    assert _adapted_blocks(model) == {"transformer.h.0.attn.c_attn": [0, 1, 2], "transformer.h.1.attn.c_attn": [2]}
