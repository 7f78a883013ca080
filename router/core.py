"""The router's request pipeline, shared by the gRPC servicer and the OpenAI app.

session = await core.open(raw, names, protocol)
    admission (RESOURCE_EXHAUSTED beyond the bound, before any await: HTTP calls
    `admit` before reading the body, then `open(admitted=True)`), the cheap checks with the
    protocol's field names (the input's size bounded in characters first), then
    tokenization and the token limits in the router's tokenizer threads (never on the
    event loop), the prompt's block hashes, the routing decision and a server-side
    request id. Everything that can reject a request happens here,
    before anything reaches a pool, and raises RouterError. While the registry cannot
    be read (the view is older than `REGISTRY_STALE_S`), the KV rendezvous, which
    lives in the same Redis, cannot pair a transfer either: every prompt is then
    prefilled by its decode instance, from the last view.
async for delta in session.stream():
    the dispatcher runs the request on the chosen instances and streams deltas;
    the last one carries finish reason, usage and timings. A request whose decode
    instance fails before the first delta is retried on another one (router.retry); a
    stream that breaks after that moves to another one (router.migration).
    Every failure, expected or not, is raised as a RouterError, so that each front
    end can end the stream with its protocol's error.
session.close()
    releases the admission slot (the stream does it when it ends; closing twice is
    harmless), so a front end that fails between the two never leaks a slot.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from opentelemetry.trace import Span

from registry import Registry, Role, connect
from registry.traces import REQUEST_ID_ATTR, start_tracing
from router.admission import Admission, Demand
from router.breaker import CircuitBreaker
from router.cluster_view import ClusterView
from router.dispatch import Dispatcher
from router.drain import StoppedReplicas
from router.errors import ErrorKind, RouterError
from router.metrics import RouterMetrics
from router.migration import MigrationPolicy, Progress, with_migration
from router.pinning import probe_replica, watch_replica_deaths
from router.policy import LoadBalancedPolicy, NoInstanceAvailable, RouteDecision, RouteRequest
from router.request_ids import bind_request_id, new_request_id
from router.results import Delta
from router.settings import RouterSettings
from router.status import PoolStatus, pool_status
from router.tokenization import PromptEncoder
from router.validation import FieldNames, InvalidRequest, RawRequest, RequestValidator, ValidRequest
from telemetry import TraceContext, install_log_records, tracing

logger = logging.getLogger(__name__)

REGISTRY_STALE_S = 2.0  # a view older than this: Redis is unreachable


class Session:
    def __init__(
        self,
        core: RouterCore,
        request_id: str,
        request: ValidRequest,
        route: RouteDecision,
        arrival: float,
        arrival_wall: float,
        protocol: str,
        span: Span,
    ) -> None:
        self.request_id = request_id
        self.span = span  # the request's root span, ended by close()
        self.request = request
        self.route = route
        self._core = core
        self._arrival = arrival
        self._arrival_wall = arrival_wall
        self._protocol = protocol
        self._open = True

    async def stream(self) -> AsyncIterator[Delta]:
        core = self._core
        outcome = "cancelled"
        tag = self.request.client_tag
        try:
            migrating = with_migration(
                self._run, self._reroute, self.route, self._policy(), self._resumed()
            )
            async for delta in migrating:
                if delta.finish is not None:
                    e2e_s = time.monotonic() - self._arrival
                    core.metrics.finished(self._protocol, delta.finish, e2e_s)
                    core.demand.done(delta.finish)
                    outcome = ""
                    t = delta.finish.timings
                    logger.debug(
                        "request %s (tag %r) %s: ttft %.1f ms, %d tokens, %s",
                        self.request_id, tag, delta.finish.reason, t.ttft_ms,
                        delta.finish.usage.completion_tokens,
                        "disaggregated" if t.disaggregated else "colocated",
                    )  # fmt: skip
                yield delta
        except RouterError as e:
            outcome = e.kind.value
            logger.warning("request %s (tag %r) failed: %s", self.request_id, tag, e.message)
            tracing.mark_error(self.span, e.message)
            raise
        except Exception as e:  # a bug or an unexpected pool error: still a proper ending
            outcome = ErrorKind.INTERNAL.value
            logger.exception("request %s (tag %r) failed", self.request_id, tag)
            tracing.mark_error(self.span, f"internal error: {type(e).__name__}")
            raise RouterError(ErrorKind.INTERNAL, f"internal error: {type(e).__name__}") from e
        finally:
            if outcome:
                self.span.set_attribute("outcome", outcome)
                core.metrics.failed(self._protocol, outcome)
                core.demand.failed += 1
                if outcome == "cancelled":
                    logger.info("request %s (tag %r) cancelled", self.request_id, tag)
            self.close()

    def _resumed(self) -> Progress:
        """What the client has already: nothing, or the tokens and text of the stream
        it continues (`resume`), which the stream goes on after, as after a move."""
        r = self.request.resume
        return Progress(r.output_token_ids, r.text_chars_sent) if r is not None else Progress()

    def _policy(self) -> MigrationPolicy:
        s, m = self._core.settings, self._core.metrics
        return MigrationPolicy(
            s.max_migrations,
            s.max_dispatch_attempts,
            lambda e: m.retries.labels(e.kind.value).inc(),
            lambda e: m.migrations.labels(e.kind.value).inc(),
        )

    def _run(self, route: RouteDecision, progress: Progress) -> AsyncIterator[Delta]:
        self.route = route
        return self._core.dispatcher.run(
            self.request_id,
            self.request,
            route,
            self._arrival,
            self._arrival_wall,
            progress,
            self.span,
        )

    def _reroute(self, avoid: frozenset[str], progress: Progress) -> RouteDecision:
        """A route for the request, or for its prompt and tokens so far once migrating
        (their length decides disaggregation, their blocks the prefix-cache overlap)."""
        req = self.request
        if progress.token_ids:
            prompt = req.prompt_token_ids + progress.token_ids
            req = dataclasses.replace(req, prompt_token_ids=prompt, resume=None)
        return self._core.route(req, avoid)

    def close(self) -> None:
        if self._open:
            self._open = False
            self.span.end()
            self._core.admission.release()
            self._core.metrics.inflight.set(self._core.admission.inflight)


def log_refusal(rid: str, protocol: str, error: RouterError) -> None:
    """One WARNING line for a request refused before it ran (a client error, a full
    router, no instance): no traceback, since nothing went wrong in the router."""
    logger.warning(
        "request %s (%s) refused, %s: %s", rid, protocol, error.kind.value, error.message
    )


class RouterCore:
    def __init__(
        self,
        settings: RouterSettings,
        decode: Any,
        prefill: Any | None,
        identity: Mapping[str, str] | None = None,
    ) -> None:
        """`identity` labels the metrics this replica exports through Ray (pool,
        replica, rank)."""
        self.settings = settings
        install_log_records()
        self.metrics = RouterMetrics(
            identity, slo_ttft_s=settings.slo_ttft_s, slo_tpot_s=settings.slo_tpot_s
        )
        self.encoder = PromptEncoder(settings.model_dir, settings.block_size)
        self.validator = RequestValidator(settings.limits, self.encoder, settings.served_model)
        self._tokenize_pool = ThreadPoolExecutor(
            max_workers=settings.tokenizer_threads, thread_name_prefix="router-tokenize"
        )
        self._redis = connect(settings.redis_url, client_name=f"{settings.cluster}-router")
        registry = Registry(self._redis, settings.cluster, lease_ttl_s=settings.lease_ttl_s)
        self._registry = registry
        start_tracing(settings.tracing, self._redis, settings.cluster, "router")
        breaker = CircuitBreaker(on_trip=lambda kind: self.metrics.exclusions.labels(kind).inc())
        by_role = {Role.DECODE: decode, Role.PREFILL: prefill}
        pools = {p.name: by_role[p.role.routing_role] for p in settings.pools}
        self.view = ClusterView(
            registry,
            settings.view_refresh_interval_s,
            breaker,
            lambda info: probe_replica(pools.get(info.pool, by_role[info.role]), info.address),
            settings.probe_timeout_s,
        )
        self.demand = self._report_demand(registry)
        self.stopped = StoppedReplicas(settings.timeouts.drain_s)
        self._unwatch = watch_replica_deaths(
            lambda address: breaker.trip(address, "serve", "Serve dropped its replica")
        )
        self._unwatch_stopped = watch_replica_deaths(self.stopped.stopped)
        self.policy = LoadBalancedPolicy(settings.disaggregation_threshold)
        self.admission = Admission(settings.max_inflight_requests)
        self.dispatcher = Dispatcher(
            decode,
            prefill if settings.has_prefill_pool else None,
            self.view,
            settings.timeouts,
            self.metrics,
            self.stopped,
            {name: h for name, h in pools.items() if h is not None},
        )

    def _report_demand(self, registry: Registry) -> Demand:
        """This router's demand counters, reported at each refresh of the view."""
        demand = Demand(f"router-{uuid.uuid4().hex[:12]}")
        self.view.on_refresh.append(
            lambda: registry.routing.report_admission(demand.report(self.admission.inflight))
        )
        return demand

    async def start(self) -> None:
        await self.view.start()

    async def stop(self) -> None:
        self._unwatch()
        self._unwatch_stopped()
        await self.view.stop()
        try:
            await asyncio.to_thread(self._registry.routing.drop_admission, self.demand.router_id)
        except Exception as e:
            logger.warning("removing the admission report: %s", e)
        self._redis.close()
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)
        tracing.shutdown()

    async def open(
        self,
        raw: RawRequest,
        names: FieldNames,
        protocol: str,
        rid: str | None = None,
        parent: TraceContext | None = None,
        admitted: bool = False,
    ) -> Session:
        """A session for `raw` under the id `rid` (a new one when None); a refusal is
        logged as one WARNING line with the id and raised as a RouterError. `parent`: the
        client's trace context (its `traceparent`), whose sampled flag then decides.
        `admitted`: the caller took the admission slot (`admit`), which this now owns."""
        arrival, arrival_wall = time.monotonic(), time.time()
        rid = rid or new_request_id()
        bind_request_id(rid)
        if not admitted:
            self.admit(rid, protocol, parent)
        root = tracing.start(
            "request", parent, {REQUEST_ID_ATTR: rid, "protocol": protocol}, int(arrival_wall * 1e9)
        )
        try:
            req, route = await self._prepare(raw, names, root)
        except InvalidRequest as e:
            self.reject(protocol, ErrorKind.INVALID_ARGUMENT.value)
            error = RouterError(ErrorKind.INVALID_ARGUMENT, str(e), e.field)
            log_refusal(rid, protocol, error)
            tracing.end(root, error.message)
            raise error from None
        except RouterError as e:
            if e.kind in (ErrorKind.UNAVAILABLE, ErrorKind.RESOURCE_EXHAUSTED):
                self.demand.refused += 1
            self.reject(protocol, e.kind.value)
            log_refusal(rid, protocol, e)
            tracing.end(root, e.message)
            raise
        except BaseException as e:
            self.reject(protocol, ErrorKind.INTERNAL.value)
            tracing.end(root, type(e).__name__)
            raise
        return Session(self, rid, req, route, arrival, arrival_wall, protocol, root)

    def admit(self, rid: str, protocol: str, parent: TraceContext | None = None) -> None:
        """Take an admission slot, synchronously: a request past the bound is refused
        now (RESOURCE_EXHAUSTED: counted, logged, its root span ended), before it waits
        on anything."""
        self.demand.arrived += 1
        admitted = self.admission.try_acquire()
        self.metrics.admitted(admitted)
        if admitted:
            self.metrics.inflight.set(self.admission.inflight)
            return
        self.demand.refused += 1
        self.metrics.failed(protocol, ErrorKind.RESOURCE_EXHAUSTED.value)
        msg = f"the router holds {self.admission.max_inflight} requests; retry later"
        error = RouterError(ErrorKind.RESOURCE_EXHAUSTED, msg)
        log_refusal(rid, protocol, error)
        root = tracing.start("request", parent, {REQUEST_ID_ATTR: rid, "protocol": protocol})
        tracing.end(root, error.message)
        raise error

    async def _prepare(
        self, raw: RawRequest, names: FieldNames, root: Span
    ) -> tuple[ValidRequest, RouteDecision]:
        """Validate, tokenize (in a tokenizer thread, with this task's log context) and
        route, each in its span under `root`."""
        with tracing.span("validate", root):
            checked = self.validator.check(raw, names)
        with tracing.span("tokenize", root) as span:
            ctx = contextvars.copy_context()
            req = await asyncio.get_running_loop().run_in_executor(
                self._tokenize_pool, ctx.run, self.validator.finish, checked, names
            )
            span.set_attribute("tokens", len(req.prompt_token_ids))
        with tracing.span("route", root) as span:
            route = self.route(req)
            span.set_attribute("decode", route.decode.instance_id)
            if route.prefill is not None:
                span.set_attribute("prefill", route.prefill.instance_id)
        return req, route

    def reject(self, protocol: str, outcome: str) -> None:
        """Give back an admitted request's slot, unopened; counted under `outcome`."""
        self.admission.release()
        self.metrics.inflight.set(self.admission.inflight)
        self.metrics.failed(protocol, outcome)

    def route(self, req: ValidRequest, avoid: frozenset[str] = frozenset()) -> RouteDecision:
        """The routing decision over the current view, never to a decode instance whose
        address is in `avoid` (raises RouterError UNAVAILABLE when none is left)."""
        if req.resume is not None:  # the prompt the instances compute includes them
            prompt = req.prompt_token_ids + req.resume.output_token_ids
            req = dataclasses.replace(req, prompt_token_ids=prompt, resume=None)
        hashes = self.encoder.block_hashes(req.prompt_token_ids)
        decode = self.view.candidates(Role.DECODE, hashes, avoid)
        prefill = []
        if self.settings.has_prefill_pool and self.registry_readable():
            prefill = self.view.candidates(Role.PREFILL)
        request = RouteRequest(len(req.prompt_token_ids), self.settings.block_size)
        threshold = self.view.threshold  # the controller's, when it set one
        self.policy.threshold = (
            threshold if threshold is not None else self.settings.disaggregation_threshold
        )
        try:
            decision = self.policy.route(request, decode, prefill)
        except NoInstanceAvailable as e:
            raise RouterError(ErrorKind.UNAVAILABLE, str(e)) from None
        self.metrics.routed(decision, self.policy.threshold)
        return decision

    # -- cluster-level queries -----------------------------------------------------------

    def registry_readable(self) -> bool:
        """The view was refreshed from Redis within `REGISTRY_STALE_S` (or a few refresh
        intervals, if longer)."""
        stale_s = max(REGISTRY_STALE_S, 10 * self.settings.view_refresh_interval_s)
        return time.monotonic() - self.view.last_refresh < stale_s

    def healthy(self) -> bool:
        """A recent view of the registry with at least one live decode instance."""
        fresh = time.monotonic() - self.view.last_refresh < max(
            5.0, 5 * self.settings.view_refresh_interval_s
        )
        return fresh and self.view.has_role(Role.DECODE)

    def status(self) -> list[PoolStatus]:
        return pool_status(self.view, self.settings.pools)
