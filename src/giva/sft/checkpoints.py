"""`giva sft`'s resumable checkpoints (``--save-steps``, ``--resume``): the run's record beside the Trainer's
``checkpoint-N`` folders, which checkpoints the Trainer finished writing, and whether a resumed run is the run it
continues (its flags, its rows)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Optional

from .best import check_kept_file
from .data import SFTData, row_format
from .options import OPTIONS_FILE, RESULT_FILE, RESUMABLE_CHANGES, SFTOptions
from .zero3 import checkpoint_launch

logger = logging.getLogger("giva.sft")


def run_record(options: SFTOptions, data: SFTData) -> dict[str, Any]:
    """What a run's checkpoint folder keeps of it for ``--resume`` to compare: the flags, and a SHA-256 of the rows
    (a data file edited in place between the two runs changes it), and the rows' format (``giva generate`` reads it
    for a ``checkpoint-N`` folder). Tuples become lists, as in the stored file."""
    rows = json.dumps([data.train, data.validation], sort_keys=True, ensure_ascii=False).encode("utf-8")
    flags = {key: _compared(key, value) for key, value in json.loads(json.dumps(asdict(options))).items()}
    return {"options": flags, "data_sha256": hashlib.sha256(rows).hexdigest(), "rows": row_format(data.train[0])}


def saved_run(folder: Path) -> tuple[Optional[Path], dict[str, Any]]:
    """The record of the run whose adapter is in ``folder``: its ``sft_result.json``, or for a ``checkpoint-N`` folder
    the run's ``giva_sft_options.json`` beside it; (its path, its contents), or (None, {}) when there is neither (an
    adapter saved by other code)."""
    record = folder / RESULT_FILE
    if not record.is_file() and folder.name.removeprefix("checkpoint-").isdigit():
        record = folder.parent / OPTIONS_FILE
    if not record.is_file():
        return None, {}
    return record, json.loads(record.read_text(encoding="utf-8"))


def flag_changes(stored: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """``--flag stored -> given`` for each flag that changes what is trained (a flag the stored record lacks, from an
    older version, compares as its default)."""
    defaults = json.loads(json.dumps(asdict(SFTOptions())))
    return [f"--{k.replace('_', '-')} {stored.get(k, defaults[k])!r} -> {v!r}" for k, v in given.items()
            if k not in RESUMABLE_CHANGES and _compared(k, stored.get(k, defaults[k])) != _compared(k, v)]


def checkpoint_state(checkpoint: str | Path) -> dict[str, Any]:
    """The Trainer's ``trainer_state.json`` of a checkpoint."""
    return json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))


def is_finished(state: dict[str, Any]) -> bool:
    return state.get("global_step", 0) >= state.get("max_steps", float("inf"))


def finished(checkpoint: Path) -> bool:
    """The Trainer finished writing ``checkpoint``: its ``trainer_state.json`` (the last file it writes) holds the
    Trainer's state. Missing, empty or invalid (a machine that went down during the save), it was cut off."""
    try:
        state = checkpoint_state(checkpoint)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(state, dict) and isinstance(state.get("global_step"), int)


def missing_training_state(checkpoint: Path) -> list[str]:
    """The files of ``checkpoint`` that the Trainer resumes the optimizer and the LR schedule from and that are not
    there (transformers' ``optimizer.pt``, or ``optimizer.bin``, and ``scheduler.pt``). Without either, it starts
    both afresh and says nothing: another adapter than the uninterrupted run's. A DeepSpeed checkpoint keeps its
    optimizer in DeepSpeed's files (:func:`giva.sft.zero3.check_resume_launch`): none listed."""
    if checkpoint_launch(checkpoint)[0] is not None:
        return []
    optimizer = any((checkpoint / name).is_file() for name in ("optimizer.pt", "optimizer.bin"))
    return [name for name, there in (("optimizer.pt", optimizer), ("scheduler.pt", (checkpoint / "scheduler.pt").is_file()))
            if not there]


def finished_checkpoints(folder: Path) -> list[Path]:
    """The ``checkpoint-N`` folders the Trainer finished writing (see :func:`finished`), by step."""
    steps = [(int(p.name.removeprefix("checkpoint-")), p) for p in folder.glob("checkpoint-*")
             if p.name.removeprefix("checkpoint-").isdigit() and p.is_dir()]
    return [p for _, p in sorted(steps) if finished(p)]


def _compared(key: str, value: Any) -> Any:
    """A flag's value as ``--resume`` compares it: module lists as sets, a local model folder as its absolute path."""
    if key == "target_modules" and isinstance(value, list):
        return sorted(value)
    if key == "model" and isinstance(value, str) and os.path.isdir(os.path.expanduser(value)):
        return os.path.abspath(os.path.expanduser(value))
    return value


def check_checkpoints(options: SFTOptions, data: SFTData) -> tuple[SFTOptions, Optional[str]]:
    """(the options to run with, the checkpoint to resume from or None), for ``--save-steps`` / ``--resume``.

    A fresh run refuses a folder with an earlier run's checkpoints or with files of something else; a run stopped
    before its first checkpoint left only its record, and starts again. ``--resume`` continues from the newest
    checkpoint the Trainer finished writing, after checking that the flags (those in :data:`RESUMABLE_CHANGES` may
    change) and the rows are the stored run's; with nothing to resume yet it starts the run (so a job script can
    always pass it), and without ``--save-steps`` it keeps the stored cadence."""
    from ..finetune import check_output_dir

    folder = Path(options.checkpoints)
    if options.save_steps is None and not options.resume:
        return options, None
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"--checkpoint-dir {options.checkpoints!r} is a file; expected a folder")
    contents = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    record_file = folder / OPTIONS_FILE
    ours = OPTIONS_FILE in contents or any(name.startswith("checkpoint-") for name in contents)
    if contents and not ours:
        raise FileExistsError(f"--checkpoint-dir {options.checkpoints!r} is a non-empty folder that holds no giva sft "
                              "run; give a new or empty folder")
    done = finished_checkpoints(folder) if folder.is_dir() else []
    if not options.resume:
        if any(name.startswith("checkpoint-") for name in contents):
            raise FileExistsError(f"--checkpoint-dir {options.checkpoints!r} holds an earlier run's checkpoints; pass "
                                  "--resume to continue that run, or remove the folder to start over")
        check_output_dir(folder)
        return options, None
    if done and not record_file.is_file():
        raise FileNotFoundError(f"--resume: {options.checkpoints!r} holds checkpoints but no {OPTIONS_FILE}: not the "
                                "folder of a giva sft run")
    record = json.loads(record_file.read_text(encoding="utf-8")) if record_file.is_file() else {}
    stored = record.get("options", {})
    if options.save_steps is None and stored.get("save_steps") is not None:
        options = replace(options, save_steps=stored["save_steps"])
    if not done:
        if options.save_steps is None:
            raise ValueError(f"--resume: {options.checkpoints!r} holds no run to resume, and without --save-steps N this "
                             "run would write no checkpoint to resume later; add --save-steps N")
        logger.warning("--resume: %s holds no finished checkpoint yet; starting the run from its first step",
                       options.checkpoints)
        check_output_dir(folder)
        return options, None
    now = run_record(options, data)
    changed = flag_changes(stored, now["options"])
    if changed:
        raise ValueError(f"--resume: flags differ from the run in {options.checkpoints!r} (stored -> given): "
                         f"{'; '.join(changed)}; resume it with its own flags, or start a new run with another "
                         "--checkpoint-dir")
    if record.get("data_sha256") != now["data_sha256"]:
        raise ValueError(f"--resume: the training and validation rows of --data {options.data!r} are not those of the "
                         f"run in {options.checkpoints!r} (another SHA-256; was the file changed?); resume it on its "
                         "own data, or start a new run with another --checkpoint-dir")
    state = checkpoint_state(done[-1])
    saved_file = Path(options.output_dir).expanduser() / RESULT_FILE
    saved = json.loads(saved_file.read_text(encoding="utf-8")) if saved_file.is_file() else None
    if is_finished(state) and saved and saved.get("steps") == state["global_step"] and not flag_changes(
            saved.get("options", {}), now["options"]):
        raise ValueError(f"--resume: the run in {options.checkpoints!r} finished (step {state['global_step']}) and its "
                         f"adapter is in --output-dir {options.output_dir!r}; nothing to resume")
    missing = [] if is_finished(state) else missing_training_state(done[-1])  # a finished run trains no more
    if missing:
        raise FileNotFoundError(f"--resume: {done[-1]} has no {' and no '.join(missing)}, which the Trainer resumes the "
                                "optimizer and the learning-rate schedule from (without them it starts both afresh, and "
                                "trains another adapter than the run it continues); remove that checkpoint folder to "
                                "resume from the one before, or start a new run with another --checkpoint-dir")
    if options.keep_best:
        check_kept_file(folder, state.get("log_history", []), state["global_step"])
    for cut in sorted(p for p in folder.glob("checkpoint-*") if p.is_dir() and p not in done):
        state_file = cut / "trainer_state.json"
        what = f"{state_file} is empty or invalid" if state_file.exists() else f"{cut.name} has no trainer_state.json"
        logger.warning("--resume: %s (cut off while being written); resuming from %s", what, done[-1].name)
    return options, str(done[-1])


def check_same_resume(steps: list[Optional[int]], folder: str) -> None:
    """Raise unless every process of a launch resumes from the same step (``steps``: each process's, None for a fresh
    start, rank 0 first). Each process reads --checkpoint-dir on its own, so on a disk that only some nodes see they
    would train from different steps, their collectives paired with unrelated ones; every process holds the same list,
    so every process raises."""
    if len(set(steps)) > 1:
        seen = ", ".join(f"process {rank}: {'a fresh start' if step is None else f'step {step}'}"
                         for rank, step in enumerate(steps))
        raise RuntimeError(f"--resume: the processes of the launch found different checkpoints in --checkpoint-dir "
                           f"{folder!r} ({seen}); give every process the same folder (on a disk every node reads)")


def write_record(options: SFTOptions, data: SFTData) -> None:
    from ..checkpoint import atomic_file

    with atomic_file(Path(options.checkpoints) / OPTIONS_FILE) as tmp:
        tmp.write_text(json.dumps(run_record(options, data), indent=2) + "\n", encoding="utf-8")
