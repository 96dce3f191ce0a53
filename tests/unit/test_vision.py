"""Images reach only models that see them, inline only: vision.check_images (the hook the chat
and Ollama adapters call), and which targets say they see images."""

from __future__ import annotations

import base64
import dataclasses

import pytest

from distributed.domain import Assignment, ModelSpec
from distributed.errors import ValidationFailed
from distributed.vision import check_images, sees_images

PNG = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n fake pixels").decode()


def _msg(*parts: dict) -> list[dict]:
    return [{"role": "system", "content": "be brief"}, {"role": "user", "content": list(parts)}]


def test_text_only_requests_pass_every_model() -> None:
    assert check_images("m", False, [{"role": "user", "content": "hi"}]) == 0
    assert check_images("m", False, _msg({"type": "text", "text": "hi"})) == 0


def test_inline_images_reach_a_vision_model() -> None:
    msgs = _msg({"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": PNG}})
    assert check_images("m", True, msgs) == 1
    assert check_images("m", True, [{"role": "user", "content": "x", "images": [PNG.split(",", 1)[1]]}],
                        images=[PNG.split(",", 1)[1]]) == 2  # Ollama: per message and per request


def test_a_model_without_vision_refuses_images_naming_the_field() -> None:
    msgs = _msg({"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": PNG}})
    with pytest.raises(ValidationFailed) as err:
        check_images("smollm2", False, msgs)
    assert err.value.field == "messages[1].content[1]" and "has no vision" in err.value.message
    assert err.value.http_status == 400 and "smollm2" in err.value.message
    with pytest.raises(ValidationFailed, match="has no vision") as err:
        check_images("smollm2", False, None, images=[PNG.split(",", 1)[1]])
    assert err.value.field == "images[0]"


@pytest.mark.parametrize("url, why", [
    ("https://example.com/cat.png", "not fetched"), ("http://10.0.0.1/x.png", "not fetched"),
    ("file:///etc/passwd", "data:image"), ("data:text/plain;base64,aGk=", "data:image"),
    ("data:image/png;base64,@@not base64@@", "base64"), ("", "needs a 'url'"),
])
def test_only_inline_base64_images_are_taken(url: str, why: str) -> None:
    with pytest.raises(ValidationFailed, match=why) as err:
        check_images("vlm", True, _msg({"type": "image_url", "image_url": {"url": url}}))
    assert err.value.field.startswith("messages[1].content[0].image_url")


def _spec(mmproj: str | None) -> ModelSpec:
    return ModelSpec(id="v", kind="chat", backend="llama_cpp", params_b=1, quant="Q4_K_M", context=512,
                     repo="o/r", file="m.gguf", mmproj=mmproj, mmproj_mb=10 if mmproj else None)


def _engine(spec: ModelSpec, a: Assignment, tmp_path):
    from distributed.engine import binary
    from distributed.engine.config import EngineConfig
    from distributed.engine.target import EngineTarget
    from distributed.settings import load_settings
    from tests.unit.engine.test_binary_and_choice import _fake_server

    exe = binary.locate(str(_fake_server(tmp_path / "bin")))
    config = EngineConfig.of(load_settings(), spec, a, exe)
    return EngineTarget(spec, a, config, model_path=lambda: tmp_path / "m.gguf", node="n")


def test_only_llama_server_targets_with_a_projector_see_images(tmp_path) -> None:
    from distributed.targets import LocalTarget

    a = Assignment(model="v", kind="chat", node="n", device="cpu", quant="Q4_K_M", n_gpu_layers=0, vram_mb=0,
                   reason="t", backend="llama_cpp")
    served = _engine(_spec("mmproj-f16.gguf"), a, tmp_path)
    plain = _engine(_spec(None), a, tmp_path)
    inproc = LocalTarget(_spec("mmproj-f16.gguf"), a, lambda: None, node="n")  # loads no projector
    assert [sees_images(t) for t in (served, plain, inproc)] == [True, False, False]
    argv = served.argv(tmp_path / "hub" / "o" / "r" / "m.gguf")
    assert argv[argv.index("--mmproj") + 1] == str(tmp_path / "hub" / "o" / "r" / "mmproj-f16.gguf")
    assert "--no-mmproj-offload" in argv  # planned on CPU: the projector stays in RAM, as the planner counted
    assert "--mmproj" not in plain.argv(tmp_path / "m.gguf")
    on_gpu = _engine(_spec("mmproj-f16.gguf"), dataclasses.replace(a, device="cuda:0", n_gpu_layers=-1),
                     tmp_path).config.argv(tmp_path / "hub" / "o" / "r" / "m.gguf", 4242)
    assert "--mmproj" in on_gpu and "--no-mmproj-offload" not in on_gpu  # with its layers: the projector on the GPU
    local = _spec("/models/mmproj-local.gguf")  # a local entry's projector: an absolute path (tars models add)
    argv = _engine(local, a, tmp_path).config.argv(tmp_path / "m.gguf", 4242)
    assert argv[argv.index("--mmproj") + 1] == "/models/mmproj-local.gguf"


def test_a_deploys_template_reaches_the_engine_command_line(tmp_path) -> None:
    from distributed.catalog import load_catalog
    from distributed.modelref import with_template
    from distributed.templates import file_of

    spec = load_catalog().get("gemma-3-270m")
    a = Assignment(model=spec.id, kind="chat", node="n", device="cpu", quant="Q4_K_M", n_gpu_layers=0, vram_mb=0,
                   reason="t", backend="llama_cpp", chat_template="chatml-tools")
    own = _engine(spec, a, tmp_path)
    assert "--chat-template-file" not in own.argv(tmp_path / "m.gguf")  # the GGUF's own template
    chosen = _engine(with_template(spec, a.chat_template), a, tmp_path)
    argv = chosen.argv(tmp_path / "m.gguf")
    assert argv[argv.index("--chat-template-file") + 1] == str(file_of("chatml-tools"))
