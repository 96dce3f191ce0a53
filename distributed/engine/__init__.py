"""How chat generation runs on this host.

* ``supervisor.py`` — any child process the node runs (start, health, restart, stop, logs);
* ``binary.py`` — which ``llama-server`` build; ``choice.py`` — llama-server or in process;
* ``config.py`` — ``EngineConfig``: settings + a plan's assignment → engine options, argv;
* ``target.py`` — ``EngineTarget``: one llama-server per GGUF chat model, driven over HTTP
  on 127.0.0.1 (``wire.py`` maps requests and answers, ``sse.py`` reads its streams);
* ``slots.py`` — ``SlotQueue``: admission in front of an engine's slots;
* ``inprocess.py`` — ``GenerationQueue``: the in-process engine, one generation at a time.
"""
