"""The router's picture of the cluster, refreshed from Redis in the background.

Every `refresh_interval_s` a background task reads, in a worker thread (the registry
client blocks): the live instances (leases), their load reports, and the prefix-block
events since the previous read (the first read takes a snapshot; a trimmed stream
takes a new one). Requests never wait on Redis: `candidates()` combines the latest
picture with what this router sent each instance since its report (`sent`/`done`),
so a burst between two reports does not pile onto one instance.

The routing table (`registry.routing`) is read in the same round: a switchable
instance takes the role it gives (a flip by the controller), and the disaggregation
threshold it sets replaces the config's (`threshold`; None: the config's).

Instances the router saw fail (`failed`, fed by the dispatcher and by Serve's replica
deaths) leave the candidates at once through a `CircuitBreaker`, long before their
lease expires. After each refresh, an excluded instance whose load report (its
heartbeat) is newer than its exclusion gets one probe (`prober`, bounded by
`probe_timeout_s`); it returns to the candidates when the probe succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from redis.exceptions import RedisError

from registry import (
    InstanceInfo,
    LoadReport,
    PrefixEvent,
    PrefixEventGap,
    PrefixEventReader,
    PrefixOp,
    PrefixSnapshot,
    Registry,
    Role,
    RoutingState,
)
from router.breaker import CircuitBreaker
from router.policy import Candidate
from router.worker_errors import is_instance_failure

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Sent:
    wall: float  # time.time() when sent
    prefill_tokens: int


@dataclass(frozen=True)
class InstanceView:
    info: InstanceInfo
    load: LoadReport | None


Prober = Callable[[InstanceInfo], Awaitable[object]]  # raises when the instance is down


class ClusterView:
    def __init__(
        self,
        registry: Registry,
        refresh_interval_s: float,
        breaker: CircuitBreaker | None = None,
        prober: Prober | None = None,
        probe_timeout_s: float = 1.0,
    ) -> None:
        self._registry = registry
        self._interval_s = refresh_interval_s
        self.breaker = breaker if breaker is not None else CircuitBreaker()
        self._prober = prober
        self._probe_timeout_s = probe_timeout_s
        self._probes: set[asyncio.Task[None]] = set()
        self._instances: list[InstanceInfo] = []
        self._loads: dict[str, LoadReport] = {}
        self._blocks: dict[str, set[int]] = {}
        self._reader: PrefixEventReader | None = None
        self._sent: dict[str, dict[str, _Sent]] = {}
        self._task: asyncio.Task[None] | None = None
        self.threshold: int | None = None  # the routing table's; None: the config's
        self.on_refresh: list[Callable[[], None]] = []  # worker thread, after each read
        self.last_refresh = 0.0  # time.monotonic() of the last successful refresh

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        tasks = [*self._probes, *([self._task] if self._task is not None else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._task = None

    @property
    def refreshing(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self.refresh()

    async def refresh(self) -> None:
        try:
            instances, loads, routing, snapshot, events = await asyncio.to_thread(self._read)
        except (RedisError, OSError) as e:
            logger.warning("cluster view refresh failed: %s", e)
            return
        if snapshot is not None:
            self._blocks = {k: set(v) for k, v in snapshot.blocks.items()}
        for ev in events:
            if ev.op is PrefixOp.ADD:
                self._blocks.setdefault(ev.instance_id, set()).update(ev.block_hashes)
            elif ev.op is PrefixOp.EVICT:
                self._blocks.get(ev.instance_id, set()).difference_update(ev.block_hashes)
            else:
                self._blocks.pop(ev.instance_id, None)
        self._instances = [_routed(i, routing) for i in instances]
        self._loads, self.threshold = loads, routing.threshold
        self.last_refresh = time.monotonic()
        self._review_exclusions()

    # -- failures -------------------------------------------------------------------------

    def failed(self, address: str, error: BaseException, what: str) -> None:
        """A call to the instance at `address` raised `error`: exclude the instance if
        the error says it is dead or unreachable."""
        if is_instance_failure(error):
            self.breaker.trip(address, "call", f"{what}: {type(error).__name__}: {error}")

    def _review_exclusions(self) -> None:
        self.breaker.forget(i.address for i in self._instances)
        if self._prober is None:
            return
        for info in self._instances:
            load = self._loads.get(info.instance_id)
            if self.breaker.probe_due(info.address, load.ts if load is not None else None):
                task = asyncio.get_running_loop().create_task(self._probe(info))
                self._probes.add(task)
                task.add_done_callback(self._probes.discard)

    async def _probe(self, info: InstanceInfo) -> None:
        assert self._prober is not None
        try:
            await asyncio.wait_for(self._prober(info), self._probe_timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.breaker.probed(info.address, False, f"{type(e).__name__}: {e}")
        else:
            self.breaker.probed(info.address, True)

    def _read(
        self,
    ) -> tuple[
        list[InstanceInfo],
        dict[str, LoadReport],
        RoutingState,
        PrefixSnapshot | None,
        list[PrefixEvent],
    ]:
        """Worker thread: one round of Redis reads (one refresh runs at a time)."""
        reg = self._registry
        instances = reg.live_instances()
        loads = reg.loads([i.instance_id for i in instances])
        routing = reg.routing.read()
        for hook in self.on_refresh:
            try:
                hook()
            except (RedisError, OSError) as e:
                logger.warning("cluster view refresh hook failed: %s", e)
        if self._reader is not None:
            try:
                return instances, loads, routing, None, self._reader.poll()
            except PrefixEventGap:
                logger.info("prefix events were trimmed; taking a new snapshot")
        reader = reg.prefix_events()
        snapshot = reader.sync()
        self._reader = reader
        return instances, loads, routing, snapshot, []

    # -- what requests read -------------------------------------------------------------

    def instances(self) -> list[InstanceView]:
        return [InstanceView(i, self._loads.get(i.instance_id)) for i in self._instances]

    def has_role(self, role: Role) -> bool:
        """A live instance of the role that is not excluded."""
        out = self.breaker.excluded_addresses()
        return any(i.role is role and i.address not in out for i in self._instances)

    def candidates(
        self, role: Role, block_hashes: Sequence[int] = (), avoid: frozenset[str] = frozenset()
    ) -> list[Candidate]:
        """Live instances of the role, less excluded ones and the addresses in `avoid`."""
        out = []
        skip = self.breaker.excluded_addresses() | avoid
        for info in self._instances:
            if info.role is not role or info.address in skip:
                continue
            load = self._loads.get(info.instance_id)
            since = load.ts if load is not None else 0.0
            recent = [s for s in self._sent.get(info.instance_id, {}).values() if s.wall > since]
            held = self._blocks.get(info.instance_id)
            cached = 0
            if held:
                for h in block_hashes:
                    if h not in held:
                        break
                    cached += 1
            out.append(
                Candidate(
                    instance_id=info.instance_id,
                    address=info.address,
                    queued_prefill_tokens=(load.queued_prefill_tokens if load else 0)
                    + sum(s.prefill_tokens for s in recent),
                    running_seqs=(load.running_seqs if load else 0) + len(recent),
                    free_blocks=load.free_kv_blocks if load else None,
                    cached_blocks=cached,
                    tp=info.tp,
                    pp=info.pp,
                    pool=info.pool,
                )
            )
        return out

    def sent(self, instance_id: str, request_id: str, prefill_tokens: int) -> None:
        self._sent.setdefault(instance_id, {})[request_id] = _Sent(time.time(), prefill_tokens)

    @property
    def num_sent(self) -> int:
        """Requests sent to some instance and not done there (for leak checks)."""
        return sum(len(sent) for sent in self._sent.values())

    def done(self, instance_id: str, request_id: str) -> None:
        sent = self._sent.get(instance_id)
        if sent is not None:
            sent.pop(request_id, None)
            if not sent:
                del self._sent[instance_id]


def _routed(info: InstanceInfo, routing: RoutingState) -> InstanceInfo:
    """The instance with the role the routing table gives it (switchable ones only)."""
    role = routing.roles.get(info.instance_id)
    if role is None or role is info.role or not info.switchable:
        return info
    return dataclasses.replace(info, role=role)
