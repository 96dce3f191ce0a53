"""The wire format: error table round trips, envelopes, the request validator, vectors."""

from __future__ import annotations

import numpy as np
import pytest

from distributed import errors as E
from distributed.rpc import protocol as p


def _sample(cls: type[E.TarsError]) -> E.TarsError:
    if cls is E.ModelNotFound:
        return E.ModelNotFound("nope", ["b", "a"])
    if cls is E.InputTooLong:
        return E.InputTooLong("prompt has 3000 tokens; the context is 2048", limit=2048, got=3000)
    if cls is E.Overloaded:
        return E.Overloaded("queue full for chat-a", retry_after=2.5)
    if cls in (E.PeerUnavailable, E.PeerError):
        return cls("peer pc2 is gone", peer="pc2")
    if cls is E.MissingDependency:
        return E.MissingDependency("llama-cpp-python", "GGUF chat")
    if cls.__name__ == "ModelNotDownloaded":
        return cls("big-model", "/models")
    if cls is E.ValidationFailed:
        return E.ValidationFailed("max_tokens must be > 0", field="max_tokens")
    return cls(f"a {cls.__name__}")


ALL = p._subclasses(E.TarsError)


def test_table_covers_every_error_class_with_distinct_app_codes():
    for cls in E.RPC_ERROR_CLASSES:
        assert p.ERROR_TABLE[cls.rpc_code] is cls
    codes = [c.rpc_code for c in E.RPC_ERROR_CLASSES]
    assert len(codes) == len(set(codes))
    for cls in ALL:
        assert cls.rpc_code == p.INVALID_PARAMS or p.APP_CODE_MIN <= cls.rpc_code <= p.APP_CODE_MAX
        assert p.KIND_TABLE[cls.kind] is cls


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_every_error_round_trips_to_the_same_class_message_and_details(cls):
    original = _sample(cls)
    wire = p.loads(p.dumps(p.failure(7, p.error_object(original))))
    back = p.error_from_rpc(wire["error"], "pc1")
    assert type(back) is cls
    assert back.message == original.message
    assert back.details == original.details
    assert back.http_status == original.http_status


def test_round_trip_restores_the_attributes_callers_use():
    ov = p.error_from_rpc(p.error_object(E.Overloaded("full", retry_after=3.0)), "pc1")
    assert isinstance(ov, E.Overloaded) and ov.retry_after == 3.0
    itl = p.error_from_rpc(p.error_object(E.InputTooLong("long", limit=512, got=900)), "pc1")
    assert (itl.limit, itl.got, itl.field) == (512, 900, "prompt")
    mnf = p.error_from_rpc(p.error_object(E.ModelNotFound("x", ["m2", "m1"])), "pc1")
    assert mnf.available == ["m1", "m2"] and "available models: m1, m2" in mnf.message
    pu = p.error_from_rpc(p.error_object(E.PeerUnavailable("gone", peer="pc3")), "pc1")
    assert pu.peer == "pc3"


@pytest.mark.parametrize("code", [p.PARSE_ERROR, p.INVALID_REQUEST, p.METHOD_NOT_FOUND, p.INTERNAL_ERROR])
def test_spec_errors_from_a_peer_become_peer_errors_naming_it(code):
    exc = p.error_from_rpc(p.spec_error_object(code, "details here"), "pc2")
    assert isinstance(exc, E.PeerError)
    assert exc.peer == "pc2" and "pc2" in exc.message and str(code) in exc.message


def test_untyped_invalid_params_and_unknown_app_codes_and_garbage():
    exc = p.error_from_rpc({"code": -32602, "message": "Invalid params", "data": "missing a required argument"}, "pc2")
    assert isinstance(exc, E.PeerError) and "missing a required argument" in exc.message
    other = p.error_from_rpc({"code": -32077, "message": "something new"}, "pc2")
    assert type(other) is E.TarsError and other.message == "something new"
    bad = p.error_from_rpc("not an object", "pc2")
    assert isinstance(bad, E.PeerError) and "malformed" in bad.message


def test_envelopes():
    assert p.request("node.health", None, 1) == {"jsonrpc": "2.0", "method": "node.health", "id": 1}
    assert p.request("a.b", {"x": 1}, "k")["params"] == {"x": 1}
    assert "id" not in p.notification("a.b", [1])
    assert p.success(3, {"ok": True}) == {"jsonrpc": "2.0", "result": {"ok": True}, "id": 3}
    tok = p.token_notification(9, "hi")
    assert tok == {"jsonrpc": "2.0", "method": "inference.token", "params": {"id": 9, "text": "hi"}}
    assert "id" not in tok


@pytest.mark.parametrize("obj, why", [
    ([], "JSON object"),
    ({"method": "x"}, "jsonrpc"),
    ({"jsonrpc": "1.0", "method": "x"}, "jsonrpc"),
    ({"jsonrpc": "2.0", "method": 5}, "method"),
    ({"jsonrpc": "2.0", "method": "x", "params": 3}, "params"),
    ({"jsonrpc": "2.0", "method": "x", "id": {"a": 1}}, "id"),
    ({"jsonrpc": "2.0", "method": "x", "id": True}, "id"),
    ({"jsonrpc": "2.0", "method": "x", "extra": 1}, "extra"),
])
def test_validator_rejects_and_says_why(obj, why):
    with pytest.raises(ValueError, match=why):
        p.validate_request(obj)


@pytest.mark.parametrize("obj", [
    {"jsonrpc": "2.0", "method": "x"},
    {"jsonrpc": "2.0", "method": "x", "id": None},
    {"jsonrpc": "2.0", "method": "x", "id": "s", "params": []},
    {"jsonrpc": "2.0", "method": "x", "id": 1.5, "params": {}},
])
def test_validator_accepts_valid_requests(obj):
    p.validate_request(obj)


def test_vectors_b64_round_trip_and_numpy_json():
    v = np.random.default_rng(0).standard_normal((5, 384)).astype(np.float32)
    data, shape = p.vectors_to_b64(v)
    assert shape == [5, 384]
    np.testing.assert_array_equal(p.vectors_from_b64(data, shape), v)
    back = np.asarray(p.loads(p.dumps({"v": v[:2]}))["v"], dtype=np.float32)
    np.testing.assert_array_equal(back, v[:2])  # float32 printed shortest-exact by orjson
    assert p.dumps_line({"a": 1}) == b'{"a":1}\n'


def test_docs_error_table_lists_every_class_with_its_code():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[3] / "docs" / "RPC.md").read_text()
    for cls in ALL:
        row = f"| {cls.rpc_code} | {cls.__name__} | {cls.kind} | {cls.http_status} |"
        assert row in doc, f"docs/RPC.md is missing the row {row!r}"
