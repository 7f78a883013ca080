"""`pdserve status`, `generate` and `chat`: the commands that talk to a running cluster.

    pdserve status [--name N | --target HOST:PORT] [--json]
    pdserve generate "Once upon a time" [--max-tokens 64] [--temperature 0]
    pdserve chat ["Hi!"] [--system "Be brief."]     no message: a conversation on stdin

Each finds the cluster's gRPC address in its run state (by `--name`, default
"pdserve") unless `--target` is given, and its bearer token in `--token-file`,
$PDSERVE_GRPC_BEARER_TOKEN or `--token`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cluster.chat import ChatSession, converse
from cluster.client import Chunk, Client, ClientError, ClusterState, Sampling
from cluster.launcher import RunState, pid_alive, run_dir_for

DEFAULT_TARGET = "127.0.0.1:9000"


def _echo(msg: str) -> None:
    print(msg, flush=True)


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


def _print_status(state: ClusterState, healthy: bool) -> None:
    _echo(f"cluster {state.cluster}: {'SERVING' if healthy else 'NOT SERVING'}")
    for p in state.pools:
        live = f"{len(p.instances)}/{p.replicas}"
        _echo(f"  pool {p.name} ({p.role}) {live} replicas, tp={p.tp} pp={p.pp}")
        for i in p.instances:
            if i.load is None:
                _echo(f"    {i.instance_id}: no load report yet")
                continue
            ld = i.load
            _echo(
                f"    {i.instance_id}: {ld.running_seqs} running, "
                f"{ld.queued_prefill_tokens} queued prefill tokens, "
                f"{ld.free_kv_blocks}/{ld.total_kv_blocks} free KV blocks "
                f"({ld.age_ms:.0f} ms ago)"
            )


def cmd_status(args: argparse.Namespace) -> int:
    with Client(_target(args), token=_token(args)) as c:
        healthy = c.healthy()
        try:
            state = c.cluster_status()
        except ClientError as e:
            print(f"pdserve status: {e}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps({"healthy": healthy, **asdict(state)}, indent=2))
    else:
        _print_status(state, healthy)
    return 0 if healthy and state.ready else 1


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


def add_parsers(sub: Any) -> None:
    status = sub.add_parser("status", help="pools, instances and load")
    _add_client_args(status)
    status.add_argument("--json", action="store_true")
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
