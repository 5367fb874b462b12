"""The scores `giva sft` reports on its validation split, before and after training.

:func:`validation_loss` is the loss per scored token over the whole split (the token losses summed, over their count);
:func:`exact_match` the share of greedy answers equal to the trained completion. Under torchrun both give row ``i``
to process ``i % world`` and sum over the processes, so every row counts once whatever the launch, and if one
process fails, every process raises rather than wait for it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

from .zero3 import lockstep


def _launch() -> tuple[int, int]:
    import torch.distributed as dist

    from ..integrations.distributed import is_distributed

    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def _summed(values: list[float], work: Callable[[], list[float]], device: Any, what: str,
            sharded: bool = False) -> list[float]:
    """``work()`` on this process, its numbers summed over the processes of a launch (float64). An error on any
    process raises on every process after the sum, which all of them reach.

    ``sharded``: ``work`` runs a ZeRO-3 model in lockstep, whose every forward waits for all processes, so a process
    that failed in the middle would leave the others waiting in a forward. Its failure goes through the process
    group's store instead, and the group is aborted (as :func:`giva.initialize` does for sharded models): every process
    raises at once, naming the failed one, and the group is unusable after that."""
    import torch
    import torch.distributed as dist

    world = _launch()[1]
    error: Optional[BaseException] = None
    try:
        values = _through_the_store(work, device, what) if sharded and world > 1 else work()
    except BaseException as err:  # Ctrl-C too: under torchrun to the sum first, so that no process waits for this one
        if world == 1 or isinstance(err, _FailedInLockstep):
            raise
        error = err
    if world == 1:
        return values
    summed = torch.tensor([*values, error is not None], dtype=torch.float64, device=device)
    dist.all_reduce(summed)
    if error is not None:
        raise error
    if summed[-1]:
        raise RuntimeError(f"{what} failed on another process of the launch; its error is in that process's log")
    return summed[:-1].tolist()


class _FailedInLockstep(RuntimeError):
    """Scoring a sharded model failed on a process of the launch; every process raises this at once."""


def _through_the_store(work: Callable[[], list[float]], device: Any, what: str) -> list[float]:
    from ..init.distributed import DistributedInitError, TorchCollective

    collective = TorchCollective(device, sharded=True)
    try:
        with collective.watching(), collective.computing():
            return work()
    except DistributedInitError as err:  # the process that failed, or one whose forward the abort interrupted
        raise _FailedInLockstep(f"{what} failed on process {err.rank} of {err.world}: {err.reason}") from err


def validation_loss(trainer: Any, batch_size: int) -> float:
    """The mean loss per scored token over ``trainer.eval_dataset`` (TRL's processed validation rows): the model's
    loss of each batch of ``batch_size`` rows times the tokens it scored, summed, over all the tokens scored. No
    batch size, padding or number of processes changes it (the Trainer's ``eval_loss`` averages each batch's mean
    over rows, so it moved with the batch size where rows differ in length). Runs in eval mode, under Accelerate's
    autocast of the run's ``--bf16`` / ``--fp16`` (before training as after it, when the Trainer has patched the
    model's forward with it), without a KV cache (with one, transformers drops the mask between padding-free rows)."""
    import torch

    from ..init.distributed import zero3_trace_reset

    model = trainer.model
    rank, world = _launch()
    dataset = trainer.eval_dataset
    rows = dataset.select(range(rank, len(dataset), world))
    device = next(p for p in model.parameters()).device
    batches = [list(range(start, min(start + batch_size, len(rows)))) for start in range(0, len(rows), batch_size)]
    synced = lockstep(model)  # every process runs as many forwards as the one with the most rows
    if synced:  # the others forward the first row again, not counted
        batches += [[]] * (_ceil(_ceil(len(dataset), world), batch_size) - len(batches))

    def work() -> list[float]:
        total, tokens = 0.0, 0
        for indices in batches:
            batch = trainer.data_collator([rows[i] for i in indices] if indices else [dataset[0]])
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            scored = int((batch["labels"][..., 1:] != -100).sum()) if indices else 0  # what the shifted loss averages
            if not scored and not synced:
                continue
            with torch.no_grad(), trainer.accelerator.autocast():  # the training's mixed precision, before it too
                loss = model(**batch, use_cache=False).loss
            if scored:
                total += float(loss.double()) * scored
                tokens += scored
        return [total, float(tokens)]

    was_training = model.training
    model.eval()
    try:
        with zero3_trace_reset(model):  # not the order the training steps fetch ZeRO-3's weights in
            total, tokens = _summed([0.0, 0.0], work, device, "the validation loss", sharded=synced)
    finally:
        model.train(was_training)
    return total / tokens if tokens else float("nan")


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _first_label(labels: list[int]) -> int:
    return next((i for i, label in enumerate(labels) if label != -100), len(labels))


def prompt_ids(dataset: Any) -> list[list[int]]:
    """The prompt of every row TRL processed: its ``input_ids`` up to the first token with a label (not -100)."""
    return [ids[: _first_label(labels)] for ids, labels in zip(dataset["input_ids"], dataset["labels"])]


def completion_ids(dataset: Any) -> list[list[int]]:
    """The completion of every row as TRL tokenized it: its ``input_ids`` from the first token with a label on. With a
    chat template that is the template's rendering of the assistant turn, with whatever it adds to the reply (Qwen3's
    empty think block, ``<think>`` and ``</think>`` around blank lines, before it) and its end-of-turn tokens after it."""
    return [ids[_first_label(labels):] for ids, labels in zip(dataset["input_ids"], dataset["labels"])]


def _last_run(labels: list[int]) -> int:
    """Where the last run of labelled tokens (not -100) starts: the last assistant turn of a conversation."""
    end = next((i + 1 for i in range(len(labels) - 1, -1, -1) if labels[i] != -100), 0)
    start = end
    while start > 0 and labels[start - 1] != -100:
        start -= 1
    return start


def cut_completions(dataset: Any, max_length: int, special_ids: set[int]) -> int:
    """How many of TRL's processed rows ``--max-length`` cut inside their completion: the row fills ``max_length``
    and its last labelled run (the reply, or a conversation's last assistant turn; the earlier turns keep their
    ends) holds no special token (a whole completion ends with the EOS TRL appends, or the chat template's
    end-of-turn token; a cut one lost them)."""
    return sum(len(ids) >= max_length and not any(t in special_ids for t in ids[_last_run(labels):])
               for ids, labels in zip(dataset["input_ids"], dataset["labels"]))


def exact_match(model: Any, tokenizer: Any, prompts: list[list[int]], completions: list[list[int]], batch_size: int,
                progress: bool = False) -> float:
    """Share of greedy answers equal to the trained completion (:func:`completion_ids`), both decoded with special
    tokens dropped and surrounding whitespace stripped; whatever the chat template adds to the reply is in the answer
    and the reference alike. Each answer gets as many new tokens as the longest completion holds, its end-of-turn or
    EOS token included, where generation stops (one more if it has no special token): a model that writes a completion
    it was trained on has room for all of it, and one that does not stop after it is seen going on.

    Under torchrun each process answers every ``world``-th prompt and the hits are summed over the processes."""
    rank, world = _launch()
    references = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in completions]
    special = set(tokenizer.all_special_ids)
    longest = max(len(ids) + all(t not in special for t in ids) for ids in completions)  # the same on every process
    total = len(prompts)
    first, prompts, references = prompts[0], prompts[rank::world], references[rank::world]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(p for p in model.parameters()).device
    synced = lockstep(model)  # as many generate calls as the process with the most prompts, each in step
    asked = prompts + [first] * (_ceil(total, world) - len(prompts)) if synced else prompts

    def work() -> list[float]:
        new = generated(model, asked, pad, batch_size, progress=progress and rank == 0, desc="exact match",
                        max_new_tokens=longest, do_sample=False, eos_token_id=stop_tokens(model, tokenizer),
                        **({"synced_gpus": True} if synced else {}))
        answers = tokenizer.batch_decode(new[: len(prompts)], skip_special_tokens=True)
        return [float(sum(a.strip() == r for a, r in zip(answers, references)))]

    from ..init.distributed import zero3_trace_reset

    was_training = model.training
    model.eval()
    try:
        with zero3_trace_reset(model):
            (hits,) = _summed([0.0], work, device, "exact match", sharded=synced)
    finally:
        model.train(was_training)
    return int(hits) / total


def stop_tokens(model: Any, tokenizer: Any) -> list[int]:
    """The tokens generation stops at: the model's own end of sequence (its generation config) and the tokenizer's
    EOS, which TRL appends to every trained completion and a chat template's turn usually ends with. A base model given
    a chat template stops at the template's end of turn only through the second (the tiny test model's generation
    config names another token): without it an answer ran on past the trained reply."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
    eos = tokenizer.eos_token_id
    return ids + ([eos] if eos is not None and eos not in ids else [])


def generated(model: Any, prompts: list[list[int]], pad: int, batch_size: int, progress: bool = False,
              desc: str = "generate", **generation: Any) -> list[Any]:
    """The tokens ``model.generate(**generation)`` writes after each prompt (token ids), ``batch_size`` prompts at a
    time, left padded with ``pad``; after an end of sequence, ``pad`` to the batch's longest answer. The caller puts the
    model in eval mode."""
    import torch
    from tqdm.auto import tqdm

    device = next(p for p in model.parameters()).device
    answers: list[Any] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress, leave=False):
        batch = prompts[start : start + batch_size]
        width = max(map(len, batch))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, pad_token_id=pad, **generation)
        answers.extend(out[:, width:].cpu())
    return answers
