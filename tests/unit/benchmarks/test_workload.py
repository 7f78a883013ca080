"""The synthetic workload the locustfile and the serving benchmark share: length specs,
named mixes, prompts and open-loop arrivals."""

from __future__ import annotations

import itertools
import random
import statistics

import pytest

from benchmarks.workload import FIRST_ORDINARY_ID, MIXES, LengthDist, Mix, arrival_offsets


@pytest.mark.parametrize(
    ("spec", "kind", "low", "high"),
    [
        ("fixed:64", "fixed", 64, 64),
        ("uniform:16:96", "uniform", 16, 96),
        ("lognormal:512:0.4:192:1280", "lognormal", 192, 1280),
        ("lognormal:100:1", "lognormal", 1, 800),
    ],
)
def test_parse_round_trips(spec: str, kind: str, low: int, high: int) -> None:
    d = LengthDist.parse(spec)
    assert (d.kind, d.low, d.high) == (kind, low, high)
    assert LengthDist.parse(d.spec) == d


@pytest.mark.parametrize(
    "spec", ["fixed", "fixed:0", "uniform:9:3", "lognormal:-1:1", "gauss:1:2", "uniform:a:b"]
)
def test_bad_specs_are_rejected(spec: str) -> None:
    with pytest.raises(ValueError):
        LengthDist.parse(spec)


def test_samples_stay_in_range_and_lognormal_centres_on_its_median() -> None:
    rng = random.Random(0)
    d = LengthDist.parse("lognormal:512:0.4:192:1280")
    xs = [d.sample(rng) for _ in range(4000)]
    assert min(xs) >= 192 and max(xs) <= 1280
    assert 480 < statistics.median(xs) < 545
    u = LengthDist.parse("uniform:16:20")
    assert {u.sample(rng) for _ in range(500)} == {16, 17, 18, 19, 20}


def test_every_named_mix_parses() -> None:
    for name in MIXES:
        assert Mix.named(name).name == name
    with pytest.raises(ValueError, match="unknown mix"):
        Mix.named("nope")


def test_build_replaces_one_side_of_a_mix() -> None:
    m = Mix.build("prompt-heavy", None, "fixed:8")
    assert m.output.spec == "fixed:8"
    assert m.prompt == Mix.named("prompt-heavy").prompt


def test_requests_are_unique_exact_and_fit_the_context() -> None:
    mix = Mix.parse("uniform:200:300", "fixed:100")
    reqs = mix.requests(50, random.Random(1), vocab_size=49152, max_model_len=256)
    assert all(len(r.prompt) + r.output_len <= 256 for r in reqs)
    assert all(len(r.prompt) == 156 for r in reqs)  # cut to fit: 256 - 100
    assert all(FIRST_ORDINARY_ID <= t < 49152 for r in reqs for t in r.prompt)
    assert len({r.prompt for r in reqs}) == 50
    again = mix.requests(50, random.Random(1), vocab_size=49152, max_model_len=256)
    assert again == reqs  # seeded: both benchmark modes get the same requests


@pytest.mark.parametrize("burstiness", [0.5, 1.0, 4.0])
def test_arrivals_have_the_rate_and_the_burstiness_sets_the_spread(burstiness: float) -> None:
    offsets = arrival_offsets(20000, rate=2.0, burstiness=burstiness, rng=random.Random(2))
    assert offsets[0] == 0.0
    gaps = [b - a for a, b in itertools.pairwise(offsets)]
    assert statistics.fmean(gaps) == pytest.approx(0.5, rel=0.05)
    cv = statistics.pstdev(gaps) / statistics.fmean(gaps)
    assert cv == pytest.approx(burstiness**-0.5, rel=0.08)


def test_arrival_arguments_are_checked() -> None:
    with pytest.raises(ValueError):
        arrival_offsets(3, rate=0.0, burstiness=1.0, rng=random.Random(0))
    assert arrival_offsets(3, rate=float("inf"), burstiness=1.0, rng=random.Random(0)) == [0.0] * 3
