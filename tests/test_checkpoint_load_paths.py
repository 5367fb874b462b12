"""GiVA checkpoints loaded through transformers' ``model.load_adapter`` (PeftAdapterMixin) and through
``PeftMixedModel`` get the checks ``PeftModel.from_pretrained`` gets, or are refused: never a silent load.

transformers' own loader only logs a "LOAD REPORT" for missing and unexpected keys, so without the
hook a folder that mixes two saves, lacks a basis or comes from a model of another depth loads
with changed outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftMixedModel, PeftModel, get_peft_model
from peft.functional import set_adapter
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaForCausalLM

import giva
import giva.layer
from giva import CheckpointError, GivaConfig
from tiny_models import TRANSFORMERS_4, text_batches, tiny_bert, tiny_llama

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def _llama(layers: int = 2) -> LlamaForCausalLM:
    config = tiny_llama().config
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def _batch() -> dict:
    return text_batches(n=1, batch=2, length=8, labels="lm")[0]


@torch.no_grad()
def _logits(model: torch.nn.Module) -> torch.Tensor:
    return model.eval()(input_ids=_batch()["input_ids"]).logits


def _adapter(seed: int, layers: int = 2, variant: str = "VrUr") -> PeftModel:
    """A GiVA adapter with gradient bases and non-zero vectors (so outputs show what was loaded)."""
    config = GivaConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", variant=variant, seed=seed)
    model = get_peft_model(_llama(layers), config)
    giva.initialize(model, [_batch()], num_batches=1, progress=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "giva_lambda" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    folder = tmp_path_factory.mktemp("load_paths") / "adapter"
    model = _adapter(seed=1)
    model.save_pretrained(str(folder))
    return folder, _logits(model)


def _copy(folder: Path, dest: Path) -> Path:
    dest.mkdir()
    for name in (CONFIG, WEIGHTS):
        (dest / name).write_bytes((folder / name).read_bytes())
    return dest


def _drop_checksum(folder: Path) -> None:
    config = json.loads((folder / CONFIG).read_text())
    del config["weights_sha256"]
    (folder / CONFIG).write_text(json.dumps(config))


def test_a_clean_folder_loads_through_transformers_and_reproduces_the_outputs(saved):
    folder, expected = saved
    base = _llama()
    base.load_adapter(str(folder))
    torch.testing.assert_close(_logits(base), expected, rtol=0, atol=0)
    assert base.peft_config["default"].weights_sha256 is None  # describes the files, not the model in memory


def test_weights_of_another_save_are_refused_by_transformers_load_adapter(saved, tmp_path):
    folder = _copy(saved[0], tmp_path / "mixed")
    other = tmp_path / "other"
    _adapter(seed=2).save_pretrained(str(other))
    (folder / WEIGHTS).write_bytes((other / WEIGHTS).read_bytes())
    base = _llama()
    with pytest.raises(CheckpointError, match=r"mixed/adapter_model.safetensors does not match .*adapter_config.json"):
        base.load_adapter(str(folder))
    assert not getattr(base, "peft_config", {})  # nothing was injected


def test_a_missing_basis_is_refused_by_transformers_load_adapter_naming_the_layer(saved, tmp_path):
    folder = _copy(saved[0], tmp_path / "missing")
    state = load_file(folder / WEIGHTS)
    del state["base_model.model.model.layers.1.self_attn.v_proj.giva_A"]
    save_file(state, folder / WEIGHTS, metadata={"format": "pt"})
    _drop_checksum(folder)  # else the checksum catches it first
    base = _llama()
    before = _logits(base)
    with pytest.raises(ValueError, match=r"lacks tensors .*model\.layers\.1\.self_attn\.v_proj \(giva_A\)"):
        base.load_adapter(str(folder))
    # The rejected adapter was deleted again: the model computes what it did, and a good folder loads into it.
    assert not getattr(base, "peft_config", {}) and not any("giva_" in n for n, _ in base.named_parameters())
    torch.testing.assert_close(_logits(base), before, rtol=0, atol=0)
    base.load_adapter(str(saved[0]))
    torch.testing.assert_close(_logits(base), saved[1], rtol=0, atol=0)


@pytest.mark.parametrize(("layers", "message"), [
    (1, r"layer\(s\) this model does not have: model\.layers\.1\.self_attn"),
    (3, r"lacks tensors this model needs: model\.layers\.2\.self_attn\.q_proj"),
])
def test_a_base_model_of_another_depth_is_refused_by_transformers_load_adapter(saved, layers, message):
    base = _llama(layers)
    with pytest.raises(ValueError, match=message):
        base.load_adapter(str(saved[0]))
    assert not getattr(base, "peft_config", {})


@pytest.mark.skipif(TRANSFORMERS_4, reason="transformers 4.x load_adapter ignores adapter_kwargs' subfolder for a "
                    "local folder (it reads the folder above)")
def test_an_adapter_in_a_subfolder_loads_through_transformers_adapter_kwargs(saved, tmp_path):
    """transformers takes a subfolder as ``load_adapter(folder, adapter_kwargs={"subfolder": ...})``; GiVA's hook
    checked the folder above it and raised "holds no adapter_config.json", for a stock LoRA folder too. The folder is
    checked where it is (a mixed save is still refused). ``subfolder=`` itself is transformers' own TypeError for
    every PEFT method (LoadStateDictConfig has no such field), no longer hidden behind that misleading error."""
    from peft import LoraConfig

    _copy(saved[0], (tmp_path / "outer").mkdir() or tmp_path / "outer" / "giva")
    torch.manual_seed(3)
    lora = get_peft_model(_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)).eval()
    lora.save_pretrained(str(tmp_path / "outer" / "lora"))
    for name, expected in (("giva", saved[1]), ("lora", _logits(lora))):
        base = _llama()
        base.load_adapter(str(tmp_path / "outer"), adapter_kwargs={"subfolder": name})
        torch.testing.assert_close(_logits(base), expected, rtol=0, atol=0)
        with pytest.raises(TypeError, match="unexpected keyword argument 'subfolder'"):
            _llama().load_adapter(str(tmp_path / "outer"), subfolder=name)
    other = tmp_path / "other"
    _adapter(seed=2).save_pretrained(str(other))
    (tmp_path / "outer" / "giva" / WEIGHTS).write_bytes((other / WEIGHTS).read_bytes())
    with pytest.raises(CheckpointError, match="mixes files of two different saves"):
        _llama().load_adapter(str(tmp_path / "outer"), adapter_kwargs={"subfolder": "giva"})


def test_a_seeded_basis_that_regenerates_differently_is_refused_by_transformers_load_adapter(tmp_path, monkeypatch):
    _adapter(seed=1, variant="Vr").save_pretrained(str(tmp_path / "vr"))
    original = giva.layer.seeded_output_basis
    monkeypatch.setattr(giva.layer, "seeded_output_basis", lambda *args: -original(*args))
    with pytest.raises(ValueError, match=r"layer\(s\) model\.layers\.0\.self_attn\.q_proj.* regenerate differently"):
        _llama().load_adapter(str(tmp_path / "vr"))


def test_auto_model_from_pretrained_of_an_adapter_folder_is_checked_too(tmp_path):
    base_dir = tmp_path / "base"
    _llama().save_pretrained(str(base_dir))
    model = get_peft_model(LlamaForCausalLM.from_pretrained(str(base_dir)), _adapter(seed=1).peft_config["default"])
    adapter = tmp_path / "adapter"
    model.save_pretrained(str(adapter))
    assert json.loads((adapter / CONFIG).read_text())["base_model_name_or_path"] == str(base_dir)
    other = tmp_path / "other"
    _adapter(seed=2).save_pretrained(str(other))
    (adapter / WEIGHTS).write_bytes((other / WEIGHTS).read_bytes())
    with pytest.raises(CheckpointError, match="does not match"):
        AutoModelForCausalLM.from_pretrained(str(adapter))


def _classifier(base: torch.nn.Module, seed: int) -> PeftModel:
    """A SEQ_CLS GiVA adapter: random vectors, and a classifier head (``modules_to_save``) moved away from the base's."""
    torch.manual_seed(seed)
    config = GivaConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS", init_weights=False, seed=seed)
    model = get_peft_model(base, config)
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["default"].weight.normal_()
    return model.eval()


@pytest.mark.parametrize("name", ["default", "other"])
def test_two_adapters_with_a_trained_head_load_through_transformers_under_any_name(tmp_path, name):
    """Saved keys carry PeftModel's ``base_model.model.`` prefix; the head's must lose it to load into a bare model."""
    first, second = _classifier(tiny_bert(), seed=1), _classifier(tiny_bert(), seed=2)
    first.save_pretrained(str(tmp_path / "first"))
    second.save_pretrained(str(tmp_path / "second"))
    base = tiny_bert()
    base.load_adapter(str(tmp_path / "first"), adapter_name=name)
    base.load_adapter(str(tmp_path / "second"), adapter_name="second")
    set_adapter(base, name, inference_mode=True)  # transformers' model.set_adapter asks for PEFT >= 0.22
    torch.testing.assert_close(_logits(base), _logits(first), rtol=0, atol=0)
    set_adapter(base, "second", inference_mode=True)
    torch.testing.assert_close(_logits(base), _logits(second), rtol=0, atol=0)


def test_auto_model_from_pretrained_of_an_adapter_with_a_trained_head_reproduces_its_outputs(tmp_path):
    tiny_bert().save_pretrained(str(tmp_path / "base"))
    model = _classifier(AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "base")), seed=1)
    model.save_pretrained(str(tmp_path / "adapter"))
    loaded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "adapter"))
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)


def test_peft_mixed_model_refuses_giva_adapters(saved):
    with pytest.raises(ValueError, match="GIVA is not supported for mixed models"):
        PeftMixedModel.from_pretrained(_llama(), str(saved[0]))


def test_a_refused_load_adapter_gives_the_model_back_as_it_was(tmp_path):
    """PEFT adds the adapter before loading its weights: a load refused by GiVA's checks (a checkpoint of another
    base model's shapes) left a fresh half-made adapter in the model, which the next save wrote."""
    torch.manual_seed(0)
    source = get_peft_model(tiny_llama(), GivaConfig(r=2, variant="Vr", target_modules=["q_proj"]))
    giva.initialize(source, text_batches(1, labels="lm"), num_batches=1, progress=False)
    source.save_pretrained(str(tmp_path / "narrow"))
    model = get_peft_model(tiny_llama(hidden_size=64, intermediate_size=128), GivaConfig(r=2, variant="Vr", target_modules=["q_proj"]))
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 100, (1, 7))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    with pytest.raises(ValueError, match="does not fit this base model"):
        model.load_adapter(str(tmp_path / "narrow"), adapter_name="other")
    assert list(model.peft_config) == ["default"]
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, expected)
    model.save_pretrained(str(tmp_path / "default"))
    assert not any(".other" in key for key in load_file(tmp_path / "default" / "adapter_model.safetensors"))


@pytest.mark.parametrize(("built_with", "named"), [
    ({"r": 4}, "r=4 here, 2 in the checkpoint"),
    ({"target_modules": ["q_proj"]}, r"target_modules=\{'q_proj'\} here, \[.*'v_proj'.*\] in the checkpoint"),
    ({"variant": "VrUr"}, "variant='VrUr' here, 'Vr' in the checkpoint"),
])
def test_a_load_into_an_adapter_built_with_another_config_names_the_difference(tmp_path, built_with, named):
    """The Trainer's resume_from_checkpoint loads into the adapter the user built: one built with another r (target
    modules, variant) than the checkpoint's was refused as 'another base model'; the refusal now names the field,
    and the model is left as it was."""
    source = get_peft_model(tiny_llama(), GivaConfig(r=2, variant="Vr", target_modules=["q_proj", "v_proj"]))
    giva.initialize(source, text_batches(1, labels="lm"), num_batches=1, progress=False)
    source.save_pretrained(str(tmp_path / "saved"))
    model = get_peft_model(tiny_llama(), GivaConfig(**{"r": 2, "variant": "Vr", "target_modules": ["q_proj", "v_proj"],
                                                      **built_with}))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=f"The adapter 'default' it was loaded into already existed, built with another "
                                         f"GivaConfig than the checkpoint's \\({named}\\)"):
        model.load_adapter(str(tmp_path / "saved"), adapter_name="default")
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_a_load_into_an_adapter_that_stores_bases_in_a_narrower_dtype_is_refused_before_anything_loads(tmp_path):
    """A float32 checkpoint loaded into an existing bfloat16-bases adapter (the Trainer's resume_from_checkpoint
    into the model the user built) rounded A with nothing said, and every later save kept the rounded one. The
    other way, bfloat16 saved into a float32 adapter, is exact and loads."""
    config = {"r": 2, "variant": "weight", "target_modules": ["q_proj", "v_proj"]}
    source = get_peft_model(tiny_llama(), GivaConfig(**config))
    source.save_pretrained(str(tmp_path / "float32"))
    model = get_peft_model(tiny_llama(), GivaConfig(**config, bases_dtype="bfloat16"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=f"^loading {tmp_path / 'float32'} into the existing adapter 'default' would "
                                         "round its bases: bases_dtype='bfloat16' here, 'float32' in the checkpoint; "):
        model.load_adapter(str(tmp_path / "float32"), adapter_name="default", is_trainable=True)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    model.save_pretrained(str(tmp_path / "bfloat16"))
    wide = get_peft_model(tiny_llama(), GivaConfig(**config))
    wide.load_adapter(str(tmp_path / "bfloat16"), adapter_name="default")
    assert torch.equal(_logits(wide), _logits(model))


@pytest.mark.parametrize("raised", [KeyboardInterrupt, RuntimeError])
def test_a_load_into_an_existing_adapter_cut_off_by_other_than_a_refusal_reads_no_config(tmp_path, monkeypatch, raised):
    """Only a ValueError (a refusal) of a load into an existing adapter gets the config differences appended; the
    hook read the folder's config for every exception first, a KeyboardInterrupt included, then dropped the note."""
    import peft.peft_model

    from giva import checkpoint

    source = get_peft_model(tiny_llama(), GivaConfig(r=2, target_modules=["q_proj", "v_proj"]))
    source.save_pretrained(str(tmp_path / "saved"))
    model = get_peft_model(tiny_llama(), GivaConfig(r=4, target_modules=["q_proj", "v_proj"]))  # differs: r
    reads, cut = [], []
    real_read = checkpoint._read_config
    monkeypatch.setattr(checkpoint, "_read_config", lambda path: (reads.append((path, bool(cut))), real_read(path))[1])

    def interrupted(*args, **kwargs):
        cut.append(True)
        raise raised("cut off")

    monkeypatch.setattr(peft.peft_model, "set_peft_model_state_dict", interrupted)
    with pytest.raises(raised, match="^cut off$"):
        model.load_adapter(str(tmp_path / "saved"), adapter_name="default")
    assert cut and reads and not [path for path, after in reads if after], reads  # read by the check, not after
    monkeypatch.setattr(peft.peft_model, "set_peft_model_state_dict", lambda *a, **k: (_ for _ in ()).throw(ValueError("refused")))
    with pytest.raises(ValueError, match=r"^refused The adapter 'default' it was loaded into already existed, .*r=4 here, 2"):
        model.load_adapter(str(tmp_path / "saved"), adapter_name="default")
