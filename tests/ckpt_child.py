"""Child process for tests/test_checkpoint.py: saves GiVA adapters and is SIGKILLed in the middle of saves.

Run as a script it reads commands from stdin, one per line: ``save <folder> <seed> <how> <delay_s>``. For
each it forks a saver that writes the adapter of ``seed`` into ``folder`` with a short sleep at
every step of the save, sends it SIGKILL after ``delay_s`` seconds, and answers ``killed <seconds>`` or
``completed <seconds>``. ``how`` is ``peft`` (``PeftModel.save_pretrained``), ``cli`` (``giva finetune``'s
``save_atomically``, adapter and labels.json) or ``fallback`` (``save_pretrained`` without the atomic exchange).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model

import giva
from giva import checkpoint
from tiny_models import tiny_bert

STEP_SLEEP_S = 0.002


def adapter_model(seed: int) -> PeftModel:
    """The tiny BERT with a GiVA adapter of its own: bases seeded by ``seed`` (regenerated from the config's seed at
    load, so new weights beside an old config load without error but match neither adapter) and vectors drawn from it."""
    config = giva.GivaConfig(r=4, target_modules=["query", "value"], variant="random", seed=seed)
    model = get_peft_model(tiny_bert(), config)
    set_vectors(model, seed)
    return model


@torch.no_grad()
def set_vectors(model: PeftModel, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "giva_lambda" in name:
            param.copy_(torch.randn(param.shape, generator=generator))


def labels_for(seed: int) -> dict[str, str]:
    return {"0": f"neg-{seed}", "1": f"pos-{seed}"}


def refuse_swaps(monkeypatch: Any, folder: Path, how: str) -> None:
    """Stand-ins for a folder that cannot be swapped whole: its parent refuses new entries (a user's folder under a
    root-owned one: the staging folder beside it cannot be made), or it is a mount point (a container's /output
    volume) that ``os.path.ismount`` sees (``mount-point``) or not (a bind mount of the same file system:
    ``swap-ebusy``); renaming a mount point fails with EBUSY."""
    if how == "parent-refuses-entries":
        real_mkdir = os.mkdir

        def mkdir(path: Any, *args: Any, **kwargs: Any) -> None:
            if Path(path).name.startswith(f".{folder.name}.giva-tmp-"):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", mkdir)
        return

    def busy(*args: Any) -> None:
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))

    monkeypatch.setattr(checkpoint, "_exchange", busy)
    if how == "mount-point":
        real_ismount = os.path.ismount
        monkeypatch.setattr(os.path, "ismount", lambda path: Path(path) == folder or real_ismount(path))


def _slowed(module: object, name: str) -> None:
    original = getattr(module, name)

    def slow(*args, **kwargs):
        time.sleep(STEP_SLEEP_S)
        result = original(*args, **kwargs)
        time.sleep(STEP_SLEEP_S)
        return result

    setattr(module, name, slow)


def _slow_down_every_step() -> None:
    import peft.peft_model

    from giva import checkpoint

    for module, name in [
        (peft.peft_model, "safe_save_file"),
        (checkpoint, "_fsync_path"),
        (checkpoint, "_exchange"),
        (checkpoint, "record_checksums"),
        (checkpoint, "_keep_unwritten"),
        (checkpoint.shutil, "rmtree"),
        (os, "rename"),
        (os, "mkdir"),
        (os, "link"),
    ]:
        _slowed(module, name)


def save(model: PeftModel, folder: str, seed: int, how: str) -> None:
    from giva import checkpoint
    from giva.finetune import save_atomically

    if how == "fallback":
        checkpoint._exchange = lambda a, b: False
    if how == "plain":  # PEFT's own save, without giva.checkpoint (the negative control, not used by the tests)
        PeftModel.save_pretrained.__wrapped__(model, folder)
        return
    if how == "cli":

        def write(tmp: str) -> None:
            model.save_pretrained(tmp)
            Path(tmp, "labels.json").write_text(json.dumps(labels_for(seed)))

        save_atomically(folder, write)
    else:
        model.save_pretrained(folder)


def main() -> None:
    torch.set_num_threads(1)  # no thread pool exists when the savers are forked
    adapter_model(0)
    import giva.finetune  # noqa: F401  (imported once here, not in every saver)
    print("ready", flush=True)
    for line in sys.stdin:
        _, folder, seed, how, delay = line.split()
        model = adapter_model(int(seed))
        start = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            try:
                _slow_down_every_step()
                save(model, folder, int(seed), how)
            finally:
                os._exit(0)
        deadline = start + float(delay)
        done, status = 0, 0
        while not done and time.perf_counter() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            time.sleep(0.0005)
        if not done:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
        outcome = "killed" if os.WIFSIGNALED(status) else "completed"
        print(f"{outcome} {time.perf_counter() - start:.4f}", flush=True)


if __name__ == "__main__":
    main()
