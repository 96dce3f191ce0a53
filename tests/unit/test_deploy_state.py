"""DesiredSet (the desired models, a view of the replicated cluster state) and the replica
hint of `tars plan`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from distributed.catalog import load_catalog
from distributed.cluster_state import ClusterState
from distributed.deploy.hints import replica_hints
from distributed.deploy.state import LEGACY_FILE, DesiredSet
from distributed.errors import ConfigError
from distributed.planner import plan
from distributed.profiler import profile_host
from distributed.settings import load_settings

TOKEN = "t0ken"


def state(folder: Path, node: str = "pc1") -> ClusterState:
    return ClusterState(node, TOKEN, folder / f"tars-state-{node}.json")


def test_changes_are_kept_on_top_of_the_starting_set(tmp_path: Path) -> None:
    d = DesiredSet(state(tmp_path), ["a", "b"], explicit=True)
    assert d.models() == ["a", "b"]
    assert d.deploy("c", 2, None) and not d.deploy("c", 2, None)  # the second is "unchanged"
    assert d.remove("a") and not d.remove("zzz")
    saved = json.loads((tmp_path / "tars-state-pc1.json").read_text())
    assert {e["k"]: e["v"] for e in saved["entries"]} == {
        "base": {"models": ["a", "b"]}, "desired:c": {"replicas": 2, "node": None}, "desired:a": None}
    again = DesiredSet(state(tmp_path), ["a", "b", "new"], explicit=True)  # TARS_MODELS gained "new" meanwhile
    assert again.models() == ["b", "new", "c"] and again.get("c").replicas == 2  # "a" stays removed
    assert again.deploy("a") and again.models() == ["a", "b", "new", "c"]
    assert again.deploy("b", 1, "pc2") and again.get("b").node == "pc2"  # a starting model re-placed


def test_a_trial_reads_a_change_without_recording_it(tmp_path: Path) -> None:
    from distributed.deploy.state import Deployment

    d = DesiredSet(state(tmp_path), ["a"], explicit=True)
    with d.trial("b", Deployment("b", 2)):
        assert d.models() == ["a", "b"] and d.get("b").replicas == 2
    with d.trial("a", None):
        assert d.models() == []
    assert d.models() == ["a"] and "desired:b" not in d.state.entries


def test_defaults_lose_to_any_configured_starting_set(tmp_path: Path) -> None:
    pc1 = DesiredSet(state(tmp_path, "pc1"), ["chat", "emb"], explicit=True)
    pc2 = DesiredSet(state(tmp_path, "pc2"), ["default-chat"], explicit=False)  # no TARS_MODELS: the catalog's
    pc2.state.merge(pc1.state.wire(), "pc1")
    pc1.state.merge(pc2.state.wire(), "pc2")
    assert pc1.models() == pc2.models() == ["chat", "emb"]


def test_a_removal_and_a_deploy_on_two_sides_of_a_partition_both_survive_the_heal(tmp_path: Path) -> None:
    pc1 = DesiredSet(state(tmp_path, "pc1"), ["chat", "emb"], explicit=True)
    pc2 = DesiredSet(state(tmp_path, "pc2"), [], explicit=False)
    pc2.state.merge(pc1.state.wire(), "pc1")
    assert pc2.models() == ["chat", "emb"]
    pc1.remove("emb")  # the link is down: each side changes its own copy
    pc2.deploy("rerank", 1, None)
    pc2.deploy("chat", 2, None)
    pc1.deploy("chat", 1, "pc1")  # the same model changed on both sides: the newer stamp wins
    writes = {pc1.state.entry("desired:chat").stamp: pc1.get("chat"), pc2.state.entry("desired:chat").stamp: pc2.get("chat")}
    pc1.state.merge(pc2.state.wire(), "pc2")
    pc2.state.merge(pc1.state.wire(), "pc1")
    assert pc1.models() == pc2.models() == ["chat", "rerank"]
    assert pc1.get("chat") == pc2.get("chat") == writes[max(writes)]
    assert pc1.state.digest() == pc2.state.digest()


def test_a_host_back_with_stale_files_adopts_the_newer_state(tmp_path: Path) -> None:
    pc1 = DesiredSet(state(tmp_path / "a", "pc1"), ["chat", "emb"], explicit=True)
    pc1.deploy("rerank")
    pc2 = DesiredSet(state(tmp_path / "b", "pc2"), [], explicit=False)
    pc2.state.merge(pc1.state.wire(), "pc1")
    # pc1 goes away; meanwhile pc2 removes what pc1 deployed
    pc2.remove("rerank")
    pc2.deploy("big", 1, None)
    # pc1 restarts from its (now stale) file, its TARS_MODELS unchanged: nothing of its own wins
    back = DesiredSet(state(tmp_path / "a", "pc1"), ["chat", "emb"], explicit=True)
    assert back.models() == ["chat", "emb", "rerank"]  # what its file says
    back.state.merge(pc2.state.wire(), "pc2")
    pc2.state.merge(back.state.wire(), "pc1")
    assert back.models() == pc2.models() == ["chat", "emb", "big"]


def test_a_deploys_chat_template_and_a_resolved_spec_travel_with_the_state(tmp_path: Path) -> None:
    pc1 = DesiredSet(state(tmp_path, "pc1"), ["a"], explicit=True)
    assert pc1.deploy("b", chat_template="chatml-tools") and not pc1.deploy("b", chat_template="chatml-tools")
    assert pc1.deploy("b")  # its own template again is a change
    assert pc1.deploy("b", chat_template="chatml-tools") and pc1.chat_templates() == {"b": "chatml-tools"}
    ref = {"kind": "chat", "repo": "org/Tiny-GGUF", "file": "tiny-Q4_K_M.gguf", "revision": "a" * 40}
    assert pc1.note_spec("hf.co/org/Tiny-GGUF:Q4_K_M", ref) and not pc1.note_spec("hf.co/org/Tiny-GGUF:Q4_K_M", ref)
    pc2 = DesiredSet(state(tmp_path, "pc2"), ["a"], explicit=True)
    merged = pc2.state.merge(pc1.state.wire(), "pc1")
    assert not merged.refused
    assert pc2.get("b").chat_template == "chatml-tools" and pc2.specs() == {"hf.co/org/Tiny-GGUF:Q4_K_M": ref}
    # a template name this host does not ship (a newer host's, say) runs the model with its own
    pc1.state.put("desired:c", {"replicas": 1, "node": None, "chat_template": "from-the-future"})
    assert pc1.get("c").chat_template is None and "c" not in pc1.chat_templates()
    assert "spec:hf.co/org/Tiny-GGUF:Q4_K_M" in {e["k"] for e in json.loads(
        (tmp_path / "tars-state-pc1.json").read_text())["entries"]}  # kept across restarts


def test_an_older_deployments_file_is_imported_once(tmp_path: Path) -> None:
    legacy = tmp_path / LEGACY_FILE
    legacy.write_text(json.dumps({"version": 1, "deployed": {"c": {"replicas": 2, "node": None}}, "removed": ["a"]}))
    os.utime(legacy, (1_700_000_000, 1_700_000_000))
    d = DesiredSet(state(tmp_path), ["a", "b"], explicit=True, legacy_dir=tmp_path)
    assert d.models() == ["b", "c"] and d.get("c").replicas == 2
    assert d.state.entry("desired:c").stamp.ms == 1_700_000_000_000  # stamped with the file's time
    legacy.write_text(json.dumps({"deployed": {}, "removed": ["b"]}))
    again = DesiredSet(state(tmp_path), ["a", "b"], explicit=True, legacy_dir=tmp_path)  # not imported again
    assert again.models() == ["b", "c"]


def test_a_broken_file_stops_start_up_naming_it(tmp_path: Path) -> None:
    (tmp_path / "tars-state-pc1.json").write_text("{not json")
    with pytest.raises(ConfigError, match="tars-state-pc1.json"):
        state(tmp_path)


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


def test_a_host_whose_setting_changed_publishes_it_and_an_unchanged_one_does_not(tmp_path: Path) -> None:
    assert DesiredSet(state(tmp_path), ["a", "b"], explicit=True).models() == ["a", "b"]
    assert DesiredSet(state(tmp_path), ["d1", "d2"], explicit=False).models() == ["d1", "d2"]  # back to defaults
    cluster = DesiredSet(state(tmp_path / "other", "pc2"), ["x"], explicit=True)
    here = DesiredSet(state(tmp_path), ["d1", "d2"], explicit=False)  # restarted, its setting unchanged
    here.state.merge(cluster.state.wire(), "pc2")
    assert DesiredSet(state(tmp_path), ["d1", "d2"], explicit=False).models() == ["x"]  # the cluster's stays
