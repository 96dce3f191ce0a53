"""The optional second listener on Ollama's port (``TARS_OLLAMA_PORT``, off by default).

Some apps talk only to ``http://localhost:11434`` and cannot be told another port. With
``TARS_OLLAMA_PORT=11434`` the node serves the *same* app there too, on ``TARS_HOST``:
one uvicorn server with two listening sockets (uvicorn's ``Server.run(sockets=...)``),
so the same guards, API key, connection bound and TLS apply to both. ``/`` on that port
answers "Ollama is running" (api/ollama.py), as Ollama does.

A port another program holds (Ollama itself, usually) stops start-up with a message
saying so, exit code 1 — as the node's own port does.
"""

from __future__ import annotations

import socket
import sys
from typing import Any


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on ``host:port`` (IPv6 when ``host`` has a colon)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def sockets(config: Any, settings: Any, log: Any) -> list[socket.socket] | None:
    """None when ``TARS_OLLAMA_PORT`` is 0 (uvicorn binds ``TARS_HOST:TARS_PORT`` itself as
    always); else the node's socket (uvicorn's ``Config.bind_socket``) and the Ollama one."""
    port = settings.ollama_port
    if not port:
        return None
    scheme = "https" if settings.tls_cert else "http"
    if port == settings.port:
        log.error("TARS_OLLAMA_PORT=%d is the node's own port (TARS_PORT): give another (11434) or 0", port)
        sys.exit(1)
    main = config.bind_socket()  # logs and exits on failure, as uvicorn's own bind does
    try:
        extra = bind(settings.host, port)
    except OSError as exc:
        main.close()
        log.error("TARS_OLLAMA_PORT=%d: cannot listen on %s:%d (%s); is Ollama itself running there? Stop it, "
                  "or set TARS_OLLAMA_PORT to another port or 0", port, settings.host, port, exc.strerror or exc)
        sys.exit(1)
    log.info("also listening on %s://%s:%d for apps that expect Ollama (TARS_OLLAMA_PORT)", scheme,
             settings.host, port)
    return [main, extra]
