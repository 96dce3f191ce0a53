"""The engine side of a split: its command line per mode, and where it goes alone (10.4)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from distributed.catalog import load_catalog
from distributed.engine.binary import EngineBinary
from distributed.engine.config import EngineConfig
from distributed.planner import plan
from distributed.profiler import profile_host
from distributed.settings import load_settings
from distributed.split.engine import SplitEngineTarget, _set_opt, fit_alone
from distributed.split.service import SplitService

CATALOG = load_catalog()
BIG = CATALOG.get("mistral-small-24b")


def pair_plan():
    hosts = {"pc1": profile_host("rtx3060-12gb", "pc1"), "pc2": profile_host("gtx1660s-6gb", "pc2")}
    return hosts, plan(hosts, [BIG, CATALOG.get("all-MiniLM-L6-v2")])


def target(kind: str) -> SplitEngineTarget:
    _, p = pair_plan()
    a = p.where(BIG.id)
    binary = EngineBinary(server=Path("/opt/llama-server"), rpc_server=Path("/opt/ggml-rpc-server"),
                          version="0.3.36", kind=kind, build="", source="test")
    config = EngineConfig.of(load_settings(parallel=2, context=2048), BIG, a, binary)
    t = SplitEngineTarget(BIG, a, config, service=SimpleNamespace(version="0.3.36", token="t"), link=None,
                          alone=lambda: (20, "20 of 40 layers on its GPU"), model_path=lambda: Path("/m.gguf"),
                          node="pc1")
    t._tunnel["pc2"] = "127.0.0.1:40001"
    return t


def opt(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def test_cuda_engine_host_puts_every_layer_on_gpus_remote_first() -> None:
    t = target("cuda")
    argv = t.argv(Path("/m.gguf"))
    shares = {s["node"]: s["layers"] for s in t.assignment.split}
    assert opt(argv, "--rpc") == "127.0.0.1:40001"  # our tunnel, never the worker host itself
    assert opt(argv, "-ngl") == "999" and opt(argv, "-sm") == "layer"
    assert opt(argv, "--tensor-split") == f"{shares['pc2']},{shares['pc1']}"  # RPC devices come first
    assert "-mg" not in argv and opt(argv, "--host") == "127.0.0.1"
    assert argv.count("--port") == 1 and opt(argv, "--port") == str(t.port)
    # the command line of another life: a pure function of the options, the mode and the port
    before = (t.port, t.mode)
    other = t._argv_for(Path("/m.gguf"), "alone", 40999)
    assert opt(other, "--port") == "40999" and "--rpc" not in other and (t.port, t.mode) == before
    assert t._argv_for(Path("/m.gguf"), "split", t.port) == argv


def test_cpu_engine_host_offloads_the_workers_layers_from_the_end() -> None:
    t = target("cpu")
    argv = t.argv(Path("/m.gguf"))
    pc2 = next(s["layers"] for s in t.assignment.split if s["node"] == "pc2")
    assert opt(argv, "--rpc") == "127.0.0.1:40001"
    assert opt(argv, "-ngl") == str(pc2 + 1)  # its blocks (+ the output layer, which -ot keeps here)
    assert opt(argv, "-ot") == r"^(output|token_embd)\.weight$=CPU"  # the logits never cross the link
    assert "--tensor-split" not in argv  # one worker: nothing to divide


def test_alone_drops_the_rpc_devices() -> None:
    t = target("cuda")
    t.mode, t._alone_layers = "alone", 20
    argv = t.argv(Path("/m.gguf"))
    assert "--rpc" not in argv and "--tensor-split" not in argv
    assert opt(argv, "-ngl") == "20" and opt(argv, "-sm") == "none" and opt(argv, "-mg") == "0"


def test_set_opt() -> None:
    assert _set_opt(["a", "-ngl", "1", "b"], "-ngl", "9") == ["a", "b", "-ngl", "9"]
    assert _set_opt(["a", "-sm", "none"], "-sm", None) == ["a"]


def node_for(hosts, p, name: str, ram_mb: int | None = None, tmp: Path = Path("/nonexistent")):
    prof = hosts[name]
    if ram_mb is not None:
        prof.ram_total_mb = ram_mb
    return SimpleNamespace(name=name, settings=load_settings(node_name=name, models_dir=tmp), profile=prof, plan=p,
                           store=SimpleNamespace(path_for=lambda spec: None))


def test_alone_on_the_3060_is_a_partial_offload() -> None:
    hosts, p = pair_plan()
    n, why = fit_alone(node_for(hosts, p, "pc1"), BIG, p.where(BIG.id))
    assert n is not None and 0 < n < 40 and "layers on its GPU, the rest in RAM" in why


def test_alone_without_the_ram_is_none_with_the_reason() -> None:
    hosts, p = pair_plan()
    n, why = fit_alone(node_for(hosts, p, "pc1", ram_mb=2048), BIG, p.where(BIG.id))
    assert n is None and "MB of RAM" in why


def test_engine_choice_builds_a_split_engine_for_a_split_assignment(tmp_path: Path) -> None:
    from distributed.engine import choice

    hosts, p = pair_plan()
    node = node_for(hosts, p, "pc1", tmp=tmp_path)
    node.settings = load_settings(node_name="pc1", models_dir=tmp_path, chat_engine="server", cluster_token="t")
    node.metrics = None
    node.store = SimpleNamespace(path_for=lambda spec: None, ensure=lambda spec: Path("/m.gguf"))
    node.split, node.peers = SplitService(node.settings), None  # what service.build hands a node
    binary = EngineBinary(server=Path("/opt/llama-server"), rpc_server=Path("/opt/ggml-rpc-server"),
                          version="0.3.36", kind="cpu", build="", source="test")
    orig = choice.decide
    choice.decide = lambda s: choice.Decision("server", binary, "test")
    try:
        t = choice.engine_target(node, BIG, p.where(BIG.id))
    finally:
        choice.decide = orig
    assert isinstance(t, SplitEngineTarget) and t.node == "pc1" and [s["node"] for s in t.remote] == ["pc2"]
    assert node.split is t.service


def test_a_missing_worker_host_and_no_room_alone_is_a_503_naming_it() -> None:
    import pytest

    from distributed.errors import ModelFailed

    t = target("cuda")
    t._alone = lambda: (None, "needs 14115 MB of VRAM or 13949 MB of RAM; 2048 MB of RAM free")
    t.missing = {"pc2": "split relay at 127.0.0.3:18001 unreachable: connection refused"}
    t._choose_degraded()
    assert t.mode == "down" and t.state == "failed"
    with pytest.raises(ModelFailed) as err:
        t._check_ready()
    assert err.value.http_status == 503 and "pc2" in err.value.message and "unreachable" in err.value.message
    info = t.info()
    assert info["split_mode"] == "down" and info["missing"] == t.missing
    assert [s["state"] for s in info["split"]] == ["engine", "missing"]


def test_a_missing_worker_host_with_room_alone_runs_alone() -> None:
    t = target("cuda")
    t.missing = {"pc2": "gone"}
    t._choose_degraded()
    assert t.mode == "alone" and t._alone_layers == 20
    assert "--rpc" not in t.argv(Path("/m.gguf"))


def test_the_planner_splits_only_for_an_engine_that_can_run_it(tmp_path: Path) -> None:
    from distributed.split import can_split

    assert not can_split(load_settings(node_name="pc1", models_dir=tmp_path, split="off"))
    assert not can_split(load_settings(node_name="pc1", models_dir=tmp_path, chat_engine="inprocess"))


def test_a_changed_split_is_another_placement() -> None:
    import dataclasses

    from distributed.targets import same_placement

    _, p = pair_plan()
    a = p.where(BIG.id)
    shares = [dict(s) for s in a.split]
    shares[0]["layers"] -= 1
    shares[1]["layers"] += 1
    assert same_placement(a, dataclasses.replace(a))
    assert not same_placement(a, dataclasses.replace(a, split=shares))  # the engine must restart with it


# ----------------------------------------------------------------------------- requests when a worker host is lost
class _Link:
    """The cluster's word on the worker hosts: ``dead`` maps a host to why it is gone."""

    def __init__(self) -> None:
        self.dead: dict[str, str] = {}

    def gone(self, name: str) -> str | None:
        return self.dead.get(name)


class _Supervisor:
    """The engine's supervisor: a restart comes up ``after`` seconds later."""

    def __init__(self, t: SplitEngineTarget, after: float = 0.2) -> None:
        self.t, self.after, self.starts = t, after, 0
        from distributed.engine.supervisor import ChildState

        self.state = ChildState.READY

    async def stop(self) -> None:
        pass

    async def start(self) -> None:
        import asyncio

        self.starts += 1
        asyncio.get_running_loop().call_later(self.after, self.t.served.ready)


def _serving(link: _Link) -> SplitEngineTarget:
    async def no_tunnel(key: str) -> None:
        pass

    t = target("cuda")
    t.link = link
    t.service = SimpleNamespace(version="0.3.36", token="t", close_tunnel=no_tunnel)
    t.supervisor = _Supervisor(t)  # type: ignore[assignment]
    t._ever_ready = True
    t.served.ready()
    return t


def _engine(monkeypatch, script: list[str]) -> list[str]:
    """EngineTarget's own request paths, scripted: "die" (the engine stopped answering), "ok"."""
    from distributed.domain import Completion, TokenChunk
    from distributed.engine.target import EngineTarget

    calls: list[str] = []

    async def generate(self, req):  # noqa: ANN001, ANN202
        self._check_ready()
        step = script[len(calls)]
        calls.append(f"generate:{self.mode}")
        if step == "die":
            raise self._gone(ConnectionResetError("reset by peer"))
        return Completion(model=self.model, node=self.node, text="ok", finish_reason="stop")

    async def stream(self, req):  # noqa: ANN001, ANN202
        self._check_ready()
        step = script[len(calls)]
        calls.append(f"stream:{self.mode}")
        if step == "token-then-die":
            yield TokenChunk(text="Once")
            raise self._gone(ConnectionResetError("reset by peer"))
        if step == "die":
            raise self._gone(ConnectionResetError("reset by peer"))
        yield TokenChunk(text="ok")
        yield Completion(model=self.model, node=self.node, text="", finish_reason="stop")

    monkeypatch.setattr(EngineTarget, "generate", generate)
    monkeypatch.setattr(EngineTarget, "stream", stream)
    return calls


async def _drain(agen):  # noqa: ANN001, ANN202
    return [x async for x in agen]


def test_a_request_whose_engine_died_with_the_worker_host_is_served_alone(monkeypatch) -> None:
    import asyncio

    from distributed.domain import GenerateRequest

    link = _Link()
    t = _serving(link)
    calls = _engine(monkeypatch, ["die", "ok"])
    link.dead["pc2"] = "pc2 is dead (missed heartbeats)"
    out = asyncio.run(t.generate(GenerateRequest(prompt="hi")))
    assert out.text == "ok" and t.mode == "alone" and "pc2" in t.missing
    assert calls == ["generate:split", "generate:alone"]  # sent again once the engine ran alone


def test_a_lost_worker_host_found_by_a_probe_and_no_room_alone_is_a_503_naming_it(monkeypatch) -> None:
    import asyncio

    import pytest

    from distributed.domain import GenerateRequest
    from distributed.errors import PeerUnavailable

    t = _serving(_Link())  # the heartbeats have not noticed yet: the probe through the relay does

    async def probe() -> dict[str, str]:
        return {"pc2": "split relay at 127.0.0.3:18001 unreachable: connection refused"}

    t._probe = probe  # type: ignore[method-assign]
    t._alone = lambda: (None, "needs 14115 MB of VRAM or 13949 MB of RAM; 2048 MB of RAM free")
    _engine(monkeypatch, ["die"])
    with pytest.raises(PeerUnavailable) as ei:
        asyncio.run(t.generate(GenerateRequest(prompt="hi")))
    err = ei.value
    assert err.http_status == 503 and err.details["peer"] == "pc2" and t.mode == "down"
    assert "pc2 is gone (split relay at 127.0.0.3:18001 unreachable" in err.message
    assert "stopped answering" not in err.message and "2048 MB of RAM free" in err.message
    with pytest.raises(PeerUnavailable, match="pc2 is gone"):  # and so is every later request, at once
        asyncio.run(t.generate(GenerateRequest(prompt="again")))


def test_a_stream_cut_after_its_first_tokens_names_the_lost_host(monkeypatch) -> None:
    import asyncio

    import pytest

    from distributed.domain import GenerateRequest
    from distributed.errors import PeerUnavailable

    link = _Link()
    t = _serving(link)
    _engine(monkeypatch, ["token-then-die", "ok"])
    link.dead["pc2"] = "pc2 is dead (missed heartbeats)"
    with pytest.raises(PeerUnavailable) as ei:
        asyncio.run(_drain(t.stream(GenerateRequest(prompt="hi", stream=True))))
    assert "pc2 went away mid-answer" in ei.value.message and "pc1 serves it alone now" in ei.value.message
    t = _serving(link)
    calls = _engine(monkeypatch, ["die", "ok"])  # one cut before its first token is sent again
    items = asyncio.run(_drain(t.stream(GenerateRequest(prompt="hi", stream=True))))
    assert items[0].text == "ok" and calls == ["stream:split", "stream:alone"]


def test_requests_during_a_restart_wait_for_the_engine_bounded(monkeypatch) -> None:
    import asyncio
    import time

    import pytest

    from distributed.domain import GenerateRequest
    from distributed.errors import ModelLoading

    t = _serving(_Link())
    _engine(monkeypatch, ["ok", "ok"])

    async def restarting(after: float) -> float:
        t.served.state = "loading"  # the supervisor restarts the engine
        asyncio.get_running_loop().call_later(after, t.served.ready)
        t0 = time.monotonic()
        await t.generate(GenerateRequest(prompt="hi"))
        return time.monotonic() - t0

    assert asyncio.run(restarting(0.3)) >= 0.25  # waited, then answered
    t.RESTART_WAIT_S = 0.2
    with pytest.raises(ModelLoading, match="restarting its engine"):  # longer than the bound: 503 loading
        asyncio.run(restarting(5.0))
