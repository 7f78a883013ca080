"""Bringing a cluster up and down on Ray: what `pdserve up` and `pdserve down` do.

`Launcher(config).start()`:

1. The run dir (`<cache>/run/<cluster name>`) must not record a live `up` process.
2. Redis: the configured URL, or an embedded redis-server on a free loopback port with
   a generated password. Its state and password files (0600) go in the run dir, so
   `down` can stop it even if `up` died. The KV control channels' secret is generated
   here too (unless configured) and reaches the pools only through their settings.
3. Ray: connect to `ray.address`, or start a local Ray with enough logical CPUs for
   the router and every pool replica (engines pin their torch threads, so logical CPUs
   may exceed the cores), its metrics export on `ray.metrics_export_port`. A Ray
   Client address on another machine (`ray://HOST:10001`) needs a redis.url its nodes
   reach and a model directory at the same path here and on every node
   (`check_remote`); the endpoints are then HOST's.
   The cluster's nodes must be able to place every replica (`cluster.resources`): a
   local Ray that cannot fails here, a remote one (which may autoscale) warns.
4. Serve: start it with the config's HTTP and gRPC proxies and deploy the application
   from `cluster.builder.build_app`.
5. Wait, bounded, until the application is RUNNING, every pool has its replicas in the
   registry and the gRPC health service says SERVING. Progress goes to `echo`.
6. With `planner.enabled`, start the controller (`controller.actor`), a detached
   actor; with `planner.scaling` the application is deployed with Serve's external
   scaler enabled, through which the controller changes replica counts.
7. Record the run state (pid, endpoints, every Ray node's metrics export) with status
   "ready".

`Launcher.stop()` (idempotent) stops the controller, deletes the application, shuts a
local Ray down (an external Ray cluster keeps running), stops the embedded Redis or
purges the cluster's keys from a shared one, and removes the run state.

`stop_running(name)` is `pdserve down`: it sends SIGTERM to the recorded `up`
process and waits for its cleanup; if the process is gone or hangs, it kills it and
stops the embedded Redis from its state file.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cluster.client import Client
from cluster.config import ClusterConfig, ConfigError
from cluster.redis_server import RedisServer
from cluster.resources import alive_node_resources, resource_problems
from cluster.run_state import STATE_FILE, RunState, pid_alive, run_dir_for
from engine.model_source import resolve_model
from registry import Registry, connect

logger = logging.getLogger(__name__)

Echo = Callable[[str], None]


class LaunchError(RuntimeError):
    pass


def local_ray_metrics(config: ClusterConfig) -> dict[str, Any]:
    """`ray.init` options of a local Ray for its metrics export: the port, and how
    often each process reports to it."""
    interval_ms = round(config.ray.metrics_report_interval_s * 1000)
    return {
        "_metrics_export_port": config.ray.metrics_export_port,
        "_system_config": {"metrics_report_interval_ms": interval_ms},
    }


def metrics_urls() -> list[str]:
    """The Prometheus metrics export of every live node of the connected Ray cluster."""
    import ray

    urls = []
    for node in ray.nodes():  # type: ignore[no-untyped-call]
        port = node.get("MetricsExportPort")
        if node.get("Alive") and port:
            host = _connect_host(str(node.get("NodeManagerAddress", "127.0.0.1")))
            urls.append(f"http://{host}:{port}/metrics")
    return sorted(urls)


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def remote_host(address: str | None) -> str | None:
    """The head's host of a Ray Client address (`ray://HOST:PORT`) on another machine;
    None for local Ray, `auto`, a GCS address this machine joins, or a loopback one."""
    if address is None or not address.startswith("ray://"):
        return None
    host = address.removeprefix("ray://").rsplit(":", 1)[0].strip("[]")
    return None if host in ("127.0.0.1", "localhost", "::1", "") else host


def check_remote(config: ClusterConfig) -> None:
    """What a Ray cluster on other machines needs from the config; raises LaunchError."""
    if remote_host(config.ray.address) is None:
        return
    if config.redis.url is None:
        raise LaunchError(
            f"ray.address {config.ray.address}: the cluster's nodes cannot reach an "
            "embedded Redis on this machine; set redis.url to a Redis they can reach"
        )
    if not Path(config.model.source).is_absolute():
        raise LaunchError(
            f"model.source {config.model.source!r}: with a Ray cluster on other machines, "
            "give an HF-format directory that exists at the same path here and on every "
            "node (a shared volume, or the image's model directory)"
        )


class Launcher:
    def __init__(
        self, config: ClusterConfig, *, run_dir: Path | None = None, echo: Echo = print
    ) -> None:
        self.config = config
        self.run_dir = run_dir or run_dir_for(config.name)
        self.echo = echo
        self._redis: RedisServer | None = None
        self._redis_url = config.redis.url
        self._ray_started = False
        self._serve_started = False
        self._controller_started = False
        self._stopped = threading.Event()
        s = config.server
        host = remote_host(config.ray.address) or _connect_host(s.host)
        self.grpc_target = f"{host}:{s.grpc_port}"
        self.http_url = f"http://{host}:{s.http_port}"

    # -- up -------------------------------------------------------------------------------

    def start(self, timeout_s: float = 600.0, log_file: str | None = None) -> RunState:
        existing = RunState.read(self.run_dir)
        if existing is not None and pid_alive(existing.pid) and existing.pid != os.getpid():
            raise LaunchError(
                f"cluster {self.config.name!r} is already up (pid {existing.pid}); "
                "run `pdserve down` first"
            )
        check_remote(self.config)
        # One secret for this run's KV control channels, handed to the pools in their
        # settings: it is never written to Redis or the run dir.
        self.config = self.config.with_transfer_secret()
        deadline = time.monotonic() + timeout_s
        try:
            model_dir = self._model()
            redis_url = self._start_redis()
            self._write("starting", redis_url, log_file)
            self._start_ray()
            self._check_resources()
            self._deploy(model_dir, redis_url)
            self._wait_ready(deadline)
            self._start_controller(redis_url)
        except BaseException:
            self.stop()
            raise
        return self._write("ready", redis_url, log_file)

    def _write(self, status: str, redis_url: str, log_file: str | None) -> RunState:
        state = RunState(
            cluster=self.config.name,
            pid=os.getpid(),
            status=status,
            grpc_target=self.grpc_target,
            http_url=self.http_url,
            redis_url=redis_url,
            embedded_redis=self._redis is not None,
            ray_address=self.config.ray.address,
            log_file=log_file,
            metrics_urls=self._metrics_urls(),
        )
        state.write(self.run_dir)
        return state

    def _metrics_urls(self) -> list[str]:
        import ray

        if not ray.is_initialized():
            return []
        try:
            return metrics_urls()
        except Exception as e:  # a Ray Client connection may not list nodes
            logger.warning("cannot list the metrics export of the Ray nodes: %s", e)
            return []

    def _model(self) -> str:
        self.echo(f"model: resolving {self.config.model.source}")
        return str(resolve_model(self.config.model.source))

    def _start_redis(self) -> str:
        if self._redis_url is not None:
            self.echo(f"redis: using {self._redis_url.split('@')[-1]}")
            return self._redis_url
        server = RedisServer(port=self.config.redis.port, detach=True).start()
        self._redis = server
        server.write_state(self.run_dir)
        self.echo(f"redis: embedded redis-server on 127.0.0.1:{server.port}")
        return server.url

    def _start_ray(self) -> None:
        import ray

        address = self.config.ray.address
        if address is not None:
            self.echo(f"ray: connecting to {address}")
            ray.init(address=address, log_to_driver=False)
            return
        from cluster.builder import serve_process_env

        for key, value in serve_process_env(self.config).items():
            os.environ.setdefault(key, value)  # inherited by Ray's processes
        need = math.ceil(self.config.required_cpus())
        cpus = self.config.ray.num_cpus or max(os.cpu_count() or 1, need)
        self.echo(f"ray: starting local Ray with {cpus} logical CPUs")
        ray.init(
            address="local",
            num_cpus=cpus,
            include_dashboard=False,
            log_to_driver=False,
            **local_ray_metrics(self.config),
        )
        self._ray_started = True

    def _check_resources(self) -> None:
        """Fail (a local Ray) or warn (a cluster that may autoscale) when the cluster
        cannot place what the config asks for; Serve itself would wait forever."""
        problems = resource_problems(self.config, alive_node_resources())
        if not problems:
            return
        if self._ray_started:
            raise ConfigError("the local Ray cannot run this config:\n  " + "\n  ".join(problems))
        for problem in problems:
            self.echo(f"warning: {problem} (waiting for the cluster to add nodes)")

    def _deploy(self, model_dir: str, redis_url: str) -> None:
        from ray import serve

        if self.config.server.grpc_bearer_token is None:
            self.echo(
                f"warning: Ray Serve's gRPC proxy listens on all interfaces; port "
                f"{self.config.server.grpc_port} is open to anyone who can reach this host "
                "(set server.grpc_bearer_token or firewall it)"
            )
        from cluster.builder import APP_NAME, build_app, serve_options

        http, grpc = serve_options(self.config)
        serve.start(http_options=http, grpc_options=grpc)
        self._serve_started = True
        app = build_app(self.config, model_dir=model_dir, redis_url=redis_url)
        scaled = self.config.planner.enabled and self.config.planner.scaling
        serve.run_many(
            [
                serve.RunTarget(
                    target=app, name=APP_NAME, route_prefix="/", external_scaler_enabled=scaled
                )
            ],
            wait_for_ingress_deployment_creation=False,
            wait_for_applications_running=False,
        )
        pools = ", ".join(f"{p.name}({p.role.value}) x{p.replicas}" for p in self.config.pools)
        self.echo(f"serve: deploying router + {pools}")

    def _start_controller(self, redis_url: str) -> None:
        if not self.config.planner.enabled:
            return
        from cluster.builder import controller_settings
        from controller import actor

        actor.start(controller_settings(self.config, redis_url))
        self._controller_started = True
        self.echo(f"controller: started ({actor.actor_name(self.config.name)})")

    def _wait_ready(self, deadline: float) -> None:
        from ray import serve

        from cluster.builder import APP_NAME

        last = ""
        while True:
            if time.monotonic() > deadline:
                raise LaunchError(f"not ready in time (last status: {last or 'none'})")
            app = serve.status().applications.get(APP_NAME)
            if app is not None:
                parts = []
                for name, d in sorted(app.deployments.items()):
                    running = sum(
                        n for s, n in d.replica_states.items() if str(s).endswith("RUNNING")
                    )
                    parts.append(f"{name} {running}/{sum(d.replica_states.values())}")
                line = f"{app.status}: " + ", ".join(parts)
                if line != last:
                    self.echo(f"serve: {line}")
                    last = line
                if str(app.status).endswith("DEPLOY_FAILED"):
                    raise LaunchError(f"deployment failed: {app.message}")
                if str(app.status).endswith("RUNNING") and self._serving():
                    return
            time.sleep(1.0)

    def _serving(self) -> bool:
        token = self.config.server.grpc_bearer_token
        with Client(self.grpc_target, token=token.get_secret_value() if token else None) as c:
            if not c.healthy(timeout_s=5.0):
                return False
            try:
                state = c.cluster_status(timeout_s=5.0)
            except Exception:
                return False
        return state.ready

    # -- down ------------------------------------------------------------------------------

    def serve_until_signal(self) -> None:
        """Block until SIGINT or SIGTERM (main thread only)."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self._stopped.set())
        while not self._stopped.wait(1.0):
            pass

    def stop(self) -> None:
        """Tear everything down that this launcher started (idempotent)."""
        if self._controller_started:
            self._controller_started = False
            self.echo("controller: stopping")
            with contextlib.suppress(Exception):
                from controller import actor

                actor.stop(self.config.name)
        if self._serve_started:
            self._serve_started = False
            self.echo("serve: shutting down")
            with contextlib.suppress(Exception):
                from ray import serve

                from cluster.builder import APP_NAME

                if self._ray_started:
                    serve.shutdown()  # type: ignore[no-untyped-call]
                else:
                    serve.delete(APP_NAME)
        if self._ray_started:
            self._ray_started = False
            import ray

            with contextlib.suppress(Exception):
                ray.shutdown()
        if self._redis is not None:
            self.echo("redis: stopping the embedded server")
            self._redis.stop()
            self._redis = None
        elif self._redis_url is not None:
            self._purge(self._redis_url)
        with contextlib.suppress(FileNotFoundError):
            state = RunState.read(self.run_dir)
            if state is None or state.pid == os.getpid():
                (self.run_dir / STATE_FILE).unlink()

    def _purge(self, url: str) -> None:
        try:
            client = connect(url)
            try:
                n = Registry(client, self.config.name).purge()
            finally:
                client.close()
            self.echo(f"redis: removed {n} keys of cluster {self.config.name}")
        except Exception as e:
            logger.warning("purging cluster keys failed: %s", e)
