"""PeerClient.stream on a real socket (no injected transport): the answer is read by
``http1.StreamedPost``, not httpx. Against the real /rpc router served by uvicorn on
loopback in this event loop, it yields what the in-process (httpx) path yields; errors keep
their types and phases; leaving early closes the peer's node stream. A scripted server
covers a cut connection and a silent peer."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import uvicorn

from distributed import tls
from distributed.errors import ModelNotFound, Overloaded, PeerUnavailable, TarsError, Unauthorized
from distributed.rpc import protocol as p
from distributed.rpc.client import PeerClient

from .conftest import TOKEN

pytestmark = pytest.mark.anyio


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def live(rpc_app: Any) -> AsyncIterator[str]:
    async for url in serve(rpc_app):
        yield url


async def serve(app: Any, **tls: Any) -> AsyncIterator[str]:
    """``app`` served by uvicorn on loopback in this event loop (``tls``: its certificate files)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False,
                                           **tls))
    task = asyncio.ensure_future(server.serve())
    for _ in range(500):
        if server.started:
            break
        await asyncio.sleep(0.01)
    assert server.started
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


async def collect(client: PeerClient, params: dict[str, Any]) -> list[dict[str, Any]]:
    return [m async for m in client.stream(params)]


async def test_tokens_then_the_result_as_the_in_process_path_gives_them(live, rpc_app):
    direct = PeerClient(live, TOKEN, name="pc1")
    assert direct._direct is not None  # the socket path is the one under test
    in_process = PeerClient("http://pc1", TOKEN, transport=httpx.ASGITransport(rpc_app), name="pc1")
    params = {"prompt": "hi", "max_tokens": 40}
    got, want = await collect(direct, params), await collect(in_process, params)
    assert [g.get("text") for g in got[:-1]] == [f"t{i} " for i in range(40)]
    assert got[-2]["finish_reason"] == "length" and got[-1]["result"]["node"] == "pc1"
    strip = lambda items: [{k: v for k, v in m.items() if k != "id"} for m in items]  # noqa: E731
    assert strip(got[:-1]) == strip(want[:-1]) and got[-1]["result"]["usage"] == want[-1]["result"]["usage"]
    await direct.aclose()
    await in_process.aclose()


async def test_errors_before_and_during_the_stream_and_a_wrong_token(live):
    c = PeerClient(live, TOKEN, name="pc1")
    with pytest.raises(ModelNotFound):
        await collect(c, {"prompt": "x", "model": "nope"})
    got: list[dict[str, Any]] = []
    with pytest.raises(Overloaded, match="mid-way"):
        async for m in c.stream({"prompt": "boom", "max_tokens": 5}):
            got.append(m)
    assert [g["text"] for g in got] == ["t0 ", "t1 "]
    with pytest.raises(Unauthorized):
        await collect(PeerClient(live, "wrong", name="pc1"), {"prompt": "x"})
    await c.aclose()


async def test_leaving_early_closes_the_peers_stream(live, node):
    c = PeerClient(live, TOKEN, name="pc1")
    stream = c.stream({"prompt": "slow", "max_tokens": 200})
    assert (await stream.__anext__())["text"] == "t0 "
    await stream.aclose()
    await asyncio.wait_for(node.stream_closed.wait(), 10)  # the generation stopped, its slot is free
    await c.aclose()


async def test_over_pinned_tls_and_a_wrong_pin_fails_before_connecting(rpc_app, tmp_path):
    fp = tls.generate(tmp_path / "pc1.crt", tmp_path / "pc1.key", ["pc1"], ["127.0.0.1"])
    async for url in serve(rpc_app, ssl_certfile=str(tmp_path / "pc1.crt"), ssl_keyfile=str(tmp_path / "pc1.key")):
        c = PeerClient(url, TOKEN, name="pc1", pins=tls.Pins([fp]))
        got = await collect(c, {"prompt": "hi", "max_tokens": 3})
        assert [g.get("text") for g in got[:-1]] == ["t0 ", "t1 ", "t2 "] and got[-1]["result"]["node"] == "pc1"
        await c.aclose()
        wrong = PeerClient(url, TOKEN, name="pc1", pins=tls.Pins(["ab" * 32]))
        with pytest.raises(TarsError):
            await collect(wrong, {"prompt": "hi", "max_tokens": 3})
        await wrong.aclose()


async def test_nothing_listening_is_a_connect_failure():
    c = PeerClient(f"http://127.0.0.1:{free_port()}", TOKEN, name="pc9")
    with pytest.raises(PeerUnavailable) as exc:
        await collect(c, {"prompt": "x"})
    assert exc.value.details["phase"] == "connect" and "pc9" in str(exc.value)


async def _scripted(answer: bytes, then: str) -> tuple[asyncio.AbstractServer, int]:
    """A peer that answers ``answer`` and then closes (``then="close"``) or goes silent."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        if then == "close":
            writer.close()
        else:
            await asyncio.sleep(30)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\n\r\n"


@pytest.mark.parametrize("then, why", [("close", "broke"), ("silent", "did not answer in time")])
async def test_a_cut_or_silent_peer_mid_stream_is_peer_unavailable(then, why):
    line = p.dumps_line(p.token_notification(1, "a"))
    server, port = await _scripted(HEAD + _chunk(line[:10]) + _chunk(line[10:]), then)
    async with server:
        c = PeerClient(f"http://127.0.0.1:{port}", TOKEN, name="pc1", long_timeout=0.3)
        got: list[dict[str, Any]] = []
        with pytest.raises(PeerUnavailable, match=why) as exc:
            async for m in c.stream({"prompt": "x"}):
                got.append(m)
        assert got == [{"id": 1, "text": "a"}] and exc.value.details["phase"] == "answer"
        server.close()
