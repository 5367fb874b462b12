"""Exact GiVA -> LoRA export: PEFT's convert_to_lora / save_as_lora, giva.export and `giva export-lora`.

The exported folders are loaded by a fresh process that never imports giva (stock PEFT LoRA only) and must
reproduce the GiVA model's outputs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import peft
import pytest
import torch
from peft import get_peft_model
from transformers.pytorch_utils import Conv1D

import giva
from giva import GivaConfig
from giva.cli import main
from giva.export import ExportError, export_lora, lora_factors, to_lora
from giva.layer import GivaLayer
from tiny_models import text_batches, tiny_bert, tiny_gpt2, tiny_llama

GPT2_FUSED = {"target_modules": ["c_attn", "c_proj", "c_fc"], "adapt_blocks": {"c_attn": [0, 2]}}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _random_adapter(factory, **kwargs):
    torch.manual_seed(1)
    # init_weights=False: stand-in bases and non-zero vectors, an adapter that changes the outputs.
    return get_peft_model(factory(), GivaConfig(r=4, init_weights=False, **kwargs)).eval()


@pytest.mark.parametrize(
    ("factory", "kwargs"),
    [
        (tiny_bert, {"target_modules": ["query", "value", "dense"]}),
        (tiny_gpt2, GPT2_FUSED),
        (tiny_llama, {"target_modules": "all-linear"}),
    ],
)
def test_peft_convert_to_lora_gives_the_exact_factors(factory, kwargs):
    model = _random_adapter(factory, **kwargs)
    lora_config, state_dict = peft.convert_to_lora(model, rank=2)  # below the GiVA rank: kept exact, not truncated
    layers = {name: m for name, m in model.named_modules() if isinstance(m, GivaLayer)}
    assert {k.rsplit(".lora_", 1)[0] for k in state_dict} == set(layers)
    for name, layer in layers.items():
        lora_a, lora_b = state_dict[f"{name}.lora_A.weight"], state_dict[f"{name}.lora_B.weight"]
        assert lora_a.shape == (layer.giva_A["default"].shape[0], layer.in_features)
        delta = lora_b @ lora_a  # out x in, for Linear and Conv1D alike
        expected = layer.delta_weight("default")
        expected = expected.T if isinstance(layer.get_base_layer(), Conv1D) else expected
        assert torch.allclose(delta, expected, atol=1e-6, rtol=0)
        pattern_rank = lora_config.rank_pattern.get(name.removeprefix("base_model.model."), lora_config.r)
        assert pattern_rank == lora_a.shape[0] and lora_config.alpha_pattern.get(name.removeprefix("base_model.model."), lora_config.lora_alpha) == pattern_rank


def test_fused_layer_exports_block_diagonal_factors_with_zero_rows_for_unadapted_blocks():
    model = _random_adapter(tiny_gpt2, **GPT2_FUSED)
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    lora_a, lora_b = lora_factors(layer, "default", rank=12)
    assert lora_a.shape == (12, 32) and lora_b.shape == (96, 12)
    assert not lora_b[32:64].any()  # K block not adapted
    assert not lora_b[:32, 4:].any() and not lora_b[64:, :4].any()  # block-diagonal: Q uses ranks 0-3, V ranks 4-7
    assert not lora_a[8:].any() and not lora_b[:, 8:].any()  # zero padding up to the asked rank
    with pytest.raises(ExportError, match="rank >= 8"):
        lora_factors(layer, "default", rank=4)


def test_export_refuses_merged_adapters_and_too_small_ranks(tmp_path):
    model = _random_adapter(tiny_llama, target_modules=["q_proj", "v_proj"])
    with pytest.raises(ExportError, match="int >= 4"):
        to_lora(model, rank=2)
    model.merge_adapter()
    with pytest.raises(ExportError, match="unmerge_adapter"):
        export_lora(model, tmp_path / "out")
    with pytest.raises(ExportError, match="no GiVA adapter named 'nope'"):
        to_lora(model, adapter_name="nope")


def test_cli_export_errors_are_one_line(tmp_path, capsys):
    assert main(["export-lora", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    assert main(["export-lora", str(tmp_path / "adapter"), str(tmp_path / "out")]) == 2
    assert "not a GiVA one" in capsys.readouterr().err


def test_export_never_overwrites_another_adapter_and_replaces_an_earlier_lora_export(tmp_path, capsys):
    model = _random_adapter(tiny_llama, target_modules=["q_proj", "v_proj"])
    model.save_pretrained(tmp_path / "giva")
    before = {f.name: f.read_bytes() for f in (tmp_path / "giva").iterdir()}
    # The adapter's own folder as the output: refused before the base model is loaded, nothing touched.
    assert main(["export-lora", str(tmp_path / "giva"), str(tmp_path / "giva")]) == 2
    assert "belongs to a 'GIVA' adapter" in capsys.readouterr().err
    with pytest.raises(ExportError, match="belongs to a 'GIVA' adapter"):
        export_lora(model, tmp_path / "giva")
    assert {f.name: f.read_bytes() for f in (tmp_path / "giva").iterdir()} == before
    # An earlier LoRA export is replaced, with no staging folder left behind.
    export_lora(model, tmp_path / "lora", rank=8)
    export_lora(model, tmp_path / "lora")
    assert sorted(f.name for f in (tmp_path / "lora").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["r"] == 4


_CHILD = textwrap.dedent(
    """
    import json, sys
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cases = json.loads(sys.argv[1])
    for case in cases:
        auto = AutoModelForSequenceClassification if case["kind"] == "cls" else AutoModelForCausalLM
        model = PeftModel.from_pretrained(auto.from_pretrained(case["base"]), case["lora"]).eval()
        assert type(model.peft_config["default"]).__name__ == "LoraConfig"
        with torch.no_grad():
            logits = model(input_ids=torch.load(case["ids"])).logits
        torch.save(logits, case["out"])
    assert "giva" not in sys.modules, "the child must not import giva"
    print("child ok")
    """
)


def test_exported_lora_reproduces_giva_outputs_in_a_process_without_giva(tmp_path):
    batches = text_batches(batch=3)
    ids = batches[0]["input_ids"]
    torch.save(ids, tmp_path / "ids.pt")
    cases, expected = [], {}

    # BERT classifier: real bases (initialize), a few training steps, saved, then exported by the CLI.
    tiny_bert().save_pretrained(tmp_path / "bert-base")
    from transformers import AutoModelForSequenceClassification

    bert = AutoModelForSequenceClassification.from_pretrained(tmp_path / "bert-base")
    model = get_peft_model(bert, GivaConfig(r=4, target_modules=["query", "value", "dense"], task_type="SEQ_CLS"))
    giva.initialize(model, batches, progress=False)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for batch in batches[:3]:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    expected["bert"] = _logits(model, ids)
    model.save_pretrained(tmp_path / "bert-giva")
    assert main(["export-lora", str(tmp_path / "bert-giva"), str(tmp_path / "bert-lora")]) == 0
    exported = json.loads((tmp_path / "bert-lora" / "adapter_config.json").read_text())
    assert exported["peft_type"] == "LORA" and exported["r"] == exported["lora_alpha"] == 4
    assert sorted(exported["target_modules"]) == ["dense", "query", "value"] and not exported["rank_pattern"]
    cases.append({"kind": "cls", "base": str(tmp_path / "bert-base"), "lora": str(tmp_path / "bert-lora")})

    # GPT-2: Conv1D and a fused c_attn with Q and V adapted, through giva.export.export_lora.
    tiny_gpt2().save_pretrained(tmp_path / "gpt2-base")
    model = _random_adapter(tiny_gpt2, **GPT2_FUSED)
    expected["gpt2"] = _logits(model, ids)
    config = export_lora(model, tmp_path / "gpt2-lora")
    assert config.r == config.lora_alpha == 8 and config.fan_in_fan_out  # c_attn: 2 blocks x r=4
    cases.append({"kind": "lm", "base": str(tmp_path / "gpt2-base"), "lora": str(tmp_path / "gpt2-lora")})

    # Llama, every linear layer, through PEFT's own save_as_lora.
    tiny_llama().save_pretrained(tmp_path / "llama-base")
    model = _random_adapter(tiny_llama, target_modules="all-linear")
    expected["llama"] = _logits(model, ids)
    peft.save_as_lora(tmp_path / "llama-lora", model, rank=4)
    cases.append({"kind": "lm", "base": str(tmp_path / "llama-base"), "lora": str(tmp_path / "llama-lora")})

    for case, name in zip(cases, ["bert", "gpt2", "llama"]):
        case.update(ids=str(tmp_path / "ids.pt"), out=str(tmp_path / f"{name}-out.pt"))
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(cases)], capture_output=True, text=True, timeout=300
    )
    assert child.returncode == 0, child.stderr[-3000:]
    for name, reference in expected.items():
        got = torch.load(tmp_path / f"{name}-out.pt")
        assert torch.allclose(got, reference, atol=1e-5), (name, (got - reference).abs().max())
    for name, factory in [("bert", tiny_bert), ("gpt2", tiny_gpt2), ("llama", tiny_llama)]:
        assert not torch.allclose(_logits(factory(), ids), expected[name], atol=1e-3)  # the adapters do something
