"""What every dialect's route does the same way: document its request model for
``/openapi.json``, and run one generation (whole or streamed) through the node with the
tools fallback (``tool_drop``) and a client that may go away (``ClientGone`` → 499).

API::

    body_doc(model) -> dict                              # a route's openapi_extra
    await complete(request, req) -> (Completion, reason)
    await open_stream(request, req) -> (first, agen, reason)   # first item already read
    model_of(request, req, first) -> str                 # the model a stream answers with
    check_images(request, model, messages, images=None)  # images reach only a model that sees them
    await read(request, model) -> (body, req)            # the body parsed, its domain request labelled
    await answer(request, req, stream, whole) -> Response      # all of the above, in the dialect's shapes
    log_labels(model, labels)                            # the client's bookkeeping labels, logged
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar, cast

from fastapi import Request
from pydantic import BaseModel
from starlette.responses import Response

from .. import vision
from ..domain import Completion, GenerateRequest
from ..logs import fields, get_logger
from . import schemas as s
from . import tool_drop
from .native import JSON, label
from .streaming import ClientGone, EventStream, drain, first_item, until_disconnect

log = get_logger(__name__)


class _ToDomain(Protocol):
    def to_domain(self) -> GenerateRequest: ...


_B = TypeVar("_B", bound=BaseModel)  # a dialect's request body, which has a to_domain() too


def body_doc(model: type) -> dict[str, Any]:
    """The ``requestBody`` of a route that reads its body itself (one pydantic pass)."""
    return {"requestBody": {"content": {"application/json": {
        "schema": model.model_json_schema(ref_template="#/components/schemas/{model}")}}}}  # type: ignore[attr-defined]


async def read(request: Request, model: type[_B]) -> tuple[_B, GenerateRequest]:
    """The request's body as ``model`` (ValidationFailed naming the field), and the domain
    request it becomes, its model named for the metrics."""
    r = s.parse(model, await request.body())
    req = cast(_ToDomain, r).to_domain()
    label(request, req.model)
    return r, req


async def complete(request: Request, req: GenerateRequest) -> tuple[Completion, str | None]:
    node = request.app.state.node
    return await tool_drop.attempt(req, lambda q: until_disconnect(request.receive, node.generate(q)))


async def open_stream(request: Request, req: GenerateRequest) -> tuple[Any, Any, str | None]:
    node = request.app.state.node

    async def start(q: GenerateRequest) -> tuple[Any, Any]:
        agen = node.stream(q)
        return await first_item(request.receive, agen), agen

    (first, agen), dropped = await tool_drop.attempt(req, start)
    return first, agen, dropped


def model_of(request: Request, req: GenerateRequest, first: Any) -> str:
    return getattr(first, "model", None) or request.app.state.node.resolve(req.model, "chat").model


def check_images(request: Request, model: str | None, messages: list[Any] | None,
                 images: list[Any] | None = None, where: str = "messages") -> int:
    """``vision.check_images`` on the request as the client sent it (so a refusal names the
    client's field): each image's form first (inline base64 only; an http(s) URL is refused),
    then, only when there is one, the chat model ``model`` resolves to (404 if unknown) must
    see images (a 400 saying it has no vision). Returns how many images there are."""
    found = vision.image_fields(messages, images, where)  # each image decoded once, here
    if not found:
        return 0
    target = request.app.state.node.resolve(model, "chat")
    return vision.refuse_if_blind(target.model, vision.sees_images(target), found)


async def answer(request: Request, req: GenerateRequest, stream: Callable[[str], Any],
                 whole: Callable[[Completion, str | None], Any]) -> Response:
    """A dialect's answer to ``req``: its event stream, formatted by ``stream(model)``, or the
    JSON body ``whole(completion, dropped)``; the tools-dropped header either way (``dropped``
    says why, or is None), and 499 for a client that left first."""
    try:
        if req.stream:
            first, agen, dropped = await open_stream(request, req)
            model = model_of(request, req, first)
            label(request, model)
            return EventStream(drain(first, agen, stream(model)), tool_drop.headers(dropped))
        c, dropped = await complete(request, req)
    except ClientGone:
        return Response(status_code=499)
    label(request, c.model)
    return JSON(whole(c, dropped), headers=tool_drop.headers(dropped))


def log_labels(model: str | None, labels: dict[str, Any]) -> None:
    """Labels a request carries for the client's own bookkeeping: logged, nothing else."""
    if labels:
        log.info("request labelled", extra=fields(model=model, **labels))
