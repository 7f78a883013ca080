"""`pdserve plan` and `pdserve profile` end to end: the plan's config loads with the
cluster's own loader, keeps the base config's other settings, and names its layout;
the profile command measures the config's layouts and writes the profile and plot."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cluster.cli import main
from cluster.config import ConfigError
from cluster.config_file import load_config
from cluster.plan_cli import layout_config, write_config
from planner import distserve
from planner.layout import Layout, PoolShape
from planner.profile import Profile
from registry.types import Role


@pytest.fixture
def profile_path(tmp_path: Path) -> Path:
    path = tmp_path / "profile.json"
    distserve.profile().save(path)
    return path


def test_plan_writes_a_config_up_accepts(
    profile_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = tmp_path / "base.yaml"
    base.write_text("name: planned\nrouter:\n  max_inflight_requests: 99\n")
    out = tmp_path / "cluster.yaml"
    code = main(
        [
            "plan", "--profile", str(profile_path), "--workload", "x",
            "--prompt-len", "fixed:512", "--output-len", "fixed:64",
            "--ttft-slo", "0.4", "--tpot-slo", "0.04", "--budget-devices", "2",
            "--thresholds", "0", "--requests", "200", "-c", str(base), "--out", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "1P1D threshold 0" in printed and "colocated x1" in printed
    assert "1P1D threshold 0 at " in printed and "TTFT p50/p90/p99" in printed
    config = load_config(out)
    assert config.name == "planned" and config.router.max_inflight_requests == 99
    roles = {p.role: p.replicas for p in config.pools}
    assert roles == {Role.PREFILL: 1, Role.DECODE: 1}
    assert config.router.disaggregation_threshold == 0
    assert out.read_text().startswith("# pdserve plan: 1P1D")
    assert main(["render", "k8s", "-c", str(out), "--out", str(tmp_path / "k8s")]) == 0


def test_colocated_layout_and_shapes_become_pools(tmp_path: Path) -> None:
    base = load_config(None, ["pools.decode.resources_per_rank={GPU: 1, CPU: 2}"])
    data = layout_config(Layout(PoolShape(3, tp=2)), base, None)
    config = write_config(tmp_path / "c.yaml", yaml.safe_dump(data))
    (pool,) = config.pools
    assert (pool.role, pool.replicas, pool.tp, pool.pp) == (Role.COLOCATED, 3, 2, 1)
    assert pool.resources_per_rank == {"GPU": 1.0, "CPU": 2.0}
    data = layout_config(Layout(PoolShape(2), PoolShape(1, pp=2), threshold=128), base, None)
    config = write_config(tmp_path / "d.yaml", yaml.safe_dump(data))
    assert [(p.name, p.replicas, p.pp) for p in config.pools] == [
        ("prefill", 1, 2),
        ("decode", 2, 1),
    ]
    assert config.router.disaggregation_threshold == 128
    bad = tmp_path / "bad.yaml"
    with pytest.raises(ConfigError, match="pools"):
        write_config(bad, "pools: []\n")
    assert not bad.exists()


def test_plan_rejects_an_unknown_workload(profile_path: Path) -> None:
    args = ["plan", "--profile", str(profile_path), "--workload", "no-such-mix"]
    args += ["--ttft-slo", "1", "--tpot-slo", "1", "--budget-devices", "1"]
    assert main(args) == 2


@pytest.mark.slow
def test_profile_command_measures_the_config_layouts(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    code = main(
        [
            "profile", "--set", f"model.source={tiny_model_dir}",
            "--set", "model.max_model_len=512", "--set", "kv_transfer.transport=shm",
            "--quick", "--prefill-tokens", "16,64",
            "--decode-contexts", "32", "--out", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    profile = Profile.load(out)
    assert profile.shapes == [(1, 1)]
    assert profile.transfer is not None and profile.transfer.transport == "shm"
    assert out.with_suffix(".png").stat().st_size > 0


def test_plan_says_when_no_layout_meets_the_slos(
    profile_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["plan", "--profile", str(profile_path), "--workload", "prompt-heavy"]
    args += ["--ttft-slo", "0.01", "--tpot-slo", "0.04", "--budget-devices", "1"]
    assert main(args) == 2
    assert "no layout within the budget meets the SLOs" in capsys.readouterr().err
