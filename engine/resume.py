"""Continuing a request that another instance started (a migrated stream).

A `Resume` names the tokens the request already generated elsewhere and how much of
their text the client already has. The engine computes the prompt and those tokens
as one prompt (through the prefix cache, or a remote prefill that pushes their KV),
and everything that depends on the output so far picks up where the other instance
left off:

    max_tokens, max_model_len   count the resumed tokens
    penalties                   count them among the generated tokens
    a seeded generator          skips one draw per resumed token (`skip_draws`)
    the detokenizer             replays them from the original prompt's tail, so its
                                text, held-back stop-string prefix and partial
                                characters are as the other instance had them; it
                                emits only the text after `text_chars_sent`
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Resume:
    output_token_ids: tuple[int, ...]  # generated so far, in order (not empty)
    text_chars_sent: int  # characters of their text the client already received

    def validate(self, vocab_size: int, max_tokens: int) -> None:
        """Raise ValueError naming the bad field; side-effect free."""
        n = len(self.output_token_ids)
        if n == 0:
            raise ValueError("resume.output_token_ids must not be empty")
        if any(not 0 <= t < vocab_size for t in self.output_token_ids):
            raise ValueError(f"resume.output_token_ids: every id must be in [0, {vocab_size})")
        if n >= max_tokens:
            raise ValueError(f"resume.output_token_ids: {n} tokens leave none of max_tokens")
        if self.text_chars_sent < 0:
            raise ValueError("resume.text_chars_sent must be >= 0")
