"""Load test for a running pdserve cluster, over gRPC (the Python client) and HTTP.

    pdserve up --detach
    locust -f tests/load/locustfile.py --headless -u 8 -r 2 -t 60s \
        --host 127.0.0.1:9000 --http-host http://127.0.0.1:8000

`GrpcUser` streams completions through `cluster.client.Client` and reports each
request twice: the whole stream ("Generate") and its time to first token
("Generate TTFT"), with the generated token count as the response length.
`OpenAIUser` posts streaming chat completions to the HTTP API. Prompts mix short ones
(prefilled on the decode pool) and long ones (disaggregated).
"""

from __future__ import annotations

import json
import random
import time
from typing import Any

from grpc.experimental import gevent as grpc_gevent
from locust import FastHttpUser, User, between, events, task

from cluster.client import Client, ClientError, Sampling

grpc_gevent.init_gevent()  # let gRPC's sync client cooperate with locust's greenlets

SHORT = ["Hello!", "What is 2 + 2?", "Name a color.", "Say something nice."]
LONG = [
    "Summarize the following story in one sentence. " + "The old lighthouse keeper climbed "
    "the stairs every evening, lit the lamp, and watched the ships pass in the dark. " * 3,
    "Explain, step by step and for a beginner, how a hash table stores and finds its keys, "
    "what happens on a collision, and why resizing keeps lookups fast on average.",
]


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument("--http-host", default="http://127.0.0.1:8000", help="OpenAI API base")
    parser.add_argument("--token", default="", help="gRPC bearer token / HTTP API key")
    parser.add_argument("--max-tokens", type=int, default=32)


def _prompt() -> str:
    return random.choice(LONG if random.random() < 0.3 else SHORT)


class GrpcUser(User):
    wait_time = between(0.1, 0.5)

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.client = Client(self.host or "127.0.0.1:9000", token=opts.token or None, timeout_s=120)
        self.sampling = Sampling(max_tokens=opts.max_tokens)

    def on_stop(self) -> None:
        self.client.close()

    @task
    def generate(self) -> None:
        fire = self.environment.events.request.fire
        start = time.perf_counter()
        first: float | None = None
        tokens = 0
        error: Exception | None = None
        try:
            for chunk in self.client.stream(_prompt(), self.sampling):
                if first is None and chunk.token_ids:
                    first = time.perf_counter()
                tokens += len(chunk.token_ids)
        except ClientError as e:
            error = e
        total_ms = (time.perf_counter() - start) * 1000
        fire(request_type="grpc", name="Generate", response_time=total_ms,
             response_length=tokens, exception=error, context={})  # fmt: skip
        if first is not None:
            fire(request_type="grpc", name="Generate TTFT", response_time=(first - start) * 1000,
                 response_length=0, exception=None, context={})  # fmt: skip


class OpenAIUser(FastHttpUser):
    wait_time = between(0.1, 0.5)

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.url = opts.http_host.rstrip("/") + "/v1/chat/completions"  # --host is gRPC's
        self.headers = {"Content-Type": "application/json"}
        if opts.token:
            self.headers["Authorization"] = f"Bearer {opts.token}"
        self.max_tokens = opts.max_tokens

    @task
    def chat(self) -> None:
        body = {
            "messages": [{"role": "user", "content": _prompt()}],
            "max_tokens": self.max_tokens,
            "stream": True,
        }
        with self.client.post(
            self.url, data=json.dumps(body), headers=self.headers, name="chat (SSE)",
            catch_response=True,
        ) as resp:  # fmt: skip
            text = resp.text or ""
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {text[:200]}")
            elif not text.rstrip().endswith("data: [DONE]"):
                resp.failure("stream ended without [DONE]")
