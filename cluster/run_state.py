"""A running cluster's record on this machine, for the commands that find it later.

`pdserve up` writes a `RunState` (mode 0600) into the cluster's run dir
(`run_dir_for(name)`): its pid, status, addresses and log file. `status`, `trace`,
`generate` and `chat` read it to find the cluster; `down` (`stop_running`) signals
the recorded pid and stops an embedded Redis it left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cluster.redis_state import stop_from_state
from engine.model_source import cache_root

STATE_FILE = "cluster.json"
Echo = Callable[[str], None]


@dataclass(frozen=True)
class RunState:
    cluster: str
    pid: int
    status: str  # starting | ready
    grpc_target: str
    http_url: str
    redis_url: str
    embedded_redis: bool
    ray_address: str | None
    log_file: str | None = None
    metrics_urls: list[str] = field(default_factory=list)  # every node's metrics export

    def write(self, run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / (STATE_FILE + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(asdict(self), fh)
        tmp.replace(run_dir / STATE_FILE)

    @classmethod
    def read(cls, run_dir: Path) -> RunState | None:
        try:
            return cls(**json.loads((run_dir / STATE_FILE).read_text()))
        except (FileNotFoundError, ValueError, TypeError):
            return None


def run_dir_for(name: str, root: Path | None = None) -> Path:
    return (root or cache_root() / "run") / name


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (our own exited child) is not alive
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def stop_running(
    name: str, *, run_dir: Path | None = None, timeout_s: float = 120.0, echo: Echo = print
) -> bool:
    """`pdserve down`: stop the cluster recorded under `name`. False if none was."""
    directory = run_dir or run_dir_for(name)
    state = RunState.read(directory)
    if state is None:
        return stop_from_state(directory)  # an embedded Redis left by a killed `up`
    if pid_alive(state.pid):
        echo(f"stopping cluster {name!r} (pid {state.pid})")
        os.kill(state.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while pid_alive(state.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if pid_alive(state.pid):
            echo(f"pid {state.pid} did not exit in {timeout_s:.0f}s; killing it")
            with contextlib.suppress(ProcessLookupError):
                os.kill(state.pid, signal.SIGKILL)
    if stop_from_state(directory):
        echo("stopped the embedded redis-server it left behind")
    (directory / STATE_FILE).unlink(missing_ok=True)
    return True
