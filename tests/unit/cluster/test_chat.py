"""`pdserve chat`'s conversation loop, against a scripted stand-in for the cluster's
stream: what each turn sends, what reaches stdout and stderr, and the commands."""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence

import grpc

from cluster.chat import ChatSession, converse
from cluster.client import Chunk, ClientError, Message


class Scripted:
    """Answers each turn with the next reply, in two chunks; records what it was sent.
    A reply of None fails that turn the way the server rejects a request."""

    def __init__(self, replies: Sequence[str | None]) -> None:
        self._replies = list(replies)
        self.sent: list[list[Message]] = []

    def __call__(self, messages: Sequence[Message]) -> Iterator[Chunk]:
        self.sent.append(list(messages))
        reply = self._replies.pop(0)
        if reply is None:
            raise ClientError(grpc.StatusCode.INVALID_ARGUMENT, "prompt: too long")
        half = len(reply) // 2
        yield Chunk("r", (1,), reply[:half])
        yield Chunk("r", (2,), reply[half:], finish_reason="stop")


def test_the_conversation_is_kept_across_turns_until_exit() -> None:
    server, out, err = Scripted(["Hello!", "Fine."]), io.StringIO(), io.StringIO()
    session = ChatSession(server, out, system="Be brief.")
    lines = ["Hi\n", "\n", "How are you?\n", "/exit\n", "never sent\n"]
    assert converse(session, lines, err) == 0
    assert out.getvalue() == "Hello!\nFine.\n"
    assert err.getvalue() == ""
    assert server.sent == [
        [("system", "Be brief."), ("user", "Hi")],
        [
            ("system", "Be brief."),
            ("user", "Hi"),
            ("assistant", "Hello!"),
            ("user", "How are you?"),
        ],
    ]


def test_end_of_input_ends_it_and_reset_keeps_only_the_system_message() -> None:
    server, out = Scripted(["a", "b"]), io.StringIO()
    session = ChatSession(server, out, system="S")
    assert converse(session, ["one\n", "/reset\n", "two"], io.StringIO()) == 0
    assert server.sent[1] == [("system", "S"), ("user", "two")]
    assert session.messages == [("system", "S"), ("user", "two"), ("assistant", "b")]


def test_a_failed_turn_is_reported_and_left_out_of_the_conversation() -> None:
    server, out, err = Scripted(["x", None, "y"]), io.StringIO(), io.StringIO()
    session = ChatSession(server, out)
    assert converse(session, ["first", "too long", "third"], err) == 1
    assert "INVALID_ARGUMENT: prompt: too long" in err.getvalue()
    assert server.sent[2] == [("user", "first"), ("assistant", "x"), ("user", "third")]
    assert out.getvalue() == "x\ny\n"


def test_a_terminal_gets_a_prompt_per_line_and_timings_per_reply() -> None:
    finished: list[Chunk] = []
    server, out, tty = Scripted(["ok"]), io.StringIO(), io.StringIO()
    session = ChatSession(server, out, on_finish=finished.append)
    assert converse(session, ["hi"], io.StringIO(), prompt=tty) == 0
    assert tty.getvalue() == "> > \n"
    assert [c.finish_reason for c in finished] == ["stop"]


def test_one_message_is_one_turn() -> None:
    server, out = Scripted(["Hey."]), io.StringIO()
    assert ChatSession(server, out).turn("Hi!") == "Hey."
    assert out.getvalue() == "Hey.\n" and server.sent == [[("user", "Hi!")]]
