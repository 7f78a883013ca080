"""Whether decode-only steps run fused (one kernel call per decoder layer), by measurement.

The fused decode-layer kernel saves the Python and dispatch cost of a layer's dozen
ops, but its matmuls are the native kernel's: where that kernel is slow (a CPU it is
not tuned for), or a batch is large enough that the op-by-op path's matmuls win, the
fusion loses. So at load, with `cpu_linear="auto"`, a synthetic decode step of the
model (random hidden states, a scratch KV cache) is timed both ways for each decode
class (one row, a decode batch), interleaved; fusion stays on only for the classes
where it measured faster. The choice is cached next to the kernel build and logged,
like the matmul path (`engine/linear_choice.py`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from engine.attention import AttentionMetadata
from engine.config import CpuLinearKind
from engine.kv_cache import KVCache, KVCacheLayout
from engine.linear_choice import Choice, Measure, RowClasses, cache_key, choose, time_interleaved
from engine.model import Attention, LlamaModel

log = logging.getLogger(__name__)

_CONTEXT_BLOCKS = 2  # blocks of cached context per sequence in the synthetic step
_BLOCK_SIZE = 16


def gate_fused_decode(
    model: LlamaModel,
    kind: CpuLinearKind,
    classes: RowClasses,
    picked: dict[str, str],
    measure: Measure | None = None,
    cache_dir: Path | None = None,
) -> Choice | None:
    """Set `model.fused_rows` (after `use_cpu_kernels`): forced "native" always fuses;
    "auto" fuses only the decode classes where fusion measured faster (`measure`, by
    default a synthetic decode step of this model), or as cached (in `cache_dir`, by
    default the kernel build's directory). Returns the measurement, if one was used."""
    if model.fused_decode is None or model.kernels is None or kind != "auto":
        return None
    rows = {c: r for c, r in classes.rows().items() if c in ("one", "decode")}
    attn = model.layers[0].self_attn
    assert isinstance(attn, Attention)
    key = cache_key(
        what="fused decode", layers=len(model.layers), hidden=model.cfg.hidden_size,
        heads=(attn.num_heads, attn.num_kv_heads, attn.head_dim),
        intermediate=model.cfg.intermediate_size, rows=rows, picked=picked,
        threads=torch.get_num_threads(), torch=torch.__version__,
    )  # fmt: skip
    choice = choose(
        "fused decode layers per row class",
        rows,
        ("fused", "per-op"),
        measure or time_decode_steps(model),
        (cache_dir or model.kernels.path.parent) / f"fused-choice-{key}.json",
        key,
    )
    one = choice.picked["one"] == "fused"
    model.fused_rows = (one, choice.picked.get("decode", "fused" if one else "per-op") == "fused")
    return choice


def time_decode_steps(model: LlamaModel, budget_s: float = 0.3) -> Measure:
    """A `Measure` that runs the model's layers on a decode-only step of `rows`
    sequences (each with two blocks of context), fused and op by op."""
    fused = model.fused_decode

    def measure(cls: str, rows: int, candidates: Sequence[str]) -> dict[str, float]:
        attn = model.layers[0].self_attn
        assert isinstance(attn, Attention)
        layout = KVCacheLayout(
            len(model.layers), attn.num_kv_heads, attn.head_dim, _BLOCK_SIZE,
            rows * _CONTEXT_BLOCKS, torch.float32,
        )  # fmt: skip
        kv = KVCache(layout)
        ctx = _CONTEXT_BLOCKS * _BLOCK_SIZE
        tables = torch.arange(rows * _CONTEXT_BLOCKS, dtype=torch.int64).view(rows, -1)
        meta = AttentionMetadata(
            slot_mapping=tables[:, -1] * _BLOCK_SIZE + _BLOCK_SIZE - 1,
            num_decodes=rows,
            decode_block_tables=tables,
            decode_mask=None,  # every context fills its blocks
            decode_context_lens=torch.full((rows,), ctx, dtype=torch.int64),
            prefills=(),
        )
        positions = torch.full((rows,), ctx - 1, dtype=torch.int64)
        hidden = torch.randn(rows, model.cfg.hidden_size)
        ids = torch.zeros(rows, dtype=torch.int64)

        def step(use: bool) -> Callable[[], None]:
            def run() -> None:
                model.fused_decode = fused if use else None
                model(ids, positions, meta, kv, hidden_in=hidden)

            return run

        try:
            with torch.no_grad():
                fns = {c: step(c == "fused") for c in candidates}
                return time_interleaved(fns, budget_s=budget_s)
        finally:
            model.fused_decode = fused

    return measure
