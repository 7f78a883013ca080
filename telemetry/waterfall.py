"""One trace drawn as a waterfall for a terminal: a line per span, in tree order (each
span under its parent, siblings by start time), with its start offset, duration, the
process that recorded it and a bar on a shared time axis.

    offset   duration  process      span
    0.0 ms   41.2 ms   router       request           |##########################|
    0.3 ms    2.1 ms   router         tokenize        |#                         |

Spans whose parent is not in the set (it was not sampled, or is still running) are
drawn as roots. Clocks of different hosts are not aligned; on one host they agree.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from telemetry.records import SpanRecord

_NAME_WIDTH = 44
_SERVICE_WIDTH = 18


def tree_order(spans: Iterable[SpanRecord]) -> list[tuple[int, SpanRecord]]:
    """(depth, span) in depth-first order, children by start time."""
    spans = list(spans)
    ids = {s.span_id for s in spans}
    children: dict[str, list[SpanRecord]] = {}
    roots: list[SpanRecord] = []
    for s in spans:
        if s.parent_id and s.parent_id in ids and s.parent_id != s.span_id:
            children.setdefault(s.parent_id, []).append(s)
        else:
            roots.append(s)
    out: list[tuple[int, SpanRecord]] = []
    seen: set[str] = set()
    stack = [(0, s) for s in sorted(roots, key=_key, reverse=True)]
    while stack:
        depth, s = stack.pop()
        if s.span_id in seen:
            continue
        seen.add(s.span_id)
        out.append((depth, s))
        kids = sorted(children.get(s.span_id, ()), key=_key, reverse=True)
        stack.extend((depth + 1, k) for k in kids)
    return out


def _key(s: SpanRecord) -> tuple[int, int, str]:
    return (s.start_ns, -s.end_ns, s.name)


def _label(s: SpanRecord) -> str:
    keys = ("layer", "chunk", "bytes", "message", "tokens")
    extra = [f"{k}={s.attributes[k]}" for k in keys if k in s.attributes]
    return f"{s.name} {' '.join(extra)}" if extra else s.name


def _bar(s: SpanRecord, t0: int, total: int, width: int) -> str:
    lo = int((s.start_ns - t0) * width / total)
    hi = int((s.end_ns - t0) * width / total + 0.999)
    lo = min(max(lo, 0), width - 1)
    hi = min(max(hi, lo + 1), width)
    return " " * lo + "#" * (hi - lo) + " " * (width - hi)


def render(spans: Sequence[SpanRecord], width: int = 40) -> str:
    """The waterfall of `spans` (one trace) as text lines; "" without spans."""
    if not spans:
        return ""
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    t0 = min(s.start_ns for s in spans)
    total = max(max(s.end_ns for s in spans) - t0, 1)
    head = f"{'offset':>10} {'duration':>10}  {'process':<{_SERVICE_WIDTH}} {'span':<{_NAME_WIDTH}}"
    lines = [f"trace {spans[0].trace_id}: {len(spans)} spans, {total / 1e6:.1f} ms", head]
    for depth, s in tree_order(spans):
        name = ("  " * depth + _label(s))[:_NAME_WIDTH]
        service = s.service[:_SERVICE_WIDTH]
        mark = " !" if s.error else ""
        lines.append(
            f"{(s.start_ns - t0) / 1e6:>7.1f} ms {s.duration_ns / 1e6:>7.1f} ms  "
            f"{service:<{_SERVICE_WIDTH}} {name:<{_NAME_WIDTH}} |{_bar(s, t0, total, width)}|{mark}"
        )
    return "\n".join(lines)
