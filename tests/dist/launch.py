"""Launch a tests/dist/ script under ``torchrun --standalone`` on CPU and read what its ranks wrote.

The one launcher of the distributed tests (tests/test_distributed_*.py): a bounded wall-clock
timeout, torchrun and every rank killed when it runs out, and on any failure a message with the
tail of each rank's stderr, so that a broken rank names itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import psutil  # an Accelerate dependency
import torch

DIST = Path(__file__).resolve().parent
TORCHRUN = Path(sys.executable).parent / "torchrun"
# A launch takes ~20-55 s on an idle 2-core machine; 4x that at load average 25. A machine that runs
# the tests niced beside other work can raise the bound (GIVA_TORCHRUN_TIMEOUT_S, seconds).
TIMEOUT_S = float(os.environ.get("GIVA_TORCHRUN_TIMEOUT_S", "240"))
LOG_DIR = "torchrun_logs"  # below the output folder: torchrun writes <run>/attempt_<n>/<local rank>/stderr.log there
TAIL_CHARS = 3000


class TorchrunFailed(AssertionError):
    """The launch exited non-zero or ran past its timeout; the message holds each rank's stderr tail."""


@dataclass(frozen=True)
class Ranks:
    """What one launch left behind: the output folder its ranks wrote to, and how many ranks there were."""

    out: Path
    nproc: int

    def json(self, name: str = "rank{rank}.json") -> list[dict]:
        """Each rank's JSON record, rank 0 first (``name`` is formatted with ``rank``)."""
        return [json.loads((self.out / name.format(rank=r)).read_text()) for r in range(self.nproc)]

    def tensors(self, name: str) -> list[Any]:
        """Each rank's ``torch.save``d object, rank 0 first (``name`` is formatted with ``rank``)."""
        return [torch.load(self.out / name.format(rank=r)) for r in range(self.nproc)]


def run_torchrun(
    script: str | Path, out: Path, *, nproc: int = 2, args: Sequence[str] = (), timeout_s: float = TIMEOUT_S,
) -> Ranks:
    """Run ``torchrun --standalone --nproc_per_node NPROC tests/dist/SCRIPT OUT ARGS...`` and wait for it.

    ``script`` is a file name in tests/dist/ or a path. Every rank runs with one OpenMP thread (two
    ranks on two cores, no oversubscription stalls) and tests/dist/ on its ``PYTHONPATH``.
    Raises :class:`TorchrunFailed` (an ``AssertionError``, so pytest reports it as a failure) when
    the launch exits non-zero or is still running after ``timeout_s`` seconds.
    """
    path = Path(script) if Path(script).is_absolute() else DIST / script
    out.mkdir(parents=True, exist_ok=True)
    env = {"PYTHONPATH": os.pathsep.join([str(DIST), os.environ.get("PYTHONPATH", "")])}
    # --standalone picks a free port, so parallel or leftover runs cannot collide; --redirects 3 keeps
    # each rank's stdout and stderr in its own file under the log folder; "--" keeps the script's flags from
    # torchrun's parser, which matches prefixes (`giva sft --r 8` is otherwise "ambiguous option: --r").
    cmd = [
        str(TORCHRUN), "--standalone", "--nproc_per_node", str(nproc), "--log-dir", str(out / LOG_DIR), "--redirects", "3",
        "--", str(path), str(out), *args,
    ]
    code, output = run_launcher(cmd, env=env, timeout_s=timeout_s,
                                what=lambda output: f"{path.name} did not finish in {timeout_s:.0f}s (torchrun and its "
                                                    f"ranks killed)\n{_report(out, output)}")
    if code != 0:
        raise TorchrunFailed(f"{path.name} failed (torchrun exit code {code})\n{_report(out, output)}")
    return Ranks(out, nproc)


def run_launcher(cmd: Sequence[str], *, env: dict[str, str], timeout_s: float = TIMEOUT_S,
                 what: Optional[Callable[[str], str]] = None) -> tuple[int, str]:
    """Run a launcher's command line (torchrun, ``accelerate launch``) in a session of its own, with one OpenMP thread
    per process and ``env`` over this process's environment; (its exit code, its stdout and stderr). Past ``timeout_s``
    it and every process below it are killed and :class:`TorchrunFailed` says so (``what(output)``, or the output's
    tail); an interrupt (Ctrl-C in pytest) kills them too, leaving nothing running."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **env}
    # Own session, so that killing its group cannot reach pytest itself.
    proc = subprocess.Popen(list(cmd), env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        output, _ = proc.communicate()
        message = what(output) if what else f"{cmd[0]} did not finish in {timeout_s:.0f}s (killed)\n{output[-TAIL_CHARS:]}"
        raise TorchrunFailed(message) from None
    finally:
        if proc.poll() is None:
            _kill_group(proc)
            proc.wait()
    return proc.returncode, output


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun's process group and every process below it.

    torchrun starts each rank in a session of its own, so killing torchrun's group alone would
    leave the ranks running: list the whole tree first, then kill it.
    """
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    with contextlib.suppress(ProcessLookupError):  # the group may have exited just now
        os.killpg(proc.pid, signal.SIGKILL)
    for child in descendants:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(descendants, timeout=10)


def _report(out: Path, torchrun_output: str) -> str:
    """torchrun's own output, then the tail of every rank's stderr (the newest attempt's)."""
    parts = [f"--- torchrun (last {TAIL_CHARS} chars) ---\n{torchrun_output[-TAIL_CHARS:]}"]
    logs = sorted((out / LOG_DIR).glob("*/attempt_*/*/stderr.log"), key=lambda p: (p.parent.parent.name, int(p.parent.name)))
    for log in logs:
        text = log.read_text(errors="replace")
        parts.append(f"--- local rank {log.parent.name} stderr (last {TAIL_CHARS} chars, {log}) ---\n{text[-TAIL_CHARS:]}")
    if not logs:
        parts.append(f"(no rank logs under {out / LOG_DIR}: the ranks did not start)")
    return "\n".join(parts)
