"""`pdserve`: bring a cluster up and down, look at it, and talk to it.

    pdserve up [-c cluster.yaml] [--set key.path=value ...] [--detach]
    pdserve status [--name N | --target HOST:PORT] [--json] [--watch S]  (cluster/status_cli)
    pdserve down [--name N]
    pdserve generate "Once upon a time" [--max-tokens 64] [--temperature 0]
    pdserve chat ["Hi!"] [--system "Be brief."]     no message: a conversation on stdin
    pdserve config [-c cluster.yaml] [--set ...]      print the validated config
    pdserve render k8s -c cluster.yaml --out DIR      KubeRay manifests (cluster/k8s)
    pdserve profile -c cluster.yaml [--out FILE]      measure the engine (cluster/plan_cli)
    pdserve plan --profile FILE --ttft-slo S ...      pick a layout (cluster/plan_cli)
    pdserve trace REQUEST_ID [--name N]               a request's spans (cluster/trace_cli)

`up` starts local Ray (or joins `--address`), an embedded Redis unless a URL is
configured, deploys, and waits until every pool is registered and the health service
says SERVING, showing progress. It then stays in the foreground serving until Ctrl-C
or `pdserve down`, and cleans up on the way out; `--detach` runs the same in the
background and returns once it is ready (its log goes to the run dir).

The other commands find the cluster's gRPC address in its run state (by `--name`,
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

from cluster import status_cli
from cluster.chat import ChatSession, converse
from cluster.client import Chunk, Client, ClientError, Sampling
from cluster.config import ClusterConfig, ConfigError
from cluster.config_file import load_config
from cluster.launcher import Launcher, LaunchError
from cluster.plan_cli import add_parsers as add_plan_parsers
from cluster.run_state import RunState, pid_alive, run_dir_for, stop_running
from cluster.trace_cli import REDIS_URL_ENV
from cluster.trace_cli import add_parsers as add_trace_parsers
from kv_transfer.transport import TransportKind

DEFAULT_TARGET = "127.0.0.1:9000"


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


def _target(args: argparse.Namespace) -> str:
    if args.target:
        return str(args.target)
    state = RunState.read(run_dir_for(args.name))
    if state is not None and pid_alive(state.pid):
        return state.grpc_target
    return DEFAULT_TARGET


TOKEN_ENV = "PDSERVE_GRPC_BEARER_TOKEN"


def _token(args: argparse.Namespace) -> str | None:
    """The gRPC bearer token: --token-file, else $PDSERVE_GRPC_BEARER_TOKEN, else
    --token (which every local user can read in the process list, hence the warning)."""
    if args.token_file:
        return Path(args.token_file).read_text().strip()
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV]
    if args.token:
        print(
            f"warning: --token is visible in the process list; use --token-file or ${TOKEN_ENV}",
            file=sys.stderr,
        )
        return str(args.token)
    return None


def cmd_status(args: argparse.Namespace) -> int:
    return status_cli.cmd_status(args, _target(args), _token(args))


# -- generate / chat ---------------------------------------------------------------------


def _sampling(args: argparse.Namespace) -> Sampling:
    return Sampling(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_tokens=args.max_tokens,
        stop=tuple(args.stop or ()),
        seed=args.seed,
    )


def _describe(chunk: Chunk) -> str:
    t, u = chunk.timings, chunk.usage
    if t is None or u is None:
        return f"[{chunk.finish_reason}]"
    path = "disaggregated" if t.disaggregated else "colocated"
    if t.migrations:
        path += f", migrated {t.migrations}x"
    return (
        f"[{chunk.finish_reason}; {u.prompt_tokens} prompt + {u.completion_tokens} tokens; "
        f"ttft {t.ttft_ms:.1f} ms (queue {t.queue_ms:.1f}, prefill {t.prefill_ms:.1f}, "
        f"kv {t.kv_transfer_ms:.1f}); tpot {t.mean_tpot_ms:.1f} ms; {path}]"
    )


def _stream(args: argparse.Namespace, prompt: str) -> int:
    with Client(_target(args), token=_token(args)) as c:
        try:
            for chunk in c.stream(prompt, _sampling(args)):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                if chunk.finish_reason is not None:
                    sys.stdout.write("\n")
                    _timings(args, chunk)
        except ClientError as e:
            print(f"\npdserve: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
    return 0


def _timings(args: argparse.Namespace, chunk: Chunk) -> None:
    if args.timings:
        print(_describe(chunk), file=sys.stderr)


def cmd_generate(args: argparse.Namespace) -> int:
    return _stream(args, args.prompt)


def cmd_chat(args: argparse.Namespace) -> int:
    """One reply to `message`, or with none a conversation: a line from stdin per turn,
    until end of input or /exit."""
    sampling = _sampling(args)
    with Client(_target(args), token=_token(args)) as c:
        session = ChatSession(
            lambda messages: c.stream(None, sampling, messages=messages),
            sys.stdout,
            args.system,
            on_finish=lambda chunk: _timings(args, chunk),
        )
        try:
            if args.message is not None:
                session.turn(args.message)
                return 0
            if sys.stdin.isatty():
                print("chat: a line per message; /reset starts over, /exit or Ctrl-D ends")
            return converse(
                session, sys.stdin, sys.stderr, sys.stdout if sys.stdin.isatty() else None
            )
        except ClientError as e:
            print(f"\npdserve: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130


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


def _add_client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", default="pdserve", help="cluster name (to find its address)")
    p.add_argument("--target", help="gRPC address HOST:PORT")
    p.add_argument("--token", help=f"gRPC bearer token (others can see it; prefer ${TOKEN_ENV})")
    p.add_argument("--token-file", help="file holding the gRPC bearer token")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="a stop string (repeatable)")
    p.add_argument("--timings", action="store_true", help="print usage and timings to stderr")


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

    status = sub.add_parser("status", help="pools, instances, load and live figures")
    _add_client_args(status)
    status_cli.add_status_args(status)
    status.set_defaults(func=cmd_status)

    gen = sub.add_parser("generate", help="stream a completion of a prompt")
    gen.add_argument("prompt")
    _add_client_args(gen)
    _add_sampling_args(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="stream a chat reply, or chat on stdin")
    chat.add_argument("message", nargs="?", help="one message; without it, read a line per turn")
    chat.add_argument("--system", help="a system message first")
    _add_client_args(chat)
    _add_sampling_args(chat)
    chat.set_defaults(func=cmd_chat)

    cfg = sub.add_parser("config", help="print the validated cluster config")
    _add_config_args(cfg)
    cfg.set_defaults(func=cmd_config)

    render = sub.add_parser("render", help="render the cluster for a deployment target")
    render.add_argument("target", choices=["k8s"], help="k8s: KubeRay manifests")
    _add_config_args(render)
    render.add_argument("-o", "--out", required=True, help="output directory")
    render.set_defaults(func=cmd_render)
    add_plan_parsers(sub)
    add_trace_parsers(sub)
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
