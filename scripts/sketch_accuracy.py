"""Sketched vs exact GiVA bases on the real gradients of MiniLM and SmolLM2 (every linear layer).

The reference is each layer's dense mean gradient over the calibration batches and its full LAPACK
SVD; for each rank r a fresh model is initialised with ``giva.initialize(mode="sketch")`` (default
passes and oversampling, variant VrUr) on the same batches. The table gives, over every targeted
layer, the mean top-r principal cosine between the exact and sketched right singular vectors (A) and
left ones (B of VrUr), their minimum, times, and the memory of each mode.

    nice -n 10 .venv/bin/python scripts/sketch_accuracy.py --models minilm smollm2 --ranks 8 32 64 \
        --out benchmarks/results/sketch_accuracy.md
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import giva
from giva import GivaConfig
from giva.assets import minilm_path, smollm2_path
from giva.data import load_bundled
from giva.init import compute_gradients, giva_layers
from giva.init.sketch import MIN_OVERSAMPLING, principal_cosines

# Singular directions below this fraction of the largest are numerically absent (a layer whose
# gradient has rank < r, e.g. the last layer of an encoder read at one token per example): the
# top-r subspace is undefined there, so only the top min(r, rank) directions are compared.
RANK_TOL = 1e-3


def batches(tokenizer, num_batches: int, batch_size: int, max_length: int, causal: bool) -> list[dict]:
    data = load_bundled("pang-lee")
    out = []
    for i in range(num_batches):
        rows = slice(i * batch_size, (i + 1) * batch_size)
        enc = tokenizer(data.texts[rows], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        if causal:
            labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        else:
            labels = torch.tensor(data.labels[rows])
        out.append({**enc, "labels": labels})
    return out


def load(name: str):
    if name == "minilm":
        path = minilm_path()
        torch.manual_seed(0)  # the fresh classifier head
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval(), AutoTokenizer.from_pretrained(path), False
    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), tokenizer, True


def reference(base, data, task_type: str) -> tuple[dict, float, int]:
    """Exact singular vectors and numerical rank of each layer's dense mean gradient (LAPACK SVD)."""
    model = get_peft_model(copy.deepcopy(base), GivaConfig(r=1, target_modules=None, task_type=task_type))
    start = time.perf_counter()
    grads, _ = compute_gradients(model, giva_layers(model), data, num_batches=len(data), progress=False)
    out = {}
    for name, g in grads.items():
        u, s, vh = torch.linalg.svd(g, full_matrices=False)
        out[name] = (u, vh, int((s > s[0] * RANK_TOL).sum()))
    dense_bytes = sum(g.numel() * g.element_size() for g in grads.values())
    return out, time.perf_counter() - start, dense_bytes


def setting(text: str) -> tuple[int, int | None]:
    """``"P"`` or ``"P:O"``: sketch passes and oversampling (omitted: the library default)."""
    passes, _, oversampling = text.partition(":")
    try:
        return int(passes), (int(oversampling) if oversampling else None)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sketch expects PASSES or PASSES:OVERSAMPLING, got {text!r}") from None


def sketched(base, data, r: int, task_type: str, passes: int, oversampling: int | None) -> tuple[dict, giva.InitReport, float]:
    config = GivaConfig(r=r, target_modules=None, variant="VrUr", task_type=task_type)
    model = get_peft_model(copy.deepcopy(base), config)
    start = time.perf_counter()
    report = giva.initialize(
        model, data, num_batches=len(data), progress=False, mode="sketch", passes=passes, oversampling=oversampling
    )
    seconds = time.perf_counter() - start
    return {n: (m.giva_A["default"].clone(), m.giva_B["default"].clone()) for n, m in giva_layers(model).items()}, report, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["minilm", "smollm2"], choices=["minilm", "smollm2"])
    parser.add_argument("--ranks", nargs="+", type=int, default=[8, 32, 64])
    parser.add_argument("--num-batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument(
        "--sketch",
        nargs="+",
        type=setting,
        default=[(giva.init.DEFAULT_PASSES, giva.init.DEFAULT_OVERSAMPLING)],
        help="sketch settings PASSES[:OVERSAMPLING] to measure (default: the library defaults)",
    )
    parser.add_argument("--out", default=None, help="also write the table (markdown) here")
    args = parser.parse_args()
    lines = [
        "| model | r | passes | l | layers | mean cos A (V) | min cos A | mean cos B (U) | min cos B | exact s | sketch s "
        "| exact MB | sketch MB/pass |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print(lines[0], flush=True)
    for name in args.models:
        base, tokenizer, causal = load(name)
        data = batches(tokenizer, args.num_batches, args.batch_size, args.max_length, causal)
        task_type = "CAUSAL_LM" if causal else "SEQ_CLS"
        exact, exact_s, dense_bytes = reference(base, data, task_type)
        for r, (passes, oversampling) in ((r, s) for r in args.ranks for s in args.sketch):
            sketch, report, sketch_s = sketched(base, data, r, task_type, passes, oversampling)
            cos_a, cos_b = [], []
            for n, (u, vh, rank) in exact.items():
                k = min(r, rank, sketch[n][0].shape[0])
                cos_a.append(principal_cosines(vh[:k], sketch[n][0][:k]).mean())
                cos_b.append(principal_cosines(u[:, :k].mT, sketch[n][1][:, :k].mT).mean())
            cos_a, cos_b = torch.stack(cos_a), torch.stack(cos_b)
            width = r + (max(2 * r, MIN_OVERSAMPLING) if oversampling is None else oversampling)
            line = (
                f"| {name} | {r} | {report.passes} | {width} | {len(exact)} | {cos_a.mean():.4f} | {cos_a.min():.4f} | {cos_b.mean():.4f} | "
                f"{cos_b.min():.4f} | {exact_s:.1f} | {sketch_s:.1f} | {dense_bytes / 2**20:.1f} | "
                f"{report.sums_bytes / 2**20:.1f} |"
            )
            lines.append(line)
            print(line, flush=True)
    if args.out:
        header = [
            "# Sketched vs exact GiVA bases on real gradients",
            "",
            f"Command: `{' '.join(['.venv/bin/python'] + sys.argv)}`",
            "",
            f"k = {args.num_batches} batches of {args.batch_size} Pang & Lee sentences (max length {args.max_length}); "
            "every linear layer but the head; variant VrUr. Exact: the dense mean gradient of each layer and its full "
            "LAPACK SVD (exact s: that pass plus the SVDs). Sketch: `giva.initialize(mode='sketch')` with the passes "
            f"and l of each row (library default: passes={giva.init.DEFAULT_PASSES}, l = k + max(2k, {MIN_OVERSAMPLING})). cos: mean of the top-min(r, rank) principal "
            f"cosines of one layer (rank: singular values above {RANK_TOL} of the largest), then mean / min over "
            "layers. MB: the dense gradients one process holds (exact) / the sums of one pass (sketch), which are "
            f"what a distributed run all-reduces. torch {torch.__version__}, {platform.machine()}, "
            f"{torch.get_num_threads()} threads.",
            "",
        ]
        with open(args.out, "w") as fh:
            fh.write("\n".join(header + lines) + "\n")


if __name__ == "__main__":
    main()
