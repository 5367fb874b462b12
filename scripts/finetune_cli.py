"""One `giva finetune --no-progress --json` run in a fresh process, for the scripts that compare recipes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def giva_finetune(*flags: str) -> tuple[dict[str, Any], float]:
    """The JSON that `giva finetune --no-progress --json FLAGS` prints and the run's wall seconds. The adapter
    goes to a temporary folder that is removed afterwards; a failed run exits with its command and stderr."""
    giva = Path(sys.executable).parent / "giva"
    folder = tempfile.mkdtemp(prefix="giva-ft-")
    cmd = [str(giva), "finetune", "--no-progress", "--json", *flags, "--output-dir", str(Path(folder) / "out")]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout[proc.stdout.index("{"):]), time.perf_counter() - start
