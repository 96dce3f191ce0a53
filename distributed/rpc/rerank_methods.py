"""``rerank.score``: a peer asks this node to score documents with a reranker it serves.

Registered on the node's ``RpcServer`` with one line (``register_rerank(self)``). Like
``embed.encode``, a forwarded call is computed here — by the model's local target or its
stand-in — or refused, never forwarded again (two hosts whose routing tables are
converging could bounce it otherwise).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from ..errors import ModelLoading


class RerankParams(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    model: str
    query: str
    documents: list[str]


def register_rerank(server: Any) -> None:
    """Add ``rerank.score`` to ``server`` (an ``RpcServer``)."""
    from ..rerank import DEFAULT_MAX_DOCUMENTS, RerankRequest, computing_here, resolve, score_local, validate

    node = server.node

    async def score(params: RerankParams) -> dict[str, Any]:
        limit = int(getattr(server.settings, "rerank_max_documents", DEFAULT_MAX_DOCUMENTS))
        validate(RerankRequest(query=params.query, documents=params.documents, model=params.model), limit)
        deployer = getattr(node, "deployer", None)
        if deployer is not None:
            deployer.mark_forwarded()  # a replicated reranker: the copy here computes it
        target = resolve(node, params.model)
        here = computing_here(target) if target.kind == "rerank" else None
        if here is None:
            raise ModelLoading(f"model '{params.model}' is not computed by {node.name} (its routing points to "
                               f"{target.node}); the cluster is re-planning, retry shortly",
                               model=params.model, node=node.name)
        result = await score_local(here, params.query, params.documents)
        return {"model": result.model, "node": result.node, "scores": result.scores,
                "prompt_tokens": result.prompt_tokens, "method": result.method}

    if hasattr(server, "register"):
        server.register("rerank.score", RerankParams, score)
    else:  # an RpcServer of the older shape: named-parameter schemas, fn(**params)
        from .server import L, Param, S  # type: ignore[attr-defined]

        schema = {"model": Param(S, required=True), "query": Param(S, required=True),
                  "documents": Param(L, required=True, items=str)}

        async def score_named(**params: Any) -> dict[str, Any]:
            return await score(RerankParams(**params))

        server.methods["rerank.score"] = server._wrap("rerank.score", schema, score_named)
