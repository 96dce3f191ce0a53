"""The one exception tree of TARS Distributed.

Every error the project raises on purpose is a ``TarsError``. Each class carries
the HTTP status it maps to and its JSON-RPC 2.0 application code, so the REST
layer and the ``/rpc`` layer translate errors *by type*, in one place each
(``api/app.py`` exception handlers, ``rpc/server.py``), never by message text.

    TarsError                      500  -32000
    ├── ConfigError                500  -32001   bad settings, presets, profiles
    ├── ValidationFailed           400  -32602   a request field is wrong (names the field)
    │   ├── InputTooLong           400  -32005   prompt longer than the context
    │   ├── ToolsUnsupported       400  -32602   the model's chat template has no tools
    │   └── UnsupportedMediaType   415  -32602   body not declared application/json
    ├── ModelNotFound              404  -32002   unknown model id (lists the known ones)
    │   ├── ModelNotDownloaded     404  -32002   known model, files not on this host (pull it)
    │   └── RefNotFound            404  -32002   a hub reference names no repo / GGUF / quant (the hub's reason)
    ├── ModelLoading               503  -32003   model exists but is not ready yet
    ├── ModelFailed                503  -32008   model failed to load
    ├── Overloaded                 429  -32004   queue full (carries retry_after)
    ├── PeerUnavailable            503  -32006   the host holding the model is gone
    ├── PeerError                  502  -32009   a peer answered with something broken
    ├── Unauthorized               401  -32007   missing or wrong token / API key
    ├── RequestTimeout             504  -32010   a request outlived its deadline
    ├── PayloadTooLarge            413  -32011   body over the configured limit
    ├── MissingDependency          500  -32012   an optional heavy library is absent
    ├── DownloadFailed             502  -32013   a model pull from the hub failed
    ├── NoRoom                     409  -32014   a model being deployed fits on no host
    └── ModelGated                 403  -32015   a hub reference names a gated repo (the hub's reason)

Foreign exceptions (httpx, llama_cpp, torch, pynvml) are translated at the
boundary of the module that owns the library.
"""

from __future__ import annotations

from typing import Any

# Most classes below are three lines of table (HTTP status, JSON-RPC code, kind): `duplicates`
# sees them as one shape repeated, which is the point of a table; only behaviour is shared.


class TarsError(Exception):
    """Base of every deliberate error. ``message`` is shown to clients as-is."""

    http_status: int = 500
    rpc_code: int = -32000
    kind: str = "internal_error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = {k: v for k, v in details.items() if v is not None}

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.kind, "message": self.message}
        if self.details:
            out["details"] = self.details
        return out


class ConfigError(TarsError):
    http_status = 500
    rpc_code = -32001
    kind = "config_error"


class ValidationFailed(TarsError):
    """A request field is wrong. ``field`` names it (dotted path)."""

    http_status = 400
    rpc_code = -32602
    kind = "invalid_request"

    def __init__(self, message: str, field: str | None = None, **details: Any) -> None:
        super().__init__(message, field=field, **details)
        self.field = field


class InputTooLong(ValidationFailed):
    rpc_code = -32005
    kind = "input_too_long"

    def __init__(self, message: str, limit: int, got: int | None = None, field: str | None = "prompt") -> None:
        super().__init__(message, field=field, limit=limit, got=got)
        self.limit = limit
        self.got = got


class ToolsUnsupported(ValidationFailed):
    """The model cannot take ``tools``: its chat template renders none (or none in a call
    format its engine reads). With ``tool_choice`` "auto" or absent a dialect answers
    without the tools instead (api/tool_drop.py); crosses /rpc by its kind."""

    kind = "tools_unsupported"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message, field="tools", **details)


class UnsupportedMediaType(ValidationFailed):
    """A state-changing request whose body is not declared ``application/json`` (HTTP 415)."""

    http_status = 415
    kind = "unsupported_media_type"


class ModelNotFound(TarsError):
    http_status = 404
    rpc_code = -32002
    kind = "model_not_found"

    def __init__(self, model: str, available: list[str]) -> None:
        known = ", ".join(sorted(available)) or "none"
        super().__init__(f"model '{model}' not found; available models: {known}",
                         model=model, available=sorted(available))
        self.model = model
        self.available = sorted(available)


class ModelNotDownloaded(ModelNotFound):
    """A catalog model whose files are not on this host yet: says how to get them."""

    kind = "model_not_downloaded"

    def __init__(self, model: str, where: str) -> None:
        TarsError.__init__(self, f"model '{model}' is in the catalog but not on disk (looked in {where}): "
                                 f"run `tars models pull {model}`", model=model, where=where)
        self.model = model
        self.available = []


class RefNotFound(ModelNotFound):
    """A hub reference (``hf.co/ORG/REPO:QUANT``) that names no repo, no GGUF or no such quant:
    the message gives the hub's reason, or the quants the repo has (``available``)."""

    kind = "ref_not_found"

    def __init__(self, message: str, model: str = "", available: list[str] | None = None, **details: Any) -> None:
        details.setdefault("field", "model")
        TarsError.__init__(self, message, model=model, available=available, **details)
        self.model = model
        self.available = list(available or [])


class ModelLoading(TarsError):
    http_status = 503
    rpc_code = -32003
    kind = "model_loading"


class ModelFailed(TarsError):
    http_status = 503
    rpc_code = -32008
    kind = "model_failed"


class Overloaded(TarsError):
    http_status = 429
    rpc_code = -32004
    kind = "overloaded"

    def __init__(self, message: str, retry_after: float = 1.0, **details: Any) -> None:
        super().__init__(message, retry_after=retry_after, **details)
        self.retry_after = retry_after


class _NamesPeer:
    """What the two peer errors share: they take, keep and report the peer's name (``peer``).
    A mixin, not a class of the tree: the error tables (rpc/protocol.py) walk TarsError's
    subclasses, and each of those is a kind of its own."""

    peer: str | None

    def __init__(self, message: str, peer: str | None = None, **details: Any) -> None:
        super().__init__(message, peer=peer, **details)  # type: ignore[call-arg]  # next in the MRO: TarsError
        self.peer = peer


class PeerUnavailable(_NamesPeer, TarsError):
    http_status = 503
    rpc_code = -32006
    kind = "peer_unavailable"


class PeerError(_NamesPeer, TarsError):
    http_status = 502
    rpc_code = -32009
    kind = "peer_error"


class Unauthorized(TarsError):
    http_status = 401
    rpc_code = -32007
    kind = "unauthorized"


class RequestTimeout(TarsError):
    http_status = 504
    rpc_code = -32010
    kind = "timeout"


class PayloadTooLarge(TarsError):
    http_status = 413
    rpc_code = -32011
    kind = "payload_too_large"


class MissingDependency(TarsError):
    http_status = 500
    rpc_code = -32012
    kind = "missing_dependency"

    def __init__(self, package: str, purpose: str, extra: str | None = None) -> None:
        hint = f"pip install {extra or package}"
        super().__init__(f"{purpose} needs the '{package}' package: install it with `{hint}`",
                         package=package)
        self.package = package


class DownloadFailed(TarsError):
    """Pulling a model from the hub failed (not found, refused, network, verification)."""

    http_status = 502
    rpc_code = -32013
    kind = "download_failed"


class NoRoom(TarsError):
    """A model being deployed fits on no host (409): the message says what it needs and
    what each host has."""

    http_status = 409
    rpc_code = -32014
    kind = "no_room"


class ModelGated(TarsError):
    """A hub reference to a gated repo this host has no access to (403): the hub's reason."""

    http_status = 403
    rpc_code = -32015
    kind = "model_gated"


# JSON-RPC application error table, documented in docs/RPC.md (keep in sync).
RPC_ERROR_CLASSES: tuple[type[TarsError], ...] = (
    TarsError, ConfigError, ValidationFailed, InputTooLong, ModelNotFound, ModelLoading,
    ModelFailed, Overloaded, PeerUnavailable, PeerError, Unauthorized, RequestTimeout,
    PayloadTooLarge, MissingDependency,
)
