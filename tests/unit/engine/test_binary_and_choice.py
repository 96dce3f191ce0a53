"""Engine binary discovery (override, build cache by version and kind) and the engine choice."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from distributed.engine import binary, choice
from distributed.settings import load_settings


def _fake_server(folder: Path, version_text: str = "version: 42 (abc123)\nbuilt with cc for x86_64") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    exe = folder / "llama-server"
    exe.write_text(f"#!/bin/sh\ncat >&2 <<'EOF'\n{version_text}\nEOF\n")
    exe.chmod(0o755)
    return exe


def test_override_file_or_folder(tmp_path):
    exe = _fake_server(tmp_path / "bin")
    for given in (str(exe), str(exe.parent)):
        b = binary.locate(given)
        assert b is not None and b.server == exe and b.source == "TARS_ENGINE_BIN"
        assert b.build == "version: 42 (abc123); built with cc for x86_64"
        assert b.rpc_server is None
    assert binary.locate(str(tmp_path / "nope")) is None
    assert "is not an executable llama-server" in binary.why_not(str(tmp_path / "nope"))


def test_cache_by_version_and_kind(tmp_path, monkeypatch):
    monkeypatch.setenv("TARS_ENGINE_CACHE", str(tmp_path))
    monkeypatch.setattr(binary, "llama_cpp_python_version", lambda: "9.9.9")
    monkeypatch.setattr(binary, "llama_cpp_python_kind", lambda: "cuda")
    assert binary.locate() is None
    assert "no llama-server built for llama-cpp-python 9.9.9 (cuda)" in binary.why_not()
    assert "build_engine.sh --kind cuda" in binary.why_not()
    cpu = _fake_server(tmp_path / "9.9.9-cpu" / "bin")
    (cpu.parent / "ggml-rpc-server").write_text("")
    b = binary.locate()
    assert b is not None and b.kind == "cpu" and b.version == "9.9.9" and b.rpc_server == cpu.parent / "ggml-rpc-server"
    cuda = _fake_server(tmp_path / "9.9.9-cuda" / "bin")
    assert binary.locate().server == cuda  # the same kind as llama-cpp-python first
    assert "9.9.9" in binary.locate().describe() and "cuda" in binary.locate().to_dict()["kind"]


def test_decide_follows_tars_chat_engine(tmp_path, monkeypatch):
    exe = _fake_server(tmp_path / "bin")
    d = choice.decide(load_settings(chat_engine="inprocess", engine_bin=str(exe)))
    assert (d.engine, d.binary) == ("inprocess", None)
    d = choice.decide(load_settings(chat_engine="auto", engine_bin=str(exe)))
    assert d.engine == "server" and d.binary.server == exe
    d = choice.decide(load_settings(chat_engine="AUTO", engine_bin=str(tmp_path / "missing")))
    assert d.engine == "inprocess" and "not an executable" in d.reason and "in process" in d.reason
    d = choice.decide(load_settings(chat_engine="server", engine_bin=str(tmp_path / "missing")))
    assert d.engine == "server" and d.binary is None and d.reason.startswith("TARS_CHAT_ENGINE=server but")


def test_settings_validate_the_new_knobs():
    from distributed.errors import ConfigError

    s = load_settings()
    assert (s.chat_engine, s.parallel, s.engine_bin) == ("auto", 4, "")
    with pytest.raises(ConfigError, match="TARS_PARALLEL"):
        load_settings(parallel=0)
    with pytest.raises(ConfigError, match="TARS_CHAT_ENGINE"):
        load_settings(chat_engine="gpu")


def test_the_engine_target_command_line(tmp_path):
    from distributed.catalog import load_catalog
    from distributed.domain import Assignment
    from distributed.engine.config import EngineConfig
    from distributed.engine.target import EngineTarget

    exe = _fake_server(tmp_path / "bin")
    spec = load_catalog().get("gemma-3-270m")
    a = Assignment(model=spec.id, kind="chat", node="n", device="cuda:1", quant="Q4_K_M", n_gpu_layers=-1,
                   vram_mb=1, reason="t", backend="llama_cpp")
    config = EngineConfig.of(load_settings(parallel=3, context=1000, threads=2), spec, a, binary.locate(str(exe)))
    assert (config.slots, config.context, config.threads, config.device) == (3, 1000, 2, "cuda:1")
    t = EngineTarget(spec, a, config, model_path=lambda: tmp_path / "m.gguf", node="n")
    argv = t.argv(tmp_path / "m.gguf")
    pairs = {flag: argv[argv.index(flag) + 1] for flag in ("-m", "--host", "--port", "-np", "-c", "-t", "-ngl")}
    assert argv[0] == str(exe) and pairs["-m"] == str(tmp_path / "m.gguf")
    assert pairs["--host"] == "127.0.0.1" and int(pairs["--port"]) == t.port > 0
    assert config.argv(tmp_path / "m.gguf", 4242) == argv[:argv.index("--port") + 1] + ["4242"] + \
        argv[argv.index("--port") + 2:]  # a pure function of the options and the port
    assert (pairs["-np"], pairs["-c"], pairs["-t"], pairs["-ngl"]) == ("3", "3000", "2", "999")
    assert argv[argv.index("-mg") + 1] == "1" and "--jinja" in argv and "--slots" in argv and "--metrics" in argv
    assert argv[argv.index("--cache-ram") + 1] == "0"  # llama.cpp's default would let it take 8 GB of RAM
    assert os.environ.get("LLAMA_ARG_API_KEY") is None
    assert "--chat-template-file" not in argv  # Gemma: the GGUF's own (or llama.cpp's) template
    smol = load_catalog().get("smollm2-135m-instruct")
    argv = EngineConfig.of(load_settings(), smol, a, binary.locate(str(exe))).argv(tmp_path / "m.gguf", 4242)
    from distributed import templates

    assert argv[argv.index("--chat-template-file") + 1] == str(templates.file_of("chatml-tools"))


def test_the_engine_starts_with_the_slots_the_plan_gave_it_else_tars_parallel(tmp_path):
    """One mapping from settings + assignment to engine options (EngineConfig.of), used by
    engine_target: a plan that lowered a model's slots wins over TARS_PARALLEL."""
    import dataclasses
    from types import SimpleNamespace

    from distributed.catalog import load_catalog
    from distributed.domain import Assignment

    exe = _fake_server(tmp_path / "bin")
    spec = load_catalog().get("gemma-3-270m")
    a = Assignment(model=spec.id, kind="chat", node="n", device="cpu", quant="Q4_K_M", n_gpu_layers=0, vram_mb=0,
                   reason="t", backend="llama_cpp")
    settings = load_settings(engine_bin=str(exe), chat_engine="server", parallel=8, context=4096, threads=3,
                             queue_size=5, queue_max_wait_s=7.5, request_timeout_s=42, engine_cache_mb=64)
    node = SimpleNamespace(settings=settings, name="n", store=None, metrics=None)
    t = choice.engine_target(node, spec, a)
    c = t.config
    assert (c.slots, c.context, c.threads, c.queue_size, c.queue_max_wait_s, c.timeout_s, c.cache_mb) == \
        (8, min(4096, spec.context), 3, 5, 7.5, 42, 64)
    assert t.info()["slots"] == {"busy": 0, "total": 8, "waiting": 0} and t.slots.slots == 8
    lowered = choice.engine_target(node, spec, dataclasses.replace(a, slots=2))
    assert lowered.config.slots == 2 and lowered.info()["slots"]["total"] == 2
    argv = lowered.config.argv(tmp_path / "m.gguf", 1234)
    assert argv[argv.index("-np") + 1] == "2" and argv[argv.index("-c") + 1] == str(2 * lowered.config.context)
    assert argv[argv.index("-ngl") + 1] == "0" and "-mg" not in argv  # on the CPU, as planned


def test_tars_profile_says_which_engine_and_its_build(tmp_path, monkeypatch):
    import json

    import typer
    from typer.testing import CliRunner

    from distributed.cli import hardware

    exe = _fake_server(tmp_path / "bin")
    app = typer.Typer()
    hardware.register(app)
    monkeypatch.setenv("TARS_ENGINE_BIN", str(exe))
    monkeypatch.setenv("TARS_GPU_PROFILE", "cpu")
    r = CliRunner().invoke(app, ["profile"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "Chat engine (GGUF): llama-server" in r.output and "version: 42 (abc123)" in r.output
    r = CliRunner().invoke(app, ["profile", "--json"])
    data = json.loads(r.output)["chat_engine"]
    assert data["engine"] == "server" and data["binary"]["server"] == str(exe)
    monkeypatch.setenv("TARS_ENGINE_BIN", str(tmp_path / "none"))
    r = CliRunner().invoke(app, ["profile"], env={"COLUMNS": "200"})
    assert "Chat engine (GGUF): inprocess" in r.output and "not an executable" in r.output


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_server_engine_demanded_but_not_built_fails_the_model_saying_why(tmp_path, anyio_backend, caplog):
    from types import SimpleNamespace

    from distributed.catalog import load_catalog
    from distributed.domain import Assignment

    spec = load_catalog().get("gemma-3-270m")
    a = Assignment(model=spec.id, kind="chat", node="n", device="cpu", quant="Q4_K_M", n_gpu_layers=0, vram_mb=0,
                   reason="t", backend="llama_cpp")
    settings = load_settings(chat_engine="server", engine_bin=str(tmp_path / "none"))
    node = SimpleNamespace(settings=settings, name="nx", store=None, metrics=None)
    t = choice.engine_target(node, spec, a)
    assert t is not None
    t.start()
    assert await t.wait_loaded(10) == "failed"
    assert "TARS_CHAT_ENGINE=server but TARS_ENGINE_BIN=" in t.error and t.info()["state"] == "failed"
    await t.close()
    # inprocess, or a fake backend: no engine target at all
    assert choice.engine_target(SimpleNamespace(settings=load_settings(chat_engine="inprocess"), name="nx",
                                                store=None, metrics=None), spec, a) is None
    fake = SimpleNamespace(settings=load_settings(backend_override="fake"), name="nx", store=None, metrics=None)
    assert choice.engine_target(fake, spec, a) is None
