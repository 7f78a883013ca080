"""The faults `benchmarks.faults` injects, each a function of the running `Bench` that
returns a note on what it did: kill the busiest decode replica, the prefill replica or
its rank-1 actor (both once a KV transfer is in flight), pause the embedded Redis, or
kill a router replica. `FAULTS` names them with their title, whether the router should
exclude an instance, and the cluster (A or B) they run on; `FULL` is each cluster at
full strength (pools' replicas, rank actors)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from benchmarks.fault_load import rank_actor_pids, replica_pids

if TYPE_CHECKING:
    from benchmarks.faults import Bench


def _wait_transfer(bench: Bench) -> None:
    (address,) = [a for pool, _, a in bench.instances() if pool == "prefill"]
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if bench.state("prefill", address).active_transfers > 0:
                return
        time.sleep(0.02)


def kill_decode(bench: Bench) -> str:
    decode = [(i, a) for pool, i, a in bench.instances() if pool == "decode"]
    streams = {a: bench.state("decode", a).num_streams for _, a in decode}
    victim = max(streams, key=lambda a: streams[a])
    os.kill(replica_pids("decode")[victim], signal.SIGKILL)
    return f"decode replica {victim} held {streams[victim]} streams"


def kill_prefill(bench: Bench) -> str:
    _wait_transfer(bench)
    (address,) = [a for pool, _, a in bench.instances() if pool == "prefill"]
    os.kill(replica_pids("prefill")[address], signal.SIGKILL)
    return "prefill rank 0 killed with a transfer in flight"


def kill_rank(bench: Bench) -> str:
    _wait_transfer(bench)
    (pid,) = rank_actor_pids()
    os.kill(pid, signal.SIGKILL)
    return "prefill rank 1 killed with a transfer in flight"


def pause_redis(bench: Bench) -> str:
    os.kill(bench.redis_pid, signal.SIGSTOP)
    try:
        time.sleep(bench.args.pause_s)
    finally:
        os.kill(bench.redis_pid, signal.SIGCONT)
    return f"redis-server paused {bench.args.pause_s:g} s"


def kill_router(bench: Bench) -> str:
    routers = replica_pids("router")
    victim = sorted(routers)[0]
    os.kill(routers[victim], signal.SIGKILL)
    return f"router replica {victim} killed ({len(routers)} running)"


# (name, kill, whether an instance should be excluded, cluster)
FAULTS: dict[str, tuple[str, Callable[[Bench], str], bool, str]] = {
    "decode": ("decode SIGKILL", kill_decode, True, "A"),
    "prefill": ("prefill SIGKILL during transfers", kill_prefill, True, "A"),
    "rank": ("prefill rank-1 actor SIGKILL", kill_rank, True, "A"),
    "redis": ("Redis paused (SIGSTOP)", pause_redis, False, "A"),
    "router": ("router replica SIGKILL (of 2)", kill_router, False, "B"),
}
FULL = {"A": ({"decode": 2, "prefill": 1}, 1), "B": ({"decode": 1, "prefill": 1}, 0)}
