"""A Llama-family decoder in plain torch (Llama 2/3, Mistral, Qwen2, SmolLM).

RMSNorm, RoPE (with linear or llama3 scaling), grouped-query attention over the
paged KV cache, SwiGLU, optional tied embeddings. Q/K/V and gate/up projections are
stored merged, so a layer runs four matmuls. HF checkpoint names are mapped in
`load_hf_weights`; parallel sharding is applied from outside this module.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import AttentionMetadata, paged_attention, write_kv
from engine.config import ModelConfig, RopeConfig
from engine.cpu_kernels import CpuKernels
from engine.cpu_linear import NativeLinear, native_part
from engine.decode_args import DecodeLayer, LayerWeights
from engine.kv_cache import KVCache
from engine.linear_choice import Choice

LayerDone = Callable[[int], None]
RopeTable = tuple[torch.Tensor, torch.Tensor]


class RMSNorm(nn.Module):
    kernels: CpuKernels | None = None  # set by `LlamaModel.use_cpu_kernels`

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None and x.dim() == 2:
            return self.kernels.rms_norm(x, self.weight, self.eps)
        # Same op order as the reference implementation, for bit-faithful fp32.
        var = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype)


def rope_inv_freq(dim: int, rope: RopeConfig) -> torch.Tensor:
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if rope.kind == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.kind == "llama3":
        low_wavelen = rope.original_max_position / rope.low_freq_factor
        high_wavelen = rope.original_max_position / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


class Rotary(nn.Module):
    """Half-split rotary embedding with a precomputed cos/sin table."""

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, head_dim: int, max_positions: int, rope: RopeConfig) -> None:
        super().__init__()
        freqs = torch.outer(torch.arange(max_positions).float(), rope_inv_freq(head_dim, rope))
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def table(self, positions: torch.Tensor, dtype: torch.dtype) -> RopeTable:
        """cos/sin rows for a step's positions, shaped to broadcast over heads."""
        return (
            self.cos.index_select(0, positions).unsqueeze(1).to(dtype),
            self.sin.index_select(0, positions).unsqueeze(1).to(dtype),
        )


def apply_rotary(x: torch.Tensor, rope: RopeTable) -> torch.Tensor:
    """Rotate x [T, heads, dim] by the step's cos/sin table."""
    cos, sin = rope
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    kernels: CpuKernels | None = None

    def __init__(self, cfg: ModelConfig, num_heads: int, num_kv_heads: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = num_heads * cfg.head_dim, num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(
            cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias
        )
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.scale = cfg.head_dim**-0.5

    def forward(
        self,
        x: torch.Tensor,
        rope: RopeTable,
        meta: AttentionMetadata,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        # Q and K heads are rotated together: one pass instead of two.
        qk = apply_rotary(qkv[:, : self.q_size + self.kv_size].view(t, -1, self.head_dim), rope)
        q, k = torch.split(qk, [self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, self.q_size + self.kv_size :].view(t, self.num_kv_heads, self.head_dim)
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        o = paged_attention(q, k, v, k_cache, v_cache, meta, self.scale, self.kernels)
        out: torch.Tensor = self.o_proj(o.reshape(t, self.q_size))
        return out


class MLP(nn.Module):
    kernels: CpuKernels | None = None

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.intermediate = intermediate
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.kernels is not None and x.dim() == 2:
            act = self.kernels.silu_mul(gate_up)
        else:
            gate, up = gate_up.split(self.intermediate, dim=-1)
            act = F.silu(gate) * up
        out: torch.Tensor = self.down_proj(act)
        return out


class DecoderLayer(nn.Module):
    def __init__(
        self, cfg: ModelConfig, num_heads: int, num_kv_heads: int, intermediate: int
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, num_heads, num_kv_heads)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, intermediate)

    def forward(
        self,
        h: torch.Tensor,
        rope: RopeTable,
        meta: AttentionMetadata,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), rope, meta, k_cache, v_cache)
        out: torch.Tensor = h + self.mlp(self.post_attention_layernorm(h))
        return out


def _decode_layer(layer: DecoderLayer) -> DecodeLayer | None:
    """The fused decode kernel's view of `layer`, or None if its matmuls don't all have
    a native packing or its attention can't run on the kernels."""
    attn, mlp = layer.self_attn, layer.mlp
    mods = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
    linears = [native_part(m) for m in mods]
    if attn.kernels is None or None in linears:
        return None
    qkv, o, gate_up, down = cast(list[NativeLinear], linears)
    if o.bias is not None or gate_up.bias is not None or down.bias is not None:
        return None
    norm1, norm2 = layer.input_layernorm, layer.post_attention_layernorm
    return DecodeLayer(
        LayerWeights(
            input_norm=norm1.weight.detach(),
            qkv=qkv.packed,
            qkv_bias=qkv.bias,
            o=o.packed,
            post_norm=norm2.weight.detach(),
            gate_up=gate_up.packed,
            down=down.packed,
            hidden=o.out_features,
            q_heads=attn.num_heads,
            kv_heads=attn.num_kv_heads,
            head_dim=attn.head_dim,
            intermediate=down.in_features,
            eps=norm1.eps,
            scale=attn.scale,
        )
    )


class LlamaModel(nn.Module):
    """The decoder. `layers` may be a contiguous slice of the model (a PP stage)."""

    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size)
            for _ in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = Rotary(cfg.head_dim, max_positions, cfg.rope)
        self.layer_offset = 0  # global index of layers[0] (a PP stage starts later)
        self.kernels: CpuKernels | None = None
        self.fused_decode: list[DecodeLayer] | None = None  # see `use_cpu_kernels`
        # Which decode-only steps run fused: (one row, more rows); see engine/decode_gate.py
        self.fused_rows: tuple[bool, bool] = (True, True)
        # The measurements behind the CPU paths (set by the loader; for reports)
        self.linear_choice: Choice | None = None
        self.fused_choice: Choice | None = None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv: KVCache,
        layer_done: LayerDone | None = None,
        hidden_in: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Packed tokens [T] -> hidden states [T, hidden].

        A pipeline stage after the first passes the previous stage's output as
        `hidden_in`; the last stage returns normalized states, the others raw ones.
        `layer_done` gets stage-local layer indices (add `layer_offset` for global).
        """
        h: torch.Tensor = self.embed_tokens(input_ids) if hidden_in is None else hidden_in
        if (
            self.fused_decode is not None
            and meta.num_decodes == h.shape[0]
            and not meta.prefills
            and self.fused_rows[h.shape[0] > 1]
        ):
            h = self._fused_decode(h, hidden_in is not None, positions, meta, kv, layer_done)
            return h if self.norm is None else cast(torch.Tensor, self.norm(h))
        rope = self.rotary.table(positions, h.dtype)
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, meta, kv.keys(i), kv.values(i))
            if layer_done is not None:
                layer_done(i)
        if self.norm is None:
            return h
        out: torch.Tensor = self.norm(h)
        return out

    def use_cpu_kernels(self, kernels: CpuKernels) -> None:
        """Run norms, the SwiGLU gate and decode attention on the native CPU kernels
        (an fp32 model on the CPU, its linears packed for them). Decode-only steps can
        then run each layer in one kernel call (`fused_decode`, for the row counts
        `fused_rows` allows), unless a layer's matmuls are wrapped (tensor parallelism
        reduces between them)."""
        for m in self.modules():
            if isinstance(m, RMSNorm | MLP) or (
                isinstance(m, Attention) and m.num_heads <= kernels.max_attention_heads
            ):
                m.kernels = kernels
        self.kernels = kernels
        fused = [_decode_layer(cast(DecoderLayer, layer)) for layer in self.layers]
        ok = fused and None not in fused
        self.fused_decode = [f for f in fused if f is not None] if ok else None

    def _fused_decode(
        self,
        h: torch.Tensor,
        borrowed: bool,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv: KVCache,
        layer_done: LayerDone | None,
    ) -> torch.Tensor:
        """The decoder layers for a step of decode tokens only (see `use_cpu_kernels`)."""
        assert self.kernels is not None and self.fused_decode is not None
        assert meta.decode_block_tables is not None and meta.decode_context_lens is not None
        h = h.clone() if borrowed or not h.is_contiguous() else h  # updated in place
        step = self.kernels.decode_step(
            self.fused_decode[0],
            positions,
            meta.slot_mapping,
            meta.decode_block_tables,
            meta.decode_context_lens,
            self.rotary.cos,
            self.rotary.sin,
            kv.layout.block_size,
        )
        for i, layer in enumerate(self.fused_decode):
            self.kernels.decode_layer(layer, step, h, kv.keys(i), kv.values(i))
            if layer_done is not None:
                layer_done(i)
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.lm_head(hidden)
        return logits.float()

    @torch.no_grad()
    def load_hf_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy an HF Llama state dict in, merging Q/K/V and gate/up."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()

        def put(name: str, value: torch.Tensor) -> None:
            dst = params[name]
            if dst.shape != value.shape:
                raise ValueError(
                    f"weight {name}: shape {tuple(value.shape)}, expected {tuple(dst.shape)}"
                )
            dst.copy_(value)
            loaded.add(name)

        for i in range(self.cfg.num_layers):
            p = f"model.layers.{i}."
            attn = p + "self_attn."
            put(
                f"layers.{i}.self_attn.qkv_proj.weight",
                torch.cat([weights[attn + f"{n}_proj.weight"] for n in "qkv"]),
            )
            if self.cfg.qkv_bias:
                put(
                    f"layers.{i}.self_attn.qkv_proj.bias",
                    torch.cat([weights[attn + f"{n}_proj.bias"] for n in "qkv"]),
                )
            put(f"layers.{i}.self_attn.o_proj.weight", weights[attn + "o_proj.weight"])
            put(
                f"layers.{i}.mlp.gate_up_proj.weight",
                torch.cat([weights[p + "mlp.gate_proj.weight"], weights[p + "mlp.up_proj.weight"]]),
            )
            put(f"layers.{i}.mlp.down_proj.weight", weights[p + "mlp.down_proj.weight"])
            for norm in ("input_layernorm", "post_attention_layernorm"):
                put(f"layers.{i}.{norm}.weight", weights[p + norm + ".weight"])
        put("embed_tokens.weight", weights["model.embed_tokens.weight"])
        put("norm.weight", weights["model.norm.weight"])
        if not self.cfg.tie_word_embeddings:
            put("lm_head.weight", weights["lm_head.weight"])
        else:
            loaded.add("lm_head.weight")
        missing = set(params) - loaded
        if missing:
            raise ValueError(f"weights missing for: {sorted(missing)[:5]}")
