"""Load test for a running pdserve cluster, over gRPC (the Python client) and HTTP (the
OpenAI API), both streaming.

    pdserve up --detach
    locust -f tests/load/locustfile.py --headless -u 8 -r 2 -t 60s \
        --host http://127.0.0.1:8000 --grpc-target 127.0.0.1:9000 \
        --mix prompt-heavy --csv results/load --html results/load.html

(`make load` runs this with a results folder.) `--host` is the HTTP API's base URL;
`--grpc-target` the gRPC endpoint. `GrpcUser` and `OpenAIUser` run in equal numbers
unless locust's `--class-picker` / user-class arguments choose.

Each request is reported to locust as three request types, so the UI, the CSV and the
HTML report show each one on its own row (response times in milliseconds):

    grpc / http  TTFT  sending to the first token
    grpc / http  TPOT  mean time per output token after the first ((E2E - TTFT) / (n - 1))
    grpc / http  E2E   sending to the last token; failures are reported here

`response_length` of E2E is the number of generated tokens. A failed request reports
only E2E, with the error. Quantities are computed as in the goodput benchmark
(`benchmarks.slo.StreamRecord`).

Lengths: `--mix` (prompt-heavy, sharegpt, short; see `benchmarks.workload`) and
`--prompt-len` / `--output-len` specs (`fixed:N`, `uniform:LO:HI`,
`lognormal:MEDIAN:SIGMA[:LO:HI]`). Prompts are random token ids, generated here, so
each is unique and exactly as long as sampled; outputs are exactly `output_len` tokens
(`ignore_eos`). `--max-model-len` cuts prompts so that prompt + output fit the
cluster's context.

Lifecycle of a user: `on_start` opens its client, each task sends one streamed
request and waits for the whole stream, `on_stop` closes the client. Run with
`--stop-timeout` so that the requests in flight at the end finish instead of being
cut off (a cut-off request is not reported).

gRPC and gevent: locust monkey-patches the standard library with gevent, which cannot
patch grpc's C core. `grpc.experimental.gevent.init_gevent()`, called before any
channel exists, makes grpc's sync API yield to gevent, so the sync `Client` streams in
one greenlet while the other users run.
"""

from __future__ import annotations

import itertools
import json
import random
from typing import Any

import requests
from grpc.experimental import gevent as grpc_gevent
from locust import User, between, events, task
from locust.env import Environment

from benchmarks.slo import StreamRecord
from benchmarks.workload import MIXES, Mix, Request
from cluster.client import Client, ClientError, Sampling

grpc_gevent.init_gevent()  # before any gRPC object: the sync client then yields to gevent


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    g = parser.add_argument_group("pdserve")
    g.add_argument("--grpc-target", default="127.0.0.1:9000", help="gRPC endpoint HOST:PORT")
    g.add_argument("--grpc-token", default="", help="gRPC bearer token")
    g.add_argument("--api-key", default="", help="HTTP API key (Authorization: Bearer)")
    g.add_argument("--mix", default="prompt-heavy", choices=sorted(MIXES), help="length mix")
    g.add_argument("--prompt-len", default=None, help="prompt length spec (overrides --mix)")
    g.add_argument("--output-len", default=None, help="output length spec (overrides --mix)")
    g.add_argument("--vocab-size", type=int, default=49152, help="token ids are drawn below it")
    g.add_argument("--max-model-len", type=int, default=2048, help="cap on prompt + output")
    g.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request")
    g.add_argument("--seed", type=int, default=None, help="seed of the prompt generator")


_users = itertools.count()  # with --seed, user k draws from seed * 1000003 + k


class _Workload:
    """The requests of one user (its own generator, so users do not share state)."""

    def __init__(self, environment: Environment) -> None:
        opts = environment.parsed_options
        self.mix = Mix.build(opts.mix, opts.prompt_len, opts.output_len)
        self.vocab_size = opts.vocab_size
        self.max_model_len = opts.max_model_len
        seed = opts.seed
        self.rng = random.Random(None if seed is None else seed * 1_000_003 + next(_users))

    def next(self) -> Request:
        return self.mix.request(self.rng, self.vocab_size, self.max_model_len)


def report(environment: Environment, kind: str, rec: StreamRecord) -> None:
    """Fire E2E (always), and TTFT and TPOT (when measured) as locust requests."""
    fire = environment.events.request.fire
    error = RuntimeError(rec.error) if rec.error else None
    if error is None and not rec.ok:
        error = RuntimeError("the stream ended without tokens or without finishing")
    e2e = rec.e2e
    fire(
        request_type=kind,
        name="E2E",
        response_time=(e2e if e2e is not None else 0.0) * 1000.0,
        response_length=rec.output_tokens,
        exception=error,
        context={},
    )
    if error is not None:
        return
    if rec.ttft is not None:
        fire(request_type=kind, name="TTFT", response_time=rec.ttft * 1000.0,
             response_length=rec.prompt_tokens, exception=None, context={})  # fmt: skip
    if rec.tpot is not None:
        fire(request_type=kind, name="TPOT", response_time=rec.tpot * 1000.0,
             response_length=rec.output_tokens, exception=None, context={})  # fmt: skip


class GrpcUser(User):
    """Streams `Generate` through `cluster.client.Client`."""

    wait_time = between(0.1, 0.5)

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.workload = _Workload(self.environment)
        self.timeout_s = opts.request_timeout
        self.grpc = Client(
            opts.grpc_target, token=opts.grpc_token or None, timeout_s=self.timeout_s
        )

    def on_stop(self) -> None:
        self.grpc.close()

    @task
    def generate(self) -> None:
        req = self.workload.next()
        sampling = Sampling(max_tokens=req.output_len, ignore_eos=True)
        rec = StreamRecord(len(req.prompt), req.output_len)
        try:
            for chunk in self.grpc.stream(token_ids=req.prompt, sampling=sampling):
                rec.chunk(len(chunk.token_ids))
                if chunk.finish_reason is not None:
                    rec.finish()
        except ClientError as e:
            rec.fail(str(e))
        report(self.environment, "grpc", rec)


class OpenAIUser(User):
    """Streams `/v1/completions` (server-sent events) with token-id prompts.

    It reads the stream with its own `requests.Session` (gevent-patched like the rest),
    because locust's `HttpUser` would also report the request itself, timed to the
    response headers only.
    """

    wait_time = between(0.1, 0.5)
    host = "http://127.0.0.1:8000"

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.workload = _Workload(self.environment)
        self.timeout_s = opts.request_timeout
        self.url = (self.host or OpenAIUser.host).rstrip("/") + "/v1/completions"
        self.session = requests.Session()
        if opts.api_key:
            self.session.headers["Authorization"] = f"Bearer {opts.api_key}"

    def on_stop(self) -> None:
        self.session.close()

    @task
    def completion(self) -> None:
        req = self.workload.next()
        body = {
            "prompt": list(req.prompt),
            "max_tokens": req.output_len,
            "ignore_eos": True,
            "stream": True,
        }
        rec = StreamRecord(len(req.prompt), req.output_len)
        try:
            with self.session.post(
                self.url, json=body, stream=True, timeout=(10.0, self.timeout_s)
            ) as resp:
                if resp.status_code != 200:
                    rec.fail(f"HTTP {resp.status_code}: {resp.text[:200]}")
                else:
                    _read_sse(resp.iter_lines(), rec)
        except (requests.RequestException, ValueError) as e:  # ValueError: bad JSON
            rec.fail(f"{type(e).__name__}: {e}")
        report(self.environment, "http", rec)


def _read_sse(lines: Any, rec: StreamRecord) -> None:
    """Record each event's tokens; the stream must end with `data: [DONE]`."""
    for raw in lines:
        line = raw.decode() if isinstance(raw, bytes) else raw
        if not line.startswith("data: "):
            continue
        payload = line[len("data: ") :]
        if payload == "[DONE]":
            if rec.error is None and not rec.done:
                rec.fail("the stream ended without a finish reason")
            return
        event = json.loads(payload)
        if "error" in event:
            rec.fail(f"server error: {event['error'].get('message')}")
            continue
        for choice in event.get("choices", []):
            rec.chunk(len(choice.get("token_ids", [])))
            if choice.get("finish_reason") is not None:
                rec.finish()
    rec.fail("the stream ended without data: [DONE]")
