"""Targets: one model as the node sees it, and the one owner of which target serves it.

* ``base.py`` — the ``Target`` interface, ``TargetState``, ``Rate``;
* ``served.py`` — ``Served``: the lifecycle, counters and ``info()`` every model computed
  here keeps (``LocalTarget`` and ``engine.target.EngineTarget`` each hold one);
* ``local.py`` — ``LocalTarget``: a backend on this host behind its queue/batcher;
* ``remote.py`` — ``RemoteTarget``: a model on a peer (forwarding, stand-in, failover);
* ``replicas.py`` — ``ReplicaSet``: a model on several hosts (the least busy live copy);
* ``routes.py`` — ``Routes``: which target serves model X here and every change to that
  (plans, handoff, failover stand-ins, replicas, make before break). docs/ARCHITECTURE.md
  has the API.
"""

from .base import GONE, Rate, Target, TargetState
from .local import LocalTarget
from .remote import DRAIN_S, PeerView, RemoteTarget
from .replicas import ReplicaSet
from .routes import Routes, same_placement

__all__ = ["DRAIN_S", "GONE", "LocalTarget", "PeerView", "Rate", "RemoteTarget", "ReplicaSet", "Routes", "Target",
           "TargetState", "same_placement"]
