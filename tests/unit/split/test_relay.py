"""The split relay: bytes reach the worker only after the cluster-token preface (issue 10.3).

A plain echo server stands in for llama.cpp's RPC worker. The relay listens on 127.0.0.2
(the worker host's address), the echo server on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import os
import struct
import time

import pytest

from distributed.errors import PeerUnavailable, Unauthorized
from distributed.split.relay import MAGIC, PREFACE_LEN, RelayServer, Tunnel, make_preface, open_channel

pytestmark = pytest.mark.anyio
TOKEN = "cluster-s3cret"


class Echo:
    """The stand-in worker: echoes every byte, counts connections and bytes it received."""

    def __init__(self) -> None:
        self.connections = 0
        self.received = 0
        self.server: asyncio.base_events.Server | None = None

    async def start(self) -> tuple[str, int]:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return "127.0.0.1", self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        while data := await reader.read(65536):
            self.received += len(data)
            writer.write(data)
            await writer.drain()
        writer.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
async def worker():
    echo = Echo()
    address = await echo.start()
    relay = RelayServer(TOKEN, "127.0.0.2", 0, lambda: {"worker": address}, handshake_timeout_s=1.0)
    await relay.start()
    try:
        yield echo, relay
    finally:
        await relay.close()
        await echo.close()


async def read_all(reader: asyncio.StreamReader, timeout: float = 3.0) -> bytes:
    """Everything the server sends until it closes the connection (fails on a hang)."""
    return await asyncio.wait_for(reader.read(), timeout)


async def raw(host: str, port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    if payload:
        writer.write(payload)
        await writer.drain()
    try:
        return await read_all(reader)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


async def test_tunnel_carries_bytes_both_ways_intact(worker) -> None:
    echo, relay = worker
    tunnel = Tunnel(TOKEN, ("127.0.0.2", relay.port))
    await tunnel.start()
    try:
        assert tunnel.address.startswith("127.0.0.1:")
        reader, writer = await asyncio.open_connection("127.0.0.1", tunnel.port)
        payload = os.urandom(3 * 1024 * 1024 + 17)  # bigger than any buffer on the way
        writer.write(payload)
        got = await asyncio.wait_for(reader.readexactly(len(payload)), 10)
        assert got == payload
        for n in (1, 7, 100):  # small messages, one round trip each (RPC commands)
            writer.write(b"x" * n)
            assert await asyncio.wait_for(reader.readexactly(n), 5) == b"x" * n
        writer.close()
        assert echo.connections == 1 and relay.stats["accepted"] == 1 and tunnel.stats["accepted"] == 1
    finally:
        await tunnel.close()


@pytest.mark.parametrize("payload", [
    b"",                                    # connects and waits
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",   # a browser or scanner
    os.urandom(PREFACE_LEN),                # the right length, garbage
    b"\x00" * 4096,                         # a raw ggml RPC client would start with a command
], ids=["silent", "http", "garbage", "rpc-like"])
async def test_a_raw_client_without_the_token_gets_nothing(worker, payload: bytes) -> None:
    echo, relay = worker
    t0 = time.monotonic()
    assert await raw("127.0.0.2", relay.port, payload) == b""
    assert time.monotonic() - t0 < 3.0  # closed, not left hanging
    assert echo.connections == 0 and echo.received == 0  # not a byte reached the worker
    assert relay.stats["refused"] == 1


async def test_a_wrong_token_is_refused_before_the_worker_sees_anything(worker) -> None:
    echo, relay = worker
    assert await raw("127.0.0.2", relay.port, make_preface("wrong-token", "worker") + b"payload") == b""
    with pytest.raises(Unauthorized, match="closed the channel"):
        await open_channel("127.0.0.2", relay.port, "wrong-token")
    tunnel = Tunnel("wrong-token", ("127.0.0.2", relay.port))
    await tunnel.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", tunnel.port)
        writer.write(b"hello")
        assert await read_all(reader) == b""  # the engine sees its connection closed
        assert tunnel.stats["failed"] == 1 and "closed the channel" in tunnel.last_error
        writer.close()
    finally:
        await tunnel.close()
    assert echo.connections == 0 and echo.received == 0


async def test_a_captured_preface_cannot_be_replayed(worker) -> None:
    echo, relay = worker
    preface = make_preface(TOKEN, "worker")
    reader, writer = await asyncio.open_connection("127.0.0.2", relay.port)
    writer.write(preface + b"ping")
    assert len(await asyncio.wait_for(reader.readexactly(32), 3)) == 32  # the server's proof
    assert await asyncio.wait_for(reader.readexactly(4), 3) == b"ping"
    writer.close()
    assert await raw("127.0.0.2", relay.port, preface + b"ping") == b""  # same nonce again
    assert echo.connections == 1


async def test_a_stale_preface_is_refused(worker) -> None:
    _, relay = worker
    old = make_preface(TOKEN, "worker", now=time.time() - 3600)
    assert await raw("127.0.0.2", relay.port, old) == b""
    future = make_preface(TOKEN, "worker", now=time.time() + 3600)
    assert await raw("127.0.0.2", relay.port, future) == b""


async def test_the_preface_names_its_target() -> None:
    echo = Echo()
    address = await echo.start()
    relay = RelayServer(TOKEN, "127.0.0.2", 0, lambda: {"cuda:1": address})
    await relay.start()
    try:
        assert await raw("127.0.0.2", relay.port, make_preface(TOKEN, "cuda:0")) == b""
        reader, writer = await open_channel("127.0.0.2", relay.port, TOKEN, "cuda:1")
        writer.write(b"ok?")
        assert await asyncio.wait_for(reader.readexactly(3), 3) == b"ok?"
        writer.close()
    finally:
        await relay.close()
        await echo.close()


async def test_no_token_configured_refuses_everyone() -> None:
    echo = Echo()
    address = await echo.start()
    relay = RelayServer("", "127.0.0.2", 0, lambda: {"worker": address})
    await relay.start()
    try:
        assert await raw("127.0.0.2", relay.port, make_preface("", "worker")) == b""
        assert echo.connections == 0
    finally:
        await relay.close()
        await echo.close()


async def test_no_worker_running_closes_the_channel() -> None:
    relay = RelayServer(TOKEN, "127.0.0.2", 0, lambda: {})
    await relay.start()
    try:
        with pytest.raises(Unauthorized):
            await open_channel("127.0.0.2", relay.port, TOKEN)
    finally:
        await relay.close()


async def test_a_relay_that_is_down_is_peer_unavailable() -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.2", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    with pytest.raises(PeerUnavailable) as err:
        await open_channel("127.0.0.2", port, TOKEN, timeout=2)
    assert f"127.0.0.2:{port}" in err.value.message


async def test_closing_the_relay_ends_open_channels(worker) -> None:
    echo, relay = worker
    reader, writer = await open_channel("127.0.0.2", relay.port, TOKEN)
    writer.write(b"a")
    assert await asyncio.wait_for(reader.readexactly(1), 3) == b"a"
    assert relay.stats["open"] == 1
    await relay.close()
    assert await read_all(reader) == b""
    writer.close()


async def test_worker_going_away_closes_the_engine_side(worker) -> None:
    echo, relay = worker
    reader, writer = await open_channel("127.0.0.2", relay.port, TOKEN)
    writer.write(b"a")
    assert await asyncio.wait_for(reader.readexactly(1), 3) == b"a"
    writer.write_eof()  # echo ends its side when ours ends; the relay then ends the channel
    assert await read_all(reader) == b""
    writer.close()


def test_preface_layout() -> None:
    p = make_preface(TOKEN, "worker", now=1_700_000_000, nonce=b"n" * 16)
    assert len(p) == PREFACE_LEN == 64 and p[:8] == MAGIC
    assert struct.unpack(">Q", p[8:16])[0] == 1_700_000_000 and p[16:32] == b"n" * 16
    assert p != make_preface("other", "worker", now=1_700_000_000, nonce=b"n" * 16)
    assert p != make_preface(TOKEN, "cuda:1", now=1_700_000_000, nonce=b"n" * 16)
