"""`giva sft --keep-best`: the trainable tensors of the validation with the lowest loss so far.

Every process keeps them in memory (the validation loss is summed over the processes, so all of them take the same
decision). With checkpoints (``--save-steps``), each improvement is also written whole, as
``best-<step>.safetensors`` in the checkpoint folder, before the Trainer's checkpoint of that step: a run resumed
from step S takes the newest file of a step <= S (each improvement beats every earlier one) and deletes those of
later steps, which the resumed run trains again. The tensors are the adapter's trainable ones (GiVA's vectors), a
few megabytes; the bases do not change during training.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

PATTERN = re.compile(r"^best-(\d+)\.safetensors$")


def _files(folder: Path) -> dict[int, Path]:
    """The best-<step> files in ``folder``, by step."""
    if not folder.is_dir():
        return {}
    return {int(m.group(1)): p for p in folder.iterdir() if (m := PATTERN.match(p.name))}


def check_kept_file(folder: Path, log_history: list[dict[str, Any]], step: int) -> None:
    """Before a ``--keep-best`` run resumes at ``step``: the file of the lowest validation loss logged up to that
    step (``log_history`` of the checkpoint's ``trainer_state.json``; the earliest of a tie, never a NaN, as
    :meth:`BestAdapter.offer` keeps them) must be in ``folder``, holding that loss. Deleted, the run forgot it and
    kept a later, worse step with nothing said; a file of another loss is not the one this run wrote."""
    kept: Optional[tuple[int, float]] = None
    for entry in log_history:
        loss = entry.get("eval_loss")
        if loss is not None and entry.get("step", 0) <= step and loss < (kept[1] if kept else math.inf):
            kept = (entry["step"], loss)
    if kept is None:
        return
    path = folder / f"best-{kept[0]}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"--keep-best: {path} is missing: it holds the adapter of the lowest validation loss "
                                f"up to step {step} ({kept[1]:.6g}, at step {kept[0]}), without which the resumed run "
                                "would keep a later, worse step; put it back, or start the run again")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        stored = (handle.metadata() or {}).get("loss")
    if stored is None or float(stored) != kept[1]:
        raise ValueError(f"--keep-best: {path} holds validation loss {stored}, but the run logged {kept[1]!r} at step "
                         f"{kept[0]}: not the file this run wrote; put the run's own back, or start the run again")


class BestAdapter:
    """The lowest validation loss seen, its step and the trainable tensors then (on the CPU); ``folder``: where
    they are also written (None: in memory only). ``on_main`` runs a write on the first process of a launch and
    makes every process raise if it fails (default: on this process if ``main_process``)."""

    def __init__(self, folder: Optional[str | Path], main_process: bool,
                 on_main: Optional[Callable[[Callable[[], None]], None]] = None) -> None:
        self.folder = None if folder is None else Path(folder)
        self.main_process = main_process
        self.on_main = on_main or (lambda work: work() if main_process else None)
        self.step: Optional[int] = None
        self.loss = math.inf
        self.tensors: Optional[dict[str, Any]] = None

    def offer(self, model: Any, step: int, loss: float) -> bool:
        """Keep the model's trainable tensors if ``loss`` is below every earlier one (a tie keeps the earlier)."""
        if not loss < self.loss:  # NaN too
            return False
        self.step, self.loss = step, loss
        self.tensors = {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters() if p.requires_grad}
        if self.folder is not None:
            self.on_main(lambda: self._write(step, loss))
        return True

    def _write(self, step: int, loss: float) -> None:
        from safetensors.torch import save_file

        from ..checkpoint import atomic_file

        assert self.folder is not None and self.tensors is not None
        with atomic_file(self.folder / f"best-{step}.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(tmp),
                      metadata={"step": str(step), "loss": repr(loss)})

    def prune(self, checkpoint_steps: list[int]) -> None:
        """Delete the files no resume can read: a resume from checkpoint c reads the newest file of a step <= c, so
        keep that one for each checkpoint still there (the Trainer keeps the newest two) and those after the newest
        checkpoint. On the first process (the caller's business)."""
        if self.folder is None:
            return
        files = _files(self.folder)
        needed = {max((s for s in files if s <= c), default=None) for c in checkpoint_steps}
        newest = max(checkpoint_steps, default=-1)
        for step, path in files.items():
            if step not in needed and step <= newest:
                path.unlink(missing_ok=True)

    def start(self, resumed_step: Optional[int]) -> None:
        """At the start of training: a fresh run forgets the files an earlier attempt left (it stopped before its first
        checkpoint); a run resumed at ``resumed_step`` takes the newest file up to it and forgets the later ones."""
        if self.folder is None:
            return
        files = _files(self.folder)
        keep = max((step for step in files if resumed_step is not None and step <= resumed_step), default=None)
        if self.main_process:
            for step, path in files.items():
                if keep is None or step > keep:
                    path.unlink(missing_ok=True)
        if keep is not None:
            from safetensors import safe_open
            from safetensors.torch import load_file

            with safe_open(str(files[keep]), framework="pt") as handle:
                metadata = handle.metadata()
            self.step, self.loss, self.tensors = keep, float(metadata["loss"]), load_file(str(files[keep]))

    def restore(self, model: Any) -> None:
        """Put the kept tensors back into the model's trainable parameters (same names, shapes and dtypes)."""
        import torch

        params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        tensors = self.tensors or {}
        differ = sorted(set(params) ^ set(tensors)) or [k for k, p in params.items() if p.shape != tensors[k].shape]
        if self.tensors is None or differ:
            raise RuntimeError(f"--keep-best: the kept tensors do not match the model's trainable parameters ({differ[:3]} "
                               "differ in name or shape)")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(self.tensors[name])
