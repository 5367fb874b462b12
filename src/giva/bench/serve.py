"""`giva bench --suite serve`: many adapters in one model, mixed batches (each row a random adapter).

For N = 1, 8, 32, 128 adapters on the same layers, per model: bytes each extra adapter adds in memory
(distinct tensors of the method, so shared bases count once) and forward throughput (tokens/s) of a
mixed batch, for GiVA r=8 (A in fp32, and A in bf16), PEFT LoRA r=8, the base model alone and one
merged GiVA adapter. Writes results.json, results.md and serve.png under benchmarks/results/serve/.
"""

from __future__ import annotations

import json
import logging
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

logger = logging.getLogger(__name__)

SERVE_SUITE = "serve"
PLOT_NAME = "serve.png"


@dataclass(frozen=True)
class ServeModel:
    """A model of the serve benchmark: how to load it, which layers get adapters, the batch shape."""

    name: str
    load: Callable[[], nn.Module]
    target_modules: Any
    batch_size: int
    seq_len: int
    vocab_size: int


@dataclass(frozen=True)
class ServeSettings:
    ns: tuple[int, ...] = (1, 8, 32, 128)
    r: int = 8
    reps: int = 2  # timed forwards per point (median), after one warm-up
    seed: int = 0
    methods: tuple[str, ...] = ("giva", "giva-bf16", "lora")
    memory_only: tuple[str, ...] = ("giva-bf16",)  # same compute as "giva" (A is cast at use): sizes only
    extra: dict[str, Any] = field(default_factory=dict)


def _minilm() -> nn.Module:
    from transformers import AutoModel

    from ..assets import minilm_path

    return AutoModel.from_pretrained(minilm_path())


def _smollm2() -> nn.Module:
    from transformers import AutoModelForCausalLM

    from ..assets import smollm2_path

    return AutoModelForCausalLM.from_pretrained(smollm2_path())


DEFAULT_MODELS: tuple[ServeModel, ...] = (
    ServeModel("MiniLM-L6", _minilm, "all-linear", batch_size=16, seq_len=32, vocab_size=30522),
    ServeModel("SmolLM2-135M", _smollm2, "all-linear", batch_size=16, seq_len=16, vocab_size=49152),
)


def adapter_bytes(model: nn.Module, prefix: str) -> int:
    """Bytes of the distinct tensors (parameters and buffers) whose name contains ``prefix`` (shared ones once)."""
    seen: dict[tuple[int, int], int] = {}
    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, tensor in tensors:
        if prefix in name:
            storage = tensor.untyped_storage()
            seen[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
    return sum(seen.values())


def _config(method: str, target_modules: Any, r: int) -> Any:
    if method == "lora":
        from peft import LoraConfig

        return LoraConfig(r=r, lora_alpha=2 * r, target_modules=target_modules, init_lora_weights=False)
    from ..config import GivaConfig

    # init_weights=False: non-zero stand-in A and vectors (timing and sizes do not depend on the values).
    dtype = "bfloat16" if method == "giva-bf16" else "float32"
    return GivaConfig(r=r, target_modules=target_modules, init_weights=False, bases_dtype=dtype)


def _label(method: str, r: int) -> str:
    return {"giva": f"GiVA r={r}", "giva-bf16": f"GiVA r={r} (A bf16)", "lora": f"LoRA r={r}"}[method]


def _time(fn: Callable[[], Any], reps: int) -> float:
    """Median wall time of ``reps`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _forward(model: nn.Module, ids: torch.Tensor, **kwargs: Any) -> Callable[[], Any]:
    def run() -> Any:
        with torch.inference_mode():
            return model(input_ids=ids, **kwargs)

    return run


def measure_model(spec: ServeModel, settings: ServeSettings, progress: bool = True) -> list[dict[str, Any]]:
    """All rows of one model: base, merged, and per method and N the memory and the mixed-batch throughput."""
    from peft import get_peft_model

    generator = torch.Generator().manual_seed(settings.seed)
    ids = torch.randint(0, spec.vocab_size, (spec.batch_size, spec.seq_len), generator=generator)
    tokens = ids.numel()
    rows: list[dict[str, Any]] = []
    torch.manual_seed(settings.seed)
    base = spec.load().eval()
    seconds = _time(_forward(base, ids), settings.reps)
    rows.append({"model": spec.name, "method": "base model", "n_adapters": 0, "tokens_per_s": tokens / seconds})
    for method in settings.methods:
        torch.manual_seed(settings.seed)
        model = get_peft_model(spec.load().eval(), _config(method, spec.target_modules, settings.r), adapter_name="t0")
        model.eval()
        prefix = "lora_" if method == "lora" else "giva_"
        if method == "giva":
            model.merge_adapter()
            seconds = _time(_forward(model, ids), settings.reps)
            rows.append({"model": spec.name, "method": "one merged adapter", "n_adapters": 1, "tokens_per_s": tokens / seconds})
            model.unmerge_adapter()
        one = adapter_bytes(model, prefix)
        count = 1
        for n in settings.ns:
            while count < n:
                model.add_adapter(f"t{count}", _config(method, spec.target_modules, settings.r))
                count += 1
            model.eval()
            total = adapter_bytes(model, prefix)
            pick = torch.randint(0, n, (spec.batch_size,), generator=generator).tolist()
            names = [f"t{i}" for i in pick]
            timed = method not in settings.memory_only
            seconds = _time(_forward(model, ids, adapter_names=names), settings.reps) if timed else None
            row = {
                "model": spec.name,
                "method": _label(method, settings.r),
                "n_adapters": n,
                "distinct_adapters_in_batch": len(set(names)),
                "tokens_per_s": tokens / seconds if seconds else None,
                "adapter_bytes_total": total,
                "bytes_first_adapter": one,
                "bytes_per_extra_adapter": (total - one) / (n - 1) if n > 1 else None,
            }
            rows.append(row)
            if progress:
                logger.info("serve %s %s N=%d: %s tokens/s, %d adapter bytes", spec.name, row["method"], n, row["tokens_per_s"], total)
        del model
    return rows


def _table(rows: list[dict[str, Any]], settings: ServeSettings, models: tuple[ServeModel, ...]) -> str:
    lines = [
        "# Serving many adapters: mixed batches",
        "",
        "Each row of a batch uses a random adapter among N (`adapter_names=[...]`); forward throughput, median of "
        f"{settings.reps} timed forwards after a warm-up (torch {torch.__version__}, {torch.get_num_threads()} threads); "
        "memory = distinct adapter tensors (shared bases counted once). `A bf16` has the compute of `GiVA` (A cast at "
        "use), so only its memory is measured.",
        "Batch shapes: " + ", ".join(f"{m.name} {m.batch_size} x {m.seq_len} tokens, `{m.target_modules}`" for m in models) + ".",
        "",
        "| model | method | N adapters | distinct in batch | tokens/s | bytes per extra adapter | all adapters (MiB) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        extra = row.get("bytes_per_extra_adapter")
        total = row.get("adapter_bytes_total")
        lines.append(
            f"| {row['model']} | {row['method']} | {row['n_adapters']} | {row.get('distinct_adapters_in_batch', '')} | "
            f"{'' if row['tokens_per_s'] is None else format(row['tokens_per_s'], '.0f')} | {'' if extra is None else f'{extra:,.0f}'} | "
            f"{'' if total is None else f'{total / 2**20:.1f}'} |"
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
        for method in dict.fromkeys(r["method"] for r in mine if r.get("adapter_bytes_total") is not None):
            pts = [r for r in mine if r["method"] == method and r["tokens_per_s"] is not None]
            if pts:
                ax.plot([r["n_adapters"] for r in pts], [r["tokens_per_s"] for r in pts], marker="o", label=method)
        for r in mine:
            if r.get("adapter_bytes_total") is None:
                ax.axhline(r["tokens_per_s"], linestyle="--", linewidth=1, color="grey" if r["method"] == "base model" else "black", label=r["method"])
        ax.set_xscale("log", base=2)
        ax.set_title(f"{model}: mixed-batch throughput")
        ax.set_xlabel("adapters in memory (N)")
        ax.set_ylabel("tokens / s")
        ax.legend(fontsize=8)
        ax = axes[1][col]
        for method in dict.fromkeys(r["method"] for r in mine if r.get("adapter_bytes_total") is not None):
            pts = [r for r in mine if r["method"] == method]
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


def run_serve(
    output_dir: Optional[str | Path] = None,
    models: Optional[tuple[ServeModel, ...]] = None,
    settings: Optional[ServeSettings] = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the serve benchmark and write results.json, results.md and serve.png into ``output_dir``."""
    from .spec import benchmarks_dir

    models = models or DEFAULT_MODELS
    settings = settings or ServeSettings()
    out = Path(output_dir) if output_dir else benchmarks_dir() / "results" / SERVE_SUITE
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    rows: list[dict[str, Any]] = []
    for index, spec in enumerate(models):
        rows += measure_model(spec, settings, progress)
        _write(out, rows, settings, models[: index + 1], started)  # a model's rows survive a later interruption
    return _summary(out, rows, settings, models)


def _write(out: Path, rows: list[dict[str, Any]], settings: ServeSettings, models: tuple[ServeModel, ...], started: float) -> None:
    meta = {
        "settings": {k: v for k, v in asdict(settings).items() if k != "extra"},
        "models": [{"name": m.name, "target_modules": m.target_modules, "batch_size": m.batch_size, "seq_len": m.seq_len} for m in models],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.platform(),
        "seconds": round(time.time() - started, 1),
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (out / "results.md").write_text(_table(rows, settings, models))
    _plot(rows, out / PLOT_NAME)


def _summary(out: Path, rows: list[dict[str, Any]], settings: ServeSettings, models: tuple[ServeModel, ...]) -> dict[str, Any]:
    headlines = []
    for spec in models:
        for n in settings.ns:
            by = {r["method"]: r for r in rows if r["model"] == spec.name and r["n_adapters"] == n and "adapter_bytes_total" in r}
            giva, lora = _label("giva", settings.r), _label("lora", settings.r)
            if giva in by and lora in by:
                ratio = by[giva]["tokens_per_s"] / by[lora]["tokens_per_s"]
                headlines.append(f"{spec.name} N={n}: GiVA/LoRA mixed-batch throughput x{ratio:.2f}")
    return {"headlines": headlines, "output_dir": str(out), "n_runs": len(rows), "ran": rows, "problems": []}
