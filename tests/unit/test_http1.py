"""http1.StreamedPost against scripted loopback servers: an answer written in pieces (headers
split, chunks split), a body larger than what it reads ahead (the socket is paused, then
resumed, nothing lost), and the request it sends."""

from __future__ import annotations

import asyncio

import pytest

from distributed.http1 import StreamedPost

pytestmark = pytest.mark.anyio


async def _serve(pieces: list[bytes], seen: list[bytes]):
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.005)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_headers_and_chunks_split_anywhere():
    answer = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: b\r\n\r\n"
              b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n")
    pieces = [answer[i:i + 7] for i in range(0, len(answer), 7)]
    seen: list[bytes] = []
    server, port = await _serve(pieces, seen)
    async with server:
        async with StreamedPost("127.0.0.1", port, "/x", b"{}", {"Authorization": "Bearer k"}) as post:
            assert post.status == 200 and post.headers["x-a"] == "b"
            assert b"".join([d async for d in post.body()]) == b"abcdefg"
    assert seen[0].startswith(b"POST /x HTTP/1.1\r\n") and b"Authorization: Bearer k\r\n" in seen[0]


async def test_a_body_larger_than_the_read_ahead_arrives_whole_to_a_slow_reader():
    blob = bytes(range(256)) * (3 * 4096)  # 3 MiB
    server, port = await _serve([b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(blob), blob], [])
    async with server:
        async with StreamedPost("127.0.0.1", port, "/", b"", {}) as post:
            got = []
            async for data in post.body():
                got.append(data)
                await asyncio.sleep(0.01)  # slower than the socket
    assert b"".join(got) == blob
