"""The measurements the engine benchmarks share: what one system's decode and prefill
runs yield, how rounds alternate the systems, and the prompts they run.

`benchmarks.engine` compares pdserve's engine with HF transformers with these;
`benchmarks.parallel` compares the engine's TP x PP layouts.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from benchmarks.common import Rate, Timing, wait_for_quiet
from benchmarks.engine_systems import Run, System

# Realistic text for the prompts; its content does not change the compute of a step.
CORPUS = (
    "The harbour town woke slowly. Fishing boats rocked against the pier while gulls "
    "argued over scraps, and the baker on Water Street pulled the first loaves from an "
    "oven that had been burning since four. Most visitors came for the lighthouse, a "
    "white tower built in 1871 after a winter storm sank three ships within sight of "
    "the shore. Its lens, ground in Paris, could throw a beam twenty miles out to sea. "
    "Today the light is automatic, but the keeper's cottage has become a small museum "
    "with logbooks, brass instruments and a faded photograph of the last keeper and "
    "his dog. In the afternoon the tide goes out so far that you can walk to the rocks "
    "where seals sleep in the sun. Local guides warn that the water returns faster "
    "than a person can run, and every summer someone learns this the hard way. "
    "A recipe from the museum's cookbook: soak dried beans overnight, simmer them with "
    "onion, bay leaf and smoked fish for two hours, then season with pepper and a "
    "spoon of vinegar. Serve with bread and a glass of cider. How should a city "
    "decide where to build new housing? Planners weigh transport links, schools, "
    "flood risk and the cost of land, but residents often care most about noise, "
    "parking and whether the character of their street will change. A good process "
    "publishes the data early, explains the trade-offs in plain language and gives "
    "people a real chance to change the outcome. Write a short function that returns "
    "the median of a list of numbers, and explain why sorting the list first makes "
    "the problem easy. Then describe what happens when the list is empty, and how the "
    "function should report that error to its caller without crashing the program."
)


@dataclass(frozen=True)
class DecodeResult:
    system: str
    batch: int
    out_len: int
    prompt_tokens: int  # summed over the rows, without padding
    total_s: Timing
    first_s: Timing
    decode_s: Timing  # total - first, per run
    step_s: Timing  # every decode step of every run: robust to bursts of load

    @property
    def e2e_tok_s(self) -> Rate:
        return self.total_s.rate(self.batch * self.out_len)

    @property
    def decode_tok_s(self) -> Rate:
        return self.decode_s.rate(self.batch * (self.out_len - 1))

    @property
    def step_tok_s(self) -> Rate:
        """Decode tok/s from the median (and fastest) single step."""
        return self.step_s.rate(self.batch)

    def as_json(self) -> dict[str, Any]:
        return {
            "system": self.system,
            "batch": self.batch,
            "out_len": self.out_len,
            "prompt_tokens": self.prompt_tokens,
            "e2e_output_tok_s": self.e2e_tok_s,
            "decode_only_tok_s": self.decode_tok_s,
            "step_median_tok_s": self.step_tok_s,
            "total_s": self.total_s,
            "time_to_first_token_s": self.first_s,
            "decode_s": self.decode_s,
            "decode_step_s": self.step_s,
        }


@dataclass(frozen=True)
class PrefillResult:
    system: str
    tokens: int
    seconds: Timing

    @property
    def tok_s(self) -> Rate:
        return self.seconds.rate(self.tokens)

    def as_json(self) -> dict[str, Any]:
        return {
            "system": self.system,
            "tokens": self.tokens,
            "tok_s": self.tok_s,
            "seconds": self.seconds,
        }


@dataclass(frozen=True)
class Agreement:
    """Greedy outputs of the two systems, compared row by row (a sanity check)."""

    rows: int
    identical_rows: int
    mean_common_prefix: float


@dataclass(frozen=True)
class Rounds:
    """How a measurement is repeated: one untimed warm-up run per system, then `repeats`
    rounds that alternate which system goes first. With `wait_quiet_s`, each timed run
    first waits (up to that long) for other processes to leave the CPUs alone."""

    repeats: int
    wait_quiet_s: float = 0.0

    def run(self, systems: list[System], fn: Callable[[System], Run]) -> dict[str, list[Run]]:
        for system in systems:
            fn(system)
        runs: dict[str, list[Run]] = {s.name: [] for s in systems}
        for r in range(self.repeats):
            for system in systems if r % 2 == 0 else systems[::-1]:
                if self.wait_quiet_s > 0:
                    wait_for_quiet(self.wait_quiet_s, window_s=1.0)
                runs[system.name].append(fn(system))
        return runs


def bench_decode(
    systems: list[System], prompts: list[list[int]], out_len: int, rounds: Rounds
) -> tuple[dict[str, DecodeResult], Agreement]:
    runs = rounds.run(systems, lambda s: s.decode(prompts, out_len))
    results = {}
    for name, rs in runs.items():
        steps = tuple(t for r in rs for t in r.step_s)
        results[name] = DecodeResult(
            system=name,
            batch=len(prompts),
            out_len=out_len,
            prompt_tokens=sum(len(p) for p in prompts),
            total_s=Timing(tuple(r.total_s for r in rs)),
            first_s=Timing(tuple(r.first_s for r in rs)),
            decode_s=Timing(tuple(r.total_s - r.first_s for r in rs)),
            step_s=Timing(steps),
        )
    a, b = (runs[s.name][0].tokens for s in systems)
    common = [_common_prefix(x, y) for x, y in zip(a, b, strict=True)]
    agreement = Agreement(len(a), sum(c == out_len for c in common), sum(common) / len(a))
    return results, agreement


def bench_prefill(
    systems: list[System], prompt: list[int], rounds: Rounds
) -> dict[str, PrefillResult]:
    runs = rounds.run(systems, lambda s: s.prefill(prompt))
    return {
        name: PrefillResult(name, len(prompt), Timing(tuple(r.total_s for r in rs)))
        for name, rs in runs.items()
    }


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def make_prompts(corpus: list[int], batch: int) -> list[list[int]]:
    """`batch` windows of the corpus, 32-64 tokens long, at different offsets."""
    prompts = []
    for row in range(batch):
        length = 32 + (row * 37 + 11) % 33
        offset = (row * 53) % (len(corpus) - length)
        prompts.append(corpus[offset : offset + length])
    return prompts


def long_prompt(corpus: list[int], length: int) -> list[int]:
    return list(itertools.islice(itertools.cycle(corpus), length))
