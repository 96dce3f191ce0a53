"""POST /rpc against the JSON-RPC 2.0 spec, the token check and the methods."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from distributed.domain import GenerateRequest
from distributed.errors import ModelNotFound, Overloaded, ValidationFailed
from distributed.rpc import protocol as p
from distributed.rpc.server import build_rpc_router, rpc_server_of
from distributed.settings import load_settings

from .conftest import TOKEN

pytestmark = pytest.mark.anyio


def req(method, params=None, id=1):
    return p.request(method, params, id)


async def post(http, body, **kw):
    content = body if isinstance(body, bytes) else json.dumps(body)
    return await http.post("/rpc", content=content, **kw)


# ----------------------------------------------------------------------------- auth
@pytest.mark.parametrize("header", [None, "Bearer wrong", f"Basic {TOKEN}", "Bearer", f"bearer {TOKEN}x"])
async def test_missing_or_wrong_token_is_401_with_a_jsonrpc_body(http, node, header):
    headers = {"authorization": header} if header else {}
    async with httpx.AsyncClient(transport=http._transport, base_url="http://pc1", headers=headers) as c:
        r = await c.post("/rpc", json=req("node.health"))
    assert r.status_code == 401
    body = r.json()
    assert body["jsonrpc"] == "2.0" and body["id"] is None
    assert body["error"]["code"] == -32007
    assert "token" in body["error"]["message"]
    assert r.headers["www-authenticate"] == "Bearer"
    assert node.calls == []


async def test_right_token_any_scheme_case_passes(http):
    r = await http.post("/rpc", json=req("node.health"), headers={"authorization": f"bearer {TOKEN}"})
    assert r.status_code == 200 and r.json()["result"]["ok"] is True


async def test_token_compare_is_constant_time(http, monkeypatch):
    from distributed import bearer

    seen = []
    real = bearer.hmac.compare_digest

    def spy(a, b):
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr(bearer.hmac, "compare_digest", spy)
    assert (await post(http, req("node.health"))).status_code == 200
    r = await http.post("/rpc", json=req("node.health"), headers={"authorization": "Basic nope"})
    assert r.status_code == 401
    assert seen == [(TOKEN.encode(), TOKEN.encode()), (b"nope", TOKEN.encode())]


async def test_node_without_a_token_accepts_nothing(node):
    from fastapi import FastAPI

    app = FastAPI()
    app.include_router(build_rpc_router(load_settings(node_name="pc1"), node))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://x",
                                 headers={"authorization": "Bearer "}) as c:
        r = await c.post("/rpc", json=req("node.health"))
    assert r.status_code == 401
    assert "no TARS_CLUSTER_TOKEN" in r.json()["error"]["message"]


# ----------------------------------------------------------------------------- spec errors
async def test_parse_error(http):
    r = await post(http, b'{"jsonrpc": "2.0", "method": "node.health", "params": [')
    assert r.status_code == 200
    body = r.json()
    assert body["error"]["code"] == -32700 and body["error"]["message"] == "Parse error"
    assert body["id"] is None


@pytest.mark.parametrize("obj", [
    {"jsonrpc": "2.0", "method": 1, "params": "bar"},
    {"jsonrpc": "1.0", "method": "node.health", "id": 1},
    {"method": "node.health", "id": 1},
    "just a string",
    5,
])
async def test_invalid_request(http, obj):
    body = (await post(http, obj)).json()
    assert body["error"]["code"] == -32600 and body["id"] is None


async def test_empty_batch_is_one_invalid_request(http):
    body = (await post(http, [])).json()
    assert isinstance(body, dict)
    assert body["error"]["code"] == -32600 and body["id"] is None


async def test_batch_of_invalid_members_answers_each(http):
    body = (await post(http, [1, 2, 3])).json()
    assert isinstance(body, list) and len(body) == 3
    assert all(b["error"]["code"] == -32600 and b["id"] is None for b in body)


async def test_invalid_batch_json_is_parse_error(http):
    raw = b'[{"jsonrpc": "2.0", "method": "node.health", "id": "1"}, {"jsonrpc": "2.0", "method"]'
    body = (await post(http, raw)).json()
    assert isinstance(body, dict) and body["error"]["code"] == -32700


async def test_method_not_found_keeps_the_id(http):
    body = (await post(http, req("no.such", {}, id="abc"))).json()
    assert body == {"jsonrpc": "2.0", "error": {"code": -32601, "message": "Method not found", "data": "no.such"},
                    "id": "abc"}


@pytest.mark.parametrize("method, params, field, text", [
    ("embed.encode", {}, "input", "missing required parameter 'input'"),
    ("embed.encode", {"input": "a string"}, "input", "valid list"),
    ("embed.encode", {"input": ["ok", 3]}, "input[1]", "parameter 'input[1]': input should be a valid string"),
    ("embed.encode", {"input": ["a"], "encoding": "hex"}, "encoding", "'float' or 'base64'"),
    # issue 11.3: empty input / groups are the caller's fault (-32602), not an internal error
    ("embed.encode", {"input": []}, "input", "at least 1 item"),
    ("embed.encode", {"input": ["a"], "groups": []}, "groups", "at least 1 item"),
    ("embed.encode", {"input": ["a"], "groups": [0]}, "groups[0]", "greater than or equal to 1"),
    ("inference.generate", {"prompt": "hi", "max_tokens": "ten"}, "max_tokens", "valid integer"),
    ("inference.generate", {"prompt": "hi", "max_tokens": True}, "max_tokens", "valid integer"),
    ("inference.generate", {"prompt": "hi", "temperatur": 0.1}, "temperatur", "unknown parameter 'temperatur'"),
    # issue 8.3: the REST bounds hold on /rpc too
    ("inference.generate", {"prompt": "hi", "max_tokens": -5}, "max_tokens", "greater than or equal to 1"),
    ("inference.generate", {"prompt": "hi", "temperature": 99}, "temperature", "less than or equal to 2"),
    ("inference.generate", {"prompt": "hi", "top_p": 0}, "top_p", "greater than 0"),
    ("inference.generate", {"prompt": "hi", "stop": ["a"] * 9}, "stop", "at most 8 items"),
    ("cluster.leave", ["pc2"], "params", "named parameters"),
    ("cluster.heartbeat", {"name": "pc2", "gpus": {"index": 0}}, "gpus", "valid list"),
    ("cluster.heartbeat", {"name": "pc2", "totals": [1]}, "totals", "valid dictionary"),
])
async def test_invalid_params_names_the_param(http, method, params, field, text):
    body = (await post(http, req(method, params))).json()
    err = body["error"]
    assert err["code"] == -32602 and body["id"] == 1
    assert text in err["message"]
    assert err["data"]["details"]["field"] == field


async def test_internal_error_leaks_no_traceback_or_exception_text(http, node):
    node.fail_with = RuntimeError("secret /home/user/path exploded")
    r = await post(http, req("inference.generate", {"prompt": "hi"}))
    err = r.json()["error"]
    assert err["code"] == -32603 and err["message"] == "Internal error"
    assert "secret" not in r.text and "Traceback" not in r.text and "RuntimeError" not in r.text
    assert "pc1" in err["data"]["message"]


@pytest.mark.parametrize("exc, code", [
    (ModelNotFound("x", ["a"]), -32002),
    (Overloaded("queue full", retry_after=4.0), -32004),
    (ValidationFailed("prompt is empty", field="prompt"), -32602),
])
async def test_application_errors_use_the_table(http, node, exc, code):
    node.fail_with = exc
    err = (await post(http, req("inference.generate", {"prompt": "hi"}))).json()["error"]
    assert err["code"] == code and err["message"] == exc.message
    assert err["data"] == exc.to_dict()


async def test_unknown_model_is_model_not_found(http):
    err = (await post(http, req("embed.encode", {"input": ["a"], "model": "ghost"}))).json()["error"]
    assert err["code"] == -32002 and err["data"]["details"]["available"] == ["chat-a", "emb-a", "far-chat"]


async def test_body_over_the_limit_is_413(http):
    r = await post(http, req("embed.encode", {"input": ["x" * 5000]}))
    assert r.status_code == 413 and r.json()["error"]["code"] == -32011


# ----------------------------------------------------------------------------- batches, notifications
async def test_mixed_batch(http, node):
    batch = [req("node.health", id=1), p.notification("embed.encode", {"input": ["n"]}),
             {"foo": "boo"}, req("no.such", id="x"), req("embed.encode", {"input": ["ab"]}, id=2)]
    body = (await post(http, batch)).json()
    assert len(body) == 4
    by_id = {}
    for b in body:
        by_id.setdefault(b["id"], []).append(b)
    assert by_id[1][0]["result"]["ok"] is True
    assert by_id["x"][0]["error"]["code"] == -32601
    assert by_id[None][0]["error"]["code"] == -32600
    assert by_id[2][0]["result"]["vectors"] == [[2.0, 1.0, -0.5]]
    assert [c.input for c in node.calls] == [["n"], ["ab"]] or sorted(c.input[0] for c in node.calls) == ["ab", "n"]


async def test_all_notification_batch_answers_nothing(http, node):
    batch = [p.notification("embed.encode", {"input": ["a"]}), p.notification("node.health")]
    r = await post(http, batch)
    assert r.status_code == 204 and r.content == b""
    assert len(node.calls) == 1  # the notification still ran


async def test_single_notification_answers_nothing_even_on_error(http, node):
    r = await post(http, p.notification("embed.encode", {"input": ["a"]}))
    assert r.status_code == 204 and r.content == b""
    r = await post(http, p.notification("no.such"))
    assert r.status_code == 204 and r.content == b""
    assert len(node.calls) == 1


# ----------------------------------------------------------------------------- methods
async def test_node_info_and_models_list(http):
    info = (await post(http, req("node.info"))).json()["result"]
    assert info["name"] == "pc1" and info["version"] and info["role"] == "server"
    assert len(info["models"]) == 3
    local = (await post(http, req("models.list", {"local": True}))).json()["result"]
    assert [m["id"] for m in local] == ["chat-a", "emb-a"]


async def test_membership_methods_without_a_cluster_say_so(http):
    err = (await post(http, req("cluster.leave", {"name": "pc9"}))).json()["error"]
    assert "no cluster layer" in err["message"]


def with_cluster(node) -> httpx.AsyncClient:
    """A client of the /rpc router of ``node`` with a real Cluster layer (membership methods)."""
    from fastapi import FastAPI

    from distributed.cluster import Cluster

    settings = load_settings(node_name="pc1", cluster_token=TOKEN)
    app = FastAPI()
    app.include_router(build_rpc_router(settings, node, Cluster(node, settings)))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://pc1",
                             headers={"authorization": f"Bearer {TOKEN}"})


async def test_the_router_serves_the_methods_of_the_cluster_it_is_given(node):
    http = with_cluster(node)
    assert (await post(http, req("cluster.leave", {"name": "pc9"}))).json()["result"] == {"ok": True, "known": False}
    beat = (await post(http, req("cluster.heartbeat", {"name": "pc9", "url": "http://x"}))).json()["result"]
    assert beat == {"known": False, "name": "pc1"}  # the server tells an unknown host to join
    err = (await post(http, req("cluster.join", {"name": "pc1", "url": "http://x", "profile": {}}))).json()["error"]
    assert err["code"] == -32602 and "TARS_NODE_NAME" in err["message"]


async def test_membership_methods_ignore_unknown_params_from_newer_peers(node):
    """A newer peer may send more than this version knows: it still joins, beats and leaves."""
    http = with_cluster(node)
    beat = (await post(http, req("cluster.heartbeat", {"name": "pc9", "url": "http://x", "gpus": [],
                                                       "totals": {"requests": 1}, "ram": None,
                                                       "from_the_future": {"x": 1}}))).json()
    assert beat["result"] == {"known": False, "name": "pc1"}
    left = (await post(http, req("cluster.leave", {"name": "pc9", "reason": "shutdown"}))).json()
    assert left["result"] == {"ok": True, "known": False}
    # ... while every other method still refuses a parameter it does not know
    err = (await post(http, req("models.list", {"local": True, "extra": 1}))).json()["error"]
    assert err["code"] == -32602 and err["data"]["details"]["field"] == "extra"


async def test_generate(http, node):
    res = (await post(http, req("inference.generate", {"prompt": "abc", "max_tokens": 5, "stop": ["x"]}))).json()
    assert res["result"]["text"] == "cba" and res["result"]["node"] == "pc1"
    sent = node.calls[0]
    assert isinstance(sent, GenerateRequest) and sent.model == "chat-a" and sent.stop == ["x"] and not sent.stream


async def test_forwarded_call_for_a_model_routed_elsewhere_is_not_forwarded_again(http, node):
    err = (await post(http, req("inference.generate", {"prompt": "a", "model": "far-chat"}))).json()["error"]
    assert err["code"] == -32003 and "pc2" in err["message"]
    assert node.calls == []


async def test_embed_float_and_base64(http):
    res = (await post(http, req("embed.encode", {"input": ["a", "abc"]}))).json()["result"]
    assert res["vectors"] == [[1.0, 1.0, -0.5], [3.0, 1.0, -0.5]] and res["node"] == "pc1"
    res = (await post(http, req("embed.encode", {"input": ["a", "abc"], "encoding": "base64"}))).json()["result"]
    assert p.vectors_from_b64(res["vectors_b64"], res["shape"]).tolist() == [[1.0, 1.0, -0.5], [3.0, 1.0, -0.5]]


# ----------------------------------------------------------------------------- streaming
def lines(r):
    return [json.loads(x) for x in r.text.splitlines() if x]


async def test_stream_is_ndjson_tokens_then_the_result(http):
    r = await post(http, req(p.STREAM_METHOD, {"prompt": "hi", "max_tokens": 3}, id=42))
    assert r.headers["content-type"].startswith(p.NDJSON)
    out = lines(r)
    assert [o["params"]["text"] for o in out[:-1]] == ["t0 ", "t1 ", "t2 "]
    assert all(o["method"] == "inference.token" and "id" not in o and o["params"]["id"] == 42 for o in out[:-1])
    assert out[-2]["params"]["finish_reason"] == "length"
    assert out[-1]["id"] == 42 and out[-1]["result"]["usage"]["completion_tokens"] == 3


async def test_stream_error_before_first_token_is_a_plain_jsonrpc_error(http, node):
    node.fail_with = Overloaded("queue full", retry_after=1.5)
    r = await post(http, req(p.STREAM_METHOD, {"prompt": "hi"}, id=5))
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]["code"] == -32004 and r.json()["id"] == 5
    r = await post(http, req(p.STREAM_METHOD, {"prompt": "hi", "max_tokens": -1.5}, id=6))
    assert r.json()["error"]["code"] == -32602 and r.json()["error"]["data"]["details"]["field"] == "max_tokens"


async def test_stream_error_mid_way_ends_with_an_error_object(http, node):
    out = lines(await post(http, req(p.STREAM_METHOD, {"prompt": "boom", "max_tokens": 5}, id=8)))
    assert [o["params"]["text"] for o in out[:-1]] == ["t0 ", "t1 "]
    assert out[-1]["id"] == 8 and out[-1]["error"]["code"] == -32004
    assert node.stream_closed.is_set()


async def test_stream_in_a_batch_is_refused(http):
    body = (await post(http, [req(p.STREAM_METHOD, {"prompt": "x"}, id=1)])).json()
    assert body[0]["error"]["code"] == -32600 and "alone" in body[0]["error"]["data"]


async def test_caller_going_away_stops_the_generation(node):
    server = rpc_server_of(build_rpc_router(load_settings(node_name="pc1", cluster_token=TOKEN), node).routes)
    agen = node.stream(GenerateRequest(model="chat-a", prompt="slow", max_tokens=100))
    first = await agen.__anext__()
    lines_ = server._lines(1, first, agen)
    assert b"t0" in await lines_.__anext__()
    await lines_.aclose()  # what Starlette does when the client disconnects
    assert node.stream_closed.is_set()


async def test_a_generate_whose_caller_disconnects_stops_generating(node):
    """Issue 11.5: a non-streamed inference.generate is cancelled when its caller goes
    (the slot is freed), as REST already does."""
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def slow(req, *, here=False):
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    node.generate = slow
    server = rpc_server_of(build_rpc_router(load_settings(node_name="pc1", cluster_token=TOKEN), node).routes)
    body = json.dumps(req("inference.generate", {"prompt": "long"})).encode()
    gone = asyncio.Event()
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        if messages:
            return messages.pop(0)
        await gone.wait()
        return {"type": "http.disconnect"}

    scope = {"type": "http", "method": "POST", "path": "/rpc", "headers": [(b"authorization", f"Bearer {TOKEN}".encode())],
             "query_string": b""}
    from starlette.requests import Request

    answer = asyncio.ensure_future(server.handle(Request(scope, receive)))
    await asyncio.wait_for(started.wait(), 2)
    gone.set()  # the caller hangs up
    await asyncio.wait_for(cancelled.wait(), 2)
    assert (await asyncio.wait_for(answer, 2)).status_code == 499


def test_rpc_generate_params_cover_every_generate_request_field():
    """The /rpc model and the domain request must not drift apart (a field added to one
    and not the other would be refused on the wire or silently dropped)."""
    import dataclasses

    from distributed.domain import GenerateRequest
    from distributed.requests import GenerateParams

    assert set(GenerateParams.model_fields) == {f.name for f in dataclasses.fields(GenerateRequest)} - {"stream"}


@pytest.mark.parametrize("body, field", [({"prompt": "hi", "max_tokens": -5}, "max_tokens"),
                                         ({"prompt": "hi", "temperature": 99}, "temperature")])
async def test_rest_refuses_what_rpc_refuses(body, field):
    """One set of rules: the REST schema refuses the same values, naming the same field."""
    from distributed.api import schemas
    from distributed.errors import ValidationFailed as VF

    with pytest.raises(VF) as ei:
        schemas.parse(schemas.InferenceRequest, json.dumps(body).encode())
    assert ei.value.details["field"] == field


def test_membership_params_carry_every_parameter_of_the_cluster_handlers():
    """A parameter the cluster's handler takes but the /rpc model drops would be ignored
    silently (membership models ignore unknown params): keep them in step."""
    import inspect

    from distributed.cluster import Cluster
    from distributed.requests import HeartbeatParams, JoinParams, LeaveParams

    for model, handler in ((JoinParams, Cluster.handle_join), (HeartbeatParams, Cluster.handle_heartbeat),
                           (LeaveParams, Cluster.handle_leave)):
        wanted = set(inspect.signature(handler).parameters) - {"self"}
        assert set(model.model_fields) == wanted, (model.__name__, wanted ^ set(model.model_fields))


async def test_embed_encode_is_capped_like_rest_per_request_and_per_coalesced_call(node):
    """issue 11.3: TARS_EMBED_MAX_INPUTS holds on /rpc too; a coalesced call may carry one
    embedding batch (TARS_EMBED_MAX_BATCH) beyond it, what a sender's coalescer sends."""
    from fastapi import FastAPI

    settings = load_settings(node_name="pc1", cluster_token=TOKEN, embed_max_inputs=3, embed_max_batch=5)
    app = FastAPI()
    app.include_router(build_rpc_router(settings, node))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://pc1",
                                 headers={"authorization": f"Bearer {TOKEN}"}) as c:
        ok = (await post(c, req("embed.encode", {"input": ["a"] * 3}))).json()
        assert len(ok["result"]["vectors"]) == 3
        coalesced = (await post(c, req("embed.encode", {"input": ["a"] * 5, "groups": [3, 2]}))).json()
        assert coalesced["result"]["group_tokens"] == [3, 2]
        calls = len(node.calls)
        for params, got, most in (({"input": ["a"] * 4}, 4, 3),
                                  ({"input": ["a"] * 4, "groups": [4]}, 4, 3),
                                  ({"input": ["a"] * 6, "groups": [3, 3]}, 6, 5)):
            err = (await post(c, req("embed.encode", params))).json()["error"]
            assert err["code"] == -32602, params
            assert f"{got} texts" in err["message"] and f"at most {most} (TARS_EMBED_MAX_INPUTS)" in err["message"]
            assert err["data"]["details"]["field"] == "input" and err["data"]["details"]["limit"] == most
        assert len(node.calls) == calls  # refused before any encoding
