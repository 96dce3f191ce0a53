"""The control plane of one node: what its messages carry, whom the rule picks, when it plans.

``ControlPlane`` sits between the membership protocol (``cluster.py``: joins, heartbeats)
and the two modules that own the concepts — the replicated state (``cluster_state.py``)
and the planner rule with its terms (``election.py``):

* ``envelope(peer)`` is the signed control part of each join and heartbeat: the highest
  term seen here, the digest of the state and the version of the plan in force — plus the
  whole state when the peer's digest differs, and the plan in force when the peer holds an
  older one. ``open(ctl, sender)`` verifies one (forged, replayed, stale → ``Unauthorized``,
  logged); ``take(peer, ctl)`` merges its state and hears its term and plan (a plan is
  applied only if the rule picks its planner here too, ``offer``).
* ``reconsider()`` applies the rule to the electorate (this node and the members it hears).
  The node it picks starts a new term and plans whenever a new plan is wanted (``want``):
  the desired set changed, a host joined or restarted, a host's VRAM claims changed what
  may be planned on it, or another term was heard. Its plan is applied here and pushed to
  the peers (``push``, a heartbeat to each at once).
* ``replan()`` — a deploy or removal recorded here: planned at once on the planner; else
  pushed, and the planner's plan waited for (a few heartbeats at most).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from typing import Any

import orjson

from . import __version__, peer_urls
from .cluster_state import ClusterState, Refused
from .domain import HostProfile, Plan
from .election import TAKEOVER_BEATS, Candidate, Election, Heard, PlanMessage, Version, electorate
from .errors import TarsError, Unauthorized, ValidationFailed
from .logs import fields, get_logger
from .peers import Peer, PeerState, PeerTable
from .plan_apply import PlanApplier
from .seams import ClusterNode
from .settings import Settings

log = get_logger(__name__)


def plan_id(plan: Plan) -> str:
    return hashlib.sha1(orjson.dumps(plan.to_dict(), option=orjson.OPT_SORT_KEYS)).hexdigest()[:12]


class ControlPlane:
    """``hosts()`` are the hosts a plan may use, ``join(url)`` contacts a member not met yet,
    ``push()`` sends a heartbeat to every live peer now (all three the cluster's)."""

    def __init__(self, node: ClusterNode, settings: Settings, state: ClusterState, table: PeerTable,
                 applier: PlanApplier, *, hosts: Callable[[], dict[str, HostProfile]],
                 join: Callable[[str], None], push: Callable[[], None], spawn: Callable[[Any], Any]) -> None:
        self.node, self.settings, self.state, self.table, self.applier = node, settings, state, table, applier
        self.name = node.name
        self.hosts, self.join, self.push, self.spawn = hosts, join, push, spawn
        self.interval = float(settings.heartbeat_s)
        self.takeover_s = TAKEOVER_BEATS * self.interval
        self.election = Election(self.name, int(state.recall("term", 0) or 0))
        self.plan_msg: PlanMessage | None = None  # the plan in force here, as it travels
        self.replans = 0  # plans made here (tests, benchmarks)
        self.ready = False  # False until the node may plan (a node with seeds waits for first contact)
        self._dirty = ""  # why a new plan is wanted ("" none)
        self._wake: asyncio.Event | None = None
        self._lock = asyncio.Lock()

    def publish_member(self) -> None:
        """This node's ``member:`` entry: where it is, this run's incarnation, what the rule ranks."""
        self.state.put(f"member:{self.name}", {
            "url": self.settings.base_url, "inc": self.state.incarnation, "version": __version__,
            "priority": self.settings.planner_priority, "vram_mb": self.electorate()[0].vram_mb})

    # ----------------------------------------------------------------- envelopes
    def envelope(self, peer: Peer | None, *, full: bool = False) -> dict[str, Any]:
        """Our envelope for ``peer``: its entries when its digest differs, the plan when it holds an older one."""
        held, by = self.election.held, self.election.held_by
        body: dict[str, Any] = {"term": self.election.term, "digest": self.state.digest(),
                                "held": held.wire() if held else None, "held_by": by}
        if full or peer is None or peer.digest != self.state.digest():
            body["entries"] = self.state.wire()
        msg = self.plan_msg
        if msg is not None and held is not None and (peer is None or peer.held is None or held > peer.held
                                                     or (held == peer.held and by != peer.held_by)):
            body["plan"] = msg.wire()
        return self.state.seal(body)

    def open(self, ctl: Any, sender: str) -> dict[str, Any]:
        """``sender``'s verified envelope, or ``Unauthorized`` (refused, and logged)."""
        if ctl is None:
            raise ValidationFailed(f"{sender} sent no control envelope: it runs an older version of TARS; "
                                   "install the same version on every host", field="ctl")
        try:
            return self.state.open(ctl, sender)
        except Refused as r:
            hint = f" (two hosts named {sender}? give each its own TARS_NODE_NAME)" if r.kind == "stale" else ""
            log.warning("refused a %s message from %s: %s%s", r.kind, sender, r.why, hint, extra=fields(peer=sender))
            raise Unauthorized(f"{self.name} refused the message of {sender}: {r.why}", reason=r.kind) from None

    def take(self, peer: Peer, ctl: dict[str, Any]) -> None:
        """What ``peer``'s envelope says: its state merged, its term and plan heard."""
        peer.inc, peer.digest = int(ctl["inc"]), str(ctl.get("digest", ""))
        peer.held, peer.held_by = Version.parse(ctl.get("held")), str(ctl.get("held_by") or "")
        if self.election.observe(ctl.get("term")):
            self.want(f"{peer.name} has seen term {self.election.term}")
        self.election.heard_held(peer.held, peer.held_by)
        if "entries" in ctl:
            merged = self.state.merge(ctl["entries"], peer.name)
            if any(not k.startswith("member:") for k in merged.changed):
                self.want(f"the desired set changed (merged from {peer.name})")
            if any(k.startswith("member:") for k in merged.changed):
                self._learn_members()
        if ctl.get("plan") is not None:
            try:
                msg = PlanMessage.parse(ctl["plan"], self.state.verify)
            except ValueError as exc:
                log.warning("refused a plan sent by %s: %s", peer.name, exc, extra=fields(peer=peer.name))
            else:
                self._offer(msg, peer.name)
        self.poke()

    def _learn_members(self) -> None:
        """Members of the state this node has not met: joined (each proves the token)."""
        for name, member in self.state.members().items():
            peer = self.table.get(name)
            if name == self.name or (peer is not None and peer.profile is not None):
                continue
            try:
                url = peer_urls.check_url(str(member.get("url", "")))
            except ValidationFailed:
                continue
            self.join(url)

    def _offer(self, msg: PlanMessage, sender: str) -> None:
        """A plan heard from ``sender``: applied if the rule picks its planner and it is newer."""
        self.election.choose(self.electorate())
        why = self.election.check(msg, sender)
        if why is None:
            self.election.accept(msg)
            self.plan_msg = msg
            log.info("plan of %s accepted (term %d, plan %d, %s)", msg.by, msg.version.term, msg.version.seq, msg.id,
                     extra=fields(peer=msg.by))
            self.spawn(self._apply_held(msg))
        elif why:
            self.election.say_once(msg, why)

    async def _apply_held(self, msg: PlanMessage) -> None:
        if msg is self.plan_msg:
            await self.applier.apply(Plan.from_dict(msg.plan), msg.id)

    # ----------------------------------------------------------------- the rule
    def electorate(self) -> list[Candidate]:
        profile = self.node.profile
        me = Candidate(self.name, self.settings.planner_priority,
                       sum(g.vram_total_mb for g in profile.gpus) if profile is not None else 0)
        heard = {p.name: Heard(p.live, p.silent_s() if p.state != PeerState.LEFT else float("inf"))
                 for p in self.table if p.profile is not None}
        return electorate(me, self.state.members(), heard, self.election.planner, self.takeover_s)

    def want(self, why: str) -> None:
        """A new plan is wanted (made if this node plans)."""
        self._dirty = self._dirty or why
        self.poke()

    def poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def steward(self) -> None:
        """Apply the rule whenever something changed, and four times a heartbeat."""
        self._wake = asyncio.Event()
        while True:
            waiter = asyncio.ensure_future(self._wake.wait())
            try:  # asyncio.wait, not wait_for: on 3.11 wait_for can swallow a cancellation
                await asyncio.wait({waiter}, timeout=self.interval / 4)
            finally:
                waiter.cancel()
            self._wake.clear()
            try:
                await self.reconsider()
            except TarsError as exc:
                log.warning("planning failed: %s", exc.message)

    async def reconsider(self) -> None:
        if not self.ready:
            return
        self.election.choose(self.electorate())
        if not self.election.planning:
            return
        if self.election.needs_new_term:
            term = self.election.start_term()
            self.state.remember("term", term)
            self._dirty = f"{self.name} plans now (term {term})" + (f"; {self._dirty}" if self._dirty else "")
        if self._dirty:
            why, self._dirty = self._dirty, ""
            await self._plan(why)

    def proposal(self) -> Plan:
        """The plan this node would make now: the desired set over the live hosts."""
        return self.node.plan_for(self.hosts())

    async def _plan(self, why: str, *, force: bool = False) -> None:
        async with self._lock:
            plan = self.proposal()
            hosts = sorted({a.node for a in plan.assignments} | set(self.hosts()))
            pid = plan_id(plan)
            v = self.election.next_version()
            self.plan_msg = PlanMessage.make(v, self.name, pid, plan.to_dict(), self.state.sign)
            self.replans += 1
            log.info("planned term %d plan %d (%s) over %s because %s", v.term, v.seq, pid, ", ".join(hosts),
                     why, extra=fields(term=v.term, plan=pid))
            await self.applier.apply(plan, pid, force=force)
        self.push()

    async def replan(self) -> None:
        """The desired set changed here (a deploy): planned now if this node plans; else pushed
        to the peers, and the planner's next plan waited for (a few heartbeats at most)."""
        self.election.choose(self.electorate())
        if self.ready and self.election.planning and not self.election.needs_new_term:
            self._dirty = ""
            await self._plan("the desired set changed here", force=True)
            return
        before = self.election.held
        self.want("the desired set changed here")
        self.push()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(2.0, 3 * self.interval)
        while self.election.held == before and loop.time() < deadline:
            await asyncio.sleep(0.02)
        msg = self.plan_msg
        if msg is not None:  # a model that failed here is loaded again
            await self.applier.apply(Plan.from_dict(msg.plan), msg.id, force=True)

    def summary(self) -> dict[str, Any]:
        """The control plane as this node sees it (``/status`` → ``"cluster"``)."""
        held = self.election.held
        return {"planner": self.election.planner, "term": self.election.term,
                "plan_version": held.wire() if held else None, "plan_by": self.election.held_by,
                "plan_id": self.applier.plan_id, "state_digest": self.state.digest(),
                "incarnation": self.state.incarnation, "replans": self.replans, "members": sorted(self.state.members())}
