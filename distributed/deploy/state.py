"""``DesiredSet``: which models the cluster should serve — a view of the replicated state.

The desired set lives in the cluster's replicated document (``cluster_state.py``), so every
node holds it and any node can change it:

* the starting set, entry ``base`` (``{"models": [...]}``): ``TARS_MODELS``, else the
  catalog's defaults. A node publishes its own at its first start and whenever its setting
  changed since — an explicit ``TARS_MODELS`` stamped then, the catalog's defaults with the
  oldest possible stamp — so a configured list wins over defaults, the newest configured
  list wins over older ones, and a host restarted with an unchanged setting changes nothing;
* one entry per model changed at runtime, ``desired:<id>``: its options
  (``{"replicas", "node", "chat_template"?}``) when deployed, a tombstone when removed. A
  removed model stays removed (whatever the starting set says) until it is deployed again;
* one entry per hub reference resolved by some host, ``spec:<id>``: the spec it resolved to
  (``modelref.plan_specs``: the files pinned to a commit, sizes from the GGUF header), so a
  reference is resolved once, by the host that took its deploy (or has it in its own
  ``TARS_MODELS``), and every other host — the planner included — learns it from here
  (``Catalog.learn``) instead of asking the hub again.

The desired models are the starting set less the removed ones, then the deployed ones,
in that order. Entries merge by their stamps (newest wins), so deploys made on the two sides
of a partition both survive the heal, and a host back with stale files adopts the newer
entries of the cluster. A ``tars-deployments.json`` of an older version is imported once,
stamped with the file's time.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .. import templates
from ..cluster_state import ClusterState, Stamp
from ..errors import ConfigError
from ..logs import get_logger

log = get_logger(__name__)

LEGACY_FILE = "tars-deployments.json"
_UNSET = object()


@dataclass
class Deployment:
    model: str
    replicas: int = 1
    node: str | None = None  # pinned to this host, else the planner chooses
    chat_template: str | None = None  # a shipped chat template in place of the model's own

    def options(self) -> dict[str, Any]:
        out: dict[str, Any] = {"replicas": self.replicas, "node": self.node}
        if self.chat_template:
            out["chat_template"] = self.chat_template
        return out

    @classmethod
    def of(cls, model: str, value: Any) -> "Deployment":
        """From a ``desired:`` entry's value (replicated: read defensively)."""
        v = value if isinstance(value, dict) else {}
        replicas = v.get("replicas")
        node, template = v.get("node"), v.get("chat_template")
        if template is not None and template not in templates.names():
            log.warning("deploy of %s names chat template %r, which does not ship here: the model's own is used",
                        model, template)
            template = None
        return cls(model, replicas if type(replicas) is int and 1 <= replicas <= 64 else 1,
                   node if isinstance(node, str) and node else None, template)


class DesiredSet:
    """The desired models over ``state``; ``base`` is this node's starting set (``explicit``:
    from ``TARS_MODELS``, else the catalog's defaults)."""

    def __init__(self, state: ClusterState, base: list[str], *, explicit: bool = False,
                 legacy_dir: str | Path | None = None) -> None:
        self.state = state
        self._trial: tuple[str, Deployment | None] | None = None
        configured = list(dict.fromkeys(base))
        if state.fresh and legacy_dir is not None:
            self._import(Path(legacy_dir).expanduser() / LEGACY_FILE)
        mine = {"explicit": explicit, "models": configured}
        if state.entry("base") is None or state.recall("base") != mine:  # this host's setting changed
            # defaults get the oldest stamp: any configured list, from any host, is newer
            state.put("base", {"models": configured}, stamp=None if explicit else Stamp(0, 0, state.node))
            state.remember("base", mine)

    def _import(self, path: Path) -> None:
        if not path.is_file():
            return
        try:
            doc = json.loads(path.read_text())
            ms = int(path.stat().st_mtime * 1000)
            deployed = {m: Deployment.of(m, o) for m, o in (doc.get("deployed") or {}).items()}
            removed = [m for m in doc.get("removed") or [] if isinstance(m, str)]
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            raise ConfigError(f"the deployments file {path} cannot be read ({exc}); fix or delete it",
                              file=str(path)) from None
        for i, (m, d) in enumerate(deployed.items()):
            self.state.put(f"desired:{m}", d.options(), stamp=Stamp(ms, i, self.state.node))
        for j, m in enumerate(removed):
            self.state.put(f"desired:{m}", None, stamp=Stamp(ms, len(deployed) + j, self.state.node))
        log.info("imported %s into the cluster state (%d deployed, %d removed)", path, len(deployed), len(removed))

    # ------------------------------------------------------------------ reading
    def _value(self, model: str) -> Any:
        """The entry of ``model``: its options, None (removed) or _UNSET (no entry)."""
        if self._trial is not None and self._trial[0] == model:
            d = self._trial[1]
            return None if d is None else d.options()
        e = self.state.entry(f"desired:{model}")
        return _UNSET if e is None else e.value

    @property
    def base(self) -> list[str]:
        b = self.state.get("base")
        models = b.get("models") if isinstance(b, dict) else None
        return [m for m in models if isinstance(m, str)] if isinstance(models, list) else []

    def _entries(self) -> list[str]:
        ids = [m for m, e in sorted(self.state.items("desired:").items(), key=lambda kv: kv[1].stamp)]
        if self._trial is not None and self._trial[0] not in ids:
            ids.append(self._trial[0])
        return ids

    def models(self) -> list[str]:
        """The desired model ids: the starting set first (in its order), then the deployed ones."""
        out = [m for m in self.base if self._value(m) is not None]
        out += [m for m in self._entries() if m not in out and self._value(m) not in (None, _UNSET)]
        return out

    def __contains__(self, model: object) -> bool:
        return model in self.models()

    def get(self, model: str) -> Deployment:
        v = self._value(model)
        return Deployment.of(model, v) if v not in (None, _UNSET) else Deployment(model)

    @property
    def deployed(self) -> dict[str, Deployment]:
        """Models with options of their own (deployed at runtime), by id."""
        return {m: Deployment.of(m, self._value(m)) for m in self._entries() if self._value(m) not in (None, _UNSET)}

    @property
    def removed(self) -> set[str]:
        return {m for m in self._entries() if self._value(m) is None}

    def chat_templates(self) -> dict[str, str]:
        """model → the shipped chat template its deploy asked for (those that asked)."""
        return {m: d.chat_template for m, d in self.deployed.items() if d.chat_template}

    def specs(self) -> dict[str, dict[str, Any]]:
        """The resolved hub references the cluster knows (``spec:`` entries): id → spec fields."""
        return {m: e.value for m, e in self.state.items("spec:").items() if isinstance(e.value, dict)}

    # ------------------------------------------------------------------ changes (stamped, replicated)
    def deploy(self, model: str, replicas: int = 1, node: str | None = None, chat_template: str | None = None) -> bool:
        """Add (or re-set) ``model``; False when it is deployed exactly so already."""
        wanted = Deployment(model, replicas, node, chat_template)
        if model in self and self.get(model) == wanted:
            return False
        self.state.put(f"desired:{model}", wanted.options())
        return True

    def note_spec(self, model: str, spec: dict[str, Any]) -> bool:
        """Share the spec a hub reference resolved to here (``spec:<model>``); False when the
        cluster holds exactly that one already (a restart re-resolving writes nothing)."""
        if self.state.get(f"spec:{model}") == spec:
            return False
        self.state.put(f"spec:{model}", spec)
        return True

    def remove(self, model: str) -> bool:
        if model not in self:
            return False
        self.state.put(f"desired:{model}", None)
        return True

    @contextmanager
    def trial(self, model: str, deployment: Deployment | None) -> Iterator[None]:
        """Read as if ``model`` were deployed so (None: removed), writing nothing (a deploy's
        room check plans this way before it is recorded)."""
        self._trial = (model, deployment)
        try:
            yield
        finally:
            self._trial = None

    def to_dict(self) -> dict[str, Any]:
        return {"models": self.models(), "deployed": {m: asdict(d) for m, d in self.deployed.items()},
                "removed": sorted(self.removed), "base": self.base, "file": str(self.state.path or "")}
