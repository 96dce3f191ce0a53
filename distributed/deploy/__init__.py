"""Models at runtime: deploy, pull, remove across the cluster (issue 12.1).

* ``state.py`` — ``DesiredSet``: the cluster's desired models, persisted in the models
  folder (``TARS_MODELS`` is the starting set; runtime deploys and removals are kept as
  changes on top of it, so they survive a restart);
* ``placement.py`` — ``Placement``: the desired set as specs, and the plan that places it
  over some hosts (the planner, pinned hosts, extra replicas): what the node plans for
  itself and the cluster over every live host;
* ``manager.py`` — ``Deployer``: ``deploy(model, replicas, node, chat_template)`` / ``remove(model)``
  on the planning host (a worker forwards to it over ``/rpc``): resolves a hub reference
  (``modelref``), checks the catalog and the room,
  persists, re-plans and applies — loading, pulling and routing then follow the cluster's
  ordinary plan path on every host, with nothing restarted;
* ``pull.py`` — the serving host fetches a model that is not on disk (``ModelStore.pull``)
  while its target reports ``pulling`` with the percent done;
* ``hints.py`` — what ``tars plan`` suggests for idle hosts (replicas).

Replicated models are served through ``targets/replicas.py``'s ``ReplicaSet``, installed
by ``targets.Routes`` like every other target.
"""
