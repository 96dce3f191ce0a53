"""Child processes the node runs: llama.cpp's ``llama-server`` per GGUF chat model (and the
ggml RPC worker). ``supervisor.py`` runs any child; ``binary.py`` finds the engine build;
``llama_server.py`` is the chat target that drives one engine over HTTP on 127.0.0.1."""
