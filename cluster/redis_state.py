"""A running embedded `redis-server` as any process of the same user sees it.

`RedisServer.write_state` (cluster/redis_server.py) records the server's pid, port and
url in `STATE_FILE` and its password in `PASSWORD_FILE`, both mode 0600, in a run dir.
From those another process reaches the server (`read_password`, `read_state`) and
stops it (`stop_from_state`, what `pdserve down` calls): SHUTDOWN when the server at
the url reports the recorded pid, then SIGTERM and SIGKILL, but only while that pid is
still a redis-server.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

logger = logging.getLogger(__name__)

STATE_FILE = "redis-server.json"
PASSWORD_FILE = "redis-password"


class RedisServerError(RuntimeError):
    """The server could not be found, started, or stopped."""


@dataclass(frozen=True)
class RedisServerState:
    """What another process needs to reach and stop a running server."""

    pid: int
    port: int
    url: str
    workdir: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RedisServerState:
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError("redis state file must hold a JSON object")
        return cls(
            pid=int(raw["pid"]),
            port=int(raw["port"]),
            url=str(raw["url"]),
            workdir=str(raw["workdir"]),
        )


def one_shot_client(url: str, timeout_s: float) -> redis.Redis:
    """A client that never retries: the callers here run their own bounded loops."""
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
    )


def serving_pid(url: str, timeout_s: float) -> int | None:
    """The pid of the redis-server answering at `url`, or None if none answers (or it
    rejects our credentials). Tells our server apart from another one on the port."""
    client = one_shot_client(url, timeout_s)
    try:
        return int(client.info("server")["process_id"])
    except (redis.RedisError, KeyError, ValueError):
        return None
    finally:
        client.close()


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` atomically, readable by this user only (0600 from the
    first byte: the file is created with that mode, never widened later)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    tmp.replace(path)


def read_password(run_dir: Path) -> str | None:
    """The embedded server's password recorded in `run_dir`, or None if there is none.
    Refuses a file that other users could read."""
    path = run_dir / PASSWORD_FILE
    try:
        mode = path.stat().st_mode & 0o777
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    if mode & 0o077:
        raise RedisServerError(f"{path} is readable by others (mode {mode:o}); expected 0600")
    return text or None


# -- stopping a server started by another process ------------------------------------


def read_state(run_dir: Path) -> RedisServerState | None:
    path = run_dir / STATE_FILE
    try:
        return RedisServerState.from_json(path.read_text())
    except FileNotFoundError:
        return None


def _is_redis_process(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state != "Z" and b"redis-server" in cmdline


def _reap_if_child(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        _reap_if_child(pid)
        if not _is_redis_process(pid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def stop_from_state(run_dir: Path, timeout_s: float = 5.0) -> bool:
    """Stop the server recorded in `run_dir`, from any process. Returns False when there
    was no state file. If the server at the recorded url reports the recorded pid, it is
    asked to SHUTDOWN; then SIGTERM and SIGKILL follow on the recorded pid, but only
    while that pid is still a redis-server."""
    state = read_state(run_dir)
    if state is None:
        return False
    if serving_pid(state.url, timeout_s=1.0) == state.pid:
        client = one_shot_client(state.url, timeout_s=1.0)
        try:
            client.shutdown(nosave=True)
        except (redis.ConnectionError, redis.TimeoutError):
            pass  # shutdown closes the connection
        except redis.ResponseError as exc:
            logger.warning("redis SHUTDOWN refused (%s); signalling pid %d", exc, state.pid)
        finally:
            client.close()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if _wait_gone(state.pid, timeout_s):
            break
        logger.warning("redis-server pid %d still running; sending %s", state.pid, sig.name)
        with contextlib.suppress(ProcessLookupError):
            os.kill(state.pid, sig)
    else:
        if not _wait_gone(state.pid, timeout_s):
            raise RedisServerError(f"redis-server pid {state.pid} did not exit")
    (run_dir / STATE_FILE).unlink(missing_ok=True)
    (run_dir / PASSWORD_FILE).unlink(missing_ok=True)
    if Path(state.workdir).name.startswith("pdserve-redis-"):
        shutil.rmtree(state.workdir, ignore_errors=True)
    logger.info("redis-server pid %d on port %d stopped", state.pid, state.port)
    return True
