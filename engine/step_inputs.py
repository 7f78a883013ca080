"""One step's model inputs as plain int64 tensors.

The driving rank packs the scheduled batch into a fixed 8-field header plus one flat
payload; every rank (the driver too) rebuilds the token tensors and the attention
metadata from them, so a TP/PP engine's ranks cannot disagree about a step, and
nothing but tensors crosses the wire.

    header: [command, tokens, decodes, prefills, decode_width, samples, prefill_blocks, 0]
    payload: input_ids, positions, slots | decode tables, decode lengths |
             prefill (start, length, context, n_blocks, tag, completes) x prefills,
             prefill block ids | sample rows

A prefill's `tag` is `request_tag` of its request id and `completes` says whether the
chunk ends the prompt, so that the other ranks can tell their layer hooks which
request's KV a step wrote (`StepInputs.prefill_chunks`) without strings on the wire.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from engine.attention import AttentionMetadata, PrefillSpan

HEADER_LEN = 8
CMD_STEP = 1
CMD_STOP = 0
CMD_PAIR = 2  # a step whose next broadcast step is its micro-batch partner
CMD_IDLE = 3  # nothing to compute (engine/parallel/keepalive.py)
_SPAN = 6  # start, length, context, n_blocks, tag, completes


def request_tag(request_id: str) -> int:
    """A request id as a non-negative int64 (a stable hash; collisions ~2^-63)."""
    digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True)
class PrefillChunk:
    """One prompt chunk of a step, as every rank can read it back from the step."""

    tag: int  # request_tag of the request id
    block_ids: tuple[int, ...]  # the blocks covering context + this chunk
    start: int  # first position computed
    end: int  # one past the last position computed
    completes_prompt: bool


@dataclass(frozen=True)
class StepInputs:
    header: torch.Tensor  # [HEADER_LEN] int64
    payload: torch.Tensor  # int64

    @staticmethod
    def stop() -> StepInputs:
        return StepInputs(
            torch.zeros(HEADER_LEN, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        )

    @staticmethod
    def idle() -> StepInputs:
        return StepInputs.stop().with_command(CMD_IDLE)

    @staticmethod
    def pack(
        input_ids: list[int],
        positions: list[int],
        slots: list[int],
        decode_tables: list[list[int]],
        decode_lens: list[int],
        prefills: list[tuple[int, int, int, list[int], int, bool]],
        # start, length, context, blocks, tag, completes
        sample_rows: list[int],
    ) -> StepInputs:
        width = max((len(t) for t in decode_tables), default=0)
        flat: list[int] = input_ids + positions + slots
        for t in decode_tables:
            flat += t + [0] * (width - len(t))
        flat += decode_lens
        blocks: list[int] = []
        for start, length, ctx, table, tag, completes in prefills:
            flat += [start, length, ctx, len(table), tag, int(completes)]
            blocks += table
        flat += blocks + sample_rows
        header = [
            CMD_STEP,
            len(input_ids),
            len(decode_tables),
            len(prefills),
            width,
            len(sample_rows),
            len(blocks),
            0,
        ]
        return StepInputs(
            torch.tensor(header, dtype=torch.long), torch.tensor(flat, dtype=torch.long)
        )

    @property
    def command(self) -> int:
        return int(self.header[0])

    @property
    def num_samples(self) -> int:
        return int(self.header[5])

    def with_command(self, command: int) -> StepInputs:
        header = self.header.clone()
        header[0] = command
        return StepInputs(header, self.payload)

    @property
    def payload_len(self) -> int:
        t, nd, npf, w, ns, nb = (int(x) for x in self.header[1:7])
        return 3 * t + nd * w + nd + _SPAN * npf + nb + ns

    def _spans_offset(self) -> int:
        t, nd, _, w = (int(x) for x in self.header[1:5])
        return 3 * t + nd * w + nd

    def prefill_chunks(self) -> list[PrefillChunk]:
        """The step's prompt chunks (a CPU-side read of the payload)."""
        npf = int(self.header[3])
        off = self._spans_offset()
        spans = self.payload[off : off + _SPAN * npf].view(npf, _SPAN).tolist()
        blocks = self.payload[off + _SPAN * npf :].tolist()
        chunks, boff = [], 0
        for _, length, ctx, n, tag, completes in spans:
            table = tuple(blocks[boff : boff + n])
            chunks.append(PrefillChunk(tag, table, ctx, ctx + length, bool(completes)))
            boff += n
        return chunks

    def unpack(
        self, device: torch.device, block_size: int
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        """(input_ids, positions, attention metadata, sample rows) on `device`."""
        t, nd, npf, w, ns, nb = (int(x) for x in self.header[1:7])
        p = self.payload
        on_dev = p.to(device)
        ids, pos, slots = on_dev[:t], on_dev[t : 2 * t], on_dev[2 * t : 3 * t]
        off = 3 * t
        tables = mask = lens_dev = None
        if nd:
            tables = on_dev[off : off + nd * w].view(nd, w)
            off += nd * w
            lens = p[off : off + nd]
            lens_dev = on_dev[off : off + nd]
            if int(lens.min()) != w * block_size or int(lens.max()) != w * block_size:
                keys = torch.arange(w * block_size, device=device)
                mask = (keys[None, :] < lens_dev[:, None])[:, None, None, :]
            off += nd
        spans_raw = p[off : off + _SPAN * npf].view(npf, _SPAN).tolist()
        off += _SPAN * npf
        spans = []
        boff = off
        for start, length, ctx, n, _, _ in spans_raw:
            spans.append(PrefillSpan(start, length, ctx, on_dev[boff : boff + n]))
            boff += n
        off += nb
        sample_rows = on_dev[off : off + ns]
        meta = AttentionMetadata(
            slot_mapping=slots,
            num_decodes=nd,
            decode_block_tables=tables,
            decode_mask=mask,
            decode_context_lens=lens_dev,
            prefills=tuple(spans),
        )
        return ids, pos, meta, sample_rows
