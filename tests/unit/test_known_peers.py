"""distributed/known_peers.py: the peers a node remembers across restarts."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from distributed import known_peers
from distributed.known_peers import KnownPeers


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_a_restarted_node_finds_the_peers_it_saw_most_recent_first(tmp_path: Path) -> None:
    clock = Clock()
    store = KnownPeers(tmp_path / "kp.json", "pc1", "home", clock=clock)
    assert store.seeds() == []
    assert store.remember("pc2", "http://192.168.1.11:8001")
    clock.t += 10
    assert store.remember("pc3", "http://192.168.1.12:8001/")
    again = KnownPeers(tmp_path / "kp.json", "pc1", "home", clock=clock)  # "after a restart"
    assert again.seeds() == ["http://192.168.1.12:8001", "http://192.168.1.11:8001"]
    assert again.seeds(exclude={"http://192.168.1.12:8001"}) == ["http://192.168.1.11:8001"]
    assert stat.S_IMODE((tmp_path / "kp.json").stat().st_mode) == 0o600
    assert not list(tmp_path.glob("*.tmp"))  # written atomically: no temporary file left


def test_heartbeats_do_not_rewrite_the_file_but_a_new_url_or_an_old_sighting_does(tmp_path: Path) -> None:
    clock = Clock()
    store = KnownPeers(tmp_path / "kp.json", "pc1", "home", clock=clock)
    assert store.remember("pc2", "http://10.0.0.2:8001")
    mtime = (tmp_path / "kp.json").stat().st_mtime_ns
    clock.t += 60
    assert not store.remember("pc2", "http://10.0.0.2:8001")  # same URL, seen a minute ago
    assert (tmp_path / "kp.json").stat().st_mtime_ns == mtime
    assert store.remember("pc2", "http://10.0.0.9:8001")  # it moved
    clock.t += known_peers.REFRESH_S + 1
    assert store.remember("pc2", "http://10.0.0.9:8001")  # an hour later: refreshed


def test_old_foreign_damaged_and_own_entries_are_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    path = tmp_path / "kp.json"
    path.write_text(json.dumps({"format": 1, "cluster": "home", "node": "pc1", "peers": [
        {"name": "pc2", "url": "http://10.0.0.2:8001", "last_seen": clock.t - 10},
        {"name": "old", "url": "http://10.0.0.3:8001", "last_seen": clock.t - known_peers.MAX_AGE_S - 1},
        {"name": "bad name!", "url": "http://10.0.0.4:8001", "last_seen": clock.t},
        {"name": "pc5", "url": "file:///etc/passwd", "last_seen": clock.t},
        {"name": "pc1", "url": "http://10.0.0.1:8000", "last_seen": clock.t},
        {"name": "pc6"}]}))
    assert [p.name for p in KnownPeers(path, "pc1", "home", clock=clock).peers()] == ["pc2"]
    assert KnownPeers(path, "pc1", "other-cluster", clock=clock).peers() == []  # it moved to another cluster
    path.write_text("{not json")
    assert KnownPeers(path, "pc1", "home", clock=clock).peers() == []
    assert "ignoring the known-peers file" in caplog.text
    with pytest.raises(Exception):
        KnownPeers(path, "pc1", "home", clock=clock).remember("pc2", "http://user@host:1")


def test_the_store_is_bounded(tmp_path: Path) -> None:
    clock = Clock()
    store = KnownPeers(tmp_path / "kp.json", "pc1", "home", clock=clock)
    for i in range(known_peers.MAX_ENTRIES + 10):
        clock.t += 1
        store.remember(f"n{i}", f"http://10.0.{i // 200}.{i % 200 + 1}:8001")
    names = [p.name for p in KnownPeers(tmp_path / "kp.json", "pc1", "home", clock=clock).peers()]
    assert len(names) == known_peers.MAX_ENTRIES and names[0] == f"n{known_peers.MAX_ENTRIES + 9}"
    assert store.forget(names[0]) and not store.forget("nobody")


def test_a_folder_that_cannot_be_written_is_logged_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    store = KnownPeers(blocker / "kp.json", "pc1", "home")
    assert store.remember("pc2", "http://10.0.0.2:8001")  # in memory at least
    assert "could not write the known-peers file" in caplog.text


def test_for_settings_keeps_the_file_in_the_state_folder(tmp_path: Path) -> None:
    from distributed.settings import load_settings

    s = load_settings(None, models_dir=tmp_path / "models", state_dir=tmp_path, node_name="pc1")
    store = KnownPeers.for_settings(s)
    assert store.path == tmp_path / "tars-known-peers-pc1.json" and store.cluster == "tars" and store.me == "pc1"


def test_nodes_that_share_a_models_folder_keep_their_peers_apart(tmp_path: Path) -> None:
    """Two nodes on one machine, one folder (the tests' shared one): pc2's peers are not a
    third node's, which would otherwise join them at its start and wait for their plan."""
    from distributed.settings import load_settings

    pc2 = KnownPeers.for_settings(load_settings(None, models_dir=tmp_path, node_name="pc2"))
    assert pc2.remember("pc1", "http://127.0.0.2:18651")
    assert KnownPeers.for_settings(load_settings(None, models_dir=tmp_path, node_name="sdn")).seeds() == []
    assert KnownPeers.for_settings(load_settings(None, models_dir=tmp_path, node_name="pc2")).seeds() == [
        "http://127.0.0.2:18651"]
    assert KnownPeers(pc2.path, "sdn", "tars").seeds() == []  # another node's file, however it is named
    _ = os
