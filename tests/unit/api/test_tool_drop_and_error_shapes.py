"""tool_drop: tools a model cannot take are dropped only when the model may choose; the
header says why. error_shapes: each dialect's error body, by path."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from distributed.api import error_shapes, tool_drop
from distributed.domain import GenerateRequest
from distributed.errors import InputTooLong, ModelNotFound, Overloaded, ToolsUnsupported, ValidationFailed

TOOLS = [{"type": "function", "function": {"name": "f"}}]


def _run(req: GenerateRequest, fails: Exception):
    seen: list[GenerateRequest] = []

    async def call(q: GenerateRequest) -> str:
        seen.append(q)
        if q.tools:
            raise fails
        return "answer"

    return asyncio.run(tool_drop.attempt(req, call)), seen


@pytest.mark.parametrize("choice", [None, "auto"])
@pytest.mark.parametrize("exc,why", [(ToolsUnsupported("no tools in this template"), "template:"),
                                     (InputTooLong("too long", limit=2048, got=3000), "context:")])
def test_dropped_when_the_model_may_choose(choice, exc, why):
    (result, reason), seen = _run(GenerateRequest(messages=[], tools=TOOLS, tool_choice=choice), exc)
    assert result == "answer" and reason.startswith(why) and seen[-1].tools is None
    assert tool_drop.headers(reason)[tool_drop.HEADER].startswith(why)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "f"}}])
def test_kept_and_refused_when_the_client_asked_for_a_call(choice):
    with pytest.raises(ToolsUnsupported):
        _run(GenerateRequest(messages=[], tools=TOOLS, tool_choice=choice), ToolsUnsupported("no tools"))


def test_other_errors_and_requests_without_tools_pass_through():
    with pytest.raises(ValidationFailed):
        _run(GenerateRequest(messages=[], tools=TOOLS), ValidationFailed("bad", field="x"))
    with pytest.raises(InputTooLong):  # the messages alone are too long: no tools to drop
        asyncio.run(tool_drop.attempt(GenerateRequest(messages=[]), _raise(InputTooLong("x", limit=1))))
    assert tool_drop.headers(None) == {} and tool_drop.headers("é\nx") == {tool_drop.HEADER: "? x"}


def _raise(exc: Exception):
    async def call(q: GenerateRequest) -> None:
        raise exc
    return call


def test_each_dialect_has_its_error_shape():
    err = ValidationFailed("bad max_tokens", field="max_tokens")
    native = orjson.loads(error_shapes.error_json(err, "pc1", "/inference"))
    assert native["error"]["type"] == "invalid_request" and native["via"] == "pc1"
    oai = orjson.loads(error_shapes.error_json(err, "pc1", "/v1/chat/completions"))
    assert oai["error"]["param"] == "max_tokens" and oai["error"]["type"] == "invalid_request_error"
    claude = orjson.loads(error_shapes.error_json(err, "pc1", "/v1/messages"))
    assert claude["type"] == "error" and claude["error"] == {"type": "invalid_request_error", "message": "bad max_tokens"}
    assert error_shapes.anthropic_error(ModelNotFound("x", ["a"]))["error"]["type"] == "not_found_error"
    assert error_shapes.anthropic_error(Overloaded("busy"))["error"]["type"] == "rate_limit_error"
    assert error_shapes.shape_of("/v1/messages/count_tokens") == "anthropic"
    assert error_shapes.shape_of("/v1/responses") == "openai" and error_shapes.shape_of("/embed") == "native"
