"""Serving many adapters: shared bases, bases stored in bf16, and the batched mixed-adapter forward."""

from __future__ import annotations

import json
from collections import Counter
from contextlib import nullcontext
from functools import partial
from typing import Optional

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import GenerationConfig, T5Config, T5ForConditionalGeneration

import giva
import giva.layer
from giva import GivaConfig, serving
from giva.layer import GivaLayer
from tiny_models import text_batches, tiny_bert, tiny_gpt2, tiny_llama

CASES = {
    "bert": (tiny_bert, ["query", "value", "dense"], {}),
    "gpt2-fused": (tiny_gpt2, ["c_attn", "c_proj", "c_fc"], {"c_attn": [0, 2]}),  # Conv1D, Q and V blocks only
    "llama": (tiny_llama, ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"], {}),
}


def _multi_adapter_model(case: str, ranks: dict[str, int], variant: str = "Vr", variants: Optional[dict[str, str]] = None,
                         blocks: Optional[dict[str, dict]] = None):
    """A tiny model with one GiVA adapter per entry of ``ranks`` (``variants`` / ``blocks``: per-adapter overrides)."""
    factory, targets, adapt_blocks = CASES[case]
    torch.manual_seed(0)
    model = None
    for name, r in ranks.items():
        # init_weights=False: stand-in A and non-zero vectors, so every adapter changes the outputs differently.
        config = GivaConfig(
            r=r, target_modules=targets, adapt_blocks=(blocks or {}).get(name, adapt_blocks),
            variant=(variants or {}).get(name, variant), init_weights=False,
        )
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


# Adapter sets of a mixed batch: one seeded B shared by all (`Vr`, one rank); per-adapter B (`VrUr`) of different
# ranks; and, on GPT-2's fused c_attn, adapters on different blocks (Q and V, K only, all three).
LAYOUTS = {
    "shared B": {"ranks": {"t0": 4, "t1": 4, "t2": 4}},
    "ranks and B differ": {"ranks": {"t0": 4, "t1": 2, "t2": 3}, "variants": {"t0": "VrUr", "t2": "VrUr"}},
    "blocks differ": {"ranks": {"t0": 4, "t1": 2, "t2": 4}, "blocks": {"t1": {"c_attn": [1]}, "t2": {"c_attn": [0, 1, 2]}}},
}
MIXED_CASES = [(case, layout) for case in CASES for layout in LAYOUTS if layout != "blocks differ" or case == "gpt2-fused"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case,layout", MIXED_CASES)
def test_mixed_batch_equals_each_row_run_alone_with_its_adapter(case, layout, dtype):
    model = _multi_adapter_model(case, **LAYOUTS[layout]).to(dtype)
    ids = text_batches(batch=6)[0]["input_ids"]
    names = ["t1", "t0", "__base__", "t2", "t0", "t1"]
    mixed = _logits(model, ids, adapter_names=names)
    again = _logits(model, ids, adapter_names=names)  # from the cached stacks
    expected = _one_at_a_time(model, ids, names)
    assert mixed.dtype == dtype and torch.equal(again, mixed)
    if dtype == torch.float32:
        torch.testing.assert_close(mixed, expected, atol=1e-5, rtol=1e-5)
    else:  # bf16 maths in both, rounded in different places: within a few bf16 steps of the logits' scale
        torch.testing.assert_close(mixed.float(), expected.float(), atol=0.05 * expected.float().abs().max().item(), rtol=0)
    with model.disable_adapter():
        base = _logits(model, ids)
    assert torch.equal(mixed[2], base[2])  # a "__base__" row gets nothing at all


VIEW_OPS = {"view", "_unsafe_view", "permute", "unsqueeze", "expand", "t", "transpose", "reshape", "slice", "select", "alias"}


class _Recorder(TorchDispatchMode):
    """Counts the aten ops of a region and the largest tensor any of them allocates."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        self.ops[name] += 1
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and name.split(".")[-1] not in VIEW_OPS:  # a view allocates nothing
                self.largest = max(self.largest, tensor.numel())
        return out


class _HostCalls(TorchFunctionMode):
    """Records the torch calls of a region that move data between host and device or wait on the device."""

    WATCHED = {"to", "cuda", "cpu", "tensor", "as_tensor", "nonzero", "item", "tolist", "unique", "pin_memory"}

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.WATCHED:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def _record_mixed_forwards(monkeypatch, model, ids, names):
    """Per GiVA layer call of one forward: (aten op counts, largest returned numel, tokens x max(in, out), host calls)."""
    records = []
    real = giva.layer.mixed_batch_forward

    def recorded(layer, result, x, adapter_names):
        ops, host = _Recorder(), _HostCalls()
        with ops, host:
            out = real(layer, result, x, adapter_names)
        tokens = x.numel() // x.shape[-1]
        records.append((ops.ops, ops.largest, tokens * max(layer.in_features, layer.out_features), host.calls))
        return out

    monkeypatch.setattr(giva.layer, "mixed_batch_forward", recorded)
    _logits(model, ids, adapter_names=names)
    monkeypatch.undo()
    return records


@pytest.mark.parametrize("autocast", [False, True], ids=["", "autocast"])
@pytest.mark.parametrize("tokens", [1, 6], ids=["decode", "prefill"])
@pytest.mark.parametrize("layout", ["shared B", "ranks and B differ", "blocks differ"])
def test_mixed_batch_kernels_do_not_grow_with_the_adapters_and_nothing_crosses_to_the_host(layout, tokens, autocast, monkeypatch):
    """Per layer, the same aten ops whether the batch holds 3 or 8 distinct adapters, no host <-> device copy or
    sync once the stacks are built, and no temporary larger than tokens x max(in, out) (what LoRA's mixed batch
    forms: its sub-batches of x and their outputs), for rows of one token (decoding) and of more than r.

    Under CPU bf16 autocast (an fp32 model, as Trainer(bf16=True) evaluates it), the stacks are in autocast's dtype:
    the same ops as without it (the add into the base output in place, no tokens x out product, cast or add of its
    own) but the one cast of x autocast makes for the first matmul (x is fp32 here, the base output bf16)."""
    n = 8
    settings = LAYOUTS[layout]
    ranks = {f"t{i}": list(settings["ranks"].values())[i % 3] for i in range(n)}
    variants = {f"t{i}": settings.get("variants", {}).get(f"t{i % 3}", "Vr") for i in range(n)}
    blocks = {f"t{i}": settings["blocks"][f"t{i % 3}"] for i in range(n) if f"t{i % 3}" in settings.get("blocks", {})}
    model = _multi_adapter_model("gpt2-fused" if layout == "blocks differ" else "llama", ranks, variants=variants, blocks=blocks)
    ids = text_batches(batch=n)[0]["input_ids"][:, :tokens]
    few = ["t0", "t1", "t0", "t2", "__base__", "t0", "t1", "t0"]
    many = [f"t{i}" for i in range(n)]
    plain = None
    if autocast:  # the ops without autocast, stacks built
        _logits(model, ids, adapter_names=many)
        plain = _record_mixed_forwards(monkeypatch, model, ids, many)
    per_batch = {}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for label, names in (("3 distinct", few), ("8 distinct", many)):
            _logits(model, ids, adapter_names=names)  # builds the stacks and index tensors
            per_batch[label] = _record_mixed_forwards(monkeypatch, model, ids, names)
        mixed = _logits(model, ids, adapter_names=few)
        alone = _one_at_a_time(model, ids, few)
    for i, ((ops_few, *_), (ops_many, largest, bound, host)) in enumerate(zip(per_batch["3 distinct"], per_batch["8 distinct"])):
        assert ops_many == ops_few, "the kernels of a layer must not depend on the adapters in the batch"
        if autocast:
            own = Counter({op: count for op, count in ops_many.items() if op != "aten._to_copy"})
            assert own == plain[i][0] and ops_many["aten._to_copy"] <= 1, (ops_many, plain[i][0])
        kernels = sum(count for op, count in ops_many.items() if op.split(".")[-1] not in VIEW_OPS | {"_to_copy"})
        assert kernels <= 6, ops_many  # two matmuls, the selector, the sum over slots, lambda_o, the add
        assert largest <= bound
        assert host == []
    assert len(per_batch["8 distinct"]) == sum(isinstance(m, GivaLayer) for m in model.modules())
    tolerance = {"atol": 2e-2, "rtol": 2e-2} if autocast else {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(mixed, alone, **tolerance)


@pytest.mark.parametrize("layout", ["shared B", "ranks and B differ"])
@pytest.mark.parametrize("mode", ["no_grad", "autograd", "inference"])
def test_a_mixed_batch_forward_makes_no_stream_guard_once_its_tensors_are_built(mode, layout, monkeypatch):
    """A stream guard (on CUDA: an event recorded, later a stream wait) is for tensors cached across forwards. With
    autograd on, each forward built its stacks and per-batch tensors afresh, and a guard for each, in every layer:
    tensors made and read on one stream, freed after the forward; so did a model made under inference_mode (its
    stacks cannot be cached, but its per-batch tensors were guarded and kept on the thrown-away stack). Counted on
    CPU, where the guards are made alike; both ways of building the stacks (one shared B, B per adapter)."""
    import giva.serving as serving

    context = torch.inference_mode if mode == "inference" else partial(torch.set_grad_enabled, mode == "autograd")
    with context():
        model = _multi_adapter_model("llama", **LAYOUTS[layout])
    ids = text_batches(batch=4)[0]["input_ids"]
    names = ["t0", "t1", "__base__", "t2"]
    with context():
        model(input_ids=ids, adapter_names=names)  # builds what is cached: the stacks (no_grad), the index tensors
        made = []
        real_init = serving._OnDevice.__init__
        monkeypatch.setattr(serving._OnDevice, "__init__", lambda self, *t: (made.append(len(t)), real_init(self, *t))[1])
        out = model(input_ids=ids, adapter_names=names).logits
    assert out.requires_grad == (mode == "autograd") and made == []


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


def test_mixed_batch_reuses_index_tensors_and_stacks_across_layers_and_forwards(monkeypatch):
    model = _multi_adapter_model("llama", {"t0": 4, "t1": 4, "t2": 4})
    ids = text_batches(batch=5)[0]["input_ids"]
    names = ["t1", "t0", "__base__", "t2", "t1"]
    serving.clear_mixed_batch_cache()
    serving._rows.cache_clear()
    built: list[tuple] = []
    real = serving._to_device
    monkeypatch.setattr(serving, "_to_device", lambda values, *args: built.append(1) or real(values, *args))
    first = _logits(model, ids, adapter_names=names)
    assert len(built) == 3  # slots, their gather form and columns, once for every layer (one layout)
    assert torch.equal(_logits(model, ids, adapter_names=names), first) and len(built) == 3


@pytest.mark.parametrize("case,layout", [("llama", "shared B"), ("gpt2-fused", "blocks differ"), ("bert", "ranks and B differ")])
def test_mixed_batch_gives_each_vector_the_gradient_of_its_rows(case, layout):
    model = _multi_adapter_model(case, **LAYOUTS[layout])
    ids = text_batches(batch=5)[0]["input_ids"]
    names = ["t1", "t0", "__base__", "t2", "t1"]
    vectors = [p.requires_grad_() for n, p in model.named_parameters() if "giva_lambda" in n]

    def grads(run) -> list[torch.Tensor]:
        for p in vectors:
            p.grad = None
        run()
        return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in vectors]

    def square_sum(logits: torch.Tensor) -> torch.Tensor:
        return logits.square().sum()

    _logits(model, ids, adapter_names=names)  # a no-grad forward leaves stacks in the cache: not used with autograd
    batched = grads(lambda: square_sum(model(input_ids=ids, adapter_names=names).logits).backward())
    # Reference: each row alone, through the single-adapter forward.
    rows = [(i, n) for i, n in enumerate(names) if n != "__base__"]
    alone = grads(lambda: sum(square_sum(model(input_ids=ids[i : i + 1], adapter_names=[n]).logits) for i, n in rows).backward())
    assert sum(bool(g.any()) for g in batched) == len(vectors)  # every adapter is in the batch: every vector
    for b, a in zip(batched, alone):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_mixed_batch_in_training_mode_applies_each_rows_dropout():
    model = _multi_adapter_model("llama", {"t0": 4, "t1": 4})
    for layer in (m for m in model.modules() if isinstance(m, GivaLayer)):
        layer.giva_dropout["t1"] = torch.nn.Dropout(1.0)  # t1's rows lose all of their adapter input
        layer.giva_dropout["t0"] = torch.nn.Dropout(0.5)
    ids = text_batches(batch=4)[0]["input_ids"]
    names = ["t1", "t0", "__base__", "t1"]
    eval_mixed = _logits(model, ids, adapter_names=names)
    layers = [m for m in model.modules() if isinstance(m, GivaLayer)]
    for layer in layers:
        layer.train()
    torch.manual_seed(0)
    train_mixed = _logits(model, ids, adapter_names=names)
    with model.disable_adapter():
        base = _logits(model, ids)
    assert torch.equal(train_mixed[2], base[2])
    assert torch.allclose(train_mixed[0], base[0], atol=1e-6) and torch.allclose(train_mixed[3], base[3], atol=1e-6)
    assert not torch.allclose(train_mixed[1], eval_mixed[1], atol=1e-3)  # t0's rows: half their input dropped
    assert not torch.allclose(train_mixed[1], base[1], atol=1e-3)
    assert not torch.allclose(eval_mixed[0], base[0], atol=1e-3)  # without dropout, t1 changes its rows


cuda = pytest.mark.cuda  # skipped without a CUDA device (conftest.py); the device script runs -m cuda


@cuda
@pytest.mark.parametrize("case,layout", MIXED_CASES)
def test_mixed_batch_on_cuda_never_synchronises_the_host(case, layout):
    model = _multi_adapter_model(case, **LAYOUTS[layout]).to("cuda", torch.bfloat16)
    ids = text_batches(batch=6)[0]["input_ids"].cuda()
    names = ["t1", "t0", "__base__", "t2", "t0", "t1"]
    layers = [m for m in model.modules() if isinstance(m, GivaLayer)]
    serving.clear_mixed_batch_cache()
    serving._rows.cache_clear()
    inputs = [torch.randn(6, 5, layer.in_features, device="cuda", dtype=torch.bfloat16) for layer in layers]
    expected = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            for _ in range(2):  # the first builds the stacks and index tensors, the second reuses them
                expected = [layer(x, adapter_names=names) for layer, x in zip(layers, inputs)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for layer, x, out in zip(layers, inputs, expected):
        rows = []
        for i, name in enumerate(names):
            with torch.no_grad():
                rows.append(layer(x[i : i + 1], adapter_names=[name])[0])
        torch.testing.assert_close(out.float(), torch.stack(rows).float(), atol=0.05 * out.float().abs().max().item(), rtol=0)
    torch.testing.assert_close(
        _logits(model, ids, adapter_names=names).float(), _one_at_a_time(model, ids, names).float(), atol=0.1, rtol=0.05
    )


@cuda
def test_mixed_batch_stacks_used_on_another_stream_are_recorded_on_it(monkeypatch):
    model = _multi_adapter_model("llama", {"t0": 4, "t1": 2, "t2": 4}).to("cuda")
    ids = text_batches(batch=3)[0]["input_ids"].cuda()
    names = ["t1", "t0", "t2"]
    serving.clear_mixed_batch_cache()
    recorded: list[torch.cuda.Stream] = []
    real = torch.Tensor.record_stream
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: recorded.append(stream) or real(self, stream))
    first = _logits(model, ids, adapter_names=names)
    assert recorded == []  # built on the default stream: its own, never recorded (serving._OnDevice)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        other = _logits(model, ids, adapter_names=names)
    torch.cuda.current_stream().wait_stream(side)
    assert recorded and all(s == side for s in recorded)
    count = len(recorded)
    with torch.cuda.stream(side):
        _logits(model, ids, adapter_names=names)
    assert len(recorded) == count  # once per stream
    serving.clear_mixed_batch_cache()  # freeing them now is safe: the allocator waits for the side stream
    torch.testing.assert_close(other, first)


@cuda
def test_mixed_batch_stacks_built_on_one_stream_are_ready_before_another_stream_reads_them():
    """A server with a stream per request: the stacks and index tensors built on one stream are read by another
    that never synchronised with it; that stream must wait (on the device) for their kernels to have run."""
    model = _multi_adapter_model("gpt2-fused", **LAYOUTS["blocks differ"]).to("cuda")  # index tensors too
    ids = text_batches(batch=3)[0]["input_ids"].cuda()
    names = ["t1", "t0", "t2"]
    expected = _one_at_a_time(model, ids, names)
    serving.clear_mixed_batch_cache()
    builder, reader = torch.cuda.Stream(), torch.cuda.Stream()
    builder.wait_stream(torch.cuda.current_stream())
    reader.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(builder):
        torch.cuda._sleep(200_000_000)  # about 0.1 s of device time queued before the caches' kernels
        _logits(model, ids, adapter_names=names)  # builds the stacks and index tensors on `builder`
    with torch.cuda.stream(reader):  # no wait_stream: only the caches' own events order the two
        got = _logits(model, ids, adapter_names=names)
    torch.cuda.synchronize()
    torch.testing.assert_close(got.float(), expected.float(), atol=1e-4, rtol=1e-4)


class _FakeStream:
    def __init__(self, stream_id: int) -> None:
        self.device_index, self.stream_id, self.waited = 0, stream_id, []

    def wait_event(self, event) -> None:
        self.waited.append(event)


def test_cached_device_tensors_make_a_new_stream_wait_for_their_build_once(monkeypatch):
    """The logic of serving._OnDevice without a GPU: the building stream records an event and never waits on it;
    every other stream waits on it (and is recorded on the tensors) the first time it uses them, once."""
    streams = {"current": _FakeStream(1)}
    recorded, asked = [], []

    def current_stream(device=None):
        asked.append(streams["current"])
        return streams["current"]

    raw = lambda index: 1000 + streams["current"].stream_id  # noqa: E731  a stream's raw handle
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", raw, raising=False)
    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    monkeypatch.setattr(torch.cuda, "Event", lambda: type("E", (), {"record": lambda self, stream: recorded.append(("event", stream))})())
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: recorded.append(("tensor", stream)))
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: torch.device("cuda", 0)))
    guard = serving._OnDevice(torch.zeros(2), torch.zeros(3))
    monkeypatch.undo()
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", raw, raising=False)
    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: recorded.append(("tensor", stream)))
    monkeypatch.setattr(guard, "tensors", tuple(t.to("meta") for t in guard.tensors))  # device.index: None, any device
    builder = streams["current"]
    assert recorded == [("event", builder)]
    guard.used_here()
    assert builder.waited == [] and recorded == [("event", builder)]  # its own stream: neither a wait nor a record
    other = streams["current"] = _FakeStream(2)
    asked.clear()
    guard.used_here()
    guard.used_here()
    guard.used_here()
    assert other.waited == [guard._ready]  # waited once, on the build's event
    assert recorded[1:] == [("tensor", other), ("tensor", other)]
    assert asked == [other]  # later calls on the same stream read its raw handle only (no Stream object built)
    streams["current"] = builder
    guard.used_here()
    assert builder.waited == [] and len(recorded) == 3  # back on the building stream: nothing to wait for or record


def test_clearing_the_mixed_batch_cache_frees_the_per_batch_index_tensors_too():
    """The index tensors are cached per batch composition for every model: clear_mixed_batch_cache drops them
    (a long-running server that meets many compositions can free their memory)."""
    model = _multi_adapter_model("gpt2-fused", **LAYOUTS["blocks differ"])  # partial blocks: index tensors too
    ids = text_batches(batch=3)[0]["input_ids"]
    with torch.no_grad():
        before = model(input_ids=ids, adapter_names=["t1", "t0", "__base__"]).logits
    assert serving._rows.cache_info().currsize > 0 and serving._guarded_index.cache_info().currsize > 0
    serving.clear_mixed_batch_cache(model)
    assert serving._rows.cache_info().currsize == 0 and serving._guarded_index.cache_info().currsize == 0
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, adapter_names=["t1", "t0", "__base__"]).logits, before)


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


def _generated_alone(model, ids, names, **settings):
    """Each row generated on its own with its adapter set (``__base__``: adapters disabled), rows concatenated."""
    rows = []
    for row, name in enumerate(names):
        with torch.no_grad(), model.disable_adapter() if name == "__base__" else nullcontext():
            if name != "__base__":
                model.set_adapter(name)
            rows.append(model.generate(input_ids=ids[row : row + 1], **settings))
    return rows


@pytest.mark.parametrize("how", ["keywords", "generation_config", "model_generation_config"])
def test_generate_expands_adapter_names_to_the_rows_generate_makes(how):
    """generate repeats each input row max(num_beams, num_return_sequences) times, whether those come as keywords,
    a generation_config or the model's own (was: only a num_beams keyword; the others raised a length mismatch, as
    PEFT's LoRA does); each row matches that row generated alone."""
    model = _multi_adapter_model("llama", {"t0": 4, "t1": 4})
    ids = text_batches(batch=2)[0]["input_ids"]
    counts = {"num_beams": 2, "num_return_sequences": 2, "do_sample": False, "max_new_tokens": 4, "pad_token_id": 0}
    settings = {"keywords": counts, "generation_config": {"generation_config": GenerationConfig(**counts)},
                "model_generation_config": {}}[how]
    defaults = model.generation_config.to_dict()
    if how == "model_generation_config":
        for key, value in counts.items():
            setattr(model.generation_config, key, value)
    try:
        with torch.no_grad():
            mixed = model.generate(input_ids=ids, adapter_names=["t1", "t0"], **settings)
        alone = _generated_alone(model, ids, ["t1", "t0"], **settings)
    finally:
        model.generation_config.update(**defaults)
    assert mixed.shape[0] == 4 and torch.equal(mixed, torch.cat(alone))


def test_sampled_sequences_and_an_encoder_decoder_take_one_name_per_input_row():
    model = _multi_adapter_model("llama", {"t0": 4, "t1": 4})
    ids = text_batches(batch=2)[0]["input_ids"]
    with torch.no_grad():
        sampled = model.generate(input_ids=ids, adapter_names=["t1", "__base__"], do_sample=True, num_return_sequences=3,
                                 max_new_tokens=3, pad_token_id=0)
    assert sampled.shape == (6, ids.shape[1] + 3)
    # T5 with beams from its generation config: the encoder sees the 3 input rows, the decoder 3 x 2 beams.
    config = T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = get_peft_model(T5ForConditionalGeneration(config), GivaConfig(r=4, init_weights=False, target_modules=["q", "v", "wi"]),
                           adapter_name="x")
    model.add_adapter("y", GivaConfig(r=2, variant="VrUr", init_weights=False, target_modules=["q", "v"]))
    model.eval()
    model.generation_config.num_beams = 2
    ids = torch.randint(2, 100, (3, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mixed = model.generate(input_ids=ids, adapter_names=["x", "y", "__base__"], max_new_tokens=5)
    for row, expected in enumerate(_generated_alone(model, ids, ["x", "y", "__base__"], max_new_tokens=5)):
        assert torch.equal(mixed[row, : expected.shape[1]], expected[0]), row


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
    rows = results["rows"]
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
    assert run_serve(tmp_path, models=(tiny,), settings=ServeSettings(ns=(1, 3), rounds=2, r=4), progress=False)["rows"] == rows
    with pytest.raises(AssertionError, match="measured again"):  # other settings: measured afresh
        run_serve(tmp_path, models=(tiny,), settings=ServeSettings(ns=(1, 3), rounds=3, r=4), progress=False)


def test_serve_benchmark_resumes_at_the_first_unfinished_n(tmp_path, monkeypatch):
    import json

    import giva.bench.serve as serve

    tiny = serve.ServeModel("tiny-llama", tiny_llama, "all-linear", batch_size=4, seq_len=6, vocab_size=100)
    settings = serve.ServeSettings(ns=(1, 3), rounds=1, r=4)
    full = serve.run_serve(tmp_path, models=(tiny,), settings=settings, progress=False)["rows"]
    saved = json.loads((tmp_path / "results.json").read_text())
    saved["rows"] = [r for r in saved["rows"] if r["n_adapters"] == 1]  # as if interrupted during N = 3
    (tmp_path / "results.json").write_text(json.dumps(saved))
    timed: list[int] = []
    real = serve.time_interleaved
    monkeypatch.setattr(serve, "time_interleaved", lambda fns, rounds: timed.append(1) or real(fns, rounds))
    result = serve.run_serve(tmp_path, models=(tiny,), settings=settings, progress=False)
    resumed = result["rows"]
    assert len(timed) == 1 and result["ran"] == ["tiny-llama N=3"]  # only N = 3 was timed again, and said so
    again = serve.run_serve(tmp_path, models=(tiny,), settings=settings, progress=False)
    assert len(timed) == 1 and again["ran"] == [] and again["rows"] == resumed  # nothing left: nothing measured
    assert [r for r in resumed if r["n_adapters"] == 1] == [r for r in full if r["n_adapters"] == 1]
    # N = 3 is rebuilt as in a full run: the same batch rows and the same adapter memory
    key = ("distinct_adapters_in_batch", "adapter_bytes_total", "bytes_per_extra_adapter")
    assert [[r.get(k) for k in key] for r in resumed if r["n_adapters"] == 3] == [
        [r.get(k) for k in key] for r in full if r["n_adapters"] == 3
    ]


def test_serve_benchmark_re_measures_points_of_other_code_unless_told_to_keep_them(tmp_path, monkeypatch):
    """Each point's rows name the code commit they timed and when; a rerun by other code re-measures them (the
    dry run lists them), replacing a point's rows only once it is measured again; --keep-stale keeps them."""
    import giva.bench.serve as serve

    tiny = serve.ServeModel("tiny-llama", tiny_llama, "all-linear", batch_size=4, seq_len=6, vocab_size=100)
    settings = serve.ServeSettings(ns=(1, 3), rounds=1, r=4)
    old, new = "a" * 40, "b" * 40
    monkeypatch.setattr(serve, "code_commit", lambda: old)
    first = serve.run_serve(tmp_path, models=(tiny,), settings=settings, progress=False)["rows"]
    assert {r["commit"] for r in first} == {old} and all(r["started_utc"][:2] == "20" for r in first)
    assert "| aaaaaaa, 20" in (tmp_path / "results.md").read_text()
    assert serve.plan_serve(tmp_path, (tiny,), settings) == []

    monkeypatch.setattr(serve, "code_commit", lambda: new)  # the code changed since
    planned = serve.plan_serve(tmp_path, (tiny,), settings)
    assert planned == [f"serve: tiny-llama N={n}: base model, one merged adapter, mixed batches of giva, giva-bf16, lora "
                       "(recorded at commit aaaaaaa, the code is now bbbbbbb: stale)" for n in (1, 3)]
    assert serve.plan_serve(tmp_path, (tiny,), settings, keep_stale=True) == []
    timed: list[int] = []
    monkeypatch.setattr(serve, "time_interleaved", lambda fns, rounds: timed.append(1) or pytest.fail("measured"))
    kept = serve.run_serve(tmp_path, models=(tiny,), settings=settings, progress=False, keep_stale=True)
    assert timed == [] and kept["ran"] == [] and kept["rows"] == first

    def stop_at_the_second_point(fns, rounds):
        timed.append(1)
        if len(timed) == 2:
            raise KeyboardInterrupt
        return {name: [0.01] * rounds for name in fns}

    monkeypatch.setattr(serve, "time_interleaved", stop_at_the_second_point)
    with pytest.raises(KeyboardInterrupt):
        serve.run_serve(tmp_path, models=(tiny,), settings=settings, progress=False)
    saved = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert {(r["n_adapters"], r["commit"]) for r in saved} == {(1, new), (3, old)}  # N = 3 kept until re-measured
    resumed = serve.run_serve(tmp_path, models=(tiny,), settings=settings, progress=False)
    assert resumed["ran"] == ["tiny-llama N=3"] and {r["commit"] for r in resumed["rows"]} == {new}
    assert serve.plan_serve(tmp_path, (tiny,), settings) == []


def test_serve_benchmark_times_n_1_through_both_plain_single_adapter_forwards(tmp_path, monkeypatch):
    """At N = 1 GiVA and LoRA are both called without adapter_names (their one adapter active): given adapter_names,
    GiVA took its single-adapter path and PEFT LoRA its mixed-batch one. From N = 2 on both get adapter_names."""
    import giva.bench.serve as serve

    calls: list[tuple[int, str, tuple[str, ...]]] = []
    real = serve._forward

    def spy(model, ids, **kwargs):
        if hasattr(model, "peft_config"):
            kind = "lora" if "lora" in type(model.peft_config["t0"]).__name__.lower() else "giva"
            calls.append((len(model.peft_config), kind, tuple(kwargs)))
            assert model.active_adapter == "t0"
        return real(model, ids, **kwargs)

    monkeypatch.setattr(serve, "_forward", spy)
    tiny = serve.ServeModel("tiny-llama", tiny_llama, "all-linear", batch_size=4, seq_len=6, vocab_size=100, methods=("giva", "lora"))
    result = serve.run_serve(tmp_path, models=(tiny,), settings=serve.ServeSettings(ns=(1, 3), rounds=1, r=4), progress=False)
    assert sorted(calls) == [(1, "giva", ()), (1, "lora", ()), (3, "giva", ("adapter_names",)), (3, "lora", ("adapter_names",))]
    forwards = {(r["n_adapters"], r["method"]): r.get("forward") for r in result["rows"] if r.get("tokens_per_s") is not None}
    assert forwards == {(n, m): None if m in ("base model", "one merged adapter") else ("active adapter" if n == 1 else "adapter_names")
                        for n in (1, 3) for m in ("base model", "one merged adapter", "GiVA r=4", "LoRA r=4")}
    table = (tmp_path / "results.md").read_text()
    assert "| tiny-llama | 1 | 1 |" in table and "unlike for like) |" not in table
    assert result["headlines"][0].startswith("tiny-llama N=1: GiVA/LoRA single-adapter throughput x")
    # a point timed before the change (no 'forward' recorded) is marked as the unlike-for-like comparison it was
    saved = json.loads((tmp_path / "results.json").read_text())
    for row in saved["rows"]:
        row.pop("forward", None)
    (tmp_path / "results.json").write_text(json.dumps(saved))
    again = serve.run_serve(tmp_path, models=(tiny,), settings=serve.ServeSettings(ns=(1, 3), rounds=1, r=4), progress=False)
    assert "| tiny-llama | 1 (unlike for like) | 1 |" in (tmp_path / "results.md").read_text()
    assert again["headlines"][0].startswith("tiny-llama N=1: GiVA/LoRA N=1 unlike-for-like throughput x")


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
    rows = run_serve(tmp_path, models=(tiny,), settings=ServeSettings(ns=(1, 3), rounds=1, r=4), progress=False)["rows"]
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


def test_accelerator_serve_benchmark_dry_runs_on_the_cpu_with_tiny_shapes(tmp_path):
    from giva.bench.serve import GPU_METHODS, GpuServeSettings, run_serve_gpu

    shape = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 100, "max_position_embeddings": 64}
    settings = GpuServeSettings(ns=(1, 3), rows=4, tokens=(1, 5), r=4, rounds=2, device="cpu", shape=tuple(shape.items()))
    result = run_serve_gpu(tmp_path, settings, progress=False)
    rows = result["rows"]
    labels = [GPU_METHODS[m].format(r=4) for m in settings.methods]
    for n in (1, 3):
        for tokens in (1, 5):
            point = {r["method"]: r for r in rows if r["n_adapters"] == n and r["tokens"] == tokens}
            assert set(point) == {"base model", *labels, *(f"{label} / base model" for label in labels)}
            for label in labels:
                assert len(point[label]["seconds_per_round"]) == 2 and point[label]["distinct_adapters_in_batch"] <= n
                expected = [t / b for t, b in zip(point[label]["seconds_per_round"], point["base model"]["seconds_per_round"])]
                assert point[f"{label} / base model"]["per_round_ratio"] == pytest.approx(expected)
    table = (tmp_path / "results.md").read_text()
    assert table.count("\n| 3 | 5 |") == 1 and table.count("\n| 1 | 1 |") == 1
    meta = json.loads((tmp_path / "results.json").read_text())["meta"]
    assert meta["settings"]["device"] == "cpu" and meta["complete"] is True and "Cut short" not in table


def test_accelerator_serve_benchmark_cut_short_keeps_the_points_it_measured(tmp_path, monkeypatch):
    """Stopped in its second point (as by the device script's time limit, SIGINT), results.json and results.md
    already hold the first point, marked incomplete."""
    from giva.bench import serve
    from giva.bench.serve import GpuServeSettings, run_serve_gpu

    shape = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 100, "max_position_embeddings": 64}
    settings = GpuServeSettings(ns=(1, 3), rows=4, tokens=(1,), r=4, rounds=2, device="cpu", shape=tuple(shape.items()))
    timed = serve.time_interleaved
    calls = []

    def stopped_in_the_second_point(fns, rounds):
        calls.append(len(fns))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return timed(fns, rounds)

    monkeypatch.setattr(serve, "time_interleaved", stopped_in_the_second_point)
    with pytest.raises(KeyboardInterrupt):
        run_serve_gpu(tmp_path, settings, progress=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["meta"]["complete"] is False
    assert {(r["n_adapters"], r["tokens"]) for r in saved["rows"]} == {(1, 1)}
    table = (tmp_path / "results.md").read_text()
    assert "\n| 1 | 1 |" in table and "\n| 3 |" not in table and "Cut short" in table


def test_accelerator_serve_benchmark_builds_adapters_that_change_every_row():
    from giva.bench.serve import GpuServeSettings, _add_gpu_adapter, _llama, tuner_layers

    shape = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 100, "max_position_embeddings": 64}
    settings = GpuServeSettings(device="cpu", dtype="bfloat16", shape=tuple(shape.items()))
    ids = torch.randint(0, 100, (3, 4))
    base = _logits(_llama(settings), ids)
    for method in settings.methods:
        generator = torch.Generator().manual_seed(0)
        model = _add_gpu_adapter(_llama(settings), method, "t0", 4, generator=generator)
        _add_gpu_adapter(model, method, "t1", 4, tuner_layers(model), generator)
        model.eval()
        mixed = _logits(model, ids, adapter_names=["t0", "t1", "__base__"])
        assert torch.equal(mixed[2], base[2])
        assert not torch.allclose(mixed[0], base[0]) and not torch.allclose(mixed[0], mixed[1])
        for name in ("t0", "t1"):  # PEFT's default keeps adapter weights in fp32; "lora" keeps LoRA's in the model's bf16
            dtypes = {p.dtype for n, p in model.named_parameters() if f".{name}." in n or n.endswith(f".{name}")}
            assert dtypes == {torch.bfloat16 if method == "lora" else torch.float32}, (method, name)


def test_accelerator_serve_settings_reject_bad_values():
    from giva.bench.serve import GpuServeSettings

    with pytest.raises(ValueError, match="GpuServeSettings.tokens"):
        GpuServeSettings(tokens=(0,))
    with pytest.raises(ValueError, match="GpuServeSettings.methods"):
        GpuServeSettings(methods=("nosuch",))
    with pytest.raises(ValueError, match="^GpuServeSettings.ns"):
        GpuServeSettings(ns=(8, 1))


def test_serve_plan_lists_what_this_machine_would_measure(monkeypatch):
    from giva.bench.serve import serve_plan

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert serve_plan() == [
        "serve (gpu): Llama 1B-shaped bfloat16 x ('base model', 'GiVA r=8', 'LoRA r=8 (bf16 adapters)', "
        "'LoRA r=8 (PEFT default: fp32 adapters)') x N=(1, 8, 32, 128) x tokens per row=(1, 256), 32 rows"
    ]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert [line.split(" x ")[0] for line in serve_plan()] == ["serve: MiniLM-L6", "serve: SmolLM2-135M"]


def test_mixed_batch_names_an_adapter_the_model_does_not_have():
    model = get_peft_model(tiny_llama(), GivaConfig(r=2, init_weights=False, target_modules=["q_proj"]))
    model.add_adapter("other", GivaConfig(r=2, init_weights=False, target_modules=["v_proj"]))
    model.eval()
    ids = torch.randint(0, 100, (3, 5), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="adapter_names names adapter\\(s\\) that do not exist: nosuch"):
        _logits(model, ids, adapter_names=["default", "other", "nosuch"])
    _logits(model, ids, adapter_names=["default", "other", "__base__"])  # adapters on disjoint layers are all known


def test_an_adapter_may_not_be_named_as_the_base_model_rows(tmp_path):
    """``"__base__"`` names the rows of a mixed batch that get no adapter; an adapter of that name was accepted, and
    those rows then got it. Refused wherever an adapter is made, leaving the model as it was."""
    model = get_peft_model(tiny_llama(), GivaConfig(r=2, init_weights=False, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "saved")
    before = {name: p.clone() for name, p in model.named_parameters()}
    match = "adapter name '__base__' is PEFT's name for the base model in mixed batches"
    with pytest.raises(ValueError, match=match):
        model.add_adapter("__base__", GivaConfig(r=2, init_weights=False, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=match):
        model.load_adapter(str(tmp_path / "saved"), adapter_name="__base__")
    with pytest.raises(ValueError, match=match):
        get_peft_model(tiny_llama(), GivaConfig(r=2, target_modules=["q_proj"]), adapter_name="__base__")
    assert list(model.peft_config) == ["default"] and model.active_adapters == ["default"]
    assert {name: p for name, p in model.named_parameters()}.keys() == before.keys()
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    model.eval()
    ids = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(0))
    with model.disable_adapter():
        base = _logits(model, ids)
    assert torch.equal(_logits(model, ids, adapter_names=["__base__", "default"])[0], base[0])


@pytest.mark.parametrize("layout", ["shared B", "ranks and B differ"])
def test_a_mixed_batch_under_inference_mode_leaves_the_caches_usable_for_training(layout):
    """The per-row index tensors are cached across forwards: built under ``torch.inference_mode()`` (a serving
    pass) they must still serve a later mixed batch with autograd on, whose vectors get their own rows' gradients."""
    case = "llama" if layout == "shared B" else "bert"
    model = _multi_adapter_model(case, **LAYOUTS[layout])
    ids = text_batches(batch=5)[0]["input_ids"]
    names = ["t1", "t0", "__base__", "t2", "t1"]
    serving.clear_mixed_batch_cache()
    with torch.inference_mode():
        served = model(input_ids=ids, adapter_names=names).logits
    vectors = [p.requires_grad_() for n, p in model.named_parameters() if "giva_lambda" in n]
    trained = model(input_ids=ids, adapter_names=names).logits
    trained.square().sum().backward()
    assert torch.allclose(trained.detach(), served, atol=1e-6)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in vectors)


def test_a_mixed_batch_that_could_train_refuses_uninitialised_gradient_bases():
    """Every adapter of a mixed batch gets the one-adapter forward's guard: with autograd on and trainable vectors,
    zero gradient bases would give every vector a zero gradient, silently."""
    torch.manual_seed(0)
    targets = CASES["llama"][1]
    model = get_peft_model(tiny_llama(), GivaConfig(r=4, target_modules=targets), adapter_name="a")
    model.add_adapter("b", GivaConfig(r=4, target_modules=targets))
    model.base_model.set_adapter(["a", "b"])  # both trainable
    model.eval()  # mixed batches are an eval-mode API; eval-mode training is the silent case
    ids = text_batches(batch=2)[0]["input_ids"]
    for names in (["a", "a"], ["a", "b"], ["__base__", "b"]):
        with pytest.raises(giva.BasesNotInitializedError, match="before its bases were initialised"):
            model(input_ids=ids, adapter_names=names)
    with torch.no_grad():  # inference stays allowed: the adapters are identities until initialised
        assert torch.equal(model(input_ids=ids, adapter_names=["a", "b"]).logits,
                           model(input_ids=ids, adapter_names=["__base__", "__base__"]).logits)


def test_a_mixed_batch_runs_in_fp32_when_an_adapter_asks_for_fp32_adapter_maths():
    """``compute_dtype="float32"`` holds in mixed batches too: on a bf16 model every product of the adapter maths is
    fp32 (only the base layer's is bf16), and each row matches its adapter alone."""
    torch.manual_seed(0)
    config = dict(r=4, target_modules=["q_proj"], init_weights=False)
    model = get_peft_model(tiny_llama(), GivaConfig(**config, compute_dtype="float32"), adapter_name="a")
    model.add_adapter("b", GivaConfig(**config))
    model = model.to(torch.bfloat16).eval()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 5, layer.in_features, dtype=torch.bfloat16)

    class _Products(TorchDispatchMode):
        dtypes: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func.overloadpacket).split(".")[-1] in ("mm", "bmm", "addmm", "matmul"):
                self.dtypes.append(next(a.dtype for a in args if isinstance(a, torch.Tensor) and a.dim() >= 2))
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), _Products() as products:
        mixed = layer(x, adapter_names=["a", "b", "a"])
    assert products.dtypes.count(torch.bfloat16) == 1 and products.dtypes.count(torch.float32) >= 2  # base: bf16
    with torch.no_grad():
        for row, name in enumerate(["a", "b", "a"]):
            layer.set_adapter(name)
            torch.testing.assert_close(mixed[row], layer(x)[row], atol=2e-3, rtol=1e-2)  # bf16 outputs


def test_a_mixed_batch_under_autocast_keeps_the_fp32_adapter_maths():
    """Under ``torch.autocast`` (Trainer's bf16 evaluation) an adapter that asks for ``compute_dtype="float32"`` still
    gets fp32 products in a mixed batch (autocast ran them all in bf16), and the vectors' gradients are those of the
    same batch without autocast, to fp32 rounding."""
    torch.manual_seed(0)
    config = dict(r=4, target_modules=["q_proj"], init_weights=False)
    model = get_peft_model(tiny_llama(), GivaConfig(**config, compute_dtype="float32"), adapter_name="a")
    model.add_adapter("b", GivaConfig(**config))
    model.eval()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    vectors = [p.requires_grad_() for n, p in layer.named_parameters() if "giva_lambda" in n]
    x = torch.randn(3, 5, layer.in_features)
    weight = torch.randn(3, 5, layer.out_features).to(torch.bfloat16).float()  # held exactly by a bf16 output
    names = ["a", "b", "a"]

    class _Products(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.dtypes: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func.overloadpacket).split(".")[-1] in ("mm", "bmm", "addmm", "matmul"):
                self.dtypes.append(next(a.dtype for a in args if isinstance(a, torch.Tensor) and a.dim() >= 2))
            return func(*args, **(kwargs or {}))

    expected = torch.autograd.grad((layer(x, adapter_names=names).float() * weight).sum(), vectors)
    with torch.autocast("cpu", dtype=torch.bfloat16), _Products() as products:
        out = layer(x, adapter_names=names)
    got = torch.autograd.grad((out.float() * weight).sum(), vectors)  # outside autocast, as Trainer runs it
    assert out.dtype == torch.bfloat16
    assert products.dtypes.count(torch.bfloat16) == 1 and products.dtypes.count(torch.float32) >= 2  # base: bf16
    for g, e in zip(got, expected):
        assert torch.allclose(g, e, rtol=1e-5, atol=1e-7), (g - e).abs().max()
