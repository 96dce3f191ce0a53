"""`tars ps`' speculative column: the kind, the draft model, the share of drafted tokens accepted."""

from __future__ import annotations

from distributed.cli.deploy import speculative


def test_the_column_says_kind_draft_and_acceptance():
    assert speculative({"id": "all-MiniLM-L6-v2"}) == "–"  # not a chat engine
    assert speculative({"speculative": {"kind": "off", "acceptance": None}}) == "off"
    assert speculative({"speculative": {"kind": "ngram", "acceptance": None}}) == "ngram"
    assert speculative({"speculative": {"kind": "ngram", "acceptance": 0.8125}}) == "ngram (81% accepted)"
    assert speculative({"speculative": {"kind": "draft", "draft": "qwen2.5-0.5b", "acceptance": 0.5}}) == \
        "draft qwen2.5-0.5b (50% accepted)"
