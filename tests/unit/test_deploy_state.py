"""DesiredSet (the persisted desired models) and the replica hint of `tars plan`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distributed.catalog import load_catalog
from distributed.deploy.hints import replica_hints
from distributed.deploy.state import STATE_FILE, DesiredSet
from distributed.errors import ConfigError
from distributed.planner import plan
from distributed.profiler import profile_host
from distributed.settings import load_settings


def test_changes_are_kept_on_top_of_the_starting_set(tmp_path: Path) -> None:
    d = DesiredSet(tmp_path, ["a", "b"])
    assert d.models() == ["a", "b"]
    assert d.deploy("c", 2, None) and not d.deploy("c", 2, None)  # the second is "unchanged"
    assert d.remove("a") and not d.remove("zzz")
    d.save()
    assert json.loads((tmp_path / STATE_FILE).read_text()) == {
        "version": 1, "deployed": {"c": {"replicas": 2, "node": None}}, "removed": ["a"]}
    again = DesiredSet(tmp_path, ["a", "b", "new"])  # TARS_MODELS gained "new" meanwhile
    assert again.models() == ["b", "new", "c"] and again.get("c").replicas == 2
    assert again.deploy("a") and again.models() == ["a", "b", "new", "c"] and "a" not in again.deployed
    assert again.deploy("b", 1, "pc2") and again.get("b").node == "pc2"  # a starting model re-placed


def test_a_broken_file_stops_start_up_naming_it(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match=STATE_FILE):
        DesiredSet(tmp_path, ["a"])


def test_plan_suggests_replicas_for_an_idle_host(tmp_path: Path) -> None:
    cat = load_catalog()
    hosts = {"pc1": profile_host("rtx3060-12gb", "pc1"), "pc2": profile_host("gtx1660s-6gb", "pc2"),
             "pc3": profile_host("gtx1660s-6gb", "pc3")}
    specs = {s.id: s for s in cat.all()}
    p = plan(hosts, cat.defaults())
    settings = load_settings(models_dir=tmp_path, chat_engine="inprocess")  # planned as the in-process engine runs
    hints = replica_hints(hosts, p, specs, settings)
    assert hints == [f"pc3 has nothing to serve: `tars run {cat.default('chat').id} --replicas 2` runs "
                     f"{cat.default('chat').id} there too (each request goes to the least busy copy)"]
    two = {k: hosts[k] for k in ("pc1", "pc2")}
    assert replica_hints(two, plan(two, cat.defaults()), specs, settings) == []


def test_a_pull_on_a_peer_shows_in_this_hosts_model_list() -> None:
    import asyncio

    from distributed.targets import RemoteTarget

    class Peer:  # what a RemoteTarget reads of its peer (cluster.Peer provides it)
        name, state, reachable, client = "pc2", "alive", True, None
        gone = asyncio.Event()
        reports = {"state": "pulling", "progress": {"done_bytes": 10, "total_bytes": 40, "percent": 25.0}}

        def model_info(self, model: str) -> dict:
            return dict(self.reports, id=model)

    peer = Peer()
    t = RemoteTarget("big", "chat", peer, assignment={"backend": "llama_cpp", "quant": "Q4_K_M"})
    info = t.info()
    assert info["state"] == "pulling" and info["progress"]["percent"] == 25.0 and t.state == "loading"
    peer.reports = {"state": "ready"}
    assert t.info()["state"] == "ready" and "progress" not in t.info()
