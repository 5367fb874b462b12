"""`giva bench --suite serve`: many adapters in one model, mixed batches (each row a random adapter).

For N = 1, 8, 32, 128 adapters on the same layers, per model: bytes each extra adapter adds in memory
(distinct tensors of the method, so shared bases count once; GiVA with A in fp32 and in bf16, PEFT LoRA r=8)
and forward throughput (tokens/s) of one mixed batch (each row a random adapter among N; the same rows for
GiVA and LoRA) against the base model alone and one merged GiVA adapter. At N = 1 GiVA and LoRA both run their
plain single-adapter forward (the adapter active, no ``adapter_names``), so like is timed against like.

Timings are interleaved: at each N every timed model runs once per round, in an order rotated from round
to round, so a slow spell of a shared machine hits all methods alike; each method's throughput is the median
over rounds and the GiVA / LoRA ratio is reported per round (median, min, max). Writes results.json,
results.md and serve.png under benchmarks/results/serve/, and beside them adapter_memory.json and .md: the
bytes one extra adapter costs in memory and on disk, by method and dtype (:mod:`.serve_memory`).

On a CUDA machine the suite times the mixed-batch forward of a 1B-shaped bf16 Llama instead (:func:`run_serve_gpu`):
GiVA against PEFT LoRA's mixed batch and the base model alone, N = 1, 8, 32, 128 adapters, 32 rows of 1 and 256
tokens, each timer closed by a device synchronisation; results under benchmarks/results/serve/gpu/.
"""

from __future__ import annotations

import json
import logging
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .names import SERVE_SUITE
from .runner import write_json_atomically, write_text_atomically
from .serve_memory import (
    MemoryTables,
    adapter_bytes,
    load_minilm,
    load_smollm2,
    plan_adapter_memory,
    run_adapter_memory,
)
from .versions import code_commit, same_code, short_commit, stale_note

logger = logging.getLogger(__name__)

PLOT_NAME = "serve.png"
BASE, MERGED = "base model", "one merged adapter"
# How the adapter models were called: with the one adapter active (N = 1), or with adapter_names (a mixed batch).
SINGLE, MIXED = "active adapter", "adapter_names"


@dataclass(frozen=True)
class ServeModel:
    """A model of the serve benchmark: how to load it, which layers get adapters, the batch shape."""

    name: str
    load: Callable[[], nn.Module]
    target_modules: Any
    batch_size: int
    seq_len: int
    vocab_size: int
    rounds: Optional[int] = None  # interleaved rounds for this model (None: ServeSettings.rounds)
    methods: Optional[tuple[str, ...]] = None  # adapter methods built (None: ADAPTER_METHODS); timed ones must be in it


@dataclass(frozen=True)
class ServeSettings:
    """What `giva bench --suite serve` measures; the defaults are the committed run's settings."""

    ns: tuple[int, ...] = (1, 8, 32, 128)  # adapters in memory
    r: int = 8
    rounds: int = 7  # interleaved rounds per N: each times every model once (after one untimed warm-up round)
    seed: int = 0
    threads: Optional[int] = 1  # torch threads while timing (None: leave torch's setting); 1 is the least load-sensitive

    def __post_init__(self) -> None:
        if not self.ns or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.ns):
            raise ValueError(f"ServeSettings.ns must be adapter counts >= 1, got {self.ns!r}")
        if list(self.ns) != sorted(set(self.ns)):
            raise ValueError(f"ServeSettings.ns must be increasing without repeats, got {self.ns!r}")
        for name, minimum in (("r", 1), ("rounds", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"ServeSettings.{name} must be an integer >= {minimum}, got {value!r}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"ServeSettings.threads must be None or an integer >= 1, got {self.threads!r}")


ADAPTER_METHODS: tuple[str, ...] = ("giva", "giva-bf16", "lora")
TIMED_ADAPTER_METHODS: tuple[str, ...] = ("giva", "lora")  # "giva-bf16" has GiVA's compute (A cast at use): memory only


DEFAULT_MODELS: tuple[ServeModel, ...] = (
    ServeModel("MiniLM-L6", load_minilm, "all-linear", batch_size=16, seq_len=32, vocab_size=30522),
    # 5 rounds: a SmolLM2 round takes ~4x a MiniLM one on this 2-core CPU. Building 128 adapters dominates its
    # run (PEFT's add_adapter scans every module, the earlier adapters' included, so its time grows with N), so
    # the memory-only "giva-bf16" is not built here (its bytes per adapter: adapter_memory.md, serve_memory.py).
    ServeModel(
        "SmolLM2-135M", load_smollm2, "all-linear", batch_size=16, seq_len=16, vocab_size=49152, rounds=5, methods=("giva", "lora")
    ),
)


def _config(method: str, target_modules: Any, r: int, stand_in: bool = True) -> Any:
    """The adapter config of a method. ``stand_in=False`` (GiVA): seeded B, zero A and vectors, for
    :func:`fill_stand_in` to fill, which is ~3x cheaper than GiVA's own stand-in bases (3 Gram-Schmidt per layer)."""
    if method == "lora":
        from peft import LoraConfig

        return LoraConfig(r=r, lora_alpha=2 * r, target_modules=target_modules, init_lora_weights=False)
    from ..config import GivaConfig

    # init_weights=False: non-zero stand-in A and vectors (timing and sizes do not depend on the values).
    dtype = "bfloat16" if method == "giva-bf16" else "float32"
    return GivaConfig(r=r, target_modules=target_modules, init_weights=not stand_in, bases_dtype=dtype)


def stand_in_shapes(model: nn.Module, adapter_name: str) -> dict[str, torch.Size]:
    """The state-dict keys (``adapter_name`` replaced by ``{}``) and shapes of a GiVA adapter's A and vectors."""
    kinds = ("giva_A", "giva_lambda_s", "giva_lambda_o")
    return {
        name[: -len(adapter_name)] + "{}": tensor.shape for name, tensor in model.state_dict().items()
        if name.endswith(f".{adapter_name}") and any(f".{kind}." in name for kind in kinds)
    }


def fill_stand_in(model: nn.Module, adapter_name: str, shapes: dict[str, torch.Size]) -> None:
    """Give a GiVA adapter made with ``_config(..., stand_in=False)`` random A (Gaussian) and vectors (as GiVA's test mode).

    ``shapes``: from :func:`stand_in_shapes`. Through ``load_state_dict``, so the stored dtypes (``bases_dtype``)
    and the shared B stay as they are.
    """
    values = {}
    for key, shape in shapes.items():
        if ".giva_A." in key:
            value = torch.randn(shape) / shape[-1] ** 0.5
        elif ".giva_lambda_s." in key:
            value = torch.empty(shape).uniform_(0.5, 1.5)
        else:
            value = torch.empty(shape).normal_(0.0, 0.1)
        values[key.format(adapter_name)] = value
    model.load_state_dict(values, strict=False)


def tuner_layers(model: nn.Module) -> list[tuple[str, nn.Module, str, nn.Module]]:
    """``(key, layer, name in parent, parent)`` of every adapter layer of a PEFT model, in ``named_modules`` order."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    root = model.base_model.model
    found = []
    for key, module in root.named_modules():
        if isinstance(module, BaseTunerLayer):
            parent_key, _, name = key.rpartition(".")
            found.append((key, module, name, root.get_submodule(parent_key)))
    return found


def add_adapter_to_layers(model: nn.Module, adapter_name: str, config: Any, layers: list[tuple[str, nn.Module, str, nn.Module]]) -> None:
    """``model.add_adapter(adapter_name, config)`` for a config that targets exactly ``layers`` (from :func:`tuner_layers`).

    Each layer gets the adapter from the tuner's own ``_create_and_replace``, in the order ``add_adapter`` uses, so
    the tensors are the same (RNG draws included; tested); what is skipped is PEFT's scan of every module of the
    model, the earlier adapters' included, with a prefix test against every adapter layer, on every add. That
    scan makes ``add_adapter`` time grow with the adapters present (SmolLM2, all linear layers: LoRA ~0.5 s for
    the 2nd adapter, ~3 s for the 40th), so 128 adapters took longer than the benchmark's time slot.
    """
    tuner = model.base_model
    model.peft_config[adapter_name] = config
    for key, layer, name, parent in layers:
        tuner._create_and_replace(config, adapter_name, layer, name, parent, current_key=key)


def _label(method: str, r: int) -> str:
    return {"giva": f"GiVA r={r}", "giva-bf16": f"GiVA r={r} (A bf16)", "lora": f"LoRA r={r}"}[method]


def _forward(model: nn.Module, ids: torch.Tensor, **kwargs: Any) -> Callable[[], Any]:
    def run() -> Any:
        with torch.inference_mode():
            return model(input_ids=ids, **kwargs)

    return run


def time_interleaved(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each function, ``rounds`` times, alternating them: round k starts at function k mod m.

    One untimed warm-up round first. Interleaving makes a slow spell of the machine hit every function alike,
    so per-round ratios between functions are far steadier than ratios of separately timed medians.
    """
    names = list(fns)
    for name in names:
        fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for k in range(rounds):
        for name in names[k % len(names):] + names[: k % len(names)]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


@contextmanager
def _threads(n: Optional[int]) -> Iterator[None]:
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _merged(spec: ServeModel, settings: ServeSettings) -> nn.Module:
    """The base model with one GiVA adapter merged into its weights (what single-tenant serving runs)."""
    from peft import get_peft_model

    torch.manual_seed(settings.seed)
    model = get_peft_model(spec.load().eval(), _config("giva", spec.target_modules, settings.r))
    return model.merge_and_unload().eval()


def measure_model(
    spec: ServeModel,
    settings: ServeSettings,
    progress: bool = True,
    done: Optional[list[dict[str, Any]]] = None,
    on_point: Optional[Callable[[list[dict[str, Any]]], None]] = None,
) -> list[dict[str, Any]]:
    """One row per (N, method): memory of the adapters (adapter methods) and the interleaved throughput (timed ones).

    ``done``: rows of this model from an interrupted run with the same settings and code; an N they complete is kept,
    not measured again (the adapters are still added, and the batch's rows drawn, exactly as in a full run). Every
    row of a point measured here names the code it timed (``commit``, :func:`~giva.bench.versions.code_commit`) and
    when its timing started (``started_utc``).
    ``on_point(rows)`` is called after each N with the rows so far (to save progress).
    """
    from peft import get_peft_model

    commit = code_commit()
    generator = torch.Generator().manual_seed(settings.seed)
    ids = torch.randint(0, spec.vocab_size, (spec.batch_size, spec.seq_len), generator=generator)
    tokens = ids.numel()
    plain = {BASE: spec.load().eval(), MERGED: _merged(spec, settings)}
    models: dict[str, nn.Module] = {}
    for method in spec.methods or ADAPTER_METHODS:
        torch.manual_seed(settings.seed)
        models[method] = get_peft_model(spec.load().eval(), _config(method, spec.target_modules, settings.r, False), adapter_name="t0")
    shapes = {m: stand_in_shapes(model, "t0") for m, model in models.items() if m != "lora"}
    layers = {m: tuner_layers(model) for m, model in models.items()}
    for method, keys in shapes.items():
        fill_stand_in(models[method], "t0", keys)
    first = {m: adapter_bytes(model, _prefix(m)) for m, model in models.items()}
    rows: list[dict[str, Any]] = []
    count = 1
    for n in settings.ns:
        while count < n:
            for method, model in models.items():
                add_adapter_to_layers(model, f"t{count}", _config(method, spec.target_modules, settings.r, False), layers[method])
                if method in shapes:
                    fill_stand_in(model, f"t{count}", shapes[method])
            count += 1
        names = [f"t{i}" for i in torch.randint(0, n, (spec.batch_size,), generator=generator).tolist()]
        if _point_done(done or [], spec.name, n):
            rows += [r for r in done or [] if r["n_adapters"] == n]
            continue
        started = time.time()
        fns = {label: _forward(model, ids) for label, model in plain.items()}
        # At N = 1 both run their plain single-adapter forward (the one adapter active, no adapter_names): given
        # adapter_names, GiVA takes its single-adapter path when the batch names one adapter and PEFT LoRA always its
        # mixed-batch one, which timed two different code paths against each other.
        forward = SINGLE if n == 1 else MIXED
        for method in TIMED_ADAPTER_METHODS:
            models[method].eval()
            kwargs = {} if n == 1 else {"adapter_names": names}
            fns[_label(method, settings.r)] = _forward(models[method], ids, **kwargs)
        times = time_interleaved(fns, spec.rounds or settings.rounds)
        giva, lora = _label("giva", settings.r), _label("lora", settings.r)
        ratios = [t_lora / t_giva for t_giva, t_lora in zip(times[giva], times[lora])]
        for label in fns:
            rows.append(_timing_row(spec, n, label, names, times[label], tokens))
            if label not in (BASE, MERGED):
                rows[-1]["forward"] = forward
        for method, model in models.items():
            total = adapter_bytes(model, _prefix(method))
            row = next((r for r in rows if r["n_adapters"] == n and r["method"] == _label(method, settings.r)), None)
            if row is None:
                row = {"model": spec.name, "method": _label(method, settings.r), "n_adapters": n, "tokens_per_s": None}
                rows.append(row)
            row.update(
                adapter_bytes_total=total,
                bytes_first_adapter=first[method],
                bytes_per_extra_adapter=(total - first[method]) / (n - 1) if n > 1 else None,
            )
        rows.append({
            "model": spec.name, "method": "GiVA / LoRA", "n_adapters": n, "per_round_ratio": ratios,
            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
        })
        for row in rows:  # every row of this point: the code it timed, and when
            if row["n_adapters"] == n:
                row.update(commit=commit, started_utc=_utc(started))
        if progress:
            logger.info(
                "serve %s N=%d: %s tokens/s; GiVA/LoRA per round %.2f (%.2f-%.2f)", spec.name, n,
                {k: round(tokens / statistics.median(v)) for k, v in times.items()},
                statistics.median(ratios), min(ratios), max(ratios),
            )
        if on_point is not None:
            on_point(rows)
    return rows


def _point_done(rows: list[dict[str, Any]], model: str, n: int) -> bool:
    """True if ``rows`` hold the finished point (model, N): its GiVA / LoRA row is written last."""
    return _find(rows, model, n, "GiVA / LoRA") is not None


def _prefix(method: str) -> str:
    return "lora_" if method == "lora" else "giva_"


def _timing_row(spec: ServeModel, n: int, label: str, names: list[str], seconds: list[float], tokens: int) -> dict[str, Any]:
    per_s = [tokens / s for s in seconds]
    return {
        "model": spec.name,
        "method": label,
        "n_adapters": n,
        "distinct_adapters_in_batch": len(set(names)) if label not in (BASE, MERGED) else None,
        "tokens_per_s": statistics.median(per_s),
        "tokens_per_s_min": min(per_s),
        "tokens_per_s_max": max(per_s),
        "seconds_per_round": seconds,
    }


def _find(rows: list[dict[str, Any]], model: str, n: int, method: str) -> Optional[dict[str, Any]]:
    return next((r for r in rows if r["model"] == model and r["n_adapters"] == n and r["method"] == method), None)


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))


def _measured(row: dict[str, Any]) -> str:
    """The table's cell for the code and start time a point was measured with."""
    return short_commit(row.get("commit")) + (f", {row['started_utc']}" if row.get("started_utc") else "")


def _table(rows: list[dict[str, Any]], settings: ServeSettings, models: tuple[ServeModel, ...], torch_version: str) -> str:
    r = settings.r
    giva, bf16, lora = _label("giva", r), _label("giva-bf16", r), _label("lora", r)
    lines = [
        "# Serving many adapters: mixed batches",
        "",
        "Command: `giva bench --suite serve`. Each row of the batch uses a random adapter among N "
        "(`adapter_names=[...]`, the same rows for GiVA and LoRA); at N = 1 both run their plain single-adapter "
        "forward instead (the adapter active, no `adapter_names`). A point marked `unlike for like` was timed "
        "before that change, through `adapter_names` at N = 1 too, where GiVA took its single-adapter forward and "
        "LoRA its mixed-batch one: it compares two different code paths. Throughput: tokens/s, median over "
        "interleaved rounds (each round times every model once, the order rotated per round, after one warm-up "
        f"round); torch {torch_version}, {settings.threads or torch.get_num_threads()} thread(s). "
        "GiVA / LoRA: the ratio of the two throughputs within each round, median (min-max over rounds).",
        "Per model: " + ", ".join(
            f"{m.name} {m.batch_size} x {m.seq_len} tokens, `{m.target_modules}`, {m.rounds or settings.rounds} rounds" for m in models
        ) + ".",
        "",
        "Measured: the code commit each point timed (the last commit that changed `src/giva`) and when its timing "
        "started (UTC); `unknown`: a point recorded before rows named their commit. A rerun re-measures every point "
        "whose commit is not the code's (`--dry-run` lists them; `--keep-stale` keeps them).",
        "",
        f"| model | N | distinct in batch | base model | one merged adapter | {giva} | {lora} | GiVA / LoRA per round | "
        "rounds GiVA >= LoRA | GiVA / base | measured |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for spec in models:
        for n in settings.ns:
            cells = {m: _find(rows, spec.name, n, m) for m in (BASE, MERGED, giva, lora, "GiVA / LoRA")}
            if any(c is None for c in cells.values()):
                continue
            ratio = cells["GiVA / LoRA"]
            unlike = n == 1 and cells[giva].get("forward") != SINGLE
            lines.append(
                f"| {spec.name} | {n}{' (unlike for like)' if unlike else ''} | {cells[giva]['distinct_adapters_in_batch']} | "
                f"{cells[BASE]['tokens_per_s']:.0f} | "
                f"{cells[MERGED]['tokens_per_s']:.0f} | {cells[giva]['tokens_per_s']:.0f} | {cells[lora]['tokens_per_s']:.0f} | "
                f"{ratio['ratio_median']:.2f} ({ratio['ratio_min']:.2f}-{ratio['ratio_max']:.2f}) | "
                f"{sum(x >= 1 for x in ratio['per_round_ratio'])} of {len(ratio['per_round_ratio'])} | "
                f"{cells[giva]['tokens_per_s'] / cells[BASE]['tokens_per_s']:.2f} | {_measured(ratio)} |"
            )
    lines += [
        "",
        "Memory of the adapters (distinct tensors, shared bases counted once); `A bf16` is `bases_dtype=\"bfloat16\"`, "
        "whose compute is GiVA's (A cast at use), so it is not timed.",
        "",
        f"| model | N | {giva}: all adapters (MiB) | per extra adapter (B) | {bf16}: all (MiB) | per extra (B) | "
        f"{lora}: all (MiB) | per extra (B) | GiVA / LoRA per extra (A fp32, A bf16) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for spec in models:
        for n in settings.ns:
            cells = {m: _find(rows, spec.name, n, m) for m in (giva, bf16, lora)}
            if cells[giva] is None or cells[lora] is None:
                continue
            extra = {m: c and c["bytes_per_extra_adapter"] for m, c in cells.items()}
            mib = {m: c and c["adapter_bytes_total"] / 2**20 for m, c in cells.items()}
            ratio = "" if extra[lora] is None else (
                f"{extra[giva] / extra[lora]:.2f}, " + ("not built" if cells[bf16] is None else f"{extra[bf16] / extra[lora]:.2f}")
            )
            lines.append(
                f"| {spec.name} | {n} | " + " | ".join(
                    "not built | " if cells[m] is None else f"{mib[m]:.1f} | {'' if extra[m] is None else f'{extra[m]:,.0f}'}"
                    for m in (giva, bf16, lora)
                ) + f" | {ratio} |"
            )
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(2, len(models), figsize=(5.5 * len(models), 7), squeeze=False)
    for col, model in enumerate(models):
        mine = [r for r in rows if r["model"] == model]
        ax = axes[0][col]
        for method in dict.fromkeys(r["method"] for r in mine if r.get("tokens_per_s") is not None):
            pts = [r for r in mine if r["method"] == method and r.get("tokens_per_s") is not None]
            dashed = method in (BASE, MERGED)
            ax.errorbar(
                [r["n_adapters"] for r in pts], [r["tokens_per_s"] for r in pts],
                yerr=[[r["tokens_per_s"] - r["tokens_per_s_min"] for r in pts], [r["tokens_per_s_max"] - r["tokens_per_s"] for r in pts]],
                marker="o", capsize=3, linestyle="--" if dashed else "-", linewidth=1 if dashed else 1.5, label=method,
            )
        ax.set_xscale("log", base=2)
        ax.set_title(f"{model}: mixed-batch throughput (median, min-max)")
        ax.set_xlabel("adapters in memory (N)")
        ax.set_ylabel("tokens / s")
        ax.legend(fontsize=8)
        ax = axes[1][col]
        for method in dict.fromkeys(r["method"] for r in mine if r.get("adapter_bytes_total") is not None):
            pts = [r for r in mine if r["method"] == method and r.get("adapter_bytes_total") is not None]
            ax.plot([r["n_adapters"] for r in pts], [r["adapter_bytes_total"] / 2**20 for r in pts], marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{model}: memory of all adapters")
        ax.set_xlabel("adapters in memory (N)")
        ax.set_ylabel("MiB")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _memory_tables(models: Optional[tuple[ServeModel, ...]], memory: Optional[MemoryTables]) -> Optional[MemoryTables]:
    """The adapter-memory tables a serve run writes: ``memory``, or by default the suite's own when ``models`` is None."""
    return memory if memory is not None else MemoryTables() if models is None else None


def run_serve(
    output_dir: Optional[str | Path] = None,
    models: Optional[tuple[ServeModel, ...]] = None,
    settings: Optional[ServeSettings] = None,
    progress: bool = True,
    memory: Optional[MemoryTables] = None,
    keep_stale: bool = False,
) -> dict[str, Any]:
    """Run the serve benchmark and write results.json, results.md and serve.png into ``output_dir``.

    First the byte counts of :mod:`.serve_memory` (adapter_memory.json and .md, only the models not yet
    recorded there) for ``memory``, by default (None) for the suite's own models when ``models`` is None too.
    On a machine with CUDA and no explicit models or settings, the timings are the accelerator benchmark
    (:func:`run_serve_gpu`, into ``output_dir/gpu``).

    A (model, N) point already in results.json with the same settings and batch shapes is kept only if it was
    measured by the code this process runs (its rows' ``commit``); a point of other or unrecorded code is measured
    again (replacing its rows when it finishes), unless ``keep_stale``. With nothing to measure, results.md is
    rewritten from results.json (the JSON and the plot are left as they are).
    """
    from .spec import benchmarks_dir

    out = Path(output_dir) if output_dir else benchmarks_dir() / "results" / SERVE_SUITE
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"serve output folder {out} is a file")
    tables = _memory_tables(models, memory)
    memory_ran = [] if tables is None else run_adapter_memory(out, tables)["ran"]
    if models is None and settings is None and torch.cuda.is_available():
        gpu = run_serve_gpu(out / "gpu", progress=progress)
        return {**gpu, "memory_ran": memory_ran, "ran": memory_ran + gpu["ran"]}
    models = models or DEFAULT_MODELS
    settings = settings or ServeSettings()
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    rows, torch_version = _recorded_rows(out, settings, models)
    current = _current_rows(rows, keep_stale)
    measured: list[tuple[str, int]] = []
    with _threads(settings.threads):
        for spec in models:
            done = [r for r in current if r["model"] == spec.name]
            if all(_point_done(done, spec.name, n) for n in settings.ns):
                logger.info("serve %s: already measured with these settings and this code in %s (resumed)", spec.name, out)
                continue

            def save(mine: list[dict[str, Any]], before: list[dict[str, Any]] = rows) -> None:
                # the recorded rows, each point measured now replacing its own: a point of older code stays until then
                _write(out, _merge(before, mine, models, settings), settings, models, started)

            mine = measure_model(spec, settings, progress, done=done, on_point=save)
            measured += sorted({(r["model"], r["n_adapters"]) for r in mine} - {(r["model"], r["n_adapters"]) for r in done})
            rows = _merge(rows, mine, models, settings)
    if not measured and rows:
        write_text_atomically(out / "results.md", _table(rows, settings, _with_rows(models, rows), torch_version))
    ran = memory_ran + [f"{model} N={n}" for model, n in measured]  # what this call measured (none when resumed in full)
    return {**_summary(out, rows, settings, models), "memory_ran": memory_ran, "ran": ran}


def plan_serve(
    output_dir: Path, models: Optional[tuple[ServeModel, ...]] = None, settings: Optional[ServeSettings] = None,
    memory: Optional[MemoryTables] = None, keep_stale: bool = False,
) -> list[str]:
    """What :func:`run_serve` would measure now into ``output_dir``: the byte counts not recorded in
    adapter_memory.json (``memory`` as in :func:`run_serve`), then the (model, N) points not recorded with these
    settings by this code (those recorded by other or unrecorded code say so; ``keep_stale`` keeps them)."""
    tables = _memory_tables(models, memory)
    models = models or DEFAULT_MODELS
    settings = settings or ServeSettings()
    rows, _ = _recorded_rows(output_dir, settings, models)
    current = _current_rows(rows, keep_stale)
    planned = []
    for m in models:
        for n in settings.ns:
            if _point_done(current, m.name, n):
                continue
            stale = _find(rows, m.name, n, "GiVA / LoRA")
            why = "" if stale is None else stale_note(stale.get("commit"), code_commit())
            planned.append(f"serve: {m.name} N={n}: base model, one merged adapter, mixed batches of "
                           f"{', '.join(m.methods or ADAPTER_METHODS)}{why}")
    return ([] if tables is None else plan_adapter_memory(output_dir, tables)) + planned


def _current_rows(rows: list[dict[str, Any]], keep_stale: bool) -> list[dict[str, Any]]:
    """The rows of the points measured by the code this process runs (every row, with ``keep_stale``)."""
    if keep_stale:
        return rows
    commit = code_commit()
    return [r for r in rows if same_code(r.get("commit"), commit)]


def _merge(rows: list[dict[str, Any]], new: list[dict[str, Any]], models: tuple[ServeModel, ...],
           settings: ServeSettings) -> list[dict[str, Any]]:
    """``rows`` with each (model, N) point that ``new`` has replaced by ``new``'s rows, in model and N order."""
    points = {(r["model"], r["n_adapters"]) for r in new}
    merged = [r for r in rows if (r["model"], r["n_adapters"]) not in points] + new
    order = {m.name: i for i, m in enumerate(models)}
    return sorted(merged, key=lambda r: (order.get(r["model"], len(order)), r["n_adapters"]))


def _with_rows(models: tuple[ServeModel, ...], rows: list[dict[str, Any]]) -> tuple[ServeModel, ...]:
    names = {r["model"] for r in rows}
    return tuple(m for m in models if m.name in names)


def _recorded_rows(out: Path, settings: ServeSettings, models: tuple[ServeModel, ...]) -> tuple[list[dict[str, Any]], str]:
    """Rows in ``out`` with the same settings and batch shapes, whatever code measured them, and the torch version
    results.json names (this process's when there is none)."""
    path = out / "results.json"
    if not path.is_file():
        return [], torch.__version__
    try:
        previous = json.loads(path.read_text())
        meta = previous["meta"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return [], torch.__version__
    if meta.get("settings") != json.loads(json.dumps(asdict(settings))):
        return [], torch.__version__
    shapes = {m["name"]: m for m in meta.get("models", [])}
    done = {m.name for m in models if shapes.get(m.name) == _model_meta(m)}
    return [r for r in previous.get("rows", []) if r.get("model") in done], meta.get("torch", torch.__version__)


def _model_meta(spec: ServeModel) -> dict[str, Any]:
    meta = {"name": spec.name, "target_modules": spec.target_modules, "batch_size": spec.batch_size, "seq_len": spec.seq_len}
    if spec.rounds is not None:
        meta["rounds"] = spec.rounds
    if spec.methods is not None:
        meta["methods"] = list(spec.methods)
    return meta


def _write(out: Path, rows: list[dict[str, Any]], settings: ServeSettings, models: tuple[ServeModel, ...], started: float) -> None:
    models = _with_rows(models, rows)
    meta = {
        "settings": asdict(settings),
        "models": [_model_meta(m) for m in models],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.platform(),
        "started_utc": _utc(started),  # this call's; each point's own start and code are in its rows
        "seconds": round(time.time() - started, 1),
        "commits": sorted({short_commit(r.get("commit")) for r in rows}),
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (out / "results.md").write_text(_table(rows, settings, models, torch.__version__))
    _plot(rows, out / PLOT_NAME)


def _summary(out: Path, rows: list[dict[str, Any]], settings: ServeSettings, models: tuple[ServeModel, ...]) -> dict[str, Any]:
    def how(r: dict[str, Any]) -> str:
        if r["n_adapters"] > 1:
            return "mixed-batch"
        giva = _find(rows, r["model"], 1, _label("giva", settings.r))
        return "single-adapter" if giva and giva.get("forward") == SINGLE else "N=1 unlike-for-like"

    headlines = [
        f"{r['model']} N={r['n_adapters']}: GiVA/LoRA {how(r)} throughput x{r['ratio_median']:.2f} "
        f"per round (min {r['ratio_min']:.2f}, max {r['ratio_max']:.2f})"
        for r in rows if r["method"] == "GiVA / LoRA"
    ]
    return {"headlines": headlines, "output_dir": str(out), "n_runs": len(rows), "rows": rows, "ran": [], "problems": []}


# ---------------------------------------------------------------------------------------------------------------------
# On a CUDA machine: the mixed-batch forward of a 1B-shaped bf16 Llama against PEFT LoRA's and the base model's.

# Llama 3.2 1B's shapes (random init: timing does not depend on the values).
LLAMA_1B_SHAPE: dict[str, Any] = {
    "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
}
GPU_METHODS: dict[str, str] = {
    "giva": "GiVA r={r}",
    "lora": "LoRA r={r} (bf16 adapters)",  # autocast_adapter_dtype=False: LoRA's maths in the model's dtype
    "lora-fp32": "LoRA r={r} (PEFT default: fp32 adapters)",
}


@dataclass(frozen=True)
class GpuServeSettings:
    """What `giva bench --suite serve` measures on a CUDA machine (the defaults), or on the CPU with tiny shapes (CI)."""

    ns: tuple[int, ...] = (1, 8, 32, 128)  # adapters in memory; each of the batch's rows uses a random one
    rows: int = 32
    tokens: tuple[int, ...] = (1, 256)  # tokens per row: a decoding step, a prefill
    r: int = 8
    rounds: int = 7  # interleaved timed rounds per point, after one warm-up round
    seed: int = 0
    dtype: str = "bfloat16"
    device: str = "cuda"
    methods: tuple[str, ...] = ("giva", "lora", "lora-fp32")
    shape: tuple[tuple[str, Any], ...] = tuple(LLAMA_1B_SHAPE.items())  # LlamaConfig fields

    def __post_init__(self) -> None:
        try:
            ServeSettings(ns=self.ns, r=self.r, rounds=self.rounds, seed=self.seed)  # the shared checks
        except ValueError as err:
            raise ValueError(str(err).replace("ServeSettings.", "GpuServeSettings.", 1)) from None
        for name in ("rows",):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GpuServeSettings.{name} must be an integer >= 1, got {value!r}")
        if not self.tokens or any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in self.tokens):
            raise ValueError(f"GpuServeSettings.tokens must be token counts >= 1, got {self.tokens!r}")
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"GpuServeSettings.dtype must be 'bfloat16', 'float16' or 'float32', got {self.dtype!r}")
        unknown = set(self.methods) - set(GPU_METHODS)
        if not self.methods or unknown:
            raise ValueError(f"GpuServeSettings.methods must be among {sorted(GPU_METHODS)}, got {self.methods!r}")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _llama(settings: GpuServeSettings) -> nn.Module:
    """A random-init Llama of ``settings.shape`` in ``settings.dtype``, built on ``settings.device`` (same seed: same weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(settings.seed)
    config = LlamaConfig(**dict(settings.shape))
    with torch.device(settings.device):
        model = LlamaForCausalLM(config).to(getattr(torch, settings.dtype))
    return model.eval()


def _fill_giva_stand_in(model: nn.Module, adapter_name: str, generator: torch.Generator) -> None:
    """Random A (Gaussian) and vectors for one GiVA adapter, drawn on the model's device, written in place."""
    from ..layer import GivaLayer

    with torch.no_grad():
        for layer in (m for m in model.modules() if isinstance(m, GivaLayer)):
            a = layer.giva_A[adapter_name]
            a.copy_(torch.randn(a.shape, generator=generator, device=a.device) / a.shape[-1] ** 0.5)
            for vector, low, high in ((layer.giva_lambda_s[adapter_name], 0.5, 1.5), (layer.giva_lambda_o[adapter_name], -0.2, 0.2)):
                vector.copy_(torch.rand(vector.shape, generator=generator, device=vector.device) * (high - low) + low)


def _add_gpu_adapter(model: nn.Module, method: str, name: str, r: int, layers: Optional[list] = None, generator: Any = None) -> Any:
    """Adapter ``name`` of ``method`` on every linear layer: through get_peft_model for the first, then per layer."""
    from peft import get_peft_model
    from peft.tuners.tuners_utils import cast_adapter_dtype

    config = _config("giva" if method == "giva" else "lora", "all-linear", r, stand_in=False)
    autocast = method != "lora"
    if layers is None:
        model = get_peft_model(model, config, adapter_name=name, autocast_adapter_dtype=autocast)
    else:
        add_adapter_to_layers(model, name, config, layers)
        cast_adapter_dtype(model, name, autocast_adapter_dtype=autocast)
    if method == "giva":
        _fill_giva_stand_in(model, name, generator)
    return model


def measure_gpu(
    settings: GpuServeSettings, progress: bool = True, on_point: Optional[Callable[[list[dict[str, Any]]], None]] = None
) -> list[dict[str, Any]]:
    """One row per (N, tokens, method) with the seconds of each timed forward, and per (N, tokens) the ratios;
    ``on_point`` gets the rows so far after each (N, tokens) point.

    Every forward ends with a device synchronisation, so each timer spans the device's work. The batch is
    ``rows`` rows of ``tokens`` tokens; only the last position's logits are computed (as a server's step does).
    """
    device = torch.device(settings.device)
    generator = torch.Generator().manual_seed(settings.seed)
    device_generator = torch.Generator(device=device).manual_seed(settings.seed)
    vocab = dict(settings.shape)["vocab_size"]
    models: dict[str, nn.Module] = {"base model": _llama(settings)}
    layers: dict[str, list] = {}
    for method in settings.methods:
        models[method] = _add_gpu_adapter(_llama(settings), method, "t0", settings.r, generator=device_generator)
        layers[method] = tuner_layers(models[method])
    rows: list[dict[str, Any]] = []
    count = 1
    for n in settings.ns:
        while count < n:
            for method in settings.methods:
                _add_gpu_adapter(models[method], method, f"t{count}", settings.r, layers[method], device_generator)
            count += 1
        for model in models.values():
            model.eval()
        names = [f"t{i}" for i in torch.randint(0, n, (settings.rows,), generator=generator).tolist()]
        for tokens in settings.tokens:
            ids = torch.randint(0, vocab, (settings.rows, tokens), generator=generator).to(device)
            fns = {}
            for label, model in models.items():
                kwargs = {} if label == "base model" else {"adapter_names": names}
                fns[label] = _synced_forward(model, ids, device, **kwargs)
            times = time_interleaved(fns, settings.rounds)
            for label, seconds in times.items():
                rows.append({
                    "n_adapters": n, "tokens": tokens, "method": label if label == "base model" else GPU_METHODS[label].format(r=settings.r),
                    "distinct_adapters_in_batch": None if label == "base model" else len(set(names)),
                    "ms": statistics.median(seconds) * 1e3, "ms_min": min(seconds) * 1e3, "ms_max": max(seconds) * 1e3,
                    "seconds_per_round": seconds,
                })
            for label in settings.methods:
                ratios = [t / b for t, b in zip(times[label], times["base model"])]
                rows.append({
                    "n_adapters": n, "tokens": tokens, "method": f"{GPU_METHODS[label].format(r=settings.r)} / base model",
                    "per_round_ratio": ratios, "ratio_median": statistics.median(ratios),
                    "ratio_min": min(ratios), "ratio_max": max(ratios),
                })
            if progress:
                logger.info("serve (%s) N=%d tokens=%d: %s ms", settings.device, n, tokens,
                            {k: round(statistics.median(v) * 1e3, 2) for k, v in times.items()})
            if on_point is not None:
                on_point(rows)
    return rows


def _synced_forward(model: nn.Module, ids: torch.Tensor, device: torch.device, **kwargs: Any) -> Callable[[], None]:
    def run() -> None:
        with torch.inference_mode():
            model(input_ids=ids, logits_to_keep=1, **kwargs)
        _synchronize(device)

    return run


def _gpu_table(rows: list[dict[str, Any]], settings: GpuServeSettings, device_name: str) -> str:
    labels = [GPU_METHODS[m].format(r=settings.r) for m in settings.methods]
    lines = [
        "# Serving many adapters on one accelerator: mixed batches",
        "",
        f"Command: `giva bench --suite serve` on {device_name}. A random-init Llama of Llama 3.2 1B's shapes in "
        f"{settings.dtype}, adapters r={settings.r} on every linear layer; {settings.rows} rows, each with a random adapter "
        "among N (the same rows for every method); only the last position's logits. Milliseconds per forward: median over "
        f"{settings.rounds} interleaved rounds (each round times every model once, the order rotated per round, after one "
        "warm-up round), each timer closed by a device synchronisation. Ratio to the base model: per round, median (min-max).",
        "",
        "| N | tokens per row | distinct in batch | base model (ms) | " + " | ".join(f"{m} (ms) | {m} / base" for m in labels) + " |",
        "|---:|---:|---:|---:|" + "---:|---:|" * len(labels),
    ]
    for n in settings.ns:
        for tokens in settings.tokens:
            point = [r for r in rows if r["n_adapters"] == n and r["tokens"] == tokens]
            cells = {r["method"]: r for r in point}
            if "base model" not in cells:
                continue
            distinct = next((r["distinct_adapters_in_batch"] for r in point if r.get("distinct_adapters_in_batch")), "")
            parts = [f"| {n} | {tokens} | {distinct} | {cells['base model']['ms']:.2f} |"]
            for label in labels:
                ratio = cells[f"{label} / base model"]
                parts.append(
                    f" {cells[label]['ms']:.2f} | {ratio['ratio_median']:.2f} ({ratio['ratio_min']:.2f}-{ratio['ratio_max']:.2f}) |"
                )
            lines.append("".join(parts))
    return "\n".join(lines) + "\n"


def serve_plan(output_dir: Optional[Path] = None) -> list[str]:
    """What `giva bench --suite serve` would measure on this machine (``--dry-run``): one line per model or setting,
    after the byte counts missing from ``output_dir``'s adapter_memory.json (when a folder is given)."""
    memory = [] if output_dir is None else plan_adapter_memory(output_dir)
    if torch.cuda.is_available():
        gpu = GpuServeSettings()
        methods = ("base model",) + tuple(GPU_METHODS[m].format(r=gpu.r) for m in gpu.methods)
        return memory + [
            f"serve (gpu): Llama 1B-shaped {gpu.dtype} x {methods} x N={gpu.ns} x tokens per row={gpu.tokens}, {gpu.rows} rows"
        ]
    return memory + [
        f"serve: {m.name} x {(BASE, MERGED) + (m.methods or ADAPTER_METHODS)} x N={ServeSettings().ns}" for m in DEFAULT_MODELS
    ]


def run_serve_gpu(output_dir: str | Path, settings: Optional[GpuServeSettings] = None, progress: bool = True) -> dict[str, Any]:
    """Run the accelerator serve benchmark, writing results.json and results.md into ``output_dir`` after every
    (N, tokens) point (``meta.complete`` false until the last), so a run cut short keeps what it measured."""
    settings = settings or GpuServeSettings()
    device = torch.device(settings.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("GpuServeSettings.device is 'cuda' but torch sees no CUDA device")
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"serve output folder {out} is a file")
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"

    def save(rows: list[dict[str, Any]], complete: bool) -> None:
        meta = {
            "settings": json.loads(json.dumps(asdict(settings))), "device": device_name, "torch": torch.__version__,
            "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(started)),
            "seconds": round(time.time() - started, 1), "complete": complete,
        }
        write_json_atomically(out / "results.json", {"meta": meta, "rows": rows})
        write_text_atomically(out / "results.md", _gpu_table(rows, settings, device_name)
                              + ("" if complete else "\nCut short or still running: the points above only.\n"))

    rows = measure_gpu(settings, progress, on_point=lambda so_far: save(so_far, complete=False))
    save(rows, complete=True)
    headlines = [
        f"N={r['n_adapters']} tokens={r['tokens']}: {r['method']} x{r['ratio_median']:.2f}"
        for r in rows if "ratio_median" in r
    ]
    ran = sorted({f"N={r['n_adapters']} tokens={r['tokens']}" for r in rows})  # the GPU timings always run in full
    return {"headlines": headlines, "output_dir": str(out), "n_runs": len(rows), "rows": rows, "ran": ran, "problems": []}
