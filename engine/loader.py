"""Build one rank's model and KV cache layout from an engine config.

Every rank of a TP/PP engine (the driver and the workers) calls `load_model`, so all
of them shard the same weights the same way and size the same number of KV blocks.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine.config import EngineConfig, ModelConfig
from engine.cpu_kernels import load_kernels
from engine.cpu_linear import pack_linears
from engine.decode_gate import gate_fused_decode
from engine.kv_cache import KVCacheLayout
from engine.linear_choice import RowClasses
from engine.model import LlamaModel
from engine.model_source import load_state_dict
from engine.parallel.comm import RankGroups
from engine.parallel.layout import ParallelLayout
from engine.parallel.shard import shard_model


def load_model(
    config: EngineConfig,
    model_dir: Path,
    mc: ModelConfig,
    max_model_len: int,
    groups: RankGroups | None,
) -> tuple[LlamaModel, KVCacheLayout]:
    dtype = config.torch_dtype
    layout = groups.layout if groups else ParallelLayout()
    layout.check(mc)
    model = LlamaModel(mc, max_model_len).to(dtype)
    model.load_hf_weights(load_state_dict(model_dir, dtype))
    if groups is not None and layout.world_size > 1:
        shard_model(model, layout, groups)
    model.rotary.float()  # cos/sin tables stay fp32 whatever the weights' dtype
    device = torch.device(config.device)
    model.to(device).eval()
    if device.type == "cpu":
        classes = RowClasses.for_engine(config.max_num_seqs, config.max_num_batched_tokens)
        packing = pack_linears(
            model, dtype, config.cpu_linear, classes, min_gain=config.cpu_linear_min_gain
        )
        model.linear_choice = packing.choice
        kernels = packing.kernels
        if kernels is None and config.cpu_linear == "auto" and dtype == torch.float32:
            # No matmul runs native here, but the norms, the SwiGLU gate and decode
            # attention still do: with onednn matmuls on the AVX2 build, a 32-row
            # decode step took 0.88 of the time it took on torch's ops (one thread,
            # CPU time, interleaved), decode attention reading the cache in place
            # instead of gathering it.
            kernels = load_kernels()
        if kernels is not None:
            model.use_cpu_kernels(kernels)
            gate = gate_fused_decode(model, config.cpu_linear, classes, packing.picked)
            model.fused_choice = gate
    kv_layout = KVCacheLayout.from_budget(
        mc,
        config.block_size,
        config.kv_cache_bytes,
        dtype,
        num_layers=len(layout.layers(mc)),
        num_kv_heads=len(layout.kv_heads(mc)),
    )
    return model, kv_layout
