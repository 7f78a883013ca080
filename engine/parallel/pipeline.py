"""Two decode micro-batches in flight through a pipeline-parallel engine.

With one batch per step, PP stages take turns: stage 1 waits while stage 0 computes,
and stage 0 waits for the logits while the later stages compute. A decode-only step
of two or more sequences is therefore split into two micro-batches, A and B:

    rank 0 (stage 0)   broadcast A (CMD_PAIR) and B | run A, isend h_A | run B, isend h_B
                       | recv logits A | recv logits B
    stage s > 0        recv h_A, run A, send on  | recv h_B, run B, send on
                       (the last stage sends each micro-batch's logits to rank 0)

so stage 1 computes A while stage 0 computes B. Rank 0's sends do not wait, so its
receive of A's logits can match the last stage's send before B's activations move: no
ordering of the blocking sends on the other ranks can deadlock. Every rank sees the
same two steps in the same order, and each micro-batch is an ordinary step to it.
"""

from __future__ import annotations

import torch

from engine.kv_cache import KVCache
from engine.model import LlamaModel
from engine.parallel.comm import RankGroups
from engine.step_inputs import StepInputs


def pipelined_logits(
    model: LlamaModel,
    kv: KVCache,
    steps: tuple[StepInputs, StepInputs],
    device: torch.device,
    groups: RankGroups,
) -> list[torch.Tensor]:
    """Rank 0 (first stage of a PP > 1 engine): run both micro-batches through this
    stage and return each one's sampled rows' logits from the last stage. The steps
    must already be broadcast."""
    layout = groups.layout
    assert layout.rank == 0 and layout.pp > 1
    nxt, last = layout.rank + layout.tp, (layout.pp - 1) * layout.tp
    pending = []
    for step in steps:
        ids, pos, meta, _ = step.unpack(device, kv.layout.block_size)
        h = model(ids, pos, meta, kv)
        pending.append((groups.isend(h, nxt), h))  # h stays referenced until sent
    logits = []
    for step in steps:
        buf = torch.empty(step.num_samples, model.cfg.vocab_size, device=device)
        logits.append(groups.recv(buf, last))
    for work, _ in pending:
        work.wait()
    return logits
