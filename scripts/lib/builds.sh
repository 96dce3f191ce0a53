# shellcheck shell=bash disable=SC2034  # sourced by scripts/lib/setup_common.sh; the variables are read there
# Steps 3-5 of the setup scripts: which build (CUDA or CPU), PyTorch and llama-cpp-python,
# and the pip helpers they (and step 6) use. Sourced by setup_common.sh, which defines ROOT,
# VPY, PROBE, the output helpers and skip_install; see its header for the overrides.

# ----------------------------------------------------------------------------- 3. build kind
CUDA_BIN=${CUDA_HOME:-/usr/local/cuda}/bin
have_nvcc() { command -v nvcc >/dev/null 2>&1 || [ -x "$CUDA_BIN/nvcc" ]; }

detect_build() {
  step "GPU build or CPU build"
  local gpu=0
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then gpu=1; fi
  HAVE_GPU=$gpu
  case "${TARS_SETUP_BUILD:-auto}" in
    cuda) BUILD=cuda; info "TARS_SETUP_BUILD=cuda: CUDA builds forced" ;;
    cpu) BUILD=cpu; info "TARS_SETUP_BUILD=cpu: CPU builds forced" ;;
    auto)
      if [ $gpu = 1 ] && have_nvcc; then
        BUILD=cuda
        nvidia-smi -L | sed 's/^/      /'
        local nvcc=nvcc
        command -v nvcc >/dev/null 2>&1 || nvcc=$CUDA_BIN/nvcc
        info "CUDA toolkit: $("$nvcc" --version | tail -n 1)"
      elif [ $gpu = 1 ]; then
        BUILD=cpu
        warn "an NVIDIA driver works but the CUDA toolkit (nvcc) is missing: building for CPU."
        warn "for GPU speed install the toolkit (sudo apt-get install nvidia-cuda-toolkit, or developer.nvidia.com/cuda-downloads) and re-run"
      else
        BUILD=cpu
        info "no working nvidia-smi: no NVIDIA GPU here, CPU builds"
      fi ;;
    *) die "TARS_SETUP_BUILD=${TARS_SETUP_BUILD} is not one of auto, cuda, cpu" "unset it or set it to auto, cuda or cpu" ;;
  esac
  if [ "$BUILD" = cuda ] && ! command -v nvcc >/dev/null 2>&1 && [ -x "$CUDA_BIN/nvcc" ]; then
    export PATH="$CUDA_BIN:$PATH"   # CMake finds nvcc on PATH
  fi
  ok "build: $BUILD"
}

# pip_install LABEL [VAR=VALUE ...] -- PIP ARGS...: run pip in the venv with visible
# progress, or only show the command under TARS_SETUP_SKIP_INSTALL=1.
pip_install() {
  local label=$1; shift
  local envs=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do envs+=("$1"); shift; done
  shift
  local verbose=()
  [ "${TARS_SETUP_VERBOSE:-0}" = "1" ] && verbose=(-v)
  if skip_install; then
    info "TARS_SETUP_SKIP_INSTALL=1, not running: ${envs[*]:+${envs[*]} }pip install $*"
    return 0
  fi
  info "installing $label: ${envs[*]:+${envs[*]} }pip install $*"
  if ! env ${envs[@]+"${envs[@]}"} "$VPY" -m pip install --progress-bar on "${verbose[@]+"${verbose[@]}"}" "$@"; then
    return 1
  fi
  changed "installed $label"
}

# pip_run LABEL -- PIP SUBCOMMAND ARGS...: any other pip command, shown under
# TARS_SETUP_SKIP_INSTALL=1 instead of run.
pip_run() {
  local label=$1; shift 2
  if skip_install; then
    info "TARS_SETUP_SKIP_INSTALL=1, not running: pip $*"
    return 0
  fi
  info "$label: pip $*"
  "$VPY" -m pip "$@" || return 1
  changed "$label"
}

# ----------------------------------------------------------------------------- 4. torch
install_torch() {
  step "PyTorch $TORCH_VERSION ($BUILD build)"
  local have
  have=$("$VPY" -c 'import torch; print(torch.__version__.split("+")[0], "cuda" if torch.version.cuda else "cpu")' 2>/dev/null || true)
  if [ "${have% *}" = "$TORCH_VERSION" ] && { [ "$BUILD" = cpu ] || [ "${have#* }" = cuda ]; }; then
    unchanged "torch $have installed"
    return
  fi
  if [ -n "$have" ]; then
    info "found torch $have, want $TORCH_VERSION ($BUILD)"
    # torch 2.13.0+cpu satisfies "torch==2.13.0" for pip, which would then keep it: remove it first
    pip_run "removal of torch $have" -- uninstall -y torch || die "could not uninstall torch $have" \
      "remove it by hand: $VPY -m pip uninstall -y torch, then re-run"
  fi
  local args=("torch==$TORCH_VERSION")
  if [ "$BUILD" = cpu ] && [ -n "${TARS_TORCH_CPU_INDEX-https://download.pytorch.org/whl/cpu}" ]; then
    # The CPU wheel is a tenth of the size of the default CUDA one.
    args+=(--extra-index-url "${TARS_TORCH_CPU_INDEX-https://download.pytorch.org/whl/cpu}")
  fi
  pip_install "torch $TORCH_VERSION ($BUILD)" -- "${args[@]}" || die \
    "installing torch==$TORCH_VERSION failed (see pip's output above)" \
    "check the network connection and free disk space (the CUDA build needs about 5 GB); TARS_SETUP_BUILD=cpu installs the small CPU build"
}

# ----------------------------------------------------------------------------- 5. llama-cpp-python
# pip caches a wheel it built keyed by the sdist alone, not by CMAKE_ARGS: a CPU wheel built
# once would be reused, silently, by a later CUDA install (and a CUDA one by a CPU install).
# So llama-cpp-python is never built through pip's cache: it is built once per kind with
# --no-cache-dir --no-binary into a cache of our own, one folder per build kind, CUDA
# release and Python version, and installed from there. Every wheel is checked for what it
# holds (libggml-cuda or not) before it is used, and the installed build is checked after.
LLAMA_WHEELS=${TARS_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tars/wheels}
HAVE_GPU=0

# "<version> cuda|cpu|broken", or nothing when llama-cpp-python is not installed.
llama_probe() { "$VPY" "$PROBE" llama-build 2>/dev/null || true; }

# The cache folder of this build: llama-cpp-python-cpu-py3.11, llama-cpp-python-cuda12.4-py3.11.
llama_wheel_dir() {
  local kind=$BUILD pyv
  if [ "$BUILD" = cuda ]; then
    local nvcc=nvcc rel
    command -v nvcc >/dev/null 2>&1 || nvcc=$CUDA_BIN/nvcc
    rel=$("$nvcc" --version 2>/dev/null | sed -n 's/.*release \([0-9][0-9.]*\).*/\1/p' | head -n 1)
    kind=cuda${rel:-unknown}
  fi
  pyv=$("$VPY" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || echo unknown)
  printf '%s/llama-cpp-python-%s-py%s' "$LLAMA_WHEELS" "$kind" "$pyv"
}

# wheel_kind WHEEL: cuda when it ships the CUDA library (libggml-cuda.so), else cpu.
wheel_kind() { "$VPY" "$PROBE" wheel-kind "$1"; }

install_llama() {
  step "llama-cpp-python ($BUILD build)"
  ensure_llama
}

# ensure_llama: the work of install_llama without the step header (scripts/dev_install.sh
# runs it with BUILD=cpu, so the dev install builds exactly as the setup scripts do).
ensure_llama() {
  local have kind
  have=$(llama_probe)
  kind=${have#* }
  if [ -n "$have" ] && [ "$kind" = "$BUILD" ]; then
    unchanged "llama-cpp-python $have installed"
    return
  fi
  if [ "$kind" = cuda ] && [ "$BUILD" = cpu ] && [ "$HAVE_GPU" = 1 ] && [ "${TARS_SETUP_BUILD:-auto}" = auto ]; then
    unchanged "llama-cpp-python $have installed: a working CUDA build is kept (TARS_SETUP_BUILD=cpu replaces it)"
    return
  fi
  [ -n "$have" ] && info "found llama-cpp-python $have, want the $BUILD build: replacing it"

  local dir wheel=""
  dir=$(llama_wheel_dir)
  if [ -d "$dir" ]; then
    local w
    for w in "$dir"/llama_cpp_python-*.whl; do
      [ -f "$w" ] || continue
      if [ "$(wheel_kind "$w" 2>/dev/null)" = "$BUILD" ]; then wheel=$w; else
        warn "removing $w from the wheel cache: it is not a $BUILD build"; rm -f "$w"; fi
    done
  fi

  local fix="CPU: sudo apt-get install build-essential cmake; CUDA: the toolkit (nvcc --version) must not be newer than the driver supports (nvidia-smi, top right); or build for CPU with TARS_SETUP_BUILD=cpu. Re-run with TARS_SETUP_VERBOSE=1 for the full compiler log"
  local cmake="-DGGML_NATIVE=OFF"
  [ "$BUILD" = cuda ] && cmake="-DGGML_CUDA=on"
  if [ -n "$wheel" ]; then
    info "reusing the $BUILD wheel built earlier on this machine: $wheel"
  elif skip_install; then
    info "TARS_SETUP_SKIP_INSTALL=1, not running: CMAKE_ARGS=$cmake FORCE_CMAKE=1 pip wheel --no-cache-dir --no-deps --no-binary llama-cpp-python -w $dir $LLAMA_SPEC"
    wheel="$dir/llama_cpp_python-*.whl"
  else
    command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 || command -v clang >/dev/null 2>&1 || die \
      "no C/C++ compiler: llama-cpp-python is compiled on this machine" \
      "Debian/Ubuntu: sudo apt-get install build-essential cmake; macOS: xcode-select --install; then re-run"
    if [ "$BUILD" = cuda ]; then info "compiling with CUDA: 10-30 minutes the first time"
    else info "compiling for CPU: 5-15 minutes the first time"; fi
    info "(the wheel is kept in $dir, so the next install of this build is instant)"
    local tmp w verbose=()
    [ "${TARS_SETUP_VERBOSE:-0}" = "1" ] && verbose=(-v)
    mkdir -p "$dir"
    tmp=$(mktemp -d "$dir.build.XXXXXX")
    info "running: CMAKE_ARGS=$cmake FORCE_CMAKE=1 pip wheel --no-cache-dir --no-deps --no-binary llama-cpp-python -w $tmp $LLAMA_SPEC"
    if ! CMAKE_ARGS="$cmake" FORCE_CMAKE=1 "$VPY" -m pip wheel --progress-bar on --no-cache-dir --no-deps \
        --no-binary llama-cpp-python ${verbose[@]+"${verbose[@]}"} -w "$tmp" "$LLAMA_SPEC"; then
      rm -rf "$tmp"
      die "building llama-cpp-python ($BUILD) failed (see the compiler output above)" "$fix"
    fi
    wheel=""
    for w in "$tmp"/llama_cpp_python-*.whl; do [ -f "$w" ] && wheel=$w; done
    if [ -z "$wheel" ] || [ "$(wheel_kind "$wheel")" != "$BUILD" ]; then
      rm -rf "$tmp"
      die "the llama-cpp-python build finished but is not a $BUILD build (CMake did not pick up $cmake)" \
        "check that nvcc works (nvcc --version) and re-run with TARS_SETUP_VERBOSE=1 to see what CMake found"
    fi
    mv "$wheel" "$dir/" && rm -rf "$tmp"
    wheel="$dir/$(basename "$wheel")"
  fi

  if [ -n "$have" ]; then
    pip_run "removal of llama-cpp-python $have" -- uninstall -y llama-cpp-python || die \
      "could not uninstall the old llama-cpp-python ($have)" "remove it by hand: $VPY -m pip uninstall -y llama-cpp-python"
  fi
  pip_install "llama-cpp-python ($BUILD)" -- --no-cache-dir "$wheel" || die \
    "installing the llama-cpp-python wheel $wheel failed (see pip's output above)" \
    "check the network connection to the package index (its dependencies come from there) and re-run"
  skip_install && return 0
  have=$(llama_probe)
  if [ "${have#* }" != "$BUILD" ]; then
    die "llama-cpp-python was installed but reports '${have:-nothing}' instead of a working $BUILD build" \
      "a CUDA build needs the NVIDIA driver's libraries (nvidia-smi must work); rm -f '$wheel' and re-run to rebuild, or TARS_SETUP_BUILD=cpu"
  fi
  ok "llama-cpp-python $have works"
}

