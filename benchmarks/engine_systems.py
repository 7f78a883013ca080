"""The two systems the engine benchmark drives, behind one interface.

`Ours` runs pdserve's engine through its stepwise API, so that a run can be split at
the first token and each decode step timed; `HF` runs transformers `generate` (with a
streamer that only timestamps) and a plain forward pass for the prefill. Both take
token ids and return a `Run`; each can also profile its own decode step.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from benchmarks.common import OpProfile, profile_ops
from engine import LLM, SamplingParams
from engine.cpu_linear import PackedLinear


@dataclass(frozen=True)
class Run:
    """One timed generation of a batch."""

    total_s: float
    first_s: float  # until every row had its first token
    tokens: list[list[int]]
    step_s: tuple[float, ...] = ()  # each decode step's time (after the first token)


class System(Protocol):
    name: str

    def decode(self, prompts: list[list[int]], out_len: int) -> Run: ...

    def prefill(self, prompt: list[int]) -> Run: ...

    def weight_bytes_per_step(self) -> int: ...

    def profile_decode_step(self, prompts: list[list[int]], steps: int = 5) -> OpProfile: ...


class Ours:
    name = "pdserve"

    def __init__(self, llm: LLM) -> None:
        self.engine = llm.engine
        self._ids = itertools.count()

    def decode(self, prompts: list[list[int]], out_len: int) -> Run:
        params = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)
        return self._run(prompts, params)

    def prefill(self, prompt: list[int]) -> Run:
        return self._run([prompt], SamplingParams(temperature=0, max_tokens=1))

    def weight_bytes_per_step(self) -> int:
        m = self.engine.model
        return decode_weight_bytes(m.layers, m.norm, m.lm_head)

    def profile_decode_step(self, prompts: list[list[int]], steps: int = 5) -> OpProfile:
        """`steps` decode steps of a running batch, after its prefill and 3 warm steps."""
        params = SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True)
        rids = self._add(prompts, params)
        try:
            for _ in range(4):
                self.engine.step()
            label = f"{self.name} decode step, batch {len(prompts)}"
            return profile_ops(label, self.engine.step, iterations=steps)
        finally:
            for rid in rids:
                self.engine.abort_request(rid)

    def _add(self, prompts: list[list[int]], params: SamplingParams) -> list[str]:
        rids = [f"bench-{next(self._ids)}" for _ in prompts]
        for rid, prompt in zip(rids, prompts, strict=True):
            self.engine.add_request(rid, prompt, params)
        return rids

    def _run(self, prompts: list[list[int]], params: SamplingParams) -> Run:
        engine = self.engine
        began = time.perf_counter()
        rids = self._add(prompts, params)
        started: set[str] = set()
        final: dict[str, list[int]] = {}
        first = 0.0
        steps: list[float] = []
        while engine.has_unfinished_requests():
            step_began = time.perf_counter()
            outs = engine.step()
            now = time.perf_counter()
            if first:
                steps.append(now - step_began)
            for out in outs:
                started.add(out.request_id)
                if out.finished:
                    final[out.request_id] = list(out.token_ids)
            if not first and len(started) == len(rids):
                first = now
        total = time.perf_counter() - began
        return Run(total, first - began, [final[r] for r in rids], tuple(steps))


class _TokenClock:
    """A `generate` streamer that only timestamps: put() comes once for the prompt,
    then once per generated token (for all rows at once)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


class HF:
    name = "hf"

    def __init__(self, model: Any, pad_token_id: int) -> None:
        self.model = model
        self.pad = pad_token_id

    def batch(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded input ids and attention mask."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        return ids, mask

    @torch.inference_mode()
    def decode(self, prompts: list[list[int]], out_len: int) -> Run:
        clock = _TokenClock()
        began = time.perf_counter()
        ids, mask = self.batch(prompts)
        out = self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=out_len,
            min_new_tokens=out_len,
            do_sample=False,
            pad_token_id=self.pad,
            streamer=clock,
        )
        total = time.perf_counter() - began
        tokens = out[:, ids.shape[1] :].tolist()
        stamps = clock.stamps  # [prompt, first token, second token, ...]
        steps = tuple(b - a for a, b in itertools.pairwise(stamps[1:]))
        return Run(total, stamps[1] - began, tokens, steps)

    @torch.inference_mode()
    def prefill(self, prompt: list[int]) -> Run:
        began = time.perf_counter()
        out = self.model(input_ids=torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
        token = int(out.logits[0, -1].argmax())
        total = time.perf_counter() - began
        return Run(total, total, [[token]])

    def weight_bytes_per_step(self) -> int:
        m = self.model
        return decode_weight_bytes(m.model.layers, m.model.norm, m.lm_head)

    def profile_decode_step(self, prompts: list[list[int]], steps: int = 5) -> OpProfile:
        """Forwards of one new token per row over a KV cache, as `generate`'s loop runs
        them (without its logits processors); rows must be of equal length."""
        with torch.inference_mode():
            ids = torch.tensor(prompts)
            out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
            token = out.logits[:, -1:].argmax(-1)

            def step() -> None:
                nonlocal token
                o = self.model(input_ids=token, past_key_values=cache, use_cache=True)
                token = o.logits[:, -1:].argmax(-1)

            for _ in range(3):
                step()
            label = f"{self.name} decode step, batch {len(prompts)}"
            return profile_ops(label, step, iterations=steps)


def decode_weight_bytes(layers: nn.Module, norm: nn.Module, lm_head: nn.Module) -> int:
    """Bytes of weights one decode step reads: every layer, the final norm, the LM head.

    The input embedding is a one-row lookup; with tied embeddings its matrix is read
    in full once, as the LM head. A linear packed for several paths counts once, as
    the plain weight it replaced: a step runs one of them.
    """

    def read(m: nn.Module) -> int:
        if isinstance(m, PackedLinear):
            return m.nbytes
        own = sum(p.nbytes for p in m.parameters(recurse=False))
        return own + sum(read(c) for c in m.children())

    return sum(read(m) for m in (layers, norm, lm_head))
