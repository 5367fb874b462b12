"""The software a benchmark record was measured with (every suite writes this into its results)."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from pathlib import Path

import torch


def versions() -> dict[str, str]:
    """Python, torch, transformers, PEFT and giva versions (with the source's git commit), the platform and torch's
    CPU thread count."""
    import peft
    import transformers

    from .. import __version__

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "giva": __version__,
        "giva_commit": source_commit(),
        "platform": platform.platform(),
        "cpu_threads": str(torch.get_num_threads()),
    }


@functools.lru_cache(maxsize=1)
def source_commit() -> str:
    """The git commit giva's source was at when this process first asked (close to when it imported the code it
    runs), ``-dirty`` when ``src/giva`` had uncommitted changes. When this file is not tracked by a git checkout (an
    installed giva, even inside another project's repository): the environment's ``GIVA_COMMIT`` (set by
    ``benchmarks/gpu/run_on_device.sh`` on the device machine, whose copy of the tree has no git history), else
    ``"unknown"``. A record made by changed code can then be told from the others (the package version does not
    change between commits)."""
    source = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=source, capture_output=True, text=True, timeout=10, check=True).stdout

    try:
        git("ls-files", "--error-unmatch", str(Path(__file__).resolve()))  # giva's own checkout, not a project it is installed in
        commit = git("rev-parse", "HEAD").strip()
        dirty = git("status", "--porcelain", "--", str(source)).strip()
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("GIVA_COMMIT") or "unknown"
    return f"{commit}-dirty" if dirty else commit
