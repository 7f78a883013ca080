"""Tokenization in the router: prompts and chat templates become token ids once, here,
and the prompt's chained block hashes are computed for prefix-aware routing.

The router loads only the tokenizer and the model's config (no weights); the hashes
are the engine's (`engine.block_hash`), so they match what instances publish.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.block_hash import chain_hashes
from engine.config import ModelConfig
from engine.tokenizer import ChatMessage, Tokenizer


class PromptEncoder:
    def __init__(self, model_dir: str, block_size: int) -> None:
        self.model = ModelConfig.from_dir(model_dir)
        self.tokenizer = Tokenizer(model_dir)
        self.block_size = block_size

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        """Token ids of a conversation plus the generation prompt. ValueError names
        the bad message as `messages[i].field`."""
        return self.tokenizer.apply_chat_template(messages)

    def block_hashes(self, token_ids: Sequence[int]) -> tuple[int, ...]:
        return tuple(chain_hashes(token_ids, self.block_size))
