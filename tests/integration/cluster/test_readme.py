"""README's commands, run as written: the offline engine snippet (and the output it
claims), and the commands it shows against a running cluster (`pdserve generate`,
`chat` with and without a message, curl, `status`, `down`).

The cluster is the one `pdserve up` starts, under the default name, with its run state
in a cache dir of the test's own (so `generate` and the rest find it as a user's would);
it serves the tiny model on free ports, and curl's URL gets that port.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from cluster_harness import free_port

REPO = Path(__file__).resolve().parents[3]
README = (REPO / "README.md").read_text()

pytestmark = pytest.mark.slow


def fenced(language: str, text: str = README) -> list[str]:
    """The bodies of the ```language blocks, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```$", text, flags=re.M | re.S)


def commands(block: str) -> list[str]:
    """One shell command per line, with backslash continuations joined."""
    return [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]


def test_the_readme_parses_into_the_commands_it_shows() -> None:
    usage = [b for b in fenced("sh") if "pdserve generate" in b]
    assert len(usage) == 1
    cmds = commands(usage[0])
    assert cmds[0].startswith(".venv/bin/pdserve generate")
    assert ".venv/bin/pdserve chat" in cmds and cmds[-1] == ".venv/bin/pdserve down"
    assert any(c.startswith("curl ") and "max_tokens" in c for c in cmds)


def test_the_offline_snippet_prints_what_it_says(smollm2_dir: Path) -> None:
    (snippet,) = [b for b in fenced("python") if "from engine import LLM" in b]
    claimed = re.search(r"print\(.*\)\s*# (.+)$", snippet, flags=re.M)
    assert claimed is not None
    run = subprocess.run(
        [sys.executable, "-c", snippet],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == claimed.group(1).strip()


def _run(
    cmd: str, env: dict[str, str], http_port: int, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    """`cmd` as README writes it: the virtualenv's `pdserve` is this interpreter's
    `-m cluster.cli`, and curl goes to the test cluster's HTTP port."""
    argv = shlex.split(cmd.replace("127.0.0.1:8000", f"127.0.0.1:{http_port}"))
    if argv[0] == ".venv/bin/pdserve":
        argv = [sys.executable, "-m", "cluster.cli", *argv[1:]]
    return subprocess.run(
        argv, cwd=REPO, env=env, input=stdin, capture_output=True, text=True, timeout=180
    )


def test_the_commands_against_a_cluster_run_as_written(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    env = dict(os.environ, PDSERVE_CACHE=str(tmp_path / "cache"))
    grpc_port, http_port = free_port(), free_port()
    up = [sys.executable, "-m", "cluster.cli", "up", "--detach", "--colocated"]
    up += ["--model", str(tiny_model_dir), "--grpc-port", str(grpc_port)]
    up += ["--http-port", str(http_port), "--timeout", "240"]
    up += ["--set", "pools.main.engine.kv_cache_bytes=4MiB"]
    started = subprocess.run(up, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    (usage,) = [b for b in fenced("sh") if "pdserve generate" in b]
    cmds = commands(usage)
    down = cmds.pop()
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        for cmd in cmds:
            # `chat` without a message reads the conversation from stdin
            out = _run(cmd, env, http_port, stdin="Hi!\nAnd you?\n")
            assert out.returncode == 0, f"{cmd}\n{out.stdout}\n{out.stderr}"
            if cmd.startswith((".venv/bin/pdserve generate", ".venv/bin/pdserve chat")):
                assert out.stdout.endswith("\n") and "pdserve:" not in out.stderr, cmd
            if cmd.startswith("curl"):
                assert '"choices"' in out.stdout, out.stdout
            if cmd.endswith("pdserve status"):
                assert "SERVING" in out.stdout, out.stdout
    finally:
        stopped = _run(down, env, http_port)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
