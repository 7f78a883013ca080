"""Process-wide hub for the replicas a handle's request router drops.

`PinnedReplicaRouter` (router/pinning.py) reports each replica Serve drops with
`report`; the cluster view registers with `watch` to exclude it from routing at once.
The hub is its own module on purpose: Ray Serve may ship the router class by value, and
a class unpickled that way gets functions with a copy of their module's globals, so
state kept in router/pinning.py itself would split in two. A module is always pickled
by reference, so every copy of the router reaches this one list.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

logger = logging.getLogger(__name__)

_watchers: list[Callable[[str], object]] = []


def watch(callback: Callable[[str], object]) -> Callable[[], None]:
    """Call `callback(unique_id)` for each replica a handle's router drops; returns a
    function that stops the calls. Callbacks run on the router's loop: keep them short."""
    _watchers.append(callback)

    def cancel() -> None:
        with contextlib.suppress(ValueError):
            _watchers.remove(callback)

    return cancel


def report(unique_id: str) -> None:
    for callback in list(_watchers):
        try:
            callback(unique_id)
        except Exception:
            logger.exception("replica death watcher failed")
