"""PeerClient: retries only for idempotent calls, error translation at the boundary."""

from __future__ import annotations

import json
import time

import httpx
import numpy as np
import pytest

from distributed.errors import Overloaded, PeerError, PeerUnavailable, Unauthorized
from distributed.rpc import protocol as p
from distributed.rpc.client import PeerClient

from .conftest import TOKEN

pytestmark = pytest.mark.anyio


class Peer:
    """A scripted peer: ``script`` is a list of callables (request -> Response or raise)."""

    def __init__(self, *script):
        self.script = list(script)
        self.seen: list[httpx.Request] = []
        self.times: list[float] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        self.times.append(time.monotonic())
        step = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        return step(request)

    def client(self, **kw) -> PeerClient:
        kw.setdefault("backoff_s", 0.02)
        return PeerClient("http://pc1:8000", TOKEN, transport=httpx.MockTransport(self), name="pc1", **kw)


def ok(result):
    def step(request):
        return httpx.Response(200, json=p.success(json.loads(request.content)["id"], result))
    return step


def fail(exc_type, msg="boom"):
    def step(request):
        raise exc_type(msg, request=request)
    return step


def err(exc):
    def step(request):
        return httpx.Response(200, json=p.failure(json.loads(request.content)["id"], p.error_object(exc)))
    return step


async def test_sends_a_jsonrpc_request_with_the_token():
    peer = Peer(ok({"ok": True}))
    c = peer.client()
    assert await c.call("node.health") == {"ok": True}
    r = peer.seen[0]
    assert r.url.path == "/rpc" and r.method == "POST"
    assert r.headers["authorization"] == f"Bearer {TOKEN}"
    body = json.loads(r.content)
    assert body["jsonrpc"] == "2.0" and body["method"] == "node.health" and isinstance(body["id"], int)
    await c.aclose()


@pytest.mark.parametrize("method", sorted(p.IDEMPOTENT_METHODS))
async def test_idempotent_calls_retry_with_growing_backoff(method):
    peer = Peer(fail(httpx.ConnectError), fail(httpx.ConnectTimeout), fail(httpx.ConnectError), ok("fine"))
    c = peer.client(retries=3, backoff_s=0.03)
    assert await c.call(method, {}) == "fine"
    assert len(peer.seen) == 4
    gaps = [b - a for a, b in zip(peer.times, peer.times[1:])]
    assert gaps[0] >= 0.025 and gaps[1] >= 0.055 and gaps[2] >= 0.115  # 0.03, 0.06, 0.12


async def test_retries_give_up_with_peer_unavailable_naming_the_peer():
    peer = Peer(fail(httpx.ConnectError, "[Errno 111] Connection refused"))
    c = peer.client(retries=2)
    with pytest.raises(PeerUnavailable) as ei:
        await c.call("node.health")
    assert len(peer.seen) == 3
    assert ei.value.peer == "pc1" and "pc1" in ei.value.message and "http://pc1:8000" in ei.value.message
    assert ei.value.http_status == 503


@pytest.mark.parametrize("method", ["inference.generate", "embed.encode", "cluster.join", "cluster.leave"])
async def test_non_idempotent_calls_are_never_retried(method):
    peer = Peer(fail(httpx.ConnectError), ok("late"))
    with pytest.raises(PeerUnavailable):
        await peer.client(retries=5).call(method, {})
    assert len(peer.seen) == 1


async def test_application_errors_are_not_retried_and_keep_their_type():
    peer = Peer(err(Overloaded("queue full for chat", retry_after=2.0)), ok("never"))
    with pytest.raises(Overloaded) as ei:
        await peer.client().call("node.health")
    assert ei.value.retry_after == 2.0 and ei.value.message == "queue full for chat"
    assert len(peer.seen) == 1


@pytest.mark.parametrize("exc_type, words", [
    (httpx.ReadTimeout, "did not answer in time"),
    (httpx.ConnectTimeout, "did not connect in time"),
    (httpx.RemoteProtocolError, "broke during"),
    (httpx.ReadError, "broke during"),
])
async def test_transport_errors_become_peer_unavailable(exc_type, words):
    with pytest.raises(PeerUnavailable, match=words):
        await Peer(fail(exc_type)).client().call("inference.generate", {})


async def test_401_is_unauthorized_with_a_hint():
    peer = Peer(lambda r: httpx.Response(401, json=p.failure(None, p.spec_error_object(-32007, message="no"))))
    with pytest.raises(Unauthorized, match="TARS_CLUSTER_TOKEN"):
        await peer.client().call("node.health")
    assert len(peer.seen) == 1


@pytest.mark.parametrize("response", [
    httpx.Response(502, text="<html>bad gateway</html>"),
    httpx.Response(200, json={"hello": "world"}),
    httpx.Response(200, json=[1, 2]),
    httpx.Response(200, json={"jsonrpc": "2.0", "result": 1, "id": 999999}),
])
async def test_bad_answers_are_peer_errors(response):
    with pytest.raises(PeerError) as ei:
        await Peer(lambda r: response).client().call("node.info")
    assert ei.value.peer == "pc1" and ei.value.http_status == 502


async def test_notify_and_batch():
    def batch_answer(request):
        calls = json.loads(request.content)
        return httpx.Response(200, json=[p.success(calls[1]["id"], 2), p.failure(calls[0]["id"],
                                         p.error_object(Overloaded("full")))])
    peer = Peer(lambda r: httpx.Response(204), batch_answer)
    c = peer.client()
    await c.notify("cluster.leave", {"name": "pc2"})
    assert "id" not in json.loads(peer.seen[0].content)
    out = await c.batch([("node.health", None), ("node.info", None)])
    assert isinstance(out[0], Overloaded) and out[1] == 2


async def test_embed_decodes_base64_vectors():
    vec = np.arange(6, dtype=np.float32).reshape(2, 3)

    def step(request):
        body = json.loads(request.content)
        assert body["params"] == {"input": ["a", "b"], "model": "m", "normalize": False, "encoding": "base64"}
        data, shape = p.vectors_to_b64(vec)
        return httpx.Response(200, json=p.success(body["id"], {"vectors_b64": data, "shape": shape, "node": "pc2"}))

    res = await Peer(step).client().embed(["a", "b"], model="m", normalize=False)
    np.testing.assert_array_equal(res["vectors"], vec)
    assert res["node"] == "pc2"


def ndjson(*objs, then_raise=None):
    async def body():
        for o in objs:
            yield (json.dumps(o) + "\n").encode()
        if then_raise:
            raise then_raise
    return body()


async def test_stream_yields_tokens_then_result():
    def step(request):
        rid = json.loads(request.content)["id"]
        return httpx.Response(200, headers={"content-type": p.NDJSON}, content=ndjson(
            p.token_notification(rid, "a"), p.token_notification(rid, "b"), p.success(rid, {"text": ""})))
    got = [m async for m in Peer(step).client().stream({"prompt": "x"})]
    assert [g.get("text") for g in got[:2]] == ["a", "b"] and got[2] == {"result": {"text": ""}}


async def test_stream_cut_mid_way_ends_with_peer_unavailable_not_a_hang():
    def step(request):
        rid = json.loads(request.content)["id"]
        return httpx.Response(200, headers={"content-type": p.NDJSON}, content=ndjson(
            p.token_notification(rid, "a"), then_raise=httpx.RemoteProtocolError("incomplete chunked read")))
    got = []
    with pytest.raises(PeerUnavailable, match="pc1"):
        async for m in Peer(step).client().stream({"prompt": "x"}):
            got.append(m)
    assert got == [{"id": 1, "text": "a"}]


async def test_stream_without_a_final_object_is_peer_unavailable():
    step = lambda r: httpx.Response(200, headers={"content-type": p.NDJSON}, content=ndjson(p.token_notification(1, "a")))  # noqa: E731
    with pytest.raises(PeerUnavailable, match="without a final result"):
        async for _ in Peer(step).client().stream({}):
            pass


async def test_stream_error_line_and_plain_error_answer():
    def mid(request):
        return httpx.Response(200, headers={"content-type": p.NDJSON}, content=ndjson(
            p.token_notification(1, "a"), p.failure(1, p.error_object(Overloaded("late full")))))
    with pytest.raises(Overloaded, match="late full"):
        async for _ in Peer(mid).client().stream({}):
            pass
    with pytest.raises(Overloaded, match="early"):
        async for _ in Peer(err(Overloaded("early"))).client().stream({}):
            pass


async def test_against_the_real_server_in_process(rpc_app, node):
    c = PeerClient("http://pc1", TOKEN, transport=httpx.ASGITransport(rpc_app), name="pc1")
    assert (await c.call("node.health"))["ok"] is True
    res = await c.embed(["abcd"])
    assert res["vectors"].tolist() == [[4.0, 1.0, -0.5]] and res["vectors"].dtype == np.float32
    got = [m async for m in c.stream({"prompt": "hi", "max_tokens": 2})]
    assert [g.get("text") for g in got[:2]] == ["t0 ", "t1 "] and got[-1]["result"]["node"] == "pc1"
    with pytest.raises(Unauthorized):
        await PeerClient("http://pc1", "wrong", transport=httpx.ASGITransport(rpc_app)).call("node.info")
    await c.aclose()
