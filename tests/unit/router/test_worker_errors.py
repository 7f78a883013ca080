"""How a pool call's failure reaches the client: the gRPC/HTTP error kind it becomes,
decided by the exception's type as Ray delivers it."""

from __future__ import annotations

import pickle

import pytest
from ray.exceptions import (
    ActorDiedError,
    ActorHandleNotFoundError,
    ActorUnavailableError,
    GetTimeoutError,
    RayTaskError,
)
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from router.errors import ErrorKind, RouterError
from router.worker_errors import cause_of, worker_error
from worker.engine_loop import EngineStopped
from worker.errors import InstanceUnavailable


def _wrapped(cause: BaseException) -> list[BaseException]:
    """`cause` as Ray re-raises it: a RayTaskError carrying it, and the same error as
    an instance of the cause's class too (what a Serve handle raises)."""
    e = RayTaskError("generate", "traceback", cause)
    return [e, e.as_instanceof_cause()]


def test_a_failed_engine_is_unavailable_and_a_bad_value_is_invalid() -> None:
    for e in _wrapped(EngineStopped("engine loop d failed")):
        err = worker_error(e, "the decode instance")
        assert err.kind is ErrorKind.UNAVAILABLE
        assert "engine loop d failed" in err.message
    assert worker_error(TimeoutError(), "prefill").kind is ErrorKind.UNAVAILABLE
    assert worker_error(ValueError("max_tokens: 0"), "x").kind is ErrorKind.INVALID_ARGUMENT
    for e in _wrapped(KeyError("k")):
        err = worker_error(e, "the decode instance")
        assert err.kind is ErrorKind.INTERNAL
        assert err.message.startswith("the decode instance failed: KeyError")


def test_a_call_pinned_to_a_gone_replica_is_unavailable() -> None:
    for e in _wrapped(InstanceUnavailable("call pinned to replica a reached b")):
        assert worker_error(e, "the decode instance").kind is ErrorKind.UNAVAILABLE


def test_the_engines_validation_reaches_the_client_with_the_field() -> None:
    for e in _wrapped(ValueError("temperature: must be in [0, 2], got 3.0")):
        err = worker_error(e, "the decode instance")
        assert err.kind is ErrorKind.INVALID_ARGUMENT
        assert err.message == "temperature: must be in [0, 2], got 3.0"


@pytest.mark.parametrize(
    "error",
    [
        ActorDiedError(),
        ActorUnavailableError("unreachable", None),
        DeploymentUnavailableError("decode"),
    ],
)
def test_ray_reports_of_a_dead_or_unreachable_instance_are_unavailable(
    error: BaseException,
) -> None:
    assert worker_error(error, "the decode instance").kind is ErrorKind.UNAVAILABLE


def test_timeouts_overload_and_rays_own_value_errors() -> None:
    assert worker_error(GetTimeoutError(), "prefill").kind is ErrorKind.UNAVAILABLE
    assert (
        worker_error(BackPressureError(num_queued_requests=9, max_queued_requests=8), "p").kind
        is ErrorKind.RESOURCE_EXHAUSTED
    )
    # a Ray error that happens to be a ValueError is not the client's bad field
    assert worker_error(ActorHandleNotFoundError("gone"), "p").kind is ErrorKind.INTERNAL


def test_a_router_error_passes_through_and_the_cause_is_unwrapped() -> None:
    mine = RouterError(ErrorKind.DEADLINE_EXCEEDED, "late")
    assert worker_error(mine, "x") is mine
    cause = EngineStopped("stopped")
    assert all(cause_of(e) is cause for e in _wrapped(cause))
    assert cause_of(cause) is cause


def test_the_contract_errors_survive_pickling() -> None:
    e = pickle.loads(pickle.dumps(EngineStopped("engine loop d failed")))
    assert isinstance(e, InstanceUnavailable) and str(e) == "engine loop d failed"
