"""``rerank.score``: a peer asks this node to score documents with a reranker it serves.

Registered on the node's ``RpcServer`` by ``register_rerank``. Like ``embed.encode``, a
forwarded call is computed here — by the model's local target, a replicated reranker's
copy here, or a stand-in — or refused, never forwarded again (two hosts whose routing
tables are converging could bounce it otherwise): ``rerank.resolve(..., here=True)``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from ..errors import ModelLoading
from ..seams import ServiceNode
from .registry import Registry


class RerankParams(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    model: str
    query: str
    documents: list[str]


def register_rerank(server: Registry, node: ServiceNode) -> None:
    """Add ``rerank.score`` (over ``node``'s targets) to ``server``."""
    from ..rerank import RerankRequest, computing_here, resolve, score_local, validate

    async def score(params: RerankParams) -> dict[str, Any]:
        validate(RerankRequest(query=params.query, documents=params.documents, model=params.model),
                 node.settings.rerank_max_documents)
        target = resolve(node, params.model, here=True)
        here = computing_here(target) if target.kind == "rerank" else None
        if here is None:
            raise ModelLoading(f"model '{params.model}' is not computed by {node.name} (its routing points to "
                               f"{target.node}); the cluster is re-planning, retry shortly",
                               model=params.model, node=node.name)
        result = await score_local(here, params.query, params.documents)
        return {"model": result.model, "node": result.node, "scores": result.scores,
                "prompt_tokens": result.prompt_tokens, "method": result.method}

    server.register("rerank.score", RerankParams, score)
