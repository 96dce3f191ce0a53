"""SseStream against a tiny loopback server: chunked SSE split across chunks, a refusal, a cut connection."""

from __future__ import annotations

import asyncio

import pytest

from distributed.engine.sse import EngineRefused, SseStream

pytestmark = pytest.mark.anyio


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def _serve(answer: bytes, seen: list[bytes]):
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")).split(b":")[1])
        seen.append(head + await reader.readexactly(length))
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_events_across_chunk_boundaries_until_done():
    body = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
            + _chunk(b'data: {"a": 1}\n\ndata: {"b"') + _chunk(b': 2}\n\n') + _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
    seen: list[bytes] = []
    server, port = await _serve(body, seen)
    async with server:
        async with SseStream("127.0.0.1", port, "/v1/chat/completions", b'{"x":1}', "k3y") as s:
            got = [e async for e in s]
    assert got == [b'{"a": 1}', b'{"b": 2}']
    assert seen[0].startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert b"Authorization: Bearer k3y\r\n" in seen[0] and seen[0].endswith(b'{"x":1}')


async def test_a_refusal_carries_status_and_body():
    err = b'{"error": {"code": 400, "message": "bad"}}'
    body = b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d\r\n\r\n%s" % (len(err), err)
    server, port = await _serve(body, [])
    async with server:
        with pytest.raises(EngineRefused) as exc:
            async with SseStream("127.0.0.1", port, "/v1/completions", b"{}", "k"):
                pass
    assert exc.value.status == 400 and exc.value.body == err


async def test_a_cut_connection_is_an_incomplete_read_and_nothing_listening_an_oserror():
    body = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + _chunk(b'data: {"a": 1}\n\n')  # no last chunk
    server, port = await _serve(body, [])
    async with server:
        got = []
        with pytest.raises(asyncio.IncompleteReadError):
            async with SseStream("127.0.0.1", port, "/", b"{}", "k") as s:
                async for e in s:
                    got.append(e)
        assert got == [b'{"a": 1}']
    with pytest.raises(OSError):
        async with SseStream("127.0.0.1", port, "/", b"{}", "k"):
            pass
