"""What both pools run: the engine loop, the replica runtime, the calls every pool's
deployment answers alike (`worker.replica`), presence and heartbeats, the TP/PP rank
actors, and the router<->pool contract: `worker.messages` and `worker.errors`, leaves
that import nothing from the router or the cluster.

`prefill_worker` and `decode_worker` build their roles on these pieces; they never
import each other.
"""
