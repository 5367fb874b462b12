"""`giva sft` with and without --packing on the real SmolLM2-135M (offline; `make setup` fetches it), CPU, fp32.

One epoch over the same training rows (the bundled Pang & Lee one-word questions), each configuration run
``--repeats`` times, interleaved (ABBA order), each run its own process. Reported per configuration: the optimizer
steps, the sequences the rows went into, ``trainer.train``'s time with and without the GiVA initialisation inside it,
and the validation scores; and packed / unpacked training time, paired by repeat, with its 95 % bootstrap interval.
The two configurations train the same rows but not the same steps (a packed step holds more rows), so their scores
are shown, not compared.

    python benchmarks/diagnostics/sft_packing.py [--repeats 5] [--rows 256] [--work DIR]
    python benchmarks/diagnostics/sft_packing.py --from-json benchmarks/results/sft/packing.json   # the table again

writes benchmarks/results/sft/packing.json and packing.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))

from giva.bench.stats import paired_ratio_bootstrap  # noqa: E402
from giva.bench.versions import source_commit  # noqa: E402

CONFIGS = {"unpacked": [], "packed": ["--packing"]}


def run(config: str, repeat: int, args: argparse.Namespace, work: Path) -> dict:
    out = work / f"{config}-{repeat}"
    command = [str(Path(sys.executable).parent / "giva"), "sft", "--device", "cpu", "--epochs", "1",
               "--max-train-samples", str(args.rows), "--val-size", str(args.val_size), "--batch-size", "8",
               "--max-length", "256", "--init-mode", "exact", "--output-dir", str(out), "--overwrite", "--no-progress",
               "--json", *CONFIGS[config]]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout)
    keep = ("steps", "packed_sequences", "train_rows", "train_seconds", "init_seconds", "val_loss_before",
            "val_loss_after", "exact_match_before", "exact_match_after", "train_loss", "versions")
    return {"config": config, "repeat": repeat, "wall_seconds": time.perf_counter() - start,
            **{key: result[key] for key in keep}}


def row_lengths(args: argparse.Namespace) -> dict:
    """The training rows as TRL tokenizes them (chat template, cut at --max-length): their lengths, and the share of
    padding in batches of 8 consecutive rows, in the data's order, padded to their longest (the loader shuffles the
    rows, which moves the share a little)."""
    from giva.sft.run import SFTOptions, make_trainer, preflight

    with tempfile.TemporaryDirectory(prefix="giva-sft-packing-") as scratch:
        options = SFTOptions(device="cpu", max_train_samples=args.rows, val_size=args.val_size, max_length=256,
                             output_dir=str(Path(scratch) / "out"), progress=False)
        device, path, tokenizer, data = preflight(options)
        trainer = make_trainer(options, device, path, tokenizer, data, scratch)
        lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    slots = sum(8 * max(lengths[i : i + 8]) for i in range(0, len(lengths), 8))
    return {"rows": len(lengths), "tokens": sum(lengths), "min": min(lengths), "max": max(lengths),
            "mean": sum(lengths) / len(lengths), "padding_share_batches_of_8": 1 - sum(lengths) / slots}


def report(runs: list[dict], args: argparse.Namespace, lengths: dict, commit: str) -> str:
    by = {c: sorted((r for r in runs if r["config"] == c), key=lambda r: r["repeat"]) for c in CONFIGS}
    lines = [
        "# `giva sft --packing` against unpacked rows, SmolLM2-135M, CPU",
        "",
        f"Made by `python benchmarks/diagnostics/sft_packing.py --repeats {args.repeats} --rows {args.rows}` at "
        f"{commit}: one epoch over {args.rows} training rows (Pang & Lee as one-word questions), "
        f"`--batch-size 8 --max-length 256 --init-mode exact`, fp32, {args.repeats} runs of each configuration "
        "interleaved, each in its own process. Times are medians over the runs; the training time is "
        "`trainer.train`'s, which holds the GiVA initialisation (one calibration batch: 8 rows unpacked, 8 packed "
        "sequences packed).",
        "",
        f"The {lengths['rows']} rows hold {lengths['tokens']} tokens, {lengths['min']} to {lengths['max']} per row "
        f"(mean {lengths['mean']:.1f}; SmolLM2's chat template, with its system prompt, is most of each row): padded "
        f"batches of 8 rows, taken in the data's order, spend {lengths['padding_share_batches_of_8']:.1%} of their "
        "tokens on padding, about the most packing can save (the loader's shuffled batches differ a little).",
        "",
        "| | steps | sequences | training time (s) | of which init (s) | training after init (s) | val loss after | exact match after |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for config, rs in by.items():
        seqs = rs[0]["packed_sequences"] if rs[0]["packed_sequences"] is not None else rs[0]["train_rows"]
        lines.append(
            f"| {config} | {rs[0]['steps']} | {seqs} | {median(r['train_seconds'] for r in rs):.2f} "
            f"| {median(r['init_seconds'] for r in rs):.2f} "
            f"| {median(r['train_seconds'] - r['init_seconds'] for r in rs):.2f} "
            f"| {median(r['val_loss_after'] for r in rs):.4f} | {median(r['exact_match_after'] for r in rs):.2%} |")
    lines.append("")
    for name, measure in (("training time", lambda r: r["train_seconds"]),
                          ("training time after init", lambda r: r["train_seconds"] - r["init_seconds"]),
                          ("init time", lambda r: r["init_seconds"])):
        ratio = paired_ratio_bootstrap([measure(r) for r in by["packed"]], [measure(r) for r in by["unpacked"]])
        lines.append(f"- packed / unpacked {name}: {ratio.estimate:.3f}x [{ratio.low:.3f}, {ratio.high:.3f}] "
                     f"(ratio of medians, 95 % bootstrap over the {args.repeats} paired repeats)")
    lines += ["", "The scores are those of different step counts and batch sizes (a packed step holds more rows), "
              "one seed: shown, not compared.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--val-size", type=int, default=32)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/sft")
    parser.add_argument("--from-json", type=Path, default=None, help="rewrite packing.md from a recorded packing.json")
    args = parser.parse_args()
    if args.from_json:
        record = json.loads(args.from_json.read_text())
        args.repeats, args.rows = len({r["repeat"] for r in record["runs"]}), record["lengths"]["rows"]
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "packing.md").write_text(report(record["runs"], args, record["lengths"], record["commit"]))
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="giva-sft-packing-"))
    runs = []
    for repeat in range(args.repeats):
        order = list(CONFIGS) if repeat % 2 == 0 else list(reversed(CONFIGS))  # ABBA: drift falls on both alike
        for config in order:
            runs.append(run(config, repeat, args, work))
            print(f"{config} {repeat}: {runs[-1]['train_seconds']:.1f} s", file=sys.stderr, flush=True)
    lengths = row_lengths(args)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"commit": source_commit(), "lengths": lengths, "runs": runs}
    (args.out / "packing.json").write_text(json.dumps(record, indent=1) + "\n")
    (args.out / "packing.md").write_text(report(runs, args, lengths, record["commit"]))
    print(report(runs, args, lengths, record["commit"]))


if __name__ == "__main__":
    main()
