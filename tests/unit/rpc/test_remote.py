"""RemoteTarget's embedding coalescer and its routing/failover decisions, with a scripted peer
(the stand-in swaps go through ``targets.Routes``, their one owner)."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from distributed.domain import Completion, EmbedRequest, Embeddings, GenerateRequest
from distributed.errors import PeerUnavailable, ValidationFailed
from distributed.rpc.coalescer import Coalescer as _Coalescer
from distributed.targets import RemoteTarget, Routes

pytestmark = pytest.mark.anyio


class Wire:
    """A fake channel: each call waits until the test releases it."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], list[int]]] = []
        self.gates: list[asyncio.Event] = []
        self.fail: Exception | None = None

    async def send(self, texts: list[str], normalize: bool, groups: list[int]) -> dict[str, Any]:
        self.calls.append((texts, groups))
        gate = asyncio.Event()
        self.gates.append(gate)
        await gate.wait()
        if self.fail is not None and (len(groups) > 1 or "bad" in texts):
            raise self.fail
        vec = np.array([[float(len(t)), 0.0] for t in texts], dtype=np.float32)
        return {"vectors": vec, "group_tokens": groups and [10 * g for g in groups], "node": "pc2"}

    async def release(self, i: int) -> None:
        self.gates[i].set()
        for _ in range(5):
            await asyncio.sleep(0)


async def spin() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_lone_request_goes_at_once_and_later_ones_coalesce():
    wire = Wire()
    co = _Coalescer(wire.send, max_inflight=2)
    first = asyncio.ensure_future(co.submit(["a", "bb"], True))
    await spin()
    assert wire.calls == [(["a", "bb"], [2])]  # no waiting for company
    others = [asyncio.ensure_future(co.submit([f"x{i}"], True)) for i in range(3)]
    await spin()
    # x0 waits alone (1 sentence < the 2 in flight); x1 makes a full batch's worth: both leave
    # together; x2 waits, as two calls are in flight
    assert wire.calls[1:] == [(["x0", "x1"], [1, 1])]
    await wire.release(0)
    assert len(wire.calls) == 2  # x2 (1 sentence) is less than the 2 still in flight: it waits
    await wire.release(1)
    assert wire.calls[2:] == [(["x2"], [1])]  # nothing in flight: whatever waits goes
    await wire.release(2)
    assert (await first)[0].tolist() == [[1.0, 0.0], [2.0, 0.0]]
    assert [(await t)[1] for t in others] == [10, 10, 10]


async def test_second_call_leaves_when_a_full_batch_waits_then_the_rest_on_return():
    wire = Wire()
    co = _Coalescer(wire.send, max_inflight=2)
    a = asyncio.ensure_future(co.submit(["a1", "a2", "a3"], True))
    await spin()
    b = [asyncio.ensure_future(co.submit([f"b{i}"], True)) for i in range(2)]
    await spin()
    assert len(wire.calls) == 1  # 2 waiting < 3 in flight
    b.append(asyncio.ensure_future(co.submit(["b2"], True)))
    await spin()
    assert wire.calls[1] == (["b0", "b1", "b2"], [1, 1, 1])  # pipelined while the first is in flight
    c = [asyncio.ensure_future(co.submit([f"c{i}"], True)) for i in range(4)]
    await spin()
    assert len(wire.calls) == 2  # two in flight: the rest wait
    await wire.release(0)
    assert wire.calls[2][0] == ["c0", "c1", "c2", "c3"]  # sent when a slot freed
    vec, tokens, node = await a
    assert vec.tolist() == [[2.0, 0.0]] * 3 and tokens == 30 and node == "pc2"
    await wire.release(1)
    await wire.release(2)
    for i, t in enumerate(b):
        vec, tokens, _ = await t
        assert vec.tolist() == [[2.0, 0.0]] and tokens == 10
    assert [(await t)[0].shape for t in c] == [(1, 2)] * 4
    assert co.calls == 3


async def test_normalize_flags_never_share_a_call():
    wire = Wire()
    co = _Coalescer(wire.send)
    asyncio.ensure_future(co.submit(["a"], True))
    asyncio.ensure_future(co.submit(["b"], False))
    await spin()
    assert [c[0] for c in wire.calls] == [["a"], ["b"]]
    for i in range(2):
        await wire.release(i)


async def test_a_failing_batch_is_retried_one_request_at_a_time():
    wire = Wire()
    co = _Coalescer(wire.send, max_inflight=1)
    first = asyncio.ensure_future(co.submit(["ok0"], True))
    await spin()
    good = asyncio.ensure_future(co.submit(["ok"], True))
    bad = asyncio.ensure_future(co.submit(["bad"], True))
    await spin()
    wire.fail = ValidationFailed("input[0] is empty", field="input[0]")
    await wire.release(0)  # first returns; the pair goes out as one call and fails
    assert wire.calls[1][1] == [1, 1]
    await wire.release(1)
    await spin()
    assert [c[0] for c in wire.calls[2:]] == [["ok"], ["bad"]]
    await wire.release(2)
    await wire.release(3)
    assert (await good)[0].tolist() == [[2.0, 0.0]]
    with pytest.raises(ValidationFailed):
        await bad
    assert (await first)[1] == 10


async def test_a_caller_that_left_is_skipped():
    wire = Wire()
    co = _Coalescer(wire.send, max_inflight=1)
    asyncio.ensure_future(co.submit(["a"], True))
    await spin()
    gone = asyncio.ensure_future(co.submit(["gone"], True))
    stay = asyncio.ensure_future(co.submit(["stay"], True))
    await spin()
    gone.cancel()
    await spin()
    await wire.release(0)
    assert wire.calls[1][0] == ["stay"]
    await wire.release(1)
    assert (await stay)[0].tolist() == [[4.0, 0.0]]


# ----------------------------------------------------------------------------- routing / failover
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
    for _ in range(10):
        await asyncio.sleep(0.03)
    assert copy.closed


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
    await asyncio.sleep(0.1)
    assert not closing.done()
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
