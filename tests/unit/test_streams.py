"""streams: the one stream-to-wire loop (``drain``) through each wire format — native SSE,
OpenAI SSE, NDJSON JSON-RPC — and waiting on a client that may go away (``until_disconnect``
→ ``ClientGone``; ``api/streaming`` builds on both).

The node streams here are real async generators; what is checked is the order on the wire
(start, tokens, then exactly one done or error item) and that the node stream is closed
whichever way the answer ends, since closing it is what stops the generation.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from distributed.api import chat_surface as cs
from distributed.api.native import NativeSse
from distributed.api.openai import _OpenAISse
from distributed.api.streaming import EventStream, first_item
from distributed.domain import Completion, TokenChunk, Usage
from distributed.errors import Overloaded, TarsError
from distributed.rpc import protocol as p
from distributed.rpc.server import NdjsonFormat
from distributed.streams import ClientGone, drain, drain_choices, until_disconnect

pytestmark = pytest.mark.anyio


DONE = Completion(model="m", node="pc2", text="", finish_reason="stop", usage=Usage(3, 2), via="pc1")


class NodeStream:
    """A node stream: ``items`` in order, an exception among them raised where it stands;
    ``endless`` keeps yielding tokens after them. ``closed`` is set when the generator is
    closed (what stops a generation)."""

    def __init__(self, *items: Any, endless: bool = False) -> None:
        self.items, self.endless = items, endless
        self.closed = asyncio.Event()
        self.yielded = 0
        self.agen = self._run()

    async def _run(self) -> AsyncIterator[Any]:
        try:
            for item in self.items:
                if isinstance(item, BaseException):
                    raise item
                self.yielded += 1
                yield item
            while self.endless:
                await asyncio.sleep(0)
                self.yielded += 1
                yield TokenChunk(text="more ")
        finally:
            self.closed.set()

    async def wire(self, fmt: Any) -> list[bytes]:
        """Everything ``drain`` sends for this stream (the first item fetched as the API does)."""
        first = await self.agen.__anext__()
        return [b async for b in drain(first, self.agen, fmt)]


class Recorder:
    """A wire format that names what it was asked for, to check the order alone."""

    def __init__(self, head: bytes | None = b"start") -> None:
        self.head = head

    def start(self) -> bytes | None:
        return self.head

    def token(self, chunk: TokenChunk) -> bytes:
        return f"token {chunk.text}".encode() if chunk.text else b""

    def done(self, completion: Completion) -> bytes:
        return f"done {completion.finish_reason}".encode()

    def error(self, exc: TarsError | None) -> bytes:
        return f"error {exc.message if exc is not None else None}".encode()


# ----------------------------------------------------------------------------- the order on the wire
async def test_start_then_each_token_then_done_and_the_stream_is_closed() -> None:
    s = NodeStream(TokenChunk("a"), TokenChunk(""), TokenChunk("b"), DONE)
    assert await s.wire(Recorder()) == [b"start", b"token a", b"token b", b"done stop"]  # empty piece: no bytes
    assert s.closed.is_set()


async def test_no_start_bytes_when_the_format_has_none() -> None:
    assert await NodeStream(TokenChunk("a"), DONE).wire(Recorder(head=None)) == [b"token a", b"done stop"]


async def test_a_stream_whose_first_item_is_the_completion_is_start_then_done() -> None:
    s = NodeStream(DONE)
    assert await s.wire(Recorder()) == [b"start", b"done stop"]
    assert s.closed.is_set()


async def test_an_error_after_the_first_token_ends_the_wire_with_the_error_item() -> None:
    s = NodeStream(TokenChunk("a"), TokenChunk("b"), Overloaded("queue full mid-way", retry_after=2.0), DONE)
    assert await s.wire(Recorder()) == [b"start", b"token a", b"token b", b"error queue full mid-way"]
    assert s.closed.is_set() and s.yielded == 2  # nothing after the failure


async def test_an_unexpected_failure_says_only_internal_and_logs_the_traceback(caplog) -> None:
    s = NodeStream(TokenChunk("a"), RuntimeError("secret detail"))
    with caplog.at_level(logging.ERROR, logger="distributed.streams"):
        assert await s.wire(Recorder()) == [b"start", b"token a", b"error None"]
    assert "stream failed after its first token" in caplog.text and "secret detail" in caplog.text
    assert s.closed.is_set()


async def test_a_stream_that_ends_without_a_completion_ends_with_an_error() -> None:
    s = NodeStream(TokenChunk("a"))
    assert await s.wire(Recorder()) == [b"start", b"token a", b"error the stream ended without a final result"]
    assert s.closed.is_set()


async def test_a_consumer_that_leaves_early_closes_the_node_stream() -> None:
    s = NodeStream(TokenChunk("a"), endless=True)
    wire = drain(await s.agen.__anext__(), s.agen, Recorder())
    assert [await wire.__anext__() for _ in range(3)] == [b"start", b"token a", b"token more "]
    await wire.aclose()  # what the ASGI response does when its client went away
    assert s.closed.is_set()


# ----------------------------------------------------------------------------- native SSE (/inference)
def sse_events(wire: list[bytes]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for block in b"".join(wire).decode().split("\n\n"):
        if block:
            event, data = block.split("\n")
            out.append((event.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out


async def test_native_sse_tokens_then_done_with_the_whole_text() -> None:
    events = sse_events(await NodeStream(TokenChunk("Hel"), TokenChunk("lo"), DONE).wire(NativeSse("pc1")))
    assert [e for e, _ in events] == ["token", "token", "done"]
    assert [d["text"] for _, d in events[:2]] == ["Hel", "lo"] and events[0][1]["type"] == "token"
    done = events[2][1]
    assert done["type"] == "done" and done["text"] == "Hello" and done["node"] == "pc2" and done["via"] == "pc1"
    assert done["usage"]["prompt_tokens"] == 3 and done["finish_reason"] == "stop"


async def test_native_sse_error_after_the_first_token_is_an_error_event() -> None:
    events = sse_events(await NodeStream(TokenChunk("a"), Overloaded("queue full", retry_after=2.0))
                        .wire(NativeSse("pc1")))
    assert [e for e, _ in events] == ["token", "error"]
    err = events[1][1]
    assert err["type"] == "error" and err["node"] == "pc1"
    assert err["error"]["type"] == "overloaded" and err["error"]["message"] == "queue full"


async def test_native_sse_unexpected_failure_names_no_detail() -> None:
    events = sse_events(await NodeStream(TokenChunk("a"), KeyError("internal name")).wire(NativeSse("pc1")))
    assert events[-1][0] == "error" and "internal name" not in json.dumps(events[-1][1])
    assert events[-1][1]["error"]["type"] == "internal_error"


# ----------------------------------------------------------------------------- OpenAI SSE (/v1/*)
def data_lines(wire: list[bytes]) -> list[Any]:
    out: list[Any] = []
    for block in b"".join(wire).decode().split("\n\n"):
        if block:
            data = block.removeprefix("data: ")
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


class OpenAIWire:
    """The OpenAI route's stream: one choice's chunks, then (``end``, after the finish chunk)
    the usage chunk when asked for and ``[DONE]`` — an error chunk ends with its own ``[DONE]``."""

    def __init__(self, kind: Any = "chat", include_usage: bool = False) -> None:
        self.enc = cs.ChunkEncoder(kind, "m", "chatcmpl-1", 1700000000)
        self.include_usage = include_usage

    def end(self, completions: list[Any]) -> bytes:
        return (self.enc.usage(completions) if self.include_usage else b"") + b"data: [DONE]\n\n"


async def openai_wire(stream: "NodeStream", kind: Any = "chat", include_usage: bool = False) -> list[bytes]:
    w = OpenAIWire(kind, include_usage)
    first = await stream.agen.__anext__()
    return [b async for b in drain_choices([first], [stream.agen], [_OpenAISse(w.enc, "pc1")], w.end)]


async def test_openai_chat_role_then_deltas_then_finish_and_done() -> None:
    lines = data_lines(await openai_wire(NodeStream(TokenChunk("Hi"), TokenChunk(" there"), DONE)))
    assert lines[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}  # start: the role
    assert [c["choices"][0]["delta"]["content"] for c in lines[1:3]] == ["Hi", " there"]
    assert lines[3]["choices"][0]["finish_reason"] == "stop" and lines[3]["choices"][0]["delta"] == {}
    assert lines[4:] == ["[DONE]"]
    assert {c["id"] for c in lines[:4]} == {"chatcmpl-1"}


async def test_openai_completion_has_no_role_and_usage_comes_before_done() -> None:
    lines = data_lines(await openai_wire(NodeStream(TokenChunk("x"), DONE), "completion", include_usage=True))
    assert lines[0]["choices"][0]["text"] == "x" and lines[0]["object"] == "text_completion"
    assert lines[1]["choices"][0]["finish_reason"] == "stop"
    assert lines[2]["choices"] == [] and lines[2]["usage"]["total_tokens"] == 5
    assert lines[3:] == ["[DONE]"]


async def test_openai_tool_calls_piece_is_one_delta() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    lines = data_lines(await openai_wire(NodeStream(TokenChunk("", tool_calls=[call]), DONE)))
    assert lines[1]["choices"][0]["delta"]["tool_calls"] == [{"index": 0, **call}]


async def test_openai_error_after_the_first_token_is_an_error_chunk_then_done() -> None:
    lines = data_lines(await openai_wire(NodeStream(TokenChunk("a"), Overloaded("queue full", retry_after=2.0))))
    assert lines[1]["choices"][0]["delta"]["content"] == "a"
    assert lines[2]["error"]["code"] == "overloaded" and lines[2]["error"]["message"] == "queue full"
    assert lines[2]["error"]["type"] == "rate_limit_error" and lines[3:] == ["[DONE]"]


async def test_openai_unexpected_failure_is_a_server_error_chunk() -> None:
    lines = data_lines(await openai_wire(NodeStream(TokenChunk("a"), ValueError("hidden"))))
    assert lines[2]["error"]["type"] == "server_error" and "hidden" not in json.dumps(lines[2])
    assert lines[3:] == ["[DONE]"]


# ----------------------------------------------------------------------------- NDJSON JSON-RPC (/rpc)
def ndjson(wire: list[bytes]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in b"".join(wire).splitlines()]


async def test_ndjson_token_notifications_then_the_response_object() -> None:
    lines = ndjson(await NodeStream(TokenChunk("a"), TokenChunk("b", finish_reason="stop"), DONE)
                   .wire(NdjsonFormat(7)))
    assert [ln["method"] for ln in lines[:2]] == [p.TOKEN_METHOD] * 2 and "id" not in lines[0]  # notifications
    assert lines[0]["params"] == {"id": 7, "text": "a"}
    assert lines[1]["params"] == {"id": 7, "text": "b", "finish_reason": "stop"}
    assert lines[2]["id"] == 7 and Completion.from_dict(lines[2]["result"]) == DONE
    assert len(lines) == 3


async def test_ndjson_error_after_the_first_token_is_a_jsonrpc_error_with_the_tables_code() -> None:
    exc = Overloaded("queue full", retry_after=2.0)
    lines = ndjson(await NodeStream(TokenChunk("a"), exc).wire(NdjsonFormat("r1")))
    assert lines[0]["method"] == p.TOKEN_METHOD
    assert lines[1]["id"] == "r1" and lines[1]["error"]["code"] == exc.rpc_code
    assert lines[1]["error"]["message"] == "queue full" and len(lines) == 2


async def test_ndjson_unexpected_failure_is_internal_error() -> None:
    lines = ndjson(await NodeStream(TokenChunk("a"), RuntimeError("hidden")).wire(NdjsonFormat(1)))
    assert lines[1]["error"]["code"] == p.INTERNAL_ERROR and "hidden" not in json.dumps(lines[1])


# ----------------------------------------------------------------------------- a client that goes away
class Client:
    """The ``receive`` side of an ASGI connection: ``before`` messages, then (once ``gone``
    is set) ``http.disconnect``."""

    def __init__(self, *before: dict[str, Any]) -> None:
        self.before = list(before)
        self.gone = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        if self.before:
            return self.before.pop(0)
        await self.gone.wait()
        return {"type": "http.disconnect"}


async def test_until_disconnect_returns_the_work_when_the_client_stays() -> None:
    async def work() -> str:
        await asyncio.sleep(0)
        return "answer"

    client = Client({"type": "http.request", "body": b"", "more_body": False})  # not a disconnect: ignored
    assert await until_disconnect(client.receive, work()) == "answer"


async def test_a_disconnect_cancels_the_work_and_raises_client_gone() -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def work() -> str:
        started.set()
        try:
            await asyncio.Event().wait()  # never ends by itself
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    client = Client()
    waiting = asyncio.ensure_future(until_disconnect(client.receive, work()))
    await asyncio.wait_for(started.wait(), 5)
    client.gone.set()
    with pytest.raises(ClientGone):
        await asyncio.wait_for(waiting, 5)
    assert cancelled.is_set()


async def test_cancelling_the_caller_cancels_the_work_too() -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def work() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    waiting = asyncio.ensure_future(until_disconnect(Client().receive, work()))
    await asyncio.wait_for(started.wait(), 5)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await asyncio.wait_for(cancelled.wait(), 5)


async def test_first_item_closes_the_node_stream_when_the_client_left_first() -> None:
    async def stalled() -> AsyncIterator[Any]:
        try:
            await asyncio.Event().wait()  # a generation still waiting for a slot
            yield DONE
        finally:
            closed.set()

    closed = asyncio.Event()
    client = Client()
    client.gone.set()
    with pytest.raises(ClientGone):
        await asyncio.wait_for(first_item(client.receive, stalled()), 5)
    assert closed.is_set()


async def test_a_disconnect_during_a_streamed_answer_stops_the_generation() -> None:
    s = NodeStream(TokenChunk("a"), endless=True)
    client = Client()
    bodies: list[bytes] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            bodies.append(message["body"])
            if len(bodies) == 3:
                client.gone.set()  # the client goes away after three pieces

    response = EventStream(drain(await s.agen.__anext__(), s.agen, Recorder()))
    await asyncio.wait_for(response({"type": "http", "path": "/inference"}, client.receive, send), 5)
    assert s.closed.is_set()
    assert bodies[:3] == [b"start", b"token a", b"token more "]
    assert not any(b.startswith((b"done", b"error")) for b in bodies)  # cut off, not finished
