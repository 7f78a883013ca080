"""Reference greedy decoding with HF transformers, and the near-tie check.

The reference runs LlamaForCausalLM on the same fp32 weights, one token at a time
with its own KV cache, and keeps each step's logits, so that a divergence can be
checked against the reference's top-2 logprob gap instead of being assumed a tie.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

NEAR_TIE = 1e-3


@dataclass
class Reference:
    tokens: list[int]
    gaps: list[float]  # top-1 minus top-2 logprob at each step


def load_hf(model_dir: Path) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, attn_implementation="sdpa"
    )
    return model.eval()


@torch.inference_mode()
def hf_greedy(model: torch.nn.Module, prompt: list[int], max_tokens: int) -> Reference:
    out = model(torch.tensor([prompt]), use_cache=True)
    tokens: list[int] = []
    gaps: list[float] = []
    for _ in range(max_tokens):
        lp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        top = lp.topk(2)
        tok = int(top.indices[0])
        tokens.append(tok)
        gaps.append(float(top.values[0] - top.values[1]))
        out = model(torch.tensor([[tok]]), past_key_values=out.past_key_values, use_cache=True)
    return Reference(tokens, gaps)


def assert_matches(ours: list[int], ref: Reference, label: str) -> None:
    """Token-identical, or diverging only where the reference had a near-tie."""
    for i, (a, b) in enumerate(zip(ours, ref.tokens, strict=False)):
        if a != b:
            assert ref.gaps[i] < NEAR_TIE, (
                f"{label}: token {i} differs ({a} vs HF {b}) and HF's top-2 gap "
                f"{ref.gaps[i]:.2e} is not a near-tie"
            )
            return
    assert len(ours) == len(ref.tokens), f"{label}: {len(ours)} tokens vs HF {len(ref.tokens)}"
