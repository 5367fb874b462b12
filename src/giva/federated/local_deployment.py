"""``flwr run`` against a real SuperLink on this machine: one ``flower-superlink`` and N ``flower-supernode``
processes (``--insecure``, free local ports), the app in ``flower_app/`` submitted with ``flwr run``, its
results read back from the JSON the ServerApp writes, and every process stopped at the end.

The Flower configuration (the SuperLink connection ``flwr run`` uses) is written to a temporary
``FLWR_HOME``, so the user's ``~/.flwr`` is not touched. The same steps by hand are in docs/federated.md
("A real SuperLink") and in the comment atop ``flower_app/pyproject.toml``.

    python -m giva.federated.local_deployment OUTPUT_DIR [clients=N] [key=value ...]   # run-config overrides

writes ``OUTPUT_DIR/results.json`` (the ServerApp's results, the cleaned ``flwr run`` log, the wall time).
Before any process starts, the keys are checked against the app's declared config, the run config is built
as the ServerApp builds it, the data is read and checked as the ServerApp would, and then OUTPUT_DIR is created
(bad input, or an OUTPUT_DIR that cannot be made or written: one line, exit 2).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from .client_app import default_task
from .files import writable_folder
from .server_app import check_data
from .task import RUN_CONFIG_BATCH_OPTIONS, FederatedConfig

APP_DIR = Path(__file__).parent / "flower_app"
CONNECTION = "giva-local"
PROG = "python -m giva.federated.local_deployment"
USAGE = f"usage: {PROG} OUTPUT_DIR [clients=N] [key=value ...]"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _bin(name: str) -> str:
    local = Path(sys.executable).parent / name  # the console scripts of this environment
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found: install giva[federated] (Flower) in this environment")
    return found


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def run_local_deployment(
    run_config: dict[str, Any],
    clients: int,
    workdir: str,
    timeout: float = 600.0,
    app_dir: Path = APP_DIR,
) -> dict[str, Any]:
    """Start a SuperLink and ``clients`` SuperNodes, ``flwr run`` the app with ``run_config`` overrides, and
    return the ServerApp's results (plus the ``flwr run`` output). Raises ``TimeoutError`` after ``timeout``
    seconds; the processes are stopped in every case (SIGTERM, then SIGKILL)."""
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    results_path = work / "results.json"
    results_path.unlink(missing_ok=True)
    flwr_home = Path(tempfile.mkdtemp(prefix="flwr-home-", dir=work))
    link_port = free_port()
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "127.0.0.1:{link_port}"\n'
        "insecure = true\n"
    )
    # The SuperLink and SuperNodes start flower-superexec / flwr-serverapp / flwr-clientapp by name.
    path = os.pathsep.join([str(Path(_bin("flwr")).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path, "FLWR_HOME": str(flwr_home),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    processes: list[subprocess.Popen] = []

    def start(args: list[str], log: str) -> subprocess.Popen:
        handle = open(work / log, "w")
        proc = subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=work,
                                start_new_session=True)
        processes.append(proc)
        return proc

    config = {**run_config, "clients": clients, "results-path": str(results_path)}
    overrides = " ".join(f"{key}={_toml_value(value)}" for key, value in config.items())
    started = time.monotonic()
    try:
        start([_bin("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(link_port),
               "--database", str(work / "state.db"), "--disable-runtime-dependency-installation"], "superlink.log")
        for index in range(clients):
            start([_bin("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                   "--port", str(free_port()),
                   "--node-config", f"partition-id={index} num-partitions={clients}"], f"supernode-{index}.log")
        # --stream: flwr run prints the ServerApp's log and returns when the run ends.
        submit = start([_bin("flwr"), "run", str(app_dir), CONNECTION, "--run-config", overrides, "--stream"],
                       "flwr-run.log")
        while submit.poll() is None:
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"the run did not end within {timeout:.0f} s; logs in {work}")
            dead = [p.args[0] for p in processes[:-1] if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead} exited early; logs in {work}")
            time.sleep(0.5)
        output = (work / "flwr-run.log").read_text()
        if submit.returncode != 0 or not results_path.exists():
            raise RuntimeError(f"the run ended (flwr run exit code {submit.returncode}) without results: {output[-3000:]}")
        results = json.loads(results_path.read_text())
        results["flwr_run_output"] = clean_log(output)
        results["wall_seconds"] = time.monotonic() - started
        return results
    finally:
        stop(processes)
        shutil.rmtree(flwr_home, ignore_errors=True)


def clean_log(text: str) -> list[str]:
    """The lines of a Flower log without colour codes, progress bars, warnings and blank lines."""
    lines = []
    for line in re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines():
        line = line.rstrip()
        if line and not any(noise in line for noise in NOISE):
            lines.append(line)
    return lines


NOISE = ("Loading weights", "Warning", "warnings.warn", "LOAD REPORT", "MISSING", "| Status", "---+---",
         "newly initialized", "Notes:")


def descendants(pids: Sequence[int]) -> list[int]:
    """Every live descendant of ``pids`` (Linux ``/proc``; empty elsewhere). Flower's SuperExec starts its
    ServerApp / ClientApp processes in sessions of their own, so killing our process groups misses them."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = entry.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.parent.name))
    found, todo = [], list(pids)
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _is_flower(pid: int) -> bool:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"flwr" in command or b"flower-" in command


def _signal(pids: Sequence[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def stop(processes: Sequence[subprocess.Popen], grace: float = 10.0) -> None:
    """SIGTERM the processes we started and all their descendants, then SIGKILL what is left after ``grace`` s."""
    started = [proc.pid for proc in processes if proc.poll() is None]
    spawned = descendants(started)
    _signal(started + spawned, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in processes:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    left = [pid for pid in spawned + descendants(spawned) if _is_flower(pid)]  # never a reused pid of another program
    _signal(left + [proc.pid for proc in processes if proc.poll() is None], signal.SIGKILL)
    for proc in processes:
        proc.wait()


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``key=value`` strings as a dict; values read as int, float, true / false (in any case), else text."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"run-config overrides are key=value, got {item!r}")
        for cast in (int, float):
            try:
                out[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            out[key] = {"true": True, "false": False}.get(value.lower(), value)
    return out


def declared_config(app_dir: Path = APP_DIR) -> dict[str, Any]:
    """The app's ``[tool.flwr.app.config]``, flattened as Flower reads it: the only keys a run may override."""
    from flwr.common.config import flatten_dict, get_project_config

    return dict(flatten_dict(get_project_config(app_dir)["tool"]["flwr"]["app"].get("config", {})))


def check_run(overrides: dict[str, Any], clients: Any, app_dir: Path = APP_DIR) -> FederatedConfig:
    """The run's FederatedConfig, built as the ServerApp builds it (the declared config fused with the overrides),
    after the checks the ServerApp makes on its data; a ValueError unless the keys are declared (else the SuperLink
    refuses the run, "Invalid run configuration"), the values valid and the data large enough for the run."""
    declared = declared_config(app_dir)
    unknown = sorted(set(overrides) - set(declared))
    if unknown:
        raise ValueError(f"unknown run-config key(s) {unknown}; {app_dir / 'pyproject.toml'} declares {sorted(declared)}")
    cfg = FederatedConfig.from_flat({**declared, **overrides, "clients": clients})
    check_data(default_task(cfg), cfg, RUN_CONFIG_BATCH_OPTIONS)
    return cfg


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # so that run_local_deployment's cleanup runs


def main(argv: Optional[list[str]] = None) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(f"{USAGE}\n\n{__doc__.strip()}")
        return 0
    if not argv or "=" in argv[0] or argv[0].startswith("-"):  # OUTPUT_DIR left out (a key=value or an option first)
        got = repr(argv[0]) if argv else "nothing"
        print(f"{USAGE}\n{PROG}: error: the first argument is OUTPUT_DIR, got {got}", file=sys.stderr)
        return 2
    try:
        overrides = parse_overrides(argv[1:])
        clients = overrides.pop("clients", 2)
        clients = check_run(overrides, clients).clients
        output = Path(argv[0])
        writable_folder(output, "OUTPUT_DIR")  # last: a run refused for another reason leaves no folder behind
    except ValueError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="giva-superlink-") as work:  # the database, logs, Flower home
        try:
            results = run_local_deployment(overrides, clients, work)
        except Exception:
            kept = Path(tempfile.mkdtemp(prefix="giva-superlink-failed-"))
            shutil.copytree(work, kept, dirs_exist_ok=True)
            print(f"the run failed; its logs are in {kept}", file=sys.stderr)
            raise
    results["command"] = " ".join(["python -m giva.federated.local_deployment", *argv])
    output.mkdir(parents=True, exist_ok=True)  # made before the run; again in case it was removed during it
    (output / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({k: results[k] for k in ("setup_bytes", "rounds", "wall_seconds")}, indent=1))
    print("\n".join(results["flwr_run_output"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
