"""End to end: a real node process serving the embedded Gemma through its llama-server child.

/health and /status while the engine starts and once it is ready (slots, engine pid),
streamed chat through it, /metrics slot gauges, the engine killed mid-stream (the SSE
stream ends with an error event, the engine comes back, the next request is served),
and SIGKILL of the node: its llama-server dies too. Skips where no llama-server is built.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from distributed.engine.binary import locate
from tests.support import ServerProcess, alive

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

HOST = "127.0.0.3"
KEY = "engine-e2e-key"
H = {"Authorization": f"Bearer {KEY}"}


def _wait(cond, timeout: float, what: str, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = cond()
        except httpx.HTTPError:
            got = None
        if got:
            return got
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}\n{tail}")


def _engine(base: str) -> dict:
    models = httpx.get(base + "/status", headers=H, timeout=5).json()["models"]
    return next(m for m in models if m["id"] == "gemma-3-270m")


@pytest.fixture(scope="module")
def node(gemma_gguf, models_dir, tmp_path_factory):
    if locate(os.environ.get("TARS_ENGINE_BIN", "")) is None:
        pytest.skip("no llama-server built (scripts/build_engine.sh)")
    env = {"TARS_API_KEY": KEY, "TARS_CONTEXT": "512", "TARS_MODELS": "gemma-3-270m", "TARS_CHAT_ENGINE": "server",
           "TARS_PARALLEL": "2", "TARS_THREADS": "1", "TARS_LOG_LEVEL": "debug"}
    if os.environ.get("TARS_ENGINE_BIN"):
        env["TARS_ENGINE_BIN"] = os.environ["TARS_ENGINE_BIN"]
    server = ServerProcess("eng", HOST, ports=range(18700, 18800), env=env, args=["--models-dir", str(models_dir)],
                           log_dir=tmp_path_factory.mktemp("engine-e2e"))
    engines: list[int] = []
    try:
        # /health may answer 503 "loading" first: the engine is still starting
        server.launch()
        first = _wait(lambda: httpx.get(server.url + "/health", timeout=2), 60, "the node to answer /health",
                      server.log)
        if first.status_code == 503:
            assert first.json()["status"] in ("loading", "ok")
        server.wait_for(server.healthy, 180, "/health 200")
        yield server.proc, server.url, server.log, engines
    finally:
        server.stop()
        for pid in engines:
            _wait(lambda: not alive(pid), 10, f"engine pid {pid} to end with the node")


def test_the_node_serves_chat_through_its_llama_server(node):
    proc, base, log, engines = node
    m = _engine(base)
    assert m["engine"]["name"] == "llama-server" and m["state"] == "ready"
    assert m["slots"]["total"] == 2 and m["context"] == 512
    pid = m["engine"]["pid"]
    engines.append(pid)
    assert alive(pid)
    with open(f"/proc/{pid}/status") as f:
        ppid = int(next(line for line in f if line.startswith("PPid:")).split()[1])
    assert ppid == proc.pid
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    assert argv[argv.index(b"--host") + 1] == b"127.0.0.1" and b"--api-key" not in argv

    r = httpx.post(base + "/v1/chat/completions", headers=H, timeout=60,
                   json={"model": "gemma-3-270m", "messages": [{"role": "user", "content": "Say hi"}],
                         "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["message"]["content"] and body["usage"]["completion_tokens"] > 0
    metrics = httpx.get(base + "/metrics", headers=H, timeout=5).text
    assert 'tars_slots_total{model="gemma-3-270m"} 2.0' in metrics
    assert "chat engine: llama-server" in log.read_text(errors="replace")


def test_engine_killed_mid_stream_error_event_then_served_again(node):
    proc, base, log, engines = node
    pid = _engine(base)["engine"]["pid"]
    events: list[str] = []
    with httpx.stream("POST", base + "/inference", headers=H, timeout=60,
                      json={"model": "gemma-3-270m", "prompt": "Tell a long story about a dog:", "max_tokens": 400,
                            "temperature": 0, "stream": True}) as resp:
        assert resp.status_code == 200
        killed = False
        for line in resp.iter_lines():
            if line.startswith("event:"):
                events.append(line.split(":", 1)[1].strip())
                if events.count("token") == 2 and not killed:
                    os.kill(pid, signal.SIGKILL)
                    killed = True
            if line.startswith("data:") and events and events[-1] == "error":
                err = json.loads(line[5:])
                assert err["type"] == "error" and "stopped answering" in err["error"]["message"]
    assert events[-1] == "error" and "done" not in events
    new = _wait(lambda: (lambda m: m["engine"]["pid"] if m["state"] == "ready" and m["engine"]["pid"] not in (None, pid)
                         else None)(_engine(base)), 120, "the engine to come back", log)
    engines.append(new)
    assert not alive(pid)
    r = httpx.post(base + "/inference", headers=H, timeout=60, json={"prompt": "Hello", "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert _engine(base)["engine"]["restarts"] == 1


def test_sigkill_of_the_node_takes_its_engine_along(node):
    proc, base, log, engines = node
    pid = _engine(base)["engine"]["pid"]
    engines.append(pid)
    os.kill(proc.pid, signal.SIGKILL)  # the node only, not its process group
    proc.wait(10)
    _wait(lambda: not alive(pid), 10, "the engine to die with its node")
