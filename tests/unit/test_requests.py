"""Every chat parameter survives the trip to another host: RemoteTarget's params →
the /rpc method's parameter check → the GenerateRequest the peer computes."""

from __future__ import annotations

from distributed.domain import Completion, GenerateRequest, TokenChunk
from distributed.requests import GenerateParams, parse_params


def _through_rpc(req: GenerateRequest) -> GenerateRequest:
    params = req.to_rpc()
    params.pop("stream")
    return parse_params(GenerateParams, "inference.generate", params).to_domain(stream=False)


def test_every_surface_field_is_forwarded():
    req = GenerateRequest(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=9, temperature=0.1,
                          top_p=0.5, stop=["x"], seed=3, presence_penalty=0.4, frequency_penalty=-0.2,
                          response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": {}}},
                          tools=[{"type": "function", "function": {"name": "f"}}],
                          tool_choice={"type": "function", "function": {"name": "f"}}, parallel_tool_calls=False,
                          logprobs=True, top_logprobs=4)
    assert _through_rpc(req) == req
    every = {f for f in GenerateRequest.__dataclass_fields__ if f != "stream"}
    assert every <= set(GenerateParams.model_fields)


def test_defaults_stay_off_the_wire_for_older_peers():
    req = GenerateRequest(prompt="hi")
    sent = req.to_rpc()
    assert not set(GenerateRequest._SURFACE) & set(sent)
    assert _through_rpc(req) == req


def test_answers_keep_tool_calls_and_logprobs():
    lp = [{"token": "a", "logprob": -0.1, "bytes": [97], "top_logprobs": []}]
    call = [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    c = Completion(model="m", node="pc1", text="", finish_reason="tool_calls", tool_calls=call, logprobs=lp)
    assert Completion.from_dict(c.to_dict()) == c
    chunk = TokenChunk("a", logprobs=lp)
    assert TokenChunk.from_dict(chunk.to_dict()) == chunk
