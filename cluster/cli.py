"""`pdserve`: bring a cluster up and down, look at it, and talk to it.

    pdserve up [-c cluster.yaml] [--set key.path=value ...] [--detach]
    pdserve status [--name N | --target HOST:PORT] [--json]
    pdserve down [--name N]
    pdserve generate "Once upon a time" [--max-tokens 64] [--temperature 0]
    pdserve chat ["Hi!"] [--system "Be brief."]     no message: a conversation on stdin
    pdserve config [-c cluster.yaml] [--set ...]      print the validated config
    pdserve render k8s -c cluster.yaml --out DIR      KubeRay manifests (cluster/k8s)
    pdserve profile -c cluster.yaml [--out FILE]      measure the engine (cluster/plan_cli)
    pdserve plan --profile FILE --ttft-slo S ...      pick a layout (cluster/plan_cli)

`up` starts local Ray (or joins `--address`), an embedded Redis unless a URL is
configured, deploys, and waits until every pool is registered and the health service
says SERVING, showing progress. It then stays in the foreground serving until Ctrl-C
or `pdserve down`, and cleans up on the way out; `--detach` runs the same in the
background and returns once it is ready (its log goes to the run dir).

The commands that talk to a running cluster (status, generate, chat) live in
cluster/client_cli.py; they find its gRPC address in its run state (by `--name`,
default "pdserve") unless `--target` is given.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from cluster.client_cli import add_parsers as add_client_parsers
from cluster.config import ClusterConfig, ConfigError
from cluster.config_file import load_config
from cluster.launcher import Launcher, LaunchError, RunState, run_dir_for, stop_running
from cluster.plan_cli import add_parsers as add_plan_parsers
from kv_transfer.transport import TransportKind

REDIS_URL_ENV = "PDSERVE_REDIS_URL"


def _echo(msg: str) -> None:
    print(msg, flush=True)


def _overrides(args: argparse.Namespace) -> list[str]:
    out = list(args.set or [])
    shortcuts = {
        "name": "name",
        "model": "model.source",
        "host": "server.host",
        "grpc_port": "server.grpc_port",
        "http_port": "server.http_port",
        "redis_url": "redis.url",
        "address": "ray.address",
        "prefill_replicas": "pools.prefill.replicas",
        "decode_replicas": "pools.decode.replicas",
        "transport": "kv_transfer.transport",
    }
    for attr, key in shortcuts.items():
        value = getattr(args, attr, None)
        if value is not None:
            out.append(f"{key}={value}")
    if getattr(args, "colocated", False):
        out.insert(0, "pools=[{name: main, role: colocated}]")
    if getattr(args, "redis_url", "") is None and os.environ.get(REDIS_URL_ENV):
        # a URL with credentials, kept out of argv
        out.insert(0, f"redis.url={os.environ[REDIS_URL_ENV]}")
    return out


def _config(args: argparse.Namespace) -> ClusterConfig:
    return load_config(args.config, _overrides(args))


# -- up / down / status ----------------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    config = _config(args)
    run_dir = run_dir_for(config.name)
    if args.detach:
        return _up_detached(config, run_dir, args.timeout, args.raw_argv)
    launcher = Launcher(config, run_dir=run_dir, echo=_echo)
    try:
        state = launcher.start(timeout_s=args.timeout, log_file=os.environ.get("PDSERVE_UP_LOG"))
    except LaunchError as e:
        print(f"pdserve up: {e}", file=sys.stderr)
        return 1
    _echo(f"ready: gRPC {state.grpc_target}, HTTP {state.http_url} (cluster {config.name})")
    _echo(f'try:  pdserve generate "Hello"   or   curl {state.http_url}/v1/models')
    _echo("Ctrl-C or `pdserve down` stops it.")
    try:
        launcher.serve_until_signal()
    finally:
        launcher.stop()
        _echo("stopped")
    return 0


def _up_detached(
    config: ClusterConfig, run_dir: Path, timeout_s: float, raw_argv: list[str]
) -> int:
    argv = [a for a in raw_argv if a != "--detach"]
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "up.log"
    env = dict(os.environ, PDSERVE_UP_LOG=str(log_path))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cluster.cli", *argv],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    _echo(f"starting in the background (pid {proc.pid}, log {log_path})")
    deadline = time.monotonic() + timeout_s + 30
    while time.monotonic() < deadline:
        state = RunState.read(run_dir)
        if state is not None and state.pid == proc.pid and state.status == "ready":
            _echo(f"ready: gRPC {state.grpc_target}, HTTP {state.http_url} (cluster {config.name})")
            return 0
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace").splitlines()[-20:]
            print("pdserve up failed:\n" + "\n".join(tail), file=sys.stderr)
            return 1
        time.sleep(0.5)
    print(f"pdserve up: not ready in time; see {log_path}", file=sys.stderr)
    return 1


def cmd_down(args: argparse.Namespace) -> int:
    if stop_running(args.name, echo=_echo):
        _echo(f"cluster {args.name!r} is down")
        return 0
    print(f"pdserve down: no cluster named {args.name!r} is running", file=sys.stderr)
    return 1


def cmd_config(args: argparse.Namespace) -> int:
    config = _config(args)
    print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), end="")
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from cluster.k8s.render import render, write

    source = Path(args.config).name if args.config else "the default config"
    paths = write(render(_config(args), source=source), Path(args.out))
    for path in paths:
        _echo(str(path))
    return 0


# -- parser ----------------------------------------------------------------------------------


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="cluster config YAML")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--name", help="cluster name")
    p.add_argument("--model", help="model name, HF directory or .gguf")
    p.add_argument("--host", help="HTTP bind address")
    p.add_argument("--grpc-port", type=int)
    p.add_argument("--http-port", type=int)
    p.add_argument(
        "--redis-url",
        help=f"use this Redis instead of an embedded one (with credentials: ${REDIS_URL_ENV})",
    )
    p.add_argument("--address", help="join this Ray cluster instead of starting one")
    p.add_argument("--prefill-replicas", type=int)
    p.add_argument("--decode-replicas", type=int)
    p.add_argument(
        "--transport", choices=[t.value for t in TransportKind], help="KV transfer transport"
    )
    p.add_argument("--colocated", action="store_true", help="one colocated pool, no prefill pool")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pdserve", description="Prefill/decode disaggregated LLM serving."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start a cluster and serve until stopped")
    _add_config_args(up)
    up.add_argument("--detach", action="store_true", help="run in the background once ready")
    up.add_argument("--timeout", type=float, default=600.0, help="seconds to become ready")
    up.set_defaults(func=cmd_up)

    down = sub.add_parser("down", help="stop a cluster started by `up`")
    down.add_argument("--name", default="pdserve")
    down.set_defaults(func=cmd_down)

    add_client_parsers(sub)

    cfg = sub.add_parser("config", help="print the validated cluster config")
    _add_config_args(cfg)
    cfg.set_defaults(func=cmd_config)

    render = sub.add_parser("render", help="render the cluster for a deployment target")
    render.add_argument("target", choices=["k8s"], help="k8s: KubeRay manifests")
    _add_config_args(render)
    render.add_argument("-o", "--out", required=True, help="output directory")
    render.set_defaults(func=cmd_render)
    add_plan_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(raw)
    args.raw_argv = raw
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        code: int = args.func(args)
    except ConfigError as e:
        print(f"pdserve: {e}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
