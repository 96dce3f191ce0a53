"""The engine's command line per TARS_SPECULATIVE mode (engine/config.py, the one place settings
become engine options), and the draft's file resolved like the model's (engine/choice.with_draft)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from distributed.catalog import load_catalog
from distributed.domain import Assignment
from distributed.engine.binary import EngineBinary
from distributed.engine.choice import with_draft
from distributed.engine.config import EngineConfig
from distributed.errors import ConfigError, DownloadFailed
from distributed.settings import load_settings
from distributed.speculative import CPU_NGRAM, Speculation
from distributed.store import ModelStore

CAT = load_catalog()
SMOL = CAT.get("smollm2-135m-instruct")
BIN = EngineBinary(server=Path("/x/llama-server"), rpc_server=None, version="1", kind="cpu", build="b", source="test")
MODEL = Path("/m/model.gguf")


def assignment(device: str = "cpu", slots: int | None = None, draft: dict | None = None) -> Assignment:
    return Assignment(model=SMOL.id, kind="chat", node="n", device=device, quant=SMOL.quant,
                      n_gpu_layers=0 if device == "cpu" else -1, vram_mb=0, reason="t", backend="llama_cpp",
                      slots=slots, draft=draft)


def flags(argv: list[str]) -> list[str]:
    """The speculative part of a command line."""
    return argv[argv.index("--spec-type"):] if "--spec-type" in argv else []


def test_off_adds_nothing():
    cfg = EngineConfig.of(load_settings(speculative="off"), SMOL, assignment(), BIN)
    argv = cfg.argv(MODEL, 9000)
    assert flags(argv) == [] and cfg.speculation.kind == "off"
    assert argv[:3] == [str(BIN.server), "-m", str(MODEL)]


def test_ngram_adds_the_draftless_type_whatever_the_slots():
    for slots in (1, 4):
        cfg = EngineConfig.of(load_settings(speculative="ngram", parallel=slots), SMOL, assignment(), BIN)
        assert flags(cfg.argv(MODEL, 9000)) == ["--spec-type", "ngram-mod", *CPU_NGRAM]  # on a CPU: short drafts
    gpu = EngineConfig.of(load_settings(speculative="ngram"), SMOL, assignment("cuda:0"), BIN)
    assert flags(gpu.argv(MODEL, 9000)) == ["--spec-type", "ngram-mod"]  # every layer on the GPU: llama.cpp's
    partial = EngineConfig.of(load_settings(speculative="ngram"), SMOL, assignment("cuda:0"), BIN, n_gpu_layers=10)
    assert flags(partial.argv(MODEL, 9000)) == ["--spec-type", "ngram-mod", *CPU_NGRAM]


def test_auto_is_ngram_at_any_number_of_slots():
    s = load_settings(speculative="auto", parallel=4)
    assert EngineConfig.of(s, SMOL, assignment(), BIN).speculation.kind == "ngram"  # 4 slots
    assert EngineConfig.of(s, SMOL, assignment(slots=1), BIN).speculation.kind == "ngram"  # the plan lowered them
    assert EngineConfig.of(load_settings(speculative="auto", parallel=1), SMOL, assignment(), BIN) \
        .argv(MODEL, 9000)[-6:] == ["--spec-type", "ngram-mod", *CPU_NGRAM]
    assert EngineConfig.of(load_settings(speculative="off", parallel=4), SMOL, assignment(), BIN) \
        .speculation.kind == "off"


def test_a_planned_draft_gives_its_file_and_device_once_fetched(tmp_path):
    md = tmp_path / "draft.gguf"
    same = {"model": SMOL.id, "device": "cuda:0", "vram_mb": 300, "ram_mb": 0}
    cfg = EngineConfig.of(load_settings(speculative="auto"), SMOL, assignment("cuda:0", draft=same), BIN)
    assert cfg.speculation.kind == "draft" and flags(cfg.argv(MODEL, 9000)) == []  # not fetched yet: nothing
    argv = EngineConfig.of(load_settings(speculative="draft"), SMOL, assignment("cuda:0", draft=same), BIN,
                           draft_path=md).argv(MODEL, 9000)
    assert flags(argv) == ["--spec-type", "draft-simple", "-md", str(md), "-ngld", "999"]
    assert argv[argv.index("-sm"):argv.index("-sm") + 4] == ["-sm", "none", "-mg", "0"]
    own = {**same, "device": "cuda:1"}
    argv = EngineConfig.of(load_settings(), SMOL, assignment("cuda:0", draft=own), BIN, draft_path=md).argv(MODEL, 1)
    assert flags(argv)[-2:] == ["-devd", "CUDA1"]
    cpu = {**same, "device": "cpu", "vram_mb": 0, "ram_mb": 200}
    argv = EngineConfig.of(load_settings(), SMOL, assignment("cpu", draft=cpu), BIN, draft_path=md).argv(MODEL, 1)
    assert flags(argv) == ["--spec-type", "draft-simple", "-md", str(md), "-ngld", "0"]
    off = EngineConfig.of(load_settings(speculative="off"), SMOL, assignment("cpu", draft=cpu), BIN, draft_path=md)
    assert flags(off.argv(MODEL, 1)) == []


def _node(models_dir: Path) -> SimpleNamespace:
    return SimpleNamespace(store=ModelStore(models_dir, CAT), catalog=CAT)


def test_with_draft_fetches_the_draft_and_checks_the_vocabulary(tmp_path, gemma_gguf):
    node = _node(gemma_gguf.parent)
    smol_path = node.store.ensure(SMOL)
    same = {"model": SMOL.id, "device": "cpu", "vram_mb": 0, "ram_mb": 200}
    cfg = EngineConfig.of(load_settings(), SMOL, assignment(draft=same), BIN)
    got = with_draft(node, SMOL, smol_path, cfg)
    assert got.draft_path == smol_path and got.speculation.kind == "draft"
    assert flags(got.argv(smol_path, 1))[:4] == ["--spec-type", "draft-simple", "-md", str(smol_path)]
    # a draft with another vocabulary: the engine runs without it, and says why
    gemma = CAT.get("gemma-3-270m")
    bad = EngineConfig.of(load_settings(), gemma, Assignment(
        model=gemma.id, kind="chat", node="n", device="cpu", quant=gemma.quant, n_gpu_layers=0, vram_mb=0, reason="t",
        backend="llama_cpp", draft=same), BIN)
    got = with_draft(node, gemma, gemma_gguf, bad)
    assert got.speculation.kind == "off" and got.draft_path is None and flags(got.argv(gemma_gguf, 1)) == []
    assert "draft smollm2-135m-instruct not used" in got.speculation.reason
    assert "vocabularies differ" in got.speculation.reason


def test_with_draft_that_cannot_be_had_runs_without_it(tmp_path):
    node = _node(tmp_path)
    cfg = EngineConfig.of(load_settings(), SMOL, assignment(draft={"model": "mistral-7b-instruct", "device": "cpu"}),
                          BIN, speculation=Speculation("draft", draft="mistral-7b-instruct"))

    def offline(spec, progress=None):  # no network in unit tests
        raise DownloadFailed("offline")

    node.store.pull = offline
    got = with_draft(node, SMOL, Path("/m/smol.gguf"), cfg)
    assert got.speculation.kind == "off" and "draft mistral-7b-instruct not used: offline" in got.speculation.reason


@pytest.mark.parametrize("mode", ["auto", "off", "ngram", "draft"])
def test_every_mode_is_a_setting(mode):
    assert load_settings(speculative=mode.upper()).speculative == mode


def test_a_bad_mode_names_the_variable():
    with pytest.raises(ConfigError) as e:
        load_settings(speculative="fast")
    assert "TARS_SPECULATIVE='fast'" in e.value.message and "ngram" in e.value.message


def test_speculation_sits_beside_the_models_own_files(tmp_path):
    """A deploy's chat template and a vision projector (refs) with n-gram speculation: all in one command line."""
    from dataclasses import replace

    spec = replace(SMOL, mmproj="/p/mmproj.gguf")
    config = EngineConfig.of(load_settings(speculative="ngram", parallel=1), spec, assignment(slots=1), BIN,
                             chat_template=Path("/t/chatml-tools.jinja"))
    argv = config.argv(MODEL, 9000)
    assert argv[argv.index("--mmproj") + 1] == "/p/mmproj.gguf" and "--no-mmproj-offload" in argv
    assert argv[argv.index("--chat-template-file") + 1] == "/t/chatml-tools.jinja"
    assert flags(argv)[:2] == ["--spec-type", "ngram-mod"]
