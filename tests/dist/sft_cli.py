"""`giva sft` as a user launches it under torchrun, with checks of its two collectives before it.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 tests/dist/sft_cli.py OUT_DIR SFT_ARGS...

With GIVA_TEST_WORSE_STEP=S the validation loss of step S is raised by 1 (a --keep-best run then keeps an earlier
step); with GIVA_TEST_FAIL_SCORING=R the validation fails on process R at its second batch. Each rank writes rank<r>.json: what ``giva.sft.run.exact_match`` reports for a stub model whose right answers are
known, what ``giva.sft.run.on_main_process`` raised on this rank when the first process failed and what
``giva.sft.run.on_every_process`` raised when only the second one did, then the CLI's exit
code, what it printed, how many times this rank saved the adapter, whether the process group was left open, and
whether the model was partitioned when it loaded (DeepSpeed ZeRO-3), and a digest of its GiVA bases.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoTokenizer

import giva.finetune
import giva.sft.run
from giva.cli import main
from giva.sft.run import exact_match, on_every_process, on_main_process


class _Echo(torch.nn.Module):
    """Answers each prompt with the prompt's last token: right exactly where the reference is that word."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def generate(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.cat([input_ids, input_ids[:, -1:]], dim=1)


class _Trainer:
    def is_world_process_zero(self) -> bool:
        return dist.get_rank() == 0


def _failing_save() -> None:
    raise OSError("No space left on device")


def _raise_the_loss_of(step: int) -> None:
    """Add 1 to the validation loss scored at optimizer ``step`` (0: none), until a --keep-best restore: so that an
    earlier step is kept and both processes restore it."""
    import giva.sft.run
    import giva.sft.best

    if not step:
        return
    real, restore, restored = giva.sft.run.validation_loss, giva.sft.best.BestAdapter.restore, []

    def loss(trainer, batch_size):
        value = real(trainer, batch_size)  # every process reaches the collective inside
        return value + 1.0 if trainer.state.global_step == step and not restored else value

    giva.sft.run.validation_loss = loss
    giva.sft.best.BestAdapter.restore = lambda self, model: restored.append(1) or restore(self, model)


def _fail_scoring_on(rank: int) -> None:
    """On process ``rank``, the validation loss fails at its second batch (an OOM's stand-in, before the forward that
    the other processes of a ZeRO-3 launch are waiting in)."""
    if rank < 0 or dist.get_rank() != rank:
        return
    real = giva.sft.run.validation_loss

    def loss(trainer, batch_size):
        collator, calls = trainer.data_collator, []

        def failing(rows):
            calls.append(len(rows))
            if len(calls) == 2:
                raise MemoryError("injected at the second validation batch")
            return collator(rows)

        trainer.data_collator = failing
        try:
            return real(trainer, batch_size)
        finally:
            trainer.data_collator = collator

    giva.sft.run.validation_loss = loss


def _bases_digest(model: torch.nn.Module) -> str:
    """SHA-256 of this process's own GiVA bases (buffers: neither partitioned by ZeRO-3 nor broadcast by it)."""
    digest = hashlib.sha256()
    for name, buffer in sorted(model.named_buffers()):
        if ".giva_A." in name or ".giva_B." in name:
            digest.update(name.encode() + buffer.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def run() -> None:
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    dist.init_process_group("gloo")  # the Trainer reuses it, as it would torchrun's own
    rank = dist.get_rank()
    tokenizer = AutoTokenizer.from_pretrained(argv[argv.index("--model") + 1])
    words = ["good", "bad", "great", "awful", "film", "plot", "review"]  # 7 prompts: the two ranks get 4 and 3
    references = [w if i % 3 else "positive" for i, w in enumerate(words)]  # right on 4 of 7
    prompts = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in words]
    completions = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in references]
    record = {"rank": rank, "exact_match": exact_match(_Echo(), tokenizer, prompts, completions, batch_size=2),
              "expected": sum(w == r for w, r in zip(words, references)) / len(words)}
    try:
        on_main_process(_Trainer(), _failing_save)
        record["raised"] = None
    except BaseException as err:  # noqa: BLE001 - the record says what it was
        record["raised"] = f"{type(err).__name__}: {err}"

    def _fails_on_rank_1() -> None:
        if rank == 1:
            raise KeyError("missing adapter weights")

    try:
        on_every_process(_fails_on_rank_1, "loading failed")
        record["raised_every"] = None
    except BaseException as err:  # noqa: BLE001
        record["raised_every"] = f"{type(err).__name__}: {err}"

    saves = []
    real_save = giva.finetune.save_atomically

    def counted_save(*args, **kwargs):
        saves.append(str(args[0]))
        return real_save(*args, **kwargs)

    giva.finetune.save_atomically = counted_save
    found, real_partitioned = [], giva.sft.run.partitioned
    giva.sft.run.partitioned = lambda model: found.append(real_partitioned(model)) or found[-1]  # ZeRO-3 loaded it so
    trainers, real_make_trainer = [], giva.sft.run.make_trainer
    giva.sft.run.make_trainer = lambda *a, **k: trainers.append(real_make_trainer(*a, **k)) or trainers[-1]
    _raise_the_loss_of(int(os.environ.get("GIVA_TEST_WORSE_STEP", "0")))
    _fail_scoring_on(int(os.environ.get("GIVA_TEST_FAIL_SCORING", "-1")))
    printed, logged = io.StringIO(), io.StringIO()
    with redirect_stdout(printed), redirect_stderr(logged):
        record["code"] = main(argv)
    record.update(stdout=printed.getvalue(), stderr=logged.getvalue(), saves=saves, group_left_open=dist.is_initialized(),
                  partitioned=found, bases=_bases_digest(trainers[-1].model) if trainers else None)
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the CLI closed the process group; skip finalisation as tests/dist/teardown.py explains


if __name__ == "__main__":
    run()
