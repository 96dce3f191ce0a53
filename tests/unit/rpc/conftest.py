"""A minimal stand-in for ``Node`` so the /rpc layer is tested on its own.

It implements only the part of the Node contract (docs/ARCHITECTURE.md) that
rpc/server.py calls; the integration tests use the real Node.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI

from distributed.domain import Completion, Embeddings, TokenChunk, Usage
from distributed.errors import ModelLoading, ModelNotFound, Overloaded
from distributed.rpc.server import build_rpc_router
from distributed.settings import load_settings

TOKEN = "s3cret-token"


class _T:
    def __init__(self, model: str, kind: str, node: str) -> None:
        self.model, self.kind, self.node = model, kind, node


# Plain class attributes of a stand-in, as other stubs in tests/unit have: alike in shape only.
class StubNode:
    name = "pc1"
    role = "server"
    profile = None

    def __init__(self) -> None:
        self.targets = {"chat-a": _T("chat-a", "chat", "pc1"), "emb-a": _T("emb-a", "embed", "pc1"),
                        "far-chat": _T("far-chat", "chat", "pc2")}
        self.calls: list[Any] = []
        self.stream_closed = asyncio.Event()
        self.fail_with: Exception | None = None

    def resolve(self, model: str | None, kind: str, *, here: bool = False) -> _T:
        model = model or {"chat": "chat-a", "embed": "emb-a"}[kind]
        if model not in self.targets:
            raise ModelNotFound(model, list(self.targets))
        target = self.targets[model]
        if here and target.node != self.name:  # a forwarded call is computed here or refused
            raise ModelLoading(f"model '{target.model}' is not served by {self.name} (its routing points to "
                               f"{target.node})", model=target.model, node=self.name)
        return target

    def health(self) -> tuple[bool, dict[str, Any]]:
        return True, {"status": "ok"}

    def models(self) -> list[dict[str, Any]]:
        return [{"id": t.model, "kind": t.kind, "node": t.node} for t in self.targets.values()]

    async def generate(self, req: Any, *, here: bool = False) -> Completion:
        req.model = self.resolve(req.model, "chat", here=here).model
        self.calls.append(req)
        if self.fail_with:
            raise self.fail_with
        text = (req.prompt or "")[::-1]
        return Completion(model=req.model, node=self.name, text=text, finish_reason="stop",
                          usage=Usage(3, len(text)), via=self.name)

    async def stream(self, req: Any, *, here: bool = False):
        req.model = self.resolve(req.model, "chat", here=here).model
        self.calls.append(req)
        if self.fail_with:
            raise self.fail_with
        try:
            for i in range(req.max_tokens):
                yield TokenChunk(text=f"t{i} ", finish_reason="length" if i == req.max_tokens - 1 else None)
                await asyncio.sleep(0)
                if req.prompt == "slow":
                    await asyncio.sleep(0.05)
                if req.prompt == "boom" and i == 1:
                    raise Overloaded("queue full mid-way", retry_after=2.0)
            yield Completion(model=req.model, node=self.name, text="", finish_reason="length",
                             usage=Usage(1, req.max_tokens))
        finally:
            self.stream_closed.set()

    async def embed(self, req: Any, *, here: bool = False) -> Embeddings:
        req.model = self.resolve(req.model, "embed", here=here).model
        self.calls.append(req)
        vecs = np.array([[float(len(t)), 1.0, -0.5] for t in req.input], dtype=np.float32)
        return Embeddings(model=req.model, node=self.name, vectors=vecs, prompt_tokens=len(req.input))


@pytest.fixture
def node() -> StubNode:
    return StubNode()


@pytest.fixture
def rpc_app(node: StubNode) -> FastAPI:
    settings = load_settings(node_name="pc1", cluster_token=TOKEN, max_body_bytes=4096)
    app = FastAPI()
    app.include_router(build_rpc_router(settings, node))
    return app


@pytest.fixture
async def http(rpc_app: FastAPI):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(rpc_app), base_url="http://pc1",
                                 headers={"authorization": f"Bearer {TOKEN}"}) as c:
        yield c
