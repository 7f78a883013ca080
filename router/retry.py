"""Retrying a request that failed before its first token, on another instance.

    attempt 1: run(route)                 deltas go to the client as they come
    it fails before any delta with an UNAVAILABLE error (the instance died, was
    unreachable, or did not answer in time):
    attempt 2: run(reroute(avoid))        a new route that avoids every decode instance
                                          tried so far (and, through the cluster view's
                                          breaker, every instance seen dead)
    ...  up to `max_attempts`; each retry is counted by `on_retry`

Once a delta has reached the client the request is not retried: its error ends the
stream. Other error kinds (a bad request, an internal error) are not retried either.
When no other instance is left, the last attempt's error is the request's error.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

from router.errors import ErrorKind, RouterError
from router.policy import RouteDecision
from router.results import Delta

logger = logging.getLogger(__name__)

Run = Callable[[RouteDecision], AsyncIterator[Delta]]
Reroute = Callable[[frozenset[str]], RouteDecision]  # decode addresses to avoid -> route


def retryable(e: RouterError) -> bool:
    return e.kind is ErrorKind.UNAVAILABLE


async def with_retries(
    run: Run,
    reroute: Reroute,
    route: RouteDecision,
    max_attempts: int,
    on_retry: Callable[[RouterError], None],
) -> AsyncIterator[Delta]:
    avoid: frozenset[str] = frozenset()
    attempt = 1
    while True:
        started = False
        try:
            async for delta in run(route):
                started = True
                yield delta
            return
        except RouterError as e:
            if started or not retryable(e) or attempt >= max_attempts:
                raise
            avoid = avoid | {route.decode.address}
            try:
                next_route = reroute(avoid)
            except RouterError:
                raise e from None  # nowhere else to go
            logger.info(
                "retrying on %s after %s failed before the first token: %s",
                next_route.decode.instance_id,
                route.decode.instance_id,
                e.message,
            )
            on_retry(e)
            route = next_route
            attempt += 1
