"""The loop a non-driving rank of a TP/PP engine runs.

Lifecycle: join the instance's groups over the driver's TCPStore, load and shard the
model, allocate this rank's KV cache, then for each step broadcast by rank 0 run this
rank's share of the forward pass (`run_stage`), until rank 0 broadcasts STOP. A peer
that dies makes the next collective fail within the group timeout, which ends the loop
with an error instead of a hang.
"""

from __future__ import annotations

import logging

import torch

from engine.config import EngineConfig, ModelConfig
from engine.kv_cache import KVCache
from engine.loader import load_model
from engine.model_runner import broadcast_step, run_stage
from engine.model_source import resolve_model
from engine.parallel.comm import RankGroups, StoreAddress, connect_store
from engine.parallel.layout import ParallelLayout
from engine.step_inputs import CMD_STOP

log = logging.getLogger(__name__)


def run_rank(config: EngineConfig, rank: int, store: StoreAddress, timeout_s: float = 60.0) -> None:
    """Serve steps as `rank` (>= 1) until the driver stops the instance."""
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    layout = ParallelLayout(config.tp, config.pp, rank)
    device = torch.device(config.device)
    groups = RankGroups(layout, connect_store(store, timeout_s), device, timeout_s)
    model_dir = resolve_model(config.model)
    mc = ModelConfig.from_dir(model_dir)
    max_len = config.max_model_len or mc.max_position_embeddings
    model, kv_layout = load_model(config, model_dir, mc, max_len, groups)
    kv = KVCache(kv_layout, device)
    log.info("rank %d ready: layers %s, kv heads %s", rank, layout.layers(mc), layout.kv_heads(mc))
    with torch.inference_mode():
        while True:
            step = broadcast_step(groups, None)
            if step.command == CMD_STOP:
                break
            run_stage(model, kv, step, device, groups)
    log.info("rank %d stopped", rank)
