"""Two nodes in one process, wired through httpx.ASGITransport, with the fake backends.

A small in-process "network" routes each peer call to the target node's app and
can cut a node off (every call to or from it fails like a refused connection),
which is how a crash is simulated. The apps, nodes, clusters, planner and the
/rpc channel are the real ones; only the sockets and the models are not.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import numpy as np
import pytest

from distributed.targets import RemoteTarget
from distributed.rpc.client import PeerClient
from tests.cluster_support import Net, until
from tests.cluster_support import Host as SupportHost

pytestmark = pytest.mark.anyio

CHAT, EMB = "gemma-3-270m", "all-MiniLM-L6-v2"
PC1_URL, PC2_URL = "http://127.0.0.2:18501", "http://127.0.0.3:18502"


class Host(SupportHost):
    """tests/cluster_support.Host serving the chat and embedding defaults, with API helpers."""

    def __init__(self, net: Net, name: str, url: str, preset: str, peers: tuple[str, ...] = (),
                 extra: dict[str, Any] | None = None, **overrides: Any) -> None:
        overrides.setdefault("models", [CHAT, EMB])
        super().__init__(net, name, url, preset, peers, extra, **overrides)

    # ---- API helpers
    async def embed(self, texts: list[str] | str, **kw: Any) -> httpx.Response:
        return await self.http.post("/embed", json={"input": texts, **kw})

    async def infer(self, prompt: str, **kw: Any) -> httpx.Response:
        return await self.http.post("/inference", json={"prompt": prompt, "max_tokens": 12, "seed": 1, **kw})

    def peer(self, name: str) -> dict[str, Any]:
        return next(p for p in self.node.status()["peers"] if p["name"] == name)


def ready_everywhere(*hosts: Host) -> bool:
    return all(h.node.health()[0] and len(h.node.targets) == 2 and
               all(t.state == "ready" for t in h.node.targets.values()) for h in hosts)


@pytest.fixture
async def pair():
    net = Net()
    hosts: list[Host] = []

    async def make(fallback: bool = True, pc1_extra: dict[str, Any] | None = None,
                   pc2_extra: dict[str, Any] | None = None) -> tuple[Host, Host]:
        pc1 = await Host(net, "pc1", PC1_URL, "rtx3060-12gb", fallback=fallback, extra=pc1_extra).start()
        pc2 = await Host(net, "pc2", PC2_URL, "gtx1660s-6gb", peers=(PC1_URL,), extra=pc2_extra).start()
        hosts.extend([pc1, pc2])
        await until(lambda: ready_everywhere(pc1, pc2), what="both hosts ready with both models")
        return pc1, pc2

    make.net = net  # type: ignore[attr-defined]
    make.hosts = hosts  # type: ignore[attr-defined]
    yield make
    for h in hosts:
        try:
            await h.stop()
        except Exception:  # noqa: BLE001 - already crashed
            pass


# ----------------------------------------------------------------------------- join and plan
async def test_join_splits_the_plan_and_both_hosts_know_the_routing(pair):
    pc1, pc2 = await pair()
    for h in (pc1, pc2):
        plan = {a.model: a.node for a in h.node.plan.assignments}
        assert plan == {CHAT: "pc1", EMB: "pc2"}
        assert h.cluster.routing() == {CHAT: "pc1", EMB: "pc2"}
    assert pc1.cluster.role == "server" and pc2.cluster.role == "worker"
    assert pc1.cluster.plan_id == pc2.cluster.plan_id != ""
    # each host loaded only its share
    assert [t.model for t in pc1.node.local_targets()] == [CHAT]
    assert [t.model for t in pc2.node.local_targets()] == [EMB]
    assert isinstance(pc1.node.targets[EMB], RemoteTarget) and isinstance(pc2.node.targets[CHAT], RemoteTarget)

    await until(lambda: pc2.peer("pc1")["rtt_ms"] is not None, what="pc2's first heartbeat to pc1")
    status = (await pc2.http.get("/status")).json()
    (peer,) = status["peers"]
    assert peer["name"] == "pc1" and peer["role"] == "server" and peer["state"] == "alive"
    assert peer["url"] == PC1_URL and peer["gpu"]["name"] == "NVIDIA GeForce RTX 3060"
    assert peer["rtt_ms"] is not None and peer["last_heartbeat_s"] < 1.0
    assert [m["id"] for m in peer["models"]] == [CHAT]
    assert status["role"] == "worker"
    models = {m["id"]: m for m in (await pc1.http.get("/models")).json()["models"]}
    assert models[CHAT]["node"] == "pc1" and models[CHAT]["local"] is True
    assert models[EMB]["node"] == "pc2" and models[EMB]["local"] is False and models[EMB]["state"] == "ready"


async def test_routing_both_ways_with_node_and_via(pair):
    pc1, pc2 = await pair()
    direct = (await pc1.infer("hello there")).json()
    routed = (await pc2.infer("hello there")).json()
    assert (direct["node"], direct["via"]) == ("pc1", "pc1")
    assert (routed["node"], routed["via"]) == ("pc1", "pc2")
    assert routed["text"] == direct["text"] and routed["usage"] == direct["usage"]
    assert routed["fallback"] is False

    e_direct = (await pc2.embed(["a sentence", "another"])).json()
    e_routed = (await pc1.embed(["a sentence", "another"])).json()
    assert (e_direct["node"], e_direct["via"]) == ("pc2", "pc2")
    assert (e_routed["node"], e_routed["via"]) == ("pc2", "pc1")
    np.testing.assert_allclose(e_routed["embeddings"], e_direct["embeddings"], rtol=1e-6)
    assert e_routed["usage"] == e_direct["usage"]

    # the OpenAI surface routes too
    r = await pc2.http.post("/v1/chat/completions", json={"model": CHAT, "max_tokens": 5,
                                                           "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    r = await pc1.http.post("/v1/embeddings", json={"model": EMB, "input": ["x", "y"]})
    assert r.status_code == 200 and len(r.json()["data"]) == 2

    # errors cross the channel with their type: unknown model is 404 listing both
    r = await pc2.http.post("/inference", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and CHAT in r.json()["error"]["message"] and EMB in r.json()["error"]["message"]


async def test_streaming_across_hosts(pair):
    pc1, pc2 = await pair()

    async def sse(host: Host) -> list[dict[str, Any]]:
        async with host.http.stream("POST", "/inference", json={"prompt": "stream me", "max_tokens": 10,
                                                                "seed": 3, "stream": True}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            return [json.loads(line[6:]) async for line in r.aiter_lines() if line.startswith("data: ")]

    direct, routed = await sse(pc1), await sse(pc2)
    assert [e["text"] for e in routed if e["type"] == "token"] == [e["text"] for e in direct if e["type"] == "token"]
    assert len([e for e in routed if e["type"] == "token"]) >= 2
    done = routed[-1]
    assert done["type"] == "done" and (done["node"], done["via"]) == ("pc1", "pc2")
    assert done["usage"] == direct[-1]["usage"]


async def test_concurrent_embeddings_are_coalesced_into_few_channel_calls(pair):
    pc1, pc2 = await pair(pc2_extra={"batch_delay_s": 0.02})
    remote = pc1.node.targets[EMB]
    assert isinstance(remote, RemoteTarget)
    texts = [f"sentence number {i}" for i in range(32)]
    answers = await asyncio.gather(*(pc1.embed(t) for t in texts))
    assert all(a.status_code == 200 for a in answers)
    calls = remote._coalescer.calls
    assert calls <= 8, f"{calls} channel calls for 32 requests"
    direct = (await pc2.embed(texts)).json()["embeddings"]
    for i, a in enumerate(answers):
        body = a.json()
        assert body["node"] == "pc2" and body["via"] == "pc1"
        np.testing.assert_allclose(body["embeddings"][0], direct[i], rtol=1e-6)
        assert body["usage"]["prompt_tokens"] == (await pc2.embed(texts[i])).json()["usage"]["prompt_tokens"]


# ----------------------------------------------------------------------------- liveness and failover
async def test_heartbeat_states_alive_suspect_dead(pair):
    pc1, pc2 = await pair()
    assert pc1.peer("pc2")["state"] == "alive"
    seen: list[str] = []
    await pc2.crash()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 3 and "dead" not in seen:
        state = pc1.peer("pc2")["state"]
        if not seen or seen[-1] != state:
            seen.append(state)
        await asyncio.sleep(0.01)
    assert seen[seen.index("suspect") - 1:] == ["alive", "suspect", "dead"] or seen[:2] == ["suspect", "dead"]
    assert time.monotonic() - t0 < 1.5  # 2 beats of 0.1 s, plus slack
    assert pc1.peer("pc2")["missed_heartbeats"] >= 2
    assert pc1.node.targets[EMB].state == "unavailable"


async def test_dead_peer_model_falls_back_here(pair):
    pc1, pc2 = await pair()
    await pc2.crash()
    await until(lambda: pc1.peer("pc2")["state"] == "dead", what="pc2 dead")
    r = await pc1.embed(["still works"])
    assert r.status_code == 200
    body = r.json()
    assert body["fallback"] is True and body["node"] == "pc1" and body["via"] == "pc1"
    models = {m["id"]: m for m in (await pc1.http.get("/models")).json()["models"]}
    assert models[EMB]["fallback"] == {"node": "pc1", "state": "ready"}
    # the chat model, local, is untouched
    assert (await pc1.infer("hi")).json()["fallback"] is False


async def test_request_in_the_window_before_dead_also_falls_back(pair):
    pc1, pc2 = await pair()
    await pc2.crash()  # connection refused at once; not yet declared dead
    r = await pc1.embed(["quick"])
    assert r.status_code == 200 and r.json()["fallback"] is True


async def test_dead_peer_without_fallback_is_503_naming_the_peer_fast(pair):
    pc1, pc2 = await pair(fallback=False)
    await pc2.crash()
    for _ in range(2):  # before and after the peer is declared dead
        t0 = time.monotonic()
        r = await pc1.embed(["x"])
        assert time.monotonic() - t0 < 3.0
        assert r.status_code == 503
        err = r.json()["error"]
        assert err["type"] == "peer_unavailable" and "pc2" in err["message"] and err["details"]["peer"] == "pc2"
        await until(lambda: pc1.peer("pc2")["state"] == "dead", what="pc2 dead")
    assert "TARS_FALLBACK=false" in err["message"]
    r = await pc1.http.post("/v1/embeddings", json={"input": "x"})
    assert r.status_code == 503 and "pc2" in r.json()["error"]["message"]


async def test_model_that_does_not_fit_here_is_503_with_the_reason(pair):
    pc1, pc2 = await pair()
    pc1.node.profile.gpus = []
    pc1.node.profile.ram_total_mb = 1100  # leaves ~76 MB for models
    await pc2.crash()
    r = await pc1.embed(["x"])
    assert r.status_code == 503
    msg = r.json()["error"]["message"]
    assert "pc2" in msg and "cannot run on pc1" in msg


async def test_peer_dying_mid_stream_ends_the_stream_cleanly(pair):
    pc1, pc2 = await pair(pc1_extra={"token_delay_s": 0.05, "reply_tokens": 200})

    async def go() -> tuple[int, list[dict[str, Any]]]:
        async with pc2.http.stream("POST", "/inference", json={"prompt": "long", "max_tokens": 200,
                                                               "stream": True}) as r:
            return r.status_code, [json.loads(x[6:]) async for x in r.aiter_lines() if x.startswith("data: ")]

    task = asyncio.ensure_future(go())
    await until(lambda: pc1.node.targets[CHAT].requests >= 1, what="the stream running on pc1")
    t0 = time.monotonic()
    pc1.net.up[pc1.url] = False  # pc1 stops answering (its in-flight stream is never finished)
    status, events = await asyncio.wait_for(task, timeout=5)
    assert time.monotonic() - t0 < 2.0
    if status == 200:  # the stream had started: it ends with an error event naming the peer
        assert events[-1]["type"] == "error" and events[-1]["error"]["type"] == "peer_unavailable"
        assert "pc1" in events[-1]["error"]["message"]
    else:
        assert status in (502, 503)
    pc1.net.up[pc1.url] = True


async def test_generation_in_flight_when_the_peer_dies_is_a_clean_503(pair):
    pc1, pc2 = await pair(pc1_extra={"token_delay_s": 0.05, "reply_tokens": 200})
    task = asyncio.ensure_future(pc2.infer("long", max_tokens=200))
    await until(lambda: pc1.node.targets[CHAT].requests >= 1, what="the generation running on pc1")
    pc1.net.up[pc1.url] = False
    r = await asyncio.wait_for(task, timeout=5)
    assert r.status_code == 503 and "pc1" in r.json()["error"]["message"]
    pc1.net.up[pc1.url] = True


# ----------------------------------------------------------------------------- rejoin
async def test_restarted_worker_rejoins_and_serves_again(pair):
    pc1, pc2 = await pair()
    await pc2.crash()
    await until(lambda: pc1.peer("pc2")["state"] == "dead", what="pc2 dead")
    assert (await pc1.embed(["during"])).json()["fallback"] is True

    pc2b = await Host(pair.net, "pc2", PC2_URL, "gtx1660s-6gb", peers=(PC1_URL,)).start()
    pair.hosts.append(pc2b)
    await until(lambda: pc1.peer("pc2")["state"] == "alive" and ready_everywhere(pc1, pc2b), what="rejoin")
    await until(lambda: (pc1.node.targets[EMB].remote_state == "ready"), what="pc2 reports its model")
    # the stand-in is dropped once pc2 has been steady for two heartbeats (a flapping link keeps it)
    await until(lambda: pc1.node.targets[EMB].standin is None, what="stand-in dropped")
    body = (await pc1.embed(["after"])).json()
    assert body["node"] == "pc2" and body["fallback"] is False
    assert [t.model for t in pc1.node.local_targets()] == [CHAT]
    assert (await pc2b.infer("hi")).json()["node"] == "pc1"


async def test_restarted_server_is_rejoined_by_the_worker(pair):
    pc1, pc2 = await pair()
    await pc1.crash()
    await until(lambda: pc2.peer("pc1")["state"] == "dead", what="pc1 dead on pc2")
    pc1b = await Host(pair.net, "pc1", PC1_URL, "rtx3060-12gb").start()
    pair.hosts.append(pc1b)
    await until(lambda: "pc2" in pc1b.cluster.peers and ready_everywhere(pc1b, pc2), timeout=8,
                what="worker rejoined the restarted server")
    assert {a.model: a.node for a in pc1b.node.plan.assignments} == {CHAT: "pc1", EMB: "pc2"}
    assert (await pc1b.embed(["x"])).json()["node"] == "pc2"
    assert (await pc2.infer("x")).json()["node"] == "pc1"


async def test_graceful_leave_marks_the_peer_left(pair):
    pc1, pc2 = await pair(fallback=False)
    await pc2.stop()
    assert pc1.peer("pc2")["state"] == "left"
    r = await pc1.embed(["x"])
    assert r.status_code == 503 and "pc2" in r.json()["error"]["message"]


async def test_wrong_token_never_joins(pair):
    net = pair.net
    pc1 = await Host(net, "pc1", PC1_URL, "rtx3060-12gb").start()
    pair.hosts.append(pc1)
    bad = Host(net, "pc2", PC2_URL, "gtx1660s-6gb", peers=(PC1_URL,))
    attempts: list[str] = []

    def wrong_token(url: str) -> PeerClient:
        client = PeerClient(url, "wrong", transport=net.link(PC2_URL, url), timeout=1.0)
        real = client.call

        async def call(method: str, *a: Any, **kw: Any) -> Any:
            try:
                return await real(method, *a, **kw)
            finally:
                attempts.append(method)

        client.call = call  # type: ignore[method-assign]
        return client

    bad._client = wrong_token  # type: ignore[method-assign]
    await bad.start()
    pair.hosts.append(bad)
    await until(lambda: attempts.count("cluster.join") >= 3, what="three refused join attempts")
    assert pc1.cluster.peers == {} and "pc1" not in bad.cluster.peers
    # it never joined: whatever it serves (it plans alone once its seeds stay silent), it serves alone
    assert all(t.node == "pc2" for t in bad.node.targets.values())


# ----------------------------------------------------------------------------- live peer figures
async def test_heartbeats_carry_live_gpu_figures_totals_and_ram_both_ways(pair):
    pc1, pc2 = await pair()
    assert (await pc1.infer("warm up the counters")).status_code == 200
    await until(lambda: (pc2.peer("pc1")["totals"] or {}).get("requests", 0) >= 1, what="pc1's totals on pc2")
    for host, other, gpu in ((pc1, "pc2", "NVIDIA GeForce GTX 1660 SUPER"), (pc2, "pc1", "NVIDIA GeForce RTX 3060")):
        status = (await host.http.get("/status")).json()
        (peer,) = status["peers"]
        assert peer["name"] == other
        (g,) = peer["gpus"]  # live figures, not just the profile's name and size
        assert g["name"] == gpu and g["vram_used_mb"] > 0 and g["temperature_c"] is not None
        assert g["power_w"] is not None and g["vram_total_mb"] > g["vram_used_mb"]
        assert set(peer["totals"]) >= {"tokens_per_s", "embeddings_per_s", "queue_depth", "requests"}
        assert peer["ram"]["total_mb"] > 0 and 0 <= peer["ram"]["free_mb"] <= peer["ram"]["total_mb"]
    # the figures are the peer's own: pc1's totals as pc2 sees them count pc1's chat request
    own = pc1.node.totals()
    seen = pc2.peer("pc1")["totals"]
    assert seen["requests"] >= 1 and seen["requests"] <= own["requests"]


async def test_live_figures_are_cached_for_half_a_beat(pair, monkeypatch):
    pc1, _ = await pair()
    calls = []
    real = pc1.node.live_gpus
    monkeypatch.setattr(pc1.node, "live_gpus", lambda: calls.append(1) or real())
    pc1.cluster._vitals_at = -1e9
    for _ in range(5):
        pc1.cluster.vitals()
    assert len(calls) == 1


def _rpc_server(host: Host) -> Any:
    """The node's RpcServer (behind the app's /rpc route)."""
    from distributed.rpc.server import rpc_server_of

    return rpc_server_of(host.app.routes)


async def test_an_older_peer_that_refuses_the_new_heartbeat_params_still_works(pair):
    """pc1 plays a node without live figures: its cluster.heartbeat refuses their params
    (-32602) and answers without them."""
    from pydantic import BaseModel, ConfigDict

    class OldBeat(BaseModel):  # the previous version's params: no live figures, unknown ones refused
        model_config = ConfigDict(strict=True, extra="forbid")
        name: str
        url: str = ""
        models: list[dict[str, Any]] = []
        plan_id: str = ""
        sent_at: float = 0.0
        ctl: dict[str, Any] | None = None  # the control envelope (every node of this version sends it)

    net = pair.net
    pc1 = Host(net, "pc1", PC1_URL, "rtx3060-12gb")
    srv = _rpc_server(pc1)
    refused: list[str] = []
    beats: list[str] = []

    async def old_heartbeat(params: OldBeat) -> dict[str, Any]:
        beats.append(params.name)
        answer = await pc1.cluster.handle_heartbeat(**params.model_dump())
        return {k: v for k, v in answer.items() if k not in ("gpus", "totals", "ram")}

    strict = srv._wrap("cluster.heartbeat", OldBeat, old_heartbeat)

    async def counting(*args: Any, **params: Any) -> Any:
        if set(params) & {"gpus", "totals", "ram"}:
            refused.append(params["name"])
        return await strict(*args, **params)

    srv.methods["cluster.heartbeat"] = counting
    pc1.cluster.vitals = lambda: {}  # nor does it send any in its own beats
    await pc1.start()
    pc2 = await Host(net, "pc2", PC2_URL, "gtx1660s-6gb", peers=(PC1_URL,)).start()
    pair.hosts.extend([pc1, pc2])
    await until(lambda: ready_everywhere(pc1, pc2), what="both ready")
    seen = len(beats)
    await until(lambda: len(beats) >= seen + 4, what="several beats")
    assert refused == ["pc2"]  # refused once, then pc2 beats without the figures
    assert pc2.cluster.peers["pc1"].takes_vitals is False
    me = pc2.peer("pc1")
    assert me["state"] == "alive" and me["missed_heartbeats"] == 0
    assert me["gpus"] is None and me["totals"] is None  # an older peer reports none
    assert me["gpu"]["name"] == "NVIDIA GeForce RTX 3060"  # the profile still says which card
    assert pc1.peer("pc2")["state"] == "alive"
    assert (await pc2.embed(["x"])).json()["node"] == "pc2" and (await pc1.embed(["x"])).json()["node"] == "pc2"


async def test_tars_status_shows_the_peers_live_figures_and_cluster_totals(pair):
    from rich.console import Console

    from distributed.cli.ops import render_status

    pc1, pc2 = await pair()
    assert (await pc2.embed(["counted on pc2"])).status_code == 200
    await until(lambda: (pc1.peer("pc2")["totals"] or {}).get("requests", 0) >= 1, what="pc2's totals on pc1")
    console = Console(record=True, width=200)
    render_status((await pc1.http.get("/status")).json(), console)
    text = console.export_text()
    gpu_row = next(line for line in text.splitlines() if "GTX 1660" in line)
    assert "°C" in gpu_row and " W" in gpu_row and "250" in gpu_row  # pc2's live VRAM, temperature, power
    assert "whole cluster (2 hosts)" in text


# ----------------------------------------------------------------------------- handoff (make before break)
async def _hammer(host: Host, stop: asyncio.Event, log: list[tuple[float, int, str, bool]]) -> None:
    """Embed through ``host`` every 20 ms until ``stop``: (time, status, node, fallback) each."""
    while not stop.is_set():
        r = await host.embed(["handoff probe"])
        body = r.json()
        log.append((time.monotonic(), r.status_code, body.get("node", ""), body.get("fallback")))
        await asyncio.sleep(0.02)


async def test_a_joining_worker_takes_a_model_over_without_a_loading_gap(pair):
    net = pair.net
    pc1 = await Host(net, "pc1", PC1_URL, "rtx3060-12gb").start()
    pair.hosts.append(pc1)
    await until(lambda: pc1.node.health()[0] and len(pc1.node.local_targets()) == 2, what="pc1 alone, both models")
    first_copy = pc1.node.targets[EMB]
    stop, log = asyncio.Event(), []
    hammer = asyncio.ensure_future(_hammer(pc1, stop, log))
    await asyncio.sleep(0.1)
    pc2 = await Host(net, "pc2", PC2_URL, "gtx1660s-6gb", peers=(PC1_URL,), extra={"load_delay_s": 1.0}).start()
    pair.hosts.append(pc2)
    await until(lambda: isinstance(pc1.node.targets[EMB], RemoteTarget), what="the plan moves EMB to pc2")
    joined_at = time.monotonic()
    # while pc2 loads: pc1 keeps serving its own copy, reported as a handoff, not a fallback
    await until(lambda: len([t for t, *_ in log if t > joined_at]) >= 3, what="requests after the join")
    assert pc2.node.targets[EMB].state == "loading"
    info = next(m for m in (await pc1.http.get("/models")).json()["models"] if m["id"] == EMB)
    assert info["node"] == "pc2" and info["state"] == "loading" and info["handoff"] == {"node": "pc1", "state": "ready"}
    assert "fallback" not in info
    await until(lambda: any(node == "pc2" for _, _, node, _ in log), timeout=5, what="answers from pc2")
    await asyncio.sleep(0.1)
    stop.set()
    await hammer
    assert all(status == 200 for _, status, _, _ in log), [x for x in log if x[1] != 200][:3]
    during = [node for t, _, node, _ in log if t > joined_at and node == "pc1"]
    assert len(during) >= 10, "pc1 did not keep serving while pc2 loaded"
    nodes = [node for _, _, node, _ in log]
    switch = nodes.index("pc2")
    assert set(nodes[:switch]) == {"pc1"} and set(nodes[switch:]) == {"pc2"}  # one clean switch
    assert not any(fallback for _, _, _, fallback in log)
    # then pc1's copy is unloaded: routing goes to pc2 only
    await until(lambda: pc1.node.targets[EMB].standin is None, what="the handoff copy dropped")
    await until(lambda: first_copy.state == "unavailable", what="the handoff copy unloaded")
    assert [t.model for t in pc1.node.local_targets()] == [CHAT]
    assert (await pc2.embed(["x"])).json()["node"] == "pc2"


async def test_a_model_moving_back_from_a_live_peer_is_served_there_until_loaded_here(pair):
    """The reverse direction: pc2 rejoins with a profile that no longer fits the embedding
    model, so the plan moves it to pc1; pc2 keeps computing it (for both hosts) until pc1
    has loaded its copy, then everything goes to pc1."""
    pc1, pc2 = await pair(pc1_extra={"load_delay_s": 1.0})
    pc2_copy = pc2.node.targets[EMB]
    stop, log1, log2 = asyncio.Event(), [], []
    hammers = [asyncio.ensure_future(_hammer(pc1, stop, log1)), asyncio.ensure_future(_hammer(pc2, stop, log2))]
    await asyncio.sleep(0.1)
    pc2.node.profile.gpus = []
    pc2.node.profile.ram_total_mb = 1100  # room for nothing: the embedding model must move
    pc2.cluster._spawn_join(PC1_URL)
    await until(lambda: pc1.node.plan.where(EMB) is not None and pc1.node.plan.where(EMB).node == "pc1",
                what="the plan moves EMB to pc1")
    moved_at = time.monotonic()
    assert isinstance(pc1.node.targets[EMB], RemoteTarget)  # still routed to pc2 while loading here
    await until(lambda: isinstance(pc2.node.targets[EMB], RemoteTarget), what="pc2 applies the plan")
    assert pc2.node.targets[EMB].standin is pc2_copy and pc2.node.targets[EMB].serves_here
    await until(lambda: any(node == "pc1" for _, _, node, _ in log1) and any(node == "pc1" for _, _, node, _ in log2),
                timeout=5, what="answers from pc1 on both hosts")
    await asyncio.sleep(0.1)
    stop.set()
    await asyncio.gather(*hammers)
    for log in (log1, log2):
        assert all(status == 200 for _, status, _, _ in log), [x for x in log if x[1] != 200][:3]
        assert any(t > moved_at + 0.2 and node == "pc2" for t, _, node, _ in log)  # pc2 served during the load
        nodes = [node for _, _, node, _ in log]
        switch = nodes.index("pc1")
        assert set(nodes[:switch]) == {"pc2"} and set(nodes[switch:]) == {"pc1"}
        assert not any(fallback for _, _, _, fallback in log)
    await until(lambda: pc2_copy.state == "unavailable", what="pc2's copy unloaded")
    assert sorted(t.model for t in pc1.node.local_targets()) == sorted([CHAT, EMB])
    assert pc2.node.local_targets() == []


async def test_a_fallback_copy_is_kept_when_the_plan_then_assigns_the_model_here(pair):
    pc1, pc2 = await pair()
    await pc2.crash()
    assert (await pc1.embed(["x"])).json()["fallback"] is True
    copy = pc1.node.targets[EMB].standin
    assert copy is not None and copy.state == "ready"
    small = Host(pair.net, "pc2", PC2_URL, "gtx1660s-6gb", peers=(PC1_URL,))
    small.node.profile.gpus = []
    small.node.profile.ram_total_mb = 1100  # the embedding model no longer fits there
    await small.start()
    pair.hosts.append(small)
    await until(lambda: pc1.node.targets.get(EMB) is copy, what="pc1 adopts its fallback copy")
    body = (await pc1.embed(["y"])).json()
    assert body["node"] == "pc1" and body["fallback"] is False
    assert (await small.embed(["z"])).json()["node"] == "pc1"


# ----------------------------------------------------------------------------- failover without thrash (issue 11.2)
async def test_failover_loads_one_standin_and_keeps_it_until_the_peer_is_back_and_answered(pair):
    """Before the fix, every request while the killed peer was still "alive"/"suspect" dropped
    the stand-in (the peer's last report said "ready"), was refused by the peer, and loaded a
    fresh copy: a load/unload cycle per request."""
    net = pair.net
    pc1 = await Host(net, "pc1", PC1_URL, "rtx3060-12gb", heartbeat_s=0.5).start()
    pc2 = await Host(net, "pc2", PC2_URL, "gtx1660s-6gb", peers=(PC1_URL,), heartbeat_s=0.5).start()
    pair.hosts.extend([pc1, pc2])
    await until(lambda: ready_everywhere(pc1, pc2), what="both hosts ready")
    loads: list[str] = []
    real = pc1.node.local_target
    pc1.node.local_target = lambda spec, a: loads.append(spec.id) or real(spec, a)  # type: ignore[method-assign]
    await pc2.crash()
    answers = list(await asyncio.gather(*(pc1.embed([f"burst {i}"]) for i in range(32))))  # 32 clients at once
    for i in range(10):  # then one after another, still inside the window before "dead"
        answers.append(await pc1.embed([f"one by one {i}"]))
    assert [a.status_code for a in answers] == [200] * 42
    assert all(a.json()["fallback"] is True and a.json()["node"] == "pc1" for a in answers)
    assert loads == [EMB] and pc1.node.routes.fallback_loads == 1  # loaded once, never dropped and reloaded
    copy = pc1.node.targets[EMB].standin
    await until(lambda: pc1.peer("pc2")["state"] == "dead", what="pc2 dead")
    assert pc1.node.targets[EMB].standin is copy and copy.state == "ready"

    pc2b = await Host(net, "pc2", PC2_URL, "gtx1660s-6gb", peers=(PC1_URL,), heartbeat_s=0.5,
                      extra={"load_delay_s": 0.5}).start()
    pair.hosts.append(pc2b)
    await until(lambda: pc1.peer("pc2")["state"] == "alive", what="pc2 back")
    # back and answering, but still loading the model: the copy here keeps serving
    assert pc1.node.targets[EMB].standin is copy and (await pc1.embed(["meanwhile"])).json()["node"] == "pc1"
    await until(lambda: pc1.node.targets[EMB].standin is None, timeout=8, what="the stand-in dropped")
    await until(lambda: copy.state == "unavailable", what="the stand-in unloaded")
    body = (await pc1.embed(["after"])).json()
    assert body["node"] == "pc2" and body["fallback"] is False
    assert loads == [EMB] and [t.model for t in pc1.node.local_targets()] == [CHAT]
