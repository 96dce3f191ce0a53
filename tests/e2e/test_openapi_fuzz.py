"""End to end: schemathesis over ``/openapi.json`` finds no 5xx (issue 17).

Two real nodes: one with the fake engine, fuzzed on every route (bad input must be a 4xx,
never a 500), and one serving the default chat model through llama-server, fuzzed on the
chat routes of every dialect (an engine refusal must be a 400, never a 503: the fuzzer once
got ``model_failed`` for ``{"role": "tool", "tool_calls": [{}]}``). Bounded examples per
route; ``max_tokens`` is capped so a generated request cannot keep the engine busy.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.support import ServerProcess

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

HOST = "127.0.0.4"
CHAT_ROUTES = (r"^/(inference|v1/chat/completions|v1/completions|v1/messages(/count_tokens)?|v1/responses"
               r"|api/chat|api/generate)$")
# no shrinking: an example against the engine takes seconds; the failing one is printed as found
SETTINGS = hypothesis.settings(deadline=None, suppress_health_check=list(hypothesis.HealthCheck), derandomize=True,
                               database=None, print_blob=False,
                               phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate])


def _node(name: str, env: dict[str, str], args: list[str], tmp: Path) -> ServerProcess:
    return ServerProcess(name, HOST, ports=range(19000, 19100), env=env, args=args, log_dir=tmp)


@pytest.fixture(scope="module")
def fake_node(tmp_path_factory):
    node = _node("fuzz-fake", {"TARS_MODELS": "gemma-3-270m,all-MiniLM-L6-v2"},
                 ["--backend", "fake", "--models-dir", str(tmp_path_factory.mktemp("fuzz-models"))],
                 tmp_path_factory.mktemp("fuzz-fake"))
    with node:
        node.start(timeout=120)
        yield node


@pytest.fixture(scope="module")
def engine_node(smollm2_gguf, tmp_path_factory):
    from distributed.engine.binary import locate

    if locate(os.environ.get("TARS_ENGINE_BIN", "")) is None:
        pytest.skip("no llama-server built (scripts/build_engine.sh)")
    env = {"TARS_MODELS": "smollm2-135m-instruct", "TARS_CHAT_ENGINE": "server", "TARS_PARALLEL": "2",
           "TARS_CONTEXT": "2048", "TARS_THREADS": "2", "TARS_QUEUE_MAX_WAIT_S": "0"}
    node = _node("fuzz-engine", env, ["--models-dir", str(tmp_path_factory.mktemp("fuzz-models"))],
                 tmp_path_factory.mktemp("fuzz-engine"))
    with node:
        node.start(timeout=300)
        yield node


@pytest.fixture(scope="module")
def every_route(fake_node):
    # not /rpc (its own token and JSON-RPC envelope) nor the runtime deploys (they start pulls;
    # Ollama's /api/pull and /api/delete are the same deploys)
    return (schemathesis.openapi.from_url(f"{fake_node.url}/openapi.json")
            .exclude(path_regex=r"^/rpc").exclude(method=["POST", "DELETE"], path_regex=r"^/models")
            .exclude(path_regex=r"^/api/(pull|delete)$"))


@pytest.fixture(scope="module")
def chat_routes(engine_node):
    return schemathesis.openapi.from_url(f"{engine_node.url}/openapi.json").include(path_regex=CHAT_ROUTES)


def _cap(case: Any) -> None:
    """At most 8 tokens a generated request, set or not (the defaults run to hundreds)."""
    body = case.body
    if not isinstance(body, dict) or case.path.endswith("/count_tokens"):  # counting generates one token
        return
    if case.path.startswith("/api/"):  # Ollama: options.num_predict (-1, -2 or absent: until the context is full)
        options = body.get("options")
        if isinstance(options, dict):
            n = options.get("num_predict")
            if n is None or isinstance(n, (int, float)) and not isinstance(n, bool) and not 0 < n <= 8:
                options["num_predict"] = 8  # a wrong type stays: it must be a 400
        elif options is None:
            body["options"] = {"num_predict": 8}
        return
    key = {"/v1/responses": "max_output_tokens"}.get(case.path, "max_tokens")
    for name in (key, "max_completion_tokens"):
        value = body.get(name)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if name == key and name not in body or number and value > 8:  # 19000.0 is a valid max_tokens too
            body[name] = 8
    if isinstance(body.get("n"), int) and body["n"] > 2:
        body["n"] = 2
    body.pop("ignore_eos", None)


SENT: list[int] = []  # statuses answered, per run (the fuzzer did send requests)


def _no_server_error(case: Any, base_url: str) -> None:
    _cap(case)
    response = case.call(base_url=base_url, timeout=300)
    SENT.append(response.status_code)
    assert response.status_code < 500, (f"{case.method} {case.path} answered {response.status_code}\n"
                                        f"body sent: {str(case.body)[:800]}\nanswer: {response.text[:800]}")


def _fuzz(schema: Any, base_url: str, examples: int) -> list[str]:
    """Every operation of ``schema``, with valid and with invalid data; the 5xx found."""
    found: list[str] = []
    settings = hypothesis.settings(SETTINGS, max_examples=examples)
    modes = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in modes:
            @settings
            @hypothesis.given(case=op.as_strategy(generation_mode=mode))
            def run(case: Any) -> None:
                _no_server_error(case, base_url)

            try:
                run()
            except AssertionError as exc:
                found.append(f"{op.label} ({mode.value}): {exc}")
            except hypothesis.errors.Unsatisfiable:  # nothing to make invalid (an operation without input)
                continue
    return found


def test_no_route_answers_5xx_to_what_the_fuzzer_sends(every_route, fake_node):
    labels = {r.ok().label for r in every_route.get_all_operations()}
    assert len(labels) >= 15 and {"POST /api/chat", "POST /api/generate", "GET /api/tags", "POST /api/show"} <= labels
    assert not {"POST /api/pull", "DELETE /api/delete"} & labels  # deploys, as POST /models
    SENT.clear()
    found = _fuzz(every_route, fake_node.url, int(os.environ.get("TARS_FUZZ_EXAMPLES", "25")))
    assert not found, "\n\n".join(found)
    assert len(SENT) > 100 and any(s < 300 for s in SENT) and any(400 <= s < 500 for s in SENT)


def test_the_engine_never_makes_a_request_a_5xx(chat_routes, engine_node):
    labels = {r.ok().label for r in chat_routes.get_all_operations()}
    assert {"POST /v1/messages", "POST /v1/responses", "POST /v1/chat/completions", "POST /api/chat",
            "POST /api/generate"} <= labels
    SENT.clear()
    found = _fuzz(chat_routes, engine_node.url, int(os.environ.get("TARS_FUZZ_ENGINE_EXAMPLES", "12")))
    assert not found, "\n\n".join(found)
    assert any(s < 300 for s in SENT) and any(400 <= s < 500 for s in SENT)
