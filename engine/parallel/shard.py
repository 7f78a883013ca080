"""Cut a loaded model down to one TP/PP rank's share, from outside the model code.

- Q/K/V and gate/up projections become column-parallel: each rank keeps its heads'
  rows (KV rows replicated when there are fewer KV heads than ranks).
- o_proj and down_proj become row-parallel: each rank keeps its input columns and
  the partial outputs are all-reduced.
- The embedding and LM head become vocab-parallel: each rank keeps its vocabulary
  rows; lookups are all-reduced and logits all-gathered.
- A PP stage keeps only its layers, the first stage the embedding and the last the
  final norm and LM head.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from engine.model import DecoderLayer, LlamaModel
from engine.parallel.comm import RankGroups
from engine.parallel.layout import ParallelLayout


class RowParallelLinear(nn.Module):
    def __init__(self, linear: nn.Linear, groups: RankGroups) -> None:
        super().__init__()
        self.linear = linear
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.linear(x)
        return self.groups.all_reduce(out)


class VocabParallelEmbedding(nn.Module):
    def __init__(self, weight: torch.Tensor, start: int, groups: RankGroups) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.start, self.stop = start, start + weight.shape[0]
        self.groups = groups

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mine = (ids >= self.start) & (ids < self.stop)
        local = torch.where(mine, ids - self.start, torch.zeros_like(ids))
        out = self.weight.index_select(0, local) * mine.unsqueeze(-1).to(self.weight.dtype)
        return self.groups.all_reduce(out)


class VocabParallelLMHead(nn.Module):
    def __init__(self, weight: torch.Tensor, groups: RankGroups) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.groups = groups

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.groups.all_gather_last_dim(nn.functional.linear(h, self.weight))


def _rows(w: torch.Tensor, r: range, width: int = 1) -> torch.Tensor:
    return w[r.start * width : r.stop * width]


@torch.no_grad()
def shard_model(model: LlamaModel, layout: ParallelLayout, groups: RankGroups) -> LlamaModel:
    """Shard `model` (full weights loaded) in place for `layout`'s rank."""
    cfg = model.cfg
    layout.check(cfg)
    d = cfg.head_dim
    qh, kvh = layout.q_heads(cfg), layout.kv_heads(cfg)
    inter = layout.shard(cfg.intermediate_size)
    vocab = layout.shard(cfg.vocab_size)
    keep = layout.layers(cfg)

    model.layers = nn.ModuleList(model.layers[i] for i in keep)
    model.layer_offset = keep.start
    for module in model.layers:
        layer = cast(DecoderLayer, module)
        attn, mlp = layer.self_attn, layer.mlp
        if layout.tp > 1:
            q_sz, kv_sz = cfg.num_heads * d, cfg.num_kv_heads * d
            w = attn.qkv_proj.weight
            q, k, v = w[:q_sz], w[q_sz : q_sz + kv_sz], w[q_sz + kv_sz :]
            parts = [_rows(q, qh, d), _rows(k, kvh, d), _rows(v, kvh, d)]
            new_qkv = nn.Linear(
                cfg.hidden_size, sum(p.shape[0] for p in parts), bias=cfg.qkv_bias, dtype=w.dtype
            )
            new_qkv.weight.copy_(torch.cat(parts))
            if cfg.qkv_bias:
                b = attn.qkv_proj.bias
                bq, bk, bv = b[:q_sz], b[q_sz : q_sz + kv_sz], b[q_sz + kv_sz :]
                new_qkv.bias.copy_(
                    torch.cat([_rows(bq, qh, d), _rows(bk, kvh, d), _rows(bv, kvh, d)])
                )
            attn.qkv_proj = new_qkv
            attn.num_heads, attn.num_kv_heads = len(qh), len(kvh)
            attn.q_size, attn.kv_size = len(qh) * d, len(kvh) * d
            o = nn.Linear(len(qh) * d, cfg.hidden_size, bias=False, dtype=w.dtype)
            o.weight.copy_(attn.o_proj.weight[:, qh.start * d : qh.stop * d])
            attn.o_proj = RowParallelLinear(o, groups)  # type: ignore[assignment]

            gate, up = torch.split(mlp.gate_up_proj.weight, cfg.intermediate_size)
            gu = nn.Linear(cfg.hidden_size, 2 * len(inter), bias=False, dtype=w.dtype)
            gu.weight.copy_(torch.cat([_rows(gate, inter), _rows(up, inter)]))
            mlp.gate_up_proj, mlp.intermediate = gu, len(inter)
            down = nn.Linear(len(inter), cfg.hidden_size, bias=False, dtype=w.dtype)
            down.weight.copy_(mlp.down_proj.weight[:, inter.start : inter.stop])
            mlp.down_proj = RowParallelLinear(down, groups)  # type: ignore[assignment]

    emb = model.embed_tokens.weight
    head = model.lm_head.weight
    if layout.is_first_stage:
        model.embed_tokens = VocabParallelEmbedding(  # type: ignore[assignment]
            _rows(emb, vocab).clone(), vocab.start, groups
        )
    else:
        model.embed_tokens = None  # type: ignore[assignment]
    if layout.is_last_stage:
        model.lm_head = VocabParallelLMHead(  # type: ignore[assignment]
            _rows(head, vocab).clone(), groups
        )
    else:
        model.lm_head = None  # type: ignore[assignment]
        model.norm = None  # type: ignore[assignment]
    return model
