"""The offline API, in the form vLLM users know.

    llm = LLM(model="smollm2-135m-instruct")
    outs = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=32))
    outs = llm.chat([[{"role": "user", "content": "Hi"}]], SamplingParams(max_tokens=32))

A whole batch is validated before any request is queued, so one bad prompt raises
ValueError (naming the field) and leaves the engine untouched.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.parallel.launch import LocalRanks
from engine.sampling import SamplingParams
from engine.tokenizer import ChatMessage

Prompt = str | list[int]


class LLM:
    def __init__(self, model: str = "smollm2-135m-instruct", **engine_args: Any) -> None:
        config = EngineConfig(model=model, **engine_args)
        self._ranks: LocalRanks | None = None
        groups = None
        if config.tp * config.pp > 1:
            self._ranks = LocalRanks(config)
            groups = self._ranks.groups
        try:
            self.engine = LLMEngine(config, groups=groups)
        except BaseException:
            self.close()
            raise
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def close(self) -> None:
        """Stop the rank processes of a TP/PP engine."""
        if self._ranks is not None:
            if hasattr(self, "engine"):
                self.engine.shutdown()
            self._ranks.close()
            self._ranks = None

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(
        self,
        prompts: Sequence[Prompt] | Prompt,
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        batch: list[Prompt]
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            batch = [prompts]  # type: ignore[list-item]
        else:
            batch = list(prompts)  # type: ignore[arg-type]
        token_lists = [self._encode(p, i) for i, p in enumerate(batch)]
        return self._run(token_lists, params)

    def chat(
        self,
        conversations: Sequence[Sequence[ChatMessage]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        token_lists = []
        for i, conv in enumerate(conversations):
            try:
                token_lists.append(self.tokenizer.apply_chat_template(conv))
            except ValueError as e:
                raise ValueError(f"conversations[{i}]: {e}") from None
        return self._run(token_lists, params)

    def stream(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
    ) -> Iterator[RequestOutput]:
        """Yield a RequestOutput per new token of one prompt."""
        ids = self._encode(prompt, 0)
        params = params or SamplingParams()
        rid = f"stream-{next(self._ids)}"
        self.engine.add_request(rid, ids, params)
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id == rid:
                        yield out
                        if out.finished:
                            return
        finally:
            self.engine.abort_request(rid)

    def _encode(self, prompt: Prompt, index: int) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        raise ValueError(f"prompts[{index}] must be a string or a list of token ids")

    def _run(
        self, token_lists: list[list[int]], params: SamplingParams | Sequence[SamplingParams] | None
    ) -> list[RequestOutput]:
        if params is None or isinstance(params, SamplingParams):
            plist = [params or SamplingParams()] * len(token_lists)
        else:
            plist = list(params)
            if len(plist) != len(token_lists):
                raise ValueError("params: need one SamplingParams per prompt")
        for i, (ids, p) in enumerate(zip(token_lists, plist, strict=True)):
            try:
                self.engine.validate(ids, p)
            except ValueError as e:
                raise ValueError(f"prompts[{i}]: {e}") from None
        rids = [f"offline-{next(self._ids)}" for _ in token_lists]
        for rid, ids, p in zip(rids, token_lists, plist, strict=True):
            self.engine.add_request(rid, ids, p)
        final: dict[str, RequestOutput] = {}
        try:
            while len(final) < len(rids):
                for out in self.engine.step():
                    if out.finished:
                        final[out.request_id] = out
        finally:
            for rid in rids:
                if rid not in final:
                    self.engine.abort_request(rid)
        return [final[r] for r in rids]
