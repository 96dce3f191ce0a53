"""rerank.py: a rerank request is checked (query, documents, their number) before it is
routed anywhere, each refusal naming its field."""

from __future__ import annotations

import pytest

from distributed.errors import ValidationFailed
from distributed.rerank import RerankRequest, rerank

pytestmark = pytest.mark.anyio


async def test_rerank_validates_before_it_routes():
    class _Node:
        name = "n"
        targets: dict = {}

        class settings:
            rerank_max_documents = 3

    for req, field in [(RerankRequest(query=" ", documents=["a"]), "query"),
                       (RerankRequest(query="q", documents=[]), "documents"),
                       (RerankRequest(query="q", documents=["a"] * 4), "documents"),
                       (RerankRequest(query="q", documents=["a", ""]), "documents[1]")]:
        with pytest.raises(ValidationFailed) as err:
            await rerank(_Node(), req)
        assert err.value.details["field"] == field
    with pytest.raises(ValidationFailed, match="at most 3"):
        await rerank(_Node(), RerankRequest(query="q", documents=["a"] * 4))
