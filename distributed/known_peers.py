"""The peers a node has seen, remembered across restarts (``TARS_STATE_DIR/tars-known-peers-<node>.json``).

A node restarted without ``TARS_PEERS`` (PC1, say) still knows where its cluster's other
hosts were: ``KnownPeers.seeds()`` lists their URLs, most recently seen first, for the
cluster to contact again. Only peers that proved the cluster token belong here: the
cluster calls ``remember`` after a token-checked exchange (a join, an answered heartbeat),
never on an mDNS answer alone (discovery.py: answers are hints). A contacted seed still
has to prove the token again, so a stale or tampered file costs a failed call, nothing
more.

The file is small and bounded (``MAX_ENTRIES``, entries older than ``MAX_AGE_S`` dropped),
written atomically (temporary file, fsync, rename) and only when something changed or an
entry's last sighting is ``REFRESH_S`` old, so heartbeats do not rewrite it. It holds
names, URLs and times — no secret — and is still made readable by its owner only.
A file that cannot be read is logged and treated as empty (it is a cache, not state).
The file is named for its node, as the cluster state's is: nodes that share a models
folder (several on one machine) do not take each other's peers for their own.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import peer_urls
from .errors import TarsError
from .logs import get_logger

log = get_logger(__name__)

FILE_NAME = "tars-known-peers-{node}.json"  # one per node name
MAX_ENTRIES = 32
MAX_AGE_S = 30 * 86400.0
REFRESH_S = 3600.0
FORMAT = 1


@dataclass(frozen=True)
class KnownPeer:
    name: str
    url: str
    last_seen: float  # time.time() of the last token-checked exchange


class KnownPeers:
    """The remembered peers of one node in cluster ``cluster`` (entries of another cluster,
    from before a move, are ignored and dropped at the next write)."""

    def __init__(self, path: str | os.PathLike[str], me: str, cluster: str, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path).expanduser()
        self.me = me
        self.cluster = cluster
        self.clock = clock
        self._peers: dict[str, KnownPeer] = self._load()

    @classmethod
    def for_settings(cls, settings: Any, **kw: Any) -> "KnownPeers":
        return cls(Path(settings.state_folder) / FILE_NAME.format(node=settings.node_name), settings.node_name,
                   settings.cluster_name, **kw)

    # ------------------------------------------------------------------ reading
    def _load(self) -> dict[str, KnownPeer]:
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring the known-peers file %s: %s", self.path, exc)
            return {}
        if (not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("cluster") != self.cluster
                or doc.get("node", self.me) != self.me):  # another cluster's, or another node's
            return {}
        out: dict[str, KnownPeer] = {}
        now = self.clock()
        for entry in doc.get("peers") or []:
            try:
                peer = KnownPeer(peer_urls.check_name(str(entry["name"])), peer_urls.check_url(str(entry["url"])),
                                 float(entry["last_seen"]))
            except (KeyError, TypeError, ValueError, TarsError):
                continue  # a damaged entry is skipped, the rest kept
            if peer.name != self.me and now - peer.last_seen <= MAX_AGE_S:
                out[peer.name] = peer
        return out

    def peers(self) -> list[KnownPeer]:
        """Every remembered peer, most recently seen first."""
        return sorted(self._peers.values(), key=lambda p: (-p.last_seen, p.name))

    def seeds(self, exclude: set[str] | frozenset[str] = frozenset()) -> list[str]:
        """URLs to contact at start (most recent first), less ``exclude`` (e.g. TARS_PEERS)."""
        out: list[str] = []
        for p in self.peers():
            if p.url not in exclude and p.url not in out:
                out.append(p.url)
        return out

    # ------------------------------------------------------------------ writing
    def remember(self, name: str, url: str) -> bool:
        """``name`` at ``url`` just proved the cluster token. Returns True when the file
        was written (new peer, new URL, or a sighting older than ``REFRESH_S``)."""
        name, url = peer_urls.check_name(name), peer_urls.check_url(url)
        if name == self.me:
            return False
        now = self.clock()
        old = self._peers.get(name)
        if old is not None and old.url == url and now - old.last_seen < REFRESH_S:
            return False
        self._peers[name] = KnownPeer(name, url, now)
        self._trim(now)
        self._save()
        return True

    def forget(self, name: str) -> bool:
        """Drop ``name`` (it left the cluster for good). True when it was known."""
        if self._peers.pop(name, None) is None:
            return False
        self._save()
        return True

    def _trim(self, now: float) -> None:
        keep = [p for p in self.peers() if now - p.last_seen <= MAX_AGE_S][:MAX_ENTRIES]
        self._peers = {p.name: p for p in keep}

    def _save(self) -> None:
        doc = {"format": FORMAT, "cluster": self.cluster, "node": self.me,
               "peers": [asdict(p) for p in self.peers()]}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(doc, indent=1))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:  # a full disk or a read-only folder must not stop the cluster
            log.warning("could not write the known-peers file %s: %s", self.path, exc)
