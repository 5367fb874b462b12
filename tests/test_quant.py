"""GiVA on quantised bases (bitsandbytes 4-bit / 8-bit through PEFT's resolve_quantization_backend), on its CPU backend."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.utils.quantization_utils import ForwardOnlyQuantizationBackend
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import giva
from giva.bases import bases_from_weight
from giva.export import export_lora
from giva.quant import SUPPORTED_BACKENDS, QuantLinear, keep_4bit_layers_trainable
from tiny_models import QUANTISABLE, text_batches, tiny_llama

needs_bnb = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed (pip install 'giva[quant]')"
)
cuda = pytest.mark.cuda  # skipped without a CUDA device (conftest.py); the device script runs -m cuda
needs_hqq = pytest.mark.skipif(importlib.util.find_spec("hqq") is None, reason="hqq is not installed (pip install 'giva[quant]')")

QUANT_CONFIGS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "nf4-double": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "int8": dict(load_in_8bit=True),
}
# Largest |error| of one re-quantisation relative to the largest |weight| (4-bit: half the widest gap between
# NF4/FP4 levels; 8-bit: half a step of 1/127, per row).
QUANT_STEP = {"nf4": 0.2, "fp4": 0.3, "nf4-double": 0.2, "int8": 0.01}
MERGE_WARNING = "Merge giva module to bnb {} linear may get different generations due to rounding errors."


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(**QUANTISABLE).save_pretrained(path)
    return path


def load(path: Path, kind: str) -> nn.Module:
    config = BitsAndBytesConfig(**QUANT_CONFIGS[kind], bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.float32).eval()


def dequantized_copy(quantized: nn.Module, path: Path) -> nn.Module:
    """The fp32 model whose linear weights are the quantised model's dequantised weights."""
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    modules = dict(plain.named_modules())
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, QuantLinear):
                modules[name.removeprefix("base_model.model.")].weight.copy_(
                    module.get_base_weight().float()
                )
    return plain


def giva_layers(model: nn.Module) -> dict[str, giva.GivaLayer]:
    return {name.removeprefix("base_model.model."): m for name, m in model.named_modules() if isinstance(m, giva.GivaLayer)}


def logits(model: nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"]).logits


def giva_state(model: PeftModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if ".giva_" in k}


@needs_bnb
def test_giva_commands_never_import_bitsandbytes() -> None:
    """`giva --help` (and every command's help), `import giva` and the library load every command runs neither
    import bitsandbytes nor print its CPU-kernel line; PEFT's own reference to it imports it at first use."""
    code = (
        "import sys\n"
        "from giva.cli import main\n"
        "for argv in (['--help'], ['finetune', '--help'], ['bench', '--help'], ['export-lora', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "import giva\n"
        "giva.load()  # what every command runs first: the library, PEFT included\n"
        "print('bitsandbytes imported:', 'bitsandbytes' in sys.modules, flush=True)\n"
        "sys.stderr.write('-- now importing it --\\n'); sys.stderr.flush()\n"
        "import peft.helpers\n"
        "print('peft sees:', peft.helpers.bnb.nn.Linear4bit.__module__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage: giva" in done.stdout
    assert "bitsandbytes imported: False" in done.stdout
    assert "peft sees: bitsandbytes.nn.modules" in done.stdout
    # the line (printed on some CPUs only) may come with the deliberate import at the end, never before it
    before = done.stderr.split("-- now importing it --")[0]
    assert "-- now importing it --" in done.stderr
    assert "Failed to load CPU gemm_4bit_forward" not in done.stdout + before


@needs_bnb
def test_refusing_a_target_of_a_plain_model_imports_no_quantisation_library() -> None:
    """A target GiVA cannot adapt (an embedding) on a model without quantised layers: PEFT's backend resolution
    imported bitsandbytes only to find no backend, and its CPU-kernel line came before giva's one-line error."""
    code = (
        "import sys\n"
        "import giva\n"
        "from peft import get_peft_model\n"
        "from tiny_models import tiny_llama\n"
        "try:\n"
        "    get_peft_model(tiny_llama(), giva.GivaConfig(r=2, target_modules=['embed_tokens']))\n"
        "except TypeError as err:\n"
        "    print('refused:', err)\n"
        "print('bitsandbytes imported:', 'bitsandbytes' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused: Target module 'model.embed_tokens' is not supported by GiVA: it is a " \
           "torch.nn.modules.sparse.Embedding and no " \
           "backend of PEFT's resolve_quantization_backend covers it" in done.stdout
    assert "bitsandbytes imported: False" in done.stdout
    assert "gemm_4bit_forward" not in done.stderr


@needs_bnb
@pytest.mark.parametrize("kind", list(QUANT_CONFIGS))
def test_merge_and_unmerge_requantise_through_the_backend(tiny_dir: Path, kind: str) -> None:
    model = get_peft_model(load(tiny_dir, kind), giva.GivaConfig(r=4, init_weights=False))
    layer = giva_layers(model)["model.layers.0.self_attn.q_proj"]
    bits = "8bit" if kind == "int8" else "4bit"
    assert isinstance(layer, QuantLinear) and f"quantization_backend='bnb {bits}'" in repr(layer)
    batch = text_batches(1, labels="lm")[0]
    before = layer.get_base_weight().float()
    expected = before + layer.delta_weight("default")
    unmerged = logits(model, batch)
    effect = (unmerged - logits_without_adapter(model, batch)).abs().max()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.merge_adapter()
    assert MERGE_WARNING.format(bits) in [str(w.message) for w in caught]
    # W stays quantised, and holds W + delta_W up to one re-quantisation.
    assert type(layer.get_base_layer().weight).__name__ == ("Int8Params" if kind == "int8" else "Params4bit")
    merged_weight = layer.get_base_weight().float()
    assert (merged_weight - expected).abs().max() <= QUANT_STEP[kind] * expected.abs().max()
    merged = logits(model, batch)
    assert (merged - unmerged).abs().max() < 0.5 * effect
    model.unmerge_adapter()
    assert (layer.get_base_weight().float() - before).abs().max() <= 2 * QUANT_STEP[kind] * before.abs().max()


def logits_without_adapter(model: PeftModel, batch: dict) -> torch.Tensor:
    with model.disable_adapter():
        return logits(model, batch)


@needs_bnb
def test_weight_variant_uses_the_dequantised_weight(tiny_dir: Path) -> None:
    model = get_peft_model(load(tiny_dir, "nf4"), giva.GivaConfig(r=4, variant="weight"))
    for layer in giva_layers(model).values():
        a, b = bases_from_weight(layer.get_base_weight().float(), 4)
        torch.testing.assert_close(layer.giva_A["default"], a)
        torch.testing.assert_close(layer.giva_B["default"], b)


@needs_bnb
@pytest.mark.parametrize("mode", ["exact", "sketch"])
def test_initialize_on_4bit_gives_the_bases_of_the_dequantised_model(tiny_dir: Path, mode: str) -> None:
    """The hooks need only activations and output gradients: on the 4-bit model they see what the fp32 model
    holding its dequantised weights sees, so both get the same bases."""
    q_model = get_peft_model(load(tiny_dir, "nf4"), giva.GivaConfig(r=4))
    p_model = get_peft_model(dequantized_copy(q_model, tiny_dir), giva.GivaConfig(r=4))
    batches = text_batches(2, labels="lm")
    for model in (q_model, p_model):
        giva.initialize(model, batches, num_batches=2, mode=mode, progress=False)
    q_layers, p_layers = giva_layers(q_model), giva_layers(p_model)
    assert q_layers.keys() == p_layers.keys()
    for name, layer in q_layers.items():
        a_q, a_p = layer.giva_A["default"], p_layers[name].giva_A["default"]
        torch.testing.assert_close(a_q @ a_q.T, torch.eye(4), atol=1e-5, rtol=0)
        # Row subspaces agree (the signs of singular vectors are arbitrary).
        torch.testing.assert_close(a_q.T @ a_q, a_p.T @ a_p, atol=2e-3, rtol=0)


@needs_bnb
def test_train_save_and_reload_onto_4bit_fp32_and_bf16_bases(tiny_dir: Path, tmp_path: Path) -> None:
    """An adapter trained on a 4-bit base: only the vectors move (W stays byte-identical); it reloads bit-identically
    onto the 4-bit base (same outputs) and onto unquantised bases (fp32 holding the dequantised weights: the same
    outputs up to fp32 rounding; the original fp32 and bf16 bases: the same adapter state)."""
    model = get_peft_model(load(tiny_dir, "nf4"), giva.GivaConfig(r=4))
    batches = text_batches(4, labels="lm")
    giva.initialize(model, batches, num_batches=2, progress=False)
    packed = {k: v.clone() for k, v in model.state_dict().items() if "giva_" not in k}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for batch in batches * 3:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    assert losses[-4:] < losses[:4] or sum(losses[-4:]) < sum(losses[:4])
    for key, value in model.state_dict().items():
        if key in packed:
            assert torch.equal(value, packed[key]), key
    trained, batch = giva_state(model), batches[0]
    expected = logits(model, batch)
    model.save_pretrained(tmp_path / "adapter")

    plain = dequantized_copy(model, tiny_dir)
    reloaded_4bit = PeftModel.from_pretrained(load(tiny_dir, "nf4"), tmp_path / "adapter")
    assert torch.equal(logits(reloaded_4bit, batch), expected)
    on_dequantised = PeftModel.from_pretrained(plain, tmp_path / "adapter")
    torch.testing.assert_close(logits(on_dequantised, batch), expected, atol=1e-4, rtol=1e-4)
    original_bf16 = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16).eval()
    on_bf16 = PeftModel.from_pretrained(original_bf16, tmp_path / "adapter")
    for reloaded in (reloaded_4bit, on_dequantised, on_bf16):
        state = giva_state(reloaded)
        assert state.keys() == trained.keys()
        assert all(torch.equal(state[k], trained[k]) for k in trained)
    assert torch.isfinite(logits(on_bf16, batch)).all()


def vector_grads(model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    model.zero_grad()
    return grads


@pytest.fixture
def avx512bf16_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """4-bit layers built from here on carry bitsandbytes' AVX512-BF16 flag, as on such a CPU, whatever this one is."""
    import bitsandbytes.nn.modules

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: 1)


@needs_bnb
@pytest.mark.parametrize(("kind", "repacked_before_wrapping"), [("nf4", False), ("nf4", True), ("nf4-double", True)])
def test_an_evaluation_pass_leaves_4bit_training_and_merging_intact(
    tiny_dir: Path, avx512bf16_cpu: None, kind: str, repacked_before_wrapping: bool
) -> None:
    """On AVX512-BF16 CPUs bitsandbytes repacks a 4-bit weight at its first eval-mode forward without gradients and
    then computes it with a kernel that passes no gradient back and a layout PEFT's dequantisation misreads. GiVA
    turns that off on every 4-bit layer of the model, and restores a weight repacked before it wrapped the model."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    base = load(tiny_dir, kind)
    four_bit = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit and all(m.support_avx512bf16_for_cpu for m in four_bit)
    dequantised = [bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state) for m in four_bit]
    if repacked_before_wrapping:  # what each layer's first eval-mode forward does on such a CPU
        for m in four_bit:
            m.weight.data, m.weight.quant_state = _convert_weight_packed_for_cpu(m.weight.data, m.weight.quant_state)
    batch = text_batches(1, labels="lm")[0]
    torch.manual_seed(0)
    model = get_peft_model(base, giva.GivaConfig(r=4, init_weights=False))
    assert not any(m.support_avx512bf16_for_cpu for m in four_bit)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in four_bit)
    # restored: the same weight, its absmax rounded to bf16 (and, double-quantised, quantised to 8 bits again)
    bound = 2**-6 if kind == "nf4-double" else 2**-8
    for m, before in zip(four_bit, dequantised):
        after = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state)
        assert (after - before).abs().max() <= bound * before.abs().max()
    trained = vector_grads(model, batch)
    assert len(trained) == sum(p.requires_grad for p in model.parameters())  # every vector gets a gradient
    model.eval()
    before_merge = logits(model, batch)
    model.generate(input_ids=batch["input_ids"][:, :4], max_new_tokens=2, do_sample=False)
    again = vector_grads(model, batch)
    assert again.keys() == trained.keys()
    for name, grad in trained.items():
        torch.testing.assert_close(again[name], grad, rtol=0, atol=0, msg=name)
    model.eval()
    effect = (before_merge - logits_without_adapter(model, batch)).abs().max()
    model.merge_adapter()
    assert (logits(model, batch) - before_merge).abs().max() < 0.5 * effect  # one re-quantisation, not garbage


@needs_bnb
def test_lora_export_matches_on_the_4bit_base(tiny_dir: Path, tmp_path: Path) -> None:
    model = get_peft_model(load(tiny_dir, "nf4"), giva.GivaConfig(r=4, init_weights=False))
    batch = text_batches(1, labels="lm")[0]
    expected = logits(model, batch)
    export_lora(model, tmp_path / "lora")
    lora = PeftModel.from_pretrained(load(tiny_dir, "nf4"), tmp_path / "lora")
    assert type(lora.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"  # PEFT's bnb LoRA
    # The same bitsandbytes kernel on both sides: on AVX512-BF16 CPUs its eval-mode kernel (which GiVA turns off)
    # rounds the absmax to bf16 and moves these logits by about 2e-3.
    keep_4bit_layers_trainable(lora)
    torch.testing.assert_close(logits(lora, batch), expected, atol=1e-5, rtol=1e-5)


@needs_hqq
def test_hqq_layers_train_and_merge_through_the_backend() -> None:
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    model = tiny_llama()
    for block in model.model.layers:
        for name in ("q_proj", "v_proj"):
            linear = getattr(block.self_attn, name)
            setattr(block.self_attn, name, HQQLinear(linear, BaseQuantizeConfig(nbits=4, group_size=32),
                                                     compute_dtype=torch.float32, device="cpu"))
    model = get_peft_model(model, giva.GivaConfig(r=4, init_weights=False, target_modules=["q_proj", "v_proj"]))
    layer = giva_layers(model)["model.layers.0.self_attn.q_proj"]
    assert isinstance(layer, QuantLinear) and "quantization_backend='hqq'" in repr(layer)
    batch = text_batches(1, labels="lm")[0]
    unmerged, effect = logits(model, batch), (logits(model, batch) - logits_without_adapter(model, batch)).abs().max()
    expected = layer.get_base_weight().float() + layer.delta_weight("default")
    with pytest.warns(UserWarning, match="^Merge giva module to hqq linear may get different generations"):
        model.merge_adapter()
    assert type(layer.get_base_layer()).__name__ == "HQQLinear"
    assert (layer.get_base_weight().float() - expected).abs().max() <= 0.2 * expected.abs().max()
    assert (logits(model, batch) - unmerged).abs().max() < 0.5 * effect


class UnknownQuantLinear(nn.Module):
    """A quantised linear layer of a library no PEFT backend covers."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


def test_a_quantised_layer_no_backend_covers_is_refused_by_name() -> None:
    model = tiny_llama()
    model.model.layers[0].self_attn.q_proj = UnknownQuantLinear(32, 32)
    with pytest.raises(TypeError) as raised:
        get_peft_model(model, giva.GivaConfig(r=4, target_modules=["q_proj"]))
    assert str(raised.value) == (
        "Target module 'model.layers.0.self_attn.q_proj' is not supported by GiVA: it is a test_quant.UnknownQuantLinear "
        "and no "
        "backend of PEFT's resolve_quantization_backend covers it. GiVA adapts torch.nn.Linear, transformers Conv1D "
        f"and the quantised linear layers of these backends: {SUPPORTED_BACKENDS}. Adjust target_modules."
    )
    assert "bitsandbytes Linear8bitLt and Linear4bit" in SUPPORTED_BACKENDS


def test_merge_on_a_forward_only_backend_is_refused_before_touching_w() -> None:
    """GPTQ / AWQ / AQLM... layers train and infer (the forward calls the base layer) but cannot merge."""
    base = nn.Linear(32, 16)
    weight = base.weight.detach().clone()
    layer = QuantLinear(base, "default", "proj", [16], [0], giva.GivaConfig(r=4, init_weights=False),
                        backend=ForwardOnlyQuantizationBackend("gptq"))
    x = torch.randn(3, 32)
    torch.testing.assert_close(layer(x), base(x) + layer._adapter_output(x, "default"))
    with pytest.raises(TypeError, match="^cannot merge GiVA on layer 'proj': its base layer is quantised with 'gptq', "
                       "whose PEFT backend cannot dequantise and re-quantise the weight$"):
        layer.merge()
    assert torch.equal(base.weight, weight) and not layer.merged
    with pytest.raises(ValueError, match="^GiVA variant 'weight' needs the weight of layer 'proj', but its 'gptq' "):
        QuantLinear(base, "default", "proj", [16], [0], giva.GivaConfig(r=4, variant="weight"),
                    backend=ForwardOnlyQuantizationBackend("gptq"))


class PackedQuantLinear(nn.Module):
    """A GPTQ-style layer: its weight stored packed in an int32 ``qweight``, a float forward."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.register_buffer("qweight", torch.zeros(base.out_features, base.in_features // 8, dtype=torch.int32))
        self.unpacked = base.weight.detach().clone()  # not a stored tensor: what the kernels would compute with

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.unpacked.T


def test_get_delta_weight_of_a_packed_base_is_the_float_delta() -> None:
    """PEFT's get_delta_weight cast the delta to the packed weight's int32: zeros, no error."""
    torch.manual_seed(0)
    layer = QuantLinear(PackedQuantLinear(nn.Linear(32, 16)), "default", "proj", [16], [0],
                        giva.GivaConfig(r=4, init_weights=False), backend=ForwardOnlyQuantizationBackend("gptq"))
    assert layer._base_tensor().dtype == torch.int32
    delta = layer.get_delta_weight("default")
    assert delta.dtype == torch.float32 and delta.abs().max() > 0
    torch.testing.assert_close(delta, layer.delta_weight("default"), rtol=0, atol=0)


@needs_bnb
@pytest.mark.parametrize("adapt_blocks", [None, {"c_attn": [0]}], ids=["qkv", "q only"])
def test_a_4bit_gpt2_splits_c_attn_into_q_k_v_as_the_unquantised_one_does(tmp_path: Path, adapt_blocks) -> None:
    """transformers quantises GPT-2's Conv1D c_attn into a Linear4bit (naming Conv1D as its source_cls): it was
    adapted as one block (adapt_blocks={'c_attn': [0]} adapted Q, K and V) and its adapter did not load onto the
    unquantised GPT-2 ("does not fit this base model")."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)).save_pretrained(tmp_path / "gpt2")
    config = dict(r=4, target_modules=["c_attn"], init_weights=False, adapt_blocks=adapt_blocks or {})
    quantised = get_peft_model(load(tmp_path / "gpt2", "nf4"), giva.GivaConfig(**config))
    plain = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2", dtype=torch.float32).eval(),
                           giva.GivaConfig(**config))
    for model in (quantised, plain):
        layer = giva_layers(model)["transformer.h.0.attn.c_attn"]
        assert [(block.index, block.out_size) for block in layer.blocks["default"]] == (
            [(0, 64), (1, 64), (2, 64)] if adapt_blocks is None else [(0, 64)])
    quantised.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2", dtype=torch.float32),
                                         tmp_path / "adapter")
    assert set(giva_layers(reloaded)) == set(giva_layers(quantised))


@needs_bnb
@pytest.mark.real
def test_smollm2_4bit_initialise_train_and_merge() -> None:
    """The offline SmolLM2-135M in NF4 (double quant): sketch initialisation, one step, merge through the backend."""
    from giva.assets import smollm2_path

    config = giva.GivaConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=[0, 1])
    model = get_peft_model(load(Path(smollm2_path()), "nf4-double"), config)
    layers = giva_layers(model)
    assert len(layers) == 6 and all(isinstance(layer, QuantLinear) for layer in layers.values())
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    report = giva.initialize(model, [batch], num_batches=1, mode="sketch", progress=False)
    assert report.mode == "sketch" and giva.bases_initialized(model)
    model.train()
    model(**batch).loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    model.eval()
    unmerged, without = logits(model, batch), logits_without_adapter(model, batch)
    effect = (unmerged - without).abs().max()
    assert effect > 0
    layer = layers["model.layers.0.self_attn.q_proj"]
    expected = layer.get_base_weight().float() + layer.delta_weight("default")
    model.merge_adapter()
    assert (layer.get_base_weight().float() - expected).abs().max() <= QUANT_STEP["nf4"] * expected.abs().max()
    assert torch.isfinite(logits(model, batch)).all()


def test_a_benchmark_task_names_its_unknown_quantization() -> None:
    from giva.bench.spec import TaskSpec

    with pytest.raises(ValueError, match=r"task 'sst-q': quantization must be one of \[None, 'nf4'\], got 'int3'"):
        TaskSpec(name="sst-q", model="smollm2", data="pang-lee", quantization="int3")


@needs_bnb
def test_a_benchmark_task_with_nf4_loads_the_base_as_qlora_does(tiny_dir: Path, avx512bf16_cpu: None) -> None:
    """The evidence suite's 4-bit rows: every linear layer 4-bit NF4 with double quantisation, fp32 compute."""
    from types import SimpleNamespace

    import bitsandbytes as bnb

    from giva.bench.methods import load_base
    from giva.bench.spec import TaskSpec

    spec = TaskSpec(name="clm-q", model="tiny", data="pang-lee", kind="clm", quantization="nf4")
    task = SimpleNamespace(spec=spec, model_path=str(tiny_dir), tokenizer=SimpleNamespace(pad_token_id=0))
    model = load_base(task, seed=0)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 7 * model.config.num_hidden_layers  # q k v o gate up down
    state = layers[0].weight.quant_state
    assert state.quant_type == "nf4" and state.nested and layers[0].compute_dtype == torch.float32
    # every method (QLoRA's rows too) on bitsandbytes' standard kernels, as GiVA's rows are
    assert not any(m.support_avx512bf16_for_cpu for m in layers)
    plain = load_base(SimpleNamespace(spec=TaskSpec(name="clm", model="tiny", data="pang-lee", kind="clm"),
                                      model_path=str(tiny_dir), tokenizer=task.tokenizer), seed=0)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in plain.modules())


@needs_bnb
def test_a_benchmark_method_can_take_its_bases_from_the_unquantised_weights(tiny_dir: Path) -> None:
    """``init.bases_from = "unquantised"`` (the exploratory phase clm-nf4-bases): the 4-bit model trains on the bases
    that the same weights, loaded without quantisation, give on the same batches; a bad value is refused by name."""
    from types import SimpleNamespace

    from giva.bench.methods import build_model
    from giva.bench.spec import MethodSpec, TaskSpec

    def method(**init) -> MethodSpec:
        return MethodSpec(name="g", version=1, family="giva", kind="peft", lr=0.01, lr_sweep=(0.01,), peft_type="GIVA",
                          peft_kwargs={"r": 2, "target_modules": ["q_proj", "v_proj"]}, init=init)

    spec = TaskSpec(name="clm-q", model="tiny", data="pang-lee", kind="clm", quantization="nf4")
    task = SimpleNamespace(spec=spec, model_path=str(tiny_dir), tokenizer=SimpleNamespace(pad_token_id=0))
    plain_task = SimpleNamespace(spec=TaskSpec(name="clm", model="tiny", data="pang-lee", kind="clm"),
                                 model_path=str(tiny_dir), tokenizer=task.tokenizer)
    batches = text_batches(labels="lm")

    def bases(model: nn.Module) -> dict[str, torch.Tensor]:
        return {n: t.clone() for n, t in model.state_dict().items() if ".giva_A." in n or ".giva_B." in n}

    twin = build_model(method(), plain_task, 0, batches)
    from_task = build_model(method(), task, 0, batches)
    unquantised = build_model(method(bases_from="unquantised"), task, 0, batches)
    expected, got, own = bases(twin.model), bases(unquantised.model), bases(from_task.model)
    assert expected.keys() == got.keys() == own.keys() and expected
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert any(not torch.equal(own[k], got[k]) for k in own if ".giva_A." in k)  # the 4-bit gradient differs
    assert unquantised.model.peft_config["default"].bases_info["source"] == "gradient of the unquantised weights"
    assert unquantised.init_seconds > 0 and any(isinstance(m, QuantLinear) for m in unquantised.model.modules())
    unquantised.model.train()
    unquantised.model(**batches[0]).loss.backward()  # the loaded bases count as initialised: it trains
    assert all(p.grad is not None for p in unquantised.model.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match=r"^method 'g': init.bases_from must be one of \('task', 'unquantised'\), got 'bf16'$"):
        method(bases_from="bf16")


def test_a_4bit_suite_without_bitsandbytes_fails_before_any_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from giva.bench import runner
    from giva.bench.spec import benchmarks_dir, load_suite

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    monkeypatch.setattr(runner, "load_task", lambda spec: pytest.fail("a task was loaded before the check"))
    suite = load_suite(benchmarks_dir(), "evidence")
    with pytest.raises(ImportError, match=r"quantization 'nf4' needs bitsandbytes: pip install -e '\.\[quant\]'"):
        runner.run_suite(suite, benchmarks_dir(), tmp_path, progress=False, phases=["clm-nf4"])
    assert not (tmp_path / "runs").exists()


@needs_bnb
def test_wrapping_a_4bit_model_never_dequantises_a_weight(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Building the adapter and moving it to the base layer's device read the device, not the dequantised W."""
    calls = []
    real = QuantLinear.get_base_weight
    monkeypatch.setattr(QuantLinear, "get_base_weight", lambda self: calls.append(self.layer_name) or real(self))
    model = get_peft_model(load(tiny_dir, "nf4"), giva.GivaConfig(r=4))
    model.add_adapter("second", giva.GivaConfig(r=4))
    assert giva_layers(model) and calls == []


@needs_bnb
@cuda
def test_nf4_on_cuda_with_bf16_compute_initialises_trains_merges_and_reloads(tiny_dir: Path, tmp_path: Path) -> None:
    """The QLoRA setting on a GPU (NF4, double quantisation, bf16 compute): initialise, train the fp32 vectors,
    merge and unmerge through the backend, reload onto a fresh 4-bit base with the same outputs."""
    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16
    )

    def base() -> nn.Module:
        return AutoModelForCausalLM.from_pretrained(tiny_dir, quantization_config=config, dtype=torch.bfloat16, device_map={"": 0})

    model = get_peft_model(base(), giva.GivaConfig(r=4))
    batches = [{k: v.cuda() for k, v in b.items()} for b in text_batches(4, labels="lm")]
    giva.initialize(model, batches, num_batches=2, progress=False)
    layer = giva_layers(model)["model.layers.0.self_attn.q_proj"]
    assert type(layer.get_base_layer().weight).__name__ == "Params4bit" and layer.giva_lambda_o["default"].dtype == torch.float32
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for batch in batches * 2:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    assert layer.giva_lambda_o["default"].abs().max() > 0
    batch = batches[0]
    unmerged = logits(model, batch)
    effect = (unmerged.float() - logits_without_adapter(model, batch).float()).abs().max()
    assert effect > 0
    model.save_pretrained(tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's rounding warning, checked on CPU
        model.merge_adapter()
        merged = logits(model, batch)
        model.unmerge_adapter()
    assert (merged.float() - unmerged.float()).abs().max() < 0.5 * effect
    reloaded = PeftModel.from_pretrained(base(), tmp_path / "adapter").eval()
    assert torch.equal(logits(reloaded, batch), unmerged)
