"""A cluster layout as the simulator and the search see it: pools of engine replicas,
each with a TP/PP shape, the router's disaggregation threshold and the engine limits.

A colocated layout has one pool that prefills and decodes; a disaggregated one has a
prefill pool and a decode pool, and the decode pool prefills prompts whose uncached
part is shorter than `threshold` itself (`threshold=0`: every prompt goes to the
prefill pool).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PoolShape:
    replicas: int
    tp: int = 1
    pp: int = 1

    def __post_init__(self) -> None:
        if min(self.replicas, self.tp, self.pp) < 1:
            raise ValueError(f"replicas, tp and pp must be >= 1, got {self}")

    @property
    def devices(self) -> int:
        return self.replicas * self.tp * self.pp

    @property
    def parallel(self) -> tuple[int, int]:
        return (self.tp, self.pp)

    def describe(self) -> str:
        shape = "" if self.parallel == (1, 1) else f"(tp{self.tp}pp{self.pp})"
        return f"{self.replicas}{shape}"


@dataclass(frozen=True)
class Layout:
    generating: PoolShape  # the decode pool, or the colocated pool
    prefill: PoolShape | None = None  # None: colocated
    threshold: int = 64  # uncached prompt tokens below this prefill on the decode pool
    max_batched_tokens: int = 2048  # one step's token budget (chunked prefill)
    max_num_seqs: int = 64  # sequences one replica runs at once
    prefill_max_batched_tokens: int | None = None  # prefill pool's budget; None: the same
    mixed_steps: bool = True  # decode tokens ride along prompt chunks (chunked prefill)

    def __post_init__(self) -> None:
        if self.threshold < 0:
            raise ValueError("threshold must be >= 0")
        if self.max_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_batched_tokens and max_num_seqs must be >= 1")
        if self.max_batched_tokens <= self.max_num_seqs and self.prefill is None:
            raise ValueError("max_batched_tokens must exceed max_num_seqs (room for prefill)")

    @property
    def colocated(self) -> bool:
        return self.prefill is None

    @property
    def devices(self) -> int:
        return self.generating.devices + (self.prefill.devices if self.prefill else 0)

    @property
    def prefill_budget(self) -> int:
        return self.prefill_max_batched_tokens or self.max_batched_tokens

    def describe(self) -> str:
        if self.prefill is None:
            return f"colocated x{self.generating.describe()}"
        return f"{self.prefill.describe()}P{self.generating.describe()}D threshold {self.threshold}"
