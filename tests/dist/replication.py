"""``replication_mismatches`` on ranks whose GiVA tensors differ in shape, dtype, values or names (tests/test_distributed_train.py).

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 tests/dist/replication.py OUT_DIR

Each rank writes ``<out>/rank<r>.json``: per case, the list it returned (or what it raised) and how long it took.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import timedelta
from pathlib import Path

import teardown
import torch.distributed as dist
from peft import get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for tiny_models

from giva import GivaConfig  # noqa: E402
from giva.integrations.distributed import replication_mismatches  # noqa: E402
from tiny_models import tiny_llama  # noqa: E402


def replica(r: int = 2, targets: tuple[str, ...] = ("q_proj",)):
    return get_peft_model(tiny_llama(seed=0), GivaConfig(r=r, target_modules=list(targets), variant="VrUr", seed=3))


def cases(rank: int) -> dict:
    """Rank 1 differs from rank 0 in each case (the same names everywhere but in ``names``)."""
    altered = replica()
    for name, param in altered.named_parameters():
        if rank == 1 and name.endswith("layers.0.self_attn.q_proj.giva_lambda_o.default"):
            param.data = param.data.double()  # same shape, another dtype
        if rank == 1 and name.endswith("layers.1.self_attn.q_proj.giva_lambda_s.default"):
            param.data[0] += 1  # same shape and dtype, another value
    return {
        "rank": replica(r=2 if rank == 0 else 4),
        "altered": altered,
        "names": replica(targets=("q_proj",) if rank == 0 else ("q_proj", "v_proj")),
        "alike": replica(),
    }


def main() -> None:
    out = Path(sys.argv[1])
    # A short group timeout: a rank left waiting in a gather fails the test in 60 s instead of 30 minutes.
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    results = {}
    for case, model in cases(rank).items():
        start = time.perf_counter()
        try:
            results[case] = {"mismatches": replication_mismatches(model)}
        except Exception as exc:  # noqa: BLE001  recorded for the test to judge
            results[case] = {"raised": f"{type(exc).__name__}: {exc}"}
        results[case]["seconds"] = time.perf_counter() - start
    (out / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    teardown.end()  # every output is written: leave without finalisation (see teardown.py)


if __name__ == "__main__":
    main()
