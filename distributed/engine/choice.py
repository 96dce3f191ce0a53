"""Which engine serves a GGUF chat model: llama-server (a child per model) or in process.

``TARS_CHAT_ENGINE``: ``server`` (llama-server; not built → the model fails saying so),
``inprocess`` (llama-cpp-python, one request at a time), ``auto`` (server when a build is
found, else in process). The choice and its reason are logged once per node at start.

API::

    decide(settings) -> Decision(engine "server"|"inprocess", binary | None, reason)
    engine_target(node, spec, assignment) -> EngineTarget | None   # None: in-process LocalTarget
    engine_slots(settings) -> int      # KV caches the planner counts per GGUF chat model
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..domain import Assignment, ModelSpec
from ..errors import ConfigError
from ..logs import fields, get_logger
from .binary import EngineBinary, locate, why_not

log = get_logger(__name__)
_logged: set[tuple[str, str, str]] = set()


@dataclass(frozen=True)
class Decision:
    engine: str  # "server" | "inprocess"
    binary: EngineBinary | None
    reason: str


def decide(settings: Any) -> Decision:
    mode = getattr(settings, "chat_engine", "auto")
    override = getattr(settings, "engine_bin", "")
    if mode == "inprocess":
        return Decision("inprocess", None, "TARS_CHAT_ENGINE=inprocess")
    binary = locate(override)
    if binary is not None:
        return Decision("server", binary, f"TARS_CHAT_ENGINE={mode}; {binary.describe()}")
    reason = why_not(override)
    if mode == "server":
        return Decision("server", None, f"TARS_CHAT_ENGINE=server but {reason}")
    return Decision("inprocess", None, f"{reason}; GGUF chat runs in process (llama-cpp-python, one request at a time)")


def _log_once(node: str, d: Decision) -> None:
    key = (node, d.engine, d.reason)
    if key in _logged:
        return
    _logged.add(key)
    level = log.warning if d.engine == "inprocess" and "TARS_CHAT_ENGINE=inprocess" not in d.reason else log.info
    what = "llama-server" if d.engine == "server" else "in-process llama-cpp-python"
    level("chat engine: %s (%s)", what, d.reason, extra=fields(engine=d.engine))


def engine_target(node: Any, spec: ModelSpec, a: Assignment) -> Any:
    """An EngineTarget for a GGUF chat model when the server engine is chosen, else None.

    What it uses of ``node``: ``settings``, ``name``, ``metrics``, ``store`` (the model file,
    pulled when missing); for a split assignment also its split service (``node.split``), its
    peer table (``node.peers``), and ``plan``/``profile`` (where the model goes alone:
    ``split.engine.fit_alone``)."""
    s = node.settings
    backend = s.backend_override or a.backend or spec.backend
    if spec.kind != "chat" or backend != "llama_cpp":
        return None
    d = decide(s)
    _log_once(node.name, d)
    if d.engine != "server":
        return None
    from .config import EngineConfig
    from .target import EngineTarget

    if d.binary is None:  # TARS_CHAT_ENGINE=server without a build: the model fails, saying why
        reason = d.reason

        def missing() -> Any:
            raise ConfigError(reason, variable="TARS_CHAT_ENGINE")

        from pathlib import Path

        binary = EngineBinary(server=Path("llama-server"), rpc_server=None, version="", kind="", build="",
                              source="missing")
        return EngineTarget(spec, a, EngineConfig.of(s, spec, a, binary), model_path=missing, node=node.name,
                            metrics=node.metrics)
    from ..deploy.pull import fetch

    config = EngineConfig.of(s, spec, a, d.binary)
    made: list[Any] = []  # the target built below: a pull's progress shows in its info()

    def model_path() -> Any:
        return fetch(node.store, spec, made[0] if made else None)

    if a.split_nodes:  # pooled VRAM: layers on other hosts too (split/engine.py)
        from ..split.engine import fit_alone, overlap_fits, split_engine_target

        made.append(split_engine_target(spec, a, config, node=node.name, model_path=model_path, metrics=node.metrics,
                                        service=node.split, peers=lambda name: _peer(node, name),
                                        alone=lambda: fit_alone(node, spec, a),
                                        overlap=lambda n: overlap_fits(node, spec, a, n)))
    else:
        made.append(EngineTarget(spec, a, config, model_path=model_path, node=node.name, metrics=node.metrics))
    return made[0]


def _peer(node: Any, name: str) -> Any:
    """The peer ``name`` in ``node``'s peer table (shared with its cluster), or None."""
    peers = node.peers
    return peers.get(name) if peers is not None else None


def engine_slots(settings: Any) -> int:
    """Slots the planner counts a KV cache for: TARS_PARALLEL with llama-server, else 1."""
    if getattr(settings, "backend_override", "") not in ("", "llama_cpp"):
        return 1
    d = decide(settings)
    return int(getattr(settings, "parallel", 1)) if d.engine == "server" and d.binary is not None else 1
