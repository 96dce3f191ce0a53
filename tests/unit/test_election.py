"""The planner rule and its terms (distributed/election.py): every node computes the same
planner from the same members; a plan from a host the rule does not pick, or of an old term,
is refused with a clear log line; the planner keeps its role through a short silence."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from distributed.cluster_state import ClusterState
from distributed.election import Candidate, Election, Heard, PlanMessage, Version, elect, electorate

candidates = st.lists(st.builds(Candidate, st.sampled_from([f"pc{i}" for i in range(6)]), st.integers(-2, 2),
                                st.sampled_from([0, 6144, 12288])),
                      min_size=1, max_size=6, unique_by=lambda c: c.name)


@given(pool=candidates, data=st.data())
def test_two_nodes_compute_the_same_planner_from_the_same_members(pool: list[Candidate], data: st.DataObject) -> None:
    seen_by_one = data.draw(st.permutations(pool))
    seen_by_other = data.draw(st.permutations(pool))
    assert elect(seen_by_one) == elect(seen_by_other)


def test_the_rule_priority_then_vram_then_name() -> None:
    pc1, pc2, pc3 = Candidate("pc1", 0, 12288), Candidate("pc2", 0, 6144), Candidate("pc3", 0, 12288)
    assert elect([pc2, pc1]).name == "pc1"  # the RTX 3060 over the GTX 1660 SUPER
    assert elect([pc3, pc1]).name == "pc1"  # equal VRAM: the smaller name
    assert elect([pc1, Candidate("pc2", 1, 6144)]).name == "pc2"  # TARS_PLANNER_PRIORITY first
    assert Candidate.of("pc9", {"priority": "high", "vram_mb": True}) == Candidate("pc9", 0, 0)  # a peer's word


def test_the_planner_keeps_its_role_through_a_short_silence_not_a_long_one() -> None:
    me = Candidate("pc2", 0, 6144)
    members = {"pc1": {"vram_mb": 12288}, "pc2": {"vram_mb": 6144}, "pc3": {"vram_mb": 12288}}
    quiet = {"pc1": Heard(False, 3.0), "pc3": Heard(False, 3.0)}
    assert [c.name for c in electorate(me, members, quiet, "pc1", 8.0)] == ["pc2", "pc1"]  # pc3 is not the planner
    assert [c.name for c in electorate(me, members, {"pc1": Heard(False, 8.5)}, "pc1", 8.0)] == ["pc2"]
    assert [c.name for c in electorate(me, members, {}, "pc1", 8.0)] == ["pc2"]  # never heard: does not count
    left = {"pc1": Heard(False, float("inf"))}  # it said goodbye: at once
    assert [c.name for c in electorate(me, members, left, "pc1", 8.0)] == ["pc2"]


def _plan(state: ClusterState, term: int, seq: int, marker: str = "") -> PlanMessage:
    return PlanMessage.make(Version(term, seq), state.node, f"id{term}.{seq}{marker}", {"assignments": []}, state.sign)


def test_plans_are_taken_only_from_the_planner_the_rule_picks(caplog: pytest.LogCaptureFixture) -> None:
    pc1, pc2 = ClusterState("pc1", "t"), ClusterState("pc2", "t")
    view = Election("pc3")
    view.choose([Candidate("pc3", 0, 6144), Candidate("pc1", 0, 12288), Candidate("pc2", 0, 6144)])
    assert view.planner == "pc1"
    claim = _plan(pc2, 7, 1)  # pc2 claims the role (a newer term, even)
    why = view.check(claim, "pc2")
    assert why == "refused the plan of pc2 (term 7, sent by pc2): the planner rule picks pc1, not pc2"
    with caplog.at_level(logging.WARNING, logger="distributed.election"):
        assert view.say_once(claim, why) and not view.say_once(claim, why)  # logged once per plan
    assert caplog.text.count("the planner rule picks pc1") == 1
    good = _plan(pc1, 2, 1)
    assert view.check(good, "pc1") is None
    view.accept(good)
    assert view.check(good, "pc2") == ""  # the plan in force, relayed: nothing to say
    assert "older than term 2 plan 1" in (view.check(_plan(pc1, 1, 9), "pc1") or "")
    assert view.check(_plan(pc1, 2, 2), "pc1") is None


def test_a_planner_starts_a_term_above_every_term_heard() -> None:
    e = Election("pc1", term=3)
    e.choose([Candidate("pc1", 0, 12288)])
    assert e.planning and e.needs_new_term and e.start_term() == 4
    assert e.next_version() == Version(4, 1) and e.next_version() == Version(4, 2) and not e.needs_new_term
    e.observe(9)  # the other side of a healed partition planned in term 9
    assert e.needs_new_term and e.start_term() == 10
    e.heard_held(Version(10, 3), "pc2")  # a peer holds pc2's plan of this very term: start another
    assert e.needs_new_term and e.start_term() == 11
    e.heard_held(Version(11, 1), "pc1")  # its own plan: nothing to do
    assert not e.needs_new_term


def test_a_plan_with_a_broken_signature_is_refused() -> None:
    pc1 = ClusterState("pc1", "t")
    msg = _plan(pc1, 1, 1).wire()
    assert PlanMessage.parse(msg, pc1.verify).by == "pc1"
    with pytest.raises(ValueError, match="signature"):
        PlanMessage.parse(dict(msg, plan={"assignments": [{"model": "x"}]}), pc1.verify)
    with pytest.raises(ValueError, match="signature"):
        PlanMessage.parse(dict(msg, by="pc2"), pc1.verify)  # passed off as another planner's
    with pytest.raises(ValueError):
        PlanMessage.parse({"v": [1]}, pc1.verify)
