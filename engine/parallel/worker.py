"""The loop a non-driving rank of a TP/PP engine runs.

Lifecycle: `RankWorker(...)` joins the instance's groups over the driver's TCPStore,
loads and shards the model and allocates this rank's KV cache (optionally in storage
the caller provides, such as shared memory). `serve()` then runs, for each step that
rank 0 broadcasts, this rank's share of the forward pass (`run_stage`) until rank 0
broadcasts STOP; IDLE steps, which an idle rank 0 sends to stay within the group
timeout, are skipped. A peer that dies makes the next collective fail within the group
timeout, which ends the loop with an error instead of a hang.

A rank that streams its KV out (a prefill instance's rank in a cluster) passes a
`LayerHook` and a `resolve` function to `serve`: each step's prompt chunks carry their
request's tag (`engine.step_inputs.request_tag`), `resolve` turns a tag back into the
request id the hook knows (None for requests the hook does not stream), and the hook
then sees the same calls as rank 0's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from engine.config import EngineConfig, ModelConfig
from engine.forward_hooks import LayerHook, ScheduledChunk
from engine.kv_cache import KVCache, KVCacheLayout
from engine.loader import load_model
from engine.model_runner import broadcast_step, run_stage
from engine.model_source import resolve_model
from engine.parallel.comm import RankGroups, StoreAddress, connect_store
from engine.parallel.layout import ParallelLayout
from engine.step_inputs import CMD_IDLE, CMD_PAIR, CMD_STOP, StepInputs

log = logging.getLogger(__name__)

TagResolver = Callable[[int], str | None]


class RankWorker:
    """One non-driving rank (>= 1): its groups, its model shard and its KV cache."""

    def __init__(
        self,
        config: EngineConfig,
        rank: int,
        store: StoreAddress,
        timeout_s: float = 60.0,
        kv_storage: Callable[[KVCacheLayout], torch.Tensor] | None = None,
        host: str = "127.0.0.1",
        setup_timeout_s: float | None = None,
    ) -> None:
        """`host`: the address this rank's gloo end binds (its node's, across nodes)."""
        if rank < 1:
            raise ValueError("rank 0 drives the engine (LLMEngine); workers are ranks >= 1")
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.layout = ParallelLayout(config.tp, config.pp, rank)
        self.device = torch.device(config.device)
        setup = setup_timeout_s or timeout_s
        self.groups = RankGroups(
            self.layout,
            connect_store(store, setup),
            self.device,
            timeout_s,
            host=host,
            setup_timeout_s=setup,
        )
        model_dir = resolve_model(config.model)
        self.model_config = mc = ModelConfig.from_dir(model_dir)
        max_len = config.max_model_len or mc.max_position_embeddings
        self.model, kv_layout = load_model(config, model_dir, mc, max_len, self.groups)
        storage = kv_storage(kv_layout) if kv_storage else None
        self.kv = KVCache(kv_layout, self.device, storage)
        log.info(
            "rank %d ready: layers %s, kv heads %s",
            rank,
            self.layout.layers(mc),
            self.layout.kv_heads(mc),
        )

    @property
    def layer_offset(self) -> int:
        """Global index of this rank's first layer (hooks get stage-local indices)."""
        return self.layout.layers(self.model_config).start

    def serve(self, hook: LayerHook | None = None, resolve: TagResolver | None = None) -> None:
        """Run steps until rank 0 stops the instance (or a collective fails)."""
        with torch.inference_mode():
            while True:
                step = broadcast_step(self.groups, None)
                if step.command == CMD_STOP:
                    break
                if step.command == CMD_IDLE:
                    continue
                if step.command == CMD_PAIR:  # two decode micro-batches, in order
                    partner = broadcast_step(self.groups, None)
                    run_stage(self.model, self.kv, step, self.device, self.groups)
                    run_stage(self.model, self.kv, partner, self.device, self.groups)
                    continue
                chunks = _chunks(step, resolve) if hook is not None and resolve else ()
                if hook is not None and chunks:
                    self._run_hooked(step, hook, chunks)
                else:
                    run_stage(self.model, self.kv, step, self.device, self.groups)
        log.info("rank %d stopped", self.layout.rank)

    def _run_hooked(
        self, step: StepInputs, hook: LayerHook, chunks: tuple[ScheduledChunk, ...]
    ) -> None:
        def layer_done(i: int) -> None:
            hook.on_layer_done(i, chunks)

        run_stage(self.model, self.kv, step, self.device, self.groups, layer_done)
        hook.on_step_done(chunks)


def _chunks(step: StepInputs, resolve: TagResolver) -> tuple[ScheduledChunk, ...]:
    out = []
    for c in step.prefill_chunks():
        request_id = resolve(c.tag)
        if request_id is not None:
            out.append(ScheduledChunk(request_id, c.block_ids, c.start, c.end, c.completes_prompt))
    return tuple(out)


def run_rank(
    config: EngineConfig,
    rank: int,
    store: StoreAddress,
    timeout_s: float = 60.0,
    setup_timeout_s: float | None = None,
) -> None:
    """Serve steps as `rank` (>= 1) until the driver stops the instance."""
    RankWorker(config, rank, store, timeout_s, setup_timeout_s=setup_timeout_s).serve()
