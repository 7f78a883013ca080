"""Continuing a stream whose decode instance failed after tokens reached the client.

    segment 0: run(route, Progress())     deltas go to the client; the migration keeps
                                          the tokens and the characters of text they
                                          carried
    it fails mid-stream, with an error that is not the request's fault (the instance
    died, became unreachable or stopped answering, or failed internally):
    segment 1: run(reroute(avoid, p), p)  another decode instance, never one that broke
                                          this stream, computes the prompt and the
                                          tokens so far (through the prefill pool when
                                          that is long enough) and streams on from the
                                          next token (engine.resume)
    ...  up to `max_migrations` moves; each is counted by `on_migrate`

Each segment is itself retried before its first delta (router.retry). A segment
after the first has a worker-side request id of its own, so a late abort of an earlier
segment can never reach it. The client sees one stream: the same request id, no token
twice or missing, and the final message's timings carry the number of moves and the
TTFT of the first token. A request error (a bad field, a deadline) is never migrated.
A client that continues a broken stream itself (a request with `resume`) starts as a
moved segment does: its tokens so far are the starting progress.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from engine import Resume
from router.errors import ErrorKind, RouterError
from router.policy import RouteDecision
from router.results import Delta
from router.retry import with_retries

logger = logging.getLogger(__name__)

_MIGRATABLE = (ErrorKind.UNAVAILABLE, ErrorKind.INTERNAL)


@dataclass(frozen=True)
class Progress:
    """What the client has of the stream so far."""

    token_ids: tuple[int, ...] = ()
    text_chars: int = 0
    first_at: float | None = None  # time.monotonic() of the first token at the router
    migrations: int = 0

    @property
    def resume(self) -> Resume | None:
        return Resume(self.token_ids, self.text_chars) if self.token_ids else None

    def after(self, delta: Delta) -> Progress:
        if not delta.token_ids and not delta.text:
            return self
        first = self.first_at
        if first is None and delta.token_ids:
            first = time.monotonic()
        return Progress(
            self.token_ids + delta.token_ids,
            self.text_chars + len(delta.text),
            first,
            self.migrations,
        )


Run = Callable[[RouteDecision, Progress], AsyncIterator[Delta]]
Reroute = Callable[[frozenset[str], Progress], RouteDecision]  # avoid, progress -> route


def migratable(e: RouterError) -> bool:
    return e.kind in _MIGRATABLE


@dataclass(frozen=True)
class MigrationPolicy:
    max_migrations: int  # 0: a mid-stream error ends the stream
    max_attempts: int  # tries of each segment before its first delta
    on_retry: Callable[[RouterError], None]
    on_migrate: Callable[[RouterError], None]


async def with_migration(
    run: Run,
    reroute: Reroute,
    route: RouteDecision,
    policy: MigrationPolicy,
    start: Progress | None = None,
) -> AsyncIterator[Delta]:
    """`start`: what the client already has (a stream it continues), else nothing."""
    progress = start or Progress()
    broken: frozenset[str] = frozenset()  # decode instances that broke this stream
    current = route

    # Both read the progress at the segment's start: a segment is retried only before
    # its first delta.
    def segment(r: RouteDecision) -> AsyncIterator[Delta]:
        nonlocal current
        current = r
        return run(r, progress)

    def retry_route(avoid: frozenset[str]) -> RouteDecision:
        return reroute(avoid | broken, progress)

    while True:
        try:
            segments = with_retries(
                segment, retry_route, current, policy.max_attempts, policy.on_retry
            )
            async for delta in segments:
                progress = progress.after(delta)
                yield _stamped(delta, progress.migrations)
            return
        except RouterError as e:
            if not progress.token_ids or not migratable(e):
                raise
            if progress.migrations >= policy.max_migrations:
                logger.warning("not migrating again after %d moves", progress.migrations)
                raise
            broken = broken | {current.decode.address}
            current = _next_route(reroute, broken, progress, e)
            policy.on_migrate(e)
            progress = dataclasses.replace(progress, migrations=progress.migrations + 1)
            logger.info(
                "stream moves to %s after %d tokens (move %d): %s",
                current.decode.instance_id,
                len(progress.token_ids),
                progress.migrations,
                e.message,
            )


def _next_route(
    reroute: Reroute, broken: frozenset[str], progress: Progress, error: RouterError
) -> RouteDecision:
    try:
        return reroute(broken, progress)
    except RouterError:
        raise error from None  # nowhere else to go: the stream's own error ends it


def _stamped(delta: Delta, migrations: int) -> Delta:
    """The final delta with the number of moves in its timings."""
    if delta.finish is None or not migrations:
        return delta
    timings = dataclasses.replace(delta.finish.timings, migrations=migrations)
    return dataclasses.replace(delta, finish=dataclasses.replace(delta.finish, timings=timings))
