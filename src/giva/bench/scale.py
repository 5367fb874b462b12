"""`giva bench --suite scale`: peak memory and time of GiVA initialisation as models grow.

For each model and each measurement a fresh subprocess (peak RSS only ever grows, so two
measurements in one process would hide each other) builds the model, resets the kernel's peak-RSS
counter (``/proc/self/clear_refs``), runs one thing and reports its wall time, the RSS before it
and the peak RSS during it:

* ``exact``        ``giva.initialize(mode="exact")``: dense fp32 ``out x in`` gradient per layer
* ``exact_legacy`` the same through the implementation before the giva.init package
                   (``src/giva/gradients.py`` at :data:`LEGACY_COMMIT`, read with ``git show``)
* ``sketch``       ``giva.initialize(mode="sketch")``: randomized range finder, no dense gradient
* ``loraga``       PEFT's ``preprocess_loraga`` + ``get_peft_model`` (LoRA-GA) on the same batches
* ``train_step``   GiVA training steps (forward, backward, AdamW) on one batch of the same size
* ``init_1rank`` / ``init_2rank``  ``mode="sketch"`` init of the same k batches by 1 process, or by
                   2 gloo ranks under torchrun (k/2 batches each), one OpenMP thread per process

Every model gets the same recipe: GiVA r=8 on all 7 Llama projections, k calibration batches of
random token ids. The runner is resumable: a measurement already in ``results.json`` is skipped if it was
made with the model's current shapes (each record keeps its :data:`SHAPE_FIELDS`; one of other shapes is
measured again). Each record names the code it measured (``commit``, :func:`~giva.bench.versions.code_commit`);
one of other or unrecorded code is kept, marked as such in results.md and listed by ``--dry-run`` (``run
--remeasure`` measures it again: the 3B cells take long).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from .runner import PEAK_RSS_HOW, proc_status_bytes, reset_peak_rss
from .versions import code_commit, same_code, short_commit

logger = logging.getLogger(__name__)

# The last commit whose giva.initialize was the original single-module implementation.
LEGACY_COMMIT = "8b4bbd0"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = 8
KINDS = ("train_step", "sketch", "exact", "loraga", "exact_legacy")
RANK_KINDS = ("init_1rank", "init_2rank")
GIB = 1024**3


@dataclass(frozen=True)
class ScaleModel:
    """One model of the suite: the real SmolLM2-135M, or a randomly initialised Llama-style config."""

    name: str
    dtype: str  # weights' dtype
    num_batches: int  # k
    batch_size: int
    seq_len: int
    timeout_s: int  # per measurement
    hidden: int = 0  # 0: the real SmolLM2 checkpoint
    intermediate: int = 0
    layers: int = 0
    heads: int = 0
    kv_heads: int = 0
    vocab: int = 32000
    kinds: tuple[str, ...] = KINDS


# What a record was measured on: a record of other values is of another measurement (timeout_s and kinds are not).
SHAPE_FIELDS = ("dtype", "num_batches", "batch_size", "seq_len", "hidden", "intermediate", "layers", "heads", "kv_heads", "vocab")


def shape(spec: ScaleModel) -> dict[str, Any]:
    return {field: getattr(spec, field) for field in SHAPE_FIELDS}


# Token counts are tiny because this 2-core machine is shared (load average 15-22 while these ran;
# no AVX-512/AMX, so bf16 matmuls run ~4x slower than fp32 here): a forward+backward of SmolLM2
# on 128 tokens took 157 s. Peak-memory ratios barely depend on it (weights dominate at these
# batch sizes, which also makes the training-step side of the 1.3x target small). fp32 weights.
MODELS: dict[str, ScaleModel] = {
    m.name: m
    for m in (
        ScaleModel("smollm2-135m", "float32", 2, 1, 64, 1500, kinds=KINDS + RANK_KINDS),
        ScaleModel("llama-0.5b", "float32", 2, 1, 32, 1800, 1280, 3456, 24, 20, 4),
        ScaleModel("llama-1.1b", "float32", 2, 1, 32, 2400, 2048, 5632, 22, 32, 4, kinds=("train_step", "sketch", "exact")),
        # The largest that fits this 24 GB machine with the sketch: 3B fp32 weights (12 GB; fp32 because
        # bf16 matmuls run ~4x slower on this CPU); the exact path would add 11 GB of fp32 gradients,
        # which the runner's memory check skips.
        ScaleModel("llama-3b", "float32", 2, 1, 16, 900, 3072, 8192, 28, 24, 8, kinds=("train_step", "sketch", "exact")),
    )
}


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def build_base(spec: ScaleModel) -> torch.nn.Module:
    """The base causal LM (weights in ``spec.dtype``), seeded; random configs never go through fp32."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if not spec.hidden:
        from ..assets import smollm2_path

        return AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=_dtype(spec.dtype))
    config = LlamaConfig(
        vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        max_position_embeddings=max(spec.seq_len, 256), tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(_dtype(spec.dtype))
    try:
        return LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)


def batches(spec: ScaleModel, vocab: int, count: Optional[int] = None, offset: int = 0) -> list[dict[str, torch.Tensor]]:
    """``count`` (default k) seeded batches of random token ids, labels = inputs; batch i is the same everywhere."""
    out = []
    for i in range(offset, offset + (spec.num_batches if count is None else count)):
        generator = torch.Generator().manual_seed(1000 + i)
        ids = torch.randint(0, vocab, (spec.batch_size, spec.seq_len), generator=generator)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def estimated_gib(spec: ScaleModel, kind: str) -> float:
    """A generous guess of a measurement's peak RSS, to skip what cannot fit in the free memory."""
    params, targeted = parameter_counts(spec)
    weights = params * (4 if spec.dtype == "float32" else 2)
    extra = {
        "exact": 4 * targeted, "exact_legacy": 4 * targeted, "loraga": 2 * targeted * (4 if spec.dtype == "float32" else 2),
        "init_2rank": weights + 4 * targeted,
    }.get(kind, 0.25 * weights)
    return (weights + extra) / GIB + 1.5


def parameter_counts(spec: ScaleModel) -> tuple[int, int]:
    """(all parameters, parameters of the targeted projections), from the config alone."""
    if not spec.hidden:
        return 134_515_008, 106_168_320  # SmolLM2-135M (tied embeddings), 30 layers x 7 projections
    head_dim = spec.hidden // spec.heads
    kv = spec.kv_heads * head_dim
    attention = 2 * spec.hidden * spec.hidden + 2 * spec.hidden * kv
    mlp = 3 * spec.hidden * spec.intermediate
    targeted = spec.layers * (attention + mlp)
    return targeted + 2 * spec.vocab * spec.hidden + (2 * spec.layers + 1) * spec.hidden, targeted


# ---------------------------------------------------------------------------------------------
# One measurement (runs in the child process)


def _rss_bytes(field: str) -> int:
    value = proc_status_bytes(field)
    if value is None:
        raise RuntimeError(f"{field} not in /proc/self/status")
    return value


def _reset_peak() -> bool:
    """Collect garbage, then reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    gc.collect()
    return reset_peak_rss() == PEAK_RSS_HOW


def _giva_model(base: torch.nn.Module, variant: str = "Vr") -> torch.nn.Module:
    from peft import get_peft_model

    from .. import GivaConfig

    return get_peft_model(base, GivaConfig(r=RANK, target_modules=TARGETS, variant=variant, task_type="CAUSAL_LM", seed=0))


def _legacy_initialize() -> Any:
    """``initialize`` of the pre-giva.init implementation, loaded from git as a module of the giva package."""
    root = Path(__file__).resolve().parents[3]
    source = subprocess.run(
        ["git", "-C", str(root), "show", f"{LEGACY_COMMIT}:src/giva/gradients.py"],
        check=True, capture_output=True, text=True,
    ).stdout
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"giva_legacy_gradients_{LEGACY_COMMIT}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("giva._legacy_gradients", path)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "giva"
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.initialize


def _distributed_rank() -> tuple[int, int]:
    import torch.distributed as dist

    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        dist.init_process_group("gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def measure(spec: ScaleModel, kind: str) -> dict[str, Any]:
    """Run one measurement in this process and return its record (time in s, memory in bytes)."""
    if kind not in KINDS + RANK_KINDS:
        raise ValueError(f"unknown measurement {kind!r}; known: {list(KINDS + RANK_KINDS)}")
    rank, world = _distributed_rank() if kind == "init_2rank" else (0, 1)
    torch.manual_seed(0)
    base = build_base(spec)
    vocab = base.config.vocab_size
    record: dict[str, Any] = {"model": spec.name, "kind": kind, "world_size": world}
    record["parameters"] = sum(p.numel() for p in base.parameters())
    record["targeted_parameters"] = sum(
        m.weight.numel() for n, m in base.named_modules() if n.rsplit(".", 1)[-1] in TARGETS
    )
    if kind == "loraga":
        from peft import LoraConfig, get_peft_model
        from peft.tuners.lora.config import LoraGAConfig
        from peft.tuners.lora.loraga import preprocess_loraga

        data = batches(spec, vocab)
        config = LoraConfig(
            r=RANK, target_modules=TARGETS, init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig(),
            task_type="CAUSAL_LM",
        )

        def train_step() -> None:
            for batch in data:
                base(**batch).loss.backward()

        record["peak_reset"], record["rss_before"] = _reset_peak(), _rss_bytes("VmRSS")  # reset first: the peak counts from here
        start = time.perf_counter()
        preprocess_loraga(base, config, train_step)
        record["gradient_seconds"] = time.perf_counter() - start
        get_peft_model(base, config)
        record["seconds"] = time.perf_counter() - start
    elif kind == "train_step":
        model = _giva_model(base, variant="random")  # bases of the same shapes, no data needed
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        batch = batches(spec, vocab, count=1)[0]
        record["peak_reset"], record["rss_before"] = _reset_peak(), _rss_bytes("VmRSS")  # reset first: the peak counts from here
        step_seconds, fwd_bwd_seconds = [], []
        for _ in range(2):
            start = time.perf_counter()
            model(**batch).loss.backward()
            fwd_bwd_seconds.append(time.perf_counter() - start)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step_seconds.append(time.perf_counter() - start)
        record["step_seconds"] = step_seconds
        record["seconds"] = step_seconds[-1]  # the first step also allocates AdamW's state
        record["fwd_bwd_seconds"] = fwd_bwd_seconds[-1]
    else:
        model = _giva_model(base)
        if kind == "init_2rank":
            per_rank = spec.num_batches // world
            data = batches(spec, vocab, count=per_rank, offset=rank * per_rank)
        else:
            data = batches(spec, vocab)
        mode = "exact" if kind.startswith("exact") else "sketch"
        record["peak_reset"], record["rss_before"] = _reset_peak(), _rss_bytes("VmRSS")  # reset first: the peak counts from here
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
        start = time.perf_counter()
        if kind == "exact_legacy":
            report = _legacy_initialize()(model, data, num_batches=len(data), progress=False)
        else:
            from .. import initialize

            report = initialize(model, data, num_batches=len(data), progress=False, mode=mode)
            record["passes"] = getattr(report, "passes", None)
            record["sums_bytes"] = getattr(report, "sums_bytes", None)
        record["seconds"] = time.perf_counter() - start
        record["mode"] = mode
        record["gradient_seconds"] = report.gradient_seconds
        record["svd_seconds"] = report.svd_seconds
        record["bases_checksum"] = float(
            sum(layer.giva_A["default"].double().abs().sum() for layer in _giva_layers(model))
        )
    # Linux batches each thread's RSS updates (SPLIT_RSS_COUNTING), so VmHWM can trail the VmRSS read just
    # after the reset by a few hundred KB: the peak is at least every RSS this process was seen at.
    record["peak_rss"] = max(_rss_bytes("VmHWM"), _rss_bytes("VmRSS"), record.get("rss_before", 0))
    record["peak_rss_ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    record["torch_threads"] = torch.get_num_threads()
    record["load_average"] = os.getloadavg()  # other jobs share the machine: times are only as good as this
    if world > 1:
        import torch.distributed as dist

        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, {k: record[k] for k in ("seconds", "peak_rss", "bases_checksum")})
        record["seconds"] = max(g["seconds"] for g in gathered)  # init ends when the slowest rank ends
        record["per_rank"] = gathered
        dist.destroy_process_group()
    return record


def _giva_layers(model: torch.nn.Module) -> Iterable[Any]:
    from ..layer import GivaLayer

    return [m for m in model.modules() if isinstance(m, GivaLayer)]


# ---------------------------------------------------------------------------------------------
# The runner (parent process)


def _free_gib() -> float:
    import psutil

    return psutil.virtual_memory().available / GIB


def _child_command(model: str, kind: str, out: Path) -> tuple[list[str], dict[str, str]]:
    """The child's command line; it inherits the runner's niceness (run the runner with ``nice -n 10``)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    module = ["-m", "giva.bench.scale", "measure", model, kind, str(out)]
    if kind == "init_2rank":
        env["OMP_NUM_THREADS"] = "1"  # one core per rank on the 2-core machine
        torchrun = str(Path(sys.executable).parent / "torchrun")
        return [torchrun, "--standalone", "--nproc_per_node", "2", *module], env
    # One thread: on an oversubscribed machine OpenMP's spinning threads slow every matmul down.
    env["OMP_NUM_THREADS"] = "1"
    return [sys.executable, *module], env


def run_one(model: str, kind: str, scratch: Path) -> dict[str, Any]:
    """One measurement in its own subprocess (killed at the model's timeout)."""
    spec = MODELS[model]
    out = scratch / f"{model}.{kind}.json"
    out.unlink(missing_ok=True)
    cmd, env = _child_command(model, kind, out)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=spec.timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        output, _ = proc.communicate()
        return {"model": model, "kind": kind, "status": "timeout", "timeout_s": spec.timeout_s, "log_tail": output[-2000:]}
    if proc.returncode != 0 or not out.exists():
        return {"model": model, "kind": kind, "status": "failed", "returncode": proc.returncode, "log_tail": output[-3000:]}
    record = json.loads(out.read_text())
    record.update(status="ok", wall_seconds=time.perf_counter() - start)
    return record


def commit() -> str:
    """The checkout's short HEAD commit, with ``+dirty`` if src/giva has uncommitted changes: what :func:`compare`,
    :func:`cpu_contention` and the qlora and finetune suites record. :func:`run_scale`'s records name
    :func:`~giva.bench.versions.code_commit` instead (the code, which committing results does not move)."""
    root = Path(__file__).resolve().parents[3]
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return (head or "unknown") + ("+dirty" if uncommitted() else "")


def uncommitted() -> list[str]:
    """Files under src/giva with uncommitted changes when a record was measured (``+dirty`` in :func:`commit`)."""
    root = Path(__file__).resolve().parents[3]
    status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "src/giva"], capture_output=True, text=True)
    return [line[3:] for line in status.stdout.splitlines()]


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {"runs": {}}


def record_shape(results: dict[str, Any], record: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The :data:`SHAPE_FIELDS` a record was measured with: its own ``shape``, or for a record made before records
    kept it, the file's ``models`` table (written by every run until then; MODELS' shapes have not changed since
    08fc54a, before the first committed record), else None."""
    if record.get("shape"):
        return record["shape"]
    legacy = results.get("models", {}).get(record.get("model", ""))
    return {field: legacy[field] for field in SHAPE_FIELDS if field in legacy} if legacy else None


def _done(results: dict[str, Any], key: str, spec: ScaleModel) -> bool:
    """A measurement that needs no new run: measured (status ok) with ``spec``'s current shapes, by any code."""
    record = results["runs"].get(key, {})
    return record.get("status") == "ok" and record_shape(results, record) == shape(spec)


def plan_scale(output_dir: Path) -> list[str]:
    """The ``model/measurement`` records :func:`run_scale` (all models and kinds) would measure now: those not
    measured, and those measured with other shapes than the model's now."""
    results = _load(output_dir / "results.json")
    planned = []
    for name, spec in MODELS.items():
        for kind in spec.kinds:
            key = f"{name}/{kind}"
            if _done(results, key, spec):
                continue
            record = results["runs"].get(key, {})
            other = record.get("status") == "ok"
            planned.append(f"scale: {key}" + (f" (measured with other shapes: {record_shape(results, record)})" if other else ""))
    return planned


def scale_notes(output_dir: Path) -> list[str]:
    """The records a run keeps although other code, or code not recorded, measured them (what ``--dry-run`` notes)."""
    results = _load(output_dir / "results.json")
    now = code_commit()
    return [
        f"scale: kept {key}, measured at commit {short_commit(record.get('commit'))}, not the code now "
        f"({short_commit(now)}); python -m giva.bench.scale run --models {key.split('/')[0]} --kinds {key.split('/')[1]} "
        "--remeasure measures it again"
        for key, record in results["runs"].items()
        if record.get("model") in MODELS and _done(results, key, MODELS[record["model"]]) and not same_code(record.get("commit"), now)
    ]


def run_scale(
    output_dir: Path, models: Optional[Sequence[str]] = None, kinds: Optional[Sequence[str]] = None,
    min_free_gib: float = 3.0, remeasure: bool = False,
) -> dict[str, Any]:
    """Run (or resume) the scale suite into ``output_dir``; write results.json, results.md and the plot.

    A measurement is skipped if results.json has it measured with the model's current shapes (the record's own
    ``shape``); records of other code are kept and marked in results.md. ``remeasure``: measure the selected models
    x kinds again even where results.json has them (the new records replace those; every other record is kept),
    e.g. after a code change or a run on a loaded machine.
    """
    from .runner import versions

    unknown = [m for m in models or [] if m not in MODELS]
    if unknown:
        raise ValueError(f"unknown scale model(s) {unknown}; known: {sorted(MODELS)}")
    bad_kinds = [k for k in kinds or [] if k not in KINDS + RANK_KINDS]
    if bad_kinds:
        raise ValueError(f"unknown measurement(s) {bad_kinds}; known: {list(KINDS + RANK_KINDS)}")
    output_dir.mkdir(parents=True, exist_ok=True)
    results_path = output_dir / "results.json"
    results = _load(results_path)
    results["versions"] = versions()  # this call's; each record keeps its own shape and commit
    scratch = output_dir / ".scratch"
    scratch.mkdir(exist_ok=True)
    ran = []
    for name in models or list(MODELS):
        spec = MODELS[name]
        for kind in spec.kinds:
            if kinds and kind not in kinds:
                continue
            key = f"{name}/{kind}"
            if _done(results, key, spec) and not remeasure:
                continue
            need, free = estimated_gib(spec, kind), _free_gib()
            if free - need < min_free_gib:
                logger.warning("skipping %s: needs ~%.1f GiB, %.1f GiB free", key, need, free)
                results["runs"][key] = {"model": name, "kind": kind, "status": "skipped_memory", "needed_gib": need, "free_gib": free,
                                        "shape": shape(spec), "commit": code_commit()}
                continue
            logger.info("measuring %s (needs ~%.1f GiB, %.1f GiB free)", key, need, free)
            record = run_one(name, kind, scratch)
            record["free_gib_before"] = free
            record["shape"], record["parameters_estimate"] = shape(spec), parameter_counts(spec)[0]
            record["commit"], record["uncommitted"] = code_commit(), uncommitted()
            record["started_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(time.time() - record.get("wall_seconds", 0)))
            ran.append(key)
            results["runs"][key] = record
            results_path.write_text(json.dumps(results, indent=1))
            logger.info("%s: %s", key, {k: record.get(k) for k in ("status", "seconds", "peak_rss")})
    results_path.write_text(json.dumps(results, indent=1))
    write_scale_report(output_dir, results)
    # The keys `giva bench` prints.
    headlines = [
        f"{r['model']}: sketch init peak {_ratio(r.get('sketch_peak_over_train'))}x a training step's, "
        f"exact {_ratio(r.get('exact_peak_over_train'))}x"
        for r in summary_rows(results)
    ]
    problems = [f"{key}: {run['status']}" for key, run in results["runs"].items() if run.get("status") != "ok"]
    return {**results, "headlines": headlines, "n_runs": len(results["runs"]), "ran": ran, "problems": problems,
            "output_dir": str(output_dir)}


# ---------------------------------------------------------------------------------------------
# Report


def _gb(value: Optional[float]) -> str:
    return "-" if value is None else f"{value / 1e9:.2f}"


def summary_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per model: peaks, times and the target ratios (None where a measurement is missing)."""
    rows = []
    names = list(dict.fromkeys(key.split("/", 1)[0] for key in results["runs"]))
    for name in sorted(names, key=lambda n: list(MODELS).index(n) if n in MODELS else len(MODELS)):
        runs = {k.split("/", 1)[1]: r for k, r in results["runs"].items() if k.startswith(name + "/") and r.get("status") == "ok"}
        if not runs:
            continue
        shapes = {kind: record_shape(results, run) or {} for kind, run in runs.items()}
        row: dict[str, Any] = {"model": name, "dtype": next(iter(shapes.values())).get("dtype", "?")}
        row["parameters"] = next(iter(runs.values())).get("parameters")
        for kind, run in runs.items():
            row[f"{kind}_peak"] = run.get("peak_rss")
            row[f"{kind}_seconds"] = run.get("seconds")
        row["commits"] = {kind: run.get("commit") for kind, run in runs.items()}

        def paired(a: str, b: str) -> bool:  # both measured, on the same shapes: a ratio of the two means something
            return a in runs and b in runs and bool(shapes[a]) and shapes[a] == shapes[b]

        train, sketch, exact, legacy, loraga = (
            runs.get(k) for k in ("train_step", "sketch", "exact", "exact_legacy", "loraga"))
        if train and sketch and paired("train_step", "sketch"):
            row["sketch_peak_over_train"] = sketch["peak_rss"] / train["peak_rss"]
            k = shapes["sketch"]["num_batches"]  # the record's own k, not today's
            row["sketch_time_over_k_fwd_bwd"] = sketch["seconds"] / (k * train["fwd_bwd_seconds"])
            passes = sketch.get("passes") or 1
            row["sketch_time_over_passes_k_fwd_bwd"] = sketch["seconds"] / (passes * k * train["fwd_bwd_seconds"])
        if train and exact and paired("train_step", "exact"):
            row["exact_peak_over_train"] = exact["peak_rss"] / train["peak_rss"]
        if train and loraga and paired("train_step", "loraga"):
            row["loraga_peak_over_train"] = loraga["peak_rss"] / train["peak_rss"]
        if exact and legacy and paired("exact", "exact_legacy"):
            row["exact_time_over_legacy"] = exact["seconds"] / legacy["seconds"]
        if paired("init_1rank", "init_2rank"):
            row["two_rank_speedup"] = runs["init_1rank"]["seconds"] / runs["init_2rank"]["seconds"]
            # sum |A| over every layer, equal to fp64 round-off when both runs produced the same bases
            one, two = runs["init_1rank"]["bases_checksum"], runs["init_2rank"]["bases_checksum"]
            row["two_rank_same_bases"] = "yes" if abs(one - two) <= 1e-6 * abs(one) else f"no ({one:.4f} vs {two:.4f})"
        rows.append(row)
    return rows


def _ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def write_scale_report(output_dir: Path, results: dict[str, Any], plot: bool = True) -> None:
    """results.md (and, with ``plot``, memory_vs_parameters.png) from ``results`` alone."""
    rows = summary_rows(results)
    marks = _commit_marks(rows)
    lines = [
        "# Scale suite: peak RSS (GB) and time (s) per measurement, each in its own process",
        "",
        f"GiVA r={RANK} on {', '.join(TARGETS)}; k calibration batches of random tokens (each record's `shape` in "
        "results.json: k, batch size, sequence length, dtype and the model's sizes; ratios pair records of the same shape).",
        "",
        "Each cell ends with the code commit that measured it: " + "; ".join(
            f"[{mark}] {'commit unknown (recorded before records named their commit)' if commit is None else commit}"
            for commit, mark in marks.items()
        ) + " (records older than their `shape` field name the checkout's HEAD then, later ones the last commit that "
        "changed `src/giva`). Cells of different commits measured different code; a rerun keeps them (`--dry-run` lists those not "
        "measured by the code it runs; `python -m giva.bench.scale run --models M --kinds K --remeasure` measures them again).",
        "",
        "| model | params | weights | train step | exact (legacy) | exact | sketch | LoRA-GA | sketch/train peak | "
        "exact/train peak | LoRA-GA/train peak | sketch time / k fwd+bwd | sketch time / passes*k fwd+bwd | "
        "exact time / legacy |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        def cell(kind: str, r: dict[str, Any] = r) -> str:
            peak, secs = r.get(f"{kind}_peak"), r.get(f"{kind}_seconds")
            return "-" if peak is None else f"{_gb(peak)} GB, {secs:.1f} s [{marks[_cell_commit(r, kind)]}]"

        lines.append(
            f"| {r['model']} | {r['parameters'] / 1e6:.0f}M | {r['dtype']} | {cell('train_step')} | {cell('exact_legacy')} | "
            f"{cell('exact')} | {cell('sketch')} | {cell('loraga')} | {_ratio(r.get('sketch_peak_over_train'))} | "
            f"{_ratio(r.get('exact_peak_over_train'))} | {_ratio(r.get('loraga_peak_over_train'))} | "
            f"{_ratio(r.get('sketch_time_over_k_fwd_bwd'))} | "
            f"{_ratio(r.get('sketch_time_over_passes_k_fwd_bwd'))} | {_ratio(r.get('exact_time_over_legacy'))} |"
        )
    # Cells of one table may come from runs at very different machine loads (the runner resumes): say so.
    loads = [
        f"{key} {run['load_average'][0]:.1f} ({short_commit(run['commit']) if run.get('commit') else 'commit unknown'})"
        for key, run in results["runs"].items() if run.get("status") == "ok" and run.get("load_average")
    ]
    if loads:
        lines += ["", "Load average (1 min) when each measurement ran, and the commit it measured where recorded "
                  "(times are only comparable at similar loads): " + ", ".join(loads) + "."]
    ranks = [r for r in rows if r.get("two_rank_speedup")]
    if ranks:
        lines += ["", "| model | sketch init, 1 process (1 thread) | 2 gloo ranks (1 thread each) | speed-up | same bases |", "|---|---|---|---|---|"]
        for r in ranks:
            lines.append(
                f"| {r['model']} | {r['init_1rank_seconds']:.1f} s [{marks[_cell_commit(r, 'init_1rank')]}] | "
                f"{r['init_2rank_seconds']:.1f} s [{marks[_cell_commit(r, 'init_2rank')]}] | "
                f"{r['two_rank_speedup']:.2f}x | {r['two_rank_same_bases']} |"
            )
    problems = [
        f"- {key}: {run['status']}"
        + (f" (needs ~{run['needed_gib']:.1f} GiB, {run['free_gib']:.1f} GiB was free)" if "needed_gib" in run else "")
        for key, run in results["runs"].items() if run.get("status") != "ok"
    ]
    if problems:
        lines += ["", "Not measured:", *problems]
    (output_dir / "results.md").write_text("\n".join(lines) + "\n")
    if plot:
        _plot(output_dir / "memory_vs_parameters.png", rows)


def _cell_commit(row: dict[str, Any], kind: str) -> Optional[str]:
    commit = row["commits"].get(kind)
    return short_commit(commit) if commit else None


def _commit_marks(rows: list[dict[str, Any]]) -> dict[Optional[str], str]:
    """A letter per commit of the table's cells in the order they appear (``?`` for cells with no commit)."""
    commits = dict.fromkeys(_cell_commit(r, kind) for r in rows for kind in r["commits"])
    letters = iter("abcdefghijklmnopqrstuvwxyz")
    return {commit: "?" if commit is None else next(letters) for commit in commits}


def _plot(path: Path, rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for kind, label, style in (
        ("train_step", "GiVA training step", "k-o"), ("exact_legacy", "exact init (before giva.init)", "C3:x"),
        ("exact", "exact init", "C3-s"), ("sketch", "sketch init", "C0-^"), ("loraga", "PEFT LoRA-GA preprocess", "C2--d"),
    ):
        points = sorted((r["parameters"] / 1e9, r[f"{kind}_peak"] / 1e9) for r in rows if r.get(f"{kind}_peak"))
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.set_xlabel("model parameters (billions)")
    ax.set_ylabel("peak RSS (GB)")
    ax.set_title("Peak memory per measurement (one process each)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Side-by-side comparison of two measurements (alternating fresh processes, one run)


def compare(model: str, kinds: Sequence[str], pairs: int, output_dir: Path, command: str = "") -> dict[str, Any]:
    """Run ``kinds`` alternately ``pairs`` times on ``model`` (each in its own process, as :func:`run_one`).

    Alternating puts the same machine load on both sides. Resumable: rounds already in
    ``compare.json`` are kept. Writes ``compare.json`` and ``compare.md`` (every run, means, ratio).
    """
    if model not in MODELS:
        raise ValueError(f"unknown scale model {model!r}; known: {sorted(MODELS)}")
    bad = [k for k in kinds if k not in KINDS]
    if len(kinds) != 2 or bad:
        raise ValueError(f"compare needs two measurements out of {list(KINDS)}, got {list(kinds)}")
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "compare.json"
    from .runner import versions

    results = _load(path) if path.exists() else {}
    results.update(model=model, kinds=list(kinds), command=command or results.get("command", ""), versions=versions())
    runs: list[dict[str, Any]] = results.setdefault("runs", [])
    scratch = output_dir / ".scratch"
    scratch.mkdir(exist_ok=True)
    for index in range(pairs):
        for kind in kinds if index % 2 == 0 else list(reversed(kinds)):  # ABBA: neither side always runs first
            if any(r["pair"] == index and r["kind"] == kind and r.get("status") == "ok" for r in runs):
                continue
            record = run_one(model, kind, scratch)
            record["pair"] = index
            record["commit"], record["uncommitted"] = commit(), uncommitted()
            runs[:] = [r for r in runs if not (r["pair"] == index and r["kind"] == kind)] + [record]
            path.write_text(json.dumps(results, indent=1))
            logger.info("%s pair %d: %s", kind, index, {k: record.get(k) for k in ("status", "seconds", "peak_rss")})
    path.write_text(json.dumps(results, indent=1))
    _write_compare(output_dir, results)
    shutil.rmtree(scratch, ignore_errors=True)  # the children's records are in compare.json
    return results


def _write_compare(output_dir: Path, results: dict[str, Any]) -> None:
    kinds = results["kinds"]
    ok = [r for r in results["runs"] if r.get("status") == "ok"]
    lines = [
        f"# {results['model']}: {kinds[0]} against {kinds[1]}, side by side",
        "",
        f"Command: `{results['command']}`",
        "",
        "Each row is one fresh process (`python -m giva.bench.scale measure`, one OpenMP thread), run in the "
        "order listed, alternating the two (ABBA), so both sides share the machine's load. Times in s, "
        "peak RSS in GB (including the model).",
        "",
        "| order | pair | kind | s | gradient s | SVD s | peak RSS GB | load average (1 min) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(ok):
        lines.append(
            f"| {i + 1} | {r['pair']} | {r['kind']} | {r['seconds']:.2f} | {r.get('gradient_seconds', 0):.2f} | "
            f"{r.get('svd_seconds', 0):.2f} | {_gb(r['peak_rss'])} | {r['load_average'][0]:.1f} |"
        )
    means = {}
    for kind in kinds:
        mine = [r for r in ok if r["kind"] == kind]
        if mine:
            means[kind] = {f: sum(r.get(f, 0) for r in mine) / len(mine) for f in ("seconds", "gradient_seconds", "svd_seconds", "peak_rss")}
            means[kind]["n"] = len(mine)
    lines += ["", "| kind | runs | mean s | mean gradient s | mean SVD s | mean peak RSS GB |", "|---|---|---|---|---|---|"]
    for kind, m in means.items():
        lines.append(
            f"| {kind} | {m['n']} | {m['seconds']:.2f} | {m['gradient_seconds']:.2f} | {m['svd_seconds']:.2f} | {_gb(m['peak_rss'])} |"
        )
    if len(means) == 2:
        a, b = (means[k] for k in kinds)
        pairs = sorted({r["pair"] for r in ok})
        paired = [
            next(r["seconds"] for r in ok if r["pair"] == p and r["kind"] == kinds[0])
            / next(r["seconds"] for r in ok if r["pair"] == p and r["kind"] == kinds[1])
            for p in pairs if {r["kind"] for r in ok if r["pair"] == p} == set(kinds)
        ]
        results["summary"] = {"means": means, "time_ratio": a["seconds"] / b["seconds"], "paired_time_ratios": paired}
        lines += [
            "",
            f"Time {kinds[0]} / {kinds[1]}: {a['seconds'] / b['seconds']:.3f} (means); per pair: "
            + ", ".join(f"{x:.3f}" for x in paired)
            + f". Peak {kinds[0]} / {kinds[1]}: {a['peak_rss'] / b['peak_rss']:.3f}.",
        ]
        (output_dir / "compare.json").write_text(json.dumps(results, indent=1))
    (output_dir / "compare.md").write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------
# Can two processes run at once here? (what bounds the 2-rank speed-up)

CPU_KERNELS = {"matmul256": 2000, "gemm64x576x1536": 3000}  # kernel: repetitions (a few seconds each alone)
# The child imports torch only (importing giva takes longer than the kernels in CI): single-thread fp32
# matmuls, 256^3 (fits in cache) or 64 tokens through a SmolLM2-MLP-sized weight; prints its seconds.
_KERNEL_CHILD = """
import sys, time, torch
torch.set_num_threads(1)
name, repeats = sys.argv[1], int(sys.argv[2])
a, b = (torch.randn(256, 256), torch.randn(256, 256)) if name == "matmul256" else (torch.randn(64, 576), torch.randn(576, 1536))
a @ b
start = time.perf_counter()
for _ in range(repeats):
    a @ b
print(time.perf_counter() - start)
"""


def cpu_contention(output_dir: Path, scale_repeats: float = 1.0, kernels: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Each kernel alone in one process, then in two processes at once; writes cpu_contention.{json,md}.

    A slowdown near 1 means two ranks can run side by side; near 2, the machine gives two processes no
    more compute than one (shared physical core, host oversubscription), and no 2-rank speed-up is possible.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def launch(name: str, repeats: int) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", _KERNEL_CHILD, name, str(repeats)], env=env, stdout=subprocess.PIPE, text=True)

    rows = []
    for name in kernels or list(CPU_KERNELS):
        repeats = max(1, int(CPU_KERNELS[name] * scale_repeats))
        alone = float(launch(name, repeats).communicate()[0])
        pair = [launch(name, repeats) for _ in range(2)]
        together = [float(proc.communicate()[0]) for proc in pair]
        rows.append({"kernel": name, "repeats": repeats, "alone_seconds": alone, "together_seconds": together,
                     "slowdown": sum(together) / len(together) / alone})
    results = {"cpu_count": os.cpu_count(), "load_average": os.getloadavg(), "rows": rows, "commit": commit()}
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "cpu_contention.json").write_text(json.dumps(results, indent=1))
    lines = [
        "# Two single-thread processes at once against one alone (python -m giva.bench.scale cpu-contention)",
        "",
        f"{os.cpu_count()} CPUs; load average {results['load_average'][0]:.1f}. Slowdown = mean time of the two "
        "processes run together / time alone (1: they run side by side; 2: together they get one process's compute).",
        "",
        "| kernel | repetitions | alone s | two at once s | slowdown |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['kernel']} | {r['repeats']} | {r['alone_seconds']:.2f} | "
                     f"{', '.join(f'{t:.2f}' for t in r['together_seconds'])} | {r['slowdown']:.2f} |")
    (output_dir / "cpu_contention.md").write_text("\n".join(lines) + "\n")
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m giva.bench.scale")
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("measure", help="one measurement in this process (the runner's child)")
    one.add_argument("model", choices=sorted(MODELS))
    one.add_argument("kind", choices=KINDS + RANK_KINDS)
    one.add_argument("out")
    run = sub.add_parser("run", help="run or resume the suite")
    run.add_argument("--output-dir", default="benchmarks/results/scale")
    run.add_argument("--models", default=None, help="comma-separated subset of " + ",".join(MODELS))
    run.add_argument("--kinds", default=None, help="comma-separated subset of " + ",".join(KINDS + RANK_KINDS))
    run.add_argument("--remeasure", action="store_true",
                     help="measure the selected models x kinds again even where results.json has them (others are kept)")
    cmp_ = sub.add_parser("compare", help="two measurements side by side, alternating fresh processes")
    cmp_.add_argument("model", choices=sorted(MODELS))
    cmp_.add_argument("kinds", nargs=2, choices=KINDS)
    cmp_.add_argument("--pairs", type=int, default=3)
    cmp_.add_argument("--output-dir", required=True)
    report = sub.add_parser("report", help="rewrite results.md from results.json, measuring nothing")
    report.add_argument("--output-dir", default="benchmarks/results/scale")
    cpu = sub.add_parser("cpu-contention", help="two single-thread processes at once against one alone")
    cpu.add_argument("--output-dir", default="benchmarks/results/scale")
    args = parser.parse_args(argv)
    if args.command == "cpu-contention":
        cpu_contention(Path(args.output_dir))
        return 0
    if args.command == "report":
        write_scale_report(Path(args.output_dir), _load(Path(args.output_dir) / "results.json"), plot=False)
        return 0
    if args.command == "measure":
        record = measure(MODELS[args.model], args.kind)
        if int(os.environ.get("RANK", "0")) == 0:
            Path(args.out).write_text(json.dumps(record, indent=1))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.command == "compare":
        command = " ".join(["python -m giva.bench.scale", *(argv if argv is not None else sys.argv[1:])])
        compare(args.model, args.kinds, args.pairs, Path(args.output_dir), command)
        return 0
    split = lambda s: s.split(",") if s else None  # noqa: E731
    run_scale(Path(args.output_dir), split(args.models), split(args.kinds), remeasure=args.remeasure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
