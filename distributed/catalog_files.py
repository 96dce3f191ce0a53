"""The files a user's catalog lives in, under ``TARS_MODELS_DIR``, and every edit to them.

- ``catalog.toml``: the user's own entries (same format as the built-in ``catalog.toml``).
  Written by hand, and by ``tars models add`` / ``rm`` — which append or remove one
  ``[[model]]`` block as text, so the rest of the file (comments included) stays as it was.
- ``refs.json``: hub references resolved once (``modelref.py``): ``{"version": 1, "refs":
  {reference: ModelSpec fields}}``, so a restart knows what ``hf.co/ORG/REPO:QUANT`` means
  without asking the hub. Machine-written; ``tars models rm REF`` removes one.

Writes are atomic (temp file + rename) under an advisory lock beside the file, so the CLI
and a running node can edit the same folder. ``catalog.py`` reads and validates both; this
module only moves text and JSON.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import ConfigError

USER_FILE = "catalog.toml"
REFS_FILE = "refs.json"
_BLOCK = re.compile(r"^\s*\[\[\s*model\s*\]\]\s*(#.*)?$")


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``<path>.lock`` (no lock where fcntl does not exist)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"cannot write '{path}': {exc.strerror or exc}", file=str(path)) from None


# --------------------------------------------------------------------------- refs.json
def read_refs(path: Path) -> dict[str, dict[str, Any]]:
    """reference → spec fields; {} when the file is absent. ConfigError when it is broken."""
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        refs = doc["refs"]
        if not isinstance(refs, dict) or not all(isinstance(v, dict) for v in refs.values()):
            raise ValueError("'refs' must map each reference to its fields")
        return refs
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"the references file '{path}' cannot be read ({exc}); delete it and the references are "
                          "resolved again (the hub is asked once more)", file=str(path)) from None


def put_ref(path: Path, ref: str, fields: dict[str, Any]) -> None:
    """Remember (or replace) one resolved reference."""
    with locked(path):
        refs = read_refs(path)
        refs[ref] = fields
        _write(path, json.dumps({"version": 1, "refs": refs}, indent=2, sort_keys=True))


def drop_ref(path: Path, ref: str) -> bool:
    """Forget one reference; False when it was not there."""
    with locked(path):
        refs = read_refs(path)
        if refs.pop(ref, None) is None:
            return False
        _write(path, json.dumps({"version": 1, "refs": refs}, indent=2, sort_keys=True))
        return True


# --------------------------------------------------------------------------- catalog.toml
def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value} cannot be written to a catalog")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON's escapes are TOML basic-string escapes
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ValueError(f"{type(value).__name__} cannot be written to a catalog")


def toml_entry(fields: dict[str, Any], comment: str = "") -> str:
    """One ``[[model]]`` block (None values left out)."""
    lines = [f"# {line}" for line in comment.splitlines()] + ["[[model]]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in fields.items() if v is not None]
    return "\n".join(lines) + "\n"


def _blocks(text: str) -> list[str]:
    """The file as [preamble, block, block, ...]: each block from its ``[[model]]`` line on,
    with the comment lines right above that line (no blank line between) as its own."""
    out: list[list[str]] = []
    cur: list[str] = []
    for line in text.splitlines(keepends=True):
        if _BLOCK.match(line):
            lead: list[str] = []
            while cur and cur[-1].lstrip().startswith("#"):
                lead.insert(0, cur.pop())
            out.append(cur)
            cur = lead
        cur.append(line)
    out.append(cur)
    return ["".join(b) for b in out]


def _block_id(block: str) -> str | None:
    m = re.search(r'^\s*id\s*=\s*("(?:[^"\\]|\\.)*"|\'[^\']*\')', block, re.MULTILINE)
    if m is None:
        return None
    raw = m.group(1)
    return json.loads(raw) if raw.startswith('"') else raw[1:-1]


def add_entry(path: Path, fields: dict[str, Any], comment: str = "") -> None:
    """Append one entry to the user catalog (created when absent); ConfigError if the id is there."""
    with locked(path):
        text = path.read_text(encoding="utf-8") if path.is_file() else (
            "# Your own models (tars models add / rm edit this file; see distributed/catalog.toml for the fields).\n")
        if any(_block_id(b) == fields["id"] for b in _blocks(text)[1:]):
            raise ConfigError(f"'{fields['id']}' is already in {path}: `tars models rm {fields['id']}` first, "
                              "or choose another --id", file=str(path))
        sep = "" if text.endswith("\n\n") or not text else ("\n" if text.endswith("\n") else "\n\n")
        _write(path, text + sep + toml_entry(fields, comment))


def remove_entry(path: Path, model_id: str) -> bool:
    """Remove the entry ``model_id`` (its block, up to the next ``[[model]]``); False when absent."""
    if not path.is_file():
        return False
    with locked(path):
        blocks = _blocks(path.read_text(encoding="utf-8"))
        kept = [blocks[0]] + [b for b in blocks[1:] if _block_id(b) != model_id]
        if len(kept) == len(blocks):
            return False
        _write(path, "".join(kept))
        return True
