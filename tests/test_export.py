"""Exact GiVA -> LoRA export: PEFT's convert_to_lora / save_as_lora, giva.export and `giva export-lora`.

The exported folders are loaded by a fresh process that never imports giva (stock PEFT LoRA only) and must
reproduce the GiVA model's outputs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import peft
import pytest
import torch
from peft import PeftModel, get_peft_model
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


def _export_in_memory(model, out, export):
    """The two exports of a model in memory: ``export_lora``, or PEFT's ``save_as_lora`` (rank 4) after ``import giva``."""
    if export == "export_lora":
        export_lora(model, out)
    else:
        peft.save_as_lora(out, model, 4)


def _readme_model(out):
    """The model that the loading snippet of ``out``'s README.md makes, run as a user would paste it."""
    namespace: dict = {}
    exec((out / "README.md").read_text().split("```python\n", 1)[1].split("```", 1)[0], namespace)
    return namespace["model"]


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
    assert sorted(f.name for f in (tmp_path / "lora").iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
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

    # RoBERTa's two-module head, with a second SEQ_CLS adapter whose head differs: `default` is exported.
    tiny_roberta().save_pretrained(tmp_path / "roberta-base")
    model = _random_adapter(tiny_roberta, target_modules=["query", "value"], task_type="SEQ_CLS")
    model.add_adapter("other", GivaConfig(r=2, init_weights=False, target_modules=["query"], task_type="SEQ_CLS"))
    head = model.base_model.model.classifier.modules_to_save
    with torch.no_grad():
        head["default"].out_proj.weight.add_(1.0)
        head["other"].dense.weight.add_(-1.0)
    expected["roberta"] = _logits(model, ids)
    export_lora(model, tmp_path / "roberta-lora")
    cases.append({"kind": "cls", "base": str(tmp_path / "roberta-base"), "lora": str(tmp_path / "roberta-lora")})

    for case, name in zip(cases, ["bert", "gpt2", "llama", "roberta"]):
        case.update(ids=str(tmp_path / "ids.pt"), out=str(tmp_path / f"{name}-out.pt"))
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(cases)], capture_output=True, text=True, timeout=300
    )
    assert child.returncode == 0, child.stderr[-3000:]
    for name, reference in expected.items():
        got = torch.load(tmp_path / f"{name}-out.pt")
        assert torch.allclose(got, reference, atol=1e-5), (name, (got - reference).abs().max())
    for name, factory in [("bert", tiny_bert), ("gpt2", tiny_gpt2), ("llama", tiny_llama), ("roberta", tiny_roberta)]:
        assert not torch.allclose(_logits(factory(), ids), expected[name], atol=1e-3)  # the adapters do something


# ------------------------------------------------------------------ several adapters, heads (issue 24, items 1-2)


def test_an_adapter_on_fewer_layers_than_another_exports_only_its_layers(tmp_path):
    model = _random_adapter(tiny_llama, target_modules=["q_proj", "v_proj"])
    model.add_adapter("b", GivaConfig(r=2, init_weights=False, target_modules=["q_proj"]))
    lora_config, state_dict = to_lora(model, adapter_name="b")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, GivaLayer) and "b" in m.giva_lambda_o}
    assert {k.rsplit(".lora_", 1)[0] for k in state_dict} == set(layers) and all("q_proj" in k for k in state_dict)
    for name, layer in layers.items():
        delta = state_dict[f"{name}.lora_B.weight"] @ state_dict[f"{name}.lora_A.weight"]
        assert torch.allclose(delta, layer.delta_weight("b"), atol=1e-6, rtol=0)
    assert lora_config.r == 2 and lora_config.target_modules == ["q_proj"]
    _, peft_state = peft.convert_to_lora(model, rank=2, adapter_name="b")
    assert peft_state.keys() == state_dict.keys()
    peft.save_as_lora(tmp_path / "b", model, rank=2, adapter_name="b")
    assert (tmp_path / "b" / "adapter_model.safetensors").is_file()
    _, default_state = to_lora(model)  # the larger adapter still covers both projections
    assert sum("v_proj" in k for k in default_state) == 4


def tiny_roberta(seed: int = 0):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(seed)
    config = RobertaConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=70, num_labels=3, pad_token_id=1,
    )
    return RobertaForSequenceClassification(config).eval()


def tiny_llama_classifier(seed: int = 0):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, num_labels=3, pad_token_id=0,
    )
    return LlamaForSequenceClassification(config).eval()


@pytest.mark.parametrize(
    ("factory", "targets"),
    [(tiny_roberta, ["query", "value"]), (tiny_bert, ["query", "value"]), (tiny_llama_classifier, ["q_proj", "v_proj"])],
)
def test_exported_heads_reproduce_each_adapter_through_plain_peft(tmp_path, factory, targets):
    """RoBERTa's two-module head (dense + out_proj), BERT's and Llama's single head; two SEQ_CLS adapters with heads
    of their own: each exported LoRA, loaded by PeftModel.from_pretrained, gives its GiVA adapter's logits."""
    factory().save_pretrained(tmp_path / "base")
    model = _random_adapter(factory, target_modules=targets, task_type="SEQ_CLS")
    model.add_adapter("b", GivaConfig(r=2, init_weights=False, target_modules=targets[:1], task_type="SEQ_CLS"))
    generator = torch.Generator().manual_seed(5)
    for module in model.modules():
        if isinstance(module, peft.utils.other.ModulesToSaveWrapper):
            for head in module.modules_to_save.values():  # each adapter's head differs from the base and the other
                for param in head.parameters():
                    param.data += torch.randn(param.shape, generator=generator)
    ids = text_batches(batch=3)[0]["input_ids"]
    from transformers import AutoModelForSequenceClassification

    for name in ("default", "b"):
        model.set_adapter(name)
        expected = _logits(model, ids)
        export_lora(model, tmp_path / name, adapter_name=name)
        lora = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(tmp_path / "base"), tmp_path / name)
        assert type(lora.peft_config["default"]).__name__ == "LoraConfig"
        got = _logits(lora.eval(), ids)
        assert torch.allclose(got, expected, atol=1e-5), (name, (got - expected).abs().max())
    assert not torch.allclose(_logits(factory(), ids), expected, atol=1e-3)


# ---------------------------------------------------------------------- bad input (issue 24, item 8)


@pytest.mark.parametrize(
    ("rank", "message"),
    [(-1, "int >= 1 or a float"), ("8", "int >= 1 or a float"), (True, "int >= 1 or a float"), (1.5, "float in")],
)
def test_peft_conversion_refuses_bad_ranks_before_work(tmp_path, rank, message):
    model = _random_adapter(tiny_llama, target_modules=["q_proj"])
    with pytest.raises(ValueError, match=message):
        peft.convert_to_lora(model, rank=rank)
    with pytest.raises(ValueError, match=message):
        peft.save_as_lora(tmp_path / "out", model, rank=rank)
    assert not (tmp_path / "out").exists()


def test_peft_conversion_names_a_missing_adapter_and_refuses_files_and_giva_folders(tmp_path):
    model = _random_adapter(tiny_llama, target_modules=["q_proj"])
    with pytest.raises(ExportError, match=r"no GiVA adapter named 'nosuch' \(it holds: default\)"):
        peft.convert_to_lora(model, rank=4, adapter_name="nosuch")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="exists and is not a folder"):
        peft.save_as_lora(tmp_path / "file", model, rank=4)
    model.save_pretrained(tmp_path / "giva")
    before = {f.name: f.read_bytes() for f in (tmp_path / "giva").iterdir()}
    with pytest.raises(ExportError, match="belongs to a 'GIVA' adapter"):
        peft.save_as_lora(tmp_path / "giva", model, rank=4)
    assert {f.name: f.read_bytes() for f in (tmp_path / "giva").iterdir()} == before


def test_an_interrupted_re_export_leaves_the_old_or_the_new_lora_and_the_rerun_cleans_up(tmp_path, monkeypatch):
    model = _random_adapter(tiny_llama, target_modules=["q_proj", "v_proj"])
    out = tmp_path / "lora"
    export_lora(model, out, rank=8)
    (out / ".giva-export-abc123").mkdir()  # what an export of an older giva, killed mid-way, left
    (out / ".giva-export-abc123" / "adapter_model.safetensors").write_text("partial")
    real_replace, real_rename, calls = os.replace, os.rename, []

    def interrupted(src, dst, *args, **kwargs):
        calls.append(dst)
        if len(calls) == 2:  # between the two file moves of a non-atomic export
            raise KeyboardInterrupt
        return (real_replace if kind == "replace" else real_rename)(src, dst)

    for kind in ("replace", "rename"):
        calls.clear()
        monkeypatch.setattr(os, kind, interrupted)
        try:
            export_lora(model, out, rank=16)
        except KeyboardInterrupt:
            pass
        monkeypatch.setattr(os, kind, real_replace if kind == "replace" else real_rename)
        config = json.loads((out / "adapter_config.json").read_text())
        from safetensors.torch import load_file

        ranks = {v.shape[0] for k, v in load_file(out / "adapter_model.safetensors").items() if k.endswith("lora_A.weight")}
        assert ranks == {config["r"]}, (kind, ranks, config["r"])  # weights and config of the same export
    export_lora(model, out, rank=16)
    assert sorted(f.name for f in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".lora.giva-")] == []


@pytest.fixture
def saved_classifier(tmp_path):
    """A saved GiVA classifier as `giva finetune` leaves it (adapter, tokenizer files, labels.json) and its base."""
    tiny_bert().save_pretrained(tmp_path / "base")
    model = _random_adapter(tiny_bert, target_modules=["query", "value"], task_type="SEQ_CLS")
    model.save_pretrained(tmp_path / "giva")
    (tmp_path / "giva" / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    (tmp_path / "giva" / "vocab.txt").write_text("\n".join(f"t{i}" for i in range(100)))
    labels = {"id2label": {"0": "neg", "1": "pos"}, "label2id": {"neg": 0, "pos": 1}}
    (tmp_path / "giva" / "labels.json").write_text(json.dumps(labels))
    return model, tmp_path


def test_export_lora_cli_carries_tokenizer_labels_and_a_loading_snippet(saved_classifier):
    model, root = saved_classifier
    assert main(["export-lora", str(root / "giva"), str(root / "lora"), "--base-model", str(root / "base")]) == 0
    out = root / "lora"
    assert {"tokenizer_config.json", "vocab.txt", "labels.json", "README.md"} <= {p.name for p in out.iterdir()}
    assert (out / "labels.json").read_text() == (root / "giva" / "labels.json").read_text()
    readme = (out / "README.md").read_text()
    assert f"PeftModel.from_pretrained(base, {str(out)!r})" in readme and "AutoTokenizer.from_pretrained" in readme
    assert (out / "vocab.txt").read_bytes() == (root / "giva" / "vocab.txt").read_bytes()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0].replace("'<the base model>'", repr(str(root / "base")))
    code = "\n".join(line for line in code.splitlines() if "AutoTokenizer.from_pretrained" not in line)  # a stand-in tokenizer
    namespace: dict = {}
    exec(code, namespace)  # the snippet, as a user would paste it, with this test's base model folder
    lora = namespace["model"]
    assert lora.config.id2label == {0: "neg", 1: "pos"}
    ids = text_batches(batch=3)[0]["input_ids"]
    assert torch.allclose(_logits(lora, ids), _logits(model, ids), atol=1e-5)


def test_giva_merge_of_a_classifier_keeps_its_head_and_class_names(saved_classifier, monkeypatch, capsys):
    """The merged classifier is a plain BERT classifier: the trained head (modules_to_save), the class names of
    labels.json in its config, the adapter's tokenizer files, and the GiVA model's logits (1e-5). A broken adapter
    (a NaN vector) is one line before the base model loads, and nothing is written."""
    from transformers import AutoModelForSequenceClassification

    from giva.merge import merge_dir

    model, root = saved_classifier
    with torch.no_grad():  # a stronger adapter than the fixture's, so that its outputs differ plainly
        for name, parameter in model.named_parameters():
            if "giva_lambda_o" in name:
                parameter.mul_(100)
    model.save_pretrained(root / "giva")
    ids = text_batches(batch=3)[0]["input_ids"]
    base = AutoModelForSequenceClassification.from_pretrained(root / "base")
    expected = _logits(PeftModel.from_pretrained(base, str(root / "giva")).eval(), ids)
    record = merge_dir(root / "giva", root / "merged", base_model=str(root / "base"))
    assert record["model_class"] == "BertForSequenceClassification" and record["tokenizer"] == "adapter"
    merged = AutoModelForSequenceClassification.from_pretrained(root / "merged").eval()
    assert merged.config.id2label == {0: "neg", 1: "pos"} and (root / "merged" / "vocab.txt").is_file()
    assert not (root / "merged" / "labels.json").exists()
    torch.testing.assert_close(_logits(merged, ids), expected, rtol=0, atol=1e-5)
    assert not torch.allclose(_logits(tiny_bert(), ids), expected, atol=1e-3)  # the adapter does something

    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "giva_lambda_o" in n).fill_(float("nan"))
    model.save_pretrained(root / "giva")
    capsys.readouterr()
    assert main(["merge", str(root / "giva"), str(root / "nan"), "--base-model", str(root / "base")]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"giva merge: {root / 'giva' / 'adapter_model.safetensors'}: ") and "holds NaN or inf" in line
    assert not (root / "nan").exists()


def test_giva_merge_of_a_tied_output_layer_gives_it_its_own_merged_weight(tmp_path, caplog):
    """GPT-2's lm_head is tied to its input embeddings. Merging an adapter on it changed both (PEFT only warns), so
    the merged model exited 0 with outputs unlike the adapter's. The merged model has its own lm_head, untied in its
    config, the embeddings of the base, and the adapter's logits."""
    from transformers import AutoModelForCausalLM

    tiny_gpt2().save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    assert base.lm_head.weight is base.transformer.wte.weight
    model = _random_adapter(lambda: base, target_modules=["c_attn", "lm_head"])
    model.save_pretrained(tmp_path / "giva")
    ids = text_batches(batch=3)[0]["input_ids"]
    expected = _logits(model, ids)
    with caplog.at_level("WARNING", logger="giva.merge"):
        assert main(["merge", str(tmp_path / "giva"), str(tmp_path / "merged")]) == 0
    assert "giva merge: lm_head was tied to the input embeddings" in caplog.text
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not merged.config.tie_word_embeddings and merged.lm_head.weight is not merged.transformer.wte.weight
    assert torch.equal(merged.transformer.wte.weight, tiny_gpt2().transformer.wte.weight)
    torch.testing.assert_close(_logits(merged, ids), expected, rtol=0, atol=1e-5)
    record = json.loads((tmp_path / "merged" / "giva_merge.json").read_text())
    assert record["untied"] == ["lm_head"]


def test_giva_merge_refuses_a_layer_tied_to_anything_but_the_input_embeddings():
    """A tie merge cannot undo in the saved model (two adapted projections sharing one weight) is refused."""
    from giva.merge import _untie_adapted_weights

    llama = tiny_llama()
    layers = llama.model.layers
    layers[1].self_attn.q_proj.weight = layers[0].self_attn.q_proj.weight
    model = get_peft_model(llama, GivaConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ExportError, match=r"the adapted layer 'model.layers.0.self_attn.q_proj' shares its weight with "
                                          r"'model.layers.1.self_attn.q_proj.base_layer.weight'; merging would change both"):
        _untie_adapted_weights(model, "adapter")
    assert _untie_adapted_weights(get_peft_model(tiny_llama(), GivaConfig(r=2, target_modules=["q_proj"])), "a") == []


def test_giva_merge_refuses_finite_vectors_whose_merged_weight_overflows(saved_classifier, capsys):
    """Vectors that are finite but whose delta overflows float32 pass the file's NaN/inf check; PEFT's
    ``safe_merge`` then refuses the merged weight: one line naming the adapter and the layer, nothing written."""
    model, root = saved_classifier
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "giva_lambda" in name:  # lambda_o and lambda_s: entries near 1e38 x 1e6 x B x A
                parameter.fill_(3e38 if "giva_lambda_o" in name else 1e6)
    model.save_pretrained(root / "giva")
    capsys.readouterr()
    assert main(["merge", str(root / "giva"), str(root / "inf"), "--base-model", str(root / "base")]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"giva merge: merging {root / 'giva'} into {str(root / 'base')!r} failed: NaNs detected in "
                           "the merged weights of layer "), line
    assert not (root / "inf").exists() and not list(root.glob(".giva-*")) and not list(root.glob("*.tmp*"))


def test_giva_merge_refuses_a_base_saved_quantised_before_loading_it(tmp_path, capsys, monkeypatch):
    """A `*-bnb-4bit` folder (config.json with quantization_config) loaded quantised, merged, and then failed to cast
    ("You cannot cast a bitsandbytes model"), reported as a failed merge, for every --dtype."""
    base = tmp_path / "base-bnb-4bit"
    tiny_llama().save_pretrained(base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (base / "config.json").write_text(json.dumps(config))
    _random_adapter(tiny_llama, target_modules=["q_proj"]).save_pretrained(tmp_path / "giva")
    monkeypatch.setattr("giva.export.BasePlan.load", lambda *a, **k: pytest.fail("the base model was loaded"))
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "giva"), str(tmp_path / "merged"), "--base-model", str(base)]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == (f"giva merge: the base model {str(base)!r} is saved quantised (bitsandbytes; config.json's "
                    "quantization_config): giva merge writes a plain model, so merge into the unquantised model it was "
                    "quantised from (--base-model FOLDER), as QLoRA adapters are merged"), line
    assert not (tmp_path / "merged").exists()


def test_re_exporting_into_a_lora_folder_drops_the_earlier_exports_labels_and_tokenizer(saved_classifier):
    """A new export replaces an earlier one's side files: a labels.json or tokenizer left from another adapter would
    describe the wrong model. Files no export writes (a user's notes) are kept."""
    _, root = saved_classifier
    out = root / "lora"
    assert main(["export-lora", str(root / "giva"), str(out), "--base-model", str(root / "base")]) == 0
    (out / "NOTES.md").write_text("mine")
    (out / "tokenizers").symlink_to(root / "giva", target_is_directory=True)  # a user's link: a folder, not a side file
    other = _random_adapter(tiny_bert, target_modules=["query"], task_type="SEQ_CLS")
    export_lora(other, out)
    assert sorted(p.name for p in out.iterdir()) == ["NOTES.md", "README.md", "adapter_config.json",
                                                     "adapter_model.safetensors", "tokenizers"]
    assert (out / "tokenizers").is_symlink()
    ids = text_batches(batch=3)[0]["input_ids"]
    lora = PeftModel.from_pretrained(tiny_bert(), str(out))
    assert torch.allclose(_logits(lora, ids), _logits(other, ids), atol=1e-5)


def test_export_refuses_a_non_empty_folder_that_holds_no_adapter(saved_classifier, capsys):
    """A folder of the user's files was accepted by giva export-lora, export_lora and peft.save_as_lora, and its
    README.md replaced by the export's; an empty folder, or one holding only an older giva's staging folder, is fine."""
    model, root = saved_classifier
    notes = root / "notes"
    notes.mkdir()
    (notes / "README.md").write_text("my notes")
    assert main(["export-lora", str(root / "giva"), str(notes), "--base-model", str(root / "base")]) == 2
    assert f"output folder {notes} is not empty and holds no adapter" in capsys.readouterr().err
    with pytest.raises(ExportError, match="is not empty and holds no adapter"):
        export_lora(model, notes)
    with pytest.raises(ExportError, match="is not empty and holds no adapter"):
        peft.save_as_lora(notes, model, rank=4)
    assert [(p.name, p.read_text()) for p in notes.iterdir()] == [("README.md", "my notes")]
    (root / "staged" / ".giva-export-abc123").mkdir(parents=True)
    export_lora(model, root / "staged")
    assert sorted(p.name for p in (root / "staged").iterdir()) == ["README.md", "adapter_config.json",
                                                                    "adapter_model.safetensors"]
    (root / "kept").mkdir()  # hidden entries are a checkout's or a file browser's, not files the export would replace
    for hidden in (".gitkeep", ".DS_Store"):
        (root / "kept" / hidden).write_text("")
    export_lora(model, root / "kept")
    assert {".gitkeep", ".DS_Store", "adapter_config.json"} <= {p.name for p in (root / "kept").iterdir()}


def _refuse_loading(monkeypatch):
    from transformers import AutoModelForSequenceClassification

    def loaded(*args, **kwargs):
        raise AssertionError("the base model's weights were loaded before the error")

    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", loaded)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rank", "0"], "rank must be an int >= 4 .* got 0"),
        (["--rank", "-1"], "rank must be an int >= 4 .* got -1"),
        (["--rank", "2"], "rank must be an int >= 4 .* got 2"),
        (["--base-model", "{root}/small"], "base model .*small' does not match the adapter: layer 'bert.encoder.layer.0.attention.self.query' is 48 -> 48"),
    ],
    ids=["rank-0", "rank-negative", "rank-below", "other-base"],
)
def test_export_lora_cli_refuses_bad_options_before_the_model_loads(saved_classifier, monkeypatch, capsys, args, message):
    _, root = saved_classifier
    from transformers import BertConfig, BertForSequenceClassification

    BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=64, max_position_embeddings=64)).save_pretrained(root / "small")
    _refuse_loading(monkeypatch)
    capsys.readouterr()
    args = [a.format(root=root) for a in args]
    base = [] if "--base-model" in args else ["--base-model", str(root / "base")]
    assert main(["export-lora", str(root / "giva"), str(root / "lora"), *base, *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("giva export-lora: "), err
    assert pytest.importorskip("re").search(message, err), err
    assert not (root / "lora").exists()


def test_export_lora_cli_refuses_unusable_outputs_and_unreadable_weights_before_the_model_loads(saved_classifier, monkeypatch, capsys):
    _, root = saved_classifier
    _refuse_loading(monkeypatch)
    base = ["--base-model", str(root / "base")]
    (root / "file").write_text("x")
    assert main(["export-lora", str(root / "giva"), str(root / "file"), *base]) == 2
    assert "output " + str(root / "file") + " exists and is not a folder" in capsys.readouterr().err
    (root / "readonly").mkdir()
    (root / "readonly").chmod(0o555)
    try:
        assert main(["export-lora", str(root / "giva"), str(root / "readonly"), *base]) == 2
        assert f"output folder {root / 'readonly'} is read-only" in capsys.readouterr().err
    finally:
        (root / "readonly").chmod(0o755)
    config = json.loads((root / "giva" / "adapter_config.json").read_text())
    del config["weights_sha256"]  # a folder of an older giva: nothing to check the file against
    (root / "giva" / "adapter_config.json").write_text(json.dumps(config))
    data = (root / "giva" / "adapter_model.safetensors").read_bytes()
    for content in (b"", data[: len(data) // 2]):
        (root / "giva" / "adapter_model.safetensors").write_bytes(content)
        assert main(["export-lora", str(root / "giva"), str(root / "lora"), *base]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "adapter_model.safetensors cannot be read" in err and "truncated" in err, err
    assert not (root / "lora").exists()


# ------------------------------------------------- the base model's class, embedding layers, options LoRA lacks


def tiny_bert_tagger(seed: int = 0):
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        max_position_embeddings=64, num_labels=3)
    return BertForTokenClassification(config).eval()


@pytest.mark.parametrize(
    ("factory", "task_type", "targets", "loaded_as"),
    [(tiny_llama, None, ["q_proj", "v_proj"], "LlamaForCausalLM"),
     (tiny_bert_tagger, "TOKEN_CLS", ["query", "value"], "AutoModelForTokenClassification")],
    ids=["llama-without-task-type", "bert-token-cls"],
)
def test_export_lora_cli_loads_the_base_model_class_the_adapter_was_trained_on(tmp_path, factory, task_type, targets, loaded_as):
    """`giva export-lora` loaded the base model of every task_type but SEQ_CLS / CAUSAL_LM, task_type=None among them
    (`get_peft_model(model, GivaConfig(...))`), as a headless AutoModel and said the base model does not match."""
    factory().save_pretrained(tmp_path / "base")
    base_class = type(factory())
    torch.manual_seed(1)
    config = GivaConfig(r=4, init_weights=False, target_modules=targets, task_type=task_type)
    model = get_peft_model(base_class.from_pretrained(tmp_path / "base"), config).eval()
    for module in model.modules():
        if isinstance(module, peft.utils.other.ModulesToSaveWrapper):  # a trained head (TOKEN_CLS' classifier)
            for param in module.modules_to_save["default"].parameters():
                param.data += 0.5
    ids = text_batches(batch=3)[0]["input_ids"]
    expected = _logits(model, ids)
    model.save_pretrained(tmp_path / "giva")
    assert main(["export-lora", str(tmp_path / "giva"), str(tmp_path / "lora")]) == 0
    lora = PeftModel.from_pretrained(base_class.from_pretrained(tmp_path / "base"), tmp_path / "lora").eval()
    assert type(lora.peft_config["default"]).__name__ == "LoraConfig"
    torch.testing.assert_close(_logits(lora, ids), expected, atol=1e-5, rtol=0)
    assert f"from transformers import {loaded_as}" in (tmp_path / "lora" / "README.md").read_text()
    if task_type is None:  # the export records the class as PEFT's own save does, so AutoPeftModel finds it
        auto = peft.AutoPeftModel.from_pretrained(str(tmp_path / "lora")).eval()
        torch.testing.assert_close(_logits(auto, ids), expected, atol=1e-5, rtol=0)
    assert not torch.allclose(_logits(factory(), ids), expected, atol=1e-3)


def test_export_lora_cli_carries_saved_embedding_layers_and_refuses_a_resized_vocabulary(tmp_path, monkeypatch, capsys):
    """A folder saved with the embedding layers (save_embedding_layers=True) exports with them, as PEFT's LoRA saves
    them; one saved after resize_token_embeddings is refused before the model loads: the LoRA cannot resize the
    base model's vocabulary again."""
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel

    tiny_gpt2().save_pretrained(tmp_path / "gpt2")
    model = get_peft_model(GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2"),
                           GivaConfig(r=4, init_weights=False, target_modules=["c_attn"], task_type="CAUSAL_LM")).eval()
    ids = text_batches(batch=3)[0]["input_ids"]
    expected = _logits(model, ids)
    model.save_pretrained(tmp_path / "giva", save_embedding_layers=True)
    assert main(["export-lora", str(tmp_path / "giva"), str(tmp_path / "lora")]) == 0
    from safetensors.torch import load_file

    assert "base_model.model.transformer.wte.weight" in load_file(tmp_path / "lora" / "adapter_model.safetensors")
    lora = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2"), tmp_path / "lora").eval()
    torch.testing.assert_close(_logits(lora, ids), expected, atol=1e-5, rtol=0)

    tiny_llama().save_pretrained(tmp_path / "llama")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "llama")
    base.resize_token_embeddings(110)
    resized = get_peft_model(base, GivaConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    resized.save_pretrained(tmp_path / "resized")  # PEFT adds the embeddings itself ("auto")
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", _refuse)
    capsys.readouterr()
    assert main(["export-lora", str(tmp_path / "resized"), str(tmp_path / "lora2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the vocabulary was resized" in err, err
    assert re.search(r"embedding layer '(lm_head|model.embed_tokens).weight' of shape \(110, 32\), but base model .* has "
                     r"\(100, 32\)", err), err
    assert not (tmp_path / "lora2").exists()



def test_an_adapter_targeting_lm_head_exports_only_lora_tensors_and_the_embedding_itself(tmp_path):
    """PEFT saves a targeted lm_head's own weight (``lm_head.base_layer.weight``) beside GiVA's tensors of that layer;
    the export carried every ``lm_head.*`` key as "the embedding layer", GiVA's ``giva_A`` / ``giva_lambda_*`` /
    ``giva_seeded_crc32`` included, into the stock LoRA file."""
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    base = tiny_llama()
    base.config.tie_word_embeddings = False
    base.save_pretrained(tmp_path / "base")
    torch.manual_seed(1)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(tmp_path / "base"), GivaConfig(
        r=4, init_weights=False, target_modules=["q_proj", "lm_head"], task_type="CAUSAL_LM")).eval()
    ids = text_batches(batch=2)[0]["input_ids"]
    expected = _logits(model, ids)
    model.save_pretrained(tmp_path / "giva")
    assert "base_model.model.lm_head.giva_lambda_o" in load_file(tmp_path / "giva" / "adapter_model.safetensors")
    assert main(["export-lora", str(tmp_path / "giva"), str(tmp_path / "lora")]) == 0
    keys = set(load_file(tmp_path / "lora" / "adapter_model.safetensors"))
    assert not [key for key in keys if "giva_" in key], sorted(keys)
    assert {key for key in keys if "lm_head" in key} == {
        f"base_model.model.lm_head.{name}" for name in ("base_layer.weight", "lora_A.weight", "lora_B.weight")}
    lora = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "lora").eval()
    torch.testing.assert_close(_logits(lora, ids), expected, atol=1e-5, rtol=0)
    assert not torch.allclose(_logits(LlamaForCausalLM.from_pretrained(tmp_path / "base"), ids), expected, atol=1e-3)


def test_an_in_memory_export_of_a_resized_vocabulary_is_refused_as_the_cli_refuses_it(tmp_path):
    """export_lora / peft.save_as_lora of a model after resize_token_embeddings wrote a LoRA with no embedding layer
    and no warning (its logits differ from the model's on the base model), while `giva export-lora` of its folder
    refuses it; both now refuse with the CLI's message before any work, writing nothing."""
    from transformers import AutoModelForCausalLM

    tiny_llama().save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    base.resize_token_embeddings(110)
    model = get_peft_model(base, GivaConfig(r=4, init_weights=False, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    message = (r"^the adapter holds the embedding layer '(lm_head|model.embed_tokens).weight' of shape \(110, 32\), but "
               rf"base model '{re.escape(str(tmp_path / 'base'))}' has \(100, 32\): the vocabulary was resized "
               r"\(resize_token_embeddings\) for training, which a LoRA export cannot carry; serve the GiVA adapter itself$")
    for export in (lambda: export_lora(model, tmp_path / "lora"), lambda: peft.save_as_lora(tmp_path / "lora", model, 4)):
        with pytest.raises(ExportError, match=message):
            export()
        assert not (tmp_path / "lora").exists() and sorted(os.listdir(tmp_path)) == ["base"]
    unresized = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), GivaConfig(
        r=4, init_weights=False, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    export_lora(unresized, tmp_path / "lora")  # the same base, not resized: exported
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()

@pytest.mark.parametrize("base", ["hub-id", "folder-without-config"])
def test_an_export_whose_base_model_cannot_be_found_is_refused_before_writing(tmp_path, monkeypatch, capsys, base):
    """A model with a resized vocabulary and an lm_head in modules_to_save, whose base model (base_model_name_or_path)
    is a hub id not in the cache or a folder without config.json: export_lora / peft.save_as_lora compared nothing and
    wrote a LoRA whose (110, 32) lm_head does not load onto that base; for a folder without config.json transformers
    builds a default LlamaConfig, so even an unresized model was refused as "resized" to (32000, 4096). Both now refuse
    naming the base model, and `giva export-lora` of the saved folder refuses it in one line; nothing is written."""
    from transformers import AutoModelForCausalLM

    tiny_llama().save_pretrained(tmp_path / "base")
    name = "giva-tests/no-such-model" if base == "hub-id" else str(tmp_path / "weights-only")
    if base == "folder-without-config":
        (tmp_path / "weights-only").mkdir()
        (tmp_path / "weights-only" / "model.safetensors").write_bytes((tmp_path / "base" / "model.safetensors").read_bytes())
    message = (rf"^base model '{re.escape(name)}' of GiVA adapter 'default' \(its base_model_name_or_path\) is neither a "
               r"local folder with config.json nor in the Hugging Face cache, so the export cannot check")
    for resize in (110, None):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
        if resize:
            model.resize_token_embeddings(resize)
        model = get_peft_model(model, GivaConfig(r=4, init_weights=False, target_modules=["q_proj"],
                                                 modules_to_save=["lm_head"], task_type="CAUSAL_LM"))
        model.peft_config["default"].base_model_name_or_path = name
        model.config.name_or_path = name  # loaded from there too (else the folder it was loaded from is compared)
        for export in (lambda: export_lora(model, tmp_path / "lora"), lambda: peft.save_as_lora(tmp_path / "lora", model, 4)):
            with pytest.raises(ExportError, match=message):
                export()
            assert not (tmp_path / "lora").exists()
    model.save_pretrained(tmp_path / "giva")
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", _refuse)
    capsys.readouterr()
    assert main(["export-lora", str(tmp_path / "giva"), str(tmp_path / "lora")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"base model {name!r} " in err, err
    assert not (tmp_path / "lora").exists()


def no_network(*args, **kwargs):
    raise AssertionError(f"a network lookup or connection {args!r}: the test runs offline")


def test_an_in_memory_export_finds_the_base_model_the_model_was_loaded_from_or_named_by_its_name_or_path(
        tmp_path, monkeypatch):
    """export_lora / peft.save_as_lora refused every model whose adapter's base_model_name_or_path was not found
    locally: one loaded from a local folder and named by the hub id it is published under, and one loaded with
    cache_dir= (whose hub id is not in the default cache), with a remedy that made the export record a local path.
    The folder the model was loaded from is now compared, and the remedy, the model's name_or_path, which only the
    check reads, works; the exports name the hub id, and a resized vocabulary is still refused."""
    from huggingface_hub import constants
    from transformers import AutoModelForCausalLM

    # Offline as huggingface_hub reads it: it takes HF_HUB_OFFLINE once, at import, so the variable alone left every
    # from_pretrained of the hub id to try the network first (94 s of timeouts here). A connection now fails the test.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr("transformers.utils.hub._is_offline_mode", True, raising=False)  # transformers 4.x's copy
    monkeypatch.setattr("socket.getaddrinfo", no_network)
    monkeypatch.setattr("socket.socket.connect", no_network)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--giva-tests--tiny"  # a hub cache where the user keeps it (cache_dir=)
    tiny_llama().save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    tiny_llama().save_pretrained(tmp_path / "base")
    resized = ("^the adapter holds the embedding layer '(lm_head|model.embed_tokens).weight' of shape \\(110, 32\\), but "
               "base model '{}' has \\(100, 32\\): the vocabulary was resized")
    for how in ("renamed", "cache-dir"):
        for resize in (None, 110):
            if how == "renamed":
                model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
            else:
                model = AutoModelForCausalLM.from_pretrained("giva-tests/tiny", cache_dir=str(tmp_path / "cache"))
            if resize:
                model.resize_token_embeddings(resize)
            model = get_peft_model(model, GivaConfig(r=4, init_weights=False, target_modules=["q_proj"], task_type="CAUSAL_LM"))
            model.peft_config["default"].base_model_name_or_path = "giva-tests/tiny"
            if how == "cache-dir":
                with pytest.raises(ExportError, match=r"set model.config.name_or_path to the local folder holding the "
                                                      r"base model's config.json \(for a model loaded with cache_dir="):
                    export_lora(model, tmp_path / "lora")
                model.config.name_or_path = str(repo / "snapshots" / commit)  # the remedy the message names
            compared = str(tmp_path / "base") if how == "renamed" else model.config.name_or_path
            for export in (lambda: export_lora(model, tmp_path / "lora"), lambda: peft.save_as_lora(tmp_path / "lora", model, 4)):
                if resize:
                    with pytest.raises(ExportError, match=resized.format(re.escape(compared))):
                        export()
                    assert not (tmp_path / "lora").exists()
                else:
                    export()
                    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
                    assert config["base_model_name_or_path"] == "giva-tests/tiny"
                    assert "from_pretrained('giva-tests/tiny')" in (tmp_path / "lora" / "README.md").read_text()
                    shutil.rmtree(tmp_path / "lora")


@pytest.mark.parametrize("export", ["export_lora", "save_as_lora"])
def test_an_in_memory_export_of_a_classifier_with_other_classes_than_its_base_checkpoint_writes_a_readme_that_loads_it(
        tmp_path, export):
    """A 2-class BERT classifier fine-tuned to 3 classes (giva finetune's load_classifier, ignore_mismatched_sizes),
    exported from memory: the README's snippet loaded the base with its 2-class head and PEFT's size mismatch
    followed; it now passes num_labels=3 and ignore_mismatched_sizes=True, as `giva export-lora` writes it, and
    reproduces the logits."""
    from giva.finetune import load_classifier

    tiny_bert().save_pretrained(tmp_path / "base")
    torch.manual_seed(1)
    model = get_peft_model(load_classifier(str(tmp_path / "base"), num_labels=3),
                           GivaConfig(r=4, init_weights=False, target_modules=["query", "value"], task_type="SEQ_CLS")).eval()
    ids = text_batches(batch=3)[0]["input_ids"]
    expected = _logits(model, ids)
    _export_in_memory(model, tmp_path / "lora", export)
    assert "num_labels=3, ignore_mismatched_sizes=True" in (tmp_path / "lora" / "README.md").read_text()
    assert expected.shape[-1] == 3
    torch.testing.assert_close(_logits(_readme_model(tmp_path / "lora"), ids), expected, atol=1e-5, rtol=0)
    unchanged = get_peft_model(load_classifier(str(tmp_path / "base"), num_labels=2), GivaConfig(
        r=4, init_weights=False, target_modules=["query", "value"], task_type="SEQ_CLS"))
    export_lora(unchanged, tmp_path / "lora")  # the base checkpoint's class count: no class count named
    assert "from_pretrained(" + repr(str(tmp_path / "base")) + ")" in (tmp_path / "lora" / "README.md").read_text()


@pytest.mark.parametrize("export", ["export_lora", "save_as_lora"])
def test_an_in_memory_export_of_a_classifier_with_class_names_writes_a_readme_that_loads_them(tmp_path, export):
    """A classifier whose config names its classes (as giva finetune sets them), exported from memory: the README's
    snippet loaded the base with the base checkpoint's LABEL_0 / LABEL_1, so the loaded model predicted other label
    names than the original; the export now writes labels.json and the snippet passes it, as `giva export-lora` does."""
    from transformers import AutoModelForSequenceClassification

    tiny_bert().save_pretrained(tmp_path / "base")  # transformers' default names, LABEL_0 and LABEL_1
    base = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")
    base.config.id2label, base.config.label2id = {0: "neg", 1: "pos"}, {"neg": 0, "pos": 1}
    torch.manual_seed(1)
    model = get_peft_model(base, GivaConfig(r=4, init_weights=False, target_modules=["query", "value"],
                                            task_type="SEQ_CLS")).eval()
    ids = text_batches(batch=3)[0]["input_ids"]
    expected = _logits(model, ids)
    _export_in_memory(model, tmp_path / "lora", export)
    loaded = _readme_model(tmp_path / "lora")
    assert (loaded.config.id2label, loaded.config.label2id) == ({0: "neg", 1: "pos"}, {"neg": 0, "pos": 1})
    torch.testing.assert_close(_logits(loaded, ids), expected, atol=1e-5, rtol=0)
    unnamed = get_peft_model(AutoModelForSequenceClassification.from_pretrained(tmp_path / "base"), GivaConfig(
        r=4, init_weights=False, target_modules=["query", "value"], task_type="SEQ_CLS"))
    export_lora(unnamed, tmp_path / "lora")  # LABEL_0 / LABEL_1: no labels.json (the earlier export's is dropped)
    assert sorted(p.name for p in (tmp_path / "lora").iterdir()) == ["README.md", "adapter_config.json",
                                                                     "adapter_model.safetensors"]


@pytest.mark.parametrize("num_labels", [3, 40])
def test_export_lora_cli_builds_the_model_with_the_heads_class_count(tmp_path, num_labels):
    """A SEQ_CLS adapter saved without labels.json on a headless base whose config says 2 labels: the export read the class
    count off the head as its smallest matrix, the hidden size 32 of RoBERTa's classifier.dense once there are more
    classes than that, and the base model failed to load after every check had passed (size mismatch traceback)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    body = tiny_roberta().roberta  # a headless checkpoint, as roberta-base is: the head is made for the task
    body.config.num_labels = 2
    body.save_pretrained(tmp_path / "base")
    assert AutoConfig.from_pretrained(tmp_path / "base").num_labels == 2
    torch.manual_seed(1)
    model = get_peft_model(
        AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=num_labels),
        GivaConfig(r=4, init_weights=False, target_modules=["query", "value"], task_type="SEQ_CLS")).eval()
    ids = text_batches(batch=3)[0]["input_ids"]
    expected = _logits(model, ids)
    model.save_pretrained(tmp_path / "giva")
    assert main(["export-lora", str(tmp_path / "giva"), str(tmp_path / "lora")]) == 0
    lora = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=num_labels), tmp_path / "lora")
    assert expected.shape[-1] == num_labels
    torch.testing.assert_close(_logits(lora.eval(), ids), expected, atol=1e-5, rtol=0)
    namespace: dict = {}
    exec((tmp_path / "lora" / "README.md").read_text().split("```python\n", 1)[1].split("```", 1)[0], namespace)
    torch.testing.assert_close(_logits(namespace["model"], ids), expected, atol=1e-5, rtol=0)  # it named no class count


@pytest.mark.parametrize("with_labels", [False, True], ids=["no-labels-json", "labels-json"])
def test_an_adapter_whose_head_has_other_classes_than_the_base_checkpoints_exports_and_its_readme_loads_it(
        tmp_path, with_labels):
    """A 2-class BERT classifier fine-tuned to 3 classes, as `giva finetune` loads it (a new head, load_classifier's
    ignore_mismatched_sizes): the export loaded the base with 3 classes and no ignore_mismatched_sizes, and transformers
    raised its size-mismatch RuntimeError after every check had passed; the README's snippet would fail the same way."""
    from giva.finetune import load_classifier

    tiny_bert().save_pretrained(tmp_path / "base")  # a 2-class head in the base checkpoint
    torch.manual_seed(1)
    model = get_peft_model(load_classifier(str(tmp_path / "base"), num_labels=3),
                           GivaConfig(r=4, init_weights=False, target_modules=["query", "value"], task_type="SEQ_CLS")).eval()
    ids = text_batches(batch=3)[0]["input_ids"]
    expected = _logits(model, ids)
    model.save_pretrained(tmp_path / "giva")
    if with_labels:
        labels = {"id2label": {"0": "a", "1": "b", "2": "c"}, "label2id": {"a": 0, "b": 1, "c": 2}}
        (tmp_path / "giva" / "labels.json").write_text(json.dumps(labels))
    assert main(["export-lora", str(tmp_path / "giva"), str(tmp_path / "lora")]) == 0
    readme = (tmp_path / "lora" / "README.md").read_text()
    assert "ignore_mismatched_sizes=True" in readme and ("num_labels=3" in readme) != with_labels
    namespace: dict = {}
    exec(readme.split("```python\n", 1)[1].split("```", 1)[0], namespace)  # the snippet, as a user would paste it
    lora = namespace["model"]
    assert lora.config.num_labels == 3 and (lora.config.id2label == {0: "a", 1: "b", 2: "c"}) == with_labels
    assert expected.shape[-1] == 3
    torch.testing.assert_close(_logits(lora, ids), expected, atol=1e-5, rtol=0)



def _refuse(*args, **kwargs):
    raise AssertionError("the base model's weights were loaded before the error")


@pytest.mark.parametrize(("head", "listed"), [(2, 3), (40, 2)], ids=["bert-2-listed-3", "headless-roberta-40-listed-2"])
def test_a_labels_json_that_disagrees_with_the_saved_head_is_refused_before_the_model_loads(
        tmp_path, monkeypatch, capsys, head, listed):
    """labels.json (written by `giva finetune`) naming another class count than the saved head: the model was built
    with labels.json's count and failed after loading, with transformers' size-mismatch traceback (a base checkpoint
    with a head) or PEFT's (a headless base, when the adapter's head was loaded)."""
    from transformers import AutoModelForSequenceClassification

    from giva.export import export_lora_dir

    if head == 2:
        tiny_bert().save_pretrained(tmp_path / "base")  # a 2-class head in the base checkpoint too
        torch.manual_seed(1)
        classifier = tiny_bert()
    else:
        tiny_roberta().roberta.save_pretrained(tmp_path / "base")  # headless: the head is made for the task
        classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=head)
    model = get_peft_model(classifier, GivaConfig(r=4, init_weights=False, target_modules=["query", "value"],
                                                  task_type="SEQ_CLS"))
    assert model.config.num_labels == head
    model.save_pretrained(tmp_path / "giva")
    labels = {"id2label": {str(i): f"c{i}" for i in range(listed)}, "label2id": {f"c{i}": i for i in range(listed)}}
    (tmp_path / "giva" / "labels.json").write_text(json.dumps(labels))
    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", _refuse)
    message = (f"{tmp_path / 'giva' / 'labels.json'} names {listed} classes, but the adapter's saved classification "
               f"head has {head}; fix or remove labels.json")
    capsys.readouterr()
    assert main(["export-lora", str(tmp_path / "giva"), str(tmp_path / "lora"), "--base-model", str(tmp_path / "base")]) == 2
    assert capsys.readouterr().err == f"giva export-lora: {message}\n"
    with pytest.raises(ExportError) as error:
        export_lora_dir(tmp_path / "giva", tmp_path / "lora", base_model=str(tmp_path / "base"))
    assert str(error.value) == message
    assert not (tmp_path / "lora").exists()


@pytest.mark.parametrize(
    ("factory", "options", "message"),
    [(tiny_bert, {"bias": "all"}, "sets bias='all': the trained biases"),
     (tiny_bert, {"bias": "giva_only"}, "sets bias='giva_only': the trained biases"),
     (tiny_llama, {"trainable_token_indices": [5, 6]}, r"sets trainable_token_indices=\[5, 6\]: the trained embedding rows")],
    ids=["bias-all", "bias-giva-only", "trainable-tokens"],
)
def test_options_a_lora_cannot_carry_are_refused_before_the_model_loads(tmp_path, monkeypatch, capsys, factory, options, message):
    """bias other than "none" and trainable_token_indices train tensors that are no low-rank delta; PEFT's
    convert_to_lora refuses them, but only after `giva export-lora` had loaded the base model, and its TypeError for
    the trainable tokens came out of the CLI as a traceback."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    task_type = "SEQ_CLS" if factory is tiny_bert else "CAUSAL_LM"
    factory().save_pretrained(tmp_path / "base")
    model = get_peft_model(type(factory()).from_pretrained(tmp_path / "base"), GivaConfig(
        r=4, init_weights=False, target_modules=["query", "value"] if factory is tiny_bert else ["q_proj"],
        task_type=task_type, **options))
    for export in (lambda: export_lora(model, tmp_path / "lora"), lambda: peft.save_as_lora(tmp_path / "lora", model, 4)):
        with pytest.raises(ExportError, match=message):
            export()
    model.save_pretrained(tmp_path / "giva")
    for auto in (AutoModelForCausalLM, AutoModelForSequenceClassification):
        monkeypatch.setattr(auto, "from_pretrained", _refuse)
    capsys.readouterr()
    assert main(["export-lora", str(tmp_path / "giva"), str(tmp_path / "lora")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("giva export-lora: ") and re.search(message, err), err
    assert not (tmp_path / "lora").exists()


def test_export_refuses_a_users_own_lora_and_replaces_only_an_earlier_export(tmp_path, monkeypatch, capsys):
    """An export into a folder holding the user's own PEFT LoRA replaced its weights silently and deleted its vocab.txt
    and labels.json. Only a folder an export wrote is replaced: its README.md starts with the line every export has
    written (giva's earlier exports too); a peft.save_as_lora of a GiVA model now writes that README as well."""
    from transformers import AutoModelForSequenceClassification

    tiny_bert().save_pretrained(tmp_path / "base")
    torch.manual_seed(3)
    lora_config = peft.LoraConfig(r=8, target_modules=["query"], task_type="SEQ_CLS", init_lora_weights=False)
    mine = tmp_path / "mine"
    get_peft_model(AutoModelForSequenceClassification.from_pretrained(tmp_path / "base"), lora_config).save_pretrained(mine)
    (mine / "vocab.txt").write_text("[PAD]\n[UNK]\nhello\n")
    (mine / "labels.json").write_text('{"id2label": {"0": "neg", "1": "pos"}}')
    before = {p.name: p.read_bytes() for p in mine.iterdir()}
    model = _random_adapter(tiny_bert, target_modules=["value"], task_type="SEQ_CLS")
    message = "adapter_config.json belongs to a LoRA adapter that no giva export wrote"
    for export in (lambda: export_lora(model, mine), lambda: peft.save_as_lora(mine, model, rank=4)):
        with pytest.raises(ExportError, match=message):
            export()
    model.save_pretrained(tmp_path / "giva")
    _refuse_loading(monkeypatch)
    capsys.readouterr()
    assert main(["export-lora", str(tmp_path / "giva"), str(mine), "--base-model", str(tmp_path / "base")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert {p.name: p.read_bytes() for p in mine.iterdir()} == before
    earlier = tmp_path / "earlier"
    peft.save_as_lora(earlier, model, rank=8)
    assert (earlier / "README.md").read_text().startswith("# LoRA export of a GiVA adapter\n")  # as giva 0.1 wrote it
    export_lora(model, earlier)
    assert json.loads((earlier / "adapter_config.json").read_text())["r"] == 4


@pytest.mark.parametrize("how", ["parent-refuses-entries", "swap-ebusy"])
def test_an_export_into_a_folder_that_cannot_be_swapped_replaces_its_files(tmp_path, monkeypatch, how):
    """An export into a mount point (EBUSY from the swap) or a folder whose parent refuses new entries failed after
    the work (PermissionError / OSError) where PEFT's own save succeeds; it now replaces the earlier export's files
    one by one and loads as the export written the usual way does, bit for bit."""
    from ckpt_child import refuse_swaps

    model = _random_adapter(tiny_llama, target_modules=["q_proj", "v_proj"])
    export_lora(model, tmp_path / "usual")
    out = tmp_path / "out"
    export_lora(model, out, rank=8)  # an earlier export, replaced
    (out / "NOTES.md").write_text("mine")
    refuse_swaps(monkeypatch, out, how)
    export_lora(model, out)
    assert sorted(p.name for p in out.iterdir()) == ["NOTES.md", "README.md", "adapter_config.json",
                                                     "adapter_model.safetensors"]
    ids = text_batches(batch=3)[0]["input_ids"]
    usual = _logits(PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "usual")).eval(), ids)
    assert torch.equal(_logits(PeftModel.from_pretrained(tiny_llama(), str(out)).eval(), ids), usual)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _export_reproduces(model, make_base, tmp_path, export="export_lora", **inputs_kw) -> list[str]:
    """Export ``model``'s adapter, load the LoRA onto ``make_base()`` with PEFT, and assert the outputs match GiVA's;
    returns the warnings of the load (a LoRA layer the file lacks shows as PEFT's missing-keys warning)."""
    import warnings

    ids = text_batches(n=1, batch=2, length=9, labels="lm")[0]["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    out = tmp_path / "lora"
    if export == "export_lora":
        export_lora(model, out)
    else:
        peft.save_as_lora(str(out), model, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lora = PeftModel.from_pretrained(make_base(), str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(lora(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
        assert (expected - make_base()(input_ids=ids).logits).abs().max() > 1e-2  # the adapter does something
    return [str(w.message) for w in caught]


@pytest.mark.parametrize("export", ["export_lora", "save_as_lora"])
def test_a_compiled_model_exports_the_lora_of_its_adapter(tmp_path, export):
    """torch.compile's wrapper put _orig_mod. before every key: PEFT loaded the LoRA as a no-op, with a warning."""
    model = _random_adapter(tiny_llama, target_modules=["q_proj", "v_proj"], layers_to_transform=[1])
    warned = _export_reproduces(torch.compile(model), tiny_llama, tmp_path, export)
    assert not any("missing adapter keys" in w for w in warned), warned


def test_a_model_with_activation_checkpointing_wrappers_exports_plain_names(tmp_path):
    """apply_activation_checkpointing's _checkpoint_wrapped_module went into target_modules: the load found no layer."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    model = _random_adapter(tiny_llama, target_modules=["q_proj", "v_proj"], layers_to_transform=[1])
    apply_activation_checkpointing(model, check_fn=lambda m: type(m).__name__ == "LlamaDecoderLayer")
    assert any("_checkpoint_wrapped_module" in name for name, _ in model.named_modules())
    _export_reproduces(model, tiny_llama, tmp_path)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


@pytest.mark.parametrize("export", ["export_lora", "save_as_lora"])
def test_adapters_injected_without_a_peft_model_export_with_peft_s_key_prefix(tmp_path, export):
    """peft.inject_adapter_in_model (transformers' own adapter loading) gives keys without base_model.model.: the LoRA
    loaded as a no-op, with a warning."""
    torch.manual_seed(1)
    model = peft.inject_adapter_in_model(GivaConfig(r=4, init_weights=False, target_modules=["q_proj", "v_proj"]),
                                         tiny_llama()).eval()
    _export_reproduces(model, tiny_llama, tmp_path, export)


class _ConvAndLinearProj(torch.nn.Module):
    """A `proj` that is a Conv1d (a vision tower's patch embedding) beside linear `proj` layers."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(128, 16)
        self.patch = torch.nn.Module()
        self.patch.proj = torch.nn.Conv1d(16, 16, 1)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(16, 16) for _ in range(2)])
        for block in self.blocks:
            block.proj = torch.nn.Linear(16, 16)

    def forward(self, input_ids):
        x = self.patch.proj(self.embed(input_ids).transpose(1, 2)).transpose(1, 2)
        for block in self.blocks:
            x = block.proj(x)
        return type("Out", (), {"logits": x})()


@pytest.mark.parametrize("export", ["export_lora", "save_as_lora"])
def test_leaf_names_that_would_also_select_another_layer_are_written_in_full(tmp_path, export):
    """A leaf name selects modules of any type in PEFT's LoRA: 'proj' also wrapped the Conv1d, a layer the file lacks
    (missing-keys warning). So did GiVA's exclude_modules, dropped by peft.save_as_lora."""
    torch.manual_seed(1)
    model = get_peft_model(_ConvAndLinearProj(), GivaConfig(r=4, init_weights=False,
                                                             target_modules=["blocks.0.proj", "blocks.1.proj"])).eval()
    warned = _export_reproduces(model, _ConvAndLinearProj, tmp_path, export)
    assert not any("missing adapter keys" in w for w in warned), warned
    excluded = _random_adapter(tiny_llama, target_modules=["q_proj", "v_proj"],
                               exclude_modules=["model.layers.1.self_attn.q_proj"])
    warned = _export_reproduces(excluded, tiny_llama, tmp_path / "excluded", export)
    assert not any("missing adapter keys" in w for w in warned), warned
