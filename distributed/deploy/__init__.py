"""Models at runtime: deploy, pull, remove across the cluster (issue 12.1).

* ``state.py`` — ``DesiredSet``: the cluster's desired models, a view of the replicated
  state (``cluster_state.py``): ``TARS_MODELS`` is the starting set; runtime deploys and
  removals are stamped entries on top of it (with each deploy's chat template, and the specs
  of resolved hub references), held and persisted by every host;
* ``placement.py`` — ``Placement``: the desired set as specs, and the plan that places it
  over some hosts (the planner, pinned hosts, extra replicas): what the node plans for
  itself and the cluster over every live host;
* ``manager.py`` — ``Deployer``: ``deploy(model, replicas, node, chat_template)`` /
  ``remove(model)`` on any host: resolves a hub reference there (``modelref``) and shares its
  spec, checks the catalog and the room, records the change, and asks the cluster to re-plan
  and apply — loading, pulling and routing then follow the cluster's ordinary plan path on
  every host, with nothing restarted;
* ``pull.py`` — the serving host fetches a model that is not on disk (``ModelStore.pull``)
  while its target reports ``pulling`` with the percent done;
* ``hints.py`` — what ``tars plan`` suggests for idle hosts (replicas).

Replicated models are served through ``targets/replicas.py``'s ``ReplicaSet``, installed
by ``targets.Routes`` like every other target.
"""
