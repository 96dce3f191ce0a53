"""``RemoteTarget``: a model on a peer — its state, forwarding, failover to the one stand-in,
handoff and draining — with a scripted peer (the stand-in swaps go through ``targets.Routes``,
their one owner). No fixed sleeps: each step waits on the loop or on a condition."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from distributed.domain import Completion, EmbedRequest, Embeddings, GenerateRequest
from distributed.errors import PeerUnavailable
from distributed.targets import RemoteTarget, Routes

pytestmark = pytest.mark.anyio


async def spin() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    """Until ``cond()`` holds (a deadline, not a fixed wait: a loaded machine only takes longer)."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


class FakeClient:
    def __init__(self) -> None:
        self.error: Exception | None = None
        self.block = asyncio.Event()
        self.block.set()

    async def call(self, method: str, params: Any = None, **kw: Any) -> Any:
        await self.block.wait()
        if self.error:
            raise self.error
        return Completion(model="m", node="pc2", text="remote", finish_reason="stop").to_dict()

    async def stream(self, params: Any) -> Any:
        """Two tokens, then a hang until ``block`` is set (the peer stops answering), then the result."""
        yield {"id": 1, "text": "a"}
        yield {"id": 1, "text": "b"}
        self.block.clear()
        await self.block.wait()
        yield {"result": Completion(model="m", node="pc2", text="", finish_reason="stop").to_dict()}

    async def embed(self, texts, model, normalize, groups=None):
        if self.error:
            raise self.error
        return {"vectors": np.ones((len(texts), 2), np.float32), "group_tokens": groups, "node": "pc2"}


class FakePeer:
    def __init__(self) -> None:
        self.name = "pc2"
        self.state = "alive"
        self.client = FakeClient()
        self.gone = asyncio.Event()
        self.reachable = True
        self.models = {"m": {"id": "m", "state": "ready", "backend": "fake", "quant": "Q4"}}

    def model_info(self, model: str) -> dict[str, Any] | None:
        return self.models.get(model)

    def failed(self, why: str) -> None:
        self.reachable = False

    def answered(self) -> None:
        self.reachable = True


class Standin:
    node = "pc1"
    state = "ready"
    local = True
    assignment = None

    def start(self) -> None:
        pass

    def __init__(self) -> None:
        self.closed = False

    async def generate(self, req):
        return Completion(model="m", node="pc1", text="local", finish_reason="stop")

    async def embed(self, req):
        return Embeddings(model="m", node="pc1", vectors=np.zeros((len(req.input), 2), np.float32))

    async def close(self):
        self.closed = True


def target(peer: FakePeer, kind: str = "chat", failover=None) -> RemoteTarget:
    return RemoteTarget("m", kind, peer, failover=failover)


async def test_state_follows_the_peer():
    peer = FakePeer()
    t = target(peer)
    assert t.state == "ready" and t.node == "pc2"
    peer.models["m"]["state"] = "loading"
    assert t.state == "loading"
    peer.state = "suspect"
    assert t.state == "loading"
    peer.state = "dead"
    assert t.state == "unavailable"
    info = t.info()
    assert info["node"] == "pc2" and info["peer_state"] == "dead" and info["local"] is False


async def test_dead_peer_without_failover_raises_peer_unavailable_naming_it():
    peer = FakePeer()
    peer.state = "dead"
    with pytest.raises(PeerUnavailable) as ei:
        await target(peer).generate(GenerateRequest(prompt="x"))
    assert ei.value.peer == "pc2" and "pc2" in ei.value.message


async def test_failover_serves_with_the_standin_marked_fallback_and_drops_it_when_the_peer_is_back():
    peer = FakePeer()
    standin = Standin()
    asked = []

    routes = Routes("pc1")

    async def failover(remote, exc):
        asked.append(exc)
        return await routes.fallback(remote, lambda: standin)

    t = target(peer, failover=failover)
    routes.set(t)
    peer.client.error = PeerUnavailable("refused", peer="pc2", phase="connect")
    c = await t.generate(GenerateRequest(prompt="x"))
    assert c.text == "local" and c.fallback is True and t.standin is standin
    assert not peer.reachable and routes.fallback_loads == 1
    peer.client.error = None
    # a stale "ready" from before the failure drops nothing: the peer has not answered yet
    routes.settle(peer)
    assert (await t.generate(GenerateRequest(prompt="x"))).fallback is True and t.standin is standin
    peer.answered()
    peer.models["m"]["state"] = "loading"  # back, but not ready yet: keep serving here
    routes.settle(peer)
    assert (await t.generate(GenerateRequest(prompt="x"))).fallback is True
    peer.models["m"]["state"] = "ready"
    routes.settle(peer)  # back, answered, ready: now the stand-in goes
    c = await t.generate(GenerateRequest(prompt="x"))
    assert c.text == "remote" and c.fallback is False
    await spin()
    assert t.standin is None and standin.closed and routes.fallback_loads == 1  # asked again, loaded once


async def test_a_call_that_reached_the_peer_is_never_retried_elsewhere():
    peer = FakePeer()
    t = target(peer, failover=lambda r, e: pytest.fail("must not fail over"))
    peer.client.error = PeerUnavailable("broke mid-answer", peer="pc2", phase="answer")
    with pytest.raises(PeerUnavailable, match="mid-answer"):
        await t.generate(GenerateRequest(prompt="x"))


async def test_peer_declared_dead_mid_call_ends_it_at_once():
    peer = FakePeer()
    peer.client.block.clear()  # the peer hangs without closing the socket
    t = target(peer)
    task = asyncio.ensure_future(t.generate(GenerateRequest(prompt="x")))
    await spin()
    assert not task.done()
    peer.state = "dead"
    peer.gone.set()
    with pytest.raises(PeerUnavailable, match="stopped answering"):
        await asyncio.wait_for(task, 1.0)


async def test_peer_declared_dead_mid_stream_ends_it_and_leaves_the_consumer_uncancelled():
    peer = FakePeer()
    t = target(peer)
    got: list[str] = []

    async def consume() -> str:
        try:
            async for item in t.stream(GenerateRequest(prompt="x")):
                got.append(item.text)
        except PeerUnavailable as exc:
            await asyncio.sleep(0)  # the task was not left cancelled: it can still await
            return str(exc)
        return "ended"

    task = asyncio.ensure_future(consume())
    await until(lambda: got == ["a", "b"])
    await spin()
    assert not task.done()
    peer.state = "dead"
    peer.gone.set()
    assert "stopped answering" in await asyncio.wait_for(task, 1.0)


async def test_a_stream_whose_consumer_is_cancelled_is_cancelled_not_peer_unavailable():
    peer = FakePeer()
    t = target(peer)
    got: list[str] = []

    async def consume() -> None:
        async for item in t.stream(GenerateRequest(prompt="x")):
            got.append(item.text)

    task = asyncio.ensure_future(consume())
    await until(lambda: got == ["a", "b"])
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_embed_through_the_coalescer_and_fallback_when_the_peer_dies():
    peer = FakePeer()
    standin = Standin()
    routes = Routes("pc1")

    async def failover(remote, exc):
        return await routes.fallback(remote, lambda: standin)

    t = target(peer, "embed", failover=failover)
    e = await t.embed(EmbedRequest(input=["a", "b"]))
    assert e.node == "pc2" and e.vectors.shape == (2, 2) and e.prompt_tokens == 2 and not e.fallback
    peer.state = "dead"
    peer.gone.set()
    e = await t.embed(EmbedRequest(input=["a"]))
    assert e.fallback is True and e.node == "pc1"
    assert t.info()["fallback"] == {"node": "pc1", "state": "ready"}


class SlowStandin(Standin):
    """A local copy whose answers take until the test releases them."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def generate(self, req):
        await self.gate.wait()
        if self.closed:
            raise AssertionError("computed on a closed copy")
        return await super().generate(req)


async def test_handoff_copy_serves_unmarked_until_the_peer_is_ready_and_finishes_its_requests():
    peer = FakePeer()
    peer.models["m"]["state"] = "loading"  # the peer is taking the model over
    copy = SlowStandin()
    t = RemoteTarget("m", "chat", peer, handoff=copy)
    assert t.state == "loading" and t.serves_here and t.info()["handoff"] == {"node": "pc1", "state": "ready"}
    inflight = asyncio.ensure_future(t.generate(GenerateRequest(prompt="x")))
    await spin()
    peer.models["m"]["state"] = "ready"
    assert t.serves_here  # until the routes owner drops it
    assert t.drop_standin("ready there") is copy and t.standin is None and not t.serves_here
    await spin()
    assert not copy.closed  # a request is still being computed on it
    c = await t.generate(GenerateRequest(prompt="x"))
    assert c.text == "remote"  # new requests go to the peer
    copy.gate.set()
    c = await inflight
    assert c.text == "local" and c.fallback is False  # a handoff copy is not a fallback
    await until(lambda: copy.closed)  # unloaded once its request finished


async def test_a_handoff_copy_becomes_a_fallback_when_the_peer_dies_first():
    peer = FakePeer()
    peer.models["m"]["state"] = "loading"
    copy = Standin()

    routes = Routes("pc1")

    async def failover(remote, exc):  # the one stand-in: the copy already loaded is reused
        return await routes.fallback(remote, lambda: pytest.fail("must not load a second copy"))

    t = RemoteTarget("m", "chat", peer, failover=failover, handoff=copy)
    assert (await t.generate(GenerateRequest(prompt="x"))).fallback is False
    peer.state = "dead"
    peer.gone.set()
    c = await t.generate(GenerateRequest(prompt="x"))
    assert c.text == "local" and c.fallback is True and "fallback" in t.info()


async def test_close_lets_requests_in_flight_finish():
    peer = FakePeer()
    peer.client.block.clear()
    t = target(peer)
    inflight = asyncio.ensure_future(t.generate(GenerateRequest(prompt="x")))
    await spin()
    closing = asyncio.ensure_future(t.close())
    await spin()
    assert not closing.done()  # it waits for the request in flight (nothing else to wait for)
    peer.client.block.set()
    assert (await inflight).text == "remote"
    await asyncio.wait_for(closing, 1.0)


async def test_after_a_refused_call_requests_go_to_the_one_standin_until_the_peer_answers():
    """Issue 11.2: a peer that refused a connection is not tried again by the next
    requests (they go to the stand-in, loaded once), whatever its last report said."""
    peer = FakePeer()
    routes = Routes("pc1")
    loads = []

    def load():
        loads.append(1)
        return Standin()

    async def failover(remote, exc):
        return await routes.fallback(remote, load)

    t = target(peer, "embed", failover=failover)
    calls = []
    real = peer.client.embed

    async def counting(*a, **kw):
        calls.append(1)
        return await real(*a, **kw)

    peer.client.embed = counting
    peer.client.error = PeerUnavailable("connection refused", peer="pc2", phase="connect")
    answers = [await t.embed(EmbedRequest(input=[f"x{i}"])) for i in range(20)]
    assert all(a.fallback and a.node == "pc1" for a in answers)
    assert len(calls) == 1 and len(loads) == 1  # one refused call, one load; the rest went straight here
    assert peer.models["m"]["state"] == "ready" and t.state == "ready"  # the stale report changes nothing
