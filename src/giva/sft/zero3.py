"""`giva sft` under DeepSpeed ZeRO-3 (``accelerate launch`` with a stage-3 configuration): the frozen weights are
partitioned over the processes, each holding 1/N of them, for a base that does not fit one device.

The model loads partitioned (``zero.Init``, which the Trainer's arguments switch on) and its forward fetches each
layer's weights from every process (the engine's hooks, installed when training starts), so:

- every process runs the same number of forwards and ``generate`` calls in the validation and exact match
  (:func:`lockstep`; a process with fewer rows runs filler batches whose results it drops) and generates with
  ``synced_gpus``;
- the adapter is read whole (saved, exported, kept by ``--keep-best``) inside :func:`gathered`, which every process
  enters;
- the scores of the base model are taken when training starts, once the engine exists (:func:`on_train_begin`);
- a run whose training finished but whose save did not is refused (:func:`check_zero3_finished`).

Outside ZeRO-3 each of these is a no-op, so the plain and data-parallel runs are unchanged. For every launch, a
checkpoint resumes only under the launch that wrote it (:func:`check_resume_launch`): the Trainer writes and reads
DeepSpeed's optimizer state only under DeepSpeed, and ZeRO's partitioned state only with as many processes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

from .options import SFTOptions


def deepspeed_stage() -> Optional[int]:
    """The ZeRO stage ``accelerate launch``'s configuration asks for (``ACCELERATE_USE_DEEPSPEED`` with the stage from
    ``ACCELERATE_DEEPSPEED_ZERO_STAGE`` or the config file, read as Accelerate and the Trainer read it); None without
    DeepSpeed. A config file DeepSpeed cannot read is a ValueError naming it."""
    import os

    from accelerate.utils import DeepSpeedPlugin, parse_flag_from_env

    if not parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        return None
    try:
        return DeepSpeedPlugin().zero_stage
    except Exception as err:  # json's or accelerate's error, without the file
        path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        where = f"ACCELERATE_DEEPSPEED_CONFIG_FILE {path!r}" if path else "accelerate launch's DeepSpeed configuration"
        raise ValueError(f"{where}: {type(err).__name__}: {err}") from err


def zero3_launch() -> bool:
    return deepspeed_stage() == 3


# the flags refused under ZeRO-3, before the model loads: (SFTOptions field, flag, why)
_NOT_UNDER_ZERO3 = (
    ("load_in_4bit", "--load-in-4bit", "bitsandbytes' quantised weights are not partitioned by ZeRO-3"),
    ("load_in_8bit", "--load-in-8bit", "bitsandbytes' quantised weights are not partitioned by ZeRO-3"),
    ("torch_compile", "--torch-compile", "the compiled step's first backward failed there (an in-place change that "
                                         "autograd refused, in TRL's chunked log-probabilities)"),
)


def check_zero3_run(options: SFTOptions) -> None:
    """Under a ZeRO-3 launch, a flag that does not work there is one ValueError naming it (before the model loads), and
    so is transformers 4.x, under which the first step failed in the Trainer's learning-rate scheduler (``zip()
    argument 2 is longer than argument 1``; transformers 4.56.2, DeepSpeed 0.19.8)."""
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        raise ValueError(f"giva sft under DeepSpeed ZeRO-3 needs transformers >= 5 (with {transformers.__version__} the "
                         "first step failed in the Trainer's learning-rate scheduler); upgrade transformers, or launch "
                         "with torchrun or ZeRO stage 1 or 2")
    for field, flag, why in _NOT_UNDER_ZERO3:
        if getattr(options, field):
            raise ValueError(f"{flag} is not supported under DeepSpeed ZeRO-3 (accelerate launch's configuration: "
                             f"ACCELERATE_USE_DEEPSPEED, stage 3): {why}; leave it out, or launch with torchrun or ZeRO "
                             "stage 1 or 2")


def deepspeed_launch() -> Optional[str]:
    """What ``accelerate launch``'s configuration runs, as :func:`checkpoint_launch` names a checkpoint's writer:
    ``"ZeRO-3"``, ``"ZeRO stage 1 or 2"``, ``"DeepSpeed without ZeRO"``, or None without DeepSpeed."""
    stage = deepspeed_stage()
    if stage is None:
        return None
    return "ZeRO-3" if stage == 3 else "ZeRO stage 1 or 2" if stage in (1, 2) else "DeepSpeed without ZeRO"


def checkpoint_launch(checkpoint: Path) -> tuple[Optional[str], int]:
    """(what wrote the Trainer checkpoint ``checkpoint``, how many processes) from DeepSpeed's files in it: the folder
    its ``latest`` file names holds one model-states file per process under ZeRO-3, one in all under stages 1 and 2,
    and one optimizer-states file per process under both. (None, 0) for a checkpoint without DeepSpeed's files."""
    latest = checkpoint / "latest"
    tag = latest.read_text(encoding="utf-8").strip() if latest.is_file() else ""
    folder = checkpoint / tag
    if not tag or not folder.is_dir():
        return None, 0
    processes = len(list(folder.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt")))
    if any(folder.glob("zero_pp_rank_*_mp_rank_00_model_states.pt")):
        return "ZeRO-3", processes
    return ("ZeRO stage 1 or 2" if processes else "DeepSpeed without ZeRO"), processes


def check_resume_launch(checkpoint: str, processes: int) -> None:
    """A checkpoint is resumed by a launch like the one that wrote it: the Trainer reads DeepSpeed's optimizer state
    only under DeepSpeed (a plain launch went on with a fresh optimizer and nothing said: another adapter), a plain
    checkpoint only without it (DeepSpeed: "Can't find a valid checkpoint" once the model had loaded), and ZeRO's
    partitioned state only with as many processes (a 2-process ZeRO-3 checkpoint under 1 process: exit 1 with no
    message). A ValueError naming what wrote it, before the model loads."""
    wrote, written_by = checkpoint_launch(Path(checkpoint))
    launch = deepspeed_launch()
    writer = f"{wrote} on {written_by} processes" if wrote and written_by else wrote or "a launch without DeepSpeed"
    if wrote != launch:
        this = launch or "a launch without DeepSpeed"
        raise ValueError(f"--resume: {checkpoint} was written under {writer}, and this is {this}: resume it under the "
                         "launch that wrote it (the optimizer state is in its format)")
    if written_by and written_by != processes:
        raise ValueError(f"--resume: {checkpoint} was written under {writer}, and this launch has {processes}: "
                         f"DeepSpeed reads its partitioned optimizer state with as many processes; launch {written_by}")


def check_zero3_finished(checkpoint: str) -> None:
    """A ``--resume`` whose newest checkpoint is at ``--max-steps`` (training finished, the save did not) loads that
    checkpoint's adapter into the model and scores it without training; under ZeRO-3 the model is partitioned and only
    the engine that training builds can run it, so such a run is refused, before the model loads, with the ways out."""
    if zero3_launch():
        raise ValueError(f"--resume: the newest checkpoint, {checkpoint}, is at --max-steps (training finished, the save "
                         "did not), and under DeepSpeed ZeRO-3 giva sft scores and saves only after training steps; its "
                         "adapter is in that folder (giva generate and load_sft_adapter read it), or resume once without "
                         "ZeRO-3 (torchrun, or one process) to score and save it")


def partitioned(model: Any) -> bool:
    """The model holds ZeRO-3 partitioned parameters (DeepSpeed's ``ds_tensor``)."""
    return any(hasattr(p, "ds_tensor") for p in model.parameters())


def lockstep(model: Any) -> bool:
    """Every process must run the same forwards: the model is partitioned and the launch has several processes."""
    from ..integrations.distributed import is_distributed

    if not is_distributed():
        return False
    import torch.distributed as dist

    return dist.get_world_size() > 1 and partitioned(model)


@contextmanager
def gathered(model: Any, modify: bool = False) -> Iterator[None]:
    """The adapter's parameters (GiVA's, every trainable one) whole on every process inside the block, which every
    process of the launch enters: a collective. With ``modify`` the first process's values are partitioned back on
    leaving (what it wrote into them). A no-op for a model that is not partitioned."""
    params = [p for name, p in model.named_parameters() if hasattr(p, "ds_tensor") and (p.requires_grad or "giva_" in name)]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
        yield


def on_train_begin(work: Callable[[], None]) -> Any:
    """A callback that runs ``work`` when training starts: under ZeRO-3 the engine, whose hooks fetch the
    partitioned weights for a forward, exists from then on (the Trainer builds it in ``train``, which giva sft calls
    once)."""
    from transformers import TrainerCallback

    class WhenTrainingStarts(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            work()

    return WhenTrainingStarts()

