"""Atomic writes of the federated run's outputs (results JSON, checkpoints), shared by the server and the runner."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import torch

from ..checkpoint import atomic_file


def write_json(data: Any, path: str) -> None:
    """Write ``data`` as indented JSON atomically (a temporary sibling, then a rename).

    NaN and infinities are refused (``ValueError``): JSON has no such numbers, and a file holding them is
    not JSON that other tools can read.
    """
    text = json.dumps(data, indent=2, allow_nan=False)
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_checkpoint(path: Optional[str], state: dict[str, Any]) -> None:
    """``torch.save`` to ``path`` atomically (a temporary sibling, then a rename); nothing if ``path`` is empty."""
    if path:
        with atomic_file(path) as tmp:
            torch.save(state, tmp)


RESULTS = "results.json"
CHECKPOINTS = ".checkpoints"


def writable_folder(folder: Path, label: str) -> Path:
    """``folder``, created (with its parents) and shown writable by writing and removing a probe file; a ValueError
    that names it as ``label`` (the option or argument it came from) otherwise."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{label} {str(folder)!r} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".giva-write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"{label} {str(folder)!r} is not writable: {err.strerror or err}") from None
    return folder


def check_output_dir(output_dir: str, methods: tuple[str, ...]) -> Path:
    """The run's output folder, created and checked writable before any work; a ValueError naming it otherwise.

    A folder whose ``results.json`` holds runs of other methods is refused (the new run would replace that
    file); the same methods' results are a rerun, which resumes from ``.checkpoints/`` where it stopped.
    """
    folder = writable_folder(Path(output_dir), "--output-dir")
    results = folder / RESULTS
    if results.exists():
        try:
            earlier = sorted(json.loads(results.read_text()).get("runs", {}))
        except (OSError, ValueError, AttributeError):
            raise ValueError(f"{results} exists and is not a results file of giva federated; move it away") from None
        others = [m for m in earlier if m not in methods]
        if others:
            raise ValueError(
                f"{results} holds results of method(s) {others}, which this run ({list(methods)}) would replace; "
                "use another --output-dir (or move that folder away)"
            )
    return folder
