"""How a pool call's failure reaches the client: the gRPC/HTTP error kind it becomes."""

from __future__ import annotations

from ray.exceptions import RayTaskError

from router.dispatch import worker_error
from router.errors import ErrorKind
from worker.engine_loop import EngineStopped


def test_a_failed_engine_is_unavailable_and_a_bad_value_is_invalid() -> None:
    stopped = RayTaskError("generate", "traceback", EngineStopped("engine loop d failed"))
    for e in (stopped, stopped.as_instanceof_cause()):
        err = worker_error(e, "the decode instance")
        assert err.kind is ErrorKind.UNAVAILABLE
        assert "engine loop d failed" in err.message
    assert worker_error(TimeoutError(), "prefill").kind is ErrorKind.UNAVAILABLE
    assert worker_error(ValueError("max_tokens: 0"), "x").kind is ErrorKind.INVALID_ARGUMENT
    other = RayTaskError("generate", "traceback", KeyError("k"))
    assert worker_error(other, "the decode instance").kind is ErrorKind.INTERNAL
