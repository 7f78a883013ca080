"""`pdserve chat`: one streamed reply to a message, or a conversation read from stdin.

    ChatSession(stream, out, system)   the conversation so far (a system message first,
                                       when given)
    turn(text)                         sends the conversation plus `text`, streams the
                                       reply to `out`; on success both join the
                                       conversation, on an error neither does
    converse(session, lines, ...)      one turn per non-empty line until end of input
                                       or a command: /exit (or /quit) ends it, /reset
                                       forgets the conversation (but the system message)

The session talks to the cluster only through `stream` (messages -> chunks), which the
CLI binds to a gRPC `Client`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TextIO

from cluster.client import Chunk, ClientError, Message

StreamFn = Callable[[Sequence[Message]], Iterator[Chunk]]

EXIT_COMMANDS = frozenset({"/exit", "/quit"})
RESET_COMMAND = "/reset"
PROMPT = "> "


class ChatSession:
    def __init__(
        self,
        stream: StreamFn,
        out: TextIO,
        system: str | None = None,
        on_finish: Callable[[Chunk], None] | None = None,
    ) -> None:
        self._stream = stream
        self._out = out
        self._on_finish = on_finish
        self._start: list[Message] = [("system", system)] if system else []
        self.messages: list[Message] = list(self._start)

    def reset(self) -> None:
        self.messages = list(self._start)

    def turn(self, text: str) -> str:
        """Stream the reply to `text`; returns it. Raises ClientError, and then the
        conversation is as it was."""
        asked = [*self.messages, ("user", text)]
        reply: list[str] = []
        for chunk in self._stream(asked):
            self._out.write(chunk.text)
            self._out.flush()
            reply.append(chunk.text)
            if chunk.finish_reason is not None:
                self._out.write("\n")
                self._out.flush()
                if self._on_finish is not None:
                    self._on_finish(chunk)
        answer = "".join(reply)
        self.messages = [*asked, ("assistant", answer)]
        return answer


def converse(
    session: ChatSession, lines: Iterable[str], err: TextIO, prompt: TextIO | None = None
) -> int:
    """Run turns until the input ends or asks to exit. A failed turn is reported on
    `err` and the conversation goes on; returns 1 if any turn failed, else 0. With
    `prompt` (a terminal), a prompt is written there before each line."""
    failed = False
    for line in _prompted(lines, prompt):
        text = line.strip()
        if not text:
            continue
        if text in EXIT_COMMANDS:
            break
        if text == RESET_COMMAND:
            session.reset()
            continue
        try:
            session.turn(text)
        except ClientError as e:
            err.write(f"\npdserve: {e}\n")
            err.flush()
            failed = True
    return 1 if failed else 0


def _prompted(lines: Iterable[str], prompt: TextIO | None) -> Iterator[str]:
    it = iter(lines)
    while True:
        if prompt is not None:
            prompt.write(PROMPT)
            prompt.flush()
        line = next(it, None)
        if line is None:
            if prompt is not None:
                prompt.write("\n")
            return
        yield line
