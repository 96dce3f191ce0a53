"""RPC workers on request, supervised, 127.0.0.1 only, behind the relay (issue 10.2).

A stand-in ``ggml-rpc-server`` (a small Python echo server that records how it was started)
keeps these tests fast and independent of the engine build; tests/e2e/test_split.py runs
the real one.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from distributed.engine.binary import EngineBinary
from distributed.errors import ConfigError, ModelFailed
from distributed.settings import load_settings
from distributed.split.relay import open_channel
from distributed.split.service import SplitService
from distributed.split.worker import WorkerPool, rpc_device
from tests.support import until

pytestmark = pytest.mark.anyio
TOKEN = "cluster-s3cret"

FAKE_RPC_SERVER = r'''#!{python}
import asyncio, json, os, sys
args = sys.argv[1:]
opts = {{args[i]: args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else True
        for i in range(len(args)) if args[i].startswith("--")}}
record = os.environ["FAKE_RPC_RECORD"]
with open(record, "a") as fh:
    fh.write(json.dumps({{"argv": args, "pid": os.getpid(), "llama_cache": os.environ.get("LLAMA_CACHE")}}) + "\n")
print("fake rpc-server starting on", opts["--host"], opts["--port"], flush=True)

async def echo(reader, writer):
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()

async def main():
    server = await asyncio.start_server(echo, opts["--host"], int(opts["--port"]))
    async with server:
        await server.serve_forever()

asyncio.run(main())
'''


@pytest.fixture
def fake_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> EngineBinary:
    rpc = tmp_path / "bin" / "ggml-rpc-server"
    rpc.parent.mkdir()
    rpc.write_text(FAKE_RPC_SERVER.format(python=sys.executable))
    rpc.chmod(rpc.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("FAKE_RPC_RECORD", str(tmp_path / "starts.jsonl"))
    return EngineBinary(server=rpc.with_name("llama-server"), rpc_server=rpc, version="0.3.36", kind="cpu",
                        build="version: test", source="test")


def starts(tmp_path: Path) -> list[dict]:
    f = tmp_path / "starts.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


def settings(tmp_path: Path, **kw):
    return load_settings(node_name="pc2", host="127.0.0.3", port=18000, cluster_token=TOKEN,
                         models_dir=tmp_path / "models", **kw)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_a_worker_listens_on_loopback_with_its_cache_under_the_models_folder(tmp_path, fake_binary) -> None:
    pool = WorkerPool(settings(tmp_path), fake_binary)
    try:
        info = await pool.start_worker("mistral-small-24b", "cuda:0", caller="pc1")
        assert info["state"] == "ready" and info["listen"].startswith("127.0.0.1:") and info["caller"] == "pc1"
        (rec,) = starts(tmp_path)
        argv = rec["argv"]
        assert argv[argv.index("--host") + 1] == "127.0.0.1" and "--cache" in argv
        assert "--device" not in argv  # a CPU build: the worker's own default device
        assert rec["llama_cache"] == str(tmp_path / "models" / "rpc-cache")
        assert pool.targets() == {"mistral-small-24b": ("127.0.0.1", int(info["listen"].rsplit(":", 1)[1]))}
        again = await pool.start_worker("mistral-small-24b", "cuda:0", caller="pc1")  # idempotent
        assert again["pid"] == info["pid"] and len(starts(tmp_path)) == 1
    finally:
        await pool.close()
    assert not alive(info["pid"]) and pool.targets() == {}


async def test_a_crashed_worker_is_restarted(tmp_path, fake_binary) -> None:
    pool = WorkerPool(settings(tmp_path), fake_binary)
    try:
        first = await pool.start_worker("m", caller="pc1")
        os.kill(first["pid"], signal.SIGKILL)
        await until(lambda: pool.info()[0]["state"] == "ready" and pool.info()[0]["pid"] != first["pid"],
                    timeout=30, what="the worker restarted")
        assert pool.info()[0]["starts"] == 2
    finally:
        await pool.close()


async def test_no_rpc_server_binary_is_a_clear_error(tmp_path, fake_binary) -> None:
    no_rpc = EngineBinary(server=fake_binary.server, rpc_server=None, version="0.3.36", kind="cpu", build="",
                          source="test")
    pool = WorkerPool(settings(tmp_path), no_rpc)
    with pytest.raises(ConfigError, match="pc2 cannot run an RPC worker.*ggml-rpc-server"):
        await pool.start_worker("m")


async def test_a_worker_that_never_comes_up_fails_with_its_last_lines(tmp_path, fake_binary,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    broken = tmp_path / "bin" / "broken"
    broken.write_text("#!/bin/sh\necho 'error: no devices found' >&2\nexit 1\n")
    broken.chmod(0o755)
    b = EngineBinary(server=fake_binary.server, rpc_server=broken, version="0.3.36", kind="cpu", build="", source="t")
    import distributed.split.worker as worker_mod

    monkeypatch.setattr(worker_mod, "READY_TIMEOUT_S", 20.0)
    monkeypatch.setattr(worker_mod, "MAX_FAILURES", 2)
    pool = WorkerPool(settings(tmp_path), b)
    try:
        with pytest.raises(ModelFailed, match="(?s)did not start.*no devices found"):
            await pool.start_worker("m")
    finally:
        await pool.close()


def test_plan_devices_map_to_llama_cpp_device_names() -> None:
    assert rpc_device("cuda:1", "cuda") == "CUDA1"
    assert rpc_device("cuda:0", "cpu") is None and rpc_device("cpu", "cuda") is None


# --------------------------------------------------------------------------- the service
async def test_worker_start_opens_the_relay_and_stop_closes_everything(tmp_path, fake_binary) -> None:
    svc = SplitService(settings(tmp_path), binary=fake_binary)
    try:
        out = await svc.worker_start("mistral-small-24b", "cuda:0", caller="pc1", version="0.3.36")
        assert out["node"] == "pc2" and out["target"] == "mistral-small-24b" and out["version"] == "0.3.36"
        port = out["relay_port"]
        assert port == 18001  # TARS_SPLIT_PORT unset: TARS_PORT + 1
        reader, writer = await open_channel("127.0.0.3", port, TOKEN, "mistral-small-24b")
        writer.write(b"tensor bytes")
        assert await asyncio.wait_for(reader.readexactly(12), 5) == b"tensor bytes"
        writer.close()
        # a raw client gets nothing from the relay
        r, w = await asyncio.open_connection("127.0.0.3", port)
        w.write(b"\x00" * 64)
        assert await asyncio.wait_for(r.read(), 5) == b""
        w.close()
        info = svc.info()
        assert info["relay"]["listen"] == f"127.0.0.3:{port}" and info["workers"][0]["model"] == "mistral-small-24b"
        pid = info["workers"][0]["pid"]
        stopped = await svc.worker_stop("mistral-small-24b")
        assert stopped["stopped"] is True and svc.relay is None and not alive(pid)
        with pytest.raises(OSError):  # nothing listens on the relay port any more
            await asyncio.open_connection("127.0.0.3", port)
        assert (await svc.worker_stop("mistral-small-24b"))["stopped"] is False
    finally:
        await svc.close()


async def test_a_llama_cpp_version_mismatch_is_refused_naming_both(tmp_path, fake_binary) -> None:
    svc = SplitService(settings(tmp_path), binary=fake_binary)
    try:
        with pytest.raises(ConfigError) as err:
            await svc.worker_start("m", caller="pc1", version="0.3.20")
        assert "pc1 runs 0.3.20" in err.value.message and "pc2 runs 0.3.36" in err.value.message
        assert starts(tmp_path) == [] and svc.relay is None
    finally:
        await svc.close()


async def test_a_busy_relay_port_is_a_clear_error(tmp_path, fake_binary) -> None:
    taken = await asyncio.start_server(lambda r, w: None, "127.0.0.3", 0)
    port = taken.sockets[0].getsockname()[1]
    svc = SplitService(settings(tmp_path, split_port=port), binary=fake_binary)
    try:
        with pytest.raises(ConfigError, match="TARS_SPLIT_PORT"):
            await svc.worker_start("m", caller="pc1")
    finally:
        await svc.close()
        taken.close()
        await taken.wait_closed()


async def test_the_rpc_methods_register_on_the_server(tmp_path, fake_binary) -> None:
    from distributed.rpc.split_methods import WorkerStartParams, register_split

    registered: dict = {}
    server = SimpleNamespace(register=lambda name, params, fn: registered.__setitem__(name, (params, fn)))
    svc = SplitService(settings(tmp_path), binary=fake_binary)
    register_split(server, svc)
    try:
        assert set(registered) == {"split.worker_start", "split.worker_stop", "split.info"}
        params, fn = registered["split.worker_start"]
        out = await fn(params(model="m", caller="pc1", version="0.3.36"))
        assert out["relay_port"] == svc.relay.port
        assert (await registered["split.info"][1](registered["split.info"][0]()))["workers"][0]["model"] == "m"
        stop_params, stop = registered["split.worker_stop"]
        assert (await stop(stop_params(model="m")))["stopped"] is True
        with pytest.raises(Exception):
            WorkerStartParams(model="../../etc", caller="x")  # a model id, not a path
    finally:
        await svc.close()


async def test_workers_of_an_engine_host_that_is_gone_are_stopped(tmp_path, fake_binary) -> None:
    gone: set[str] = set()
    asked: list[str] = []  # every time the reaper asked whether an engine host is gone

    def caller_gone(name: str) -> bool:
        asked.append(name)
        return name in gone

    svc = SplitService(settings(tmp_path), binary=fake_binary, caller_gone=caller_gone)
    svc.REAP_EVERY_S = 0.05
    try:
        await svc.worker_start("m", caller="pc1")
        await until(lambda: len(asked) >= 2, timeout=30, what="two rounds of the reaper")
        assert len(svc.pool) == 1 and asked[:2] == ["pc1", "pc1"]  # pc1 alive: kept, round after round
        gone.add("pc1")
        await until(lambda: not len(svc.pool) and svc.relay is None, timeout=30,
                    what="the worker of the gone host stopped")
    finally:
        await svc.close()
