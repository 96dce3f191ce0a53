"""sampling.py: llama.cpp's sampler extras — names, types and bounds, one validator that
names the field, and the trip they make: REST → GenerateRequest.sampling → /rpc → llama-server
JSON; the in-process engine honours what llama-cpp-python can, the fake engine refuses them."""

from __future__ import annotations

import threading

import pytest

from distributed import sampling
from distributed.api import schemas
from distributed.api.chat_surface import ChatCompletionRequest, CompletionRequest
from distributed.backends.base import BackendOptions, create_backend
from distributed.backends.llama_surface import last_n, sampler_kwargs
from distributed.domain import Assignment, GenerateRequest, ModelSpec
from distributed.engine import wire
from distributed.errors import ValidationFailed
from distributed.requests import GenerateParams, parse_params

EVERY = {"top_k": 20, "min_p": 0.1, "typical_p": 0.9, "repeat_penalty": 1.1, "repeat_last_n": 32,
         "dry_multiplier": 0.8, "dry_base": 1.75, "dry_allowed_length": 2, "dry_penalty_last_n": 64,
         "dry_sequence_breakers": ["\n", ":"], "xtc_probability": 0.5, "xtc_threshold": 0.1, "mirostat": 2,
         "mirostat_tau": 5.0, "mirostat_eta": 0.1, "top_n_sigma": 1.5, "dynatemp_range": 0.5,
         "dynatemp_exponent": 1.0, "adaptive_target": 0.3, "adaptive_decay": 0.9, "min_keep": 1,
         "ignore_eos": True, "samplers": ["top_k", "min-p", "temperature"]}


def test_every_knob_is_known_and_kept():
    assert set(EVERY) == sampling.NAMES
    assert sampling.check(EVERY) == EVERY
    assert sampling.check({"top_k": None, "samplers": "kmt"}) == {"samplers": "kmt"}  # null = the default
    assert sampling.check(None) == {}
    assert set(sampling.INPROCESS) < sampling.NAMES


@pytest.mark.parametrize("values,field", [
    ({"top_k": -1}, "top_k"), ({"min_p": 1.5}, "min_p"), ({"mirostat": 3}, "mirostat"),
    ({"dry_base": 0.5}, "dry_base"), ({"repeat_penalty": 0}, "repeat_penalty"),
    ({"dry_sequence_breakers": []}, "dry_sequence_breakers"), ({"dry_sequence_breakers": ["a", ""]},
                                                               "dry_sequence_breakers[1]"),
    ({"samplers": ["top_k", "bogus"]}, "samplers"), ({"samplers": "kq"}, "samplers"),
    ({"top_k": "many"}, "top_k"), ({"ignore_eos": "perhaps"}, "ignore_eos"), ({"tfs_z": 1.0}, "tfs_z"),
])
def test_a_bad_value_is_refused_naming_the_field(values, field):
    with pytest.raises(ValidationFailed) as err:
        sampling.check(values)
    assert err.value.field == field
    with pytest.raises(ValidationFailed) as err:
        sampling.check(values, prefix="options")
    assert err.value.field == f"options.{field}"


def test_rest_surface_puts_them_on_the_request():
    r = schemas.parse(ChatCompletionRequest, b'{"messages": [{"role": "user", "content": "hi"}], "top_k": 5,'
                                             b' "min_p": 0.2, "mirostat": 0, "repeat_penalty": null}')
    assert r.to_domain().sampling == {"top_k": 5, "min_p": 0.2, "mirostat": 0}
    r = schemas.parse(CompletionRequest, b'{"prompt": "once", "dry_multiplier": 0.5}')
    assert r.to_domain().sampling == {"dry_multiplier": 0.5}
    with pytest.raises(ValidationFailed) as err:
        schemas.parse(ChatCompletionRequest, b'{"messages": [{"role": "user", "content": "hi"}], "xtc_threshold": 2}')
    assert err.value.field == "xtc_threshold"
    with pytest.raises(ValidationFailed) as err:
        schemas.parse(ChatCompletionRequest, b'{"messages": [{"role": "user", "content": "hi"}], "samplers": ["x"]}')
    assert err.value.field == "samplers"


def test_they_cross_hosts_and_are_checked_again():
    req = GenerateRequest(messages=[{"role": "user", "content": "hi"}], sampling=dict(EVERY))
    params = req.to_rpc()
    params.pop("stream")
    back = parse_params(GenerateParams, "inference.generate", params).to_domain(stream=False)
    assert back == req
    assert "sampling" not in GenerateRequest(prompt="x").to_rpc()  # an older peer never sees the field
    with pytest.raises(ValidationFailed) as err:
        parse_params(GenerateParams, "inference.generate", {"prompt": "x", "sampling": {"top_k": -3}})
    assert err.value.field == "sampling.top_k"
    with pytest.raises(ValidationFailed) as err:
        parse_params(GenerateParams, "inference.generate", {"prompt": "x", "sampling": [1]})
    assert err.value.field == "sampling"


def test_llama_server_gets_them_under_its_own_names():
    for req in (GenerateRequest(messages=[{"role": "user", "content": "hi"}], sampling=dict(EVERY)),
                GenerateRequest(prompt="once", sampling=dict(EVERY))):
        _, body = wire.payload(req, "m")
        assert {k: body[k] for k in EVERY} == EVERY


def test_in_process_keywords():
    req = GenerateRequest(prompt="x", sampling={"top_k": 7, "mirostat": 2, "mirostat_tau": 3.0, "repeat_last_n": 9})
    kw = sampler_kwargs(req)
    assert kw == {"top_k": 7, "min_p": 0.05, "typical_p": 1.0, "repeat_penalty": 1.0, "mirostat_mode": 2,
                  "mirostat_tau": 3.0}
    assert last_n(req, 64) == 9 and last_n(GenerateRequest(prompt="x"), 64) == 64


def _chat_backend(name: str):
    spec = ModelSpec(id="m", kind="chat", backend=name, params_b=0.1, quant="Q4_0", context=512, path="/x")
    a = Assignment(model="m", kind="chat", node="pc1", device="cpu", quant="Q4_0", n_gpu_layers=0, vram_mb=0,
                   reason="test")
    return create_backend(spec, a, BackendOptions(context=512), None)


def test_engines_refuse_what_they_cannot_honour_by_name():
    fake = _chat_backend("fake")
    for name in EVERY:
        with pytest.raises(ValidationFailed) as err:
            fake.check_request(GenerateRequest(prompt="x", sampling={name: EVERY[name]}))
        assert err.value.field == name and "fake engine" in err.value.message
    inproc = _chat_backend("llama_cpp")
    for name in sorted(sampling.NAMES - set(sampling.INPROCESS)):
        with pytest.raises(ValidationFailed) as err:
            # the base check runs first: no model needs to be loaded to refuse by name
            type(inproc).__mro__[1].check_request(inproc, GenerateRequest(prompt="x", sampling={name: EVERY[name]}))
        assert err.value.field == name and "llama-server" in err.value.message
    fake.load()
    pieces = list(fake.stream(GenerateRequest(prompt="a b", max_tokens=3), threading.Event()))
    assert pieces[-1].finish_reason is not None
