"""The measured choice of CPU path per row class, driven by injected timings: the pick,
the cache (hit, miss, foreign and corrupt files, busy hosts), forced kinds, the per-row
dispatch, and the fused decode gate."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence

import pytest
import torch
from hf_reference import assert_matches, hf_greedy
from torch import nn

from engine import SamplingParams
from engine.cpu_kernels import load_kernels
from engine.cpu_linear import (
    NativeLinear,
    OneDnnLinear,
    RoutedLinear,
    native_part,
    onednn_available,
    pack_linears,
)
from engine.decode_gate import gate_fused_decode, time_decode_steps
from engine.linear_choice import RowClasses, choose, fewest_copies, time_interleaved

QUIET = lambda: lambda: 0.0  # noqa: E731  # a busy meter that sees no other process
ROWS = {"one": 1, "decode": 32, "prefill": 512}


class Table:
    """A measurement read from a table of seconds, counting its calls."""

    def __init__(self, seconds: Mapping[str, Mapping[str, float]]) -> None:
        self.seconds = seconds
        self.calls: list[str] = []

    def __call__(self, cls: str, rows: int, candidates: Sequence[str]) -> dict[str, float]:
        self.calls.append(cls)
        return {c: self.seconds[cls][c] for c in candidates}


NATIVE_SMALL = Table(
    {
        "one": {"native": 1.0, "onednn": 2.0, "plain": 3.0},
        "decode": {"native": 5.0, "onednn": 4.0, "plain": 6.0},
        "prefill": {"native": 9.0, "onednn": 7.0, "plain": 8.0},
    }
)


def test_row_classes() -> None:
    c = RowClasses(32, 512)
    assert c.rows() == ROWS
    assert [c.class_of(r) for r in (1, 2, 32, 128, 129, 4096)] == [
        "one", "decode", "decode", "decode", "prefill", "prefill",
    ]  # fmt: skip
    assert RowClasses.for_engine(1, 2048).rows() == {"one": 1, "prefill": 512}
    assert RowClasses.for_engine(1, 2048).class_of(2) == "prefill"
    assert RowClasses.for_engine(64, 16).rows() == {"one": 1, "decode": 32}
    assert RowClasses.for_engine(64, 16).class_of(1000) == "decode"


def test_choose_picks_the_fastest_per_class_and_caches(tmp_path) -> None:
    table = Table(NATIVE_SMALL.seconds)
    cands = ("native", "onednn", "plain")
    path = tmp_path / "choice.json"
    got = choose("t", ROWS, cands, table, path, "k1", QUIET)
    assert got.picked == {"one": "native", "decode": "onednn", "prefill": "onednn"}
    assert not got.from_cache and table.calls == ["one", "decode", "prefill"]
    assert "decode: onednn (native 5000.00 ms" in got.describe()

    again = choose("t", ROWS, cands, table, path, "k1", QUIET)  # a hit: not measured
    assert again.from_cache and again.picked == got.picked and len(table.calls) == 3
    assert again.seconds["one"] == {"native": 1.0, "onednn": 2.0, "plain": 3.0}

    other = choose("t", ROWS, cands, table, path, "k2", QUIET)  # another key: a miss
    assert not other.from_cache and len(table.calls) == 6
    assert json.loads(path.read_text())["key"] == "k2"
    fewer = choose("t", ROWS, ("onednn", "plain"), table, path, "k2", QUIET)
    assert not fewer.from_cache  # a pick no longer a candidate invalidates the record


@pytest.mark.parametrize(
    "content",
    [
        "not json {",
        "[1, 2]",
        '{"version": 1, "key": "k", "picked": "native", "seconds": {}}',
        '{"version": 1, "key": "k", "picked": {"one": "fast"}, "seconds": {"one": {}}}',
        '{"version": 99, "key": "k", "picked": {"one": "plain"}, "seconds": {"one": {}}}',
        '{"version": 1, "key": "k", "picked": {"one": "plain"}, "seconds": {"one": [1]}}',
    ],
)
def test_a_corrupt_or_foreign_cache_file_is_measured_over(tmp_path, content) -> None:
    path = tmp_path / "choice.json"
    path.write_text(content)
    table = Table({"one": {"native": 2.0, "plain": 1.0}})
    got = choose("t", {"one": 1}, ("native", "plain"), table, path, "k", QUIET)
    assert not got.from_cache and got.picked == {"one": "plain"} and table.calls == ["one"]
    assert json.loads(path.read_text())["picked"] == {"one": "plain"}


def test_a_measurement_on_a_busy_host_is_not_cached(tmp_path) -> None:
    path = tmp_path / "choice.json"
    table = Table({"one": {"native": 2.0, "plain": 1.0}})
    choose("t", {"one": 1}, ("native", "plain"), table, path, "k", lambda: lambda: 1.5)
    assert not path.exists()


def test_a_measurement_naming_unknown_candidates_is_an_error(tmp_path) -> None:
    with pytest.raises(ValueError, match="no known candidate"):
        choose("t", {"one": 1}, ("a", "b"), lambda *_: {"c": 1.0}, None, "k", QUIET)


def test_time_interleaved_keeps_the_best_round_and_drops_the_hopeless() -> None:
    now = [0.0]
    durations: dict[str, Iterator[float]] = {
        "a": iter([9.0, 5.0, 4.0, 6.0, 4.5, 7.0]),  # warm-up first
        "b": iter([9.0, 2.0, 3.0, 1.5, 2.5, 2.0]),
        "slow": iter([9.0, 50.0, 50.0, 50.0, 50.0, 50.0]),
    }
    calls = dict.fromkeys(durations, 0)

    def fn(name: str):  # type: ignore[no-untyped-def]
        def run() -> None:
            calls[name] += 1
            now[0] += next(durations[name])

        return run

    best = time_interleaved({n: fn(n) for n in durations}, budget_s=1e9, clock=lambda: now[0])
    assert best == {"a": 4.0, "b": 1.5, "slow": 50.0}
    assert calls == {"a": 6, "b": 6, "slow": 2}  # warm-up, five rounds; slow: one round


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.SiLU(), nn.Linear(32, 8, bias=False))


needs_both = pytest.mark.skipif(
    load_kernels() is None or not onednn_available(torch.float32),
    reason="needs the native kernels and oneDNN",
)


@needs_both
def test_auto_routes_each_row_class_to_its_pick(tmp_path) -> None:
    model, table = tiny(), Table(NATIVE_SMALL.seconds)
    xs = {r: torch.randn(r, 16) for r in (1, 2, 32, 200, 600)}
    with torch.no_grad():
        want = {r: model(x) for r, x in xs.items()}
    packing = pack_linears(model, torch.float32, "auto", measure=table, cache_dir=tmp_path)
    assert packing.picked == {"one": "native", "decode": "onednn", "prefill": "onednn"}
    assert packing.kernels is not None and packing.extra_bytes > 0
    first = model[0]
    assert isinstance(first, RoutedLinear) and set(first.parts) == {"native", "onednn"}
    assert isinstance(native_part(first), NativeLinear)
    ran: list[str] = []
    for name, part in first.parts.items():
        part.register_forward_hook(lambda *_, name=name: ran.append(name))
    with torch.no_grad():
        for r, x in xs.items():
            torch.testing.assert_close(model(x), want[r], rtol=1e-5, atol=1e-5)
    assert ran == ["native", "onednn", "onednn", "onednn", "onednn"]

    again = tiny()
    pack_linears(again, torch.float32, "auto", measure=table, cache_dir=tmp_path)
    assert len(table.calls) == 3  # the second load read the cache


@needs_both
def test_one_pick_keeps_one_packing(tmp_path) -> None:
    model = tiny()
    table = Table({c: {"native": 1.0, "onednn": 2.0, "plain": 3.0} for c in ROWS})
    packing = pack_linears(model, torch.float32, "auto", measure=table, cache_dir=tmp_path)
    assert packing.paths == {"native"} and packing.extra_bytes == 0
    assert isinstance(model[0], NativeLinear) and isinstance(model[2], NativeLinear)


# A measurement like an AVX-512 host's on SmolLM2 (ms): each class's fastest differs.
SPREAD = {
    "one": {"native": 18.5, "onednn": 28.8, "plain": 18.2},
    "decode": {"native": 51.2, "onednn": 62.5, "plain": 199.2},
    "prefill": {"native": 255.0, "onednn": 228.2, "plain": 230.8},
}


def test_fewest_copies_keeps_another_path_only_for_a_gain_worth_it() -> None:
    # every class's fastest: three copies of the weights
    assert fewest_copies(0.0)(SPREAD) == {"one": "plain", "decode": "native", "prefill": "onednn"}
    # native serves one row 1.6% slower than plain, so plain's copy goes
    assert fewest_copies(0.10, "onednn")(SPREAD) == {
        "one": "native", "decode": "native", "prefill": "onednn",
    }  # fmt: skip
    # without the reference, plain may serve prefill (1.1% slower than oneDNN); native's
    # prefill (11.7% slower) stays outside a 10% bound, but inside a 20% one: then one
    # copy serves every class
    assert fewest_copies(0.10)(SPREAD) == {"one": "plain", "decode": "native", "prefill": "plain"}
    assert set(fewest_copies(0.20)(SPREAD).values()) == {"native"}
    # oneDNN bounds every class it measured: native is within 20% of prefill's fastest,
    # but slower than oneDNN there
    assert fewest_copies(0.20, "onednn")(SPREAD)["prefill"] == "onednn"
    with pytest.raises(ValueError, match="min_gain"):
        fewest_copies(-0.1)


def test_fewest_copies_prefers_the_set_that_loses_least() -> None:
    seconds = {
        "one": {"a": 1.0, "b": 1.05, "c": 1.04},
        "decode": {"a": 2.0, "b": 1.9, "c": 1.85},
    }
    # a alone misses decode's bound; b and c each serve both; c loses less in total
    assert fewest_copies(0.06)(seconds) == {"one": "c", "decode": "c"}
    # a class that measured only some candidates is served by one of those
    partial = {"one": {"a": 1.0}, "decode": {"a": 3.0, "b": 1.0}}
    assert fewest_copies(0.5)(partial) == {"one": "a", "decode": "b"}


def test_fewest_copies_holds_what_keep_names() -> None:
    # like a host where plain serves every class within 10%, but native is fastest at
    # a decode batch (where the fused decode layer would run on its packing)
    seconds = {
        "one": {"native": 10.73, "onednn": 16.12, "plain": 9.23},
        "decode": {"native": 27.47, "onednn": 32.01, "plain": 30.19},
        "prefill": {"native": 278.37, "onednn": 242.55, "plain": 247.26},
    }
    assert set(fewest_copies(0.10, "onednn")(seconds).values()) == {"plain", "onednn"}
    kept = fewest_copies(0.10, "onednn", keep=lambda _: {"native"})(seconds)
    assert kept == {"one": "plain", "decode": "native", "prefill": "onednn"}


def test_a_cached_choice_is_picked_again_under_the_callers_rule(tmp_path) -> None:
    table = Table(SPREAD)
    cache = tmp_path / "choice.json"
    first = choose("t", ROWS, ("native", "onednn", "plain"), table, cache, "k", QUIET)
    assert set(first.picked.values()) == {"plain", "native", "onednn"}
    again = choose(
        "t", ROWS, ("native", "onednn", "plain"), table, cache, "k", QUIET,
        pick=fewest_copies(0.10, "onednn"),
    )  # fmt: skip
    assert again.from_cache and len(table.calls) == 3
    assert again.picked == {"one": "native", "decode": "native", "prefill": "onednn"}


@needs_both
def test_auto_keeps_fewer_packings_for_small_gains(tmp_path) -> None:
    model = tiny()
    packing = pack_linears(model, torch.float32, "auto", measure=Table(SPREAD), cache_dir=tmp_path)
    assert packing.picked == {"one": "native", "decode": "native", "prefill": "onednn"}
    assert isinstance(model[0], RoutedLinear) and set(model[0].parts) == {"native", "onednn"}
    everything = pack_linears(
        tiny(), torch.float32, "auto", measure=Table(SPREAD), cache_dir=tmp_path / "x",
        min_gain=0.0,
    )  # fmt: skip
    assert everything.paths == {"native", "onednn", "plain"}
    assert everything.extra_bytes > packing.extra_bytes


@pytest.mark.parametrize("kind", ["native", "onednn", "plain"])
def test_forced_kinds_bypass_the_measurement(tmp_path, kind) -> None:
    if kind == "native" and load_kernels() is None:
        pytest.skip("no native kernels")
    if kind == "onednn" and not onednn_available(torch.float32):
        pytest.skip("no oneDNN")

    def refuse(*_: object) -> dict[str, float]:
        raise AssertionError("a forced kind must not be measured")

    model = tiny()
    packing = pack_linears(model, torch.float32, kind, measure=refuse, cache_dir=tmp_path)
    assert packing.paths == {kind}
    kinds = {"native": NativeLinear, "onednn": OneDnnLinear, "plain": nn.Linear}
    assert isinstance(model[0], kinds[kind]) and not list(tmp_path.iterdir())


@needs_both
def test_fused_decode_runs_only_where_it_measured_faster(
    make_llm, tiny_model_dir, tiny_hf, tmp_path
) -> None:
    llm = make_llm(tiny_model_dir, cpu_linear="native", max_num_seqs=8)
    model = llm.engine.runner.model
    assert model.fused_decode is not None and model.fused_rows == (True, True)
    classes = RowClasses(8, 512)
    table = Table({"one": {"fused": 2.0, "per-op": 1.0}, "decode": {"fused": 1.0, "per-op": 2.0}})
    gate_fused_decode(model, "native", classes, {}, measure=table, cache_dir=tmp_path)
    assert model.fused_rows == (True, True) and not table.calls  # forced: always fused
    gate_fused_decode(model, "auto", classes, {}, measure=table, cache_dir=tmp_path)
    assert model.fused_rows == (False, True) and table.calls == ["one", "decode"]
    gate_fused_decode(model, "auto", classes, {}, measure=table, cache_dir=tmp_path)
    assert len(table.calls) == 2  # cached

    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = [[5, 17, 300, 9], [44, 2, 1000]]
    for batch in ([prompts[0]], prompts):  # one row (op by op), then two (fused)
        outs = llm.generate(batch, greedy)
        for out, p in zip(outs, batch, strict=True):
            assert_matches(out.token_ids, hf_greedy(tiny_hf, p, 6), f"prompt {p}")


@needs_both
def test_the_real_measurements_run(make_llm, tiny_model_dir, tmp_path) -> None:
    llm = make_llm(tiny_model_dir, cpu_linear="native", max_num_seqs=4)
    model = llm.engine.runner.model
    fused = model.fused_decode
    seconds = time_decode_steps(model, budget_s=0.0)("decode", 4, ("fused", "per-op"))
    assert set(seconds) == {"fused", "per-op"} and all(s > 0 for s in seconds.values())
    assert model.fused_decode is fused  # put back after timing

    packing = pack_linears(tiny(), torch.float32, "auto", RowClasses(4, 16), cache_dir=tmp_path)
    assert set(packing.picked) == {"one", "decode", "prefill"}
    assert packing.paths <= {"native", "onednn", "plain"}
