"""Tools a model cannot take, when the client left the choice to the model.

Apps send tools with every chat: Open WebUI its 36 built-in ones (memory, notes, calendar,
knowledge), without a ``tool_choice``. A model whose chat template renders no tools
(``ToolsUnsupported``), or whose context the tools do not fit beside the messages
(``InputTooLong``), cannot take them. With ``tool_choice`` "auto" (or absent) the model may
answer without calling a tool anyway, so that is what it does: the request runs again
without the tools, the answer says so in the ``x-tars-tools-dropped`` header (and in its
``notes``) and the node's log names the reason. With "required" or a named tool the
client asked for a call: the 400 stands.

Every dialect runs its generation through ``attempt``: the drop happens wherever the model
is computed (this host or a peer: the refusal crosses /rpc by its kind).

API::

    await attempt(req, call) -> (result, reason | None)   # call(GenerateRequest) -> awaitable
    headers(reason) -> dict                                # {"x-tars-tools-dropped": ...} or {}
    HEADER
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ..domain import GenerateRequest
from ..errors import InputTooLong, ToolsUnsupported
from ..logs import fields, get_logger

log = get_logger(__name__)
T = TypeVar("T")
HEADER = "x-tars-tools-dropped"


def reason(req: GenerateRequest, exc: Exception) -> str | None:
    """Why ``req``'s tools are dropped after ``exc``, or None when they are not."""
    if not req.tools or req.tool_choice not in (None, "auto"):
        return None
    if isinstance(exc, ToolsUnsupported):
        return f"template: {exc.message}"
    if isinstance(exc, InputTooLong):
        return (f"context: the {len(req.tools)} tools and the messages do not fit the context of {exc.limit} "
                "tokens together")
    return None


def without_tools(req: GenerateRequest) -> GenerateRequest:
    return dataclasses.replace(req, tools=None, tool_choice=None, parallel_tool_calls=True)


async def attempt(req: GenerateRequest, call: Callable[[GenerateRequest], Awaitable[T]]) -> tuple[T, str | None]:
    """``call(req)``; when the model cannot take the tools the client let it choose from,
    ``call`` again without them. Returns the result and the reason they were dropped."""
    try:
        return await call(req), None
    except (ToolsUnsupported, InputTooLong) as exc:
        why = reason(req, exc)
        if why is None:
            raise
    log.warning("answering without the %d tools the request carried (tool_choice %s): %s", len(req.tools or ()),
                req.tool_choice or "absent", why, extra=fields(model=req.model, tools_dropped=why.split(":", 1)[0]))
    return await call(without_tools(req)), why


def headers(why: str | None) -> dict[str, str]:
    """The response header that says the tools were dropped, and why (ASCII, one line)."""
    if not why:
        return {}
    text = why.encode("ascii", "replace").decode("ascii").replace("\r", " ").replace("\n", " ")
    return {HEADER: text[:300]}


def note(completion: Any, why: str | None) -> None:
    """Say it in the answer's notes too (a client reading the body, not the headers)."""
    if why and hasattr(completion, "notes"):
        completion.notes.append(f"tools dropped ({why})")
