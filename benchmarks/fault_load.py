"""Streamed load and a health watch for the fault tests, each bounded in time.

`SseStream` runs one streamed /v1/completions request in a thread and records how it
ended: `[DONE]` after the last token, an SSE `error` event then `[DONE]`, a cut
connection, or no byte for `read_timeout_s` (a stall). It also records the longest gap
between two reads. `GrpcStream` does the same for a streamed Generate: it ends with
its last message or with a status (recorded as an error with the status's code).
`HealthWatch` asks the router's gRPC health service and its HTTP
/health, each with a 1 s deadline, every `period_s`, and records every check that did
not answer in time. `replica_pids` and `rank_actor_pids` find the processes of a
deployment's replicas and of the TP/PP rank actors, to kill or pause them.
"""

from __future__ import annotations

import dataclasses
import http.client
import itertools
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import ray

from cluster.builder import APP_NAME
from cluster.client import Client, ClientError, Sampling

MAX_MODEL_LEN = 1024  # of the fault tests' clusters and their reference engine


def replica_pids(deployment: str) -> dict[str, int]:
    """Replica unique id -> pid of every live replica actor of a deployment (from Ray's
    actor table)."""
    prefix = f"SERVE_REPLICA::{APP_NAME}#{deployment}#"
    return {
        info["Name"].removeprefix(prefix): int(info["Pid"])
        for info in ray._private.state.actors().values()
        if info["Name"].startswith(prefix) and info["State"] == "ALIVE"
    }


def rank_actor_pids() -> list[int]:
    """Pids of the live TP/PP rank actors of the Ray cluster this process started (Ray
    titles an actor's process `ray::<class>...`; local Ray's raylet is a child of the
    process that started it, and the actors are the raylet's children), so that another
    cluster on the same host is not counted."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            if cmdline.startswith(b"ray::RankActor") and _parent(_parent(int(entry.name))) == (
                os.getpid()
            ):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


@dataclass
class StreamResult:
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    errors: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False  # saw `data: [DONE]`
    status: int | None = None
    failure: str = ""  # "cut: ...", "stall: ..." or "http <status>"
    started: float = 0.0  # time.monotonic()
    ended: float = 0.0
    reads: list[float] = field(default_factory=list)  # time.monotonic() of each event
    timings: dict[str, Any] = field(default_factory=dict)  # of the final message
    retries: int = 0  # the client library's own retries (gRPC)
    resumes: int = 0  # the client library's continuations of a broken stream (gRPC)

    @property
    def ended_properly(self) -> bool:
        return self.done and not self.failure

    @property
    def ttft(self) -> float:
        """Seconds from the request to its first event (or to its end without one)."""
        return (self.reads[0] if self.reads else self.ended) - self.started

    def longest_gap_after(self, t: float) -> float:
        """Longest wait for a byte after `t` (up to the end of the stream); a request
        sent after `t` waits from when it was sent."""
        t = max(t, self.started)
        marks = [t] + [r for r in self.reads if r > t] + [self.ended]
        return max((b - a for a, b in itertools.pairwise(marks)), default=0.0)


class _StreamThread:
    """One stream, read on its own thread into `result` by the subclass's `_run`."""

    result: StreamResult

    def __init__(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        raise NotImplementedError

    def start(self) -> Self:
        self.result.started = time.monotonic()
        self._thread.start()
        return self

    def join(self, timeout_s: float) -> StreamResult:
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self.result.failure = self.result.failure or f"stall: still open after {timeout_s}s"
        return self.result


class SseStream(_StreamThread):
    def __init__(
        self, port: int, body: dict[str, Any], read_timeout_s: float, path: str = "/v1/completions"
    ) -> None:
        self.result = StreamResult()
        self._port = port
        self._body = {**body, "stream": True}
        self._path = path
        self._timeout = read_timeout_s
        super().__init__()

    def _run(self) -> None:
        r = self.result
        conn = http.client.HTTPConnection("127.0.0.1", self._port, timeout=self._timeout)
        try:
            conn.request(
                "POST", self._path, json.dumps(self._body), {"Content-Type": "application/json"}
            )
            resp = conn.getresponse()
            r.status = resp.status
            if resp.status != 200:
                r.failure = f"http {resp.status}: {resp.read()[:200]!r}"
                return
            self._read(resp)
        except TimeoutError as e:
            r.failure = f"stall: no byte for {self._timeout}s ({e})"
        except (http.client.HTTPException, OSError) as e:
            r.failure = f"cut: {type(e).__name__}: {e}"
        finally:
            r.ended = time.monotonic()
            conn.close()

    def _read(self, resp: http.client.HTTPResponse) -> None:
        r = self.result
        while True:
            line = resp.readline()
            if not line:
                r.failure = "cut: the stream ended without [DONE]"
                return
            text = line.decode().strip()
            if not text:
                continue
            r.reads.append(time.monotonic())
            payload = text.removeprefix("data: ")
            if payload == "[DONE]":
                r.done = True
                return
            event = json.loads(payload)
            if "error" in event:
                r.errors.append(event["error"])
            else:
                for choice in event["choices"]:
                    r.tokens.extend(choice["token_ids"])
                    r.text += choice.get("text") or ""
                r.timings = event.get("timings", r.timings)


class GrpcStream(_StreamThread):
    def __init__(
        self,
        target: str,
        prompt: str,
        sampling: Sampling,
        timeout_s: float,
        token: str | None = None,
    ) -> None:
        self.result = StreamResult()
        self._target = target
        self._token = token
        self._prompt = prompt
        self._sampling = sampling
        self._timeout = timeout_s
        super().__init__()

    def _run(self) -> None:
        r = self.result
        try:
            with Client(self._target, token=self._token, timeout_s=self._timeout) as c:
                try:
                    for chunk in c.stream(self._prompt, self._sampling, timeout_s=self._timeout):
                        r.reads.append(time.monotonic())
                        r.tokens.extend(chunk.token_ids)
                        r.text += chunk.text
                        if chunk.timings is not None:
                            r.timings = dataclasses.asdict(chunk.timings)
                finally:
                    r.retries, r.resumes = c.retries, c.resumes
            r.done = True
        except ClientError as e:
            r.reads.append(time.monotonic())
            r.errors.append({"type": e.code.name, "message": e.details})
            r.done = True
        except Exception as e:
            r.failure = f"cut: {type(e).__name__}: {e}"
        finally:
            r.ended = time.monotonic()


@dataclass(frozen=True)
class Missed:
    at: float  # time.monotonic() the check was sent
    what: str  # "grpc" or "http"
    took_s: float
    detail: str


class HealthWatch:
    """Checks both health endpoints until stopped; `missed` lists the slow or failed
    ones (a NOT_SERVING answer in time is an answer; it is recorded in `not_serving`)."""

    def __init__(
        self,
        grpc_target: str,
        http_port: int,
        period_s: float = 0.25,
        token: str | None = None,
    ) -> None:
        self.missed: list[Missed] = []
        self.not_serving: list[float] = []
        self.checks = 0
        self._target = grpc_target
        self._token = token
        self._port = http_port
        self._period = period_s
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._loop, args=(self._grpc,), daemon=True),
            threading.Thread(target=self._loop, args=(self._http,), daemon=True),
        ]

    def __enter__(self) -> HealthWatch:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10.0)

    def _loop(self, check: Any) -> None:
        with Client(self._target, token=self._token, timeout_s=1.0) as client:
            while not self._stop.is_set():
                check(client)
                self.checks += 1
                self._stop.wait(self._period)

    def _grpc(self, client: Client) -> None:
        began = time.monotonic()
        ok = client.healthy(timeout_s=1.0)
        took = time.monotonic() - began
        if took > 1.0 or (not ok and took > 0.9):
            self.missed.append(Missed(began, "grpc", took, "no answer within 1 s"))
        elif not ok:
            self.not_serving.append(began)

    def _http(self, client: Client) -> None:
        began = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", self._port, timeout=1.0)
        try:
            conn.request("GET", "/health")
            status = conn.getresponse().status
            if status != 200:
                self.not_serving.append(began)
        except (OSError, http.client.HTTPException) as e:
            took = time.monotonic() - began
            self.missed.append(Missed(began, "http", took, f"{type(e).__name__}: {e}"))
        finally:
            conn.close()
