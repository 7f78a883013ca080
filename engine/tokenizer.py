"""The model's tokenizer, chat template and incremental detokenizer.

Encoding and chat templates come from transformers' fast tokenizer, loaded from the
model directory. `IncrementalDetokenizer` turns a stream of token ids into text
deltas that never split a multi-byte character, and applies stop strings with
vLLM's semantics: the output is cut before the stop string, and while streaming,
text that could still become a stop string is held back.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers.decoders import DecodeStream

ChatMessage = dict[str, str]


class Tokenizer:
    def __init__(self, model_dir: str | Path) -> None:
        from transformers import AutoTokenizer

        self._tok: Any = AutoTokenizer.from_pretrained(str(model_dir))
        self.backend = self._tok.backend_tokenizer
        self.vocab_size = len(self._tok)
        self.eos_token_ids = _eos_ids(Path(model_dir), self._tok.eos_token_id)

    def encode(self, text: str) -> list[int]:
        return list(self._tok(text, add_special_tokens=True).input_ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens))

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._tok, "chat_template", None))

    def apply_chat_template(self, messages: Sequence[ChatMessage]) -> list[int]:
        """Token ids of a conversation, ending with the assistant's generation prompt."""
        if not messages:
            raise ValueError("messages must not be empty")
        for i, m in enumerate(messages):
            if m.get("role") not in ("system", "user", "assistant", "tool"):
                raise ValueError(f"messages[{i}].role must be system, user, assistant or tool")
            if not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}].content must be a string")
        if not self.has_chat_template:
            raise ValueError("messages: this model has no chat template")
        out = self._tok.apply_chat_template(
            list(messages), add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return list(out)


def _eos_ids(model_dir: Path, tokenizer_eos: int | None) -> tuple[int, ...]:
    ids: list[int] = [] if tokenizer_eos is None else [tokenizer_eos]
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        for e in eos if isinstance(eos, list) else [eos]:
            if isinstance(e, int) and e not in ids:
                ids.append(e)
    return tuple(ids)


class IncrementalDetokenizer:
    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Sequence[int], stop: Sequence[str]
    ) -> None:
        self._backend = tokenizer.backend
        # Seed with the prompt's tail so the first output token decodes in context.
        self._stream = DecodeStream(list(prompt_ids[-4:]), skip_special_tokens=True)
        self._stop = list(stop)
        self._holdback = max((len(s) for s in self._stop), default=1) - 1
        self.text = ""
        self._emitted = 0
        self.stop_reason: str | None = None

    def push(self, token_id: int) -> bool:
        """Add one token; True if a stop string now ends the output."""
        piece = self._stream.step(self._backend, token_id)
        if not piece:
            return False
        start = max(0, len(self.text) - self._holdback)
        self.text += piece
        for s in self._stop:
            at = self.text.find(s, start)
            if at >= 0:
                self.text = self.text[:at]
                self.stop_reason = s
                return True
        return False

    def resume(self, token_ids: Sequence[int], chars_sent: int) -> None:
        """Replay tokens another detokenizer already took, of whose text `chars_sent`
        characters were returned; `delta` goes on after them."""
        for i, tok in enumerate(token_ids):
            if self.push(tok):
                raise ValueError(f"resume.output_token_ids[{i}] ends the output at a stop string")
        if chars_sent > len(self.text):
            raise ValueError(
                f"resume.text_chars_sent: {chars_sent}, but the tokens make {len(self.text)}"
            )
        self._emitted = chars_sent

    def delta(self, finished: bool) -> str:
        """Text not yet returned; while running, the possible stop-string prefix waits."""
        end = len(self.text) if finished or not self._stop else len(self.text) - self._holdback
        if end <= self._emitted:
            return ""
        out = self.text[self._emitted : end]
        self._emitted = end
        return out
