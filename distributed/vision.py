"""Images in requests: which models see them, and the one check every dialect calls.

A model sees images when it has a vision projector (``ModelSpec.mmproj``: a repo's
``mmproj-*.gguf``, pulled beside the model) and runs in llama-server, which loads it with
``--mmproj``: its ``Target.info()`` then says ``"vision": true`` (``/v1/models``, ``tars ps``,
the dashboard, and peers through heartbeats).

``check_images(model, vision, messages=..., images=...)`` runs before a request is queued:

- OpenAI ``image_url`` content parts must be inline ``data:image/...;base64,...`` URLs: an
  ``http(s)`` URL is refused (the node fetches nothing on a client's behalf), and so is
  anything else that is not base64 image data;
- Ollama's ``images`` (base64 strings, per message or per request) are checked the same way;
- any image sent to a model that does not see images is a 400 saying so.

Each refusal is a ``ValidationFailed`` naming the field (``messages[1].content[0].image_url``).
The adapters call it with the resolved target: ``check_images(t.model, sees_images(t), ...)``
(``api/dialect.py``'s ``check_images(request, model, messages, images)`` does both, resolving
the target only when the request carries an image: ``image_fields`` once, then
``refuse_if_blind(model, vision, found)``, so each image is decoded once).

Images reach the engine in OpenAI's shape, whatever the dialect: a user message whose
``content`` is a list of ``{"type": "text", "text"}`` and ``{"type": "image_url",
"image_url": {"url": "data:image/...;base64,..."}}`` parts (``image_part``, ``data_url`` for
Ollama's and Anthropic's bare base64), which llama-server with ``--mmproj`` reads.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from .errors import ValidationFailed

_DATA_URL = re.compile(r"^data:(image/[A-Za-z0-9.+-]+);base64,", re.IGNORECASE)


_MAGIC = ((b"\x89PNG", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"),
          (b"RIFF", "image/webp"), (b"BM", "image/bmp"))


def data_url(data: str, media_type: str | None = None) -> str:
    """Bare base64 image data (Ollama's ``images``, Anthropic's base64 source) as a data: URL;
    without ``media_type`` the type is read from the image's first bytes (PNG if unknown)."""
    if media_type is None:
        head = data[:16]
        try:
            first = base64.b64decode(head + "=" * (-len(head) % 4))
        except (binascii.Error, ValueError):
            first = b""
        media_type = next((t for magic, t in _MAGIC if first.startswith(magic)), "image/png")
    return f"data:{media_type};base64,{data}"


def image_part(url: str) -> dict[str, Any]:
    """One image as an OpenAI content part."""
    return {"type": "image_url", "image_url": {"url": url}}


def with_images(text: str, images: list[str] | None) -> str | list[dict[str, Any]]:
    """A message's content with Ollama's base64 ``images``: the text alone when there are
    none, else the images' parts followed by the text's."""
    if not images:
        return text
    parts = [image_part(data_url(d)) for d in images]
    return [*parts, {"type": "text", "text": text}] if text else parts


def sees_images(target: Any) -> bool:
    """Whether the model behind ``target`` (local or on a peer) sees images."""
    try:
        return bool(target.info().get("vision"))
    except Exception:  # noqa: BLE001 - a target that cannot report: no vision
        return False


def check_base64(data: str, where: str) -> None:
    """``data`` is base64 (an image's bytes), or a 400 naming ``where``."""
    try:
        base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValidationFailed(f"{where}: not valid base64 image data", field=where) from None


def _image_url(part: dict[str, Any], where: str) -> None:
    raw = part.get("image_url")
    url = raw.get("url") if isinstance(raw, dict) else raw
    where = f"{where}.image_url" + (".url" if isinstance(raw, dict) else "")
    if not isinstance(url, str) or not url:
        raise ValidationFailed(f"{where}: an image_url part needs a 'url' (a data:image/...;base64,... URL)",
                               field=where)
    if url.lower().startswith(("http://", "https://")):
        raise ValidationFailed(f"{where}: image URLs are not fetched (the node fetches nothing on a client's behalf); "
                               "send the image inline as a data:image/png;base64,... URL", field=where)
    m = _DATA_URL.match(url)
    if m is None:
        raise ValidationFailed(f"{where}: an image must be a data:image/<type>;base64,<data> URL", field=where)
    check_base64(url[m.end():], where)


def image_fields(messages: list[Any] | None, images: list[Any] | None = None, where: str = "messages") -> list[str]:
    """Where the images of a request are (field paths under ``where``, the client's name for its
    messages: ``input`` for the Responses API), each checked for its form."""
    found: list[str] = []
    for i, msg in enumerate(messages or []):
        if not isinstance(msg, dict):
            continue
        content = msg.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if isinstance(part, dict) and part.get("type") in ("image_url", "input_image", "image"):
                    at = f"{where}[{i}].content[{j}]"
                    if part.get("type") in ("image_url", "input_image"):
                        _image_url(part, at)
                    found.append(at)
        for k, data in enumerate(msg.get("images") or []):  # Ollama: base64 strings on the message
            found.append(_base64_image(data, f"{where}[{i}].images[{k}]"))
    for k, data in enumerate(images or []):  # Ollama /api/generate: base64 strings on the request
        found.append(_base64_image(data, f"images[{k}]"))
    return found


def _base64_image(data: Any, where: str) -> str:
    """An Ollama image (a base64 string) checked for its form; its field path."""
    if not isinstance(data, str) or not data:
        raise ValidationFailed(f"{where}: an image must be a base64 string", field=where)
    check_base64(data, where)
    return where


def check_images(model: str, vision: bool, messages: list[Any] | None = None, images: list[Any] | None = None) -> int:
    """Refuse images a model cannot see, and images in a form the node does not take; returns
    how many images the request carries (0: nothing to check)."""
    return refuse_if_blind(model, vision, image_fields(messages, images))


def refuse_if_blind(model: str, vision: bool, found: list[str]) -> int:
    """``found`` (``image_fields``' answer, already checked for form) refused where the model
    cannot see images; how many there are."""
    if found and not vision:
        raise ValidationFailed(f"model '{model}' has no vision: it cannot read images ({found[0]}); use a model "
                               "with a vision projector (a repo with an mmproj-*.gguf, run by llama-server): "
                               "GET /v1/models shows \"vision\": true for those", field=found[0], model=model)
    return len(found)
