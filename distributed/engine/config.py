"""How one llama-server is run: the one place ``Settings`` and a plan's assignment become
engine options, and the command line those options give.

``EngineConfig.of(settings, spec, assignment, binary)`` maps, once:

- slots (``-np``): the assignment's ``slots`` when the planner set it (it may lower them
  where VRAM is short), else ``TARS_PARALLEL``;
- context per slot: ``TARS_CONTEXT``, at most the model's own (``-c`` = slots × context);
- threads (``-t``): ``TARS_THREADS``, else the physical cores this process may use;
- the placement (``-ngl``, ``-sm none -mg N`` on the planned GPU) from the assignment;
- ``--cache-ram`` (``TARS_ENGINE_CACHE_MB``), the queue bounds and the request timeout;
- slot affinity (``TARS_ROUTING=cache``): each request pinned to the free slot that holds its
  prompt's start (``prefix.SlotPins``);
- speculative decoding (``TARS_SPECULATIVE`` and the plan's ``Assignment.draft``, decided by
  ``speculative.decide``; ``speculates``: whether the engine really guesses): ``--spec-type ngram-mod`` for n-gram (shorter
  drafts unless every layer is on a GPU), or
  ``--spec-type draft-simple -md DRAFT -ngld N [-devd CUDAk]`` for a draft model, whose file
  (``draft_path``) is set once it is fetched (``engine/choice.with_draft``);
- the model's own files beside its GGUF: ``--chat-template-file`` (a catalog entry's or a
  deploy's template in place of the GGUF's, ``templates.path_for``) and ``--mmproj`` (a vision
  projector, ``store.projector_path``; kept off the GPU with ``--no-mmproj-offload`` when the
  plan gives the model no GPU layers).

``config.argv(path, port)`` is a pure function of the options and the port: a split engine
(split/engine.py) starts from it and edits the flags its mode needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import templates
from ..cpus import physical_cores
from ..domain import Assignment, ModelSpec
from ..speculative import Speculation, decide
from ..store import projector_path
from .binary import EngineBinary

if TYPE_CHECKING:
    from ..settings import Settings


@dataclass(frozen=True)
class EngineConfig:
    binary: EngineBinary
    model: str  # the alias the engine answers to (-a)
    slots: int = 4  # -np: requests generated at once
    context: int = 2048  # tokens per slot
    n_gpu_layers: int = -1  # -1: all
    device: str = "cpu"  # "cuda:N" pins the engine to that GPU
    threads: int | None = None  # None: llama.cpp's own rule
    cache_mb: int = 0  # --cache-ram (llama.cpp's own default is 8 GB of RAM)
    queue_size: int = 16  # requests waiting past the slots before 429
    queue_max_wait_s: float = 0.0  # the wait past which a request is refused at once (0: no bound)
    timeout_s: float = 300.0  # longest a request may take
    start_timeout_s: float = 300.0  # longest a start may take before it counts as a failure
    max_failures: int = 3  # failed starts in a row before the model is "failed"
    extra_args: tuple[str, ...] = ()
    host: str = "127.0.0.1"  # the engine listens on loopback only
    speculation: Speculation = Speculation("off")  # speculative decoding (speculative.py)
    draft_path: Path | None = None  # the draft model's file, once fetched (kind "draft")
    chat_template: Path | None = None  # --chat-template-file: in place of the GGUF's own template
    mmproj: str | None = None  # the vision projector: an absolute path, or a file of the model's repo
    model_file: str | None = None  # the GGUF's path in its repo (finds the repo folder from the model path)
    slot_affinity: bool = True  # pick each request's id_slot by its prompt's prefix (TARS_ROUTING=cache)

    def __post_init__(self) -> None:
        object.__setattr__(self, "slots", max(1, int(self.slots)))

    @classmethod
    def of(cls, settings: Settings, spec: ModelSpec, a: Assignment, binary: EngineBinary,
           **overrides: Any) -> EngineConfig:
        """The options of ``spec`` placed as ``a`` under ``settings`` (see the module doc)."""
        planned = a.slots or 0
        slots = planned if planned > 0 else settings.parallel
        threads = settings.threads or physical_cores()
        options: dict[str, Any] = dict(
            binary=binary, model=spec.id, slots=slots,
            context=min(settings.context, spec.context), n_gpu_layers=a.n_gpu_layers, device=a.device,
            threads=threads, cache_mb=settings.engine_cache_mb, queue_size=settings.queue_size,
            queue_max_wait_s=settings.queue_max_wait_s, timeout_s=settings.request_timeout_s,
            chat_template=templates.path_for(spec), mmproj=spec.mmproj, model_file=spec.file,
            slot_affinity=settings.routing == "cache")
        options.update(overrides)
        if "speculation" not in overrides:
            options["speculation"] = decide(settings.speculative, spec, a.draft)
        return cls(**options)

    @property
    def speculates(self) -> bool:
        """Whether the engine runs speculative decoding (a draft counts once its file is here)."""
        kind = self.speculation.kind
        return kind == "ngram" or (kind == "draft" and self.draft_path is not None)

    def argv(self, path: Path, port: int) -> list[str]:
        """The engine's command line for one life on ``port``."""
        argv = [str(self.binary.server), "-m", str(path), "-a", self.model, "--host", self.host,
                "--port", str(port), "-np", str(self.slots), "-c", str(self.slots * self.context),
                "-ngl", str(self.n_gpu_layers if self.n_gpu_layers >= 0 else 999), "--jinja", "--slots", "--metrics",
                "--cache-ram", str(self.cache_mb)]  # bounded: llama.cpp's own default is 8 GB of RAM
        if self.mmproj:  # a vision model: its projector, on the GPU only when the model has layers there
            argv += ["--mmproj", str(projector_path(self.mmproj, self.model_file, path))]
            argv += ["--no-mmproj-offload"] if self.n_gpu_layers == 0 else []
        if self.threads:
            argv += ["-t", str(self.threads)]
        if self.chat_template is not None:  # a catalog's or a deploy's chat template in place of the GGUF's
            argv += ["--chat-template-file", str(self.chat_template)]
        if self.device.startswith("cuda:") and self.n_gpu_layers != 0:  # the planned GPU only, no split
            argv += ["-sm", "none", "-mg", self.device.split(":", 1)[1]]
        on_gpu = self.device.startswith("cuda:") and self.n_gpu_layers != 0
        argv += self.speculation.argv(self.draft_path, self.device if on_gpu else "cpu",
                                      whole_on_gpu=on_gpu and self.n_gpu_layers < 0)
        return argv + list(self.extra_args)
