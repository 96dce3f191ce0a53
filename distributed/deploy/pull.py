"""The serving host fetches a model that is not on disk before it loads it.

``fetch(store, spec, target)`` runs in the target's loading thread (``LocalTarget``'s
factory): ``store.ensure`` (no network), and when that says the model was never pulled,
``store.pull`` — resumable and verified, as ``tars models pull`` — with the bytes done
reported on ``target.progress`` so ``info()`` (``GET /models``, heartbeats, ``tars ps``)
shows ``pulling`` and the percent. A pull that fails raises ``DownloadFailed``: the target
is then ``failed`` with that reason, and the rest of the cluster keeps serving.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..domain import ModelSpec
from ..errors import ModelNotDownloaded
from ..logs import fields, get_logger

if TYPE_CHECKING:
    from ..store import ModelStore
    from ..targets.local import LocalTarget

log = get_logger(__name__)


def fetch(store: "ModelStore", spec: ModelSpec, target: "LocalTarget | None" = None) -> Path:
    try:
        return store.ensure(spec)
    except ModelNotDownloaded:
        pass
    log.info("pulling %s: it is not on disk here", spec.id, extra=fields(model=spec.id, repo=spec.repo))
    t0 = time.monotonic()
    total_guess = int(spec.size_mb or 0) * 2**20 or None
    if target is not None:
        target.progress = {"done_bytes": 0, "total_bytes": total_guess, "percent": 0.0}

    def report(done: int, total: int | None) -> None:
        if target is None:
            return
        total = total or total_guess
        pct = round(min(100.0, 100.0 * done / total), 1) if total else None
        target.progress = {"done_bytes": int(done), "total_bytes": total, "percent": pct}

    try:
        path = store.pull(spec, progress=report)
    finally:
        if target is not None:
            target.progress = None
    log.info("pulled %s in %.1f s", spec.id, time.monotonic() - t0, extra=fields(model=spec.id))
    return path
