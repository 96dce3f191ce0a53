"""The JSON-RPC 2.0 wire format of the ``/rpc`` channel: codes, envelopes, error table.

This module is the one place that knows what a request, a response, a streamed
token and an error look like between hosts (docs/RPC.md describes the same
thing for people). Both sides import it: ``rpc/server.py`` to build answers,
``rpc/client.py`` to read them.

Error mapping is by type, never by message text:

* a ``TarsError`` raised on the serving side becomes an error object whose
  ``code`` is the class's ``rpc_code`` and whose ``data`` carries
  ``{"type": kind, "details": {...}}``;
* on the calling side ``error_from_rpc`` turns that object back into an
  instance of the same class, with the same message and details, so the
  calling node's REST layer answers exactly as if the error had been raised
  locally (404 stays 404, 429 keeps its retry_after, ...).

Spec-level codes (-32700 … -32603) that reach a caller mean the two hosts
disagree about the protocol (a bug or a version mismatch); they come back as
``PeerError`` naming the peer.
"""

from __future__ import annotations

import base64
from typing import Any

import orjson

from ..errors import (
    RPC_ERROR_CLASSES,
    InputTooLong,
    ModelNotFound,
    Overloaded,
    PeerError,
    PeerUnavailable,
    TarsError,
    ValidationFailed,
)

JSONRPC = "2.0"

# --------------------------------------------------------------------------- spec codes
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603

SPEC_MESSAGES: dict[int, str] = {
    PARSE_ERROR: "Parse error",
    INVALID_REQUEST: "Invalid request",
    METHOD_NOT_FOUND: "Method not found",
    INVALID_PARAMS: "Invalid params",
    INTERNAL_ERROR: "Internal error",
}

APP_CODE_MIN, APP_CODE_MAX = -32099, -32000

# --------------------------------------------------------------------------- methods
#: Calls that change nothing on the peer, so the client may retry them on a
#: transport failure. ``inference.*`` and ``embed.encode`` are never retried:
#: a generation that reached the peer must not run twice.
IDEMPOTENT_METHODS = frozenset({"node.health", "node.info", "cluster.heartbeat", "models.list"})

STREAM_METHOD = "inference.stream"
TOKEN_METHOD = "inference.token"
NDJSON = "application/x-ndjson"

# --------------------------------------------------------------------------- error table
def _subclasses(cls: type[TarsError]) -> list[type[TarsError]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out.extend(_subclasses(sub))
    return out


#: code -> class (the first class listed for a code wins, so a shared code maps to the
#: base class). ValidationFailed owns -32602 (the spec's "invalid params").
ERROR_TABLE: dict[int, type[TarsError]] = {}
for _cls in (*RPC_ERROR_CLASSES, *_subclasses(TarsError)):
    ERROR_TABLE.setdefault(_cls.rpc_code, _cls)

#: data.type (``kind``) -> class: exact even where two classes share a code
#: (ModelNotDownloaded is a ModelNotFound with the same -32002).
KIND_TABLE: dict[str, type[TarsError]] = {c.kind: c for c in reversed(_subclasses(TarsError))}


# Attributes some subclasses keep besides message/details; restored from details.
_ATTRS = ("field", "limit", "got", "retry_after", "peer", "model", "available", "package")


def error_class(code: int) -> type[TarsError] | None:
    return ERROR_TABLE.get(code)


def error_object(exc: TarsError) -> dict[str, Any]:
    """The ``error`` member for a TarsError: code from its class, data = its to_dict()."""
    return {"code": exc.rpc_code, "message": exc.message, "data": exc.to_dict()}


def spec_error_object(code: int, data: Any = None, message: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"code": code, "message": message or SPEC_MESSAGES.get(code, "Server error")}
    if data is not None:
        out["data"] = data
    return out


def _rebuild(cls: type[TarsError], message: str, details: dict[str, Any]) -> TarsError:
    """Recreate ``cls`` with exactly the peer's message and details.

    Subclass constructors differ (ModelNotFound formats its own message,
    MissingDependency takes a package), so we bypass them and restore the
    few attributes they would have set.
    """
    exc = cls.__new__(cls)
    TarsError.__init__(exc, message, **details)
    for attr in _ATTRS:
        if attr in details:
            setattr(exc, attr, details[attr])
    if isinstance(exc, ValidationFailed) and not hasattr(exc, "field"):
        exc.field = None
    if isinstance(exc, InputTooLong):
        exc.limit = details.get("limit", 0)
        exc.got = details.get("got")
    if isinstance(exc, Overloaded) and not hasattr(exc, "retry_after"):
        exc.retry_after = 1.0
    if isinstance(exc, (PeerUnavailable, PeerError)) and not hasattr(exc, "peer"):
        exc.peer = None
    if isinstance(exc, ModelNotFound):
        exc.model = details.get("model", "")
        exc.available = list(details.get("available", []))
    return exc


def error_from_rpc(error: Any, peer: str) -> TarsError:
    """Turn a JSON-RPC error object received from ``peer`` back into a TarsError."""
    if not isinstance(error, dict) or not isinstance(error.get("code"), int):
        return PeerError(f"peer {peer} sent a malformed JSON-RPC error: {str(error)[:200]}", peer=peer)
    code: int = error["code"]
    message = str(error.get("message") or "")
    data = error.get("data")
    kind = data.get("type") if isinstance(data, dict) else None
    cls = ERROR_TABLE.get(code)
    if isinstance(kind, str):
        by_kind = KIND_TABLE.get(kind)
        if by_kind is not None and (cls is None or issubclass(by_kind, cls)):
            cls = by_kind
    if cls is not None and isinstance(data, dict) and isinstance(kind, str):
        details = data.get("details")
        return _rebuild(cls, message, dict(details) if isinstance(details, dict) else {})
    if APP_CODE_MIN <= code <= APP_CODE_MAX:
        return TarsError(message or f"peer {peer} answered error {code}", peer=peer, rpc_code=code)
    label = SPEC_MESSAGES.get(code, f"error {code}")
    extra = f": {data}" if isinstance(data, str) and data else ""
    return PeerError(f"peer {peer} answered '{label}' ({code}){extra}", peer=peer, rpc_code=code)


# --------------------------------------------------------------------------- envelopes
def request(method: str, params: Any = None, id: int | str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"jsonrpc": JSONRPC, "method": method}
    if params is not None:
        out["params"] = params
    out["id"] = id
    return out


def notification(method: str, params: Any = None) -> dict[str, Any]:
    out: dict[str, Any] = {"jsonrpc": JSONRPC, "method": method}
    if params is not None:
        out["params"] = params
    return out


def success(id: Any, result: Any) -> dict[str, Any]:
    return {"jsonrpc": JSONRPC, "result": result, "id": id}


def failure(id: Any, error: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": JSONRPC, "error": error, "id": id}


def token_notification(id: Any, text: str) -> dict[str, Any]:
    """One streamed piece: a notification that names the stream (the request id)."""
    return {"jsonrpc": JSONRPC, "method": TOKEN_METHOD, "params": {"id": id, "text": text}}


def token_line_parts(id: Any) -> tuple[bytes, bytes]:
    """(head, tail) of a plain token's NDJSON line in stream ``id``: ``head + dumps(text) + tail``
    is byte for byte ``dumps_line(token_notification(id, text))``, with the envelope encoded once."""
    line = dumps_line(token_notification(id, ""))
    cut = line.rindex(b'"text":""') + len(b'"text":')
    return line[:cut], line[cut + 2:]


_KEYS = frozenset({"jsonrpc", "method", "params", "id"})


def validate_request(obj: Any) -> None:
    """Check one request object against JSON-RPC 2.0; raise ValueError saying why.

    A hand-written equivalent of jsonrpcserver's JSON-schema check, ~50× cheaper,
    handed to its dispatcher as ``validator``.
    """
    if not isinstance(obj, dict):
        raise ValueError("a request must be a JSON object")
    if obj.get("jsonrpc") != JSONRPC:
        raise ValueError('"jsonrpc" must be exactly "2.0"')
    if not isinstance(obj.get("method"), str):
        raise ValueError('"method" must be a string')
    if "params" in obj and not isinstance(obj["params"], (list, dict)):
        raise ValueError('"params" must be an array or an object')
    if "id" in obj and not (obj["id"] is None or isinstance(obj["id"], (str, int, float))
                            and not isinstance(obj["id"], bool)):
        raise ValueError('"id" must be a string, a number or null')
    extra = set(obj) - _KEYS
    if extra:
        raise ValueError(f"unknown member(s): {', '.join(sorted(extra))}")


# --------------------------------------------------------------------------- JSON
_OPTS = orjson.OPT_SERIALIZE_NUMPY


def dumps(obj: Any) -> bytes:
    """orjson with numpy arrays serialised straight from their buffer."""
    return orjson.dumps(obj, option=_OPTS, default=_default)


def dumps_line(obj: Any) -> bytes:
    return orjson.dumps(obj, option=_OPTS | orjson.OPT_APPEND_NEWLINE, default=_default)


def loads(data: bytes | str) -> Any:
    return orjson.loads(data)


def _default(obj: Any) -> Any:
    # numpy scalars, dataclasses with to_dict, sets: the few shapes our results contain.
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__}")


# --------------------------------------------------------------------------- vectors
def vectors_to_b64(vectors: Any) -> tuple[str, list[int]]:
    """float32 matrix → (base64 of its little-endian bytes, shape). ~10× smaller/faster
    than a list of floats in JSON; used by embed.encode when asked ``encoding="base64"``."""
    import numpy as np

    arr = np.ascontiguousarray(vectors, dtype="<f4")
    return base64.b64encode(arr.tobytes()).decode("ascii"), list(arr.shape)


def vectors_from_b64(data: str, shape: list[int]) -> Any:
    import numpy as np

    arr = np.frombuffer(base64.b64decode(data), dtype="<f4")
    return arr.reshape(shape) if shape else arr
