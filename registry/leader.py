"""Which controller acts: a lease in Redis that at most one holder has at a time.

    lease = Leadership(client, keys, holder_id, ttl_s)
    lease.hold()      take the lease if it is free, or renew it if this holder has it;
                      True while this holder has it. Call it more often than `ttl_s`.
    lease.release()   give it up at once, if this holder has it

A controller that restarts, or a second one that Serve starts while the first is still
stopping, waits until the lease is free (released, or expired `ttl_s` after its
holder's last `hold`) before it acts, so two never steer the same routing table.
"""

from __future__ import annotations

import redis

from registry.keys import Keyspace

# Renew only our own lease; take a free one.
_HOLD_LUA = """
local v = redis.call('GET', KEYS[1])
if v == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if v == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class Leadership:
    def __init__(self, client: redis.Redis, keys: Keyspace, holder: str, ttl_s: float) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s: must be positive, got {ttl_s}")
        self.holder = holder
        self._key = keys.controller
        self._ttl_ms = max(1, round(ttl_s * 1000))
        self._hold = client.register_script(_HOLD_LUA)
        self._release = client.register_script(_RELEASE_LUA)

    def hold(self) -> bool:
        return bool(self._hold(keys=[self._key], args=[self.holder, self._ttl_ms]))

    def release(self) -> bool:
        return bool(self._release(keys=[self._key], args=[self.holder]))
