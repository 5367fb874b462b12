"""What the folded GiVA forward computes and costs, per layer (issue 23 item 1): the figures of docs/adapter-math.md.

1. Precision: on the one-layer models of ``tests/test_folded_forward.py`` (Linear, Conv1D, fused with
   ``index_add``; every variant; dropout 0 and 0.3), the largest relative error (in norm, against float64
   maths on the same inputs and dropout masks) of the outputs and of the vector gradients, for the folded
   forward (``compute_dtype="input"``; this one and the first one, commit 995c396, kept below as
   :func:`previous_add_adapter_output`) and for the formula they replaced (x cast to the vectors' fp32, the
   ``tokens x out`` product scaled by ``lambda_o``: ``reference_forward`` there); in fp32, the largest
   relative difference between the two.
2. Operators: every aten op of one training step (forward and backward) of one adapted layer that the
   frozen base layer's step does not run, counted with the tests' dispatch recorder (views left out),
   for GiVA (this forward, 995c396's, and ``compute_dtype="float32"``) and PEFT LoRA r=4 in both dtype settings, split into ops on ``tokens x *`` tensors and on
   small (weight- or factor-sized) ones. On a GPU each op is (at least) one kernel launch.
3. CPU fp32 step: MiniLM, every linear layer, GiVA r=8, batch 16 x 64, AdamW: this forward against the folded
   forward it replaced (995c396: ``lambda_s`` on the thin ``h``, ``lambda_o`` folded into ``B``, then a
   separate add), in one process, on the same batches,
   steps interleaved A B B A; the ratio of medians with a paired bootstrap interval.
4. Per-layer dispatch time: forward and backward of the one-layer bf16 model with tiny tensors, so the time is
   the host's work per layer (Python, dispatch, autograd), the cost that bounds a step when kernel launches do
   (issue 23's 1B shape); GiVA (this forward and the previous one), PEFT LoRA (both settings) and the frozen
   layer alone, rounds interleaved, the fastest round of each (1 thread).

    python benchmarks/folded_forward.py     # writes benchmarks/results/folded/forward.{json,md}; CPU, about 2 min
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import peft
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the tests' one-layer models, reference formula and op recorder

import test_folded_forward as t  # noqa: E402

import giva  # noqa: E402
from giva import GivaConfig, GivaLayer  # noqa: E402
from giva.bench.runner import write_json_atomically, write_text_atomically  # noqa: E402
from giva.bench.stats import paired_ratio_bootstrap  # noqa: E402

OUTPUT = HERE / "results" / "folded"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def previous_add_adapter_output(self: GivaLayer, result: torch.Tensor, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
    """The adapter add of commit 995c396: ``lambda_s`` applied to the thin ``h``, ``lambda_o`` folded into ``B``,
    the ``tokens x out`` product formed, then added."""
    self.ensure_bases(adapter_name)
    self._check_bases(adapter_name)
    x = self._compute_input(x, adapter_name)
    a = self._input_basis(adapter_name, x.dtype, x.device)
    h = F.linear(self.giva_dropout[adapter_name](x), a) * self.giva_lambda_s[adapter_name].to(x.dtype)
    delta = F.linear(h, self.output_factor(adapter_name).to(x.dtype)).to(result.dtype)
    if adapter_name in self.giva_out_index:
        return result.index_add(-1, self.giva_out_index[adapter_name], delta)
    return result + delta


CURRENT = GivaLayer._add_adapter_output
FORWARDS: dict[str, Callable] = {"this": CURRENT, "995c396": previous_add_adapter_output}


@contextmanager
def giva_forward(name: str) -> Iterator[None]:
    """Run GiVA layers with forward ``name`` of :data:`FORWARDS` ("this": the layer's own)."""
    GivaLayer._add_adapter_output = FORWARDS[name]
    try:
        yield
    finally:
        GivaLayer._add_adapter_output = CURRENT


def errors(layer: giva.GivaLayer, x: torch.Tensor) -> dict[str, float]:
    """Relative errors against float64 of the folded and the replaced forward, and between the two."""
    out, grads = t._output_and_grads(layer, layer, x)
    ref_out, ref_grads = t._output_and_grads(lambda v: t.reference_forward(layer, v), layer, x)
    true_out, true_grads = t._float64_truth(layer, x)
    return {
        "folded_output": t._relative(out, true_out),
        "replaced_output": t._relative(ref_out, true_out),
        "folded_gradient": max(t._relative(g, v) for g, v in zip(grads, true_grads)),
        "replaced_gradient": max(t._relative(g, v) for g, v in zip(ref_grads, true_grads)),
        "folded_vs_replaced_output": t._relative(out, ref_out),
        "folded_vs_replaced_gradient": max(t._relative(g, r) for g, r in zip(grads, ref_grads)),
    }


def precision() -> dict[str, dict[str, dict[str, float]]]:
    """dtype -> forward -> the largest of each error of :func:`errors` over every layout, variant and dropout."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for name, dtype in DTYPES.items():
        table[name] = {}
        for forward in FORWARDS:
            worst: dict[str, float] = {}
            for layout in sorted(t.LAYOUTS):
                for variant in giva.VARIANTS:
                    for dropout in (0.0, 0.3) if dtype != torch.float16 else (0.0,):
                        model, layer = t._model(layout, dtype, variant=variant, giva_dropout=dropout)
                        model.train()
                        x = torch.randn(*t.TOKENS, t.IN, generator=torch.Generator().manual_seed(2)).to(dtype)
                        with giva_forward(forward):
                            for key, value in errors(layer, x).items():
                                worst[key] = max(worst.get(key, 0.0), value)
            table[name][forward] = worst
    return table


def step_ops(kind: str, dtype: torch.dtype) -> list[tuple[str, tuple[int, ...], str]]:
    """The ops one training step of a one-layer model adds to its frozen base layer's step (second step: warm)."""
    torch.manual_seed(0)
    if kind.startswith("giva"):
        compute = "float32" if kind == "giva-fp32-maths" else "input"
        config = GivaConfig(r=t.R, target_modules=["proj"], init_weights=False, compute_dtype=compute)
        model = get_peft_model(t.OneLayer("linear").to(dtype), config)
    else:
        model = get_peft_model(t.OneLayer("linear").to(dtype), LoraConfig(r=t.R, target_modules=["proj"]),
                               autocast_adapter_dtype=kind == "lora")
    model.train()
    layer = model.base_model.model.proj
    x = torch.randn(*t.TOKENS, t.IN, dtype=dtype, requires_grad=True)  # a layer inside a model: backward to its input

    def step(module) -> None:
        module(x).float().sum().backward()
        for p in (x, *module.parameters()):
            p.grad = None  # as optimizer.zero_grad(set_to_none=True)

    with giva_forward("995c396" if kind == "giva-995c396" else "this"):
        step(layer)
        with t.recording() as full:
            step(layer)
    with t.recording() as base:
        step(layer.base_layer)
    ops = list(full.ops)
    for op in base.ops:
        ops.remove(op)
    return [(name, shape, str(dt).removeprefix("torch.")) for name, shape, dt in ops]


def operators() -> dict[str, dict[str, dict]]:
    tokens = t._numel(t.TOKENS)
    table: dict[str, dict[str, dict]] = {}
    for name in ("bfloat16", "float32"):
        table[name] = {}
        for kind in ("giva", "giva-995c396", "giva-fp32-maths", "lora", "lora-bf16"):
            if name == "float32" and kind in ("giva-fp32-maths", "lora-bf16"):
                continue  # the same computation as its neighbour in fp32
            ops = step_ops(kind, DTYPES[name])
            per_token = [op for op in ops if op[1][:1] == (tokens,) or op[1][:2] == t.TOKENS]  # a row per token
            table[name][kind] = {
                "ops": len(ops),
                "per_token_ops": len(per_token),
                "per_token_elementwise": len([op for op in per_token if op[0] not in t.GEMMS]),
                "sequence": [f"{op[0]}{list(op[1])}" for op in ops],
            }
    return table


def cpu_step(pairs: int = 40, warmup: int = 8) -> dict:
    """Step times of the previous (A) and this (B) forward, interleaved A B B A on one model and its batches."""
    from transformers import AutoModelForSequenceClassification, logging

    from giva.assets import minilm_path

    logging.set_verbosity_error()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    config = GivaConfig(r=8, target_modules=["query", "key", "value", "dense"], variant="random", init_weights=False)
    model = get_peft_model(model, config).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(1000, 20000, (16, 64), generator=generator),
                "labels": torch.randint(0, 2, (16,), generator=generator)} for _ in range(4)]
    arms = {"A": "995c396", "B": "this"}
    times: dict[str, list[float]] = {"A": [], "B": []}
    for i, arm in enumerate("ABBA" * ((warmup + 2 * pairs + 3) // 4)):
        with giva_forward(arms[arm]):
            start = time.perf_counter()
            model(**batches[i % len(batches)]).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i >= warmup:
                times[arm].append(time.perf_counter() - start)
    n = min(len(times["A"]), len(times["B"]))
    interval = paired_ratio_bootstrap(times["B"][:n], times["A"][:n])
    return {
        "threads": torch.get_num_threads(), "pairs": n,
        "previous_median_ms": 1e3 * statistics.median(times["A"][:n]), "this_median_ms": 1e3 * statistics.median(times["B"][:n]),
        "ratio": interval.estimate, "low": interval.low, "high": interval.high,
        "previous_ms": [round(1e3 * v, 2) for v in times["A"][:n]], "this_ms": [round(1e3 * v, 2) for v in times["B"][:n]],
    }


def dispatch_time(rounds: int = 7, calls: int = 2000) -> dict:
    """Microseconds per forward + backward of one tiny adapted bf16 layer (the fastest of ``rounds`` rounds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    dtype = torch.bfloat16
    x = torch.randn(*t.TOKENS, t.IN, dtype=dtype, requires_grad=True)
    torch.manual_seed(0)
    giva_model = get_peft_model(t.OneLayer("linear").to(dtype), GivaConfig(r=t.R, target_modules=["proj"], init_weights=False))
    lora = {kind: get_peft_model(t.OneLayer("linear").to(dtype), LoraConfig(r=t.R, target_modules=["proj"]),
                                 autocast_adapter_dtype=kind == "lora") for kind in ("lora", "lora-bf16")}
    layer = giva_model.base_model.model.proj
    arms = {  # name: (module, GiVA forward)
        "giva": (layer, "this"), "giva-995c396": (layer, "995c396"),
        "lora": (lora["lora"].base_model.model.proj, "this"), "lora-bf16": (lora["lora-bf16"].base_model.model.proj, "this"),
        "frozen layer": (layer.base_layer, "this"),
    }
    best = {name: float("inf") for name in arms}
    try:
        for _ in range(rounds):
            for name, (module, forward) in arms.items():
                with giva_forward(forward):
                    for _ in range(calls // 10):  # warm
                        module(x).sum().backward()
                    start = time.perf_counter()
                    for _ in range(calls):
                        module(x).sum().backward()
                    best[name] = min(best[name], (time.perf_counter() - start) / calls * 1e6)
    finally:
        torch.set_num_threads(threads)
    return {"us": best, "above_frozen_us": {n: v - best["frozen layer"] for n, v in best.items() if n != "frozen layer"}}


def write(results: dict) -> None:
    write_json_atomically(OUTPUT / "forward.json", results)
    lines = [
        "# The folded GiVA forward, per layer",
        "",
        f"torch {results['versions']['torch']}, PEFT {results['versions']['peft']}, CPU. "
        f"One-layer models of tests/test_folded_forward.py (in {t.IN}, out {t.OUT}, r {t.R}, "
        f"{t._numel(t.TOKENS)} tokens). Command: `python benchmarks/folded_forward.py`.",
        "",
        "## Precision: largest relative error (in norm) against float64 maths",
        "",
        "Over Linear, Conv1D and fused layouts, every variant, dropout 0 and 0.3 (fp16: 0 only). 'folded': the forward "
        "named in the second column (this one, or the first folded forward of commit 995c396); 'replaced': the formula "
        "before the folding (x cast to fp32, lambda_o on the tokens x out product).",
        "",
        "| dtype | forward | folded output | replaced output | folded vector grads | replaced vector grads | folded vs replaced (out / grads) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, forwards in results["precision"].items():
        for forward, e in forwards.items():
            lines.append(
                f"| {name} | {forward} | {e['folded_output']:.1e} | {e['replaced_output']:.1e} | {e['folded_gradient']:.1e} | "
                f"{e['replaced_gradient']:.1e} | {e['folded_vs_replaced_output']:.1e} / {e['folded_vs_replaced_gradient']:.1e} |"
            )
    lines += [
        "",
        "## Operators of one training step, beyond the frozen layer's own",
        "",
        "Forward and backward of one adapted linear layer, gradients set to None (no accumulation); each op is at "
        "least one kernel on a GPU. 'per token': ops on a tensor with a row per token (matmuls included); "
        "'elementwise per token': those that are not matmuls (scaling, casts, adds).",
        "",
        "| dtype | adapter | ops | per token | elementwise per token | sequence |",
        "|---|---|---:|---:|---:|---|",
    ]
    for name, kinds in results["operators"].items():
        for kind, o in kinds.items():
            lines.append(f"| {name} | {kind} | {o['ops']} | {o['per_token_ops']} | {o['per_token_elementwise']} | "
                         f"{', '.join(o['sequence'])} |")
    c = results["cpu_step"]
    lines += [
        "",
        "## CPU fp32 step: this forward against the one it replaced (995c396)",
        "",
        f"MiniLM, every linear layer, GiVA r=8 (random bases), batch 16 x 64, AdamW, {c['threads']} threads; one process, "
        f"the same batches, steps interleaved A B B A, {c['pairs']} steps each after warm-up.",
        "",
        "| previous (ms) | this (ms) | this / previous (95 % paired bootstrap) |",
        "|---:|---:|---|",
        f"| {c['previous_median_ms']:.1f} | {c['this_median_ms']:.1f} | {c['ratio']:.3f}x [{c['low']:.3f}, {c['high']:.3f}] |",
    ]
    d = results["dispatch"]
    lines += [
        "",
        "## Per-layer dispatch time (host work, tiny bf16 layer)",
        "",
        "Forward and backward of the one-layer bf16 model, 1 thread, the fastest of 7 interleaved rounds of 2000 calls: "
        "with tensors this small the time is Python, dispatch and autograd, which is what bounds a step when kernel "
        "launches do.",
        "",
        "| adapter | us per call | above the frozen layer's (us) |",
        "|---|---:|---:|",
    ]
    for name, value in d["us"].items():
        above = d["above_frozen_us"].get(name)
        lines.append(f"| {name} | {value:.1f} | {'-' if above is None else f'{above:.1f}'} |")
    write_text_atomically(OUTPUT / "forward.md", "\n".join(lines) + "\n")


def main() -> None:
    torch.manual_seed(0)
    results = {
        "versions": {"torch": torch.__version__, "peft": peft.__version__, "python": platform.python_version()},
        "precision": precision(),
        "operators": operators(),
        "cpu_step": cpu_step(),
        "dispatch": dispatch_time(),
    }
    write(results)
    print((OUTPUT / "forward.md").read_text())


if __name__ == "__main__":
    main()
