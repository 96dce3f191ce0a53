"""The llama-cpp-python step of the setup scripts (scripts/lib/setup_common.sh install_llama).

pip caches the wheel it builds from an sdist keyed by the sdist alone, not by CMAKE_ARGS,
so a CPU wheel built once would be reused silently by a CUDA install (and the reverse).
The step therefore builds with --no-cache-dir --no-binary into a cache of its own, one
folder per build kind, checks every wheel for what it holds, and checks the installed
build after. These tests run the real shell function with the venv's `python` replaced
by a stand-in that plays pip: `pip wheel` writes a real wheel (a zip) holding
libggml-cuda.so exactly when CMAKE_ARGS asks for CUDA, `pip install` records which
build got installed, and the probe reports it — so what is checked is the decision
logic: which command runs, with which flags, from which cache folder. scripts/dev_install.sh
runs the same step (ensure_llama), checked the same way.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

FAKE_PYTHON = r"""#!/usr/bin/env bash
# A stand-in for the venv's python: plays pip for llama-cpp-python, delegates the rest.
REAL="__REAL__"
STATE="__STATE__"
echo "$* | CMAKE_ARGS=${CMAKE_ARGS:-}" >> "__LOG__"
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then
  case "$3" in
    wheel)
      out=""; prev=""
      for a in "$@"; do [ "$prev" = "-w" ] && out=$a; prev=$a; done
      kind=cpu
      case "${CMAKE_ARGS:-}" in *GGML_CUDA=on*) kind=cuda ;; esac
      [ -n "${FAKE_IGNORE_CMAKE:-}" ] && kind=cpu
      [ -n "${FAKE_BUILD_FAILS:-}" ] && { echo "error: CMake failed" >&2; exit 1; }
      "$REAL" - "$out/llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl" "$kind" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1], "w") as z:
    z.writestr("llama_cpp/__init__.py", "")
    z.writestr("include/ggml-cuda.h", "")  # every real build ships this header, CPU ones too
    z.writestr("llama_cpp/lib/libggml-cpu.so", "")
    if sys.argv[2] == "cuda":
        z.writestr("llama_cpp/lib/libggml-cuda.so", "")
PY
      ;;
    install)
      for a in "$@"; do whl=$a; done
      "$REAL" -c 'import sys, zipfile; n = zipfile.ZipFile(sys.argv[1]).namelist(); print("cuda" if any(x.endswith("libggml-cuda.so") for x in n) else "cpu")' "$whl" > "$STATE"
      ;;
    uninstall) : > "$STATE" ;;
  esac
  exit 0
fi
if [ "${2:-}" = "llama-build" ]; then  # scripts/lib/probe.py llama-build: what is installed
  k=$(cat "$STATE" 2>/dev/null)
  [ -n "$k" ] && echo "0.3.36 $k"
  exit 0
fi
exec "$REAL" "$@"
"""


class Box:
    """A fake venv, wheel cache, nvcc and pip log in one temporary folder."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.venv = tmp / "venv"
        (self.venv / "bin").mkdir(parents=True)
        self.state, self.log, self.cache = tmp / "installed", tmp / "pip.log", tmp / "wheels"
        py = self.venv / "bin" / "python"
        py.write_text(FAKE_PYTHON.replace("__REAL__", sys.executable).replace("__STATE__", str(self.state))
                      .replace("__LOG__", str(self.log)))
        py.chmod(0o755)
        self.bin = tmp / "bin"
        self.bin.mkdir()
        nvcc = self.bin / "nvcc"
        nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 12.4, V12.4.131'\n")
        nvcc.chmod(0o755)

    def installed(self, kind: str) -> None:
        self.state.write_text(kind)

    def pip_calls(self) -> list[str]:
        if not self.log.exists():
            return []
        return [line for line in self.log.read_text().splitlines() if line.startswith("-m pip")]

    def run(self, build: str, *, have_gpu: int = 0, script: str = "", **env: str) -> subprocess.CompletedProcess[str]:
        if self.log.exists():
            self.log.unlink()
        full = {k: v for k, v in os.environ.items() if not k.startswith(("TARS_", "CMAKE_ARGS"))}
        full.update({"TARS_VENV": str(self.venv), "TARS_WHEEL_CACHE": str(self.cache), "CUDA_HOME": str(self.tmp),
                     "PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}", **env})
        script = script or f'source scripts/lib/setup_common.sh; BUILD={build}; HAVE_GPU={have_gpu}; install_llama'
        r = subprocess.run(["bash", "-c", script], cwd=ROOT, env=full, capture_output=True, text=True, timeout=120)
        r.all = r.stdout + r.stderr  # type: ignore[attr-defined]
        return r


@pytest.fixture
def box(tmp_path: Path) -> Box:
    return Box(tmp_path)


def _wheels(box: Box, kind: str) -> list[Path]:
    return sorted((box.cache / f"llama-cpp-python-{kind}-py{sys.version_info[0]}.{sys.version_info[1]}").glob("*.whl"))


def test_cuda_over_an_installed_cpu_build_rebuilds_without_pips_cache(box: Box) -> None:
    box.installed("cpu")
    r = box.run("cuda")
    assert r.returncode == 0, r.all
    calls = box.pip_calls()
    wheel = next(c for c in calls if c.startswith("-m pip wheel"))
    assert "--no-cache-dir" in wheel and "--no-binary llama-cpp-python" in wheel and "--no-deps" in wheel
    assert wheel.endswith("CMAKE_ARGS=-DGGML_CUDA=on")
    assert any(c.startswith("-m pip uninstall -y llama-cpp-python") for c in calls)
    install = next(c for c in calls if c.startswith("-m pip install"))
    assert "--no-cache-dir" in install and "llama-cpp-python-cuda12.4-py" in install
    assert box.state.read_text().strip() == "cuda"
    assert "llama-cpp-python 0.3.36 cuda works" in r.stdout
    assert len(_wheels(box, "cuda12.4")) == 1


def test_each_build_kind_has_its_own_cached_wheel(box: Box) -> None:
    box.installed("cpu")
    assert box.run("cuda").returncode == 0
    # an explicit CPU build over the CUDA one: built for CPU, not the cached CUDA wheel
    r = box.run("cpu", TARS_SETUP_BUILD="cpu")
    assert r.returncode == 0, r.all
    wheel = next(c for c in box.pip_calls() if c.startswith("-m pip wheel"))
    assert wheel.endswith("CMAKE_ARGS=-DGGML_NATIVE=OFF") and "--no-cache-dir" in wheel
    assert box.state.read_text().strip() == "cpu"
    # back to CUDA: the CUDA wheel built earlier is reused, nothing is compiled
    r = box.run("cuda")
    assert r.returncode == 0, r.all
    assert "reusing the cuda wheel built earlier" in r.stdout
    assert not any(c.startswith("-m pip wheel") for c in box.pip_calls())
    assert box.state.read_text().strip() == "cuda"
    assert len(_wheels(box, "cuda12.4")) == 1 and len(_wheels(box, "cpu")) == 1


def test_the_right_build_already_installed_runs_no_pip_at_all(box: Box) -> None:
    for kind in ("cpu", "cuda"):
        box.installed(kind)
        r = box.run(kind)
        assert r.returncode == 0, r.all
        assert f"llama-cpp-python 0.3.36 {kind} installed — already done, unchanged" in r.stdout
        assert box.pip_calls() == []


def test_a_working_cuda_build_is_kept_when_only_the_toolkit_is_missing(box: Box) -> None:
    box.installed("cuda")
    r = box.run("cpu", have_gpu=1)  # auto: driver present, no nvcc → "cpu", but the CUDA build works
    assert r.returncode == 0, r.all
    assert "a working CUDA build is kept" in r.stdout and box.pip_calls() == []


def test_a_cuda_build_on_a_machine_without_gpu_is_replaced(box: Box) -> None:
    box.installed("cuda")
    r = box.run("cpu")
    assert r.returncode == 0, r.all
    assert box.state.read_text().strip() == "cpu"


def test_a_broken_install_is_replaced(box: Box) -> None:
    box.installed("broken")  # installed, but its native library does not load
    r = box.run("cpu")
    assert r.returncode == 0, r.all
    assert "found llama-cpp-python 0.3.36 broken" in r.stdout
    assert any(c.startswith("-m pip uninstall") for c in box.pip_calls())
    assert box.state.read_text().strip() == "cpu"


def test_a_wrong_wheel_in_the_cache_is_thrown_away(box: Box) -> None:
    box.installed("cuda")
    assert box.run("cpu", TARS_SETUP_BUILD="cpu").returncode == 0  # caches a CPU wheel
    cpu_wheel = _wheels(box, "cpu")[0]
    # plant a CUDA wheel where the CPU one was (as a cache mix-up would)
    box.installed("")
    box.run("cuda")
    cuda_wheel = _wheels(box, "cuda12.4")[0]
    cpu_wheel.write_bytes(cuda_wheel.read_bytes())
    box.installed("")
    r = box.run("cpu")
    assert r.returncode == 0, r.all
    assert "it is not a cpu build" in r.stdout
    assert any(c.startswith("-m pip wheel") for c in box.pip_calls())  # rebuilt
    assert box.state.read_text().strip() == "cpu"


def test_a_build_that_ignored_cuda_is_an_error_and_is_not_cached(box: Box) -> None:
    r = box.run("cuda", FAKE_IGNORE_CMAKE="1")
    assert r.returncode == 1
    assert "is not a cuda build" in r.stderr and "fix:" in r.stderr and "TARS_SETUP_VERBOSE=1" in r.stderr
    assert _wheels(box, "cuda12.4") == [] and not box.state.exists()


def test_a_failed_build_says_how_to_fix_it(box: Box) -> None:
    r = box.run("cpu", FAKE_BUILD_FAILS="1")
    assert r.returncode == 1
    assert "building llama-cpp-python (cpu) failed" in r.stderr
    assert "build-essential cmake" in r.stderr and "TARS_SETUP_BUILD=cpu" in r.stderr
    assert _wheels(box, "cpu") == []


def _dev_install_llama_step() -> str:
    """The llama-cpp-python block of scripts/dev_install.sh (the subshell after its step
    line), with the venv it names pointed at the box's."""
    text = (ROOT / "scripts" / "dev_install.sh").read_text()
    start = text.index("\n(", text.index('step "llama-cpp-python'))
    block = text[start + 1:text.index("\n)\n", start) + 2]
    assert "ensure_llama" in block and "pip install" not in block
    return block.replace('export TARS_VENV="$PWD/.venv"', ":")


def test_dev_install_builds_like_the_setup_scripts(box: Box) -> None:
    r = box.run("", script=_dev_install_llama_step())
    assert r.returncode == 0, r.all
    wheel = next(c for c in box.pip_calls() if c.startswith("-m pip wheel"))
    assert "--no-cache-dir" in wheel and "--no-binary llama-cpp-python" in wheel
    assert wheel.endswith("CMAKE_ARGS=-DGGML_NATIVE=OFF")
    assert box.state.read_text().strip() == "cpu" and len(_wheels(box, "cpu")) == 1
    r = box.run("", script=_dev_install_llama_step())  # a second run installs nothing
    assert r.returncode == 0 and box.pip_calls() == [], r.all
