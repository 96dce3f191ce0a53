#!/usr/bin/env bash
# Build llama.cpp's own `llama-server` and `ggml-rpc-server` from the llama.cpp source that
# the installed llama-cpp-python release vendors (its sdist carries vendor/llama.cpp), so the
# whole install runs one llama.cpp version. Same CPU/CUDA choice as the llama-cpp-python build:
#   cpu  -> -DGGML_NATIVE=OFF   (a native build segfaults in batched decode on some CPUs)
#   cuda -> -DGGML_CUDA=on
# and -DGGML_RPC=ON always (pooled VRAM needs it). Cached per version and kind under
# ${TARS_ENGINE_CACHE:-~/.cache/tars/engine}/<version>-<kind>/bin; a second run builds nothing.
#
# usage: scripts/build_engine.sh [--kind auto|cpu|cuda] [--python PY] [--sdist FILE]
#   --kind auto (default): the kind of the installed llama-cpp-python (cuda when it carries libggml-cuda)
set -euo pipefail
cd "$(dirname "$0")/.."
KIND=auto; PY=.venv/bin/python; SDIST=""
while [ $# -gt 0 ]; do
  case "$1" in
    --kind) KIND="$2"; shift 2;;
    --python) PY="$2"; shift 2;;
    --sdist) SDIST="$2"; shift 2;;
    -h|--help) sed -n 2,11p "$0"; exit 0;;
    *) echo "build_engine: unknown argument $1" >&2; exit 2;;
  esac
done
case "$KIND" in auto|cpu|cuda) ;; *) echo "build_engine: --kind must be auto, cpu or cuda, not $KIND" >&2; exit 2;; esac

VERSION=$("$PY" -c "import importlib.metadata as m; print(m.version('llama-cpp-python'))" 2>/dev/null || true)
if [ -z "$VERSION" ]; then
  echo "build_engine: llama-cpp-python is not installed in $PY; install it first (scripts/dev_install.sh)" >&2
  exit 1
fi
if [ "$KIND" = auto ]; then
  KIND=$("$PY" -c "import importlib.util as u, pathlib as p; s = u.find_spec('llama_cpp'); print('cuda' if s and any(any(p.Path(d).glob('lib/libggml-cuda*')) for d in s.submodule_search_locations) else 'cpu')")
fi
CACHE="${TARS_ENGINE_CACHE:-$HOME/.cache/tars/engine}"
DEST="$CACHE/$VERSION-$KIND"
if [ -x "$DEST/bin/llama-server" ] && [ -x "$DEST/bin/ggml-rpc-server" ] && "$DEST/bin/llama-server" --version >/dev/null 2>&1; then
  echo "llama-server $VERSION ($KIND) already built: $DEST/bin"
  exit 0
fi

WORK="$CACHE/src/$VERSION"
mkdir -p "$WORK"
if [ ! -d "$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp" ]; then
  if [ -z "$SDIST" ]; then
    echo "==> Fetching the llama-cpp-python $VERSION source (sdist)"
    "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$WORK"
    SDIST="$WORK/llama_cpp_python-$VERSION.tar.gz"
  fi
  tar xzf "$SDIST" -C "$WORK"
fi
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
FLAGS=(-DCMAKE_BUILD_TYPE=Release -DGGML_RPC=ON -DBUILD_SHARED_LIBS=OFF
       -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON
       -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_APP=OFF)
if [ "$KIND" = cuda ]; then FLAGS+=(-DGGML_CUDA=on); else FLAGS+=(-DGGML_NATIVE=OFF); fi
BUILD="$WORK/build-$KIND"
echo "==> Configuring llama.cpp ($KIND): ${FLAGS[*]}"
cmake -S "$SRC" -B "$BUILD" "${FLAGS[@]}" > "$BUILD.configure.log" 2>&1 || { tail -30 "$BUILD.configure.log" >&2; exit 1; }
JOBS=$(nproc 2>/dev/null || echo 2)
echo "==> Building llama-server and ggml-rpc-server with $JOBS jobs (first time ~10 min on 2 cores)"
# Progress: one line per new percentage on a terminal (\r), every 10 % in a log (CI).
if [ -t 1 ]; then STEP=1; CR='\r'; else STEP=10; CR='\n'; fi
cmake --build "$BUILD" --target llama-server ggml-rpc-server -j "$JOBS" > "$BUILD.build.log" 2>&1 &
PID=$!
LAST=-1
while kill -0 "$PID" 2>/dev/null; do
  PCT=$({ grep -o '^\[ *[0-9]*%\]' "$BUILD.build.log" 2>/dev/null || true; } | tail -1 | tr -dc 0-9)
  if [ -n "$PCT" ] && [ $((PCT / STEP)) -gt $((LAST / STEP)) ]; then printf "    %3d %%$CR" "$PCT"; LAST=$PCT; fi
  sleep 2
done
if ! wait "$PID"; then
  echo; echo "build_engine: the build failed; the end of $BUILD.build.log:" >&2
  grep -E 'error|Error' "$BUILD.build.log" | tail -20 >&2 || true
  tail -20 "$BUILD.build.log" >&2
  exit 1
fi
printf '    100 %%\n'
mkdir -p "$DEST/bin"
cp "$BUILD/bin/llama-server" "$BUILD/bin/ggml-rpc-server" "$DEST/bin/"
if ! "$DEST/bin/llama-server" --version > "$DEST/VERSION" 2>&1; then
  echo "build_engine: the built llama-server does not run:" >&2; cat "$DEST/VERSION" >&2; rm -rf "$DEST"; exit 1
fi
if [ "$KIND" = cuda ] && ! grep -q ggml_backend_cuda "$DEST/bin/llama-server"; then
  echo "build_engine: --kind cuda but the built llama-server has no CUDA backend (is nvcc on PATH?)" >&2
  rm -rf "$DEST"; exit 1
fi
printf '%s\n' "$KIND" > "$DEST/KIND"
echo "llama-server $VERSION ($KIND) built: $DEST/bin ($(head -1 "$DEST/VERSION"))"
