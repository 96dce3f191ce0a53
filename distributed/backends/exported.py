"""A transformer exported to ONNX (run by ONNX Runtime) or OpenVINO IR (run by OpenVINO).

The one module that imports ``onnxruntime`` and ``openvino`` and calls torch's ONNX exporter.
sentence-transformers keeps doing what it does — tokenizing, pooling, normalizing, the
reranker's activation — and only its transformer's forward pass is swapped for a
``runtime_module``, a torch module without weights that feeds the tokens to the exported graph
and hands back its output as a torch tensor (no copy). sentence-transformers' own
``backend="onnx"|"openvino"`` needs ``optimum``, whose releases pin ``transformers`` below the
5.x that sentence-transformers 6 requires, so the export is done here.

Exports are made once, at a model's first load, and kept under the models folder::

    <TARS_MODELS_DIR>/runtimes/<model id>/onnx-<onnxruntime version>/model.onnx, meta.json
    <TARS_MODELS_DIR>/runtimes/<model id>/openvino-<openvino version>/model.xml, model.bin, meta.json

(never beside a model that lives in a read-only folder, such as the embedded MiniLM in
site-packages). The runtime's version is in the folder name; ``meta.json`` records the model
files and the exporter's versions (torch, transformers), and an export whose record no longer
matches is made again. An export is written to a temporary folder and renamed into place, so
two processes sharing a models folder never load a half-written one.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..optional import available, require
from .runtime import RuntimeUnavailable

_PURPOSE = "exported embedding and rerank models"
_PACKAGES = {"onnx": ("onnxruntime", "onnxruntime"), "openvino": ("openvino", "openvino")}
OPSET = 17


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def installed(runtime: str) -> str | None:
    """None when ``runtime`` ("onnx" or "openvino") can run here, else why not."""
    module, package = _PACKAGES[runtime]
    if not available(module):
        return f"{package} is not installed (pip install {package})"
    if runtime == "onnx" and not available("onnx"):
        return "onnx (torch's exporter needs it) is not installed (pip install onnx)"
    return None


def source_fingerprint(source: str) -> str:
    """The model's files as they are now (names, sizes, times): a changed model exports again."""
    path = Path(source)
    if not path.is_dir():
        return source
    h = hashlib.sha256(str(path.resolve()).encode())
    for f in sorted(path.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:20]


def runtime_module(run: Callable[[list[Any]], Any], names: list[str], output: str, config: Any) -> Any:
    """A ``torch.nn.Module`` without weights (sentence-transformers only accepts a module) that
    stands in for the transformer: ``forward(**tokens)`` → ``{output: tensor}`` from ``run``."""
    torch = require("torch", purpose=_PURPOSE)

    class RuntimeModule(torch.nn.Module):  # type: ignore[name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.config = config
            self.input_names = names
            self.output_name = output

        def forward(self, **kwargs: Any) -> dict[str, Any]:
            ids = kwargs["input_ids"]
            arrays = []
            for n in names:
                t = kwargs.get(n)
                if t is None:  # e.g. a tokenizer that leaves token_type_ids out
                    t = torch.zeros_like(ids)
                arrays.append(t.detach().to("cpu", torch.int64).contiguous().numpy())
            return {output: torch.from_numpy(run(arrays))}

    return RuntimeModule()


def _graph(model: Any, names: list[str], output: str, torch: Any) -> Any:
    """The transformer as a module of positional tensors returning the one output we use."""

    class _Graph(torch.nn.Module):  # type: ignore[name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *tensors: Any) -> Any:
            return self.model(**dict(zip(names, tensors)), return_dict=True)[output]

    return _Graph().eval()


class Exports:
    """The exports of one model under ``root`` (``<runtimes folder>/<model id>``)."""

    def __init__(self, root: Path, source: str) -> None:
        self.root = root
        self.source = source
        self._fingerprint: str | None = None

    def folder(self, runtime: str) -> Path:
        return self.root / f"{runtime}-{version(_PACKAGES[runtime][1])}"

    def meta(self, names: list[str], output: str) -> dict[str, Any]:
        if self._fingerprint is None:
            self._fingerprint = source_fingerprint(self.source)
        return {"source": self._fingerprint, "torch": version("torch"), "transformers": version("transformers"),
                "inputs": names, "output": output, "opset": OPSET}

    def ready(self, runtime: str, names: list[str], output: str) -> Path | None:
        """The folder of a usable export, or None."""
        folder = self.folder(runtime)
        try:
            if json.loads((folder / "meta.json").read_text()) == self.meta(names, output):
                return folder
        except (OSError, ValueError):
            pass
        return None

    def export(self, runtime: str, model: Any, example: dict[str, Any], names: list[str], output: str) -> Path:
        """Export ``model`` (a transformers model on the CPU) for ``runtime`` unless a matching
        export is already there; returns its folder. RuntimeUnavailable on any failure."""
        found = self.ready(runtime, names, output)
        if found is not None:
            return found
        folder = self.folder(runtime)
        tmp = self.root / f".{folder.name}.{os.getpid()}.tmp"
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as exc:
            raise RuntimeUnavailable(f"cannot write the {runtime} export under {self.root}: {exc}") from exc
        try:
            (_export_onnx if runtime == "onnx" else _export_openvino)(model, example, names, output, tmp)
            (tmp / "meta.json").write_text(json.dumps(self.meta(names, output), indent=1))
            if self.ready(runtime, names, output) is None:  # else another process just put one there
                shutil.rmtree(folder, ignore_errors=True)  # a stale export (older files or versions)
                try:
                    os.replace(tmp, folder)
                except OSError:  # another process put its export there first: use that one
                    if self.ready(runtime, names, output) is None:
                        raise
        except RuntimeUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - an exporter fails in many ways; the model still runs on torch
            raise RuntimeUnavailable(f"the {runtime} export failed: {type(exc).__name__}: {exc}") from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return folder


def _export_onnx(model: Any, example: dict[str, Any], names: list[str], output: str, folder: Path) -> None:
    torch = require("torch", purpose=_PURPOSE)
    require("onnx", purpose=_PURPOSE)
    graph = _graph(model, names, output, torch)
    args = tuple(example[n] for n in names)
    with torch.no_grad():
        out = graph(*args)
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes[output] = {0: "batch", 1: "sequence"} if out.dim() == 3 else {0: "batch"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, args, str(folder / "model.onnx"), dynamo=False, input_names=names,
                          output_names=[output], dynamic_axes=axes, opset_version=OPSET, do_constant_folding=True)


def _export_openvino(model: Any, example: dict[str, Any], names: list[str], output: str, folder: Path) -> None:
    torch = require("torch", purpose=_PURPOSE)
    ov = require("openvino", purpose=_PURPOSE)
    graph = _graph(model, names, output, torch)
    args = tuple(example[n] for n in names)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        converted = ov.convert_model(graph, example_input=args)
    # full-precision weights on disk; the CPU plugin picks its own inference precision (bf16 on
    # CPUs with AMX), which the agreement check in runtime.py judges like any other runtime
    ov.save_model(converted, str(folder / "model.xml"), compress_to_fp16=False)


def load(runtime: str, folder: Path, threads: int = 0) -> Callable[[list[Any]], Any]:
    """A function running the export in ``folder`` on a list of int64 arrays (in the export's
    input order); returns its output as a float32 numpy array."""
    try:
        if runtime == "onnx":
            return _load_onnx(folder, threads)
        return _load_openvino(folder, threads)
    except Exception as exc:  # noqa: BLE001 - a runtime that cannot load is skipped, not fatal
        raise RuntimeUnavailable(f"{runtime} could not load {folder}: {type(exc).__name__}: {exc}") from exc


def _load_onnx(folder: Path, threads: int) -> Callable[[list[Any]], Any]:
    ort = require("onnxruntime", purpose=_PURPOSE)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    # no busy-waiting between calls: on a small host those cycles belong to the event loop
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(folder / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(arrays: list[Any]) -> Any:
        return session.run(None, dict(zip(names, arrays)))[0]

    return run


def _load_openvino(folder: Path, threads: int) -> Callable[[list[Any]], Any]:
    ov = require("openvino", purpose=_PURPOSE)
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = ov.Core().compile_model(str(folder / "model.xml"), "CPU", config)
    request = compiled.create_infer_request()  # one at a time: the micro-batcher has one worker

    def run(arrays: list[Any]) -> Any:
        return request.infer(arrays)[0]  # outputs are copied (share_outputs=False)

    return run


def size_mb(folder: Path) -> float:
    """Megabytes of the export's files (its weights, held in RAM once loaded)."""
    return round(sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) / 2**20, 1)
