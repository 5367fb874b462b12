"""What storing A in bf16 (`GivaConfig(bases_dtype="bfloat16")`) does to accuracy: two `giva finetune` runs
that differ only in that field (MiniLM, Pang & Lee, same seed, same split).

    .venv/bin/python scripts/bases_dtype_accuracy.py --max-train-samples 800 --epochs 1

Writes benchmarks/results/serve/bases_dtype_accuracy.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from giva import GivaConfig
from giva.finetune import DEFAULT_TARGETS, TrainConfig, finetune

OUT = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "serve" / "bases_dtype_accuracy.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-train-samples", type=int, default=800)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = []
    for dtype in ("float32", "bfloat16"):
        config = GivaConfig(r=8, target_modules=DEFAULT_TARGETS, task_type="SEQ_CLS", seed=args.seed, bases_dtype=dtype)
        with tempfile.TemporaryDirectory() as tmp:
            result = finetune(
                giva_config=config,
                train_config=TrainConfig(epochs=args.epochs, seed=args.seed),
                max_train_samples=args.max_train_samples,
                output_dir=str(Path(tmp) / "out"),
                progress=False,
            )
        rows.append({"bases_dtype": dtype, **{k: v for k, v in vars(result).items() if isinstance(v, (int, float, str))}})
        print(rows[-1], flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"args": vars(args), "runs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
