"""The matmul benchmark's shapes, measurement rows and table, on a tiny model."""

from __future__ import annotations

import json

import pytest

from benchmarks.matmul import CANDIDATES, Shape, main, measure_shape, model_shapes, table
from engine.cpu_kernels import load_kernels


def test_shapes_come_from_the_models_config(tiny_model_dir) -> None:
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    shapes = {s.name: (s.n, s.k) for s in model_shapes(str(tiny_model_dir))}
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    head_dim = hidden // cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    assert shapes["qkv"] == (hidden + 2 * kv * head_dim, hidden)
    assert shapes["gate_up"] == (2 * inter, hidden)
    assert shapes["down"] == (hidden, inter)
    assert shapes["lm_head"] == (cfg["vocab_size"], hidden)


@pytest.mark.parametrize("cpu", [False, True])
def test_a_shape_is_measured_for_every_candidate(cpu) -> None:
    kernels = load_kernels()
    assert kernels is not None
    rows = measure_shape(kernels, Shape("t", 40, 24), [1, 3], rounds=2, budget_s=0.001, cpu=cpu)
    assert [r.m for r in rows] == [1, 3]
    for r in rows:
        assert set(r.times) == set(CANDIDATES)
        assert all(len(t.samples) >= 6 for t in r.times.values())  # 3 a round at least
        assert r.ratio() > 0 and all(r.gflops(c)[0] >= r.gflops(c)[1] for c in CANDIDATES)
    text = table(rows, "title")
    assert text.splitlines()[0] == "title" and len(text.splitlines()) == 3 + len(rows)


def test_cpu_clock_needs_one_thread(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--clock", "cpu", "--threads", "2"])
    assert "--threads 1" in capsys.readouterr().err
