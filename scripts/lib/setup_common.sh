# shellcheck shell=bash disable=SC2034  # the variables set here are read by the scripts that source it
# Shared steps of scripts/setup_pc1.sh and scripts/setup_pc2.sh (sourced, not run).
#
# Every step first checks whether its work is already done and says so, so a
# second run changes nothing. Steps that change something call `changed`; the
# summary at the end lists them (or says that nothing changed).
#
# Overrides (environment variables) — see the header of each setup script:
#   PYTHON, TARS_VENV, TARS_SETUP_BUILD, TARS_SETUP_SKIP_INSTALL, TARS_TORCH_CPU_INDEX,
#   TARS_SETUP_SELFCHECK, TARS_SETUP_SELFCHECK_TIMEOUT, TARS_SETUP_VERBOSE, CI

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
VENV=${TARS_VENV:-$ROOT/.venv}
VPY=$VENV/bin/python
PROBE=$ROOT/scripts/lib/probe.py
TORCH_VERSION=2.13.0
LLAMA_SPEC="llama-cpp-python>=0.3.8"
STEP=0
TOTAL_STEPS=10
CHANGED=()
SYS_PY=""
BUILD=""

if [ -t 1 ]; then
  _B=$'\033[1m'; _G=$'\033[32m'; _Y=$'\033[33m'; _R=$'\033[31m'; _0=$'\033[0m'
else
  _B=""; _G=""; _Y=""; _R=""; _0=""
fi

step() { STEP=$((STEP + 1)); printf '\n%s[%d/%d] %s%s\n' "$_B" "$STEP" "$TOTAL_STEPS" "$*" "$_0"; }
info() { printf '      %s\n' "$*"; }
ok() { printf '      %s✓%s %s\n' "$_G" "$_0" "$*"; }
warn() { printf '      %s! %s%s\n' "$_Y" "$*" "$_0"; }
changed() { CHANGED+=("$1"); ok "$1"; }
unchanged() { ok "$1 — already done, unchanged"; }

# die WHAT FIX: the problem and how to fix it, then exit 1.
die() {
  printf '\n%serror:%s %s\n' "$_R" "$_0" "$1" >&2
  [ -n "${2:-}" ] && printf '  fix: %s\n' "$2" >&2
  exit 1
}

# Ask only when a person is there: stdin is a terminal and CI is not set.
interactive() { [ -t 0 ] && [ -z "${CI:-}" ]; }

skip_install() { [ "${TARS_SETUP_SKIP_INSTALL:-0}" = "1" ]; }

# env_get FILE KEY: the value of KEY=... in an env file ("" when absent).
env_get() {
  [ -f "$1" ] || return 0
  sed -n "s/^$2=//p" "$1" | tail -n 1 | sed -e 's/^"\(.*\)"$/\1/' -e "s/^'\(.*\)'\$/\1/"
}

# ----------------------------------------------------------------------------- 1. Python
python_ok() { "$1" -c 'import sys; raise SystemExit(0 if sys.version_info >= (3, 10) else 1)' >/dev/null 2>&1; }
python_version() { "$1" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null || echo "unusable"; }

check_python() {
  step "Python ≥ 3.10"
  local fix="install Python 3.10 or newer (Debian/Ubuntu: sudo apt-get install python3.11 python3.11-venv; macOS: brew install python@3.11) and re-run, or point PYTHON=/path/to/python3.11 at one"
  if [ -n "${PYTHON:-}" ]; then
    command -v "$PYTHON" >/dev/null 2>&1 || die "PYTHON=$PYTHON is not an executable" "$fix"
    python_ok "$PYTHON" || die "PYTHON=$PYTHON is Python $(python_version "$PYTHON"); TARS Distributed needs 3.10 or newer" "$fix"
    SYS_PY=$(command -v "$PYTHON")
  else
    local found=() c
    for c in python3.13 python3.12 python3.11 python3.10 python3 python; do
      command -v "$c" >/dev/null 2>&1 || continue
      if python_ok "$c"; then SYS_PY=$(command -v "$c"); break; fi
      found+=("$c=$(python_version "$c")")
    done
    [ -n "$SYS_PY" ] || die "no suitable Python found (need 3.10 or newer; found: ${found[*]:-none})" "$fix"
  fi
  ok "using $SYS_PY (Python $(python_version "$SYS_PY"))"
}

# ----------------------------------------------------------------------------- 2. venv
ensure_venv() {
  step "Virtual environment $VENV"
  if [ -x "$VPY" ] && python_ok "$VPY"; then
    unchanged "virtual environment exists (Python $(python_version "$VPY"))"
    return
  fi
  if [ -e "$VENV" ]; then
    die "$VENV exists but holds no usable Python 3.10+ ($(python_version "$VPY"))" \
        "remove it (rm -rf '$VENV') and re-run this script"
  fi
  "$SYS_PY" -c 'import venv, ensurepip' >/dev/null 2>&1 || die \
    "$SYS_PY cannot create virtual environments (the venv/ensurepip module is missing)" \
    "Debian/Ubuntu: sudo apt-get install python$("$SYS_PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')-venv, then re-run"
  info "creating $VENV with $SYS_PY"
  "$SYS_PY" -m venv "$VENV" || die "could not create $VENV" "check free disk space and write permission on $(dirname "$VENV")"
  if ! skip_install; then
    "$VPY" -m pip install --upgrade pip wheel || die "could not upgrade pip in $VENV" "check the network connection to the package index, then re-run"
  fi
  changed "created virtual environment $VENV"
}

# ----------------------------------------------------------------------------- 3. build kind
CUDA_BIN=${CUDA_HOME:-/usr/local/cuda}/bin
have_nvcc() { command -v nvcc >/dev/null 2>&1 || [ -x "$CUDA_BIN/nvcc" ]; }

detect_build() {
  step "GPU build or CPU build"
  local gpu=0
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then gpu=1; fi
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

# ----------------------------------------------------------------------------- 4. torch
install_torch() {
  step "PyTorch $TORCH_VERSION ($BUILD build)"
  local have
  have=$("$VPY" -c 'import torch; print(torch.__version__.split("+")[0], "cuda" if torch.version.cuda else "cpu")' 2>/dev/null || true)
  if [ "${have% *}" = "$TORCH_VERSION" ] && { [ "$BUILD" = cpu ] || [ "${have#* }" = cuda ]; }; then
    unchanged "torch $have installed"
    return
  fi
  [ -n "$have" ] && info "found torch $have, want $TORCH_VERSION ($BUILD)"
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
install_llama() {
  step "llama-cpp-python ($BUILD build)"
  local have
  have=$("$VPY" -c 'import llama_cpp; print(llama_cpp.__version__, "cuda" if llama_cpp.llama_supports_gpu_offload() else "cpu")' 2>/dev/null || true)
  if [ -n "$have" ] && { [ "$BUILD" = cpu ] || [ "${have#* }" = cuda ]; }; then
    unchanged "llama-cpp-python $have installed"
    return
  fi
  if ! skip_install; then
    command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 || command -v clang >/dev/null 2>&1 || die \
      "no C/C++ compiler: llama-cpp-python is compiled on this machine" \
      "Debian/Ubuntu: sudo apt-get install build-essential cmake; macOS: xcode-select --install; then re-run"
  fi
  local fix="CPU: sudo apt-get install build-essential cmake; CUDA: the toolkit (nvcc --version) must not be newer than the driver supports (nvidia-smi, top right); or build for CPU with TARS_SETUP_BUILD=cpu. Re-run with TARS_SETUP_VERBOSE=1 for the full compiler log"
  if [ "$BUILD" = cuda ]; then
    local extra=(--no-cache-dir)   # a cached CPU wheel must not be reused for the CUDA build
    [ -n "$have" ] && { info "found a CPU-only llama-cpp-python ($have): rebuilding with CUDA"; extra+=(--force-reinstall --no-deps); }
    info "compiling with CUDA: 10-30 minutes the first time"
    pip_install "llama-cpp-python (CUDA)" CMAKE_ARGS="-DGGML_CUDA=on" FORCE_CMAKE=1 -- "${extra[@]}" "$LLAMA_SPEC" \
      || die "building llama-cpp-python with CUDA failed (see the compiler output above)" "$fix"
  else
    info "compiling for CPU: 5-15 minutes the first time (pip's wheel cache makes later installs instant)"
    pip_install "llama-cpp-python (CPU)" CMAKE_ARGS="-DGGML_NATIVE=OFF" -- "$LLAMA_SPEC" \
      || die "building llama-cpp-python failed (see the compiler output above)" "$fix"
  fi
}

# ----------------------------------------------------------------------------- 6. the project
project_installed() {
  "$VPY" - "$ROOT" <<'PY' >/dev/null 2>&1
import importlib.metadata as md, json, pathlib, re, sys
root = pathlib.Path(sys.argv[1]).resolve()
dist = md.distribution("tars-distributed")
url = json.loads(dist.read_text("direct_url.json") or "{}").get("url", "")
assert url.rstrip("/") == root.as_uri(), f"installed from {url}"
for req in dist.requires or []:
    if "extra ==" in req:
        continue
    md.version(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0])
PY
}

install_project() {
  step "TARS Distributed and its dependencies (pip install -e .)"
  if project_installed; then
    unchanged "tars-distributed installed from $ROOT with every dependency"
    return
  fi
  pip_install "tars-distributed (editable) and dependencies" -- -e "$ROOT" || die \
    "pip install -e . failed (see pip's output above)" \
    "check the network connection to the package index and free disk space, then re-run"
}

# ----------------------------------------------------------------------------- 7. profile + plan
profile_and_plan() {
  step "Hardware profile and model plan"
  (cd "$ROOT" && "$VPY" -m distributed profile) || die "the hardware profiler failed (see above)" \
    "run it alone for details: .venv/bin/python -m distributed profile; TARS_GPU_PROFILE=cpu forces CPU mode"
  (cd "$ROOT" && "$VPY" -m distributed plan) || die "the planner failed (see above)" \
    "run it alone for details: .venv/bin/python -m distributed plan"
}

# ----------------------------------------------------------------------------- 9. launcher
# write_launcher NAME ENV_FILE: run_<NAME>.sh at the repo root.
write_launcher() {
  local name=$1 envfile=$2 path=$ROOT/run_$1.sh py=.venv/bin/python
  step "Launcher run_$name.sh"
  [ "$VENV" != "$ROOT/.venv" ] && py=$VENV/bin/python
  local content
  content=$(cat <<EOF
#!/usr/bin/env bash
# Start TARS Distributed on $(printf %s "$name" | tr "[:lower:]" "[:upper:]"). Written by scripts/setup_$name.sh (re-run it to regenerate).
# Settings: $envfile (TARS_* environment variables override it). Extra arguments go to 'serve'.
cd "\$(dirname "\$0")"
exec $py -m distributed serve --env-file $envfile "\$@"
EOF
)
  if [ -f "$path" ] && [ "$(cat "$path")" = "$content" ] && [ -x "$path" ]; then
    unchanged "$path is up to date"
    return
  fi
  printf '%s\n' "$content" >"$path"
  chmod +x "$path"
  changed "wrote $path"
}

# ----------------------------------------------------------------------------- 10. self-check helpers
# probe_port HOST PORT: 0 when free; otherwise sets PORT_REASON.
PORT_REASON=""
probe_port() {
  local out
  out=$("$VPY" "$PROBE" port-free "$1" "$2") && return 0
  PORT_REASON=${out#in-use }
  return 1
}

# http_get URL: sets HTTP_STATUS ("unreachable" when nothing answers) and HTTP_BODY.
HTTP_STATUS=""; HTTP_BODY=""
http_get() {
  local out
  out=$("$VPY" "$PROBE" get "$1" || true)
  HTTP_STATUS=${out%% *}; HTTP_BODY=${out#* }
}

http_rpc() {
  local out
  out=$("$VPY" "$PROBE" rpc "$1" "$2" "$3" || true)
  HTTP_STATUS=${out%% *}; HTTP_BODY=${out#* }
}

selfcheck_enabled() { [ "${TARS_SETUP_SELFCHECK:-1}" != "0" ]; }

summary() {
  printf '\n%s' "$_B"
  if [ ${#CHANGED[@]} -eq 0 ]; then
    printf 'Nothing changed: everything was already set up.%s\n' "$_0"
  else
    printf 'Changed %d thing(s):%s\n' "${#CHANGED[@]}" "$_0"
    local c
    for c in "${CHANGED[@]}"; do printf '  - %s\n' "$c"; done
  fi
}
