"""Rerank: order documents by relevance to a query, with the models the node already routes.

The routes (Cohere/Jina ``/v1/rerank``, TEI ``/rerank``) live in ``api/rerank.py``; this
module holds the service they call, shared with the ``rerank.score`` RPC method.

Two kinds of model can rerank:

* an **embedding model** (kind ``embed``): the cosine similarity of the query's and each
  document's embedding, computed through the model's own target — the local
  micro-batcher, or the peer over ``/rpc`` (coalesced) — so the embedded MiniLM reranks
  with no download, on whichever host serves it;
* a **reranker** (kind ``rerank``, ``backends/cross_encoder.py``): one relevance score per
  (query, document) pair from the ``LocalTarget``'s micro-batcher (concurrent requests
  share one ``predict``), or ``rerank.score`` on the peer that serves it.

Without a ``model``, a reranker is preferred when one is served, else the default
embedding model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .backends.cross_encoder import Pair
from .domain import EmbedRequest
from .errors import ModelFailed, ModelLoading, ModelNotFound, ValidationFailed

RANKING_KINDS = ("rerank", "embed")
DEFAULT_MAX_DOCUMENTS = 1000


@dataclass
class RerankRequest:
    query: str
    documents: list[str]
    model: str | None = None
    top_n: int | None = None


@dataclass
class RerankResult:
    model: str
    node: str  # the host that computed the scores
    scores: list[float]  # one per document, in the order they were sent
    prompt_tokens: int = 0
    method: str = "cross-encoder"  # or "cosine" (an embedding model)
    via: str | None = None
    total_ms: float = 0.0
    notes: list[str] = field(default_factory=list)

    def ranked(self, top_n: int | None = None) -> list[tuple[int, float]]:
        """(index, score) best first; ties keep the documents' order."""
        order = sorted(range(len(self.scores)), key=lambda i: (-self.scores[i], i))
        if top_n is not None:
            order = order[:top_n]
        return [(i, self.scores[i]) for i in order]


def validate(req: RerankRequest, max_documents: int) -> None:
    """400s naming the field: an empty query, no documents, too many, an empty document."""
    if not isinstance(req.query, str) or not req.query.strip():
        raise ValidationFailed("'query' is empty; send the text to rank the documents against", field="query")
    n = len(req.documents)
    if n == 0:
        raise ValidationFailed("'documents' is empty; send at least one document", field="documents")
    if n > max_documents:
        raise ValidationFailed(f"'documents' has {n} documents; this node ranks at most {max_documents} per "
                               "request (TARS_RERANK_MAX_DOCUMENTS)", field="documents", limit=max_documents, got=n)
    for i, doc in enumerate(req.documents):
        if not isinstance(doc, str) or not doc.strip():
            raise ValidationFailed(f"documents[{i}] is empty; every document must be a non-empty string",
                                   field=f"documents[{i}]")
    if req.top_n is not None and req.top_n < 1:
        raise ValidationFailed("'top_n' must be at least 1", field="top_n")


def resolve(node: Any, model: str | None, *, here: bool = False) -> Any:
    """The target that ranks for ``model`` (None: a reranker if one is served, else the
    default embedding model), as ``Routes.resolve`` says (``here``: a call a peer forwarded,
    computed on this host). A chat model → 400 naming the field."""
    targets = node.routes.targets
    if not model:
        reranker = next((t for t in targets.values() if t.kind == "rerank"), None)
        if reranker is None:
            return node.resolve(None, "embed", here=here)
        model = reranker.model
    target = targets.get(model)
    if target is None:
        ranking = [m for m, t in targets.items() if t.kind in RANKING_KINDS]
        raise ModelNotFound(model, ranking or list(targets))
    if target.kind not in RANKING_KINDS:
        raise ValidationFailed(f"model '{model}' is a {target.kind} model; rerank needs an embedding or a "
                               "rerank model", field="model", model=model)
    return node.routes.resolve(model, here=here)  # a replicated model: its ReplicaSet


async def rerank(node: Any, req: RerankRequest, *, max_documents: int | None = None) -> RerankResult:
    """Validate, pick the model, score every document (the caller orders and cuts)."""
    limit = max_documents or int(getattr(node.settings, "rerank_max_documents", DEFAULT_MAX_DOCUMENTS))
    validate(req, limit)
    t0 = time.perf_counter()
    target = resolve(node, req.model)
    result = await score(node, target, req.query, req.documents)
    result.via = node.name
    result.total_ms = round((time.perf_counter() - t0) * 1000, 3)
    return result


async def score(node: Any, target: Any, query: str, documents: list[str]) -> RerankResult:
    """Scores of ``documents`` against ``query`` by ``target`` (local or remote)."""
    if target.kind == "embed":
        return await _cosine(target, query, documents)  # a ReplicaSet's embed picks a replica itself
    if hasattr(target, "call_replica"):  # several hosts serve it: the least busy live one
        return await target.call_replica(lambda m: score(node, m, query, documents))
    local = computing_here(target)
    if local is not None:
        return await score_local(local, query, documents)
    return await _on_peer(node, target, query, documents)


async def _on_peer(node: Any, target: Any, query: str, documents: list[str]) -> RerankResult:
    """``rerank.score`` on the peer that serves the model; while that peer is down (or refused
    the call before it was sent), the cluster's failover serves it here when it fits."""
    from .errors import PeerUnavailable

    failover = getattr(target, "failover", None)  # the cluster's (None: a replica, or no fallback)
    if getattr(target, "peer_down", False) and failover is not None:
        standin = await failover(target, PeerUnavailable(
            f"model '{target.model}' runs on {target.node}, which is down", peer=target.node, model=target.model))
        return await score_local(standin, query, documents)
    timeout = float(getattr(node.settings, "request_timeout_s", 300.0))
    try:
        out = await target.peer.client.call("rerank.score", {"model": target.model, "query": query,
                                                             "documents": documents}, timeout=timeout)
    except PeerUnavailable as exc:
        if exc.details.get("phase") != "connect" or failover is None:
            raise
        target.peer.failed(exc.message)  # unreachable until it answers again, as RemoteTarget does
        return await score_local(await failover(target, exc), query, documents)
    return RerankResult(model=out["model"], node=out["node"], scores=[float(x) for x in out["scores"]],
                        prompt_tokens=int(out.get("prompt_tokens", 0)), method=out.get("method", "cross-encoder"))


def computing_here(target: Any) -> Any:
    """The local target that computes ``target`` on this host, or None (it runs on a peer):
    the target itself when local, or a RemoteTarget's stand-in (fallback or handoff) while
    that serves it."""
    if getattr(target, "local", False) or getattr(target, "batcher", None) is not None:
        return target
    standin = getattr(target, "standin", None)
    if standin is not None and getattr(target, "serves_here", False):
        return standin
    return None


async def score_local(target: Any, query: str, documents: list[str]) -> RerankResult:
    """Cross-encoder scores through the LocalTarget's micro-batcher (one (query, doc) pair per item)."""
    if target.state != "ready" or target.batcher is None:
        if target.state == "loading":
            raise ModelLoading(f"model '{target.model}' is still loading on {target.node}; retry in a few seconds",
                               model=target.model, node=target.node, retry_after=2)
        raise ModelFailed(f"model '{target.model}' is not available on {target.node} ({target.state}"
                          + (f": {target.error}" if getattr(target, "error", None) else "") + ")",
                          model=target.model, node=target.node)
    target.requests += 1
    scores, counts = await target.batcher.embed([Pair(query, d) for d in documents], False)
    return RerankResult(model=target.model, node=target.node, scores=[float(x) for x in scores],
                        prompt_tokens=sum(counts or ()), method="cross-encoder")


async def _cosine(target: Any, query: str, documents: list[str]) -> RerankResult:
    import numpy as np

    emb = await target.embed(EmbedRequest(model=target.model, input=[query, *documents], normalize=True))
    vectors = np.asarray(emb.vectors, dtype=np.float32)
    scores = vectors[1:] @ vectors[0]
    return RerankResult(model=emb.model, node=emb.node, scores=[round(float(x), 6) for x in scores],
                        prompt_tokens=emb.prompt_tokens, method="cosine")
