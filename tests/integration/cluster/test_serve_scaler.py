"""Serve's external scaler as the controller's slow loop uses it, on local Ray: an
application deployed with `external_scaler_enabled` goes from one replica of a
deployment to two and back through `ServeScaler`; the replica that was there first
keeps serving while the second starts (nothing is redeployed)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import ray
from cluster_harness import wait_until
from ray import serve

from controller.scaler import ServeScaler

pytestmark = pytest.mark.slow

APP = "scaled"


@serve.deployment(name="echo", num_replicas=1, ray_actor_options={"num_cpus": 0})
class Echo:
    def __call__(self) -> str:
        return str(serve.get_replica_context().replica_id.unique_id)


@pytest.fixture(scope="module")
def app() -> Iterator[None]:
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        serve.run(Echo.bind(), name=APP, route_prefix=None, external_scaler_enabled=True)
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


def _running() -> int:
    status = serve.status().applications[APP].deployments["echo"]
    return sum(n for s, n in status.replica_states.items() if str(s).endswith("RUNNING"))


def test_replicas_change_without_restarting_the_first(app: None) -> None:
    handle = serve.get_app_handle(APP)
    first = handle.remote().result(timeout_s=30)
    scaler = ServeScaler(APP)
    assert scaler.targets() == {"echo": 1}
    scaler.scale("echo", 2)
    assert scaler.targets() == {"echo": 2}  # what a controller taking over starts from
    assert ServeScaler("no-such-app").targets() == {}
    wait_until(lambda: _running() == 2, 60.0, "two replicas")
    seen = {handle.remote().result(timeout_s=30) for _ in range(40)}
    assert first in seen and len(seen) == 2
    scaler.scale("echo", 1)
    wait_until(lambda: _running() == 1, 60.0, "one replica")
    assert {handle.remote().result(timeout_s=30) for _ in range(5)} <= seen
    with pytest.raises(ValueError, match="replicas"):
        scaler.scale("echo", 0)
