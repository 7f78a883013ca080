"""A whole pdserve cluster on local Ray for one test module.

`ClusterHarness.start(config)` starts a real redis-server, a local Ray with logical
CPUs for the router and the pools, Serve's proxies on free loopback ports, and the
application from `cluster.builder`; it waits (bounded) until every pool is registered
and the health service says SERVING. `stop()` first checks for leaks (every replica's
requests, streams, transfers and blocks back to baseline), then shuts Serve and Ray
down and checks that the registry and the kv rendezvous keys are gone.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import ray
from ray import serve

from cluster.builder import APP_NAME, build_app, serve_options, serve_process_env
from cluster.client import Client, Sampling
from cluster.config import ClusterConfig
from cluster.config_file import load_config
from cluster.launcher import local_ray_metrics
from cluster.redis_server import RedisServer
from engine import LLM, SamplingParams
from registry import Registry, connect
from registry.traces import is_trace_key
from router.pinning import PIN_KWARG
from worker.messages import WorkerState

START_TIMEOUT_S = 180.0
MAX_TOKENS = 12
# Prompts of 30-40 tokens, long enough to be disaggregated under a threshold of 16.
LONG_PROMPTS = [
    "In the beginning the universe was created. This has made a lot of people very angry "
    "and been widely regarded as a bad move by almost everyone who has thought about it.",
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was "
    "the age of foolishness, it was the epoch of belief, it was the epoch of incredulity.",
    "The quick brown fox jumps over the lazy dog while the five boxing wizards jump quickly "
    "and the sphinx of black quartz judges my vow, or so the old typesetters used to say.",
    "Call me Ishmael. Some years ago, never mind how long precisely, having little or no "
    "money in my purse, and nothing particular to interest me on shore, I thought I would sail.",
    "All happy families are alike; each unhappy family is unhappy in its own way. Everything "
    "was in confusion in the house of the Oblonskys, as the wife had discovered the affair.",
    "It is a truth universally acknowledged, that a single man in possession of a good "
    "fortune, must be in want of a wife, however little known the feelings of such a man.",
    "Far out in the uncharted backwaters of the unfashionable end of the western spiral arm "
    "of the Galaxy lies a small unregarded yellow sun, orbited by a small blue-green planet.",
    "Many years later, as he faced the firing squad, Colonel Aureliano Buendia was to "
    "remember that distant afternoon when his father took him to discover ice in the town.",
]

# For the clusters whose pools each have their own TP/PP layout: prefill TP=2 and
# decode PP=2, half a CPU per rank, small KV caches; prompts of about 40 tokens, and
# two below a threshold of 16.
SPLIT_LAYOUTS = [
    "pools.prefill.tp=2",
    "pools.decode.pp=2",
    "pools.prefill.resources_per_rank={CPU: 0.5}",
    "pools.decode.resources_per_rank={CPU: 0.5}",
    "pools.prefill.engine.kv_cache_bytes=4MiB",
    "pools.decode.engine.kv_cache_bytes=4MiB",
]
LAYOUT_LONG_PROMPTS = [
    "A lighthouse keeper kept a log of every ship that passed the point, the weather at "
    "dawn and dusk, and the state of the lamp, for forty years without missing a night.",
    "The recipe calls for two cups of flour, a pinch of salt, three eggs beaten until pale, "
    "and enough milk to make a batter that coats the back of a wooden spoon.",
    "Rivers carve valleys slowly: a few millimetres a year, but over a million years that "
    "is kilometres of rock carried grain by grain down to the delta and out to sea.",
    "When the orchestra tuned, the oboe gave the A, the strings followed, and the hall "
    "went quiet as the conductor raised her baton above the score on the stand.",
]
LAYOUT_SHORT_PROMPTS = ["Hello", "Name a colour:"]


def greedy(max_tokens: int = MAX_TOKENS) -> SamplingParams:
    """The engine-side twin of the clients' greedy sampling."""
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def greedy_references(
    llm: LLM, long: list[str], short: list[str], threshold: int
) -> dict[str, list[int]]:
    """The single engine's greedy tokens per prompt; each long prompt must be at least
    twice the disaggregation threshold and each short one below it."""
    for p in long:
        assert len(llm.tokenizer.encode(p)) >= 2 * threshold, p
    for p in short:
        assert len(llm.tokenizer.encode(p)) < threshold, p
    outs = llm.generate(long + short, greedy())
    return {p: o.token_ids for p, o in zip(long + short, outs, strict=True)}


# Ports for servers that bind later, after ray.init: below the kernel's ephemeral range
# (32768 and up here), from which Ray's many processes take theirs as they start, so
# none of them can take the port between the pick and the bind.
_PORTS = range(20000, 32768)


def free_port() -> int:
    """A loopback port that is free now, outside the ephemeral range (see _PORTS)."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(_PORTS.start, _PORTS.stop)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port in {_PORTS}")


def wait_until(cond: Callable[[], bool], timeout_s: float, what: str, step_s: float = 0.1) -> float:
    """Seconds until `cond()` held; AssertionError after `timeout_s`."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"{what}: not within {timeout_s}s")
        time.sleep(step_s)
    return time.monotonic() - start


def replica_pid(pool: str, unique_id: str) -> int:
    """The pid of a live Serve replica actor (from Ray's actor table)."""
    name = f"SERVE_REPLICA::{APP_NAME}#{pool}#{unique_id}"
    for info in ray._private.state.actors().values():
        if info["Name"] == name and info["State"] == "ALIVE":
            return int(info["Pid"])
    raise AssertionError(f"no live actor {name}")


def tiny_config(model_dir: str, name: str, overrides: list[str]) -> ClusterConfig:
    base = [
        f"name={name}",
        f"model.source={model_dir}",
        "model.max_model_len=256",
        f"server.http_port={free_port()}",
        f"server.grpc_port={free_port()}",
        "redis.lease_ttl_s=3",
        "redis.load_report_interval_s=0.2",
        "router.view_refresh_interval_s=0.1",
        "kv_transfer.timeout_s=10",
    ]
    return load_config(None, [*base, *overrides])


@dataclass
class HttpReply:
    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class ClusterHarness:
    def __init__(
        self,
        config: ClusterConfig,
        model_dir: str,
        scalable: bool = False,
        controller: bool = False,
    ) -> None:
        """`scalable`: the app takes Serve's external scaling calls (`scale`).
        `controller`: with `planner.enabled`, the app runs the controller as a deployment
        of its own, as a cluster deployed from a Serve config (KubeRay) does."""
        self.config = config
        self.model_dir = model_dir
        self.scalable = scalable
        self.controller = controller
        self.redis = RedisServer()
        self.grpc_target = f"127.0.0.1:{config.server.grpc_port}"
        self.http_url = f"http://127.0.0.1:{config.server.http_port}"
        token = config.server.grpc_bearer_token
        self.token = token.get_secret_value() if token else None
        key = config.server.api_key
        self.api_key = key.get_secret_value() if key else None
        self._redis_client: Any = None
        self.registry: Registry | None = None
        self._baseline: dict[str, WorkerState] = {}

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> ClusterHarness:
        """Start Redis, Ray and the app; on any failure, stop what did start, so that
        the tests after this one get a clean process (no Ray left initialized)."""
        try:
            self._start()
        except BaseException:
            self._stop_ray()
            self._stop_redis()
            raise
        return self

    def _start(self) -> None:
        self.redis.start()
        self._redis_client = connect(self.redis.url)
        self.registry = Registry(self._redis_client, self.config.name)
        for key, value in serve_process_env(self.config).items():
            os.environ.setdefault(key, value)
        cpus = max(4, math.ceil(self.config.required_cpus()))
        ray.init(
            address="local",
            num_cpus=cpus,
            include_dashboard=False,
            log_to_driver=True,
            **local_ray_metrics(self.config),
        )
        http, grpc = serve_options(self.config)
        serve.start(http_options=http, grpc_options=grpc)
        app = build_app(
            self.config,
            model_dir=self.model_dir,
            redis_url=self.redis.url,
            controller=self.controller,
        )
        serve.run(app, name=APP_NAME, route_prefix="/", external_scaler_enabled=self.scalable)
        with self.client() as c:
            wait_until(lambda: c.healthy() and c.cluster_status().ready, START_TIMEOUT_S, "ready")
        self._baseline = {s.instance_id: s for s in self.worker_states()}

    @staticmethod
    def _stop_ray() -> None:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()

    def _stop_redis(self) -> None:
        if self._redis_client is not None:
            self._redis_client.close()
            self._redis_client = None
        self.redis.stop()

    def stop(self) -> None:
        problems: list[str] = []
        try:
            problems = self.leaks(timeout_s=20.0)
        finally:
            self._stop_ray()
            registry = self.registry
            if registry is not None:
                with contextlib.suppress(Exception):
                    left = [i.instance_id for i in registry.live_instances()]
                    if left:
                        problems.append(f"registry still lists {left}")
                    stray = self._stray_keys(registry)
                    if stray:
                        problems.append(f"keys left in Redis: {stray}")
            self._stop_redis()
        assert not problems, "leaks at teardown: " + "; ".join(problems)

    @staticmethod
    def _stray_keys(registry: Registry, wait_s: float = 8.0) -> list[str]:
        """Keys left in the cluster's namespace, once those under a TTL had the time to
        expire: a process killed in a test leaves its leased records (an instance's
        lease, a router's admission report) to expire, as in production."""
        deadline = time.monotonic() + wait_s
        while True:
            stray = sorted(
                k
                for k in registry.namespace_keys()
                if not k.endswith((":prefix-events", ":decisions")) and not is_trace_key(k)
            )
            if not stray or time.monotonic() > deadline:
                return stray
            time.sleep(0.25)

    # -- access ----------------------------------------------------------------------------

    @property
    def redis_client(self) -> Any:
        return self._redis_client

    def client(self, token: str | None = "default") -> Client:
        return Client(
            self.grpc_target, token=self.token if token == "default" else token, timeout_s=120
        )

    def http(
        self,
        method: str,
        path: str,
        body: Any = None,
        key: str | None = "default",
        timeout_s: float = 120,
    ) -> HttpReply:
        headers = {"Content-Type": "application/json"}
        api_key = self.api_key if key == "default" else key
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.http_url + path, data, headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                return HttpReply(resp.status, resp.read())
        except urllib.error.HTTPError as e:
            return HttpReply(e.code, e.read())

    def sse(self, path: str, body: Any, timeout_s: float = 120) -> Iterator[dict[str, Any]]:
        """The JSON events of a server-sent event stream, until [DONE]."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.http_url + path, json.dumps(body).encode(), headers)
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            for raw in resp:
                line = raw.decode().strip()
                if not line:
                    continue
                assert line.startswith("data: "), line
                payload = line[len("data: ") :]
                if payload == "[DONE]":
                    return
                yield json.loads(payload)

    def scale(self, pool: str, replicas: int) -> None:
        """Set a pool's replica count through Serve's external scaling API (the app must
        be `scalable`): Serve starts or stops replicas as for an autoscaling decision."""
        from ray.serve._private.common import DeploymentID
        from ray.serve.context import _get_global_client

        controller = _get_global_client()._controller
        ray.get(
            controller.update_deployment_replicas.remote(DeploymentID(pool, APP_NAME), replicas),
            timeout=30,
        )

    def _handle(self, pool: str) -> Any:
        return serve.get_deployment_handle(pool, app_name=APP_NAME)

    def instances(self) -> list[tuple[str, str, str]]:
        """(pool, instance id, replica address) of every live instance."""
        assert self.registry is not None
        return [(i.pool, i.instance_id, i.address) for i in self.registry.live_instances()]

    def call(self, pool: str, address: str, method: str, *args: Any) -> Any:
        handle = self._handle(pool)
        return getattr(handle, method).remote(*args, **{PIN_KWARG: address}).result(timeout_s=30)

    def worker_states(self) -> list[WorkerState]:
        return [self.call(pool, addr, "state") for pool, _, addr in self.instances()]

    def leaks(self, timeout_s: float) -> list[str]:
        """Problems that remain after waiting up to `timeout_s` for cleanup to finish."""
        problems: list[str] = []

        def clean() -> bool:
            problems.clear()
            for s in self.worker_states():
                if s.num_requests or s.num_streams:
                    problems.append(
                        f"{s.instance_id}: {s.num_requests} requests, {s.num_streams} streams"
                    )
                if s.free_blocks != s.total_blocks:
                    problems.append(
                        f"{s.instance_id}: {s.total_blocks - s.free_blocks} blocks in use"
                    )
                if s.active_transfers or s.pending_remote_prefills:
                    problems.append(
                        f"{s.instance_id}: {s.active_transfers} transfers, "
                        f"{s.pending_remote_prefills} pending remote prefills"
                    )
                if s.extra.get("shm_free_slots") != s.extra.get("shm_slots"):
                    problems.append(f"{s.instance_id}: shm transfer slots in use")
            return not problems

        with contextlib.suppress(AssertionError):
            wait_until(clean, timeout_s, "clean", step_s=0.2)
        return problems


def generate_concurrently(
    cluster: ClusterHarness, prompts: list[str], threads: int, sampling: Sampling
) -> tuple[list[tuple[str, list[int]]], list[BaseException]]:
    """Send `prompts` from `threads` clients at once, each waiting for its answer: the
    (prompt, token ids) answered, and the errors (a client stops at its first)."""
    done: list[tuple[str, list[int]]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    it = iter(prompts)

    def client() -> None:
        with cluster.client() as c:
            while True:
                with lock:
                    prompt = next(it, None)
                if prompt is None:
                    return
                try:
                    out = c.generate(prompt, sampling)
                except BaseException as e:
                    errors.append(e)
                    return
                with lock:
                    done.append((prompt, list(out.token_ids)))

    workers = [threading.Thread(target=client) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=300)
    return done, errors
