"""The software a benchmark record was measured with (every suite writes this into its results)."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Optional

import torch


def versions() -> dict[str, str]:
    """Python, torch, transformers, PEFT, bitsandbytes (when installed) and giva versions (with the source's git
    commit), the platform, the CPU (its model name and the instruction set torch's kernels dispatch to: the same
    code on another CPU may round differently) and torch's CPU thread count."""
    import peft
    import transformers

    from .. import __version__

    found = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "giva": __version__,
        "giva_commit": source_commit(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_threads": str(torch.get_num_threads()),
    }
    try:  # read from its metadata: importing bitsandbytes prints a line and takes seconds
        found["bitsandbytes"] = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        pass
    return found


@functools.lru_cache(maxsize=1)
def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name with its family/model/stepping numbers (a cloud VM's name is often only "Intel(R) Xeon(R)
    Processor"), from ``cpuinfo``; ``platform.processor()`` where there is none."""
    try:
        lines = cpuinfo.read_text(encoding="utf-8", errors="replace").split("\n\n")[0].splitlines()
    except OSError:
        return platform.processor() or "unknown"
    fields = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in lines)}
    if "model name" not in fields and "CPU part" in fields:  # aarch64 (Grace, Graviton): no name, the ARM part ids
        arm = [f"{key.replace('CPU ', '')} {fields[key]}" for key in ("CPU implementer", "CPU part", "CPU variant",
                                                                       "CPU revision") if key in fields]
        return f"{platform.machine() or 'ARM'} CPU ({', '.join(arm)})"
    name = fields.get("model name") or platform.processor() or "unknown"
    numbers = [f"{key.replace('cpu ', '')} {fields[key]}" for key in ("cpu family", "model", "stepping") if key in fields]
    return f"{name} ({', '.join(numbers)})" if numbers else name


def _git(*args: str) -> str:
    """``git args`` in giva's source folder (raises OSError / SubprocessError when there is no git or no checkout)."""
    source = Path(__file__).resolve().parents[1]
    return subprocess.run(["git", *args], cwd=source, capture_output=True, text=True, timeout=10, check=True).stdout


def _tracked() -> None:
    """Raise unless a git checkout tracks giva's own source (an installed giva inside another project's repository
    must not report that project's commits)."""
    _git("ls-files", "--error-unmatch", str(Path(__file__).resolve()))


@functools.lru_cache(maxsize=1)
def source_commit() -> str:
    """The git commit giva's source was at when this process first asked (close to when it imported the code it
    runs), ``-dirty`` when ``src/giva`` had uncommitted changes. When this file is not tracked by a git checkout (an
    installed giva, even inside another project's repository): the environment's ``GIVA_COMMIT`` (set by
    ``benchmarks/gpu/run_on_device.sh`` on the device machine, whose copy of the tree has no git history), else
    ``"unknown"``. A record made by changed code can then be told from the others (the package version does not
    change between commits)."""
    source = Path(__file__).resolve().parents[1]
    try:
        _tracked()
        commit = _git("rev-parse", "HEAD").strip()
        dirty = _git("status", "--porcelain", "--", str(source)).strip()
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("GIVA_COMMIT") or "unknown"
    return f"{commit}-dirty" if dirty else commit


@functools.lru_cache(maxsize=1)
def code_commit() -> str:
    """The code a benchmark record measures: the last commit that changed giva's source (``src/giva``), then
    ``-dirty-`` and 12 hex digits of a digest of the uncommitted changes there (tracked diffs and untracked files),
    if any. Unlike :func:`source_commit` (HEAD), committing result files or docs leaves it unchanged, so a suite
    that resumes can keep the records the code it would run now made and measure again those older code made.
    Outside a checkout: ``GIVA_COMMIT``, else ``"unknown"`` (as :func:`source_commit`)."""
    source = str(Path(__file__).resolve().parents[1])
    try:
        _tracked()
        commit = _git("log", "-1", "--format=%H", "--", source).strip()
        status = _git("status", "--porcelain", "--untracked-files=all", "--", source)
        if not status.strip():
            return commit
        digest = hashlib.sha256(_git("diff", "HEAD", "--", source).encode())
        root = Path(_git("rev-parse", "--show-toplevel").strip())
        for line in sorted(status.splitlines()):
            if line.startswith("??"):
                path = root / line[3:]
                digest.update(line.encode() + (path.read_bytes() if path.is_file() else b""))
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("GIVA_COMMIT") or "unknown"
    return f"{commit}-dirty-{digest.hexdigest()[:12]}"


def same_code(recorded: Optional[str], current: str) -> bool:
    """Whether a record made at code commit ``recorded`` (None: not recorded) measured the code at ``current``
    (both from :func:`code_commit`; a clean commit also matches its own abbreviation). ``"unknown"`` matches
    nothing: the code it ran cannot be told."""
    if not recorded or "unknown" in (recorded, current):
        return False
    if recorded == current:
        return True
    clean = "-" not in recorded and "-" not in current
    return clean and min(len(recorded), len(current)) >= 7 and (recorded.startswith(current) or current.startswith(recorded))


def stale_note(recorded: Optional[str], current: str) -> str:
    """What a dry run's line appends for a record measured by other code than ``current`` (the suite's
    ``code_commit()``): ' (recorded at commit X, the code is now Y: stale)'."""
    return f" (recorded at commit {short_commit(recorded)}, the code is now {short_commit(current)}: stale)"


def short_commit(commit: Optional[str]) -> str:
    """A commit as a table prints it: 7 hex digits, ``-dirty`` when it had uncommitted changes (``-dirty-<digest>``
    here, ``+dirty`` in the scale suite's older records), or ``unknown``."""
    if not commit or commit == "unknown":
        return "unknown"
    return commit[:7] + ("-dirty" if "dirty" in commit else "")
