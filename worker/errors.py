"""The errors a pool's replica raises to the router, part of the router<->pool contract.

Ray carries an exception raised in a replica back to the caller wrapped in a
`RayTaskError` whose `cause` is the original (and, for Serve calls, as an instance of
both). The router maps these by type (`router.worker_errors`):

- `InstanceUnavailable`: this instance cannot serve the call (its engine stopped, or a
  pinned call reached another replica); the router may retry on another instance.
- a `ValueError`: the engine's validation rejected a field of the request.

Like every message in the contract this module imports nothing from the router or the
cluster.
"""

from __future__ import annotations


class WorkerError(Exception):
    """Base of the errors a replica raises on purpose."""


class InstanceUnavailable(WorkerError):
    """The instance cannot serve this call; another instance may."""


class RequestAborted(WorkerError):
    """The request was aborted (by the router, or by the client through it) while its
    stream was open; its reader gets no more outputs."""
