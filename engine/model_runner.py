"""Runs one scheduled step: packs the batch, runs the model, samples.

Inputs are packed with no padding (decode tokens first, then prompt chunks) into
`StepInputs`; attention metadata is built once and shared by all layers; logits are
computed only for the rows that sample a token. In a TP/PP engine this runner lives
on the driving rank (rank 0): it broadcasts the step to the other ranks, runs its own
stage with `run_stage`, and samples from the logits the last stage returns; while the
engine idles, its `Keepalive` broadcasts IDLE steps so the other ranks' waits stay
within the groups' timeout.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence as Seq

import torch

from engine.forward_hooks import LayerHook, ScheduledChunk
from engine.kv_cache import KVCache
from engine.model import LayerDone, LlamaModel
from engine.parallel.comm import RankGroups
from engine.parallel.keepalive import Keepalive
from engine.parallel.pipeline import pipelined_logits
from engine.sampling import Sampler, TokenLogprob
from engine.scheduler import ScheduledSeq, SchedulerOutput
from engine.step_inputs import CMD_PAIR, HEADER_LEN, StepInputs, request_tag

log = logging.getLogger(__name__)

# An idle rank 0 broadcasts IDLE this many times per group timeout.
KEEPALIVES_PER_TIMEOUT = 4


def run_stage(
    model: LlamaModel,
    kv: KVCache,
    step: StepInputs,
    device: torch.device,
    groups: RankGroups | None,
    layer_done: LayerDone | None = None,
) -> torch.Tensor | None:
    """This rank's share of one step; the last stage returns the sampled rows' logits.

    With pipeline stages, logits travel from the last stage's TP rank 0 to rank 0.
    """
    ids, pos, meta, rows = step.unpack(device, kv.layout.block_size)
    hidden_in = None
    layout = groups.layout if groups else None
    if layout and not layout.is_first_stage:
        hidden_in = torch.empty(
            ids.shape[0], model.cfg.hidden_size, dtype=kv.layout.dtype, device=device
        )
        groups.recv(hidden_in, layout.rank - layout.tp)  # type: ignore[union-attr]
    h = model(ids, pos, meta, kv, layer_done, hidden_in)
    if layout and not layout.is_last_stage:
        groups.send(h, layout.rank + layout.tp)  # type: ignore[union-attr]
        logits = None
    else:
        logits = model.compute_logits(h.index_select(0, rows)) if rows.numel() else None
    if layout and layout.pp > 1 and rows.numel():
        last = (layout.pp - 1) * layout.tp
        if layout.rank == last and logits is not None:
            groups.send(logits, 0)  # type: ignore[union-attr]
        elif layout.rank == 0:
            logits = torch.empty(rows.numel(), model.cfg.vocab_size, device=device)
            groups.recv(logits, last)  # type: ignore[union-attr]
    return logits


def broadcast_step(groups: RankGroups, step: StepInputs | None) -> StepInputs:
    """Rank 0 sends `step`; the other ranks pass None and receive it."""
    header = step.header if step is not None else torch.zeros(HEADER_LEN, dtype=torch.long)
    groups.broadcast(header.to(groups.device), 0)
    header = header.cpu()
    shell = StepInputs(header, torch.empty(0, dtype=torch.long))
    payload = step.payload if step is not None else torch.empty(shell.payload_len, dtype=torch.long)
    if payload.numel():
        payload = groups.broadcast(payload.to(groups.device), 0).cpu()
    return StepInputs(header, payload)


class ModelRunner:
    def __init__(
        self,
        model: LlamaModel,
        kv: KVCache,
        device: torch.device,
        sampler: Sampler,
        hook: LayerHook | None = None,
        groups: RankGroups | None = None,
    ) -> None:
        self.model = model
        self.kv = kv
        self.device = device
        self.sampler = sampler
        self.hook = hook
        self.groups = groups
        self.block_size = kv.layout.block_size
        self.num_pipelined_steps = 0  # decode steps run as two PP micro-batches
        self.keepalive: Keepalive | None = None
        if groups is not None and groups.layout.world_size > 1:

            def send_idle() -> None:
                broadcast_step(groups, StepInputs.idle())

            self.keepalive = Keepalive(send_idle, groups.timeout_s / KEEPALIVES_PER_TIMEOUT).start()

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> tuple[list[int], list[TokenLogprob | None]]:
        """Compute the step; returns a token for each scheduled seq that samples."""
        with self.keepalive.step() if self.keepalive else contextlib.nullcontext():
            return self._execute(out)

    def _execute(self, out: SchedulerOutput) -> tuple[list[int], list[TokenLogprob | None]]:
        if self._pipelines(out):
            return self._execute_pair(out)
        scheduled = out.scheduled
        step = self._prepare(out)
        if self.groups is not None and self.groups.layout.world_size > 1:
            broadcast_step(self.groups, step)
        chunks = _chunks(scheduled) if self.hook else ()
        hook = self.hook
        layer_done = (lambda i: hook.on_layer_done(i, chunks)) if hook else None
        logits = run_stage(self.model, self.kv, step, self.device, self.groups, layer_done)
        if hook:
            hook.on_step_done(chunks)
        if logits is None:
            return [], []
        sampling = [s.seq for s in scheduled if s.samples]
        return self.sampler.sample(
            logits,
            [s.params for s in sampling],
            [s.generator for s in sampling],
            [s.generated for s in sampling],
        )

    def _pipelines(self, out: SchedulerOutput) -> bool:
        """Decode-only steps of a PP engine run as two micro-batches (no layer hook:
        only prompt chunks stream KV out)."""
        g = self.groups
        return (
            g is not None
            and g.layout.pp > 1
            and self.hook is None
            and not out.prefills
            and len(out.decodes) >= 2
        )

    def _execute_pair(self, out: SchedulerOutput) -> tuple[list[int], list[TokenLogprob | None]]:
        assert self.groups is not None
        self.num_pipelined_steps += 1
        half = (len(out.decodes) + 1) // 2
        parts = (out.decodes[:half], out.decodes[half:])
        steps = tuple(self._prepare(SchedulerOutput(list(p), [], [])) for p in parts)
        broadcast_step(self.groups, steps[0].with_command(CMD_PAIR))
        broadcast_step(self.groups, steps[1])
        logits = pipelined_logits(
            self.model, self.kv, (steps[0], steps[1]), self.device, self.groups
        )
        tokens: list[int] = []
        logprobs: list[TokenLogprob | None] = []
        for part, part_logits in zip(parts, logits, strict=True):
            seqs = [s.seq for s in part]
            t, lp = self.sampler.sample(
                part_logits,
                [s.params for s in seqs],
                [s.generator for s in seqs],
                [s.generated for s in seqs],
            )
            tokens += t
            logprobs += lp
        return tokens, logprobs

    def check_ranks(self) -> None:
        """Raise if an idle keepalive found the other ranks unreachable."""
        if self.keepalive is not None:
            self.keepalive.check()

    def stop_workers(self) -> None:
        """Broadcast STOP to the other ranks; skipped (logged) when they are known to
        be unreachable, since nobody would receive it."""
        if self.keepalive is not None:
            self.keepalive.stop()
            if self.keepalive.failure is not None:
                log.warning("not stopping the other ranks: %s", self.keepalive.failure)
                return
        if self.groups is not None and self.groups.layout.world_size > 1:
            try:
                broadcast_step(self.groups, StepInputs.stop())
            except RuntimeError as e:
                log.warning("stopping the other ranks failed: %s", e)

    def _prepare(self, out: SchedulerOutput) -> StepInputs:
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        for s in out.scheduled:
            seq, start = s.seq, s.seq.num_computed
            toks = seq.tokens
            table = seq.block_table
            for p in range(start, start + s.num_tokens):
                ids.append(toks[p])
                pos.append(p)
                slots.append(table[p // bs] * bs + p % bs)
            if s.samples:
                sample_rows.append(len(ids) - 1)
        decode_tables = [d.seq.block_table for d in out.decodes]
        decode_lens = [d.seq.num_computed + 1 for d in out.decodes]
        return StepInputs.pack(
            ids, pos, slots, decode_tables, decode_lens, _prefill_spans(out, bs), sample_rows
        )


def _prefill_spans(
    out: SchedulerOutput, bs: int
) -> list[tuple[int, int, int, list[int], int, bool]]:
    spans = []
    offset = len(out.decodes)
    for s in out.prefills:
        seq, ctx = s.seq, s.seq.num_computed
        end = ctx + s.num_tokens
        nblocks = -(-end // bs)
        completes = end >= len(seq.prompt) and ctx < len(seq.prompt)
        tag = request_tag(seq.request_id)
        spans.append((offset, s.num_tokens, ctx, seq.block_table[:nblocks], tag, completes))
        offset += s.num_tokens
    return spans


def _chunks(scheduled: Seq[ScheduledSeq]) -> tuple[ScheduledChunk, ...]:
    return tuple(
        ScheduledChunk(
            request_id=s.seq.request_id,
            block_ids=tuple(s.seq.block_table),
            start=s.seq.num_computed,
            end=s.seq.num_computed + s.num_tokens,
            completes_prompt=s.seq.num_computed + s.num_tokens >= len(s.seq.prompt)
            and s.seq.num_computed < len(s.seq.prompt),
        )
        for s in scheduled
    )
