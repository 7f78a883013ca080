"""A pool call's failure as the error the client sees, decided by the exception's type.

Ray re-raises a replica's exception as a `RayTaskError` whose `cause` is the original
(for Serve calls, one that is also an instance of the original's class); the mapping
looks at the cause. What the types mean is the pools' contract (`worker.errors`).
"""

from __future__ import annotations

from ray.exceptions import (
    ActorPlacementGroupRemoved,
    ActorUnschedulableError,
    NodeDiedError,
    RayActorError,
    RayError,
    RayTaskError,
    WorkerCrashedError,
)
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)

from router.errors import ErrorKind, RouterError
from worker.errors import InstanceUnavailable

# The instance (or its actor, or its deployment) is gone or cannot take the call now;
# another instance may.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    InstanceUnavailable,
    RayActorError,  # ActorDiedError, ActorUnavailableError
    ActorUnschedulableError,
    ActorPlacementGroupRemoved,
    NodeDiedError,
    WorkerCrashedError,
    ReplicaUnavailableError,
    DeploymentUnavailableError,
)


def cause_of(e: BaseException) -> BaseException:
    """The replica's own exception when Ray wrapped one, else `e`."""
    if isinstance(e, RayTaskError) and isinstance(e.cause, BaseException):
        return e.cause
    return e


def is_instance_failure(e: BaseException) -> bool:
    """Whether a pool call's error says the instance itself is dead or unreachable
    (rather than that the request was bad or slow), up the chain of causes."""
    seen: set[int] = set()
    err: BaseException | None = e
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, _UNAVAILABLE):
            return True
        cause = getattr(err, "cause", None)  # a RayTaskError carries the worker's error
        err = cause if isinstance(cause, BaseException) else err.__cause__
    return False


def worker_error(e: BaseException, what: str) -> RouterError:
    """`e`, raised by a call to `what` (a pool instance), as a client-facing error."""
    if isinstance(e, RouterError):
        return e
    cause = cause_of(e)
    if isinstance(cause, _UNAVAILABLE):
        return RouterError(ErrorKind.UNAVAILABLE, f"{what} is unavailable: {cause}")
    if isinstance(cause, TimeoutError):  # asyncio's and Ray's GetTimeoutError alike
        return RouterError(ErrorKind.UNAVAILABLE, f"{what} did not answer in time")
    if isinstance(cause, BackPressureError):
        return RouterError(ErrorKind.RESOURCE_EXHAUSTED, f"{what} is overloaded: {cause}")
    if isinstance(cause, ValueError) and not isinstance(cause, RayError):
        # the engine's validation, naming the field
        return RouterError(ErrorKind.INVALID_ARGUMENT, str(cause))
    return RouterError(ErrorKind.INTERNAL, f"{what} failed: {type(cause).__name__}: {cause}")
