"""Runs one scheduled step: packs the batch, runs the model, samples.

Inputs are packed with no padding (decode tokens first, then prompt chunks), the
attention metadata is built once and shared by all layers, and logits are computed
only for the rows that sample a token.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from engine.attention import AttentionMetadata, PrefillSpan
from engine.forward_hooks import LayerHook, ScheduledChunk
from engine.kv_cache import KVCache
from engine.model import LlamaModel
from engine.sampling import Sampler, TokenLogprob
from engine.scheduler import ScheduledSeq, SchedulerOutput


class ModelRunner:
    def __init__(
        self,
        model: LlamaModel,
        kv: KVCache,
        device: torch.device,
        sampler: Sampler,
        hook: LayerHook | None = None,
    ) -> None:
        self.model = model
        self.kv = kv
        self.device = device
        self.sampler = sampler
        self.hook = hook
        self.block_size = kv.layout.block_size

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> tuple[list[int], list[TokenLogprob | None]]:
        """Compute the step; returns a token for each scheduled seq that samples."""
        scheduled = out.scheduled
        input_ids, positions, meta, sample_rows = self._prepare(out)
        chunks = _chunks(scheduled) if self.hook else ()
        hook = self.hook
        layer_done = (lambda i: hook.on_layer_done(i, chunks)) if hook else None
        hidden = self.model(input_ids, positions, meta, self.kv, layer_done)
        if hook:
            hook.on_step_done(chunks)
        if not sample_rows:
            return [], []
        logits = self.model.compute_logits(hidden[torch.tensor(sample_rows, device=self.device)])
        sampling = [s.seq for s in scheduled if s.samples]
        return self.sampler.sample(
            logits, [s.params for s in sampling], [s.generator for s in sampling]
        )

    def _prepare(
        self, out: SchedulerOutput
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        for s in out.scheduled:
            seq, start = s.seq, s.seq.num_computed
            toks = seq.tokens
            for p in range(start, start + s.num_tokens):
                ids.append(toks[p])
                pos.append(p)
                slots.append(seq.block_table[p // bs] * bs + p % bs)
            if s.samples:
                sample_rows.append(len(ids) - 1)
        dev = self.device
        decode_tables = decode_mask = None
        if out.decodes:
            width = max(len(d.seq.block_table) for d in out.decodes)
            tables = [
                d.seq.block_table + [0] * (width - len(d.seq.block_table)) for d in out.decodes
            ]
            decode_tables = torch.tensor(tables, dtype=torch.long, device=dev)
            lens = torch.tensor([d.seq.num_computed + 1 for d in out.decodes], device=dev)
            if len(set(lens.tolist())) > 1 or width * bs != int(lens[0]):
                keys = torch.arange(width * bs, device=dev)
                decode_mask = (keys[None, :] < lens[:, None])[:, None, None, :]
        spans = []
        offset = len(out.decodes)
        for s in out.prefills:
            ctx = s.seq.num_computed
            nblocks = -(-(ctx + s.num_tokens) // bs)
            table = torch.tensor(s.seq.block_table[:nblocks], dtype=torch.long, device=dev)
            spans.append(PrefillSpan(offset, s.num_tokens, ctx, table))
            offset += s.num_tokens
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            num_decodes=len(out.decodes),
            decode_block_tables=decode_tables,
            decode_mask=decode_mask,
            prefills=tuple(spans),
        )
        return (
            torch.tensor(ids, dtype=torch.long, device=dev),
            torch.tensor(pos, dtype=torch.long, device=dev),
            meta,
            sample_rows,
        )


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
