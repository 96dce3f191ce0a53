"""Real nodes on a real (virtual) network: each host in a network namespace of its own,
plugged into one bridge by a veth pair limited to 1 Gbit/s (tests/netns.py).

PC1 (simulated RTX 3060, the planner) and PC2 (simulated GTX 1660 SUPER, TARS_PEERS=PC1)
run ``python -m distributed serve`` with the fake backend (what is exercised is the
network path: join, heartbeats, forwarding, failover, mDNS), a third namespace is a
client/LAN observer. In order:

* the two nodes join across namespaces and a request to PC2 is computed on PC1;
* discovery: both nodes are found over mDNS multicast across the bridge, with the
  cluster's name and never the token; a second cluster makes ``find`` list both;
* a partition: PC1's link set down (carrier lost, packets vanish) — PC2 serves chat
  itself within 3 s, each side takes a change to the desired set, then the link comes back:
  one planner, one placement, one desired set on both;
* a flapping link (down/up every 5 s): no storm of re-plans (counted), and the cluster
  converges once it stops;
* the planner host killed (with a third host, PC3, that finds the cluster over mDNS and
  proves the token by joining): PC2 plans within 10 s, the survivors
  serve chat, and both take deploys and removals; PC1 restarted without TARS_PEERS finds
  them through its known peers, adopts their newer desired set and plans again.

The times are printed (pytest -s) and measured properly in benchmarks/bench_netns.py
(docs/BENCHMARKS.md); the asserts here are functional, with bounds from the issue.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests import netns
from tests import netns_cluster as nc
from tests.netns_cluster import chat as _chat

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

REASON = netns.available()
if REASON is not None:
    pytest.skip(f"no network namespaces: {REASON}", allow_module_level=True)

TOKEN = "netns-e2e-token"
CHAT, EMB, RR = "gemma-3-270m", "all-MiniLM-L6-v2", "ms-marco-MiniLM-L-6-v2"
BASE_ENV = {"TARS_BACKEND_OVERRIDE": "fake", "TARS_CLUSTER_TOKEN": TOKEN, "TARS_MODELS": f"{CHAT},{EMB}",
            "TARS_CLUSTER_NAME": "home"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    logs = tmp_path_factory.mktemp("netns")
    with netns.Lan("e") as lan:
        h1, h2, pc1, pc2 = nc.pair(lan, logs, BASE_ENV)
        h3 = lan.add_host("obs")
        with pc1, pc2:
            nc.start(pc1, h1)
            nc.start(pc2, h2)
            yield {"lan": lan, "h1": h1, "h2": h2, "h3": h3, "pc1": pc1, "pc2": pc2, "logs": logs}


def status(host: netns.Host, node: Any) -> dict[str, Any]:
    return nc.get(host, node.url + "/status").json()


def peer_state(host: netns.Host, node: Any, peer: str) -> str | None:
    return next((p["state"] for p in status(host, node)["peers"] if p["name"] == peer), None)


def chat(host: netns.Host, node: Any, timeout: float = 10.0) -> httpx.Response:
    return _chat(host, node.url, timeout)


def until(cond: Any, timeout: float, what: str, *nodes: Any) -> float:
    """Seconds until ``cond()`` held (HTTP errors count as not yet)."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    while True:
        try:
            if cond():
                return time.monotonic() - t0
        except (httpx.HTTPError, KeyError, StopIteration, TimeoutError):
            pass
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {n.name}\n{n.tail(40)}" for n in nodes)
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}\n{tails}")
        time.sleep(0.1)


def test_two_nodes_join_across_namespaces_over_a_rate_limited_link(cluster: dict[str, Any]) -> None:
    lan, h1, h2, pc1, pc2 = (cluster[k] for k in ("lan", "h1", "h2", "pc1", "pc2"))
    assert "tbf" in lan.qdisc(h1) and "rate 1Gbit" in lan.qdisc(h1)
    until(lambda: peer_state(h1, pc1, "pc2") == "alive", 60, "pc1 sees pc2", pc1, pc2)
    until(lambda: status(h2, pc2)["plan"]["assignments"], 60, "pc2 has the plan", pc2)
    placed = {a["model"]: a["node"] for a in status(h1, pc1)["plan"]["assignments"]}
    assert placed == {CHAT: "pc1", EMB: "pc2"}
    r = chat(h2, pc2)  # asked of pc2, computed on pc1 across the link
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["node"] == "pc1" and body["via"] == "pc2" and not body["fallback"]
    # and the other way: an embedding asked of pc1 is computed on pc2 (once pc2 has loaded it:
    # until then pc1's own copy serves, make before break)
    until(lambda: nc.post(h1, pc1.url + "/embed", json={"model": EMB, "input": ["a", "b"]}).json()["node"] == "pc2",
          60, "the embedding computed on pc2", pc1, pc2)


def _discover(host: netns.Host, *args: str) -> subprocess.CompletedProcess[str]:
    return host.run(sys.executable, "-m", "distributed.discovery", *args, "--timeout", "3", check=False)


def test_discovery_finds_the_cluster_across_namespaces_and_never_the_token(cluster: dict[str, Any]) -> None:
    h3 = cluster["h3"]

    def found_now() -> list[dict[str, Any]]:
        r = _discover(h3, "browse", "--json")
        assert r.returncode == 0, r.stderr
        return [json.loads(line) for line in r.stdout.splitlines()]

    # the record says "planner" once the node plans (a node with mDNS on first asks the LAN: ~3 s)
    until(lambda: any(f["node"] == "pc1" and f["planner"] for f in found_now()), 30, "pc1 advertised as the planner")
    r = _discover(h3, "browse", "--json")
    found = [json.loads(line) for line in r.stdout.splitlines()]
    by_node = {f["node"]: f for f in found}
    assert set(by_node) == {"pc1", "pc2"}, r.stdout
    assert by_node["pc1"]["url"] == f"http://{cluster['h1'].ip}:8000" and by_node["pc1"]["planner"]
    assert by_node["pc2"]["url"] == f"http://{cluster['h2'].ip}:8000" and not by_node["pc2"]["planner"]
    assert {f["cluster"] for f in found} == {"home"} and by_node["pc1"]["version"]
    assert TOKEN not in r.stdout
    # what is on the wire, seen from a host that is no member: no token in any record
    dump = h3.run(sys.executable, "-c", _DUMP_TXT, check=False)
    assert "cluster=home" in dump.stdout and TOKEN not in dump.stdout, dump.stdout + dump.stderr
    r = _discover(h3, "find")
    assert r.returncode == 0 and r.stdout.split("\t")[:3] == ["home", "pc1", f"http://{cluster['h1'].ip}:8000"]


_DUMP_TXT = """
import time, zeroconf
zc = zeroconf.Zeroconf()
names = set()
b = zeroconf.ServiceBrowser(zc, "_tars._tcp.local.", handlers=[lambda zeroconf, service_type, name, state_change: names.add(name)])
time.sleep(3)
for n in sorted(names):
    info = zc.get_service_info("_tars._tcp.local.", n, 2000)
    print(n, [f"{k.decode()}={(v or b'').decode()}" for k, v in (info.properties if info else {}).items()])
zc.close()
"""


def test_a_second_cluster_makes_find_list_both(cluster: dict[str, Any]) -> None:
    lan, h3, logs = cluster["lan"], cluster["h3"], cluster["logs"]
    h4 = lan.add_host("other")
    other = nc.node_on(h4, "lab1", log_dir=logs, env={**BASE_ENV, "TARS_CLUSTER_NAME": "lab",
                                                          "TARS_MODELS_DIR": str(logs / "m4"),
                                                          "TARS_CLUSTER_TOKEN": "another-token"})
    with other:
        nc.start(other, h4)
        until(lambda: _discover(h3, "find").returncode == 4, 30, "both clusters' planners advertised", other)
        r = _discover(h3, "find")
        assert r.returncode == 4, r.stdout + r.stderr
        rows = sorted(line.split("\t")[:2] for line in r.stdout.splitlines())
        assert rows == [["home", "pc1"], ["lab", "lab1"]]
        r = _discover(h3, "find", "--cluster", "lab")
        assert r.returncode == 0 and r.stdout.startswith("lab\tlab1\t")
    until(lambda: _discover(h3, "find").returncode == 0, 30, "lab1's goodbye (its record withdrawn)")


def test_partition_the_survivor_serves_around_the_lost_host_then_heals_to_one_placement(cluster) -> None:
    lan, h1, h2, pc1, pc2 = (cluster[k] for k in ("lan", "h1", "h2", "pc1", "pc2"))
    until(lambda: chat(h2, pc2).json()["node"] == "pc1", 30, "chat through pc2 computed on pc1", pc1, pc2)
    traffic = nc.Traffic(h2, pc2.url, timeout=60).start()
    try:
        time.sleep(1)
        lan.link_down(h1)
        cut = time.monotonic()
        assert not lan.carrier(h1)
        until(lambda: traffic.first_ok_after(cut) is not None, 60, "pc2 serving chat without pc1", pc1, pc2)
        served = traffic.first_ok_after(cut)
        r = chat(h2, pc2)
        assert r.status_code == 200 and r.json()["fallback"] and r.json()["node"] == "pc2"
        # each side takes a change while they cannot talk
        r = nc.post(h2, pc2.url + "/models", timeout=20, json={"model": RR})
        assert r.status_code == 202, r.text
        r = nc.delete(h1, pc1.url + f"/models/{EMB}", timeout=20)
        assert r.status_code == 202, r.text
        lan.link_up(h1)
        healed = time.monotonic()
        until(lambda: traffic.first_ok_after(healed, node="pc1") is not None, 60, "chat computed on pc1 again",
              pc1, pc2)
        back = traffic.first_ok_after(healed, node="pc1")
    finally:
        traffic.stop()
    until(lambda: nc.one_placement((h1, pc1), (h2, pc2)), 60, "one placement on both after the heal", pc1, pc2)
    took = time.monotonic() - healed
    v1, v2 = nc.control(h1, pc1), nc.control(h2, pc2)
    assert v1["planner"] == "pc1" and v1["placed"] == v2["placed"] == sorted([CHAT, RR])  # both changes kept
    print(f"\npartition: pc2 served chat itself {served:.1f} s after pc1's link went down; heal: computed on pc1 "
          f"again {back:.1f} s after the link came up, one placement after {took:.1f} s (term {v1['term']})")
    assert served <= 3.0, f"served around the lost host after {served:.1f} s (issue 19: within 3 s)"
    until(lambda: peer_state(h1, pc1, "pc2") == "alive" and peer_state(h2, pc2, "pc1") == "alive", 60,
          "both alive again", pc1, pc2)


def test_a_link_flapping_every_5_s_and_the_cluster_converges_after(cluster: dict[str, Any]) -> None:
    lan, h1, h2, pc1, pc2 = (cluster[k] for k in ("lan", "h1", "h2", "pc1", "pc2"))
    until(lambda: chat(h2, pc2).json()["node"] == "pc1", 60, "a settled cluster", pc1, pc2)
    marks = {n.name: len(n.log_text()) for n in (pc1, pc2)}
    traffic = nc.Traffic(h2, pc2.url, every=0.5, timeout=30).start()
    t0 = time.monotonic()
    try:
        for _ in range(6):  # a minute: 5 s down, 5 s up
            lan.link_down(h1)
            time.sleep(5)
            lan.link_up(h1)
            time.sleep(5)
    finally:
        traffic.stop()
    minutes = (time.monotonic() - t0) / 60
    counts = {n.name: nc.events(n.log_text()[marks[n.name]:]) for n in (pc1, pc2)}
    until(lambda: peer_state(h2, pc2, "pc1") == "alive" and peer_state(h1, pc1, "pc2") == "alive", 60,
          "both alive after the flapping", pc1, pc2)
    until(lambda: chat(h2, pc2).json()["node"] == "pc1", 60, "chat on pc1 after the flapping", pc1, pc2)
    until(lambda: nc.one_placement((h1, pc1), (h2, pc2)), 60, "one placement after the flapping", pc1, pc2)
    ok = sum(1 for o in traffic.outcomes if o.status == 200)
    replans = sum(c["replan"] for c in counts.values()) / minutes
    print(f"\nflapping for {minutes:.2f} min: {replans:.1f} re-plans per minute; {counts} ; {ok} of "
          f"{len(traffic.outcomes)} chat requests answered")
    assert replans <= 4, f"{replans:.1f} re-plans per minute under a link flapping every 5 s"
    assert ok >= 0.8 * len(traffic.outcomes)


def test_the_planner_host_killed_another_plans_and_the_survivors_take_changes(cluster) -> None:
    lan, h1, h2, pc1, pc2, logs = (cluster[k] for k in ("lan", "h1", "h2", "pc1", "pc2", "logs"))
    h4 = lan.add_host("pc3")
    pc3 = nc.node_on(h4, "pc3", log_dir=logs, env={**BASE_ENV, "TARS_GPU_PROFILE": "gtx1660s-6gb",
                                                    "TARS_MODELS_DIR": str(logs / "m3")})  # no TARS_PEERS: mDNS
    with pc3:
        nc.start(pc3, h4)
        trio = ((h1, pc1), (h2, pc2), (h4, pc3))
        until(lambda: nc.one_placement(*trio) and len(nc.control(h4, pc3)["members"]) == 3, 60, "three hosts, one plan",
              pc1, pc2, pc3)
        assert "over mDNS: joining it (it must prove the cluster token)" in pc3.log_text()  # a hint, then the token
        pc1.kill()  # the planning host dies: no goodbye
        killed = time.monotonic()
        until(lambda: nc.control(h2, pc2)["planner"] == "pc2" and nc.control(h4, pc3)["planner"] == "pc2", 30,
              "pc2 taking the planner's role", pc2, pc3)
        took = time.monotonic() - killed
        until(lambda: nc.one_placement((h2, pc2), (h4, pc3)) and nc.control(h2, pc2)["plan_by"] == "pc2", 30,
              "pc2's plan in force on both survivors", pc2, pc3)
        for h, n in ((h2, pc2), (h4, pc3)):  # the survivors serve what the desired set holds
            r = chat(h, n)
            assert r.status_code == 200 and r.json()["node"] in ("pc2", "pc3"), r.text
        r = nc.post(h4, pc3.url + "/models", timeout=20, json={"model": EMB})  # asked of a host that does not plan
        assert r.status_code == 202 and r.json()["planner"] == "pc2", r.text
        r = nc.delete(h2, pc2.url + f"/models/{RR}", timeout=20)
        assert r.status_code == 202, r.text
        until(lambda: nc.one_placement((h2, pc2), (h4, pc3)) and nc.control(h4, pc3)["placed"] == sorted([CHAT, EMB]),
              30, "the deploy and the removal applied on both survivors", pc2, pc3)
        print(f"\nplanner killed: pc2 planned {took:.1f} s later (term {nc.control(h2, pc2)['term']})")
        assert took <= 10.0, f"the next planner took over after {took:.1f} s (issue 19: within 10 s)"
        # pc1 back, without TARS_PEERS: its known peers bring it in; it adopts the newer desired set
        pc1.env.pop("TARS_PEERS", None)
        nc.start(pc1, h1)
        until(lambda: nc.one_placement(*trio) and nc.control(h1, pc1)["planner"] == "pc1", 60,
              "pc1 back in charge, one placement", pc1, pc2, pc3)
        assert nc.control(h1, pc1)["placed"] == sorted([CHAT, EMB])  # the cluster's, not its stale file's
        assert "joined pc2 at" in pc1.log_text() or "joined pc3 at" in pc1.log_text()
