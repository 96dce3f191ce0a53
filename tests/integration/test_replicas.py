"""Replicas (issue 12.2): one model on three loopback hosts (127.0.0.2/.3/.4, in process), each
request routed to the least busy live replica; a replica host killed under load costs no
request. Real app, nodes, cluster, planner and /rpc; fake models (with a per-token delay)."""

from __future__ import annotations

import asyncio
import collections

import pytest

from tests.cluster_support import Host, Net, until

pytestmark = pytest.mark.anyio

CHAT, EMB, BASE = "smollm2-135m-instruct", "all-MiniLM-L6-v2", "gemma-3-270m"
URLS = {"pc1": "http://127.0.0.2:18801", "pc2": "http://127.0.0.3:18802", "pc3": "http://127.0.0.4:18803"}
SLOW = {"token_delay_s": 0.02, "reply_tokens": 8}


@pytest.fixture
async def trio(tmp_path):
    net = Net()
    hosts = []
    try:
        for name, preset in (("pc1", "rtx3060-12gb"), ("pc2", "gtx1660s-6gb"), ("pc3", "gtx1660s-6gb")):
            peers = () if name == "pc1" else (URLS["pc1"],)
            hosts.append(await Host(net, name, URLS[name], preset, peers=peers, extra=SLOW, models=[CHAT, EMB],
                                    models_dir=tmp_path / name).start())
        pc1 = hosts[0]
        await until(lambda: len(pc1.cluster.hosts()) == 3 and all(
            t.state == "ready" for h in hosts for t in h.node.targets.values()) and all(
            len(h.node.targets) == 2 for h in hosts), timeout=10, what="three hosts joined and ready")
        yield hosts
    finally:
        for h in reversed(hosts):
            await h.stop()


def replica_set(host: Host, model: str):
    return host.node.routes.replicas.get(model)


def live_members(host: Host, model: str) -> set[str]:
    rs = replica_set(host, model)
    return {m.node for m in rs.members() if rs.live(m)} if rs is not None else set()


async def test_replicas_balance_and_survive_a_host_killed_under_load(trio):
    pc1, pc2, pc3 = trio
    r = await pc2.http.post("/models", json={"model": BASE, "replicas": 3})  # asked on a worker
    assert r.status_code == 202, r.text
    assert sorted(a["node"] for a in r.json()["placement"]) == ["pc1", "pc2", "pc3"]
    await until(lambda: all(live_members(h, BASE) == {"pc1", "pc2", "pc3"} for h in trio), timeout=10,
                what="every host routing to three ready replicas")
    rows = {m["id"]: m for m in (await pc1.http.get("/models")).json()["models"]}
    assert sorted(x["node"] for x in rows[BASE]["replicas"]) == ["pc1", "pc2", "pc3"]

    served: collections.Counter[str] = collections.Counter()
    failures: list[str] = []
    sem = asyncio.Semaphore(9)

    async def one(i: int) -> None:
        async with sem:
            entry = trio[i % 2]  # requests arrive at pc1 and pc2
            resp = await entry.http.post("/inference", json={"model": BASE, "prompt": f"hello {i}",
                                                             "max_tokens": 8, "stream": i % 3 == 0})
            if resp.status_code != 200:
                failures.append(f"{resp.status_code} {resp.text[:200]}")
            elif i % 3:
                served[resp.json()["node"]] += 1

    tasks = [asyncio.create_task(one(i)) for i in range(90)]
    await until(lambda: sum(served.values()) >= 12, timeout=20, what="load running")
    await pc3.crash()  # a replica host dies with requests on it and more on the way
    await asyncio.gather(*tasks)
    assert failures == [], failures
    assert served["pc3"] > 0 and served["pc1"] > 0 and served["pc2"] > 0, served  # all three took work
    # after the kill every request went to pc1/pc2; the dead replica was skipped (and retried off)
    await until(lambda: "pc3" not in live_members(pc1, BASE), timeout=5, what="pc3 skipped")
    before = served["pc3"]
    for i in range(6):
        resp = await pc1.http.post("/inference", json={"model": BASE, "prompt": f"after {i}", "max_tokens": 4})
        assert resp.status_code == 200 and resp.json()["node"] in ("pc1", "pc2")
    assert served["pc3"] == before


async def test_least_work_in_flight_wins_and_the_copy_here_first_on_a_tie(trio):
    pc1, pc2, pc3 = trio
    r = await pc1.http.post("/models", json={"model": BASE, "replicas": 3})
    assert r.status_code == 202
    await until(lambda: live_members(pc1, BASE) == {"pc1", "pc2", "pc3"}, timeout=10, what="three replicas")
    rs = replica_set(pc1, BASE)
    assert rs.pick().node == "pc1"  # idle everywhere: the copy here
    rs.sent.update({"pc1": 0, "pc2": 0})
    local = rs.local_member()
    gen = asyncio.create_task(local.generate(__import__("distributed.domain", fromlist=["x"]).GenerateRequest(
        prompt="busy", max_tokens=8)))
    await until(lambda: local.queue_depth > 0, what="the copy here busy")
    assert {rs.pick().node, rs.pick().node} == {"pc2", "pc3"}  # pc2 and pc3 idle: they take turns
    rs.sent["pc2"] = 3
    assert rs.pick().node == "pc3"
    await gen
    # scaling down: replicas 1 → one host, the others unload
    r = await pc1.http.post("/models", json={"model": BASE, "replicas": 1})
    assert r.status_code == 202 and len(r.json()["placement"]) == 1
    await until(lambda: replica_set(pc1, BASE) is None and sum(
        1 for h in trio if BASE in h.node.targets and h.node.targets[BASE].local) == 1, timeout=10,
        what="one copy left")


async def test_a_conversations_next_turn_goes_to_the_replica_that_has_its_start(trio):
    """Cache-aware routing (TARS_ROUTING=cache, the default) through the real app: six
    conversations, each with its own long system prompt, sent to pc1 at once spread over the
    three replicas; every later turn of each goes where its first went."""
    pc1 = trio[0]
    r = await pc1.http.post("/models", json={"model": BASE, "replicas": 3})
    assert r.status_code == 202, r.text
    await until(lambda: all(live_members(h, BASE) == {"pc1", "pc2", "pc3"} for h in trio), timeout=10,
                what="every host routing to three ready replicas")
    chats = [[{"role": "system", "content": f"Conversation {i}: " + "answer briefly and kindly. " * 20}]
             for i in range(6)]
    where: dict[int, list[str]] = collections.defaultdict(list)

    async def turn(i: int, n: int) -> None:
        chats[i].append({"role": "user", "content": f"question {n}"})
        resp = await pc1.http.post("/inference", json={"model": BASE, "messages": chats[i], "max_tokens": 8})
        assert resp.status_code == 200, resp.text
        chats[i].append({"role": "assistant", "content": resp.json()["text"]})
        where[i].append(resp.json()["node"])

    for n in range(3):
        await asyncio.gather(*(turn(i, n) for i in range(6)))
    assert {nodes[0] for nodes in where.values()} == {"pc1", "pc2", "pc3"}, where  # the first turns spread
    assert all(len(set(nodes)) == 1 for nodes in where.values()), where  # and each conversation stayed
    rows = {m["id"]: m for m in (await pc1.http.get("/models")).json()["models"]}
    assert rows[BASE]["routing"] == {"rule": "cache", "slack": 2, "hits": 12, "misses": 6, "overridden": 0}
