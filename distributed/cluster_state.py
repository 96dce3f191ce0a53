"""The cluster's replicated state: one versioned document, a full copy on every node.

The document is one last-writer-wins map. Its keys:

* ``desired:<model>`` — a deployed model's options (``{"replicas", "node", ...}``), or a
  tombstone (``None``) once it was removed (``deploy/state.py`` reads and writes them);
* ``base`` — ``{"models": [...]}``: the starting set the desired set is built on
  (``TARS_MODELS``, else the catalog's defaults);
* ``spec:<model>`` — the spec a hub reference resolved to (``modelref.plan_specs``), shared
  by the host that resolved it so no other host asks the hub again;
* ``member:<name>`` — a node of the cluster, written only by that node: ``{"url", "inc",
  "priority", "vram_mb", "version"}`` (``election.py`` ranks the members).

**Stamps.** Every entry carries the stamp of its write, ``(ms, counter, node)``, from the
writer's hybrid logical clock (``Hlc``): wall-clock milliseconds, never behind any stamp the
node has seen, then a counter within one millisecond, then the node's name. Stamps order
every write in the cluster totally, and a write made after seeing another is newer than it.
The clock's floor is persisted (reserved a minute ahead, fsynced before a stamp past it is
used), so a restarted node — or one whose clock was set back — never issues a stamp older
than one it issued before.

**Merging** takes, per key, the entry with the newest stamp (ties cannot happen: the node is
part of the stamp). It is commutative, associative and idempotent, so nodes that receive the
same entries in any order, any number of times, hold the same document
(tests/unit/test_cluster_state.py checks it with hypothesis). A removed model keeps its
tombstone, so an older deploy (a host back with stale files) cannot bring it back: a host
that returns keeps its entries' original stamps, and the cluster's newer ones win.

**Signatures.** Each entry is signed by its origin (the stamp's node): HMAC-SHA256 over
``[key, value, stamp, nonce]`` with a key derived from the cluster token for that origin
(HKDF-SHA256). A receiver refuses, and logs, an entry whose signature does not verify
(tampered with on the way, or made without the token), a ``member:`` entry written by
another node, and a second value for a stamp it already holds. Every holder of the token
can sign for any origin: the token is the trust boundary; the signatures make entries
tamper-evident wherever they travel (relayed by other nodes, kept in files).

**Messages.** The control part of each join and heartbeat is an envelope (``seal`` /
``open``): the sender's name, its incarnation (a number that grows with every start), a
sequence number, a nonce and a signature over all of it. A receiver refuses a message that
does not verify (forged), one from an older incarnation of its sender, and one whose
sequence number it has seen (replayed; a window of ``REPLAY_WINDOW`` allows messages that
overtake each other), and logs why.

**Files.** ``TARS_STATE_DIR/tars-state-<node>.json`` (default: ``TARS_MODELS_DIR``) (atomic writes, fsync, 0600) keeps the
clock's floor, the incarnation, a few local facts (``remember``/``recall``) and the
persistent entries (``desired:``, ``spec:`` and ``base``; membership is learned again at each start).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .errors import ConfigError
from .logs import fields, get_logger

log = get_logger(__name__)

FORMAT = 1
FLOOR_AHEAD_MS = 60_000  # the clock's floor is reserved this far ahead (one fsync a minute at most)
REPLAY_WINDOW = 256  # sequence numbers that may arrive out of order
MAX_ENTRIES = 4096  # entries one message may carry
AHEAD_WARN_MS = 3_600_000  # a stamp this far ahead of our clock is logged (a host's clock is wrong)
PREFIXES = ("desired:", "member:", "spec:")
SINGLES = ("base",)
PERSISTED = ("desired:", "base", "spec:")


def canonical(obj: Any) -> bytes:
    """The bytes a signature covers: JSON with sorted keys (orjson, as on the wire)."""
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)


def _wall_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True, order=True)
class Stamp:
    ms: int
    counter: int
    node: str

    def wire(self) -> list[Any]:
        return [self.ms, self.counter, self.node]

    @classmethod
    def parse(cls, v: Any) -> "Stamp":
        if (not isinstance(v, list) or len(v) != 3 or not all(type(x) is int and x >= 0 for x in v[:2])
                or not isinstance(v[2], str) or not v[2]):
            raise ValueError("a stamp is [ms, counter, node]")
        return cls(v[0], v[1], v[2])


class Hlc:
    """A hybrid logical clock: ``tick()`` stamps a local write, ``observe(stamp)`` a received one."""

    def __init__(self, node: str, floor_ms: int = 0, wall: Callable[[], int] = _wall_ms) -> None:
        self.node, self.wall = node, wall
        self.ms, self.counter = floor_ms, 0

    def tick(self) -> Stamp:
        now = self.wall()
        if now > self.ms:
            self.ms, self.counter = now, 0
        else:
            self.counter += 1
        return Stamp(self.ms, self.counter, self.node)

    def observe(self, s: Stamp) -> None:
        if s.ms > self.ms:
            self.ms, self.counter = s.ms, s.counter
        elif s.ms == self.ms:
            self.counter = max(self.counter, s.counter)


class Keys:
    """Per-origin signing keys derived from the cluster token (HKDF-SHA256, RFC 5869)."""

    def __init__(self, token: str) -> None:
        self._prk = hmac.new(b"tars-cluster-state-v1", token.encode(), hashlib.sha256).digest()  # extract
        self._cache: dict[str, bytes] = {}

    def of(self, origin: str) -> bytes:
        key = self._cache.get(origin)
        if key is None:
            if len(self._cache) > 256:
                self._cache.clear()
            key = hmac.new(self._prk, b"origin:" + origin.encode() + b"\x01", hashlib.sha256).digest()  # expand
            self._cache[origin] = key
        return key

    def mac(self, origin: str, payload: bytes) -> str:
        return hmac.new(self.of(origin), payload, hashlib.sha256).hexdigest()

    def check(self, origin: str, payload: bytes, mac: Any) -> bool:
        return isinstance(mac, str) and hmac.compare_digest(self.mac(origin, payload), mac)


@dataclass(frozen=True)
class Entry:
    key: str
    value: Any  # JSON; None: a tombstone
    stamp: Stamp
    nonce: str
    mac: str

    @property
    def origin(self) -> str:
        return self.stamp.node

    def payload(self) -> bytes:
        return canonical([self.key, self.value, self.stamp.wire(), self.nonce])

    def wire(self) -> dict[str, Any]:
        return {"k": self.key, "v": self.value, "s": self.stamp.wire(), "n": self.nonce, "m": self.mac}

    @classmethod
    def parse(cls, d: Any) -> "Entry":
        if not isinstance(d, dict) or not isinstance(d.get("k"), str) or not isinstance(d.get("n"), str) \
                or not isinstance(d.get("m"), str):
            raise ValueError("an entry is {k, v, s, n, m}")
        return cls(d["k"], d.get("v"), Stamp.parse(d.get("s")), d["n"], d["m"])


class Refused(Exception):
    """A message or entry this node does not take: ``kind`` forged | replayed | stale."""

    def __init__(self, kind: str, why: str) -> None:
        super().__init__(why)
        self.kind, self.why = kind, why


class ReplayGuard:
    """Per sender: its newest incarnation and the sequence numbers seen in the window."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[int, int, set[int]]] = {}

    def check(self, sender: str, inc: int, seq: int) -> None:
        cur = self._seen.get(sender)
        if cur is None or inc > cur[0]:
            if len(self._seen) > 1024:
                self._seen.clear()
            self._seen[sender] = (inc, seq, {seq})
            return
        if inc < cur[0]:
            raise Refused("stale", f"incarnation {inc} of {sender} is older than {cur[0]}, the one that runs now")
        _, top, seen = cur
        if seq in seen or seq <= top - REPLAY_WINDOW:
            raise Refused("replayed", f"message {seq} of {sender} (incarnation {inc}) was seen already")
        seen.add(seq)
        top = max(top, seq)
        if len(seen) > 2 * REPLAY_WINDOW:
            seen = {s for s in seen if s > top - REPLAY_WINDOW}
        self._seen[sender] = (inc, top, seen)


@dataclass
class Merged:
    changed: list[str] = field(default_factory=list)  # keys that took a newer entry
    refused: list[tuple[str, str]] = field(default_factory=list)  # (key, why)
    stale: int = 0  # entries older than ours (normal: a peer that has not caught up)


def _namespace_ok(key: str) -> bool:
    return key in SINGLES or any(key.startswith(p) and len(key) > len(p) for p in PREFIXES)


def _persisted(key: str) -> bool:
    return key.startswith(PERSISTED)


class ClusterState:
    """This node's copy of the document, its clock, and the envelope of its messages."""

    def __init__(self, node: str, token: str, path: str | os.PathLike[str] | None = None, *,
                 wall: Callable[[], int] = _wall_ms) -> None:
        self.node = node
        self.path = Path(path).expanduser() if path is not None else None
        self.keys = Keys(token)
        self.entries: dict[str, Entry] = {}
        self.local: dict[str, Any] = {}
        self.guard = ReplayGuard()
        self._seq = 0
        self._digest: str | None = None
        doc = self._read()
        self.fresh = not doc  # no file yet: a new node (deploy/state.py imports an older deployments file)
        self.floor = int(doc.get("floor_ms", 0))
        self.clock = Hlc(node, self.floor, wall)
        self.local = dict(doc.get("local") or {})
        resigned = 0
        for raw in doc.get("entries") or []:
            try:
                e = Entry.parse(raw)
            except ValueError:
                continue
            if not self.keys.check(e.origin, e.payload(), e.mac):  # the token changed: ours to re-sign
                e = Entry(e.key, e.value, e.stamp, e.nonce, self.keys.mac(e.origin, e.payload()))
                resigned += 1
            self.entries[e.key] = e
            self.clock.observe(e.stamp)
        if resigned:
            log.info("the cluster token changed since %s was written: %d saved entries signed again", self.path,
                     resigned)
        self.incarnation = max(int(doc.get("incarnation", 0)) + 1, wall())
        self._save()

    @classmethod
    def for_settings(cls, settings: Any) -> "ClusterState":
        name = settings.node_name
        return cls(name, settings.cluster_token.get_secret_value(),
                   Path(settings.state_folder) / f"tars-state-{name}.json")

    # ------------------------------------------------------------------ reading
    def entry(self, key: str) -> Entry | None:
        return self.entries.get(key)

    def get(self, key: str) -> Any:
        e = self.entries.get(key)
        return None if e is None else e.value

    def items(self, prefix: str) -> dict[str, Entry]:
        """Entries under ``prefix`` (tombstones included), by the key's rest."""
        return {k[len(prefix):]: e for k, e in self.entries.items() if k.startswith(prefix)}

    def members(self) -> dict[str, dict[str, Any]]:
        return {n: e.value for n, e in self.items("member:").items() if isinstance(e.value, dict)}

    def digest(self) -> str:
        """What this copy holds, in 16 hex digits: equal digests, equal documents."""
        if self._digest is None:
            pairs = sorted((k, e.stamp.wire()) for k, e in self.entries.items())
            self._digest = hashlib.sha256(canonical(pairs)).hexdigest()[:16]
        return self._digest

    def wire(self) -> list[dict[str, Any]]:
        return [e.wire() for _, e in sorted(self.entries.items())]

    def recall(self, name: str, default: Any = None) -> Any:
        return self.local.get(name, default)

    # ------------------------------------------------------------------ writing
    def stamp(self) -> Stamp:
        s = self.clock.tick()
        if s.ms >= self.floor:
            self.floor = s.ms + FLOOR_AHEAD_MS
            self._save()  # fsynced before the stamp is used
        return s

    def put(self, key: str, value: Any, *, stamp: Stamp | None = None) -> Entry:
        """Write ``key`` (``None``: a tombstone) with a new stamp of this node (or ``stamp``)."""
        if not _namespace_ok(key):
            raise ValueError(f"'{key}' is not a key of the cluster state")
        s = stamp or self.stamp()
        nonce = secrets.token_hex(8)
        unsigned = Entry(key, value, s, nonce, "")
        e = Entry(key, value, s, nonce, self.keys.mac(s.node, unsigned.payload()))
        self.entries[key] = e
        self._digest = None
        if _persisted(key):
            self._save()
        return e

    def remember(self, name: str, value: Any) -> None:
        """A local fact (not replicated) kept across restarts: the planner term, the base configured."""
        if self.local.get(name) != value:
            self.local[name] = value
            self._save()

    # ------------------------------------------------------------------ merging
    def merge(self, wire: Any, sender: str) -> Merged:
        """Take every entry of ``wire`` that is newer than ours, refusing (and logging) the bad ones."""
        out = Merged()
        if not isinstance(wire, list):
            out.refused.append(("*", "the entries are not a list"))
            return out
        for raw in wire[:MAX_ENTRIES]:
            try:
                e = Entry.parse(raw)
            except ValueError as exc:
                out.refused.append((str(raw.get("k", "?")) if isinstance(raw, dict) else "?", str(exc)))
                log.warning("refused a malformed state entry sent by %s: %s", sender, exc, extra=fields(peer=sender))
                continue
            why = self._inadmissible(e)
            cur = self.entries.get(e.key)
            if why is None and cur is not None and e.stamp == cur.stamp and e.mac != cur.mac:
                why = "a second value for a stamp already held (forged)"
            if why is not None:
                out.refused.append((e.key, why))
                log.warning("refused the state entry '%s' sent by %s (origin %s): %s", e.key, sender, e.origin,
                            why, extra=fields(peer=sender))
                continue
            if cur is not None and e.stamp <= cur.stamp:
                out.stale += cur.stamp != e.stamp
                continue
            if e.stamp.ms > self.clock.wall() + AHEAD_WARN_MS:
                log.warning("%s's clock is %.0f minutes ahead of this host's (entry '%s')", e.origin,
                            (e.stamp.ms - self.clock.wall()) / 60000, e.key, extra=fields(peer=e.origin))
            self.entries[e.key] = e
            self.clock.observe(e.stamp)
            out.changed.append(e.key)
        if out.changed:
            self._digest = None
            if any(_persisted(k) for k in out.changed):
                self._save()
        return out

    def _inadmissible(self, e: Entry) -> str | None:
        if not _namespace_ok(e.key):
            return "not a key of the cluster state"
        if e.key.startswith("member:") and e.key[len("member:"):] != e.origin:
            return f"only {e.key[len('member:'):]} may write its membership entry"
        if not self.keys.check(e.origin, e.payload(), e.mac):
            return "its signature does not verify (tampered with, or signed without this cluster's token)"
        return None

    # ------------------------------------------------------------------ signed blobs and envelopes
    def sign(self, obj: Any) -> str:
        return self.keys.mac(self.node, canonical(obj))

    def verify(self, origin: str, obj: Any, mac: Any) -> bool:
        return self.keys.check(origin, canonical(obj), mac)

    def seal(self, body: dict[str, Any]) -> dict[str, Any]:
        """``body`` as a signed envelope from this node (a fresh sequence number each)."""
        self._seq += 1
        out = {**body, "from": self.node, "inc": self.incarnation, "seq": self._seq, "nonce": secrets.token_hex(8)}
        out["mac"] = self.sign(out)
        return out

    def open(self, ctl: Any, sender: str) -> dict[str, Any]:
        """The verified envelope ``ctl`` that ``sender`` sent, or ``Refused`` (forged, stale, replayed)."""
        if not isinstance(ctl, dict) or not isinstance(ctl.get("from"), str):
            raise Refused("forged", "its control part is not an envelope")
        body = {k: v for k, v in ctl.items() if k != "mac"}
        inc, seq = ctl.get("inc"), ctl.get("seq")
        if ctl["from"] != sender or type(inc) is not int or type(seq) is not int:
            raise Refused("forged", f"its envelope does not come from {sender}")
        if not self.verify(sender, body, ctl.get("mac")):
            raise Refused("forged", "its signature does not verify (tampered with, or signed without this "
                                    "cluster's token)")
        self.guard.check(sender, inc, seq)
        return ctl

    # ------------------------------------------------------------------ file
    def _read(self) -> dict[str, Any]:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            doc = orjson.loads(self.path.read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"the cluster state file {self.path} cannot be read ({exc}); delete it and this "
                              "node adopts the cluster's state (standalone: TARS_MODELS)", file=str(self.path)) from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ConfigError(f"the cluster state file {self.path} is not in format {FORMAT}; delete it",
                              file=str(self.path))
        return doc

    def _save(self) -> None:
        if self.path is None:
            return
        doc = {"format": FORMAT, "node": self.node, "floor_ms": self.floor,
               "incarnation": getattr(self, "incarnation", 0), "local": self.local,
               "entries": [e.wire() for k, e in sorted(self.entries.items()) if _persisted(k)]}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:  # a full disk must not stop the node; the floor is then not guaranteed
            log.error("could not write the cluster state file %s: %s", self.path, exc)

