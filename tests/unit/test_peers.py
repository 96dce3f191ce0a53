"""Peer liveness alive → suspect → dead → rejoin, driven beat by beat through the
cluster's own heartbeat step with a scripted peer and a fake clock (no sleeping)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from distributed.cluster import Cluster
from distributed.cluster_state import ClusterState
from distributed.domain import Plan
from distributed.errors import PeerUnavailable
from distributed.peers import DEAD_AFTER, PeerState, PeerTable
from distributed.settings import load_settings
from distributed.targets import Routes

pytestmark = pytest.mark.anyio


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ScriptedPeer:
    """The other host's /rpc as seen through its client: up or refusing connections."""

    def __init__(self) -> None:
        self.up = True
        self.name = "pc2"
        self.calls: list[str] = []
        self.state = ClusterState("pc2", "t")  # its copy of the cluster state: it signs its answers

    async def call(self, method: str, params: Any = None, **kw: Any) -> Any:
        self.calls.append(method)
        if not self.up:
            raise PeerUnavailable("connection refused", peer="pc2", phase="connect")
        ctl = self.state.seal({"term": 0, "digest": self.state.digest(), "held": None, "held_by": ""})
        return {"known": True, "name": "pc2", "models": [{"id": "emb", "state": "ready"}], "plan_id": "", "ctl": ctl}

    async def aclose(self) -> None:
        pass


class FakeNode:
    name = "pc1"
    profile = None
    plan = Plan()

    def __init__(self) -> None:
        self.routes = Routes("pc1")

    def local_targets(self) -> list[Any]:
        return []


def _cluster(wire: ScriptedPeer, clock: Clock, folder: Any) -> Cluster:
    settings = load_settings(node_name="pc1", cluster_token="t", heartbeat_s=1.0, models_dir=folder)
    cluster = Cluster(FakeNode(), settings, client_factory=lambda url: wire)  # type: ignore[arg-type]
    cluster.table = PeerTable("pc1", lambda url: wire, clock=clock)  # type: ignore[arg-type]
    cluster.vitals = lambda: {}  # type: ignore[method-assign]
    return cluster


async def test_alive_suspect_dead_then_rejoin(tmp_path):
    clock, wire = Clock(), ScriptedPeer()
    cluster = _cluster(wire, clock, tmp_path)
    peer = cluster.table.upsert("pc2", "http://127.0.0.3:8000")
    await cluster._beat(peer)
    assert peer.state == PeerState.ALIVE and peer.reachable and peer.status()["last_heartbeat_s"] == 0.0
    assert peer.model_info("emb") == {"id": "emb", "state": "ready"}

    wire.up = False
    clock.now += 1.0
    await cluster._beat(peer)
    assert peer.state == PeerState.SUSPECT and not peer.reachable and not peer.gone.is_set()
    assert peer.status()["last_heartbeat_s"] == 1.0 and peer.status()["state"] == "suspect"
    for i in range(2, DEAD_AFTER + 1):
        clock.now += 1.0
        await cluster._beat(peer)
        assert peer.state == (PeerState.DEAD if i >= DEAD_AFTER else PeerState.SUSPECT)
    assert peer.gone.is_set() and peer.missed == DEAD_AFTER and peer.status()["last_heartbeat_s"] == float(DEAD_AFTER)
    clock.now += 1.0
    await cluster._beat(peer)  # a dead peer keeps being probed, and stays dead while it does not answer
    assert peer.state == PeerState.DEAD

    wire.up = True  # it is back
    clock.now += 1.0
    await cluster._beat(peer)
    assert peer.state == PeerState.ALIVE and peer.reachable and not peer.gone.is_set() and peer.missed == 0
    assert peer.status()["last_heartbeat_s"] == 0.0


async def test_a_refused_request_marks_the_peer_unreachable_until_it_answers(tmp_path):
    clock, wire = Clock(), ScriptedPeer()
    cluster = _cluster(wire, clock, tmp_path)
    peer = cluster.table.upsert("pc2", "http://127.0.0.3:8000")
    peer.failed("connection refused")
    assert not peer.reachable and peer.state == PeerState.ALIVE  # liveness still follows the beats
    await cluster._beat(peer)
    assert peer.reachable


async def test_a_peer_that_left_is_told_to_join_again_when_it_beats(tmp_path):
    clock, wire = Clock(), ScriptedPeer()
    cluster = _cluster(wire, clock, tmp_path)
    cluster.table.upsert("pc2", "http://127.0.0.3:8000")
    assert (await cluster.handle_leave("pc2"))["known"] is True
    assert cluster.table.get("pc2").state == PeerState.LEFT and cluster.table.get("pc2").gone.is_set()
    answer = await cluster.handle_heartbeat(name="pc2", url="http://127.0.0.3:8000")
    assert answer == {"known": False, "name": "pc1"}  # the server: join again
    await asyncio.sleep(0)
