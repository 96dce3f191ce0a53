"""Rerank routes: ``POST /v1/rerank`` (Cohere / Jina shape) and ``POST /rerank`` (TEI shape).

``/v1/rerank``::

    {"model"?, "query", "documents": [str | {"text": str}], "top_n"?, "return_documents"?: false}
    → {"id", "model", "results": [{"index", "relevance_score", "document"?: {"text"}}],
       "usage": {"prompt_tokens", "total_tokens"}, "node", "via"}

``/rerank`` (text-embeddings-inference)::

    {"model"?, "query", "texts": [str], "return_text"?: false} → [{"index", "score", "text"?}]

and, given ``documents`` instead of ``texts``, the Cohere answer above. Results are best
first. Errors: OpenAI's shape on ``/v1/*``, the native one on ``/rerank`` (app.py).

The wire models live here rather than in ``schemas.py``: they are only these routes', and
documents may be strings or ``{"text"}`` objects, checked here so that the OpenAPI document
needs no nested models.
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from ..errors import ValidationFailed
from ..rerank import RerankRequest, RerankResult, rerank
from . import schemas as s
from .native import JSON, label

router = APIRouter()


class CohereRerankRequest(BaseModel):
    """POST /v1/rerank (Cohere, Jina)."""

    model_config = ConfigDict(extra="ignore")  # clients send knobs we do not use (max_chunks_per_doc ...)
    model: str | None = None
    query: str
    documents: list[str | dict[str, Any]]
    top_n: int | None = Field(None, ge=1)
    return_documents: bool = False


class TeiRerankRequest(BaseModel):
    """POST /rerank (text-embeddings-inference)."""

    model_config = ConfigDict(extra="ignore")  # raw_scores, truncate, truncation_direction
    model: str | None = None
    query: str
    texts: list[str]
    return_text: bool = False


def _texts(documents: list[str | dict[str, Any]]) -> list[str]:
    out = []
    for i, doc in enumerate(documents):
        if isinstance(doc, dict):
            text = doc.get("text")
            if not isinstance(text, str):
                raise ValidationFailed(f"documents[{i}] must be a string or an object with a string 'text'",
                                       field=f"documents[{i}].text")
            doc = text
        out.append(doc)
    return out


def _body_doc(model: type[BaseModel]) -> dict[str, Any]:
    return {"requestBody": {"content": {"application/json": {"schema": model.model_json_schema()}}}}


async def _run(request: Request, req: RerankRequest) -> RerankResult:
    node = request.app.state.node
    label(request, req.model)
    result = await rerank(node, req, max_documents=getattr(request.app.state.settings, "rerank_max_documents", None))
    label(request, result.model)
    return result


def _cohere_body(result: RerankResult, texts: list[str], top_n: int | None, return_documents: bool) -> dict[str, Any]:
    results = []
    for i, score in result.ranked(top_n):
        item: dict[str, Any] = {"index": i, "relevance_score": score}
        if return_documents:
            item["document"] = {"text": texts[i]}
        results.append(item)
    return {"id": str(uuid.uuid4()), "model": result.model, "results": results,
            "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
            "node": result.node, "via": result.via, "method": result.method,
            "timings": {"total_ms": result.total_ms}}


async def _cohere(request: Request, body: bytes) -> Response:
    r = s.parse(CohereRerankRequest, body)
    texts = _texts(r.documents)
    result = await _run(request, RerankRequest(query=r.query, documents=texts, model=r.model, top_n=r.top_n))
    return JSON(_cohere_body(result, texts, r.top_n, r.return_documents))


@router.post("/v1/rerank", summary="Rerank documents against a query (Cohere / Jina shape)",
             openapi_extra=_body_doc(CohereRerankRequest))
async def rerank_v1(request: Request) -> Response:
    return await _cohere(request, await request.body())


@router.post("/rerank", summary="Rerank (text-embeddings-inference shape: query, texts)",
             openapi_extra=_body_doc(TeiRerankRequest))
async def rerank_tei(request: Request) -> Response:
    body = await request.body()
    try:
        import orjson

        keys = orjson.loads(body) if body else None
    except ValueError:
        keys = None
    if isinstance(keys, dict) and "documents" in keys and "texts" not in keys:
        return await _cohere(request, body)
    r = s.parse(TeiRerankRequest, body)
    texts = [t for t in r.texts]
    try:
        result = await _run(request, RerankRequest(query=r.query, documents=texts, model=r.model))
    except ValidationFailed as exc:  # the service names 'documents'; TEI calls them 'texts'
        field = exc.details.get("field") or ""
        if field.startswith("documents"):
            exc.details["field"] = "texts" + field[len("documents"):]
            exc.message = exc.message.replace("'documents'", "'texts'").replace("documents[", "texts[")
            exc.args = (exc.message,)
        raise
    out = []
    for i, score in result.ranked():
        item: dict[str, Any] = {"index": i, "score": score}
        if r.return_text:
            item["text"] = texts[i]
        out.append(item)
    return JSON(out)
