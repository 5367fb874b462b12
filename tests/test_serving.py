"""Serving many adapters: shared bases, bases stored in bf16, and the batched mixed-adapter forward."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model

import giva
from giva import GivaConfig, serving
from giva.layer import GivaLayer
from tiny_models import text_batches, tiny_bert, tiny_gpt2, tiny_llama

CASES = {
    "bert": (tiny_bert, ["query", "value", "dense"], {}),
    "gpt2-fused": (tiny_gpt2, ["c_attn", "c_proj", "c_fc"], {"c_attn": [0, 2]}),  # Conv1D, Q and V blocks only
    "llama": (tiny_llama, ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"], {}),
}


def _multi_adapter_model(case: str, ranks: dict[str, int], variant: str = "Vr"):
    factory, targets, adapt_blocks = CASES[case]
    torch.manual_seed(0)
    model = None
    for name, r in ranks.items():
        # init_weights=False: stand-in A and non-zero vectors, so every adapter changes the outputs differently.
        config = GivaConfig(r=r, target_modules=targets, adapt_blocks=adapt_blocks, variant=variant, init_weights=False)
        if model is None:
            model = get_peft_model(factory(), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    return model.eval()


def _logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def _one_at_a_time(model, ids, names):
    expected = []
    for row, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                expected.append(_logits(model, ids)[row])
        else:
            model.set_adapter(name)
            expected.append(_logits(model, ids)[row])
    return torch.stack(expected)


@pytest.mark.parametrize("case", list(CASES))
def test_mixed_batch_is_batched_and_equals_one_adapter_at_a_time(case, monkeypatch):
    model = _multi_adapter_model(case, {"t0": 4, "t1": 4, "t2": 4})
    ids = text_batches(batch=6)[0]["input_ids"]
    names = ["t1", "t0", "__base__", "t2", "t0", "t1"]

    def no_fallback(*args, **kwargs):
        raise AssertionError("adapters of one layout must take the gathered path")

    monkeypatch.setattr(serving, "_grouped_forward", no_fallback)
    mixed = _logits(model, ids, adapter_names=names)
    monkeypatch.undo()
    assert torch.allclose(mixed, _one_at_a_time(model, ids, names), atol=1e-5)


def test_mixed_batch_with_adapters_of_different_layouts():
    model = _multi_adapter_model("gpt2-fused", {"t0": 4, "t1": 2})
    ids = text_batches(batch=4)[0]["input_ids"]
    names = ["t1", "t0", "__base__", "t1"]
    assert torch.allclose(_logits(model, ids, adapter_names=names), _one_at_a_time(model, ids, names), atol=1e-5)


@pytest.mark.parametrize("case", ["bert", "gpt2-fused"])
def test_mixed_batch_reuses_its_stacked_adapters_until_any_of_them_changes(case, monkeypatch):
    model = _multi_adapter_model(case, {"t0": 4, "t1": 4, "t2": 4})
    ids = text_batches(batch=5)[0]["input_ids"]
    names = ["t1", "t0", "__base__", "t2", "t1"]
    builds: list[int] = []
    real_build = serving._build_stacked
    monkeypatch.setattr(serving, "_build_stacked", lambda *args: builds.append(1) or real_build(*args))
    layers = [m for m in model.modules() if isinstance(m, GivaLayer)]

    def check(change: str, rebuilt: int = len(layers)) -> None:
        builds.clear()
        mixed = _logits(model, ids, adapter_names=names)
        assert len(builds) == rebuilt, f"after {change}: the changed layers, and only they, rebuild their stack"
        assert torch.allclose(mixed, _one_at_a_time(model, ids, names), atol=1e-5), change

    serving.clear_mixed_batch_cache()
    builds.clear()
    with torch.inference_mode():
        first = model(input_ids=ids, adapter_names=names).logits
    assert len(builds) == len(layers)
    builds.clear()
    again = _logits(model, ids, adapter_names=names)
    assert not builds and torch.equal(again, first)  # nothing changed: every layer reuses its stack
    assert torch.allclose(again, _one_at_a_time(model, ids, names), atol=1e-5)

    with torch.no_grad():  # an in-place write PyTorch counts (as an optimizer step or load_state_dict)
        for layer in layers:
            layer.giva_lambda_o["t1"].mul_(-2.0)
    check("an in-place write to lambda_o")
    model.load_state_dict({k: v + 0.5 for k, v in model.state_dict().items() if "giva_lambda_s.t0" in k}, strict=False)
    check("load_state_dict into lambda_s")
    for layer in layers:  # a swapped storage (how nn.Module.to moves parameters), which bumps no version
        layer.giva_lambda_s["t2"].data = layer.giva_lambda_s["t2"].data * 3.0
    check("a parameter's .data replaced")
    layer = layers[0]
    block = layer.blocks["t0"][0]
    layer.set_block_bases("t0", block, torch.randn(block.rank, layer.in_features), torch.randn(block.out_size, block.rank))
    check("bases written in place", rebuilt=1)
    factory, targets, adapt_blocks = CASES[case]
    model.delete_adapter("t1")
    model.add_adapter("t1", GivaConfig(r=4, target_modules=targets, adapt_blocks=adapt_blocks, init_weights=False))
    model.eval()
    check("an adapter deleted and added again under the same name")
    model.double()
    check("a cast of the model")


def test_mixed_batch_gives_vectors_their_gradients_in_eval_mode(monkeypatch):
    model = _multi_adapter_model("llama", {"t0": 4, "t1": 4})
    ids = text_batches(batch=4)[0]["input_ids"]
    names = ["t1", "t0", "__base__", "t1"]
    vectors = [p.requires_grad_() for n, p in model.named_parameters() if "giva_lambda" in n]  # t1's too

    def grads() -> list[torch.Tensor]:
        for p in vectors:
            p.grad = None
        model(input_ids=ids, adapter_names=names).logits.square().sum().backward()
        return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in vectors]

    _logits(model, ids, adapter_names=names)  # a no-grad forward leaves stacks in the cache
    batched = grads()
    monkeypatch.setattr(serving, "_stacked", lambda *args: None)  # reference: one pass per adapter over its rows
    grouped = grads()
    assert sum(bool(g.any()) for g in batched) == len(vectors)  # t0 and t1 both in the batch: every vector
    assert all(torch.allclose(b, g, rtol=1e-4, atol=1e-6) for b, g in zip(batched, grouped))


def test_seeded_bases_are_one_tensor_per_layer_and_stay_shared_under_casts():
    model = _multi_adapter_model("llama", {"t0": 4, "t1": 4, "t2": 4})
    layers = [m for m in model.modules() if isinstance(m, GivaLayer)]
    for layer in layers:
        assert layer.giva_B["t0"] is layer.giva_B["t1"] is layer.giva_B["t2"]
        assert layer.giva_A["t0"] is not layer.giva_A["t1"]  # A is data-dependent, per adapter
    ids = text_batches(batch=2)[0]["input_ids"]
    before = _logits(model, ids)
    model.to(torch.float64).to(torch.float32)
    for layer in layers:
        assert layer.giva_B["t0"] is layer.giva_B["t1"] is layer.giva_B["t2"]
    assert torch.allclose(_logits(model, ids), before, atol=1e-6)

    random_variant = _multi_adapter_model("bert", {"t0": 4, "t1": 4}, variant="random")
    data_dependent = _multi_adapter_model("bert", {"t0": 4, "t1": 4}, variant="VrUr")
    for layer in (m for m in random_variant.modules() if isinstance(m, GivaLayer)):
        assert layer.giva_A["t0"] is layer.giva_A["t1"] and layer.giva_B["t0"] is layer.giva_B["t1"]
    for layer in (m for m in data_dependent.modules() if isinstance(m, GivaLayer)):
        assert layer.giva_B["t0"] is not layer.giva_B["t1"]


def test_initialising_several_adapters_keeps_their_seeded_output_basis_shared():
    batches = text_batches()
    config = {"r": 4, "target_modules": ["query", "value"], "task_type": "SEQ_CLS"}
    model = get_peft_model(tiny_bert(), GivaConfig(**config), adapter_name="t0")
    model.add_adapter("t1", GivaConfig(**config))
    for name in ("t0", "t1"):
        giva.initialize(model, batches, adapter_name=name, progress=False)
    for layer in (m for m in model.modules() if isinstance(m, GivaLayer)):
        assert layer.giva_B["t0"] is layer.giva_B["t1"] and layer.bases_initialized("t1")
        assert not torch.equal(layer.giva_A["t0"], torch.zeros_like(layer.giva_A["t0"]))


def test_writing_or_loading_other_bases_into_a_shared_tensor_unshares_it_first():
    model = _multi_adapter_model("bert", {"t0": 4, "t1": 4})
    layer = next(m for m in model.modules() if isinstance(m, GivaLayer))
    b_of_b = layer.giva_B["t1"].clone()
    block = layer.blocks["t0"][0]
    layer.set_block_bases("t0", block, torch.randn(block.rank, layer.in_features), torch.randn(block.out_size, block.rank))
    assert layer.giva_B["t0"] is not layer.giva_B["t1"] and torch.equal(layer.giva_B["t1"], b_of_b)

    other = next(m for m in model.modules() if isinstance(m, GivaLayer) and m is not layer)
    assert other.giva_B["t0"] is other.giva_B["t1"]
    kept = other.giva_B["t1"].clone()
    other.giva_B.load_state_dict({"t0": torch.ones_like(kept), "t1": kept}, strict=False)
    assert torch.equal(other.giva_B["t0"], torch.ones_like(kept)) and torch.equal(other.giva_B["t1"], kept)


def test_several_adapters_with_shared_bases_save_and_reload_bit_exactly(tmp_path):
    model = _multi_adapter_model("gpt2-fused", {"t0": 4, "t1": 4})
    ids = text_batches(batch=3)[0]["input_ids"]
    names = ["t0", "t1", "__base__"]
    before = _logits(model, ids, adapter_names=names)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "t0", adapter_name="t0")
    loaded.load_adapter(tmp_path / "t1", adapter_name="t1")
    loaded.eval()
    assert torch.equal(_logits(loaded, ids, adapter_names=names), before)
    for layer in (m for m in loaded.modules() if isinstance(m, GivaLayer)):
        assert layer.giva_B["t0"] is layer.giva_B["t1"]


def test_bf16_input_basis_is_stored_trained_and_reloaded_as_is(tmp_path):
    batches = text_batches()
    model = get_peft_model(tiny_bert(), GivaConfig(r=4, target_modules=["query", "value"], bases_dtype="bfloat16"))
    layer = next(m for m in model.modules() if isinstance(m, GivaLayer))
    assert layer.giva_A["default"].dtype == torch.bfloat16 and layer.giva_B["default"].dtype == torch.float32
    giva.initialize(model, batches, progress=False)
    a = layer.giva_A["default"]
    assert a.dtype == torch.bfloat16
    error = (a.float() @ a.float().T - torch.eye(a.shape[0])).abs().max().item()
    assert 1e-6 < error < 1e-2  # bf16 rounding: orthonormal to ~1e-3, not ~1e-7
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for batch in batches[:2]:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    before = _logits(model, batches[0]["input_ids"])
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path).eval()
    assert next(m for m in loaded.modules() if isinstance(m, GivaLayer)).giva_A["default"].dtype == torch.bfloat16
    assert torch.equal(_logits(loaded, batches[0]["input_ids"]), before)


def test_mixed_batch_arguments_are_checked_like_lora():
    model = _multi_adapter_model("bert", {"t0": 4, "t1": 4})
    ids = text_batches(batch=4)[0]["input_ids"]
    with pytest.raises(ValueError, match="Length of `adapter_names`"):
        _logits(model, ids, adapter_names=["t0", "t1"])
    with pytest.raises(TypeError, match="list of adapter names"):
        _logits(model, ids, adapter_names="a")
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        model(input_ids=ids, adapter_names=["t0"] * 4)
    model.eval()
    model.set_adapter("t0")
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged adapters"):
        _logits(model, ids, adapter_names=["t0", "t1", "t0", "__base__"])
    model.unmerge_adapter()
    _logits(model, ids, adapter_names=["t0", "t1", "t0", "__base__"])


def test_generate_with_num_beams_expands_adapter_names_like_lora():
    model = _multi_adapter_model("llama", {"t0": 4, "t1": 4})
    ids = text_batches(batch=2)[0]["input_ids"]
    settings = {"max_new_tokens": 4, "num_beams": 2, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        mixed = model.generate(input_ids=ids, adapter_names=["t1", "t0"], **settings)
        expected = []
        for row, name in enumerate(["t1", "t0"]):
            model.set_adapter(name)
            expected.append(model.generate(input_ids=ids[row : row + 1], **settings)[0])
    assert torch.equal(mixed, torch.stack(expected))


def test_interleaved_timing_rotates_the_order_every_round():
    from giva.bench.serve import time_interleaved

    calls: list[str] = []
    times = time_interleaved({k: (lambda k=k: calls.append(k)) for k in "abc"}, rounds=4)
    assert calls == list("abc") + list("abc") + list("bca") + list("cab") + list("abc")  # warm-up round, then rotated
    assert all(len(v) == 4 and min(v) >= 0 for v in times.values())


def test_serve_benchmark_writes_rows_table_and_plot_and_giva_adds_less_memory_than_lora(tmp_path, monkeypatch):
    from giva.bench.serve import ServeModel, ServeSettings, run_serve

    tiny = ServeModel("tiny-llama", tiny_llama, "all-linear", batch_size=4, seq_len=6, vocab_size=100)
    results = run_serve(tmp_path, models=(tiny,), settings=ServeSettings(ns=(1, 3), rounds=2, r=4), progress=False)
    rows = results["ran"]
    table = (tmp_path / "results.md").read_text()
    assert table.count("| tiny-llama | 1 |") == table.count("| tiny-llama | 3 |") == 2  # throughput and memory rows
    assert (tmp_path / "serve.png").read_bytes()[:4] == b"\x89PNG"
    for n in (1, 3):
        timed = {r["method"]: r for r in rows if r["n_adapters"] == n and r.get("tokens_per_s") is not None}
        assert set(timed) == {"base model", "one merged adapter", "GiVA r=4", "LoRA r=4"}
        assert all(len(r["seconds_per_round"]) == 2 for r in timed.values())
        ratio = next(r for r in rows if r["n_adapters"] == n and r["method"] == "GiVA / LoRA")
        expected = [t_lora / t_giva for t_giva, t_lora in zip(timed["GiVA r=4"]["seconds_per_round"], timed["LoRA r=4"]["seconds_per_round"])]
        assert ratio["per_round_ratio"] == pytest.approx(expected)
        assert ratio["ratio_min"] <= ratio["ratio_median"] <= ratio["ratio_max"]
    extra = {r["method"]: r["bytes_per_extra_adapter"] for r in rows if r["n_adapters"] == 3 and "adapter_bytes_total" in r}
    # Per extra adapter: GiVA holds A (R x in) and the two vectors, LoRA holds A and B (out x R).
    assert extra["GiVA r=4 (A bf16)"] < extra["GiVA r=4"] < extra["LoRA r=4"]

    # A second run with the same settings resumes: the finished model is not measured again.
    import giva.bench.serve as serve

    def measured_again(*args, **kwargs):
        raise AssertionError("a finished model was measured again")

    monkeypatch.setattr(serve, "measure_model", measured_again)
    assert run_serve(tmp_path, models=(tiny,), settings=ServeSettings(ns=(1, 3), rounds=2, r=4), progress=False)["ran"] == rows
    with pytest.raises(AssertionError, match="measured again"):  # other settings: measured afresh
        run_serve(tmp_path, models=(tiny,), settings=ServeSettings(ns=(1, 3), rounds=3, r=4), progress=False)


def test_serve_benchmark_resumes_at_the_first_unfinished_n(tmp_path, monkeypatch):
    import json

    import giva.bench.serve as serve

    tiny = serve.ServeModel("tiny-llama", tiny_llama, "all-linear", batch_size=4, seq_len=6, vocab_size=100)
    settings = serve.ServeSettings(ns=(1, 3), rounds=1, r=4)
    full = serve.run_serve(tmp_path, models=(tiny,), settings=settings, progress=False)["ran"]
    saved = json.loads((tmp_path / "results.json").read_text())
    saved["rows"] = [r for r in saved["rows"] if r["n_adapters"] == 1]  # as if interrupted during N = 3
    (tmp_path / "results.json").write_text(json.dumps(saved))
    timed: list[int] = []
    real = serve.time_interleaved
    monkeypatch.setattr(serve, "time_interleaved", lambda fns, rounds: timed.append(1) or real(fns, rounds))
    resumed = serve.run_serve(tmp_path, models=(tiny,), settings=settings, progress=False)["ran"]
    assert len(timed) == 1  # only N = 3 was timed again
    assert [r for r in resumed if r["n_adapters"] == 1] == [r for r in full if r["n_adapters"] == 1]
    # N = 3 is rebuilt as in a full run: the same batch rows and the same adapter memory
    key = ("distinct_adapters_in_batch", "adapter_bytes_total", "bytes_per_extra_adapter")
    assert [[r.get(k) for k in key] for r in resumed if r["n_adapters"] == 3] == [
        [r.get(k) for k in key] for r in full if r["n_adapters"] == 3
    ]


def test_serve_benchmark_stand_in_adapters_are_random_keep_their_dtype_and_share_b(tmp_path):
    from giva.bench.serve import ServeModel, ServeSettings, _config, fill_stand_in, run_serve, stand_in_shapes

    model = get_peft_model(tiny_llama(), _config("giva-bf16", "all-linear", 4, stand_in=False), adapter_name="t0")
    model.add_adapter("t1", _config("giva-bf16", "all-linear", 4, stand_in=False))
    shapes = stand_in_shapes(model, "t0")
    for name in ("t0", "t1"):
        fill_stand_in(model, name, shapes)
    layers = [m for m in model.modules() if isinstance(m, GivaLayer)]
    assert len(shapes) == 3 * len(layers)
    for layer in layers:
        assert layer.giva_A["t1"].dtype == torch.bfloat16 and layer.giva_B["t0"] is layer.giva_B["t1"]
        assert not torch.equal(layer.giva_A["t0"], layer.giva_A["t1"]) and bool(layer.giva_A["t1"].any())
        assert bool(layer.giva_lambda_o["t1"].any()) and not torch.equal(layer.giva_lambda_s["t0"], layer.giva_lambda_s["t1"])

    tiny = ServeModel("tiny-llama", tiny_llama, "all-linear", batch_size=4, seq_len=6, vocab_size=100, methods=("giva", "lora"))
    rows = run_serve(tmp_path, models=(tiny,), settings=ServeSettings(ns=(1, 3), rounds=1, r=4), progress=False)["ran"]
    assert {r["method"] for r in rows} == {"base model", "one merged adapter", "GiVA r=4", "LoRA r=4", "GiVA / LoRA"}
    table = (tmp_path / "results.md").read_text()
    assert table.count("| tiny-llama | 3 | ") == 2 and table.count("not built") == 3  # bf16 cells of N = 1 and 3


@pytest.mark.parametrize("method", ["giva", "lora"])
def test_serve_benchmark_adds_adapters_exactly_as_add_adapter_does(method):
    from giva.bench.serve import _config, adapter_bytes, add_adapter_to_layers, tuner_layers

    built = []
    for fast in (False, True):
        torch.manual_seed(0)
        model = get_peft_model(tiny_llama(), _config(method, "all-linear", 4, stand_in=False), adapter_name="t0")
        layers = tuner_layers(model)
        for name in ("t1", "t2"):
            config = _config(method, "all-linear", 4, stand_in=False)
            add_adapter_to_layers(model, name, config, layers) if fast else model.add_adapter(name, config)
        built.append(model)
    slow, fast = (m.state_dict() for m in built)
    assert slow.keys() == fast.keys() and all(torch.equal(slow[k], fast[k]) for k in slow)  # RNG draws included
    assert set(built[1].peft_config) == {"t0", "t1", "t2"}
    prefix = "lora_" if method == "lora" else "giva_"
    assert adapter_bytes(built[0], prefix) == adapter_bytes(built[1], prefix)  # shared B still shared
    ids = text_batches(batch=3)[0]["input_ids"]
    names = ["t2", "t0", "t1"]
    assert torch.equal(_logits(built[0].eval(), ids, adapter_names=names), _logits(built[1].eval(), ids, adapter_names=names))


def test_serve_settings_reject_bad_values():
    from giva.bench.serve import ServeSettings

    with pytest.raises(ValueError, match="ServeSettings.ns"):
        ServeSettings(ns=(8, 1))
    with pytest.raises(ValueError, match="ServeSettings.rounds"):
        ServeSettings(rounds=0)
