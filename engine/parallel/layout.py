"""Which part of the model a TP/PP rank owns.

Ranks are numbered `pp_rank * tp + tp_rank`. PP stage `s` owns layers
`[s * L/pp, (s+1) * L/pp)`. TP rank `t` owns query heads `[t * Hq/tp, ...)`, the
matching slice of the MLP and the vocabulary, and KV heads `[t * H/tp, ...)`, or, when
the model has fewer KV heads than TP ranks, the single head `t // (tp/H)` (replicated
on `tp/H` consecutive ranks). kv_transfer's M:N mapping uses the same rules.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.config import ModelConfig


@dataclass(frozen=True)
class ParallelLayout:
    tp: int = 1
    pp: int = 1
    rank: int = 0

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1:
            raise ValueError(f"tp and pp must be >= 1, got tp={self.tp} pp={self.pp}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside tp={self.tp} x pp={self.pp}")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def stage_ranks(self, pp_rank: int) -> list[int]:
        return [pp_rank * self.tp + t for t in range(self.tp)]

    def with_rank(self, rank: int) -> ParallelLayout:
        return ParallelLayout(self.tp, self.pp, rank)

    def check(self, cfg: ModelConfig) -> None:
        """Raise ValueError with the reason if this layout cannot shard `cfg`."""
        if cfg.num_heads % self.tp:
            raise ValueError(f"tp={self.tp} must divide the {cfg.num_heads} attention heads")
        h = cfg.num_kv_heads
        if h % self.tp and self.tp % h:
            raise ValueError(f"tp={self.tp} and the {h} KV heads: neither divides the other")
        if cfg.intermediate_size % self.tp:
            raise ValueError(f"tp={self.tp} must divide intermediate_size {cfg.intermediate_size}")
        if cfg.vocab_size % self.tp:
            raise ValueError(f"tp={self.tp} must divide vocab_size {cfg.vocab_size}")
        if self.pp > cfg.num_layers:
            raise ValueError(f"pp={self.pp} is greater than the {cfg.num_layers} layers")
        if cfg.num_layers % self.pp:
            raise ValueError(f"pp={self.pp} must divide the {cfg.num_layers} layers")

    def layers(self, cfg: ModelConfig) -> range:
        per = cfg.num_layers // self.pp
        return range(self.pp_rank * per, (self.pp_rank + 1) * per)

    def q_heads(self, cfg: ModelConfig) -> range:
        per = cfg.num_heads // self.tp
        return range(self.tp_rank * per, (self.tp_rank + 1) * per)

    def kv_heads(self, cfg: ModelConfig) -> range:
        h = cfg.num_kv_heads
        if h >= self.tp:
            per = h // self.tp
            return range(self.tp_rank * per, (self.tp_rank + 1) * per)
        head = self.tp_rank // (self.tp // h)
        return range(head, head + 1)

    def shard(self, size: int) -> range:
        """This TP rank's contiguous slice of a dimension split evenly across ranks."""
        per = size // self.tp
        return range(self.tp_rank * per, (self.tp_rank + 1) * per)
