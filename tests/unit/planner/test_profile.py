"""Profiles: fits recover known coefficients, files round-trip and reject bad fields,
and a real (small) measurement on the tiny model and both transports yields a
profile the simulator can use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from planner.layout import Layout, PoolShape
from planner.measure import ProfileSpec, measure
from planner.measure_kv import measure_transfer
from planner.profile import (
    DecodePoint,
    PrefillPoint,
    Profile,
    TransferPoint,
    fit_decode,
    fit_prefill,
    fit_transfer,
)
from planner.simulator import simulate
from planner.workload import SimRequest


def test_fits_recover_known_coefficients() -> None:
    pre = [
        PrefillPoint(tokens=n, batch=b, seconds=0.02 + 1e-4 * b * n + 2e-8 * b * n * n)
        for n in (32, 128, 512, 1024)
        for b in (1, 2)
    ]
    fit = fit_prefill(pre)
    assert (fit.a, fit.b, fit.c) == pytest.approx((0.02, 1e-4, 2e-8), rel=1e-6)
    assert fit.max_rel_error < 1e-9
    dec = [
        DecodePoint(batch=b, context=c, seconds=0.03 + 1e-3 * b + 1e-6 * b * c)
        for b in (1, 4, 16)
        for c in (128, 1024)
    ]
    fit = fit_decode(dec)
    assert (fit.a, fit.b, fit.c) == pytest.approx((0.03, 1e-3, 1e-6), rel=1e-6)
    # a negative slope in noisy points is clamped to 0, not kept
    noisy = [TransferPoint(nbytes=n, seconds=s) for n, s in ((1000, 0.011), (10**6, 0.010))]
    fit = fit_transfer(noisy)
    assert fit.b == 0.0 and fit.a > 0


def test_tiny_measurement_round_trips_and_simulates(tiny_model_dir: Path, tmp_path: Path) -> None:
    spec = ProfileSpec(
        model=str(tiny_model_dir),
        num_threads=1,
        transport="shm",
        prefill_tokens=(16, 64),
        prefill_batches=(1, 2),
        decode_batches=(1, 2),
        decode_contexts=(32,),
        decode_steps=2,
        repeats=1,
        transfer_tokens=(16, 256),
    )
    profile = measure(spec)
    assert profile.shapes == [(1, 1)]
    layout = profile.layout(1, 1)
    assert len(layout.prefill_points) == 4 and len(layout.decode_points) == 2
    assert profile.transfer is not None and len(profile.transfer.points) == 2
    # 4 layers x 2 KV heads x 16 dims x K and V x fp32
    assert profile.kv_bytes_per_token == 4 * 2 * 16 * 2 * 4
    path = tmp_path / "profile.json"
    profile.save(path)
    loaded = Profile.load(path)
    assert loaded == profile
    result = simulate(
        Layout(PoolShape(1), PoolShape(1), threshold=0),
        loaded.cluster_model(),
        [SimRequest(0.0, 64, 4)],
    )
    assert result.requests[0].ttft > 0 and result.requests[0].tpot > 0


def test_load_names_the_bad_field(tmp_path: Path) -> None:
    good = {
        "model": "m",
        "dtype": "float32",
        "device": "cpu",
        "created": "now",
        "kv_bytes_per_token": 8,
        "layouts": [
            {
                "tp": 1,
                "pp": 1,
                "num_threads": 1,
                "prefill_points": [{"tokens": 4, "batch": 1, "seconds": 0.1}],
                "decode_points": [{"batch": 1, "context": 4, "seconds": 0.01}],
                "prefill": {"a": 0.1, "b": 0.0, "max_rel_error": 0.0},
                "decode": {"a": 0.01, "b": 0.0, "max_rel_error": 0.0},
            }
        ],
    }
    path = tmp_path / "p.json"
    path.write_text(json.dumps(good))
    assert Profile.load(path).layout(1, 1).num_threads == 1
    with pytest.raises(KeyError, match="tp=2 pp=1"):
        Profile.load(path).layout(2, 1)
    good["layouts"][0]["decode_points"][0]["seconds"] = -1  # type: ignore[index]
    path.write_text(json.dumps(good))
    with pytest.raises(ValueError, match=r"layouts\.0\.decode_points\.0\.seconds"):
        Profile.load(path)


def test_gloo_transfer_measures_each_size() -> None:
    points = measure_transfer("torch_dist", [1 << 12, 1 << 24], layers=4, repeats=1)
    assert [p.nbytes for p in points] == [1 << 12, 1 << 24]
    assert all(p.seconds > 0 for p in points)
    with pytest.raises(ValueError, match="transport"):
        measure_transfer("rdma", [1], 1, 1)
