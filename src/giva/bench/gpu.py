"""`giva bench --suite gpu`: GiVA's training step against PEFT's on Llama-shaped models, in one process.

Randomly initialised Llama shapes ("1B": hidden 2048, MLP 5632, 22 layers; "8B": 4096, 14336, 32),
built directly on the device in bf16, every linear projection of every block adapted, r=8, one
batch of 4 x 1024 random tokens, AdamW. Rows, per shape:

* ``floor``          no adapter, every weight frozen, the backward starting where the adapters start it
                     (every targeted projection's output): no adapter's step can be shorter
* ``lora``           PEFT LoRA r=8 as PEFT builds it by default (``autocast_adapter_dtype=True``:
                     fp32 adapter weights, so the adapter maths runs in fp32)
* ``lora-bf16``      the same with ``autocast_adapter_dtype=False`` (adapter maths in bf16)
* ``giva``           GiVA r=8, eager (random orthonormal bases: the step does not depend on their values)
* ``vera``           PEFT VeRA r=256
* ``giva-compiled``  GiVA r=8 with every decoder block under ``torch.compile`` (regional compilation:
                     two graphs, one for block 0, whose input needs no gradient, and one reused by every
                     other block); the compile time of the warm-up steps, the graphs and any
                     recompilation are reported apart
* ``init-sketch`` / ``init-exact``  ``giva.initialize`` on ``init_batches`` batches: time and peak
* ``loraga``         PEFT's ``preprocess_loraga`` + ``get_peft_model`` on the same batches: its peak
                     is the anchor for GiVA's initialisation
* ``qlora-4bit`` / ``giva-4bit``  LoRA r=8 against GiVA r=8 on the same NF4 base (bitsandbytes);
                     skipped, with the reason, when bitsandbytes does not import

Each step row reports the median step time (CUDA events, or ``perf_counter`` on CPU), the peak
memory (``torch.cuda.max_memory_allocated`` reset before the row; VmHWM on CPU) and, from one step
under ``torch.profiler``, the kernel launches of a step (CUDA runtime launch calls) and the aten
operators it ran. Rows run in priority order (:func:`plan`); ``results.json``, ``results.md`` and
``steps.png`` are rewritten after every row; a row whose expected cost would end past ``budget_s`` is
skipped with that reason (the next, cheaper ones still run), and so is an 8B initialisation row that
would not fit in the GPU's free memory; an interrupt (the device script's time limit sends SIGINT) records
the row it stopped and the rows not reached, so a run cut short keeps everything it measured.

``--tiny`` runs the same code on tiny shapes and a few steps (CPU, CI); there the compiled row uses
the ``aot_eager`` backend (no C++ toolchain needed), and the figures mean nothing.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import logging
import os
import shutil
import statistics
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .names import GPU_SUITE
from .runner import peak_rss_bytes, reset_peak_rss, write_json_atomically
from .versions import versions

logger = logging.getLogger(__name__)

SCHEMA = 1
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
STEP_ROWS = ("floor", "lora", "lora-bf16", "giva", "vera")
COMPILE_ROWS = ("giva-compiled",)
INIT_ROWS = ("init-sketch", "init-exact", "loraga")
QUANT_ROWS = ("qlora-4bit", "giva-4bit")
ROWS = STEP_ROWS + COMPILE_ROWS + INIT_ROWS + QUANT_ROWS
KEY_ROWS = ("floor", "lora", "lora-bf16", "giva")  # the step ratios the targets use
ROW_GROUPS = {**{r: "step" for r in STEP_ROWS}, **{r: "compile" for r in COMPILE_ROWS},
              **{r: "init" for r in INIT_ROWS}, "init-sketch": "sketch", **{r: "quant" for r in QUANT_ROWS}}
ROW_LABELS = {
    "floor": "frozen floor (no adapter, backward from every projection's output)",
    "lora": "PEFT LoRA r=8, default (fp32 adapter math)",
    "lora-bf16": "PEFT LoRA r=8, bf16 adapter math (autocast_adapter_dtype=False)",
    "giva": "GiVA r=8, eager",
    "vera": "PEFT VeRA r=256",
    "giva-compiled": "GiVA r=8, torch.compile (every decoder block)",
    "init-sketch": "GiVA initialize, mode='sketch'",
    "init-exact": "GiVA initialize, mode='exact'",
    "loraga": "PEFT LoRA-GA preprocess_loraga + get_peft_model",
    "qlora-4bit": "PEFT LoRA r=8 on an NF4 base (QLoRA)",
    "giva-4bit": "GiVA r=8 on the same NF4 base",
}
# CUDA runtime / driver calls that launch kernels (cudaLaunchKernel, cudaLaunchKernelExC, cuLaunchKernelEx, with
# or without a version suffix), and CUDA graph replays (one launch each)
LAUNCH_PREFIXES = ("cudaLaunchKernel", "cudaLaunchCooperativeKernel", "cuLaunchKernel", "cuLaunchCooperativeKernel",
                   "cudaGraphLaunch", "cuGraphLaunch")
GB = 1e9


@dataclass(frozen=True)
class GpuShape:
    """A randomly initialised Llama-style causal LM."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int = 32000


@dataclass(frozen=True)
class GpuSettings:
    """Everything a run of the suite shares; ``TINY`` is the CPU/CI version of ``FULL``."""

    shapes: tuple[GpuShape, ...]
    rank: int = 8
    vera_rank: int = 256
    batch_size: int = 4
    seq_len: int = 1024
    dtype: str = "bfloat16"
    warmup_steps: int = 3
    steps: int = 10
    init_batches: int = 2  # k: calibration batches of GiVA's initialisation and of LoRA-GA's preprocessing
    lr: float = 1e-4
    compile_backend: str = "inductor"
    quant_shapes: tuple[str, ...] = ("1B",)  # 4-bit rows (they write the base to disk and quantise it on load)
    budget_s: float = 240.0  # a row expected to end later than this is skipped
    # (shape, row group, seconds): a row's expected cost (build, warm-up, timed and profiled steps) until a row of
    # the same group has run on the shape, whose time then serves; a guess on the high side for one H100 / H200
    expected_seconds: tuple[tuple[str, str, float], ...] = ()
    tiny: bool = False
    rows: tuple[str, ...] = ROWS

    def __post_init__(self) -> None:
        unknown = [r for r in self.rows if r not in ROWS]
        if unknown:
            raise ValueError(f"GpuSettings.rows: unknown row(s) {unknown}; known: {list(ROWS)}")
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"GpuSettings.dtype: expected 'bfloat16', 'float16' or 'float32', got {self.dtype!r}")
        if min(self.warmup_steps, self.steps, self.init_batches) < 1:
            raise ValueError("GpuSettings.warmup_steps, steps and init_batches must each be >= 1, got "
                             f"{self.warmup_steps}, {self.steps}, {self.init_batches}")


FULL = GpuSettings(
    shapes=(GpuShape("1B", 2048, 5632, 22, 32, 4), GpuShape("8B", 4096, 14336, 32, 32, 8)),
    expected_seconds=(("1B", "step", 15.0), ("1B", "compile", 100.0), ("1B", "init", 20.0), ("1B", "sketch", 15.0),
                      ("1B", "quant", 45.0),
                      ("8B", "step", 30.0), ("8B", "compile", 130.0), ("8B", "init", 45.0), ("8B", "sketch", 30.0),
                      ("8B", "quant", 90.0)),
)
TINY = GpuSettings(
    shapes=(GpuShape("tiny-a", 64, 160, 2, 4, 2, vocab=256), GpuShape("tiny-b", 96, 224, 3, 4, 2, vocab=256)),
    vera_rank=32, batch_size=2, seq_len=32, warmup_steps=1, steps=3, init_batches=2,
    compile_backend="aot_eager", quant_shapes=("tiny-a",), budget_s=1800.0, tiny=True,
    expected_seconds=tuple((s, g, t) for s in ("tiny-a", "tiny-b")
                           for g, t in (("step", 3.0), ("compile", 15.0), ("init", 5.0), ("sketch", 5.0), ("quant", 10.0))),
)


def shape_parameters(shape: GpuShape) -> tuple[int, int]:
    """(parameters of the targeted projections, all parameters) of the shape's model (norms left out)."""
    kv = shape.kv_heads * (shape.hidden // shape.heads)
    per_block = 2 * shape.hidden * shape.hidden + 2 * shape.hidden * kv + 3 * shape.hidden * shape.intermediate
    targeted = shape.layers * per_block
    return targeted, targeted + 2 * shape.vocab * shape.hidden  # untied embeddings and head


def plan(settings: GpuSettings) -> list[tuple[str, str]]:
    """(shape, row) in priority order, so that a run cut short has the issue's key numbers first:

    1. floor, LoRA (default and bf16) and eager GiVA, largest shape first: the step ratios (8B's overhead target);
    2. ``giva-compiled`` on the smallest shape, whose step is bound by launches (the issue's targets there are
       "compiled or eager"; a minute or more of compilation);
    3. ``init-sketch``, smallest shape first: GiVA's initialisation peak against a step (a few seconds);
    4. the 4-bit pair: GiVA's peak against QLoRA's (tens of seconds);
    5. ``init-exact`` and ``loraga`` on the smallest shape;
    6. ``giva-compiled`` on the other shapes, VeRA, then the other shapes' ``init-exact`` and ``loraga`` (the
       largest memory, guarded by the free memory).
    """
    by_size = sorted(settings.shapes, key=lambda s: shape_parameters(s)[1], reverse=True)
    smallest, others = by_size[-1:], by_size[:-1]
    phases: list[tuple[list[GpuShape], tuple[str, ...]]] = [
        (by_size, KEY_ROWS),
        (smallest, ("giva-compiled",)),
        (by_size[::-1], ("init-sketch",)),
        ([s for s in settings.shapes if s.name in settings.quant_shapes], QUANT_ROWS),
        (smallest, ("init-exact", "loraga")),
        (others, ("giva-compiled",)),
        (by_size, ("vera",)),
        (others[::-1], ("init-exact", "loraga")),
    ]
    order = []
    for shapes, rows in phases:
        for shape in shapes:
            order += [(shape.name, row) for row in rows if row in settings.rows]
    return order


# Row groups whose rows cost alike (a build, warm-up, timed and profiled steps): once one has run on a shape, the
# longest measured one replaces the guess. In the others a cheap row measured first (``init-sketch``) must not vouch
# for the dearer ones (``init-exact``, ``loraga``: dense gradients, an SVD each), so the guess stays a floor.
MEASURED_REPLACES_GUESS = ("step", "quant")


def expected_seconds(settings: GpuSettings, shape: str, row: str, done: Sequence[dict[str, Any]]) -> float:
    """What the row is expected to cost: the settings' guess for its group (0 when it has none), or the longest
    measured row of its group on the shape, replacing the guess in :data:`MEASURED_REPLACES_GUESS`' groups and
    never below it in the others."""
    group = ROW_GROUPS[row]
    measured = [r["row_seconds"] for r in done
                if r["shape"] == shape and ROW_GROUPS[r["row"]] == group and r["status"] == "ok"]
    guess = next((t for s, g, t in settings.expected_seconds if s == shape and g == group), 0.0)
    if measured and group in MEASURED_REPLACES_GUESS:
        return max(measured)
    return max([guess, *measured])


def memory_problem(row: str, shape: GpuShape, device: torch.device, done: Sequence[dict[str, Any]]) -> Optional[str]:
    """Why an initialisation row cannot fit in the GPU's free memory (None if it may): a GiVA step's peak (the
    weights and a batch's activations; three times the weights when no GiVA row was measured) plus, for
    ``init-exact``, the dense fp32 gradient of every targeted weight, for ``loraga``, their bf16 gradients."""
    if device.type != "cuda" or row not in ("init-exact", "loraga"):
        return None
    targeted, total = shape_parameters(shape)
    step_peak = next((r["peak_bytes"] for r in done if r["shape"] == shape.name and r["row"] == "giva"
                      and r["status"] == "ok"), 3 * 2 * total)
    need = step_peak + targeted * (4 if row == "init-exact" else 2)
    free, _ = torch.cuda.mem_get_info(device)
    if need <= free:
        return None
    what = "fp32 gradient matrices G" if row == "init-exact" else "bf16 weight gradients"
    return (f"needs about {need / 2**30:.0f} GiB (a GiVA step's peak {step_peak / 2**30:.0f} GiB + the {what} of the "
            f"targeted weights), {free / 2**30:.0f} GiB free")


# ---------------------------------------------------------------------------------------------
# Device, memory and timing


def _dtype(name: str) -> torch.dtype:
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, Any]]:
    """Peak memory of the ``with`` block in bytes: ``max_memory_allocated`` on CUDA (reset on entry), the
    process's VmHWM on CPU (reset through /proc/self/clear_refs where Linux allows it)."""
    out: dict[str, Any] = {}
    _free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        out["memory_how"] = "torch.cuda.max_memory_allocated, reset before the measurement"
    else:
        out["memory_how"] = reset_peak_rss()
    try:
        yield out
    finally:
        _synchronize(device)
        out["peak_bytes"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()


def timed(device: torch.device, fn: Callable[[], Any]) -> float:
    """Seconds ``fn`` takes, synchronised with the device before and after."""
    _synchronize(device)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    return time.perf_counter() - start


def step_times(device: torch.device, step: Callable[[], None], n: int) -> list[float]:
    """Seconds of each of ``n`` back-to-back steps: CUDA events around each step (one synchronisation at
    the end, so launches are not serialised against the GPU), or ``perf_counter`` on CPU."""
    if device.type != "cuda":
        out = []
        for _ in range(n):
            start = time.perf_counter()
            step()
            out.append(time.perf_counter() - start)
        return out
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for start, end in events:
        start.record()
        step()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) / 1000 for start, end in events]


def count_launches(events: Sequence[tuple[str, Any]]) -> dict[str, Optional[int]]:
    """From profiler events as (name, device type): CUDA launch calls, GPU kernels and aten operators. Launches
    and kernels are None when no CUDA event was recorded (a CPU run)."""
    from torch.autograd import DeviceType

    cuda = [name for name, device_type in events if device_type == DeviceType.CUDA]
    launches = sum(1 for name, _ in events if name.startswith(LAUNCH_PREFIXES))
    return {
        "kernel_launches": launches if cuda or launches else None,
        # device activity that is a kernel: copies and fills (Memcpy HtoD, Memset) are recorded there too
        "gpu_kernels": sum(1 for name in cuda if not name.startswith(("Memcpy", "Memset"))) if cuda else None,
        "aten_ops": sum(1 for name, _ in events if name.startswith("aten::")),
    }


def profiler_events(prof: Any) -> list[tuple[str, Any]]:
    """(name, device type) of every event a finished ``torch.profiler.profile`` recorded, read from its raw
    results: building its FunctionEvent tree (``prof.events()``) took seconds for one 22-layer step."""
    raw = getattr(getattr(prof, "profiler", None), "kineto_results", None)
    if raw is None:
        return [(e.name, e.device_type) for e in prof.events()]
    return [(e.name(), e.device_type()) for e in raw.events()]


def profile_step(device: torch.device, step: Callable[[], None]) -> dict[str, Optional[int]]:
    """Launch counts of one step under ``torch.profiler`` (after the timed steps: warm caches, no compilation)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _synchronize(device)
    with profile(activities=activities) as prof:
        step()
        _synchronize(device)
    return count_launches(profiler_events(prof))


# ---------------------------------------------------------------------------------------------
# Models


def build_base(shape: GpuShape, settings: GpuSettings, device: torch.device) -> nn.Module:
    """The seeded random-init causal LM, built on ``device`` in the suite's dtype (never through fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=max(settings.seq_len, 256), tie_word_embeddings=False, use_cache=False,
    )
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(_dtype(settings.dtype))
    try:
        with device:
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.train()


def make_batches(shape: GpuShape, settings: GpuSettings, device: torch.device, count: int) -> list[dict[str, torch.Tensor]]:
    """``count`` seeded batches of random token ids (labels = inputs)."""
    out = []
    for i in range(count):
        generator = torch.Generator().manual_seed(1000 + i)
        ids = torch.randint(0, shape.vocab, (settings.batch_size, settings.seq_len), generator=generator).to(device)
        out.append({"input_ids": ids, "labels": ids, "use_cache": False})
    return out


def _giva_config(settings: GpuSettings, variant: str) -> Any:
    from ..config import GivaConfig

    return GivaConfig(r=settings.rank, target_modules=list(TARGETS), variant=variant, seed=0, task_type="CAUSAL_LM")


def adapt(row: str, base: nn.Module, settings: GpuSettings) -> nn.Module:
    """``base`` with the adapter of a step row (``floor``: frozen, with the backward reaching the inputs)."""
    from peft import LoraConfig, VeraConfig, get_peft_model

    from .methods import _floor_model

    if row == "floor":
        return _floor_model(base, TARGETS)
    targets = list(TARGETS)
    if row in ("lora", "lora-bf16", "qlora-4bit"):
        config = LoraConfig(r=settings.rank, lora_alpha=2 * settings.rank, target_modules=targets, task_type="CAUSAL_LM")
        return get_peft_model(base, config, autocast_adapter_dtype=row != "lora-bf16")
    if row == "vera":
        return get_peft_model(base, VeraConfig(r=settings.vera_rank, target_modules=targets, projection_prng_key=0,
                                               task_type="CAUSAL_LM"))
    if row in ("giva", "giva-compiled", "giva-4bit"):
        return get_peft_model(base, _giva_config(settings, "random"))  # the step does not depend on the bases' values
    raise ValueError(f"row {row!r} trains no adapter")


def compile_blocks(model: nn.Module, backend: str) -> int:
    """``torch.compile`` every decoder block in place (regional compilation); returns how many."""
    torch._dynamo.reset()  # a graph compiled for another shape must not make this one's dynamic
    torch._dynamo.utils.counters.clear()
    compiled_frames()  # from here on
    blocks = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    for block in blocks:
        block.compile(backend=backend)
    return len(blocks)


def compiled_frames() -> list[tuple[str, Optional[str]]]:
    """(function, recompile reason or None) of each frame dynamo compiled since the last call (which clears them)."""
    from torch._dynamo import utils

    metrics = utils.get_compilation_metrics()
    utils.clear_compilation_metrics()
    # backward compilations carry no function name (some torch versions record them as another class)
    return [(m.co_name, getattr(m, "recompile_reason", None)) for m in metrics if getattr(m, "co_name", None)]


def compile_record(frames: list[tuple[str, Optional[str]]], warmup: list[float], median: float) -> dict[str, Any]:
    """What compilation cost, read once the warm-up steps have run (a recompilation shows on the second call)."""
    counters = torch._dynamo.utils.counters
    reasons = [reason for _, reason in frames if reason]
    return {
        "first_step_seconds": warmup[0],
        # every warm-up step's time above the median step: tracing, compilation of forward and backward, recompiles
        "compile_seconds": sum(max(0.0, t - median) for t in warmup),
        "dynamo_frames_compiled": len(frames),
        "dynamo_unique_graphs": counters["stats"].get("unique_graphs", 0),
        "dynamo_recompiles": len(reasons),
        "dynamo_recompile_reasons": sorted(set(reasons))[:5],
        "dynamo_graph_breaks": sum(counters["graph_break"].values()),
        "dynamo_graph_break_reasons": sorted(counters["graph_break"])[:5],
    }


def quantized_base(shape: GpuShape, settings: GpuSettings, device: torch.device, scratch: Path) -> nn.Module:
    """The shape's base written to ``scratch`` once, then loaded with NF4 double quantisation (QLoRA's recipe)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    folder = scratch / f"{shape.name}-base"
    if not (folder / "config.json").exists():
        base = build_base(shape, settings, device)
        base.save_pretrained(folder)
        del base
        _free(device)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=_dtype(settings.dtype))
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, dtype=_dtype(settings.dtype),
                                                 device_map={"": device.index or 0} if device.type == "cuda" else {"": "cpu"})
    model.config.use_cache = False
    return model.train()


def bitsandbytes_problem() -> Optional[str]:
    """Why the 4-bit rows cannot run here (None if they can)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (pip install bitsandbytes)"
    try:
        import bitsandbytes  # noqa: F401
    except Exception as err:  # a broken install raises anything from ImportError to a CUDA error
        return f"bitsandbytes does not import: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return None


# ---------------------------------------------------------------------------------------------
# Rows


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def measure_step(row: str, model: nn.Module, batch: dict[str, Any], settings: GpuSettings, device: torch.device,
                 compile_backend: Optional[str] = None) -> dict[str, Any]:
    """Median step time, peak memory and launch counts of one step row (forward, backward, AdamW)."""
    params = _trainable(model)
    optimizer = torch.optim.AdamW(params, lr=settings.lr) if row != "floor" else None
    record: dict[str, Any] = {
        "trainable_parameters": sum(p.numel() for p in params) if optimizer else 0,
        "trainable_dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in params}) if optimizer else [],
    }

    def step() -> None:
        model(**batch).loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    # blocks past dynamo's recompile limit (8 by default) would silently run eager
    limit = torch._dynamo.config.patch(recompile_limit=256) if compile_backend is not None else nullcontext()
    with limit:
        with peak_memory(device) as memory:
            if compile_backend is not None:
                record.update(compiled_blocks=compile_blocks(model, compile_backend), compile_backend=compile_backend)
            warm = step_times(device, step, settings.warmup_steps)
            frames = compiled_frames() if compile_backend is not None else []
            times = step_times(device, step, settings.steps)
        record.update(profile_step(device, step))
        if compile_backend is not None:
            record.update(compile_record(frames, warm, statistics.median(times)))
            record["dynamo_frames_compiled_after_warmup"] = len(compiled_frames())  # 0, or the median includes compiling
    record.update(
        median_step_seconds=statistics.median(times), step_seconds=[round(t, 6) for t in times],
        warmup_step_seconds=[round(t, 6) for t in warm], peak_bytes=memory["peak_bytes"], memory_how=memory["memory_how"],
    )
    return record


def measure_init(row: str, shape: GpuShape, settings: GpuSettings, device: torch.device) -> dict[str, Any]:
    """Time and peak of GiVA's initialisation (``init-sketch`` / ``init-exact``) or LoRA-GA's preprocessing."""
    base = build_base(shape, settings, device)
    data = make_batches(shape, settings, device, settings.init_batches)
    record: dict[str, Any] = {"init_batches": settings.init_batches}
    if row == "loraga":
        from peft import LoraConfig, get_peft_model
        from peft.tuners.lora.config import LoraGAConfig
        from peft.tuners.lora.loraga import preprocess_loraga

        config = LoraConfig(r=settings.rank, target_modules=list(TARGETS), init_lora_weights="lora_ga",
                            lora_ga_config=LoraGAConfig(), task_type="CAUSAL_LM")

        def train_step() -> None:
            for batch in data:
                base(**batch).loss.backward()

        def work() -> None:
            preprocess_loraga(base, config, train_step)
            get_peft_model(base, config)
    else:
        from ..init import initialize

        model = adapt_for_init(base, settings)
        mode = row.removeprefix("init-")
        record["mode"] = mode

        def work() -> None:
            report = initialize(model, data, num_batches=len(data), progress=False, mode=mode)
            record.update(gradient_seconds=report.gradient_seconds, svd_seconds=report.svd_seconds)

    with peak_memory(device) as memory:
        record["seconds"] = timed(device, work)
    record.update(peak_bytes=memory["peak_bytes"], memory_how=memory["memory_how"])
    return record


def adapt_for_init(base: nn.Module, settings: GpuSettings) -> nn.Module:
    from peft import get_peft_model

    return get_peft_model(base, _giva_config(settings, "Vr"))


def run_row(row: str, shape: GpuShape, settings: GpuSettings, device: torch.device, scratch: Path) -> dict[str, Any]:
    """One row's record (the caller adds status and identity)."""
    if row in INIT_ROWS:
        return measure_init(row, shape, settings, device)
    if row in QUANT_ROWS:
        base = quantized_base(shape, settings, device, scratch)
    else:
        base = build_base(shape, settings, device)
    model = adapt(row, base, settings)
    batch = make_batches(shape, settings, device, 1)[0]
    backend = settings.compile_backend if row in COMPILE_ROWS else None
    return measure_step(row, model, batch, settings, device, compile_backend=backend)


# ---------------------------------------------------------------------------------------------
# Ratios and report


def _get(rows: dict[str, dict[str, Any]], row: str, key: str) -> Optional[float]:
    record = rows.get(row)
    return record.get(key) if record and record.get("status") == "ok" else None


def _div(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def shape_ratios(rows: dict[str, dict[str, Any]]) -> dict[str, Optional[float]]:
    """The targets' ratios for one shape (row name -> record); None where a row is missing."""
    step = {name: _get(rows, name, "median_step_seconds") for name in ROWS}
    peak = {name: _get(rows, name, "peak_bytes") for name in ROWS}
    floor = step["floor"]

    def above_floor(name: str) -> Optional[float]:
        return step[name] - floor if step[name] is not None and floor is not None else None

    out: dict[str, Optional[float]] = {}
    for name in ("giva", "giva-compiled", "vera", "lora-bf16"):
        out[f"{name}_over_lora"] = _div(step[name], step["lora"])
    for name in ("giva", "giva-compiled"):
        out[f"{name}_over_lora_bf16"] = _div(step[name], step["lora-bf16"])
        # GiVA's time above the floor as a fraction of bf16 LoRA's (target at 8B: <= 0.85)
        out[f"{name}_overhead_over_lora_bf16_overhead"] = _div(above_floor(name), above_floor("lora-bf16"))
    for name in ("init-sketch", "init-exact", "loraga"):
        key = name.replace("-", "_")
        out[f"{key}_peak_over_giva_step"] = _div(peak[name], peak["giva"])
        out[f"{key}_seconds_over_giva_step"] = _div(_get(rows, name, "seconds"), step["giva"])
    out["giva_4bit_over_qlora_step"] = _div(step["giva-4bit"], step["qlora-4bit"])
    out["giva_4bit_over_qlora_peak"] = _div(peak["giva-4bit"], peak["qlora-4bit"])
    return out


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {**versions(), "device": str(device), "cuda": torch.version.cuda}
    env["gpu"] = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    env["gpu_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    env["allow_tf32"] = torch.backends.cuda.matmul.allow_tf32  # torch's default (False) is left alone: as a user runs
    env["teardown_cupti"] = os.environ.get("TEARDOWN_CUPTI")  # "1": no profiler callbacks left on after a profiled step
    # what inductor's Triton needs to build its launchers (a compiled row failing without them says why)
    compilers = [os.environ["CC"]] if os.environ.get("CC") else ["gcc", "clang"]  # the order Triton looks them up in
    env["c_compiler"] = next((path for path in map(shutil.which, compilers) if path), None)
    env["python_h"] = Path(sysconfig.get_paths()["include"], "Python.h").is_file()
    try:
        from importlib.metadata import version

        env["bitsandbytes"] = version("bitsandbytes")
    except Exception:  # not installed
        env["bitsandbytes"] = None
    return env


def _ms(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def _x(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _gb(value: Optional[float]) -> str:
    return "-" if value is None else f"{value / GB:.2f}"


def _shape_text(s: dict[str, Any]) -> str:
    return (f"{s['name']}: hidden {s['hidden']}, MLP {s['intermediate']}, {s['layers']} layers, "
            f"heads {s['heads']}/{s['kv_heads']}, vocab {s['vocab']}")


def write_report(output_dir: Path, results: dict[str, Any]) -> None:
    """results.md from results.json's dict (rewritten after every row)."""
    env, settings = results["environment"], results["settings"]
    shapes = [s["name"] for s in settings["shapes"]]
    by_shape = {name: {r["row"]: r for r in results["rows"] if r["shape"] == name} for name in shapes}
    device = env["gpu"] or f"CPU ({env['device']}, no GPU)"
    lines = [
        f"# GPU suite{' (tiny shapes: the figures mean nothing)' if settings['tiny'] else ''}",
        "",
        f"{device}; torch {env['torch']}, CUDA {env['cuda'] or '-'}, transformers {env['transformers']}, "
        f"PEFT {env['peft']}, giva {env['giva']}, bitsandbytes {env['bitsandbytes'] or '-'}; Python {env['python']}.",
        "",
        f"Random-init Llama shapes ({', '.join(_shape_text(s) for s in settings['shapes'])}), "
        f"{settings['dtype']}, every projection ({', '.join(TARGETS)}), r={settings['rank']} (VeRA r={settings['vera_rank']}), "
        f"batch {settings['batch_size']} x {settings['seq_len']} tokens, AdamW; median of {settings['steps']} steps after "
        f"{settings['warmup_steps']} warm-up. Peak memory: {'torch.cuda.max_memory_allocated' if env['gpu'] else 'process peak RSS'}, "
        "reset before each row. Launches: CUDA kernel launches of one profiled step (aten ops on CPU).",
        "",
        "| row | " + " | ".join(f"{s} step ms | {s} peak GB | {s} launches" for s in shapes) + " |",
        "|---|" + "---:|---:|---:|" * len(shapes),
    ]
    for row in STEP_ROWS + COMPILE_ROWS + QUANT_ROWS:
        if not any(row in by_shape[s] for s in shapes):
            continue
        cells = []
        for s in shapes:
            r = by_shape[s].get(row, {})
            ok = r.get("status") == "ok"
            # aten operators stand in on CPU only: on a GPU a missing count stays missing
            launches = r.get("kernel_launches") if env["gpu"] else r.get("aten_ops")
            cells.append(f"{_ms(r.get('median_step_seconds')) if ok else r.get('status', '-')} | "
                         f"{_gb(r.get('peak_bytes')) if ok else '-'} | {launches if ok and launches is not None else '-'}")
        lines.append(f"| {ROW_LABELS[row]} | " + " | ".join(cells) + " |")
    if any(r["row"] in INIT_ROWS for r in results["rows"]):
        lines += ["", "| initialisation (k = " + str(settings["init_batches"]) + " batches) | "
                  + " | ".join(f"{s} s | {s} peak GB | {s} peak / GiVA step peak | {s} time / GiVA step" for s in shapes)
                  + " |", "|---|" + "---:|---:|---:|---:|" * len(shapes)]
    for row in INIT_ROWS:
        if not any(row in by_shape[s] for s in shapes):
            continue
        cells = []
        for s in shapes:
            r, ratio = by_shape[s].get(row, {}), results["ratios"].get(s, {})
            key = row.replace("-", "_")
            ok = r.get("status") == "ok"
            seconds = f"{r['seconds']:.2f}" if ok else r.get("status", "-")
            cells.append(f"{seconds} | {_gb(r.get('peak_bytes')) if ok else '-'} | "
                         f"{_x(ratio.get(f'{key}_peak_over_giva_step'))} | {_x(ratio.get(f'{key}_seconds_over_giva_step'))}")
        lines.append(f"| {ROW_LABELS[row]} | " + " | ".join(cells) + " |")
    ratio_names = [k for k in next(iter(results["ratios"].values()), {})]
    if ratio_names:
        lines += ["", "| ratio | " + " | ".join(shapes) + " |", "|---|" + "---:|" * len(shapes)]
        for key in ratio_names:
            lines.append(f"| {key} | " + " | ".join(_x(results["ratios"].get(s, {}).get(key)) for s in shapes) + " |")
    compiled = [(s, by_shape[s]["giva-compiled"]) for s in shapes if by_shape[s].get("giva-compiled", {}).get("status") == "ok"]
    if compiled:
        lines += ["", "Compilation (the warm-up steps, not in the median): " + ", ".join(
            f"{s} {r['compile_seconds']:.1f} s above the median step over {len(r['warmup_step_seconds'])} warm-up steps "
            f"({r['compiled_blocks']} blocks, backend {r['compile_backend']}, {r['dynamo_unique_graphs']} graphs, "
            f"{r['dynamo_recompiles']} recompiles, {r['dynamo_graph_breaks']} graph breaks, "
            f"{r['dynamo_frames_compiled_after_warmup']} frames compiled after the warm-ups)" for s, r in compiled) + "."]
    notes = [f"- {r['shape']} / {r['row']}: {r['status']}: {r.get('reason') or r.get('error')}"
             for r in results["rows"] if r["status"] != "ok"]
    if notes:
        lines += ["", "Not measured:", *notes]
    lines += ["", f"Command: `{results['command']}`; {results['elapsed_seconds']:.0f} s in one process"
              + ("" if results["complete"] else " (still running or cut short)") + "."]
    (output_dir / "results.md").write_text("\n".join(lines) + "\n")


def plot(path: Path, results: dict[str, Any]) -> None:
    """Step time relative to PEFT's default LoRA, and peak memory, per row and shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = [s["name"] for s in results["settings"]["shapes"]]
    rows = [r for r in STEP_ROWS + COMPILE_ROWS + QUANT_ROWS if r != "lora"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / max(len(shapes), 1)
    for i, shape in enumerate(shapes):
        records = {r["row"]: r for r in results["rows"] if r["shape"] == shape and r["status"] == "ok"}
        lora = records.get("lora", {}).get("median_step_seconds")
        xs = [j + i * width for j in range(len(rows))]
        left.bar(xs, [records[r]["median_step_seconds"] / lora if lora and r in records else 0 for r in rows], width, label=shape)
        xs = [j + i * width for j in range(len(rows) + 1)]
        right.bar(xs, [records[r]["peak_bytes"] / GB if r in records else 0 for r in ("lora", *rows)], width, label=shape)
    left.axhline(1.0, color="k", lw=0.8)
    left.set_xticks([j + width * (len(shapes) - 1) / 2 for j in range(len(rows))], rows, rotation=30, ha="right")
    left.set_ylabel("median step time / PEFT LoRA (default)")
    right.set_xticks([j + width * (len(shapes) - 1) / 2 for j in range(len(rows) + 1)], ["lora", *rows], rotation=30, ha="right")
    right.set_ylabel("peak memory (GB)")
    device = results["environment"]["gpu"] or "CPU"
    for ax in (left, right):
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"GPU suite on {device}{' (tiny shapes)' if results['settings']['tiny'] else ''}; missing bars: not measured")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# The suite


def run_gpu(output_dir: Path, settings: Optional[GpuSettings] = None, device: Optional[str] = None,
            command: str = "") -> dict[str, Any]:
    """Run every row of the suite in this process; write results.json and results.md after each row and the
    plot at the end (``output_dir`` is created). Returns the results with the keys ``giva bench`` prints."""
    settings = settings or FULL
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if dev.type == "cpu" and not settings.tiny:
        raise ValueError("the gpu suite's full shapes (1B and 8B) need a CUDA device; on CPU run the tiny shapes (--tiny, or giva bench --suite gpu --quick)")
    if dev.type == "cuda":
        # Kineto leaves CUPTI's callbacks on after a profile unless told to tear them down (pytorch#144455): every row
        # timed after the first profiled step would pay for them (10-20 % of a step, pytorch#146604)
        os.environ.setdefault("TEARDOWN_CUPTI", "1")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    shapes = {s.name: s for s in settings.shapes}
    quant_problem = bitsandbytes_problem()
    results: dict[str, Any] = {
        "schema_version": SCHEMA, "kind": "gpu", "suite": GPU_SUITE, "command": command or "run_gpu()",
        "settings": asdict(settings), "environment": environment(dev), "rows": [], "ratios": {},
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()), "elapsed_seconds": 0.0, "complete": False,
    }
    start = time.perf_counter()

    no_figure: list[ImportError] = []

    def save(figure: bool = True) -> None:
        results["elapsed_seconds"] = time.perf_counter() - start
        for name in shapes:
            results["ratios"][name] = shape_ratios({r["row"]: r for r in results["rows"] if r["shape"] == name})
        write_json_atomically(output_dir / "results.json", results)
        write_report(output_dir, results)
        if not figure:
            return
        if no_figure:
            return
        try:  # about 0.2 s on a busy CPU: after every row that ran
            plot(output_dir / "steps.png", results)
        except ImportError as error:  # a machine without matplotlib: said once, not after every row
            no_figure.append(error)
            logger.warning("gpu suite: steps.png not written (%s); the tables hold every number", error)
        except Exception:  # the figure is a convenience: the tables hold every number
            logger.exception("gpu suite: steps.png not written")

    order = plan(settings)
    with tempfile.TemporaryDirectory(prefix="giva-gpu-") as scratch:
        try:
            for index, (shape_name, row) in enumerate(order):
                record: dict[str, Any] = {"shape": shape_name, "row": row, "label": ROW_LABELS[row]}
                elapsed = time.perf_counter() - start
                expected = expected_seconds(settings, shape_name, row, results["rows"])
                if elapsed + expected > settings.budget_s:
                    record.update(status="skipped", reason=f"time budget of {settings.budget_s:.0f} s: {elapsed:.0f} s spent, "
                                                           f"the row would take about {expected:.0f} s")
                elif row in QUANT_ROWS and quant_problem:
                    record.update(status="skipped", reason=quant_problem)
                elif problem := memory_problem(row, shapes[shape_name], dev, results["rows"]):
                    record.update(status="skipped", reason=problem)
                else:
                    logger.info("gpu suite: %s / %s (%.0f s so far, about %.0f s expected)", shape_name, row, elapsed, expected)
                    record["expected_seconds"] = round(expected, 1)  # against row_seconds: how good the guesses are
                    if dev.type == "cuda":  # about 0: an earlier row's tensors still alive would be in this row's peak
                        record["allocated_bytes_before"] = torch.cuda.memory_allocated(dev)
                    row_start = time.perf_counter()
                    try:
                        record.update(run_row(row, shapes[shape_name], settings, dev, Path(scratch)), status="ok")
                    except KeyboardInterrupt:  # the device script's time limit (SIGINT): keep what was measured
                        now = time.perf_counter()
                        stopped = now - start
                        logger.warning("gpu suite: interrupted in %s / %s at %.0f s", shape_name, row, stopped)
                        record.update(status="interrupted", row_seconds=now - row_start,
                                      reason=f"interrupted (SIGINT) {now - row_start:.0f} s into the row, {stopped:.0f} s into the run")
                        results["rows"].append(record)
                        results["rows"] += [{"shape": s, "row": r, "label": ROW_LABELS[r], "status": "skipped",
                                             "reason": f"not reached: interrupted at {stopped:.0f} s"} for s, r in order[index + 1:]]
                        raise
                    except Exception as err:  # one broken row must not cost the others
                        logger.exception("gpu suite: %s / %s failed", shape_name, row)
                        record.update(status="failed", error=f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
                    record["row_seconds"] = time.perf_counter() - row_start
                    _free(dev)
                results["rows"].append(record)
                save(figure=record["status"] != "skipped")
            results["complete"] = True
        finally:
            save()
    headlines = [
        f"{name}: GiVA step {_x(r.get('giva_over_lora'))} PEFT LoRA (default), {_x(r.get('giva_over_lora_bf16'))} LoRA bf16; "
        f"compiled {_x(r.get('giva-compiled_over_lora_bf16'))} LoRA bf16; sketch init peak {_x(r.get('init_sketch_peak_over_giva_step'))} a step's"
        for name, r in results["ratios"].items()
    ]
    problems = [f"{r['shape']}/{r['row']}: {r['error']}" for r in results["rows"] if r["status"] == "failed"]
    return {**results, "headlines": headlines, "n_runs": len(results["rows"]),
            "ran": [f"{r['shape']}/{r['row']}" for r in results["rows"] if r["status"] == "ok"],
            "problems": problems, "output_dir": str(output_dir)}


def settings_from_args(tiny: bool, shapes: Optional[str] = None, rows: Optional[str] = None,
                       budget_s: Optional[float] = None) -> GpuSettings:
    """FULL or TINY, narrowed to the named shapes / rows (comma-separated), with another time budget."""
    settings = TINY if tiny else FULL
    if shapes:
        names = [s for s in shapes.split(",") if s]
        known = [s.name for s in settings.shapes]
        unknown = [s for s in names if s not in known]
        if unknown:
            raise ValueError(f"--shapes: unknown shape(s) {unknown}; known: {known}")
        settings = replace(settings, shapes=tuple(s for s in settings.shapes if s.name in names))
    if rows:
        settings = replace(settings, rows=tuple(r for r in rows.split(",") if r))
    if budget_s is not None:
        settings = replace(settings, budget_s=budget_s)
    return settings


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m giva.bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default=None, help="default benchmarks/results/gpu (gpu-tiny with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, a few steps (CPU, CI)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--shapes", default=None, help="comma-separated subset of the shapes")
    parser.add_argument("--rows", default=None, help="comma-separated subset of " + ",".join(ROWS))
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds: skip the rows expected to end later than this (default 240; --tiny 1800)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        settings = settings_from_args(args.tiny, args.shapes, args.rows, args.budget_s)
        out = Path(args.output_dir or f"benchmarks/results/{'gpu-tiny' if args.tiny else 'gpu'}")
        command = " ".join(["python -m giva.bench.gpu", *(argv if argv is not None else sys.argv[1:])])
        results = run_gpu(out, settings, args.device, command)
    except ValueError as err:
        print(f"giva.bench.gpu: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # results.json, results.md and steps.png hold every row measured before it
        report = out / "results.md"
        print(report.read_text() if report.exists() else "giva.bench.gpu: interrupted before the first row")
        print("giva.bench.gpu: interrupted", file=sys.stderr)
        return 130
    print((out / "results.md").read_text())  # the whole table: on the device machine, the log is what comes back first
    print("\n".join(f"FAILED: {problem}" for problem in results["problems"]), file=sys.stderr)
    return 1 if results["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
