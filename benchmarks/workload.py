"""Synthetic serving workloads: prompt and output lengths, the prompts themselves, and
when requests arrive. The locustfile (tests/load/) and the goodput benchmark
(benchmarks/serving.py) draw from these same definitions.

    mix = Mix.named("prompt-heavy")          # or Mix.parse("fixed:512", "uniform:16:64")
    requests = mix.requests(30, rng, vocab_size=49152, max_model_len=2048)
    offsets = arrival_offsets(30, rate=0.2, burstiness=1.0, rng=rng)

A length distribution is a spec string:

* `fixed:N`: always N tokens;
* `uniform:LO:HI`: uniform on [LO, HI];
* `lognormal:MEDIAN:SIGMA[:LO:HI]`: exp(N(ln MEDIAN, SIGMA)), rounded and clipped to
  [LO, HI] (default [1, 8 * MEDIAN]). A heavy right tail, the shape that chat
  traces such as ShareGPT show for both prompts and outputs.

Named mixes (`MIXES`) pair a prompt and an output distribution. `sharegpt` imitates the
shape of ShareGPT's length histograms (inputs and outputs of similar size, long tails);
it is synthetic, not fitted to the data set, which is not available offline.
`prompt-heavy` has long prompts and short outputs, where prefill dominates;
`decode-heavy` the reverse, short prompts and long outputs.

Prompts are random token ids drawn from the vocabulary above the special-token range,
so every prompt is unique (no prefix-cache hits between requests) and has exactly the
sampled length. Requests ask for exactly their output length (`ignore_eos`).

Arrivals are open loop: inter-arrival gaps are Gamma(shape=burstiness,
mean=1/rate). Burstiness 1 is a Poisson process; below 1 requests come in bursts,
above 1 they come more evenly.

Only the standard library is used, so locust's processes can import this module.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

FIRST_ORDINARY_ID = 1000  # token ids below this are left out of random prompts (specials)


@dataclass(frozen=True)
class LengthDist:
    """A distribution of token counts; build one with `LengthDist.parse(spec)`."""

    kind: str  # fixed | uniform | lognormal
    low: int
    high: int
    median: float = 0.0
    sigma: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("fixed", "uniform", "lognormal"):
            raise ValueError(f"unknown length distribution {self.kind!r}")
        if not 1 <= self.low <= self.high:
            raise ValueError(f"{self.spec}: need 1 <= low <= high")
        if self.kind == "lognormal" and (self.median <= 0 or self.sigma < 0):
            raise ValueError(f"{self.spec}: need median > 0 and sigma >= 0")

    @classmethod
    def parse(cls, spec: str) -> LengthDist:
        kind, _, rest = spec.strip().partition(":")
        try:
            args = [float(x) for x in rest.split(":")] if rest else []
        except ValueError:
            raise ValueError(f"length spec {spec!r}: arguments must be numbers") from None
        if kind == "fixed" and len(args) == 1:
            return cls("fixed", int(args[0]), int(args[0]))
        if kind == "uniform" and len(args) == 2:
            return cls("uniform", int(args[0]), int(args[1]))
        if kind == "lognormal" and len(args) in (2, 4):
            median, sigma = args[0], args[1]
            low, high = (int(args[2]), int(args[3])) if len(args) == 4 else (1, int(8 * median))
            return cls("lognormal", low, high, median, sigma)
        raise ValueError(
            f"length spec {spec!r}: expected fixed:N, uniform:LO:HI or "
            "lognormal:MEDIAN:SIGMA[:LO:HI]"
        )

    @property
    def spec(self) -> str:
        if self.kind == "fixed":
            return f"fixed:{self.low}"
        if self.kind == "uniform":
            return f"uniform:{self.low}:{self.high}"
        return f"lognormal:{self.median:g}:{self.sigma:g}:{self.low}:{self.high}"

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return self.low
        if self.kind == "uniform":
            return rng.randint(self.low, self.high)
        value = round(math.exp(rng.gauss(math.log(self.median), self.sigma)))
        return min(self.high, max(self.low, value))


@dataclass(frozen=True)
class Request:
    """One synthetic request: its prompt's token ids and how many tokens to generate."""

    prompt: tuple[int, ...]
    output_len: int


@dataclass(frozen=True)
class Mix:
    prompt: LengthDist
    output: LengthDist
    name: str = "custom"

    @classmethod
    def parse(cls, prompt_spec: str, output_spec: str) -> Mix:
        return cls(LengthDist.parse(prompt_spec), LengthDist.parse(output_spec))

    @classmethod
    def named(cls, name: str) -> Mix:
        try:
            prompt_spec, output_spec = MIXES[name]
        except KeyError:
            raise ValueError(f"unknown mix {name!r}; known: {', '.join(MIXES)}") from None
        return cls(LengthDist.parse(prompt_spec), LengthDist.parse(output_spec), name)

    @classmethod
    def build(cls, name: str | None, prompt_spec: str | None, output_spec: str | None) -> Mix:
        """A named mix (default `prompt-heavy`) with either side replaced by a spec."""
        base = cls.named(name or "prompt-heavy")
        if prompt_spec is None and output_spec is None:
            return base
        return cls(
            LengthDist.parse(prompt_spec) if prompt_spec else base.prompt,
            LengthDist.parse(output_spec) if output_spec else base.output,
            "custom",
        )

    def describe(self) -> str:
        return f"{self.name} (prompt {self.prompt.spec}, output {self.output.spec})"

    def request(
        self, rng: random.Random, vocab_size: int, max_model_len: int | None = None
    ) -> Request:
        """One request; with `max_model_len`, the prompt is cut so prompt + output fit."""
        output_len = self.output.sample(rng)
        prompt_len = self.prompt.sample(rng)
        if max_model_len is not None:
            output_len = min(output_len, max_model_len - 1)
            prompt_len = max(1, min(prompt_len, max_model_len - output_len))
        return Request(random_prompt(prompt_len, vocab_size, rng), output_len)

    def requests(
        self, n: int, rng: random.Random, vocab_size: int, max_model_len: int | None = None
    ) -> list[Request]:
        return [self.request(rng, vocab_size, max_model_len) for _ in range(n)]


MIXES: dict[str, tuple[str, str]] = {
    "prompt-heavy": ("lognormal:512:0.4:192:1280", "lognormal:48:0.3:24:96"),
    "sharegpt": ("lognormal:160:1.0:8:1536", "lognormal:140:0.9:8:512"),
    "short": ("uniform:16:96", "fixed:16"),
    "decode-heavy": ("lognormal:96:0.4:32:256", "lognormal:320:0.3:128:640"),
}


def random_prompt(length: int, vocab_size: int, rng: random.Random) -> tuple[int, ...]:
    if vocab_size <= FIRST_ORDINARY_ID:
        raise ValueError(f"vocab_size must exceed {FIRST_ORDINARY_ID}")
    return tuple(rng.randrange(FIRST_ORDINARY_ID, vocab_size) for _ in range(length))


def arrival_offsets(n: int, rate: float, burstiness: float, rng: random.Random) -> list[float]:
    """Send times in seconds from the start for `n` open-loop requests at `rate` per second.

    Gaps are Gamma(shape=burstiness, scale=1/(rate*burstiness)): mean 1/rate for every
    burstiness, coefficient of variation 1/sqrt(burstiness). `rate=inf` sends all at once.
    """
    if rate <= 0 or burstiness <= 0:
        raise ValueError("rate and burstiness must be > 0")
    if math.isinf(rate):
        return [0.0] * n
    t = 0.0
    out = []
    for _ in range(n):  # the first request goes out at once
        out.append(t)
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
    return out
