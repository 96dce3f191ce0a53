"""Helpers shared by tests that start real servers on loopback addresses."""

from __future__ import annotations

import socket

import pytest


def free_port(host: str, ports: range, taken: set[int] | None = None) -> int:
    """A port of ``ports`` that binds on ``host`` now and is not in ``taken`` (the one
    returned is added to it, so one run never hands a port out twice). Skips the test,
    naming the range, when none is free. A probe cannot reserve the port: a server that
    binds it later may still lose it to another process."""
    for port in ports:
        if taken is not None and port in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        if taken is not None:
            taken.add(port)
        return port
    pytest.skip(f"no free port in {ports.start}-{ports.stop - 1} on {host}")
