"""Images in requests (issue 20, vision): on /v1/chat/completions (image_url parts), Ollama's
/api/chat and /api/generate (``images``), Anthropic's /v1/messages (image blocks) and the Responses
API's /v1/responses (``input_image`` parts) they reach
only a model that sees images, in OpenAI's image_url shape; anything else is a 400 saying the
model has no vision, and http(s) image URLs are refused. In process, over the fake backend:
a model "sees" here when its target reports ``vision`` (what a llama-server engine started with
``--mmproj`` reports); no small vision GGUF can be fetched on this machine, so what a real
projector makes of the image is not proven here."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from tests.integration.test_ollama_api import CHAT, serve

pytestmark = pytest.mark.anyio
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(24)).decode()
DATA_URL = f"data:image/png;base64,{PNG}"


def _bodies(model: str) -> dict[str, tuple[str, dict[str, Any]]]:
    return {
        "openai": ("/v1/chat/completions", {"model": model, "max_tokens": 3, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": DATA_URL}}]}]}),
        "ollama-chat": ("/api/chat", {"model": model, "stream": False, "options": {"num_predict": 3},
                                      "messages": [{"role": "user", "content": "what is this?", "images": [PNG]}]}),
        "ollama-generate": ("/api/generate", {"model": model, "stream": False, "prompt": "what is this?",
                                              "images": [PNG], "options": {"num_predict": 3}}),
        "anthropic": ("/v1/messages", {"model": model, "max_tokens": 3, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
            {"type": "text", "text": "what is this?"}]}]}),
        "responses": ("/v1/responses", {"model": model, "max_output_tokens": 16, "input": [{"role": "user", "content": [
            {"type": "input_text", "text": "what is this?"}, {"type": "input_image", "image_url": DATA_URL}]}]}),
    }


def _message(body: dict[str, Any]) -> str:
    err = body["error"]
    return err if isinstance(err, str) else err["message"]


async def test_images_to_a_model_without_vision_are_a_400_saying_so(tmp_path):
    async with serve(tmp_path) as (raw, _, node):
        seen: list[Any] = []
        target = node.targets[CHAT]
        original = target.stream
        target.stream = lambda req: seen.append(req) or original(req)  # type: ignore[method-assign]
        assert target.info().get("vision") is False
        for name, (path, body) in _bodies(CHAT).items():
            r = await raw.post(path, json=body)
            assert r.status_code == 400, (name, r.text)
            assert "has no vision" in _message(r.json()) and CHAT in _message(r.json()), name
        assert seen == []  # nothing reached the engine
        for name, (path, body) in _bodies("no-such-model").items():
            assert (await raw.post(path, json=body)).status_code == 404, name


async def test_image_urls_are_not_fetched_and_bad_images_are_named(tmp_path):
    async with serve(tmp_path) as (raw, _, node):
        msg = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.org/a.png"}}]}]
        r = await raw.post("/v1/chat/completions", json={"model": CHAT, "messages": msg})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content[0].image_url.url"
        assert "not fetched" in r.json()["error"]["message"]
        r = await raw.post("/api/chat", json={"model": CHAT, "messages": [
            {"role": "user", "content": "x", "images": ["not base64!"]}]})
        assert r.status_code == 400 and "messages[0].images[0]" in r.json()["error"]
        r = await raw.post("/v1/messages", json={"model": CHAT, "max_tokens": 3, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "url", "url": "https://example.org/a.png"}}]}]})
        assert r.status_code == 400 and "not fetched" in r.json()["error"]["message"]
        r = await raw.post("/v1/responses", json={"model": CHAT, "input": [{"role": "user", "content": [
            {"type": "input_image", "image_url": "https://example.org/a.png", "detail": "auto"}]}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "input[0].content[0].image_url"
        assert "not fetched" in r.json()["error"]["message"]
        r = await raw.post("/v1/chat/completions", json={"model": CHAT, "messages": [{"role": "assistant", "content": [
            {"type": "image_url", "image_url": {"url": DATA_URL}}]}, {"role": "user", "content": "x"}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content[0]"


async def test_images_reach_a_model_that_sees_as_image_url_parts(tmp_path):
    async with serve(tmp_path) as (raw, _, node):
        seen: list[Any] = []
        target = node.targets[CHAT]
        original_stream, original_info = target.stream, target.info
        target.stream = lambda req: seen.append(req) or original_stream(req)  # type: ignore[method-assign]
        target.info = lambda: {**original_info(), "vision": True}  # type: ignore[method-assign]  # as with --mmproj
        for name, (path, body) in _bodies(CHAT).items():
            r = await raw.post(path, json=body)
            assert r.status_code == 200, (name, r.text)
            content = seen[-1].messages[-1]["content"]
            assert {"type": "image_url", "image_url": {"url": DATA_URL}} in content, (name, content)
            assert {"type": "text", "text": "what is this?"} in content, (name, content)
