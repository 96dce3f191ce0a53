"""``ReplicaSet`` (targets/replicas.py): one model on several hosts, each request to the least
busy live copy. The copy here is a scripted local target; each peer member is a real
``RemoteTarget`` over a scripted peer and client (no sockets, no sleeps)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from distributed.domain import Completion, EmbedRequest, Embeddings, GenerateRequest, TokenChunk
from distributed.errors import InputTooLong, ModelLoading, Overloaded, PeerUnavailable, TarsError, ValidationFailed
from distributed.targets import RemoteTarget, ReplicaSet, Target, TargetState
from tests.fakes import FakePeer

pytestmark = pytest.mark.anyio


class Client:
    """A peer's /rpc as a RemoteTarget uses it: answers at once, or fails as the test says."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.error: TarsError | None = None
        self.fail_after: int | None = None  # a stream fails after this many tokens
        self.gate: asyncio.Event | None = None
        self.calls = 0
        self.closed_streams = 0

    def _answer(self) -> dict[str, Any]:
        return Completion(model="m", node=self.name, text=f"from {self.name}", finish_reason="stop").to_dict()

    async def call(self, method: str, params: Any = None, **kw: Any) -> Any:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        return self._answer()

    async def stream(self, params: dict[str, Any], **kw: Any) -> AsyncIterator[dict[str, Any]]:
        self.calls += 1
        try:
            for i in range(3):
                if self.error is not None and self.fail_after in (None, i):
                    raise self.error
                yield {"id": 1, "text": f"{self.name}-{i} "}
            yield {"result": self._answer()}
        finally:
            self.closed_streams += 1

    async def embed(self, texts: list[str], model: str, normalize: bool, groups: Any = None) -> dict[str, Any]:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return {"vectors": np.ones((len(texts), 2), np.float32), "group_tokens": groups, "node": self.name}


class Peer(FakePeer):
    def __init__(self, name: str) -> None:
        super().__init__(name, client=Client(name))
        self.models["m"] = {"id": "m", "state": "ready"}


class Here(Target):
    """The copy on this host: its queue depth and state are set by the test."""

    local = True

    def __init__(self) -> None:
        self.model, self.kind, self.node = "m", "chat", "pc1"
        self._state = TargetState.READY
        self.depth = 0
        self.error: TarsError | None = None
        self.served = 0

    @property
    def state(self) -> TargetState:
        return self._state

    @property
    def queue_depth(self) -> int:
        return self.depth

    async def generate(self, req: GenerateRequest) -> Completion:
        if self.error is not None:
            raise self.error
        self.served += 1
        return Completion(model="m", node="pc1", text="from pc1", finish_reason="stop")

    async def stream(self, req: GenerateRequest) -> AsyncIterator[TokenChunk | Completion]:
        self.served += 1
        yield TokenChunk("pc1-0 ")
        yield Completion(model="m", node="pc1", text="", finish_reason="stop")

    async def embed(self, req: EmbedRequest) -> Embeddings:
        self.served += 1
        return Embeddings(model="m", node="pc1", vectors=np.zeros((len(req.input), 2), np.float32))

    def info(self) -> dict[str, Any]:
        return {"id": "m", "node": "pc1", "state": self.state}


def replicas(local: bool = True, peers: tuple[str, ...] = ("pc2", "pc3")) -> tuple[ReplicaSet, Here, dict[str, Peer]]:
    here = Here()
    rs = ReplicaSet("m", "chat", "pc1", lambda: here if local else None)
    by_name = {name: Peer(name) for name in peers}
    for name, peer in by_name.items():
        rs.remotes[name] = RemoteTarget("m", "chat", peer, failover=None)
    return rs, here, by_name


REQ = GenerateRequest(model="m", prompt="hi", max_tokens=4)


async def collect(rs: ReplicaSet) -> list[TokenChunk | Completion]:
    return [item async for item in rs.stream(REQ)]


# ----------------------------------------------------------------------------- choosing a member
async def test_least_work_in_flight_wins_and_the_copy_here_first_on_a_tie():
    rs, here, _ = replicas()
    assert rs.pick().node == "pc1"  # everyone idle: the copy here (no hop)
    here.depth = 1  # busy with its own or a peer's request
    assert {rs.pick().node, rs.pick().node} == {"pc2", "pc3"}  # the idle peers take turns
    rs.sent["pc2"] = 2
    assert rs.pick().node == "pc3"
    rs.sent["pc3"] = 2
    assert rs.pick().node == "pc1"  # 1 here < 2 on each peer
    assert rs.load(here) == 1 and rs.load(rs.remotes["pc2"]) == 2


async def test_equally_idle_peers_take_turns_so_a_third_replica_serves_too():
    rs, _, peers = replicas(local=False)
    served = [(await rs.generate(REQ)).node for _ in range(6)]
    assert sorted(served) == ["pc2"] * 3 + ["pc3"] * 3
    assert rs.sent == {"pc2": 0, "pc3": 0} and rs.requests == 6  # nothing left counted in flight


async def test_requests_in_flight_count_until_they_end():
    rs, here, peers = replicas()
    here.depth = 5  # the copy here is busy: the next request goes to a peer
    peers["pc2"].client.gate = asyncio.Event()
    peers["pc3"].client.gate = asyncio.Event()
    first = asyncio.ensure_future(rs.generate(REQ))
    for _ in range(5):
        await asyncio.sleep(0)
    busy = next(n for n, c in rs.sent.items() if c == 1)
    other = "pc3" if busy == "pc2" else "pc2"
    assert rs.pick().node == other  # 1 in flight there, 0 on the other peer
    peers[busy].client.gate.set()
    assert (await first).node == busy and rs.sent[busy] == 0


# ----------------------------------------------------------------------------- members that are down
async def test_a_down_member_is_skipped():
    rs, here, peers = replicas()
    here.depth = 1
    peers["pc2"].state = "dead"
    assert {rs.pick().node for _ in range(4)} == {"pc3"}
    peers["pc2"].state = "alive"
    peers["pc2"].reachable = False  # it refused a connection since it last answered
    assert {rs.pick().node for _ in range(4)} == {"pc3"}
    peers["pc2"].reachable = True
    peers["pc2"].models["m"]["state"] = "loading"  # up, but the model is not ready there
    assert {rs.pick().node for _ in range(4)} == {"pc3"}
    here._state = TargetState.FAILED
    assert rs.pick().node == "pc3"


async def test_no_live_member_is_a_503_naming_each_one():
    rs, here, peers = replicas()
    here._state = TargetState.LOADING
    peers["pc2"].state = "dead"
    peers["pc3"].models["m"]["state"] = "failed"
    assert rs.state == TargetState.LOADING
    with pytest.raises(PeerUnavailable) as ei:
        await rs.generate(REQ)
    assert "no live replica of 'm'" in ei.value.message
    assert "pc1: loading" in ei.value.message and "pc2: down" in ei.value.message
    assert "pc3: failed" in ei.value.message
    here._state = TargetState.FAILED
    assert rs.state == TargetState.UNAVAILABLE


# ----------------------------------------------------------------------------- retries
@pytest.mark.parametrize("error", [
    PeerUnavailable("refused", peer="pc2", phase="connect"),  # before it reached the peer
    PeerUnavailable("connection reset", peer="pc2", phase="answer"),  # the host went mid-call
    ModelLoading("not ready on pc2", model="m"),
    Overloaded("pc2's queue is full", retry_after=1.0),
])
async def test_a_call_that_failed_before_any_answer_is_retried_on_the_next_member(error):
    rs, here, peers = replicas(peers=("pc2",))
    here.depth = 1  # busy: the request goes to pc2 first
    peers["pc2"].client.error = error
    c = await rs.generate(REQ)
    assert c.node == "pc1" and peers["pc2"].client.calls == 1 and rs.retried == 1
    assert rs.sent == {"pc2": 0, "pc1": 0}


async def test_a_refused_peer_is_skipped_by_the_next_requests():
    rs, here, peers = replicas(peers=("pc2",))
    here.depth = 1
    peers["pc2"].client.error = PeerUnavailable("refused", peer="pc2", phase="connect")
    assert (await rs.generate(REQ)).node == "pc1"
    assert not peers["pc2"].reachable  # until it answers again
    assert (await rs.generate(REQ)).node == "pc1" and peers["pc2"].client.calls == 1


@pytest.mark.parametrize("error", [ValidationFailed("bad 'stop'", field="stop"),
                                   InputTooLong("prompt too long", limit=2048)])
async def test_what_a_failure_says_about_the_request_itself_is_not_retried(error):
    rs, here, peers = replicas()
    here.depth = 1
    for p in peers.values():
        p.client.error = error
    with pytest.raises(type(error)):
        await rs.generate(REQ)
    assert sum(p.client.calls for p in peers.values()) == 1 and rs.retried == 0 and here.served == 0


async def test_a_failure_of_the_copy_here_is_not_retried_on_a_peer():
    rs, here, peers = replicas()
    here.error = Overloaded("queue full here", retry_after=1.0)
    with pytest.raises(Overloaded):
        await rs.generate(REQ)
    assert all(p.client.calls == 0 for p in peers.values())


async def test_embed_and_call_replica_go_the_same_way():
    rs, here, peers = replicas(peers=("pc2",))
    here.depth = 1
    peers["pc2"].client.error = PeerUnavailable("refused", peer="pc2", phase="connect")
    e = await rs.embed(EmbedRequest(model="m", input=["a", "b"]))
    assert e.node == "pc1" and rs.retried == 1
    seen: list[str] = []

    async def score(m: Target) -> str:
        seen.append(m.node)
        return m.node

    assert await rs.call_replica(score) == "pc1" and seen == ["pc1"]


# ----------------------------------------------------------------------------- streams
async def test_a_stream_is_retried_only_before_its_first_token():
    rs, here, peers = replicas(peers=("pc2",))
    here.depth = 1
    peers["pc2"].client.error = PeerUnavailable("refused", peer="pc2", phase="connect")
    items = await collect(rs)
    assert [i.text for i in items if isinstance(i, TokenChunk)] == ["pc1-0 "] and rs.retried == 1

    rs, here, peers = replicas(peers=("pc2",))
    here.depth = 1
    peers["pc2"].client.error = PeerUnavailable("connection reset", peer="pc2", phase="answer")
    peers["pc2"].client.fail_after = 1  # one token reached the caller, then the host went
    got: list[str] = []
    with pytest.raises(PeerUnavailable, match="connection reset"):
        async for item in rs.stream(REQ):
            got.append(item.text)
    assert got == ["pc2-0 "] and here.served == 0 and rs.retried == 0


async def test_a_stream_closed_early_frees_its_member_at_once():
    rs, here, peers = replicas(local=False, peers=("pc2",))
    agen = rs.stream(REQ)
    first = await agen.__anext__()
    assert first.text == "pc2-0 " and rs.sent["pc2"] == 1
    await agen.aclose()  # the client went away
    assert rs.sent["pc2"] == 0 and peers["pc2"].client.closed_streams == 1


# ----------------------------------------------------------------------------- reporting
async def test_info_lists_each_replica_and_its_work():
    rs, here, peers = replicas()
    peers["pc3"].state = "dead"
    rs.sent["pc2"] = 2
    here.depth = 1
    info = rs.info()
    assert info["node"] == "pc1,pc2,pc3" and info["state"] == TargetState.READY
    assert info["replicas"] == [{"node": "pc1", "state": "ready", "in_flight": 1},
                                {"node": "pc2", "state": "ready", "in_flight": 2},
                                {"node": "pc3", "state": "down", "in_flight": 0}]
    assert rs.local_member() is here and rs.queue_depth == 1


async def test_close_closes_the_peer_members_not_the_copy_here():
    rs, here, peers = replicas()
    remotes = list(rs.remotes.values())
    await rs.close()
    assert rs.remotes == {} and rs.members() == [here] and all(r.standin is None for r in remotes)


# ----------------------------------------------------------------------------- cache-aware routing
SYSTEM = {"role": "system", "content": "You are a careful assistant. " * 20}


def turn(n: int, system: dict[str, Any] = SYSTEM) -> GenerateRequest:
    """Turn ``n`` of a conversation: the messages of every earlier turn, then a new question."""
    messages = [system]
    for i in range(1, n + 1):
        messages.append({"role": "user", "content": f"question {i}"})
        if i < n:
            messages.append({"role": "assistant", "content": f"answer {i}"})
    return GenerateRequest(model="m", messages=messages, max_tokens=4)


async def test_the_next_turn_goes_where_the_conversation_went_even_when_another_replica_is_idler():
    rs, here, _ = replicas()
    here.depth = 1  # the copy here busy: the first turn goes to a peer
    first = (await rs.generate(turn(1))).node
    assert first in ("pc2", "pc3")
    here.depth = 0
    rs.sent[first] = 2  # now the least loaded is pc1 (0), the conversation's replica has 2: within the slack
    for n in (2, 3, 4):
        assert rs.pick(prefix=rs._prefix(turn(n))).node == first
    assert rs.cache["hits"] == 3 and rs.cache["misses"] == 1
    other = {"role": "system", "content": "Another conversation entirely. " * 20}
    assert rs.pick(prefix=rs._prefix(turn(2, other))).node == "pc1"  # no match: least loaded
    assert rs.cache["misses"] == 2
    assert rs.info()["routing"] == {"rule": "cache", "slack": 2, "hits": 3, "misses": 2, "overridden": 0}


async def test_a_replica_loaded_past_the_slack_is_passed_over_for_the_least_loaded():
    rs, here, _ = replicas(local=False)
    first = (await rs.generate(turn(1))).node
    other = "pc3" if first == "pc2" else "pc2"
    rs.sent[first] = 3  # 3 over the least (0) > slack 2
    assert rs.pick(prefix=rs._prefix(turn(2))).node == other
    assert rs.cache["overridden"] == 1
    rs.sent[first] = 2
    assert rs.pick(prefix=rs._prefix(turn(2))).node == first


async def test_a_down_replica_holding_the_prefix_is_not_picked():
    rs, _, peers = replicas(local=False)
    first = (await rs.generate(turn(1))).node
    peers[first].state = "dead"
    assert (await rs.generate(turn(2))).node != first


async def test_streams_follow_the_conversation_too():
    rs, here, _ = replicas()
    here.depth = 3
    items = [i async for i in rs.stream(turn(1))]
    first = items[-1].node
    assert first != "pc1"
    here.depth = 0
    items = [i async for i in rs.stream(turn(2))]
    assert items[-1].node == first and rs.cache["hits"] == 1


async def test_least_loaded_routing_ignores_prefixes():
    here = Here()
    rs = ReplicaSet("m", "chat", "pc1", lambda: here, routing="least-loaded")
    for name in ("pc2", "pc3"):
        rs.remotes[name] = RemoteTarget("m", "chat", Peer(name), failover=None)
    here.depth = 1
    first = (await rs.generate(turn(1))).node
    here.depth = 0
    assert (await rs.generate(turn(2))).node == "pc1"  # least loaded, not the conversation's replica
    assert rs.cache == {"hits": 0, "misses": 0, "overridden": 0} and len(rs.prefixes) == 0 and first != "pc1"
