"""reasoning_effort and chat_template_kwargs reach the engine; reasoning_content comes back
(whole and streamed) when a model thinks; metadata, prompt_cache_key and user only label."""

from __future__ import annotations

import orjson
import pytest

from distributed.api import schemas
from distributed.api.chat_surface import ChatCompletionRequest, ChunkEncoder, CompletionRequest, chat_completion_body
from distributed.backends.llama_surface import template_inputs
from distributed.domain import Completion, GenerateRequest, TokenChunk
from distributed.engine import wire
from distributed.errors import ValidationFailed
from distributed.requests import GenerateParams, parse_params

ASK = b'"messages": [{"role": "user", "content": "hi"}]'


def _chat(extra: bytes) -> ChatCompletionRequest:
    return schemas.parse(ChatCompletionRequest, b"{" + ASK + b", " + extra + b"}")


def test_reasoning_fields_reach_the_domain_and_cross_hosts():
    req = _chat(b'"reasoning_effort": "high", "chat_template_kwargs": {"enable_thinking": false}').to_domain()
    assert req.reasoning_effort == "high" and req.chat_template_kwargs == {"enable_thinking": False}
    params = req.to_rpc()
    params.pop("stream")
    assert parse_params(GenerateParams, "inference.generate", params).to_domain(stream=False) == req
    _, body = wire.payload(req, "m")
    assert body["reasoning_effort"] == "high" and body["chat_template_kwargs"] == {"enable_thinking": False}
    assert "reasoning_effort" not in GenerateRequest(prompt="x").to_rpc()


@pytest.mark.parametrize("extra,field", [
    (b'"reasoning_effort": "extreme"', "reasoning_effort"),
    (b'"chat_template_kwargs": {"messages": []}', "chat_template_kwargs.messages"),
    (b'"chat_template_kwargs": [1]', "chat_template_kwargs"),
    (b'"metadata": {"k": 3}', "metadata.k"),
])
def test_bad_values_are_refused_by_name(extra, field):
    with pytest.raises(ValidationFailed) as err:
        _chat(extra).to_domain()
    assert err.value.field == field


def test_labels_are_accepted():
    r = _chat(b'"metadata": {"app": "librechat"}, "prompt_cache_key": "conv-1", "user": "u1"')
    assert r.to_domain().messages and r.metadata == {"app": "librechat"} and r.prompt_cache_key == "conv-1"
    c = schemas.parse(CompletionRequest, b'{"prompt": "x", "prompt_cache_key": "k", "metadata": {"a": "b"}}')
    assert c.to_domain().prompt == "x"


def test_in_process_template_inputs_follow_llama_server():
    assert template_inputs(GenerateRequest(reasoning_effort="none", chat_template_kwargs={"x": 1})) == \
        {"x": 1, "enable_thinking": False}
    assert template_inputs(GenerateRequest(reasoning_effort="low")) == {"reasoning_effort": "low"}


def test_reasoning_content_comes_back_whole_and_streamed():
    text, _, _, _, extra = wire.answer({"choices": [{"message": {"content": "42", "reasoning_content": "think"},
                                                     "finish_reason": "stop"}]})
    assert text == "42" and extra["reasoning"] == "think"
    st = wire.StreamState()
    piece = st.feed({"choices": [{"delta": {"reasoning_content": "hm"}}]})
    assert piece is not None and piece.text == "" and piece.reasoning == "hm"
    both = st.feed({"choices": [{"delta": {"reasoning_content": ".", "content": "A"}}]})
    assert both is not None and (both.text, both.reasoning) == ("A", ".")
    c = Completion(model="m", node="n", text="42", finish_reason="stop", reasoning="think")
    body = chat_completion_body([c], "id", 0)
    assert body["choices"][0]["message"]["reasoning_content"] == "think"
    assert Completion.from_dict(c.to_dict()) == c
    enc = ChunkEncoder("chat", "m", "id", 0)
    events = [orjson.loads(line[6:]) for line in enc.piece(TokenChunk("A", reasoning=".")).decode().split("\n\n") if line]
    assert [e["choices"][0]["delta"] for e in events] == [{"reasoning_content": "."}, {"content": "A"}]
    assert enc.piece(TokenChunk("")) == b""


def test_the_fake_engine_refuses_template_inputs_by_name():
    from tests.unit.test_sampling import _chat_backend

    fake = _chat_backend("fake")
    for name, value in (("reasoning_effort", "low"), ("chat_template_kwargs", {"a": 1})):
        with pytest.raises(ValidationFailed) as err:
            fake.check_request(GenerateRequest(messages=[{"role": "user", "content": "x"}], **{name: value}))
        assert err.value.field == name
