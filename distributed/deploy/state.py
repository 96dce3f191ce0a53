"""``DesiredSet``: which models the cluster should serve, persisted across restarts.

The file (``TARS_MODELS_DIR/tars-deployments.json``) holds changes on top of the starting
set (``TARS_MODELS``, else the catalog's defaults)::

    {"version": 1, "deployed": {"<id>": {"replicas": 1, "node": null, "chat_template"?: "<name>"}},
     "removed": ["<id>"]}

so a model deployed at runtime is back after a restart, one removed stays removed, and a
model added to ``TARS_MODELS`` later is still picked up. Writes are atomic (temp + rename).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError

STATE_FILE = "tars-deployments.json"


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


class DesiredSet:
    def __init__(self, folder: str | Path, base: list[str]) -> None:
        self.path = Path(folder).expanduser() / STATE_FILE
        self.base = list(dict.fromkeys(base))
        self.deployed: dict[str, Deployment] = {}
        self.removed: set[str] = set()
        self.load()

    # ------------------------------------------------------------------ file
    def load(self) -> None:
        if not self.path.is_file():
            return
        try:
            doc = json.loads(self.path.read_text())
            deployed = doc.get("deployed", {})
            self.deployed = {m: Deployment(m, int(o.get("replicas", 1)), o.get("node"), o.get("chat_template"))
                             for m, o in deployed.items()}
            self.removed = set(doc.get("removed", []))
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            raise ConfigError(f"the deployments file {self.path} cannot be read ({exc}); fix or delete it "
                              "(the cluster then serves TARS_MODELS)", file=str(self.path)) from None

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"version": 1, "deployed": {m: d.options() for m, d in self.deployed.items()},
               "removed": sorted(self.removed)}
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(doc, indent=2))
        tmp.replace(self.path)

    # ------------------------------------------------------------------ reading
    def models(self) -> list[str]:
        """The desired model ids, the starting set first (in its order)."""
        out = [m for m in self.base if m not in self.removed]
        out += [m for m in self.deployed if m not in out]
        return out

    def __contains__(self, model: object) -> bool:
        return model in self.models()

    def get(self, model: str) -> Deployment:
        return self.deployed.get(model) or Deployment(model)

    def chat_templates(self) -> dict[str, str]:
        """model → the shipped chat template its deploy asked for (those that asked)."""
        return {m: d.chat_template for m, d in self.deployed.items() if d.chat_template}

    # ------------------------------------------------------------------ changes
    def deploy(self, model: str, replicas: int = 1, node: str | None = None, chat_template: str | None = None) -> bool:
        """Add (or re-set) ``model``; False when it is already deployed exactly so."""
        if model in self and self.get(model) == Deployment(model, replicas, node, chat_template):
            return False
        self.removed.discard(model)
        if model in self.base and replicas == 1 and node is None and chat_template is None:
            self.deployed.pop(model, None)
        else:
            self.deployed[model] = Deployment(model, replicas, node, chat_template)
        return True

    def remove(self, model: str) -> bool:
        if model not in self:
            return False
        self.deployed.pop(model, None)
        if model in self.base:
            self.removed.add(model)
        return True

    def to_dict(self) -> dict[str, Any]:
        return {"models": self.models(), "deployed": {m: asdict(d) for m, d in self.deployed.items()},
                "removed": sorted(self.removed), "file": str(self.path)}
