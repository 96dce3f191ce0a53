"""The floor of one streaming hop on this machine (issue 18.4's context): a process woken for
each small message on one socket and writing it on to another, with uvloop and bare
protocols — no asyncio streams, no generators, no HTTP. A producer process sends a 200-byte
message every 7.5 ms (a 130 tokens/s engine); a sink process reads them. Reported: this
process's CPU (scheduler run time, ns) per message — what any hop of a token costs here before
a line of our code or of the HTTP server runs.

    .venv/bin/python -m benchmarks.bench_hop_floor [--messages 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from pathlib import Path

import uvloop

PRODUCER = r'''
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
for _ in range(int(sys.argv[2])):
    s.sendall(b"d" * 200)
    time.sleep(0.0075)
s.close()
'''
SINK = r'''
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
while s.recv(65536):
    pass
'''


def cpu_s() -> float:
    return sum(int((t / "schedstat").read_text().split()[0]) for t in Path("/proc/self/task").iterdir()) / 1e9


async def hop(messages: int) -> float:
    loop = asyncio.get_running_loop()
    out_ready: asyncio.Future[asyncio.Transport] = loop.create_future()
    done: asyncio.Future[None] = loop.create_future()
    out: list[asyncio.Transport] = []

    class Out(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            out_ready.set_result(transport)  # type: ignore[arg-type]

    class In(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            out[0].write(data)

        def connection_lost(self, exc: Exception | None) -> None:
            done.set_result(None)

    srv_out = await loop.create_server(Out, "127.0.0.1", 0)
    srv_in = await loop.create_server(In, "127.0.0.1", 0)
    sink = subprocess.Popen([sys.executable, "-c", SINK, str(srv_out.sockets[0].getsockname()[1])])
    producer = None
    try:
        out.append(await out_ready)
        t0 = cpu_s()
        producer = subprocess.Popen([sys.executable, "-c", PRODUCER, str(srv_in.sockets[0].getsockname()[1]),
                                     str(messages)])
        await done
        used = cpu_s() - t0
    finally:
        out[0].close() if out else None
        srv_out.close()
        srv_in.close()
        await asyncio.sleep(0.2)  # the sink sees the end
        for proc in (producer, sink):
            if proc is not None:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
    return used / messages


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=1000)
    n = ap.parse_args().messages
    t0 = time.perf_counter()
    per = uvloop.run(hop(n))
    print(f"one hop, bare uvloop protocols: {per * 1e6:.1f} us CPU per message ({n} messages, "
          f"{time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
