"""Turning a request's engine outputs into the `TokenChunk`s a replica streams back.

Several outputs that queued up while the consumer was busy become one chunk, so a slow
reader costs fewer messages, not more. Logprobs: the engine reports the whole list so
far (on a remote prefill, starting with the prefill instance's first token); the
builder sends only the new entries.
"""

from __future__ import annotations

from collections.abc import Sequence

from decode_worker.remote_kv import RemoteInfo
from engine import RequestOutput, TokenLogprob
from worker.messages import FinalStats, TokenChunk


class ChunkBuilder:
    def __init__(self, num_prompt_tokens: int) -> None:
        self._num_prompt_tokens = num_prompt_tokens
        self._logprobs_sent = 0

    def build(self, outs: Sequence[RequestOutput], remote: RemoteInfo | None) -> TokenChunk:
        """One chunk for `outs` (in order, all of one request)."""
        tokens: list[int] = []
        text: list[str] = []
        for out in outs:
            tokens.extend(out.new_token_ids)
            text.append(out.new_text)
        last = outs[-1]
        logprobs = self._new_logprobs(last)
        final = self._final(last, remote) if last.finished else None
        return TokenChunk(
            token_ids=tuple(tokens),
            text="".join(text),
            logprobs=logprobs,
            finished=last.finished,
            finish_reason=last.finish_reason,
            stop_reason=last.stop_reason if last.finished else None,
            final=final,
        )

    def _new_logprobs(self, out: RequestOutput) -> tuple[TokenLogprob, ...]:
        if out.logprobs is None:
            return ()
        entries = list(out.logprobs)
        new = entries[self._logprobs_sent :]
        self._logprobs_sent = len(entries)
        return tuple(new)

    def _final(self, out: RequestOutput, remote: RemoteInfo | None) -> FinalStats:
        m = out.metrics
        disagg = remote is not None and remote.disaggregated
        return FinalStats(
            prompt_tokens=self._num_prompt_tokens,
            completion_tokens=len(out.token_ids),
            cached_prompt_tokens=m.num_cached_tokens if m is not None else 0,
            queue_s=m.queue_s if m is not None else 0.0,
            prefill_s=0.0 if disagg or m is None else m.prefill_s,
            kv_transfer_s=remote.kv_transfer_s if remote is not None and disagg else 0.0,
            tpot_s=m.tpot_s if m is not None else 0.0,
            disaggregated=disagg,
            fallback_reason=remote.fallback_reason if remote is not None else "",
            fallback=remote.fallback if remote is not None else None,
        )
