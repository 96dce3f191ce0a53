"""Partitions on a real (virtual) network: how fast does the survivor serve around a lost host,
how fast does a healed link bring it back, and what does a flapping link cost?

Two real nodes with the fake backend (what is measured is the cluster's reaction, not a model)
run in network namespaces of their own on one bridge, links limited to 1 Gbit/s with tbf
(tests/netns.py): PC1 (simulated RTX 3060, the planner, serves the chat model) and PC2
(simulated GTX 1660 SUPER, TARS_PEERS=PC1). A client in PC2's namespace sends a chat request
to PC2 every 0.25 s, each in its own thread (one hanging on the lost host does not hide
the next). Then, ``--repeat`` times for each way of losing PC1:

* ``carrier``: PC1's switch port goes down (the cable pulled at PC1: its NIC loses carrier);
* ``isolate``: PC1's port leaves the bridge (PC1 keeps its carrier and sends into the void);

it measures *served*: from the cut to the first 200 answer to a request sent after it (PC2
computing chat itself, as a fallback), *failed*: requests sent in that window that got no
200, *back*: from the link's return to the first answer computed on PC1 again, and *one
placement*: from the link's return until both nodes name the same planner and hold the same
plan, state and routing. Last, the link flaps (``--flap-period`` s down, as long up) for
``--flap-minutes``: re-plans (plans made by whichever host plans), moves of the planner's
role, fallback loads, stand-in drops and liveness moves per minute, counted in both logs,
and the share of requests answered. Then, ``--repeat`` times, PC1 (the planner) is killed:
*takeover*, until PC2 says it plans; PC1 is started again without ``TARS_PEERS`` (its known
peers bring it back): *rejoined*, from its start until both hold one placement with PC1
planning again.

    sudo .venv/bin/python -m benchmarks.bench_netns                 # needs root (namespaces)
    sudo .venv/bin/python -m benchmarks.bench_netns --repeat 5 --flap-minutes 2 --heartbeat 1.0
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import netns  # noqa: E402
from tests import netns_cluster as nc  # noqa: E402


def _until(cond, timeout: float) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if cond():
                return True
        except Exception:  # noqa: BLE001 - not yet
            pass
        time.sleep(0.1)
    return False


def settle(h2: netns.Host, pc2, timeout: float = 120) -> None:  # noqa: ANN001
    if not _until(lambda: nc.chat(h2, pc2.url).json()["node"] == "pc1", timeout):
        raise SystemExit(f"the cluster did not settle (chat on pc1)\n{pc2.tail(30)}")


def partition(lan: netns.Lan, h1: netns.Host, h2: netns.Host, pc1, pc2, how: str) -> dict[str, float]:  # noqa: ANN001
    settle(h2, pc2)
    cut_fn, heal_fn = (lan.link_down, lan.link_up) if how == "carrier" else (lan.isolate, lan.rejoin)
    traffic = nc.Traffic(h2, pc2.url, timeout=60).start()
    try:
        time.sleep(1.0)
        cut_fn(h1)
        cut = time.monotonic()
        _until(lambda: traffic.first_ok_after(cut) is not None, 60)
        served = traffic.first_ok_after(cut)
        served_at = cut + (served or 60)
        time.sleep(3.0)  # serve around it a little
        heal_fn(h1)
        healed = time.monotonic()
        _until(lambda: traffic.first_ok_after(healed, node="pc1") is not None, 60)
        back = traffic.first_ok_after(healed, node="pc1")
        one = time.monotonic() - healed if _until(lambda: nc.one_placement((h1, pc1), (h2, pc2)), 60) else None
    finally:
        traffic.stop()
    return {"served_s": served if served is not None else float("nan"),
            "failed": traffic.failed_between(cut, served_at),
            "back_s": back if back is not None else float("nan"),
            "one_placement_s": one if one is not None else float("nan")}


def flap(lan: netns.Lan, h1: netns.Host, h2: netns.Host, pc1, pc2, period: float, minutes: float) -> dict:  # noqa: ANN001
    settle(h2, pc2)
    marks = {n.name: len(n.log_text()) for n in (pc1, pc2)}
    traffic = nc.Traffic(h2, pc2.url, every=0.5, timeout=30).start()
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < minutes * 60:
            lan.link_down(h1)
            time.sleep(period)
            lan.link_up(h1)
            time.sleep(period)
    finally:
        elapsed = (time.monotonic() - t0) / 60
        traffic.stop()
    counts = {n.name: nc.events(n.log_text()[marks[n.name]:]) for n in (pc1, pc2)}
    per_min = {k: round(sum(c[k] for c in counts.values()) / elapsed, 1) for k in nc.EVENTS}
    ok = sum(1 for o in traffic.outcomes if o.status == 200)
    return {"minutes": round(elapsed, 2), "per_minute": per_min, "by_node": counts,
            "answered": f"{ok}/{len(traffic.outcomes)}"}


def takeover(h1: netns.Host, h2: netns.Host, pc1, pc2) -> dict[str, float]:  # noqa: ANN001
    """PC1, the planner, killed (SIGKILL): until PC2 plans; PC1 restarted (no TARS_PEERS: its known
    peers): until both name one planner again and hold one placement."""
    settle(h2, pc2)
    if not _until(lambda: nc.one_placement((h1, pc1), (h2, pc2)), 60):
        raise SystemExit("no single placement before the kill")
    pc1.kill()
    killed = time.monotonic()
    took = time.monotonic() - killed if _until(lambda: nc.control(h2, pc2)["planner"] == "pc2", 60) else None
    pc1.env.pop("TARS_PEERS", None)
    nc.start(pc1, h1)
    started = time.monotonic()
    back = (time.monotonic() - started if _until(lambda: nc.one_placement((h1, pc1), (h2, pc2))
                                                 and nc.control(h1, pc1)["planner"] == "pc1", 120) else None)
    return {"takeover_s": took if took is not None else float("nan"),
            "rejoined_s": back if back is not None else float("nan")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--flap-period", type=float, default=5.0)
    ap.add_argument("--flap-minutes", type=float, default=1.0)
    ap.add_argument("--heartbeat", type=float, default=None, help="TARS_HEARTBEAT_S (default: the node's, 2 s)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    reason = netns.available()
    if reason is not None:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    logs = Path(tempfile.mkdtemp(prefix="bench-netns-"))
    env = {"TARS_BACKEND_OVERRIDE": "fake", "TARS_CLUSTER_TOKEN": "bench-netns",
           "TARS_MODELS": "gemma-3-270m,all-MiniLM-L6-v2"}
    if args.heartbeat:
        env["TARS_HEARTBEAT_S"] = str(args.heartbeat)
    out: dict = {"partition": {}}
    with netns.Lan("b") as lan:
        h1, h2, pc1, pc2 = nc.pair(lan, logs, env)
        with pc1, pc2:
            nc.start(pc1, h1)
            nc.start(pc2, h2)
            for how in ("carrier", "isolate"):
                runs = [partition(lan, h1, h2, pc1, pc2, how) for _ in range(args.repeat)]
                out["partition"][how] = runs
            out["flap"] = flap(lan, h1, h2, pc1, pc2, args.flap_period, args.flap_minutes)
            out["takeover"] = [takeover(h1, h2, pc1, pc2) for _ in range(args.repeat)]
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"link {netns.RATE} (tbf), heartbeat {args.heartbeat or 2.0} s, {args.repeat} runs each; logs in {logs}")
    print(f"{'lost PC1 by':<10} {'served around it (s)':>22} {'failed requests':>16} {'back on PC1 (s)':>16} "
          f"{'one placement (s)':>18}")
    for how, runs in out["partition"].items():
        s = [r["served_s"] for r in runs]
        b = [r["back_s"] for r in runs]
        f = [r["failed"] for r in runs]
        o = [r["one_placement_s"] for r in runs]
        print(f"{how:<10} {statistics.median(s):>10.1f} ({min(s):.1f}-{max(s):.1f}) {statistics.median(f):>16.0f} "
              f"{statistics.median(b):>9.1f} ({min(b):.1f}-{max(b):.1f}) {statistics.median(o):>10.1f} "
              f"({min(o):.1f}-{max(o):.1f})")
    t = [r["takeover_s"] for r in out["takeover"]]
    j = [r["rejoined_s"] for r in out["takeover"]]
    print(f"planner PC1 killed: PC2 plans after {statistics.median(t):.1f} s ({min(t):.1f}-{max(t):.1f}); PC1 "
          f"restarted without TARS_PEERS: one placement again after {statistics.median(j):.1f} s "
          f"({min(j):.1f}-{max(j):.1f}) from its start")
    fl = out["flap"]
    print(f"flapping {args.flap_period:g} s down / {args.flap_period:g} s up for {fl['minutes']} min: per minute "
          + ", ".join(f"{k} {v}" for k, v in fl["per_minute"].items()) + f"; answered {fl['answered']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
