"""A request inside the engine: its tokens, its blocks and its progress.

Lifecycle: WAITING -> RUNNING -> FINISHED, with RUNNING -> WAITING on preemption
(the blocks are dropped and everything is recomputed). On a decode instance of a
disaggregated cluster, a request can instead start in WAITING_FOR_REMOTE_KV, holding
blocks that a prefill instance is filling, and join RUNNING with its first token (or
go to WAITING, to be computed here, when the transfer fails).
`num_computed` counts the tokens whose K/V is in the cache; the tokens after it are
what the next step computes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

import torch

from engine.block_hash import ROOT_HASH, hash_block
from engine.sampling import SamplingParams, TokenLogprob
from engine.tokenizer import IncrementalDetokenizer


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    WAITING_FOR_REMOTE_KV = "waiting_for_remote_kv"
    FINISHED = "finished"


@dataclass
class Timings:
    arrival: float = field(default_factory=time.monotonic)
    first_scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None


class Sequence:
    def __init__(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        block_size: int,
        detok: IncrementalDetokenizer | None,
        generator: torch.Generator | None,
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.params = params
        self.output: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.status = Status.WAITING
        self.num_computed = 0
        self.num_cached_prompt_tokens = 0  # prefix-cache hits at first admission
        self.block_table: list[int] = []
        self.num_published_blocks = 0  # leading blocks already in the prefix cache
        # Without prefix caching: the full blocks it had computed when last preempted,
        # as (block id, pool generation), for its recompute to take back (BlockManager).
        self.retained_blocks: list[tuple[int, int]] = []
        self.finish_reason: str | None = None
        self.detok = detok
        self.generator = generator
        self.timings = Timings()
        self._block_size = block_size
        self._hashes: list[int] = []
        self._emitted_tokens = 0

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output if self.output else self.prompt

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def is_prefill(self) -> bool:
        return self.num_tokens - self.num_computed > 1 or not self.output

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def block_hashes(self, upto_tokens: int) -> list[int]:
        """Chained hashes of the full blocks among the first `upto_tokens` tokens."""
        n = upto_tokens // self._block_size
        if len(self._hashes) < n:
            toks = self.tokens
            parent = self._hashes[-1] if self._hashes else ROOT_HASH
            for b in range(len(self._hashes), n):
                parent = hash_block(parent, toks[b * self._block_size : (b + 1) * self._block_size])
                self._hashes.append(parent)
        return self._hashes[:n]

    def take_new_tokens(self) -> list[int]:
        new = self.output[self._emitted_tokens :]
        self._emitted_tokens = len(self.output)
        return new
