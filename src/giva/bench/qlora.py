"""`giva bench --suite qlora`: GiVA against QLoRA on the same 4-bit base, one process per measurement.

Issue 23's memory target is "GiVA's peak <= QLoRA's" on a 4-bit base. Each measurement is a fresh
``python -m giva.bench.qlora --one METHOD`` process (peak memory cannot be reset reliably inside one process on
the CPU: freed memory stays resident), and the repeats alternate which method goes first. A process loads the
model on the CPU, also on a CUDA host, in NF4 (double quantisation, fp32 compute: QLoRA's base, as the evidence task ``sst-clm-nf4``), adds
GiVA r=8 or LoRA r=8 (the evidence suite's ``giva-default-r8`` / ``lora-r8-all`` settings) on the task's
layers, runs GiVA's ``initialize`` on ``init_batches`` batches (LoRA needs none), then AdamW steps on
``batch_size x seq_len`` random tokens (the causal-LM loss: the step does not depend on the tokens). It reports
its peak resident memory (VmHWM, :func:`giva.bench.runner.peak_rss_bytes`) overall, above the loaded 4-bit model, and during training only (the peak
is reset after initialisation), and the median step time.

``results.json`` keeps one record per (repeat, method), appended as each process finishes, so a rerun measures
only what is missing; ``results.md`` is rewritten from the records. ``settings.tiny`` is for tests.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from .names import QLORA_SUITE
from .runner import (
    RunFailedError,
    peak_rss_bytes,
    proc_status_bytes,
    reset_peak_rss,
    write_json_atomically,
    write_text_atomically,
)

logger = logging.getLogger(__name__)

METHODS = ("giva", "qlora")
METHOD_FILES = {"giva": "giva-default-r8", "qlora": "lora-r8-all"}  # benchmarks/methods/*.json: their peft_kwargs
LABELS = {"giva": "GiVA r=8 (giva-default-r8)", "qlora": "QLoRA: PEFT LoRA r=8 (lora-r8-all)"}
SCHEMA = 1


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
    repeats: int = 3
    lr: float = 1e-4

    def __post_init__(self) -> None:
        for name in ("rank", "batch_size", "seq_len", "init_batches", "warmup_steps", "steps", "repeats"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"QloraSettings.{name} must be an int >= 1, got {value!r}")


def measure(method: str, settings: QloraSettings) -> dict[str, Any]:
    """One measurement in this process (meant to be a fresh one: see the module docstring)."""
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
    reset_peak_rss()
    torch.manual_seed(0)
    # On the CPU, where VmHWM measures it, also on a CUDA host (transformers puts a 4-bit model on the GPU there)
    base = AutoModelForCausalLM.from_pretrained(resolve_model(settings.model), quantization_config=quantization_config("nf4"),
                                                device_map={"": "cpu"})
    loaded = proc_status_bytes("VmRSS") or 0
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
    reset_peak_rss()  # the training peak from here (VmHWM restarts at the current RSS)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr)
    times = []
    for index in range(settings.warmup_steps + settings.steps):
        inputs = batch()
        start = time.perf_counter()
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if index >= settings.warmup_steps:
            times.append(time.perf_counter() - start)
    train_peak = peak_rss_bytes()
    return {
        "method": method, "peft_kwargs": kwargs, "peak_bytes": max(peak_to_init, train_peak), "loaded_bytes": loaded,
        "train_peak_bytes": train_peak, "init_peak_bytes": peak_to_init, "init_seconds": init_seconds,
        "median_step_seconds": statistics.median(times), "step_seconds": times,
        "trainable": sum(p.numel() for p in trainable),
        "quantized_layers": sum(type(m).__module__.startswith("bitsandbytes") and type(m).__name__ == "Linear4bit" for m in model.modules()),
    }


# --- the suite: one subprocess per measurement --------------------------------------------------------------


def measure_in_subprocess(method: str, settings: QloraSettings) -> dict[str, Any]:
    """:func:`measure` in a fresh ``python -m giva.bench.qlora --one METHOD`` process; a failure raises
    :class:`RunFailedError` with the command and the end of its stderr."""
    cmd = [sys.executable, "-m", "giva.bench.qlora", "--one", method, "--settings", json.dumps(asdict(settings))]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        raise RunFailedError(f"{' '.join(cmd[:5])} failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plan_qlora(output_dir: Path, settings: Optional[QloraSettings] = None) -> list[str]:
    """The measurements still missing, in run order ('repeat R: METHOD')."""
    settings = settings or QloraSettings()
    done = {(r["repeat"], r["method"]) for r in _load(Path(output_dir), settings)["records"] if _current(r, settings)}
    return [f"repeat {rep}: {method}" for rep, method in _order(settings) if (rep, method) not in done]


def _order(settings: QloraSettings) -> list[tuple[int, str]]:
    """Repeats alternate which method runs first, so that neither always meets a colder or warmer machine."""
    return [(rep, method) for rep in range(settings.repeats) for method in (METHODS if rep % 2 == 0 else METHODS[::-1])]


def _as_json(settings: QloraSettings) -> dict[str, Any]:
    """The settings as results.json stores them (tuples as lists), so that stored and new records compare equal."""
    return json.loads(json.dumps(asdict(settings)))


def _current(record: dict[str, Any], settings: QloraSettings) -> bool:
    return record.get("settings") == _as_json(settings)


def _load(output_dir: Path, settings: QloraSettings) -> dict[str, Any]:
    path = output_dir / "results.json"
    if not path.exists():
        return {"suite": QLORA_SUITE, "schema_version": SCHEMA, "records": []}
    doc = json.loads(path.read_text())
    if doc.get("suite") != QLORA_SUITE or not isinstance(doc.get("records"), list):
        raise ValueError(f"{path}: expected the records of the {QLORA_SUITE!r} suite (keys 'suite' and 'records')")
    return doc


def run_qlora(output_dir: Path, settings: Optional[QloraSettings] = None) -> dict[str, Any]:
    """Measure what is missing (one subprocess each), rewriting results.json / results.md after every one."""
    from .methods import quantization_config
    from .scale import commit

    settings = settings or QloraSettings()
    quantization_config("nf4")  # no bitsandbytes: ImportError naming the extra, before any process starts
    output_dir = Path(output_dir)
    doc = _load(output_dir, settings)
    ran = []
    for rep, method in _order(settings):
        if any(r["repeat"] == rep and r["method"] == method and _current(r, settings) for r in doc["records"]):
            continue
        logger.info("qlora suite: repeat %d, %s", rep, method)
        record = measure_in_subprocess(method, settings)
        doc["records"].append({**record, "repeat": rep, "settings": _as_json(settings), "commit": commit(),
                               "load_average": os.getloadavg()[0]})
        _write(output_dir, doc, settings)
        ran.append(f"repeat {rep}: {method}")
    summary = _write(output_dir, doc, settings)
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
                       f"qlora: GiVA / QLoRA peak {peak['median']:.3f}x (repeats {peak['min']:.3f}-{peak['max']:.3f}), "
                       f"step {out['ratio']['median_step_seconds']['median']:.3f}x over {len(repeats)} paired repeats")
    return out


def _write(output_dir: Path, doc: dict[str, Any], settings: QloraSettings) -> dict[str, Any]:
    records = [r for r in doc["records"] if _current(r, settings)]
    doc["summary"] = summary = summarize(records)
    write_json_atomically(output_dir / "results.json", doc)
    write_text_atomically(output_dir / "results.md", "\n".join(render(records, summary, settings)) + "\n")
    return summary


def render(records: list[dict[str, Any]], summary: dict[str, Any], settings: QloraSettings) -> list[str]:
    mib = 2**20
    lines = [
        "# GiVA against QLoRA on the same 4-bit base (CPU, one process per measurement)",
        "",
        "Written by `giva bench --suite qlora` from the records in results.json (a rerun measures only the missing ones).",
        "",
        f"Each measurement: a fresh process loads {settings.model} in NF4 (double quantisation, fp32 compute), adds the "
        f"adapter (r={settings.rank}) on {', '.join(settings.targets)}, runs GiVA's initialisation on "
        f"{settings.init_batches} batches (LoRA has none), then {settings.warmup_steps} + {settings.steps} AdamW steps on "
        f"{settings.batch_size} x {settings.seq_len} tokens. Peak = VmHWM of the process (load, initialisation, "
        "training); training peak = VmHWM reset after initialisation; above the model = peak minus the RSS right after "
        f"the 4-bit model loaded. {settings.repeats} repeats, alternating which method runs first; a shared 2-core "
        "machine (load average per record).",
        "",
        "| repeat | method | peak (MiB) | the 4-bit model loaded (MiB) | above the 4-bit model (MiB) | training peak (MiB) | "
        "median step (ms) | init (s) | trainable | load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(records, key=lambda r: (r["repeat"], r["method"])):
        lines.append(
            f"| {r['repeat']} | {r['method']} | {r['peak_bytes'] / mib:.1f} | {r['loaded_bytes'] / mib:.1f} | "
            f"{(r['peak_bytes'] - r['loaded_bytes']) / mib:.1f} | "
            f"{r['train_peak_bytes'] / mib:.1f} | {r['median_step_seconds'] * 1000:.0f} | {r['init_seconds']:.1f} | "
            f"{r['trainable']:,} | {r['load_average']:.1f} |"
        )
    # Each method's column is the median of its own repeats, unpaired: it need not be the ratio's numerator or
    # denominator (the ratio is the median over repeats of GiVA / QLoRA within each repeat).
    lines += ["", "| | " + " | ".join(f"{LABELS[m]}: median of its own repeats (unpaired)" for m in METHODS)
              + " | GiVA / QLoRA, median of the paired repeats' ratios (min-max) |", "|---|---|---|---|"]
    names = {"peak_bytes": "peak (MiB)", "above_loaded_bytes": "above the 4-bit model (MiB)",
             "train_peak_bytes": "training peak (MiB)", "median_step_seconds": "median step (ms)"}
    for key, name in names.items():
        scale = 1000 if key == "median_step_seconds" else 1 / mib
        cells = [f"{summary['median'][m][key] * scale:.1f}" if summary["median"].get(m) else "-" for m in METHODS]
        ratio = summary["ratio"][key]
        text = "-" if ratio is None else f"{ratio['median']:.3f}x ({ratio['min']:.3f}-{ratio['max']:.3f})"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {text} |")
    if summary["target_met"] is not None:
        n, met = len(summary["repeats"]), summary["repeats_met"]
        verdict = "met in every paired repeat" if summary["target_met"] else "NOT met in every paired repeat"
        lines += ["", f"Target of issue 23, GiVA's peak <= QLoRA's: {verdict} ({n} repeats). GiVA's is the lower in "
                  f"{met['peak_bytes']} of {n} on the whole process's peak, {met['above_loaded_bytes']} of {n} above the "
                  f"loaded 4-bit model (which the two methods share; its resident size varies from process to process) and "
                  f"{met['train_peak_bytes']} of {n} on the training peak."]
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
