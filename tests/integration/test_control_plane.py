"""The control plane without a coordinator (issue 19), nodes in one process over the in-process
network of tests/cluster_support.py (real apps, nodes, clusters, planner and /rpc; fake
models; heartbeats of 0.1 s, so the planner's role passes on after 0.4 s of silence).

* the planner killed: the next one by the rule plans, the survivors serve every model, and
  any of them takes deploys and removals;
* a partition: each side serves what it can and takes changes; on heal one plan wins and
  every host holds the same desired set and the same placement;
* a host back with stale files adopts the cluster's newer state; a restarted PC1 finds PC2
  again through its known peers;
* bad input: a forged or replayed message, a second host with a taken name, and a host that
  claims the planner's role without the rule choosing it — each refused with a log line.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytest

from distributed.election import PlanMessage, Version
from distributed.errors import Unauthorized, ValidationFailed
from tests.cluster_support import Host, Net, until

pytestmark = pytest.mark.anyio

CHAT, EMB, RR = "gemma-3-270m", "all-MiniLM-L6-v2", "ms-marco-MiniLM-L-6-v2"
URLS = {"pc1": "http://127.0.0.2:18601", "pc2": "http://127.0.0.3:18602", "pc3": "http://127.0.0.4:18603"}
PRESETS = {"pc1": "rtx3060-12gb", "pc2": "gtx1660s-6gb", "pc3": "gtx1660s-6gb"}


@pytest.fixture
async def cluster(tmp_path: Path):
    """``start(*names)``: pc1 first (no TARS_PEERS), the others with TARS_PEERS=pc1, each with a
    models folder of its own under tmp_path (kept across a restart of the same name)."""
    net = Net()
    hosts: list[Host] = []

    async def start(*names: str, **kw: Any) -> list[Host]:
        out = []
        for name in names:
            peers = kw.get("peers", () if name == "pc1" else (URLS["pc1"],))
            h = await Host(net, name, kw.get("url", URLS[name]), PRESETS[name], peers=peers, models=[CHAT, EMB],
                           models_dir=tmp_path / name).start()
            hosts.append(h)
            out.append(h)
        return out

    start.net = net  # type: ignore[attr-defined]
    yield start
    for h in reversed(hosts):
        try:
            await h.stop()
        except Exception:  # noqa: BLE001 - crashed already
            pass


def converged(*hosts: Host) -> bool:
    """One planner, one plan, one desired set, every model routed alike and ready."""
    first = hosts[0]
    ids = {h.cluster.plan_id for h in hosts}
    return (len(ids) == 1 and "" not in ids and len({h.cluster.planner for h in hosts}) == 1
            and len({tuple(h.node.placement.desired.models()) for h in hosts}) == 1
            and all({m: t.node for m, t in h.node.targets.items()} == {m: t.node for m, t in first.node.targets.items()}
                    for h in hosts)
            and all(t.state == "ready" for h in hosts for t in h.node.targets.values()))


async def test_the_planner_killed_the_next_plans_and_any_survivor_takes_deploys(cluster):
    pc1, pc2, pc3 = await cluster("pc1", "pc2", "pc3")
    await until(lambda: converged(pc1, pc2, pc3) and len(pc1.cluster.hosts()) == 3, timeout=10, what="three joined")
    assert pc2.cluster.planner == "pc1" and pc1.node.plan.where(CHAT).node == "pc1"
    term = pc2.cluster.summary()["term"]
    await pc1.crash()
    t0 = time.monotonic()
    await until(lambda: pc2.cluster.is_planner and pc3.cluster.planner == "pc2", timeout=10, what="pc2 plans")
    took = time.monotonic() - t0
    await until(lambda: converged(pc2, pc3) and pc2.node.plan.where(CHAT) is not None, timeout=10,
                what="the survivors re-planned")
    s = pc2.cluster.summary()
    assert s["term"] > term and s["plan_by"] == "pc2" and took < 3.0  # 0.2 s dead + 0.4 s silence, loaded box
    assert {a.node for a in pc2.node.plan.assignments} <= {"pc2", "pc3"} and not pc2.node.plan.unplaced
    for h in (pc2, pc3):  # every deployed model served by the survivors
        assert (await h.http.post("/inference", json={"model": CHAT, "prompt": "hi"})).status_code == 200
        assert (await h.http.post("/embed", json={"model": EMB, "input": "hi"})).status_code == 200
    r = await pc3.http.post("/models", json={"model": RR})  # asked of a host that does not plan
    assert r.status_code == 202, r.text
    assert r.json()["planner"] == "pc2" and r.json()["placement"][0]["node"] in ("pc2", "pc3")
    r = await pc3.http.delete(f"/models/{EMB}")
    assert r.status_code == 202, r.text
    await until(lambda: converged(pc2, pc3) and RR in pc2.node.targets and EMB not in pc3.node.targets,
                timeout=10, what="the deploy and the removal applied everywhere")
    assert pc2.node.placement.desired.models() == pc3.node.placement.desired.models() == [CHAT, RR]


async def test_a_partition_each_side_serves_and_takes_changes_then_one_placement_wins(cluster, caplog):
    pc1, pc2 = await cluster("pc1", "pc2")
    net = cluster.net
    await until(lambda: converged(pc1, pc2), timeout=10, what="a settled pair")
    net.up[pc1.url] = False  # the link between them is cut; both keep running
    await until(lambda: pc2.cluster.is_planner and pc1.cluster.is_planner, timeout=10, what="a planner on each side")
    for h in (pc1, pc2):  # each side serves what it can
        assert (await h.http.post("/inference", json={"model": CHAT, "prompt": "hi"})).status_code == 200
        assert (await h.http.post("/embed", json={"model": EMB, "input": "hi"})).status_code == 200
    assert (await pc1.http.post("/models", json={"model": RR})).status_code == 202  # each side takes changes
    assert (await pc2.http.delete(f"/models/{EMB}")).status_code == 202
    net.up[pc1.url] = True  # healed
    with caplog.at_level(logging.INFO):
        await until(lambda: converged(pc1, pc2) and pc2.cluster.planner == "pc1", timeout=15,
                    what="one planner, one placement after the heal")
    assert pc1.node.placement.desired.models() == pc2.node.placement.desired.models() == [CHAT, RR]
    assert pc1.cluster.summary()["term"] == pc2.cluster.summary()["term"]
    assert EMB not in pc1.node.targets and RR in pc2.node.targets
    assert pc1.cluster.state.digest() == pc2.cluster.state.digest()


async def test_a_host_back_with_stale_files_adopts_the_newer_state(cluster):
    pc1, pc2 = await cluster("pc1", "pc2")
    await until(lambda: converged(pc1, pc2), timeout=10, what="a settled pair")
    await pc1.crash()  # its files stay as they are
    await until(lambda: pc2.cluster.is_planner, timeout=10, what="pc2 plans")
    assert (await pc2.http.post("/models", json={"model": RR})).status_code == 202
    assert (await pc2.http.delete(f"/models/{EMB}")).status_code == 202
    (back,) = await cluster("pc1")  # the same folder: a stale desired set, the same TARS_MODELS
    await until(lambda: converged(back, pc2) and back.cluster.is_planner, timeout=15, what="pc1 back in charge")
    assert back.node.placement.desired.models() == [CHAT, RR]  # the cluster's newer state, not its own
    assert EMB not in back.node.targets and back.node.plan.where(RR) is not None


async def test_a_restarted_pc1_finds_pc2_again_through_its_known_peers(cluster, caplog):
    pc1, pc2 = await cluster("pc1", "pc2")
    await until(lambda: converged(pc1, pc2), timeout=10, what="a settled pair")
    await pc1.crash()
    with caplog.at_level(logging.INFO, logger="distributed.cluster"):
        (back,) = await cluster("pc1", peers=())  # no TARS_PEERS
        assert back.cluster.seeds == [URLS["pc2"]]  # remembered from the token-checked exchanges
        await until(lambda: converged(back, pc2), timeout=15, what="pc1 back with pc2")
    assert f"joined pc2 at {URLS['pc2']}" in caplog.text


async def _beat_params(sender: Host, receiver: Host) -> dict[str, Any]:
    peer = sender.cluster.table.get(receiver.name)
    return {"name": sender.name, "url": sender.url, "models": [], "plan_id": "", "sent_at": 0.0,
            "ctl": sender.cluster.control.envelope(peer)}


async def test_forged_and_replayed_messages_are_refused_and_logged(cluster, caplog):
    pc1, pc2 = await cluster("pc1", "pc2")
    await until(lambda: converged(pc1, pc2), timeout=10, what="a settled pair")
    client = pc2.cluster.table.client(pc1.url)  # the cluster token, over the in-process network
    params = await _beat_params(pc2, pc1)
    assert (await client.call("cluster.heartbeat", params))["known"] is True
    with caplog.at_level(logging.WARNING, logger="distributed.control"):
        with pytest.raises(Unauthorized, match="seen already"):
            await client.call("cluster.heartbeat", params)  # replayed
        forged = await _beat_params(pc2, pc1)
        forged["ctl"] = dict(forged["ctl"], term=forged["ctl"]["term"] + 50)
        with pytest.raises(Unauthorized, match="signature"):
            await client.call("cluster.heartbeat", forged)
    assert "refused a replayed message from pc2" in caplog.text
    assert "refused a forged message from pc2" in caplog.text
    assert pc1.cluster.summary()["term"] < 50  # nothing of the forged envelope was taken
    await client.aclose()


async def test_a_second_host_with_a_taken_name_is_refused_with_a_clear_log_line(cluster, caplog):
    pc1, pc2 = await cluster("pc1", "pc2")
    await until(lambda: converged(pc1, pc2), timeout=10, what="a settled pair")
    with caplog.at_level(logging.ERROR, logger="distributed.cluster"):
        (twin,) = await cluster("pc2", url=URLS["pc3"])  # another machine, also named pc2
        await until(lambda: "two hosts share the name" in caplog.text, timeout=5, what="the refusal logged")
    assert pc1.cluster.table.get("pc2").url == URLS["pc2"]  # the one that was there stays
    assert "a node named pc2 is alive at http://127.0.0.3:18602" in caplog.text
    assert twin.cluster.table.get("pc1") is None or twin.cluster.table.get("pc1").profile is None


async def test_a_host_claiming_the_planner_role_without_the_rule_is_refused(cluster, caplog):
    pc1, pc2 = await cluster("pc1", "pc2")
    await until(lambda: converged(pc1, pc2), timeout=10, what="a settled pair")
    held = pc1.cluster.summary()["plan_version"]
    claim = PlanMessage.make(Version(held[0], held[1] + 5), "pc2", "claimed", {"assignments": []},
                             pc2.cluster.state.sign)  # a plan pc2 made, properly signed by pc2
    params = await _beat_params(pc2, pc1)
    body = {k: v for k, v in params["ctl"].items() if k not in ("from", "inc", "seq", "nonce", "mac")}
    params["ctl"] = pc2.cluster.state.seal({**body, "plan": claim.wire()})
    client = pc2.cluster.table.client(pc1.url)
    with caplog.at_level(logging.WARNING, logger="distributed.election"):
        await client.call("cluster.heartbeat", params)
    await client.aclose()
    assert "refused the plan of pc2" in caplog.text and "the planner rule picks pc1 (this node), not pc2" in caplog.text
    assert pc1.cluster.summary()["plan_by"] == "pc1" and pc1.node.plan.assignments  # its own plan stays in force


async def test_join_and_heartbeat_without_an_envelope_are_refused(cluster):
    (pc1,) = await cluster("pc1")
    client = pc1.cluster.table.client(pc1.url)
    with pytest.raises(ValidationFailed, match="no control envelope"):
        await client.call("cluster.join", {"name": "old", "url": "http://127.0.0.5:1", "profile": {}})
    await client.aclose()
