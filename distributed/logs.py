"""Structured logging. Every record says which host did it (``node``).

``text``: ``2026-11-22T10:00:00 INFO  pc1 cluster: peer pc2 joined rtt_ms=1.2``
``json``: one object per line: {"ts", "level", "node", "logger", "msg", ...extra}

Use ``log = get_logger(__name__)`` and pass fields with ``extra={"peer": ..}``
or through ``log.info("...", extra=fields(peer="pc2"))``.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

_NODE = "-"
_CONTROL = {i: f"\\x{i:02x}" for i in [*range(0x20), 0x7F, 0x85]} | {0x2028: "\\u2028", 0x2029: "\\u2029"}
_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def fields(**kw: Any) -> dict[str, Any]:
    return {"fields": kw}


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}",
            "level": record.levelname.lower(),
            "node": _NODE,
            "logger": record.name.removeprefix("distributed."),
            "msg": record.getMessage(),
        }
        out.update(getattr(record, "fields", {}) or {})
        for k, v in record.__dict__.items():
            if k not in _RESERVED and k != "fields":
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        extra = dict(getattr(record, "fields", {}) or {})
        extra.update({k: v for k, v in record.__dict__.items() if k not in _RESERVED and k != "fields"})
        tail = "".join(f" {k}={v}" for k, v in extra.items())
        # one record = one line: control characters (a newline in a peer's name ...) are escaped in
        # our records; uvicorn's own (a startup traceback in the message) stay as they are
        text = f"{record.getMessage()}{tail}"
        if record.name.startswith("distributed"):
            text = text.translate(_CONTROL)
        line = f"{ts} {record.levelname:<5} {_NODE} {record.name.removeprefix('distributed.')}: {text}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure(node: str, level: str = "info", fmt: str = "text") -> None:
    global _NODE
    _NODE = node
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    root = logging.getLogger("distributed")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    for name in ("uvicorn", "uvicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers[:] = [handler]
        lg.propagate = False
    logging.getLogger("uvicorn.access").disabled = True  # we log requests ourselves, with the node


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name if name.startswith("distributed") else f"distributed.{name}")
