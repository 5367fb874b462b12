"""2-rank GiVA initialisation scenarios, one torchrun launch (tests/test_distributed_init.py checks the files).

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 tests/dist/init_ranks.py OUT_DIR

Each rank writes ``<out>/<scenario>_rank<r>.pt`` for the plain, DDP-wrapped and FSDP2-sharded models (and fp16 ones,
whose forward calls go to ``<out>/<scenario>_calls_rank<r>.json``):
its bases after init on its own batches, and per pass the request it accumulated for and the sums
its session received (after the all-reduce, before any QR/SVD or broadcast). It also writes
``<out>/failures_rank<r>.json``: what each injected one-rank failure made this rank raise, and how
long it took.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import teardown
import torch
import torch.distributed as dist
from peft import get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for tiny_models

import giva  # noqa: E402
from giva import GivaConfig  # noqa: E402
from giva.init import giva_layers  # noqa: E402
from giva.init.distributed import TorchCollective  # noqa: E402
from giva.init.session import GradientInitError, InitSession  # noqa: E402
from tiny_models import text_batches, tiny_llama  # noqa: E402

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
NUM_BATCHES = 2


def model(variant: str = "VrUr"):
    return get_peft_model(tiny_llama(seed=0), GivaConfig(r=4, target_modules=TARGETS, variant=variant, seed=3))


def rank_batches(rank: int) -> list[dict]:
    return text_batches(n=NUM_BATCHES, batch=4, length=12, labels="lm", seed=100 + rank)


# Rank 1's loss is this many times the model's: its fp16 output gradients overflow at the first loss scale (2**16),
# rank 0's do not, so only rank 1 asks to run its batch again.
FP16_WEIGHT = 2**12


def fp16_model():
    """``model()`` with its base weights in fp16."""
    return get_peft_model(tiny_llama(seed=0).half(), GivaConfig(r=4, target_modules=TARGETS, variant="VrUr", seed=3))


def fp16_weighted_loss(rank: int, calls: list):
    def loss_fn(m, batch):
        calls.append(1)
        loss = m(**batch).loss
        return loss * FP16_WEIGHT if rank == 1 else loss
    return loss_fn


class TwoHeads(torch.nn.Module):
    """A body and two heads; each batch names the head it trains (a multi-task model, or an MoE expert's tokens)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Linear(16, 16)
        self.head_a = torch.nn.Linear(16, 8)
        self.head_b = torch.nn.Linear(16, 8)

    def forward(self, x: torch.Tensor, task: str) -> torch.Tensor:
        return (self.head_a if task == "a" else self.head_b)(torch.tanh(self.body(x)))


def two_heads():
    return get_peft_model(TwoHeads(), GivaConfig(r=2, target_modules=["body", "head_a", "head_b"], variant="VrUr", seed=1))


def head_batches(rank: int) -> list[dict]:
    """Rank 0's batches reach head_a only, rank 1's head_b only."""
    g = torch.Generator().manual_seed(10 + rank)
    task = "a" if rank == 0 else "b"
    return [{"x": torch.randn(4, 16, generator=g), "y": torch.randn(4, 8, generator=g), "task": task} for _ in range(NUM_BATCHES)]


def head_loss(m, batch: dict) -> torch.Tensor:
    return (m(batch["x"], batch["task"]) - batch["y"]).pow(2).mean()


def bases_of(m) -> dict[str, torch.Tensor]:
    out = {}
    for name, layer in giva_layers(m).items():
        out[f"{name}.A"] = layer.giva_A["default"].detach().cpu().clone()
        out[f"{name}.B"] = layer.giva_B["default"].detach().cpu().clone()
    return out


@contextmanager
def recording_passes() -> Iterator[list[dict]]:
    """Per pass: the request this rank accumulated for, and the summed partial its session received.

    The sums are taken where ``TorchCollective.finish_pass`` gets them: after the all-reduce, before
    the owners' QR/SVD and the broadcast, so they show what each rank holds, not what it was sent.
    """
    passes: list[dict] = []
    next_request, finish_pass = InitSession.next_request, TorchCollective.finish_pass

    def recording_request(session: InitSession):
        request = next_request(session)
        items = {key: (i.layer, i.out_start, i.out_size, i.kind, i.matrix) for key, i in request.items.items()}
        passes.append({"pass_index": request.pass_index, "passes": request.passes, "items": items})
        return request

    def recording_finish(comm: TorchCollective, session: InitSession, partial) -> None:
        sums = {key: total.detach().cpu().clone() for key, total in partial.sums.items()}
        passes[-1].update(sums=sums, batches=partial.batches, tokens=partial.tokens)
        finish_pass(comm, session, partial)

    InitSession.next_request, TorchCollective.finish_pass = recording_request, recording_finish
    try:
        yield passes
    finally:
        InitSession.next_request, TorchCollective.finish_pass = next_request, finish_pass


def init_and_save(
    out: Path, scenario: str, rank: int, m, batches: list[dict], mode: str, num_batches=NUM_BATCHES, statistic: str = "mean",
    loss_fn=None,
) -> None:
    """giva.initialize on this rank's batches; writes the bases and the recorded passes."""
    with recording_passes() as passes:
        report = giva.initialize(m, batches, num_batches=num_batches, progress=False, mode=mode, statistic=statistic,
                                 loss_fn=loss_fn)
    inner = m.module if isinstance(m, torch.nn.parallel.DistributedDataParallel) else m
    record = {"bases": bases_of(inner), "mode": report.mode, "sums_bytes": report.sums_bytes, "passes": passes}
    torch.save(record, out / f"{scenario}_rank{rank}.pt")


def failure_cases(rank: int) -> dict[str, dict]:
    """Each case breaks rank 1 only (the all-zero and no-gradient cases: every rank); kwargs for giva.initialize."""
    batches = rank_batches(rank)

    def nan_on_rank1(m, batch, calls=[]):  # noqa: B006  counts calls across batches
        calls.append(1)
        loss = m(**batch).loss
        return loss * float("nan") if rank == 1 and len(calls) == 2 else loss

    def shallow(m, batch):  # the loss stops at the first decoder layer: no rank reaches the second
        return m(**batch, output_hidden_states=True).hidden_states[1].pow(2).mean()

    def loader_failing_on_rank1():
        yield batches[0]
        if rank == 1:
            raise OSError("injected loader failure")
        yield from batches[1:]

    def loss_fn_failing_on_rank1(m, batch):
        loss = m(**batch).loss
        if rank == 1:
            raise KeyError("injected loss_fn failure")
        return loss

    def reasons_of_other_lengths(m, batch):  # both ranks fail: a long non-ASCII reason, and an empty one
        m(**batch)
        if rank == 0:
            raise KeyError("Grüße vom Rang 0, " * 20)
        raise GradientInitError("")

    def forward_failing_on_rank1(m, batch):
        if rank == 1:
            batch = {**batch, "input_ids": batch["input_ids"] + 1000}  # past the vocabulary: the embedding raises
        return m(**batch).loss

    return {
        "dataloader_error": dict(dataloader=loader_failing_on_rank1()),
        "loss_fn_error": dict(dataloader=batches, loss_fn=loss_fn_failing_on_rank1),
        "forward_error": dict(dataloader=batches, loss_fn=forward_failing_on_rank1),
        "nan_loss": dict(dataloader=batches, loss_fn=nan_on_rank1),
        "reasons_of_other_lengths": dict(dataloader=batches, loss_fn=reasons_of_other_lengths),
        "too_few_batches": dict(dataloader=iter(batches[:1]) if rank == 1 else batches),  # no len(): found as it runs out
        "too_few_sized_batches": dict(dataloader=batches[:1] if rank == 1 else batches),  # len() < k: before any batch
        "layer_without_gradient": dict(dataloader=batches, loss_fn=shallow),
        "all_zero_gradient": dict(dataloader=batches, loss_fn=lambda m, b: m(**b).loss * 0.0),
        "svd_failure": dict(dataloader=batches, mode="exact"),
        "all_without_len": dict(dataloader=iter(batches) if rank == 1 else batches, num_batches="all"),
        "all_unequal_lengths": dict(dataloader=batches[:1] if rank == 1 else batches, num_batches="all"),
        "unequal_num_batches": dict(dataloader=batches, num_batches=1 if rank == 1 else 2),
        # Arguments invalid on rank 1 only: rank 0 would wait in the first collective without the agreement.
        "invalid_mode_on_one_rank": dict(dataloader=batches, mode="dense" if rank == 1 else "exact"),
        "unknown_adapter_on_one_rank": dict(dataloader=batches, adapter_name="other" if rank == 1 else None),
        "invalid_num_batches_on_one_rank": dict(dataloader=batches, num_batches=0 if rank == 1 else 2),
        # Valid on each rank, but the ranks' sums would have other shapes (in x in against out x in).
        "different_statistic_on_one_rank": dict(dataloader=batches, mode="exact", model=model("Vr"),
                                                statistic="second-moment" if rank == 1 else "mean"),
        # Rank 1's model adapts other layers: the ranks' sums would not line up.
        "different_targets_on_one_rank": dict(dataloader=batches, model=(
            get_peft_model(tiny_llama(seed=0), GivaConfig(r=4, target_modules=["q_proj"], variant="VrUr", seed=3))
            if rank == 1 else None
        )),
    }


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    batches = rank_batches(rank)

    for mode in ("exact", "sketch"):
        init_and_save(out, f"plain_{mode}", rank, model(), batches, mode)

    init_and_save(out, "all_exact", rank, model(), batches, "exact", num_batches="all")  # len(batches) == NUM_BATCHES
    init_and_save(out, "ddp_sketch", rank, torch.nn.parallel.DistributedDataParallel(model()), batches, "sketch")
    for mode in ("exact", "sketch"):  # the second moment sums per-batch products: each rank's own batches
        init_and_save(out, f"moment_{mode}", rank, model("Vr"), batches, mode, statistic="second-moment")

    for mode in ("exact", "sketch"):  # a head that only the other rank's batches reach
        try:
            init_and_save(out, f"heads_{mode}", rank, two_heads(), head_batches(rank), mode, loss_fn=head_loss)
        except GradientInitError as exc:  # recorded for the test to judge
            torch.save({"error": str(exc)}, out / f"heads_{mode}_rank{rank}.pt")

    from torch.distributed.fsdp import fully_shard

    for mode in ("exact", "sketch"):
        m = model()
        for layer in m.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(m)
        assert any(type(p.data).__name__ == "DTensor" for p in m.parameters())
        init_and_save(out, f"fsdp2_{mode}", rank, m, batches, mode)

    for scenario in ("fp16_exact", "fp16_sketch", "fp16fsdp2_exact"):  # rank 1's batches overflow at the first scale
        m = fp16_model()
        if scenario.startswith("fp16fsdp2"):
            for layer in m.base_model.model.model.layers:
                fully_shard(layer)
            fully_shard(m)
        calls: list = []
        init_and_save(out, scenario, rank, m, batches, scenario.split("_")[1], loss_fn=fp16_weighted_loss(rank, calls))
        (out / f"{scenario}_calls_rank{rank}.json").write_text(json.dumps(len(calls)))

    results = {}
    for case, kwargs in failure_cases(rank).items():
        m = kwargs.pop("model", None) or model()
        original_svd = torch.linalg.svd
        if case == "svd_failure" and rank == 1:
            def broken_svd(*args, **kw):
                raise torch.linalg.LinAlgError("injected SVD failure")
            torch.linalg.svd = broken_svd
        start = time.perf_counter()
        try:
            giva.initialize(m, progress=False, **{"num_batches": NUM_BATCHES, **kwargs})
            results[case] = {"raised": None, "message": "", "seconds": time.perf_counter() - start}
        except Exception as exc:  # noqa: BLE001  recorded for the test to judge
            results[case] = {
                "raised": type(exc).__name__, "message": str(exc), "seconds": time.perf_counter() - start,
                "value_error": isinstance(exc, ValueError), "reasons": getattr(exc, "reasons", None),
            }
        finally:
            torch.linalg.svd = original_svd
        dist.barrier()
    (out / f"failures_rank{rank}.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    teardown.end()  # every output is written: leave without finalisation (see teardown.py)


if __name__ == "__main__":
    main()
