"""The second listener on Ollama's port (cli/ollama_port.py)."""

from __future__ import annotations

import logging
import socket

import pytest

from distributed.cli import ollama_port
from distributed.settings import load_settings

HOST = "127.0.0.2"


class Config:
    """uvicorn's Config.bind_socket, for the node's own port."""

    def __init__(self, port: int) -> None:
        self.port = port

    def bind_socket(self) -> socket.socket:
        return ollama_port.bind(HOST, self.port)


def free() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def test_off_by_default_leaves_uvicorn_to_bind():
    settings = load_settings(None, host=HOST)
    assert settings.ollama_port == 0
    assert ollama_port.sockets(Config(1), settings, logging.getLogger("t")) is None


def test_two_sockets_when_set(caplog):
    main, extra = free(), free()
    settings = load_settings(None, host=HOST, port=main, ollama_port=extra)
    with caplog.at_level(logging.INFO):
        socks = ollama_port.sockets(Config(main), settings, logging.getLogger("t"))
    try:
        assert [s.getsockname() for s in socks] == [(HOST, main), (HOST, extra)]
        assert f"also listening on http://{HOST}:{extra}" in caplog.text
    finally:
        for s in socks:
            s.close()


def test_a_taken_port_stops_start_up_saying_so(caplog):
    main = free()
    with socket.socket() as holder:
        holder.bind((HOST, 0))
        holder.listen()
        taken = holder.getsockname()[1]
        settings = load_settings(None, host=HOST, port=main, ollama_port=taken)
        with pytest.raises(SystemExit) as exc:
            ollama_port.sockets(Config(main), settings, logging.getLogger("t"))
    assert exc.value.code == 1 and "is Ollama itself running there" in caplog.text
    settings = load_settings(None, host=HOST, port=main, ollama_port=main)
    with pytest.raises(SystemExit):
        ollama_port.sockets(Config(main), settings, logging.getLogger("t"))
    assert "the node's own port" in caplog.text
