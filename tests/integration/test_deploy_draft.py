"""``POST /models {"model", "draft"}`` (speculative decoding): the draft's vocabulary is compared
with the model's from the real embedded GGUF headers — SmolLM2 and Gemma differ → 400 naming
``draft``; a model drafting for itself agrees → 202, kept in the desired set across a restart,
and refused fields name themselves. The app, node, deployer, planner and store are the real
ones; the models run on the fake backend (so the plan has no draft: no llama-server)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distributed.errors import ModelNotDownloaded
from tests.integration.test_deploy import CHAT, EMB, JSON_CT, serve

pytestmark = pytest.mark.anyio


@pytest.fixture
def with_gemma(tmp_path: Path, gemma_gguf: Path) -> Path:
    """A fresh models folder that has the embedded Gemma GGUF (linked, not copied again)."""
    (tmp_path / gemma_gguf.name).symlink_to(gemma_gguf)
    return tmp_path


async def test_a_draft_with_another_vocabulary_is_refused_naming_draft(with_gemma):
    async with serve(with_gemma) as (client, node):
        r = await client.post("/models", json={"model": CHAT, "draft": "gemma-3-270m"}, headers=JSON_CT)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["type"] == "invalid_request" and err["details"]["field"] == "draft"
        assert "draft 'gemma-3-270m' cannot speculate for 'smollm2-135m-instruct'" in err["message"]
        assert "gpt2 tokenizer, 49152 tokens" in err["message"] and "262144 tokens" in err["message"]
        assert node.placement.desired.get(CHAT).draft is None  # nothing changed
        assert f"desired:{CHAT}" not in node.placement.desired.state.entries  # nothing recorded


async def test_a_draft_sharing_the_vocabulary_is_kept(with_gemma, state_dir):
    async with serve(with_gemma) as (client, node):
        r = await client.post("/models", json={"model": CHAT, "draft": CHAT}, headers=JSON_CT)
        assert r.status_code == 202, r.text
        body = r.json()
        assert body["draft"] == CHAT and body["status"] == "deploying" and "draft_check" not in body
        assert node.placement.specs()[0].draft == CHAT  # the spec the planner sees names it
        again = await client.post("/models", json={"model": CHAT, "draft": CHAT}, headers=JSON_CT)
        assert again.status_code == 200 and again.json()["status"] == "unchanged"
    saved = {e["k"]: e["v"] for e in json.loads((state_dir / "tars-state-pc1.json").read_text())["entries"]}
    assert saved[f"desired:{CHAT}"] == {"replicas": 1, "node": None, "draft": CHAT}
    async with serve(with_gemma) as (_client, node):  # after a restart
        assert node.placement.desired.get(CHAT).draft == CHAT


async def test_what_cannot_be_a_draft_is_refused_naming_it(with_gemma):
    async with serve(with_gemma) as (client, _node):
        for body, says in (({"model": CHAT, "draft": "nope"}, "draft 'nope' is not in the catalog"),
                           ({"model": CHAT, "draft": EMB}, f"draft '{EMB}' is a embed model on sentence"),
                           ({"model": EMB, "draft": CHAT}, "only GGUF chat models take a draft")):
            r = await client.post("/models", json=body, headers=JSON_CT)
            assert r.status_code == 400, r.text
            assert r.json()["error"]["details"]["field"] == "draft" and says in r.json()["error"]["message"]
        r = await client.post("/models", json={"model": CHAT, "draft": ""}, headers=JSON_CT)
        assert r.status_code == 400 and "draft" in r.text


async def test_a_draft_not_on_disk_here_is_checked_where_it_runs(tmp_path):
    async with serve(tmp_path, models=[CHAT, EMB, "gemma-3-270m"]) as (client, node):

        def not_here(spec):  # as a hub model that was never pulled on this host
            raise ModelNotDownloaded(spec.id, str(tmp_path / spec.id))

        node.store.ensure = not_here
        r = await client.post("/models", json={"model": "gemma-3-270m", "draft": CHAT}, headers=JSON_CT)
    assert r.status_code == 202, r.text
    assert r.json()["draft_check"].startswith("deferred: the vocabularies are compared on the serving host")
