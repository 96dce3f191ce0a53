"""Scripted stand-ins shared by the unit tests of routing (targets/, failover, deploy)."""

from __future__ import annotations

import asyncio
from typing import Any

from distributed.domain import ModelKind
from distributed.targets import Target, TargetState


class FakePeer:
    """A peer as ``RemoteTarget`` and ``Routes`` see it (``targets.PeerView``): the test sets its
    state, whether it is reachable, and the models it reports."""

    def __init__(self, name: str = "pc2", state: str = "alive", client: Any = None) -> None:
        self.name, self.state, self.reachable, self.client = name, state, True, client
        self.gone = asyncio.Event()
        if state in ("dead", "left"):
            self.gone.set()
        self.models: dict[str, dict[str, Any]] = {}

    def model_info(self, model: str) -> dict[str, Any] | None:
        return self.models.get(model)

    def failed(self, why: str) -> None:
        self.reachable = False


class StubTarget(Target):
    """A local target in the state the test gives it; it computes nothing."""

    def __init__(self, model: str, kind: ModelKind = "chat", node: str = "pc1",
                 state: TargetState = TargetState.READY) -> None:
        self.model, self.kind, self.node = model, kind, node
        self._state = state

    @property
    def state(self) -> TargetState:
        return self._state

    def stream(self, req: Any) -> Any:
        raise NotImplementedError

    async def embed(self, req: Any) -> Any:
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        return {"id": self.model, "state": self.state}
