"""`pdserve` end to end, as a user runs it: up (detached, with its embedded Redis and
local Ray), status, generate, chat, down; and a bad config failing before anything
starts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis
from cluster_harness import free_port, greedy

from cluster.redis_state import read_password
from engine import LLM

REPO = Path(__file__).resolve().parents[3]


def _pdserve(
    args: list[str], env: dict[str, str], timeout_s: float = 60, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", *args],
        cwd=REPO,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A cache dir of the test's own, so run state never mixes with a real cluster."""
    return dict(os.environ, PDSERVE_CACHE=str(tmp_path / "cache"))


def test_bad_config_fails_before_starting(env: dict[str, str], tmp_path: Path) -> None:
    result = _pdserve(
        ["up", "--set", "pools.decode.replicas=0", "--set", "server.http_port=9000"], env
    )
    assert result.returncode == 2
    assert "pools.decode.replicas" in result.stderr
    assert not (tmp_path / "cache" / "run").exists()
    result = _pdserve(["up", "--colocated", "--set", "router.max_prompt_tokens=5000"], env)
    assert result.returncode == 2 and "router.max_prompt_tokens" in result.stderr


@pytest.mark.slow
def test_resources_the_local_ray_lacks_fail_up_and_clean_up(
    env: dict[str, str], tmp_path: Path
) -> None:
    """A GPU pool on this CPU-only machine: Serve would wait forever for the replica;
    `up` refuses before deploying, names the pool, and leaves nothing running."""
    redis_port = free_port()
    result = _pdserve(
        [
            "up",
            "--set",
            "pools.decode.resources_per_rank={GPU: 1, CPU: 1}",
            "--set",
            f"redis.port={redis_port}",
        ],
        env,
        timeout_s=180,
    )
    assert result.returncode == 2, result.stderr
    assert "pools.decode.resources_per_rank: asks for GPU: 1 per rank" in result.stderr
    assert not _port_open(redis_port)  # the embedded Redis was stopped
    run_dirs = tmp_path / "cache" / "run"
    assert not run_dirs.exists() or not any(run_dirs.rglob("*.json"))


@pytest.mark.slow
def test_up_status_generate_chat_down(
    env: dict[str, str], tmp_path: Path, tiny_model_dir: Path, reference_llm: LLM
) -> None:
    name = f"cli-{uuid.uuid4().hex[:6]}"
    grpc_port, http_port = free_port(), free_port()
    config = tmp_path / "cluster.yaml"
    config.write_text(
        f"name: {name}\n"
        f"model: {{source: {tiny_model_dir}, max_model_len: 256}}\n"
        "pools:\n"
        "  - {name: main, role: colocated, engine: {kv_cache_bytes: 4MiB}}\n"
        f"server: {{grpc_port: {grpc_port}, http_port: {http_port}}}\n"
    )
    run_dir = tmp_path / "cache" / "run" / name
    up = _pdserve(["up", "-c", str(config), "--detach", "--timeout", "240"], env, timeout_s=300)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"ready: gRPC 127.0.0.1:{grpc_port}" in up.stdout
        state = json.loads((run_dir / "cluster.json").read_text())
        assert state["status"] == "ready" and state["embedded_redis"]
        redis_port = int(state["redis_url"].rsplit(":", 1)[1].split("/")[0])
        assert _port_open(redis_port) and _port_open(grpc_port) and _port_open(http_port)
        # the embedded Redis wants the password `up` generated into the run dir (0600)
        password = read_password(run_dir)
        assert password and (run_dir / "redis-password").stat().st_mode & 0o777 == 0o600
        anon = redis.Redis(host="127.0.0.1", port=redis_port, socket_timeout=5.0)
        with pytest.raises(redis.AuthenticationError):
            anon.ping()
        anon.close()
        assert redis.Redis(host="127.0.0.1", port=redis_port, password=password).ping()

        status = _pdserve(["status", "--name", name], env)
        assert status.returncode == 0, status.stderr
        assert f"cluster {name}: SERVING" in status.stdout
        assert "pool main (colocated) 1/1 replicas" in status.stdout

        want = reference_llm.generate(["Hello, world"], greedy(6))[0]
        gen = _pdserve(
            [
                "generate",
                "Hello, world",
                "--name",
                name,
                "--max-tokens",
                "6",
                "--temperature",
                "0",
                "--timings",
            ],
            env,
        )
        assert gen.returncode == 0, gen.stderr
        assert gen.stdout == want.text + "\n"
        assert "ttft" in gen.stderr and "colocated" in gen.stderr

        chat_args = ["--system", "Be brief.", "--name", name, "--max-tokens", "4"]
        chat_args += ["--temperature", "0"]
        chat = _pdserve(["chat", "Hi!", *chat_args], env)
        assert chat.returncode == 0, chat.stderr
        # no message: a conversation on stdin, whose first turn is the same greedy reply
        talk = _pdserve(["chat", *chat_args], env, stdin="Hi!\n\nAnd you?\n/exit\nnot sent\n")
        assert talk.returncode == 0, talk.stderr
        assert talk.stdout.startswith(chat.stdout) and talk.stdout != chat.stdout
        assert talk.stdout.endswith("\n") and "pdserve:" not in talk.stderr

        # the figures live, from the metrics export `up` recorded, refreshed twice
        assert state["metrics_urls"], state
        watched = _pdserve(["status", "--name", name, "--watch", "0.5", "--count", "2"], env)
        assert watched.returncode == 0, watched.stderr
        assert watched.stdout.count(f"cluster {name}: SERVING") == 2, watched.stdout
        assert "1 router replicas, 1 pool processes" in watched.stdout, watched.stdout
        assert "metrics (last " in watched.stdout and "  main " in watched.stdout
    finally:
        down = _pdserve(["down", "--name", name], env, timeout_s=180)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not (run_dir / "cluster.json").exists()
    assert not _port_open(grpc_port) and not _port_open(redis_port)
    again = _pdserve(["down", "--name", name], env)
    assert again.returncode == 1 and "no cluster" in again.stderr
