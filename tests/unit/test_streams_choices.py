"""streams.drain / drain_choices: the one stream-to-wire loop, for one choice and for n
choices streamed at once; every node stream is closed however the loop ends."""

from __future__ import annotations

import asyncio

import pytest

from distributed.domain import Completion, TokenChunk
from distributed.errors import ModelFailed, TarsError
from distributed.streams import drain, drain_choices

pytestmark = pytest.mark.anyio


class Fmt:
    """A wire format that says what it was given, tagged with its choice. The same four methods
    as test_streams.Recorder (the WireFormat protocol), in the shape these tests assert."""

    def __init__(self, tag: str = "") -> None:
        self.tag = tag

    def start(self) -> bytes | None:
        return f"start{self.tag};".encode()

    def token(self, chunk: TokenChunk) -> bytes:
        return f"{chunk.text}{self.tag};".encode() if chunk.text else b""

    def done(self, c: Completion) -> bytes:
        return f"done{self.tag}:{c.finish_reason};".encode()

    def error(self, exc: TarsError | None) -> bytes:
        return f"error:{exc.message if exc else 'internal'};".encode()


class Stream:
    """A node stream: its items (an exception is raised there), then maybe a Completion;
    ``gate`` (if set) holds every item until the test opens it."""

    def __init__(self, items: list, *, gate: asyncio.Event | None = None) -> None:
        self.items, self.gate = items, gate
        self.closed = False
        self.agen = self._run()

    async def _run(self):
        try:
            for item in self.items:
                if self.gate is not None:
                    await self.gate.wait()
                    self.gate.clear()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.closed = True


def done(reason: str = "stop", tokens: int = 1) -> Completion:
    c = Completion(model="m", node="n", text="", finish_reason=reason)
    c.usage.completion_tokens = tokens
    return c


async def collect(agen) -> bytes:
    return b"".join([b async for b in agen])


async def test_one_stream_start_tokens_done_and_the_stream_is_closed():
    s = Stream([TokenChunk("a"), TokenChunk(""), TokenChunk("b"), done(), TokenChunk("never read")])
    first = await s.agen.__anext__()  # what the API reads before it answers 200
    assert await collect(drain(first, s.agen, Fmt())) == b"start;a;b;done:stop;"  # an empty piece sends nothing
    assert s.closed


async def test_a_stream_without_a_completion_or_that_fails_ends_with_the_error_item():
    ended = Stream([TokenChunk("b")])
    assert await collect(drain(TokenChunk("a"), ended.agen, Fmt())) == \
        b"start;a;b;error:the stream ended without a final result;"
    failing = Stream([TokenChunk("b"), ModelFailed("engine gone")])
    assert await collect(drain(TokenChunk("a"), failing.agen, Fmt())) == b"start;a;b;error:engine gone;"
    broken = Stream([RuntimeError("a bug")])
    assert await collect(drain(TokenChunk("a"), broken.agen, Fmt())) == b"start;a;error:internal;"  # no traceback
    assert ended.closed and failing.closed and broken.closed


async def test_a_completion_first_is_the_whole_stream():
    s = Stream([])
    assert await collect(drain(done("length"), s.agen, Fmt())) == b"start;done:length;"


async def test_n_choices_interleave_each_in_its_order_then_the_end_sees_every_completion():
    gates = [asyncio.Event(), asyncio.Event()]
    s0 = Stream([TokenChunk("a1"), TokenChunk("a2"), done("stop", 2)], gate=gates[0])
    s1 = Stream([TokenChunk("b1"), done("length", 1)], gate=gates[1])
    ends: list[list[Completion]] = []

    def end(cs: list[Completion]) -> bytes:
        ends.append(cs)
        return b"end;"

    out: list[bytes] = []
    agen = drain_choices([TokenChunk("a0"), None], [s0.agen, s1.agen], [Fmt("0"), Fmt("1")], end)
    out += [await agen.__anext__() for _ in range(3)]  # both starts, then the first item of choice 0
    assert out == [b"start0;", b"start1;", b"a00;"]
    for g, want in ((1, b"b11;"), (0, b"a10;"), (1, b"done1:length;"), (0, b"a20;"), (0, b"done0:stop;")):
        gates[g].set()  # the choice whose item comes first goes first
        out.append(await agen.__anext__())
        assert out[-1] == want
    assert await agen.__anext__() == b"end;"
    with pytest.raises(StopAsyncIteration):
        await agen.__anext__()
    assert [c.finish_reason for c in ends[0]] == ["stop", "length"]  # in choice order
    assert s0.closed and s1.closed


async def test_one_failing_choice_ends_the_stream_and_closes_every_choice():
    hold = asyncio.Event()  # never set: choice 1 waits for ever unless it is closed
    s0 = Stream([TokenChunk("a1"), ModelFailed("slot lost")])
    s1 = Stream([TokenChunk("b1")], gate=hold)
    out = await collect(drain_choices([None, None], [s0.agen, s1.agen], [Fmt("0"), Fmt("1")], lambda cs: b"end;"))
    assert out == b"start0;start1;a10;error:slot lost;"
    assert s0.closed and s1.closed


async def test_a_client_that_leaves_closes_every_choice():
    hold = asyncio.Event()
    s0 = Stream([TokenChunk("a1"), TokenChunk("a2")], gate=hold)
    s1 = Stream([TokenChunk("b1")], gate=hold)
    agen = drain_choices([TokenChunk("a0"), None], [s0.agen, s1.agen], [Fmt("0"), Fmt("1")])
    assert [await agen.__anext__() for _ in range(3)] == [b"start0;", b"start1;", b"a00;"]
    await agen.aclose()  # what the HTTP layer does on a disconnect
    assert s0.closed and s1.closed
