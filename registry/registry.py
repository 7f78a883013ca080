"""The cluster registry in Redis: instance leases, load reports, prefix-block index.

Lifecycle of an instance, as the registry sees it:

1. `register(info)` writes the lease (`InstanceInfo` JSON with a TTL) and adds the id
   to the cluster's index set. Re-registering is harmless.
2. A `Heartbeat` (`start_heartbeat`) calls `refresh` every few seconds: one MULTI that
   rewrites the lease, extends the prefix set's TTL and optionally writes a load report.
3. While live it reports load (`report_load`) and publishes prefix-block add/evict
   events (`publish_blocks`). Readers call `live_instances`, `loads` and `overlap`.
4. `deregister` deletes the lease, load report and prefix set and publishes a CLEAR
   event. An instance that stops heartbeating instead leaves `live_instances` when its
   lease expires (within one TTL); the next `live_instances` call prunes the index,
   deletes its leftovers and publishes the CLEAR event.

All keys live under `pdserve:<cluster>:` (see `keys.py`). Every call is bounded by
the client's socket timeout; build clients with `registry.connect`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import redis
from pydantic import ValidationError

from registry.client import require_timeout, text
from registry.heartbeat import Heartbeat
from registry.keys import Keyspace
from registry.loads import LoadStore
from registry.prefix_index import PrefixEventReader, PrefixIndex
from registry.routing import RoutingTable
from registry.types import INSTANCE_CODEC, InstanceInfo, LoadReport, PrefixOp

logger = logging.getLogger(__name__)

DEFAULT_LEASE_TTL_S = 10.0
DEFAULT_EVENTS_MAXLEN = 100_000

# Live leases in one atomic step, pruning ids whose lease expired. KEYS[1]: the index,
# KEYS[2]: the prefix event stream; ARGV: lease, load and prefix-set key prefixes, and
# the stream's approximate max length.
_LIST_LIVE_LUA = """
local live = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local info = redis.call('GET', ARGV[1] .. id)
  if info then
    table.insert(live, info)
  else
    redis.call('SREM', KEYS[1], id)
    redis.call('DEL', ARGV[2] .. id, ARGV[3] .. id)
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*',
               'instance', id, 'op', 'clear', 'hashes', '')
  end
end
return live
"""


class Registry:
    def __init__(
        self,
        client: redis.Redis,
        cluster: str,
        *,
        lease_ttl_s: float = DEFAULT_LEASE_TTL_S,
        events_maxlen: int = DEFAULT_EVENTS_MAXLEN,
    ) -> None:
        if lease_ttl_s <= 0:
            raise ValueError("lease_ttl_s must be positive")
        if events_maxlen < 1:
            raise ValueError("events_maxlen must be >= 1")
        require_timeout(client)
        self._client = client
        self.keys = Keyspace(cluster)
        self.lease_ttl_s = lease_ttl_s
        self._ttl_ms = max(1, round(lease_ttl_s * 1000))
        self._events_maxlen = events_maxlen
        self.load_store = LoadStore(client, self.keys, self._ttl_ms)
        self.prefix_index = PrefixIndex(client, self.keys, self._ttl_ms, events_maxlen)
        self.routing = RoutingTable(client, self.keys, self._ttl_ms)
        self._list_live = client.register_script(_LIST_LIVE_LUA)

    @property
    def cluster(self) -> str:
        return self.keys.cluster

    # -- instances ---------------------------------------------------------------

    def register(self, info: InstanceInfo) -> None:
        self.refresh(info)

    def refresh(self, info: InstanceInfo, load: LoadReport | None = None) -> bool:
        """Write the lease with a fresh TTL (and the load report, if given). Returns
        whether the lease was still live before this call."""
        instance_id = info.instance_id
        pipe = self._client.pipeline(transaction=True)
        pipe.set(
            self.keys.instance(instance_id), INSTANCE_CODEC.encode(info), px=self._ttl_ms, get=True
        )
        pipe.sadd(self.keys.instances, instance_id)
        self.prefix_index.queue_refresh(pipe, instance_id)
        if load is not None:
            self.load_store.queue_report(pipe, instance_id, load)
        previous = pipe.execute()[0]
        return previous is not None

    def deregister(self, instance_id: str) -> None:
        """Remove the instance and everything it published. Idempotent."""
        pipe = self._client.pipeline(transaction=True)
        pipe.delete(self.keys.instance(instance_id), self.keys.load(instance_id))
        pipe.srem(self.keys.instances, instance_id)
        self.prefix_index.queue_clear(pipe, instance_id)
        pipe.execute()
        logger.info("deregistered %s from cluster %s", instance_id, self.cluster)

    def live_instances(self, pool: str | None = None) -> list[InstanceInfo]:
        """Instances whose lease is live, sorted by id; optionally of one pool."""
        raw = self._list_live(
            keys=[self.keys.instances, self.keys.prefix_events],
            args=[
                self.keys.instance_prefix,
                self.keys.load_prefix,
                self.keys.prefix_set_prefix,
                self._events_maxlen,
            ],
        )
        out: list[InstanceInfo] = []
        for value in raw:
            try:
                info = INSTANCE_CODEC.decode(text(value))
            except ValidationError:
                logger.warning("ignoring malformed lease in cluster %s", self.cluster)
                continue
            if pool is None or info.pool == pool:
                out.append(info)
        return sorted(out, key=lambda i: i.instance_id)

    def start_heartbeat(
        self,
        info: InstanceInfo,
        *,
        interval_s: float | None = None,
        load_fn: Callable[[], LoadReport] | None = None,
        on_reregistered: Callable[[], None] | None = None,
    ) -> Heartbeat:
        """Register `info` and keep its lease fresh (every TTL/3 by default)."""
        return Heartbeat(
            self,
            info,
            interval_s=interval_s if interval_s is not None else self.lease_ttl_s / 3,
            load_fn=load_fn,
            on_reregistered=on_reregistered,
        ).start()

    # -- load reports --------------------------------------------------------------

    def report_load(self, instance_id: str, load: LoadReport) -> None:
        self.load_store.report(instance_id, load)

    def loads(self, instance_ids: Sequence[str] | None = None) -> dict[str, LoadReport]:
        return self.load_store.all(instance_ids)

    # -- prefix-block index ----------------------------------------------------------

    def publish_blocks(self, instance_id: str, op: PrefixOp, block_hashes: Sequence[int]) -> None:
        self.prefix_index.publish(instance_id, op, block_hashes)

    def overlap(
        self, block_hashes: Sequence[int], instance_ids: Sequence[str] | None = None
    ) -> dict[str, int]:
        return self.prefix_index.overlap(block_hashes, instance_ids)

    def prefix_events(self) -> PrefixEventReader:
        return PrefixEventReader(self.prefix_index)

    # -- namespace -------------------------------------------------------------------

    def namespace_keys(self) -> set[str]:
        """Every key under this cluster's prefix (SCAN, so it does not block Redis)."""
        return {text(k) for k in self._client.scan_iter(match=self.keys.pattern, count=500)}

    def purge(self) -> int:
        """Delete every key of this cluster (for `pdserve down` on a shared Redis)."""
        keys = sorted(self.namespace_keys())
        if not keys:
            return 0
        deleted: int = self._client.unlink(*keys)
        logger.info("purged %d keys of cluster %s", deleted, self.cluster)
        return deleted
