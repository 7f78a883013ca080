"""`pdserve up --address ray://HOST:10001` onto a Ray cluster on other machines: the
config must name what those machines can reach, and the endpoints are HOST's."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.config_file import load_config
from cluster.launcher import Launcher, LaunchError, check_remote, remote_host


def test_remote_host_only_for_ray_client_addresses_elsewhere() -> None:
    assert remote_host("ray://10.0.0.5:10001") == "10.0.0.5"
    assert remote_host("ray://head.ray.svc:10001") == "head.ray.svc"
    assert remote_host("ray://[fd00::5]:10001") == "fd00::5"
    for local in (None, "auto", "10.0.0.5:6379", "ray://127.0.0.1:10001", "ray://localhost:1"):
        assert remote_host(local) is None


def test_endpoints_are_the_heads() -> None:
    config = load_config(None, ["ray.address=ray://10.0.0.5:10001", "server.grpc_port=9100"])
    launcher = Launcher(config, run_dir=Path("/nonexistent"))
    assert launcher.grpc_target == "10.0.0.5:9100"
    assert launcher.http_url == "http://10.0.0.5:8000"
    local = Launcher(load_config(None, ["server.host=0.0.0.0"]), run_dir=Path("/nonexistent"))
    assert local.grpc_target == "127.0.0.1:9000"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([], "set redis.url to a Redis they can reach"),
        (["redis.url=redis://10.0.0.6:6379/0"], "give an HF-format directory"),
    ],
)
def test_what_a_remote_cluster_cannot_reach_fails_before_starting(
    tmp_path: Path, overrides: list[str], message: str
) -> None:
    config = load_config(None, ["ray.address=ray://10.0.0.5:10001", *overrides])
    with pytest.raises(LaunchError, match=message):
        Launcher(config, run_dir=tmp_path).start(timeout_s=1)
    assert list(tmp_path.iterdir()) == []  # nothing was started or recorded


def test_a_reachable_config_passes() -> None:
    check_remote(
        load_config(
            None,
            [
                "ray.address=ray://10.0.0.5:10001",
                "redis.url=redis://10.0.0.6:6379/0",
                "model.source=/models/llama",
            ],
        )
    )
