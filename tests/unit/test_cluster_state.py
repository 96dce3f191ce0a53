"""The replicated state (distributed/cluster_state.py): convergence in any order, tombstones,
forged and replayed updates refused (and logged), a clock that survives restarts, a host back
with stale files adopting the newer state."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distributed.cluster_state import FLOOR_AHEAD_MS, REPLAY_WINDOW, ClusterState, Entry, Refused, Stamp

TOKEN = "cluster-token"
NODES = ("pc1", "pc2", "pc3")
KEYS = ("desired:a", "desired:b", "desired:c", "base")


class Wall:
    """A wall clock in ms that the test moves (it may also go back)."""

    def __init__(self, ms: int = 1_000_000) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def fresh(node: str, wall: Wall | None = None, path: Path | None = None, token: str = TOKEN) -> ClusterState:
    return ClusterState(node, token, path, wall=wall or Wall())


# ----------------------------------------------------------------------------- convergence
write = st.tuples(st.sampled_from(NODES), st.sampled_from(KEYS), st.one_of(st.none(), st.integers(0, 9)),
                  st.integers(0, 3))  # who writes, which key, value (None: tombstone), how far the wall moves


@settings(max_examples=200, deadline=None)
@given(writes=st.lists(write, min_size=1, max_size=25), data=st.data())
def test_any_order_and_any_duplication_of_updates_converges(writes: list[Any], data: st.DataObject) -> None:
    wall = Wall()
    origin = {n: fresh(n, wall) for n in NODES}
    sent: list[dict[str, Any]] = []  # every entry ever written (gossiped before it was overwritten, maybe)
    for node, key, value, dt in writes:
        wall.ms += dt  # several writes may share one millisecond
        src = origin[node]
        if data.draw(st.booleans()):  # sometimes a writer has heard the others first (causal writes)
            src.merge(list(sent), "gossip")
        sent.append(src.put(key, value if value is None else {"v": value}).wire())
    newest: dict[str, Entry] = {}
    for w in sent:
        e = Entry.parse(w)
        if e.key not in newest or e.stamp > newest[e.key].stamp:
            newest[e.key] = e
    replicas = [fresh(f"r{i}", Wall(0)) for i in range(3)]
    for r in replicas:
        order = data.draw(st.permutations(sent + data.draw(st.lists(st.sampled_from(sent), max_size=10))))
        batches = data.draw(st.integers(1, 4))
        for i in range(batches):  # delivered in several messages
            merged = r.merge(order[i::batches], "a-peer")
            assert not merged.refused
    for r in replicas:
        assert {k: e.value for k, e in r.entries.items()} == {k: e.value for k, e in newest.items()}
        assert r.digest() == replicas[0].digest()


def test_a_write_made_after_seeing_another_is_newer_even_with_a_slower_clock() -> None:
    fast, slow = fresh("pc1", Wall(5_000_000)), fresh("pc2", Wall(1_000))
    slow.merge([fast.put("desired:a", {"v": 1}).wire()], "pc1")
    e = slow.put("desired:a", None)  # pc2 removes it after hearing of it: its stamp follows pc1's
    assert e.stamp > fast.entry("desired:a").stamp
    fast.merge([e.wire()], "pc2")
    assert fast.get("desired:a") is None and fast.entry("desired:a").stamp == e.stamp


def test_a_tombstone_keeps_an_older_deploy_out() -> None:
    a, b = fresh("pc1"), fresh("pc2")
    old = a.put("desired:x", {"replicas": 1}).wire()
    b.merge([old], "pc1")
    a.clock.wall.ms += 10  # type: ignore[attr-defined]
    tomb = a.put("desired:x", None).wire()
    b.merge([tomb], "pc1")
    assert b.merge([old], "pc1").changed == [] and b.get("desired:x") is None and "desired:x" in b.entries


# ----------------------------------------------------------------------------- refusals
def test_forged_entries_are_refused_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    a, b = fresh("pc1"), fresh("pc2")
    good = a.put("desired:x", {"replicas": 1}).wire()
    tampered = dict(good, v={"replicas": 64})
    other_cluster = fresh("pc1", token="another-token").put("desired:y", {"replicas": 1}).wire()
    not_its_own = dict(fresh("pc3").put("member:pc3", {"url": "http://x:1"}).wire(), k="member:pc1")
    unknown_key = dict(good, k="secrets")
    with caplog.at_level(logging.WARNING, logger="distributed.cluster_state"):
        merged = b.merge([tampered, other_cluster, not_its_own, unknown_key, {"k": 1}], "pc2")
    assert merged.changed == [] and len(merged.refused) == 5 and b.entries == {}
    text = caplog.text
    assert "refused the state entry 'desired:x' sent by pc2 (origin pc1): its signature does not verify" in text
    assert "only pc1 may write its membership entry" in text and "not a key of the cluster state" in text
    assert b.merge([good], "pc1").changed == ["desired:x"]  # the real one is taken
    second = dict(good, v={"replicas": 2}, m=b.keys.mac("pc1", Entry.parse(dict(good, v={"replicas": 2})).payload()))
    merged = b.merge([second], "pc3")  # a second value for a stamp held already: signed, but forged
    assert merged.refused and "a second value for a stamp" in merged.refused[0][1]


def test_envelopes_refuse_forged_replayed_and_stale_messages(caplog: pytest.LogCaptureFixture) -> None:
    a, b = fresh("pc1"), fresh("pc2")
    m1, m2, m3 = (a.seal({"term": i}) for i in range(3))
    assert b.open(m2, "pc1")["term"] == 1
    assert b.open(m1, "pc1")["term"] == 0  # overtaken by a later one: still taken (the window)
    with pytest.raises(Refused) as ei:
        b.open(m2, "pc1")  # the same message again: a replay
    assert ei.value.kind == "replayed" and "was seen already" in ei.value.why
    with pytest.raises(Refused) as ei:
        b.open(dict(m3, term=9), "pc1")  # changed on the way
    assert ei.value.kind == "forged"
    with pytest.raises(Refused):
        b.open(m3, "pc3")  # pc3 passing pc1's message off as its own
    assert b.open(m3, "pc1")["term"] == 2
    for _ in range(REPLAY_WINDOW + 1):
        last = a.seal({})
    b.open(last, "pc1")
    with pytest.raises(Refused):
        b.open(m1, "pc1")  # far behind the window
    old_run = a.seal({"term": 5})
    restarted = fresh("pc1", Wall(a.clock.wall() + 10))  # type: ignore[arg-type]
    assert restarted.incarnation > a.incarnation
    b.open(restarted.seal({}), "pc1")
    with pytest.raises(Refused) as ei:
        b.open(old_run, "pc1")  # from the run before the restart (or a second host of that name)
    assert ei.value.kind == "stale" and "older than" in ei.value.why


# ----------------------------------------------------------------------------- the clock across restarts
def test_the_clock_and_the_incarnation_survive_restarts_even_with_the_clock_set_back(tmp_path: Path) -> None:
    path = tmp_path / "tars-state-pc1.json"
    wall = Wall(10_000_000)
    s = fresh("pc1", wall, path)
    stamps = [s.put("desired:a", {"n": i}).stamp for i in range(5)]
    assert json.loads(path.read_text())["floor_ms"] >= stamps[-1].ms + FLOOR_AHEAD_MS - 1  # reserved before use
    inc = s.incarnation
    wall.ms = 5_000  # the host's clock was reset (an RTC battery, say) before the restart
    again = fresh("pc1", wall, path)
    assert again.incarnation > inc
    newer = again.put("desired:a", {"n": 99}).stamp
    assert newer > max(stamps) and again.get("desired:a") == {"n": 99}
    assert again.stamp() > newer


def test_a_host_back_with_stale_files_keeps_their_stamps_and_adopts_the_cluster(tmp_path: Path) -> None:
    path = tmp_path / "tars-state-pc1.json"
    pc1, pc2 = fresh("pc1", Wall(1_000), path), fresh("pc2", Wall(2_000))
    pc2.merge([pc1.put("desired:a", {"replicas": 1}).wire(), pc1.put("desired:b", {"replicas": 1}).wire()], "pc1")
    pc2.clock.wall.ms = 9_000  # type: ignore[attr-defined]
    pc2.put("desired:a", None)  # removed while pc1 was away
    back = fresh("pc1", Wall(50_000), path)  # its file is stale; its clock is ahead now
    assert back.get("desired:a") == {"replicas": 1}
    back.merge(pc2.wire(), "pc2")
    pc2.merge(back.wire(), "pc1")
    assert back.get("desired:a") is None and back.digest() == pc2.digest()


def test_a_new_cluster_token_re_signs_the_saved_entries(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "tars-state-pc1.json"
    fresh("pc1", path=path).put("desired:a", {"replicas": 1})
    with caplog.at_level(logging.INFO, logger="distributed.cluster_state"):
        moved = fresh("pc1", path=path, token="new-token")
    assert "signed again" in caplog.text
    peer = fresh("pc2", token="new-token")
    assert peer.merge(moved.wire(), "pc1").changed == ["desired:a"]


def test_stamps_order_by_time_then_counter_then_node() -> None:
    assert Stamp(1, 5, "z") < Stamp(2, 0, "a") and Stamp(1, 1, "z") < Stamp(1, 2, "a") < Stamp(1, 2, "b")
    with pytest.raises(ValueError):
        Stamp.parse([1, -1, "x"])
    with pytest.raises(ValueError):
        Stamp.parse([True, 1, "x"])
