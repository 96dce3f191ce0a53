"""Chat templates shipped with the package, and where a model's template comes from.

A catalog entry may name a chat template (``chat_template``) in place of the one inside
its GGUF: a shipped name (a ``<name>.jinja`` file in this folder, e.g. ``chatml-tools``:
ChatML with tools in the Hermes ``<tool_call>`` format, which SmolLM2's own template
lacks) or, in a user catalog only, a file path (resolved against that catalog file's
folder when it is read, like ``path``). Nothing else: a template is never fetched from the
network, and no request names one. The server engine gets it as ``--chat-template-file``,
the in-process engine renders it with jinja2.

API::

    names() -> list[str]                 # the shipped templates
    is_name(value) -> bool               # a shipped name, not a path
    file_of(value) -> Path               # shipped name → its file; a path as it is
    path_for(spec) -> Path | None        # the template file a ModelSpec asks for, None = the GGUF's own
    source_for(spec) -> str | None       # its text
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ConfigError

DIR = Path(__file__).parent
SUFFIX = ".jinja"


def names() -> list[str]:
    return sorted(p.name[: -len(SUFFIX)] for p in DIR.glob(f"*{SUFFIX}"))


def is_name(value: str) -> bool:
    return "/" not in value and "\\" not in value and not value.endswith(SUFFIX) and value not in ("", ".", "..")


def file_of(value: str) -> Path:
    """The file of a template value (a shipped name, or a path a user catalog gave)."""
    if is_name(value):
        path = DIR / f"{value}{SUFFIX}"
        if not path.is_file():
            raise ConfigError(f"chat template '{value}' is not one of the shipped templates "
                              f"({', '.join(names()) or 'none'})", template=value)
        return path
    return Path(value)


def path_for(spec: Any) -> Path | None:
    value = getattr(spec, "chat_template", None)
    return file_of(value) if value else None


def source_for(spec: Any) -> str | None:
    path = path_for(spec)
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"model '{spec.id}': chat template file '{path}' cannot be read: {exc.strerror or exc}",
                          template=str(path)) from None
