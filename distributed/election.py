"""Who plans: one rule every node computes alike, and the terms that keep old plans out.

**The rule** (``elect``). Among the *electorate* — this node and every member
(``member:`` entries of the replicated state, cluster_state.py) it currently hears — the
planner is the one with the highest ``TARS_PLANNER_PRIORITY``, then the most VRAM in total,
then the smallest name. The inputs are replicated data, so two nodes that hear the same
members pick the same planner (in the reference pair: PC1, the RTX 3060).

**Hysteresis** (``electorate``). A member counts while it is alive or suspect. The planner
itself keeps counting until it has been silent for ``takeover_s`` (3.5 heartbeats: 7 s at
the default 2 s — it is dead after 2 missed ones — so a takeover happens within 10 s of its
loss), so a link that drops for a few seconds does not move the role back and forth; a
member that comes back counts again at once (the node with the better rank takes the role
back).

**Terms** (``Election``). Each plan carries a version ``(term, seq)`` and its planner's name,
signed by the planner. A node that becomes the planner starts a new term, one above the
highest it has seen; every plan it makes in that term takes the next ``seq``. A planner that
hears of a higher term (a host that planned on the other side of a partition) starts a new
term above it and plans again, so after a heal exactly one plan, the newest, is in force.
Two sides of a partition may both have started term *n*: a planner that hears a peer hold
another planner's plan of its own term or a later one starts a term above it too. A node
accepts a plan only when its planner is the one the rule picks in its own view and its
version is newer than the plan it holds and not of an older term than it has seen;
anything else is refused with a log line that says why.

Why not Raft (or another consensus library): a two-host cluster has no majority once one
host is lost, and the point of this cluster is that each side keeps serving what it can.
The desired set is merged (last writer wins per model, cluster_state.py), not agreed on,
and the plan is a pure function of it and of the hosts, so a single planner chosen by a
rule is enough: the worst case, two planners while views differ, ends when they hear each
other (the rule then picks one, and its newer term wins).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .logs import fields, get_logger

log = get_logger(__name__)

TAKEOVER_BEATS = 3.5  # heartbeats of silence before the planner's role passes on


@dataclass(frozen=True)
class Candidate:
    name: str
    priority: int = 0
    vram_mb: int = 0

    @classmethod
    def of(cls, name: str, member: Any) -> "Candidate":
        """From a ``member:`` entry's value (a peer's word: only numbers are taken)."""
        m = member if isinstance(member, dict) else {}

        def number(key: str) -> int:
            v = m.get(key)
            return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0

        return cls(name, number("priority"), number("vram_mb"))

    def why(self) -> str:
        return f"{self.name} (priority {self.priority}, {self.vram_mb} MB of VRAM)"


def rank(c: Candidate) -> tuple[int, int, str]:
    """Smaller is better: the highest priority, then the most VRAM, then the smallest name."""
    return (-c.priority, -c.vram_mb, c.name)


def elect(candidates: Iterable[Candidate]) -> Candidate | None:
    pool = list(candidates)
    return min(pool, key=rank) if pool else None


@dataclass(frozen=True)
class Heard:
    """How this node hears a member: ``live`` (alive or suspect) and seconds since it last answered."""

    live: bool
    silent_s: float


def electorate(me: Candidate, members: dict[str, Any], heard: dict[str, Heard], planner: str | None,
               takeover_s: float) -> list[Candidate]:
    """This node and the members it hears (the planner until silent for ``takeover_s``)."""
    out = [me]
    for name, member in sorted(members.items()):
        h = heard.get(name)
        if name == me.name or h is None:
            continue  # a member never heard from does not count (yet)
        if h.live or (name == planner and h.silent_s < takeover_s):
            out.append(Candidate.of(name, member))
    return out


@dataclass(frozen=True, order=True)
class Version:
    term: int
    seq: int

    def wire(self) -> list[int]:
        return [self.term, self.seq]

    @classmethod
    def parse(cls, v: Any) -> "Version | None":
        if isinstance(v, list) and len(v) == 2 and all(type(x) is int and x >= 0 for x in v):
            return cls(v[0], v[1])
        return None


@dataclass(frozen=True)
class PlanMessage:
    """A plan as it travels: its version, its planner, its id, the plan, the planner's signature."""

    version: Version
    by: str
    id: str
    plan: dict[str, Any]
    mac: str

    def body(self) -> dict[str, Any]:
        return {"v": self.version.wire(), "by": self.by, "id": self.id, "plan": self.plan}

    def wire(self) -> dict[str, Any]:
        return {**self.body(), "mac": self.mac}

    @classmethod
    def make(cls, version: Version, by: str, pid: str, plan: dict[str, Any],
             sign: Callable[[Any], str]) -> "PlanMessage":
        unsigned = cls(version, by, pid, plan, "")
        return cls(version, by, pid, plan, sign(unsigned.body()))

    @classmethod
    def parse(cls, d: Any, verify: Callable[[str, Any, Any], bool]) -> "PlanMessage":
        """``ValueError`` when it is not a plan message or its planner's signature does not verify."""
        v = Version.parse(d.get("v")) if isinstance(d, dict) else None
        if v is None or not isinstance(d.get("by"), str) or not isinstance(d.get("plan"), dict) \
                or not isinstance(d.get("id"), str):
            raise ValueError("not a plan message")
        msg = cls(v, d["by"], d["id"], d["plan"], str(d.get("mac", "")))
        if not verify(msg.by, msg.body(), msg.mac):
            raise ValueError(f"its signature by {msg.by} does not verify")
        return msg


class Election:
    """This node's view: whom the rule picks, the highest term seen, the plan in force."""

    def __init__(self, me: str, term: int = 0) -> None:
        self.me = me
        self.term = term  # the highest term seen or started
        self.planner: str | None = None  # whom the rule picked last
        self.my_term: int | None = None  # the term this node plans in (None: it does not plan)
        self.held: Version | None = None  # the version of the plan in force here
        self.held_by: str | None = None
        self._seq = 0
        self._said: set[tuple[str, Version]] = set()

    @property
    def planning(self) -> bool:
        return self.planner == self.me

    def choose(self, candidates: list[Candidate]) -> tuple[str, bool]:
        """Apply the rule; (planner, changed). Logs a change with the ranks behind it."""
        chosen = elect(candidates)
        assert chosen is not None, "the electorate always holds this node"
        changed = chosen.name != self.planner
        if changed:
            others = ", ".join(c.why() for c in sorted(candidates, key=rank)[1:]) or "no other member heard"
            log.info("planner: %s (rule: highest priority, then most VRAM, then name; %s; over %s)", chosen.name,
                     "this node" if chosen.name == self.me else "another node", others,
                     extra=fields(planner=chosen.name))
            self.planner = chosen.name
            if chosen.name != self.me:
                self.my_term = None
        return chosen.name, changed

    def observe(self, term: Any) -> bool:
        """A term heard from a peer; True when it is higher than any seen here."""
        if type(term) is int and term > self.term:
            self.term = term
            return True
        return False

    def heard_held(self, version: Version | None, by: Any) -> None:
        """A peer holds ``version`` by ``by``. When this node plans and another planner's plan
        of this term or a later one is in force there (the two sides of a healed partition),
        this node starts a new term above it, so its next plan is newer everywhere."""
        if version is None or not isinstance(by, str):
            return
        self.observe(version.term)
        if self.planning and by != self.me and self.my_term is not None and version.term >= self.my_term:
            self.my_term = None

    @property
    def needs_new_term(self) -> bool:
        """This node plans, but not yet in a term, or a higher term was heard since it started its own."""
        return self.planning and (self.my_term is None or self.term > self.my_term)

    def start_term(self) -> int:
        self.term += 1
        self.my_term, self._seq = self.term, 0
        return self.term

    def next_version(self) -> Version:
        assert self.my_term is not None, "start_term() first"
        self._seq += 1
        v = Version(self.my_term, self._seq)
        self.held, self.held_by = v, self.me
        return v

    def check(self, msg: PlanMessage, sender: str) -> str | None:
        """None: take ``msg``; "": the plan in force already (nothing to say); else why it is refused."""
        if self.held is not None and msg.version == self.held and msg.by == self.held_by:
            return ""
        if msg.by != self.planner:
            return (f"refused the plan of {msg.by} (term {msg.version.term}, sent by {sender}): the planner rule "
                    f"picks {self.planner}{' (this node)' if self.planner == self.me else ''}, not {msg.by}")
        if msg.version.term < self.term or (self.held is not None and msg.version <= self.held):
            held = f"term {self.held.term} plan {self.held.seq}" if self.held else f"term {self.term}"
            return (f"refused the plan of {msg.by} (term {msg.version.term} plan {msg.version.seq}, sent by "
                    f"{sender}): older than {held}")
        return None

    def accept(self, msg: PlanMessage) -> None:
        self.held, self.held_by = msg.version, msg.by
        self.observe(msg.version.term)

    def say_once(self, msg: PlanMessage, why: str) -> bool:
        """Log a refusal once per plan (a plan is offered again with every heartbeat until replaced)."""
        key = (msg.by, msg.version)
        if key in self._said:
            return False
        if len(self._said) > 512:
            self._said.clear()
        self._said.add(key)
        log.warning(why, extra=fields(peer=msg.by))
        return True
