"""Models built on disk from the embedded ones, for tests and benchmarks (no download).

Importable without pytest (``benchmarks/bench_embed_runtime.py`` uses it).
"""

from __future__ import annotations

from pathlib import Path


def minilm_cross_encoder(folder: Path, minilm: Path) -> Path:
    """A cross-encoder of real size and shape in ``folder`` (built once): the embedded MiniLM's
    encoder (6 layers, 384 wide) under a seeded random one-label head. No trained reranker is on
    disk offline; this one computes scores the way a real one does (for runtime exports and
    speed), it does not rank well."""
    if (folder / "config.json").exists() and (folder / "tokenizer.json").exists():
        return folder
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification.from_pretrained(str(minilm), num_labels=1)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(str(minilm)).save_pretrained(folder)
    return folder
