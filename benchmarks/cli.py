"""The command line the benchmarks share: number options declared from their defaults, and the
results printed as JSON (also written to a file when ``--json`` names one)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Union

Number = Union[int, float]
THREADS_HELP = "0 = the physical cores (the node's default)"


def numbers(ap: argparse.ArgumentParser, **options: Number | tuple[Number, str]) -> None:
    """One ``--name`` option per keyword, in order (``per_client`` → ``--per-client``), typed as its
    default: ``rounds=3``, or with a help text ``threads=(0, "0 = the physical cores")``."""
    for name, option in options.items():
        default, text = option if isinstance(option, tuple) else (option, None)
        ap.add_argument("--" + name.replace("_", "-"), type=type(default), default=default, help=text)


def flags(ap: argparse.ArgumentParser, **helps: str) -> None:
    """One ``--name`` switch (``store_true``) per keyword, in order, with that help text."""
    for name, text in helps.items():
        ap.add_argument("--" + name.replace("_", "-"), action="store_true", help=text)


def json_option(ap: argparse.ArgumentParser) -> None:
    """``--json PATH``: where :func:`report` also writes the results."""
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")


def report(results: dict[str, Any], path: Path | None) -> None:
    """Print the results as indented JSON, and write the same text to ``path`` when given."""
    text = json.dumps(results, indent=2)
    print(text)
    if path:
        path.write_text(text)
