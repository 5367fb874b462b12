"""`giva bench --suite qlora`: GiVA against QLoRA on the same 4-bit base, one process per measurement.

Issue 23's memory target is "GiVA's peak <= QLoRA's" on a 4-bit base. Each measurement is a fresh
``python -m giva.bench.qlora --one METHOD`` process (peak memory cannot be reset reliably inside one process on
the CPU: freed memory stays resident), and the repeats alternate which method goes first. A process loads the
model on the CPU, also on a CUDA host, in NF4 (double quantisation, fp32 compute: QLoRA's base, as the evidence task ``sst-clm-nf4``), adds
GiVA r=8 or LoRA r=8 (the evidence suite's ``giva-default-r8`` / ``lora-r8-all`` settings) on the task's
layers, runs GiVA's ``initialize`` on ``init_batches`` batches (LoRA needs none), then AdamW steps on
``batch_size x seq_len`` random tokens (the causal-LM loss: the step does not depend on the tokens). It reports
its peak resident memory (VmHWM, :func:`giva.bench.runner.peak_rss_bytes`) after the model loaded (initialisation and
training), above the loaded 4-bit model, and during training only (the peak is reset after initialisation), and the
median step time.

Freed heap that glibc keeps is not the method's memory: loading the model leaves 0-250 MiB of it, differing from
process to process (the same load sat at 914-1171 MiB RSS in fresh processes and at 906-908 MiB after
``malloc_trim(0)``), and a peak reset keeps it inside the next peak. So the process returns it
(:func:`release_freed_memory`: ``gc.collect()`` and glibc's ``malloc_trim(0)``) after loading and after initialisation,
before each reading and each peak reset, and records anonymous memory (``RssAnon``) beside the RSS at each reading: the
RSS also holds file-backed pages (the mapped checkpoint, libraries), which both methods share. The kernel keeps no
high-water mark of anonymous memory, so at the peaks only the largest ``RssAnon`` read after each backward and
each optimizer step is recorded (a lower bound on the anonymous peak). Each process runs ``settings.threads`` threads
(``OMP_NUM_THREADS`` and ``torch.set_num_threads``; a record stores ``torch_threads``).

``results.json`` keeps one record per (repeat, method), appended as each process finishes, so a rerun measures
only what is missing: a record counts for the settings and the code it was measured with
(:func:`~giva.bench.versions.code_commit`, the last commit that changed ``src/giva``); records of other code are
measured again unless ``keep_stale``. ``results.md`` is rewritten from the records. ``settings.tiny`` is for tests.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import functools
import gc
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from .names import QLORA_SUITE
from .runner import (
    RunFailedError,
    peak_rss_bytes,
    proc_status,
    proc_status_bytes,
    reset_peak_rss,
    write_json_atomically,
    write_text_atomically,
)
from .versions import code_commit, same_code, short_commit, stale_note

logger = logging.getLogger(__name__)

METHODS = ("giva", "qlora")
METHOD_FILES = {"giva": "giva-default-r8", "qlora": "lora-r8-all"}  # benchmarks/methods/*.json: their peft_kwargs
LABELS = {"giva": "GiVA r=8 (giva-default-r8)", "qlora": "QLoRA: PEFT LoRA r=8 (lora-r8-all)"}
SCHEMA = 2  # 2: trimmed readings, RssAnon, threads and the code commit in each record


@dataclass(frozen=True)
class QloraSettings:
    """What every measurement of a run shares (a record counts only for the settings it was made with)."""

    model: str = "smollm2"  # an alias of giva.assets or a local folder
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")  # the sst-clm-nf4 task's
    rank: int = 8
    batch_size: int = 8  # the sst-clm-nf4 task's batch and token length
    seq_len: int = 64
    init_batches: int = 4  # giva-default-r8's k
    warmup_steps: int = 2
    steps: int = 8
    repeats: int = 5
    lr: float = 1e-4
    threads: int = 1  # OMP_NUM_THREADS and torch.set_num_threads of each process (one core of the 2-core machine each)

    def __post_init__(self) -> None:
        for name in ("rank", "batch_size", "seq_len", "init_batches", "warmup_steps", "steps", "repeats", "threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"QloraSettings.{name} must be an int >= 1, got {value!r}")


TRIMMED = "gc.collect() + malloc_trim(0)"
UNTRIMMED = "gc.collect() only (no glibc malloc_trim here: freed heap may stay resident and count in the readings)"


@functools.lru_cache(maxsize=1)  # find_library runs ldconfig: once per process, not before every reading
def _malloc_trim() -> Optional[Callable[[int], int]]:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS, Windows)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> str:
    """Collect garbage and hand the heap that glibc keeps after frees back to the system, so that RSS readings and
    the peak that a reset starts from hold live memory only; says which of the two it could do
    (:data:`TRIMMED` or :data:`UNTRIMMED`)."""
    gc.collect()
    trim = _malloc_trim()
    if trim is None:
        return UNTRIMMED
    trim(0)
    return TRIMMED


def _memory() -> dict[str, int]:
    """The resident size now: total (VmRSS), anonymous (RssAnon: heap, tensors) and file-backed (RssFile: mapped
    files such as the checkpoint and libraries), in bytes (0 where /proc/self/status has no such field)."""
    rss, anon, file = proc_status("VmRSS", "RssAnon", "RssFile").values()
    return {"rss": rss or 0, "anon": anon or 0, "file": file or 0}


def _anon_bytes() -> int:
    """``RssAnon`` now, in bytes (0 where /proc/self/status has none)."""
    return proc_status_bytes("RssAnon") or 0


def measure(method: str, settings: QloraSettings) -> dict[str, Any]:
    """One measurement in this process (meant to be a fresh one: see the module docstring; it sets torch's thread
    count to ``settings.threads`` for the rest of the process)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import giva

    from ..assets import resolve_model
    from .methods import quantization_config
    from .spec import benchmarks_dir, load_method

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    # The evidence suite's settings of the method, on this suite's layers and rank (every other field as there).
    kwargs = {**load_method(benchmarks_dir(), METHOD_FILES[method]).peft_kwargs, "r": settings.rank,
              "target_modules": list(settings.targets), "task_type": "CAUSAL_LM"}
    torch.set_num_threads(settings.threads)
    trim = release_freed_memory()
    peak_reset = reset_peak_rss()
    torch.manual_seed(0)
    # On the CPU, where VmHWM measures it, also on a CUDA host (transformers puts a 4-bit model on the GPU there)
    base = AutoModelForCausalLM.from_pretrained(resolve_model(settings.model), quantization_config=quantization_config("nf4"),
                                                device_map={"": "cpu"})
    load_peak = peak_rss_bytes()
    # The heap the load freed goes back before the reading and the reset: it is not the model, and its size differs
    # from process to process (see the module docstring).
    release_freed_memory()
    loaded = _memory()
    reset_peak_rss()  # the peak from here: the adapter, its initialisation and training on the loaded model
    model = get_peft_model(base, giva.GivaConfig(**kwargs) if method == "giva" else LoraConfig(**kwargs))
    vocab = base.config.vocab_size
    generator = torch.Generator().manual_seed(1)

    def batch() -> dict[str, torch.Tensor]:
        ids = torch.randint(0, vocab, (settings.batch_size, settings.seq_len), generator=generator)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    init_seconds = 0.0
    if method == "giva":
        start = time.perf_counter()
        giva.initialize(model, [batch() for _ in range(settings.init_batches)], num_batches=settings.init_batches, progress=False)
        init_seconds = time.perf_counter() - start
    peak_to_init = peak_rss_bytes()
    release_freed_memory()  # initialisation's freed heap (gradients, SVD workspaces) is not training memory
    initialised = _memory()
    reset_peak_rss()  # the training peak from here (VmHWM restarts at the current RSS)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr)
    times, anon = [], []
    for index in range(settings.warmup_steps + settings.steps):
        inputs = batch()
        start = time.perf_counter()
        model(**inputs).loss.backward()
        seconds = time.perf_counter() - start
        anon.append(_anon_bytes())  # activations' gradients freed, parameter gradients held (not timed)
        start = time.perf_counter()
        optimizer.step()
        seconds += time.perf_counter() - start
        anon.append(_anon_bytes())  # AdamW's state allocated (not timed)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - start
        if index >= settings.warmup_steps:
            times.append(seconds)  # the step alone: the two readings are not part of it
    train_peak = peak_rss_bytes()
    return {
        "method": method, "peft_kwargs": kwargs, "peak_bytes": max(peak_to_init, train_peak), "loaded_bytes": loaded["rss"],
        "loaded_anon_bytes": loaded["anon"], "loaded_file_bytes": loaded["file"], "load_peak_bytes": load_peak,
        "initialised_bytes": initialised["rss"], "initialised_anon_bytes": initialised["anon"],
        "train_peak_bytes": train_peak, "train_anon_sampled_max_bytes": max(anon), "init_peak_bytes": peak_to_init,
        "init_seconds": init_seconds, "median_step_seconds": statistics.median(times), "step_seconds": times,
        "trainable": sum(p.numel() for p in trainable),
        "quantized_layers": sum(type(m).__module__.startswith("bitsandbytes") and type(m).__name__ == "Linear4bit" for m in model.modules()),
        "trim": trim, "peak_reset": peak_reset, "torch_threads": torch.get_num_threads(),
    }


# --- the suite: one subprocess per measurement --------------------------------------------------------------


def measure_in_subprocess(method: str, settings: QloraSettings) -> dict[str, Any]:
    """:func:`measure` in a fresh ``python -m giva.bench.qlora --one METHOD`` process; a failure raises
    :class:`RunFailedError` with the command and the end of its stderr."""
    cmd = [sys.executable, "-m", "giva.bench.qlora", "--one", method, "--settings", json.dumps(asdict(settings))]
    # OpenMP reads its thread count at start-up (torch.set_num_threads in the child sets torch's own pool)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(settings.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RunFailedError(f"{' '.join(cmd[:5])} failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plan_qlora(output_dir: Path, settings: Optional[QloraSettings] = None, keep_stale: bool = False) -> list[str]:
    """The measurements still missing, in run order ('repeat R: METHOD'): none for these settings, or only ones of
    other code (stale, unless ``keep_stale``)."""
    settings = settings or QloraSettings()
    records = _load(Path(output_dir), settings)["records"]
    done = {(r["repeat"], r["method"]) for r in records if _current(r, settings, keep_stale)}
    stale = {(r["repeat"], r["method"]): r.get("commit") for r in records if _current(r, settings, keep_stale=True)}
    now = code_commit()
    return [f"repeat {rep}: {method}" + (stale_note(stale[rep, method], now) if (rep, method) in stale else "")
            for rep, method in _order(settings) if (rep, method) not in done]


def _order(settings: QloraSettings) -> list[tuple[int, str]]:
    """Repeats alternate which method runs first, so that neither always meets a colder or warmer machine."""
    return [(rep, method) for rep in range(settings.repeats) for method in (METHODS if rep % 2 == 0 else METHODS[::-1])]


def _as_json(settings: QloraSettings) -> dict[str, Any]:
    """The settings as results.json stores them (tuples as lists), so that stored and new records compare equal."""
    return json.loads(json.dumps(asdict(settings)))


def _current(record: dict[str, Any], settings: QloraSettings, keep_stale: bool = False) -> bool:
    """Whether a record counts: made with these settings and thread count, by the code that would run now (any code
    with ``keep_stale``)."""
    return (record.get("settings") == _as_json(settings) and record.get("torch_threads") == settings.threads
            and (keep_stale or same_code(record.get("commit"), code_commit())))


def _latest(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per (repeat, method): the last appended (a stale record kept with ``keep_stale`` and its
    remeasurement can both count)."""
    return list({(r["repeat"], r["method"]): r for r in records}.values())


def _load(output_dir: Path, settings: QloraSettings) -> dict[str, Any]:
    path = output_dir / "results.json"
    if not path.exists():
        return {"suite": QLORA_SUITE, "schema_version": SCHEMA, "records": []}
    doc = json.loads(path.read_text())
    if doc.get("suite") != QLORA_SUITE or not isinstance(doc.get("records"), list):
        raise ValueError(f"{path}: expected the records of the {QLORA_SUITE!r} suite (keys 'suite' and 'records')")
    return doc


def run_qlora(output_dir: Path, settings: Optional[QloraSettings] = None, keep_stale: bool = False) -> dict[str, Any]:
    """Measure what is missing or stale (one subprocess each; records of other code count with ``keep_stale``),
    rewriting results.json / results.md after every one."""
    from .methods import quantization_config

    settings = settings or QloraSettings()
    quantization_config("nf4")  # no bitsandbytes: ImportError naming the extra, before any process starts
    output_dir = Path(output_dir)
    doc = _load(output_dir, settings)
    ran = []
    for rep, method in _order(settings):
        if any(r["repeat"] == rep and r["method"] == method and _current(r, settings, keep_stale) for r in doc["records"]):
            continue
        logger.info("qlora suite: repeat %d, %s", rep, method)
        record = measure_in_subprocess(method, settings)
        doc["records"].append({**record, "repeat": rep, "settings": _as_json(settings), "commit": code_commit(),
                               "load_average": os.getloadavg()[0]})
        _write(output_dir, doc, settings, keep_stale)
        ran.append(f"repeat {rep}: {method}")
    summary = _write(output_dir, doc, settings, keep_stale)
    return {"headlines": [summary["headline"]], "n_runs": len(doc["records"]), "ran": ran, "problems": [],
            "output_dir": str(output_dir), "reports": [str(output_dir / "results.md")]}


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per method the median over repeats; GiVA / QLoRA per repeat (paired), with its median, min and max."""
    by = {(r["repeat"], r["method"]): r for r in records}
    repeats = sorted({rep for rep, _ in by if all((rep, m) in by for m in METHODS)})
    keys = ("peak_bytes", "train_peak_bytes", "median_step_seconds")
    out: dict[str, Any] = {"repeats": repeats, "median": {}, "ratio": {}}
    for method in METHODS:
        mine = [r for r in records if r["method"] == method]
        out["median"][method] = {key: statistics.median(r[key] for r in mine) for key in (*keys, "loaded_bytes")} if mine else {}
        if mine:
            out["median"][method]["above_loaded_bytes"] = statistics.median(r["peak_bytes"] - r["loaded_bytes"] for r in mine)
    for key in (*keys, "above_loaded_bytes"):
        def value(r: dict[str, Any]) -> float:
            return r["peak_bytes"] - r["loaded_bytes"] if key == "above_loaded_bytes" else r[key]

        ratios = [value(by[rep, "giva"]) / value(by[rep, "qlora"]) for rep in repeats]
        out["ratio"][key] = {"by_repeat": ratios, "median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)} if ratios else None
    peak = out["ratio"]["peak_bytes"]
    out["repeats_met"] = {key: sum(ratio <= 1 for ratio in out["ratio"][key]["by_repeat"]) if repeats else 0
                          for key in ("peak_bytes", "above_loaded_bytes", "train_peak_bytes")}
    out["target_met"] = None if peak is None else out["repeats_met"]["peak_bytes"] == len(repeats)
    out["headline"] = ("qlora: no paired repeat yet" if peak is None else
                       f"qlora: GiVA / QLoRA peak {peak['median']:.3f}x (range {peak['min']:.3f}-{peak['max']:.3f}), "
                       f"step {out['ratio']['median_step_seconds']['median']:.3f}x over {len(repeats)} paired repeats")
    return out


def _write(output_dir: Path, doc: dict[str, Any], settings: QloraSettings, keep_stale: bool = False) -> dict[str, Any]:
    records = _latest([r for r in doc["records"] if _current(r, settings, keep_stale)])
    doc["schema_version"] = SCHEMA
    doc["summary"] = summary = summarize(records)
    write_json_atomically(output_dir / "results.json", doc)
    write_text_atomically(output_dir / "results.md", "\n".join(render(records, summary, settings)) + "\n")
    return summary


def render(records: list[dict[str, Any]], summary: dict[str, Any], settings: QloraSettings) -> list[str]:
    mib = 2**20
    trims = sorted({r["trim"] for r in records})  # every current record has one (schema 2)
    n = len(summary["repeats"])
    lines = [
        "# GiVA against QLoRA on the same 4-bit base (CPU, one process per measurement)",
        "",
        "Written by `giva bench --suite qlora` from the records in results.json (a rerun measures only the missing ones, "
        "and again those of other code: commit = the last commit that changed src/giva, unless `--keep-stale`).",
        "",
        f"Each measurement: a fresh process ({settings.threads} thread: OMP_NUM_THREADS and torch) loads {settings.model} "
        f"in NF4 (double quantisation, fp32 compute), adds the adapter (r={settings.rank}) on {', '.join(settings.targets)}, "
        f"runs GiVA's initialisation on {settings.init_batches} batches (LoRA has none), then {settings.warmup_steps} + "
        f"{settings.steps} AdamW steps on {settings.batch_size} x {settings.seq_len} tokens. Trimmed readings: the process "
        f"first returns freed heap to the system ({' / '.join(trims) if trims else 'none recorded'}), after loading and "
        "after initialisation, before each reading and each peak reset, so that heap left over from loading (which "
        "differs from process to process) is in neither the loaded size nor a peak. Loaded = RSS right after the 4-bit "
        "model loaded and the trim (anon = its anonymous part, RssAnon; the rest is file-backed: the mapped checkpoint "
        "and libraries, shared by both methods); peak = VmHWM from that trimmed reading on (initialisation and "
        "training); above the model = peak minus loaded; training peak = VmHWM reset after initialisation and a trim; "
        "training anon = the largest RssAnon read after each backward and each optimizer step (the kernel keeps no "
        "anonymous high-water mark: a lower bound on the anonymous peak). "
        f"{settings.repeats} repeats, alternating which method runs first; a shared 2-core machine (load average per record).",
        "",
        "| repeat | method | peak (MiB) | the 4-bit model loaded, trimmed (MiB) | loaded anon (MiB) | above the 4-bit model (MiB) | "
        "training peak (MiB) | training anon, sampled max (MiB) | median step (ms) | init (s) | trainable | threads | load | commit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(records, key=lambda r: (r["repeat"], r["method"])):
        lines.append(
            f"| {r['repeat']} | {r['method']} | {r['peak_bytes'] / mib:.1f} | {r['loaded_bytes'] / mib:.1f} | "
            f"{r['loaded_anon_bytes'] / mib:.1f} | {(r['peak_bytes'] - r['loaded_bytes']) / mib:.1f} | "
            f"{r['train_peak_bytes'] / mib:.1f} | {r['train_anon_sampled_max_bytes'] / mib:.1f} | "
            f"{r['median_step_seconds'] * 1000:.0f} | {r['init_seconds']:.1f} | {r['trainable']:,} | {r['torch_threads']} | "
            f"{r['load_average']:.1f} | {short_commit(r.get('commit'))} |"
        )
    # Each method's column is the median of its own repeats, unpaired: it need not be the ratio's numerator or
    # denominator (the ratio is the median over repeats of GiVA / QLoRA within each repeat). The bracket is the
    # smallest and largest paired ratio, not a confidence interval.
    lines += ["", "| | " + " | ".join(f"{LABELS[m]}: median of its own repeats (unpaired)" for m in METHODS)
              + f" | GiVA / QLoRA: median of the paired repeats' ratios (range: min-max over {n} paired repeats) |",
              "|---|---|---|---|"]
    names = {"peak_bytes": "peak (MiB)", "above_loaded_bytes": "above the 4-bit model (MiB)",
             "train_peak_bytes": "training peak (MiB)", "median_step_seconds": "median step (ms)"}
    for key, name in names.items():
        scale = 1000 if key == "median_step_seconds" else 1 / mib
        cells = [f"{summary['median'][m][key] * scale:.1f}" if summary["median"].get(m) else "-" for m in METHODS]
        ratio = summary["ratio"][key]
        text = "-" if ratio is None else f"{ratio['median']:.3f}x (range {ratio['min']:.3f}-{ratio['max']:.3f})"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {text} |")
    if summary["target_met"] is not None:
        met = summary["repeats_met"]
        verdict = "met in every paired repeat" if summary["target_met"] else "NOT met in every paired repeat"
        lines += ["", f"Target of issue 23, GiVA's peak <= QLoRA's: {verdict} ({n} repeats). GiVA's is the lower or equal in "
                  f"{met['peak_bytes']} of {n} on the peak after loading, {met['above_loaded_bytes']} of {n} above the "
                  f"loaded 4-bit model (which the two methods share) and {met['train_peak_bytes']} of {n} on the training peak."]
    return lines


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m giva.bench.qlora", description=__doc__.split("\n\n")[0])
    parser.add_argument("--one", choices=METHODS, required=True, help="measure this method in this process, print JSON")
    parser.add_argument("--settings", default="{}", help="QloraSettings fields as JSON")
    args = parser.parse_args(argv)
    raw = json.loads(args.settings)
    settings = QloraSettings(**{**raw, **({"targets": tuple(raw["targets"])} if "targets" in raw else {})})
    print(json.dumps(measure(args.one, settings)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
