"""Request ids in log records, well-formed client ids, and the trace context's bounds."""

from __future__ import annotations

import asyncio
import logging

import pytest

from telemetry.context import (
    REQUEST_ID,
    TraceContext,
    install_log_records,
    parse_traceparent,
    request_scope,
    valid_request_id,
)


def test_log_records_carry_the_bound_request_id(caplog: pytest.LogCaptureFixture) -> None:
    install_log_records()
    log = logging.getLogger("router.test")
    caplog.set_level(logging.INFO)
    with request_scope("req-1"):
        log.info("routing to %s", "decode-a")
        log.info("request %s cancelled", "req-1")  # names it already: no prefix
    log.info("between requests")
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs == ["[req-1] routing to decode-a", "request req-1 cancelled", "between requests"]
    assert [getattr(r, "pdserve_request_id", None) for r in caplog.records] == [
        "req-1",
        "req-1",
        "",
    ]


def test_tasks_inherit_the_request_id_and_do_not_leak_it() -> None:
    async def handler(rid: str) -> tuple[str, str]:
        REQUEST_ID.set(rid)
        await asyncio.sleep(0)
        inner = await asyncio.get_running_loop().create_task(_read())
        return REQUEST_ID.get(), inner

    async def _read() -> str:
        return REQUEST_ID.get()

    async def main() -> list[tuple[str, str]]:
        return list(await asyncio.gather(handler("a"), handler("b")))

    assert asyncio.run(main()) == [("a", "a"), ("b", "b")]
    assert REQUEST_ID.get() == ""


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("req-0123", True),
        ("3f2b8c1e-aaaa-4bbb-8ccc-0123456789ab", True),
        ("a" * 128, True),
        ("a" * 129, False),
        ("", False),
        (None, False),
        ("has space", False),
        ("line\nbreak", False),
        ("-leading-dash", False),
    ],
)
def test_client_request_ids_must_be_short_and_plain(value: str | None, ok: bool) -> None:
    assert valid_request_id(value) is ok


def test_trace_context_bounds() -> None:
    TraceContext((1 << 128) - 1, (1 << 64) - 1)
    for tid, sid in ((0, 1), (1, 0), (1 << 128, 1), (1, 1 << 64)):
        with pytest.raises(ValueError):
            TraceContext(tid, sid)


def test_a_client_traceparent_becomes_the_parent() -> None:
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    ctx = parse_traceparent(tp)
    assert ctx == TraceContext(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, True)
    assert parse_traceparent(tp[:-2] + "00") == TraceContext(ctx.trace_id, ctx.span_id, False)
    for bad in (None, "", "01-" + tp[3:], tp.upper(), "00-" + "0" * 32 + tp[35:], tp + "-x"):
        assert parse_traceparent(bad) is None
