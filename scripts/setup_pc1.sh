#!/usr/bin/env bash
# Set up PC1, the server host (the bigger GPU), in this checkout:
#
#   bash scripts/setup_pc1.sh && ./run_pc1.sh
#
# Checks Python, creates .venv, installs the CUDA builds of torch and llama-cpp-python
# where an NVIDIA driver (nvidia-smi) and the CUDA toolkit (nvcc) are present and the CPU
# builds elsewhere, installs this project, shows the hardware profile and the model plan,
# writes env/.env.pc1 with a new cluster token (printed for PC2), writes ./run_pc1.sh and
# finishes with a self-check: the node starts, /health answers 200, the node stops.
# Safe to run again: every step that is already done is skipped, and the end says so.
# Asks nothing when stdin is not a terminal or CI is set.
#
# A node that listens on the LAN (TARS_HOST not loopback) gets an API key for clients:
# asked for (Enter generates one, 'none' leaves the node open), generated when nobody is at
# the keyboard, or taken from TARS_API_KEY. The env file is 0600 (it holds the secrets).
#
#   --tls   serve HTTPS with a self-signed certificate (env/tls/pc1.crt, key 0600); the value
#           printed for PC2's --token then carries the certificate's SHA-256 fingerprint,
#           which PC2 pins (no certificate authority, nothing to click through)
#   --service          run the node as a systemd service (starts at boot, restarts on failure,
#                      logs to journald): writes env/tars-pc1.service (+ a user-unit variant);
#                      as root where systemd runs, installs, enables and starts it and waits
#                      until the node reports ready; elsewhere prints the exact commands
#   --remove-service   stop, disable and remove that service (nothing else runs)
#
# On WSL2 (Windows) it also says what to set on the Windows side: mirrored networking, the
# advertised address, the firewall ports (QUICK_START.md, "Windows PCs").
#
# Overrides (environment variables):
#   PYTHON=/path/to/python3.11      interpreter used to create .venv (default: newest python3.1x found)
#   TARS_VENV=/path/to/venv         use this virtual environment instead of ./.venv
#   TARS_SETUP_BUILD=auto|cuda|cpu  force the build kind (default auto: CUDA when nvidia-smi lists a
#                                   GPU and nvcc is on PATH or in $CUDA_HOME/bin, else CPU)
#   CUDA_HOME=/usr/local/cuda       where the CUDA toolkit lives when nvcc is not on PATH
#   TARS_SETUP_SKIP_INSTALL=1       run no pip command; show what would be installed
#   TARS_SETUP_VERBOSE=1            pip -v (the full compiler log of llama-cpp-python)
#   TARS_TORCH_CPU_INDEX=URL        extra index for the CPU torch wheel ("" = PyPI only)
#   TARS_WHEEL_CACHE=DIR            where built llama-cpp-python wheels are kept, one folder per
#                                   build kind (default ~/.cache/tars/wheels); pip's own cache is
#                                   not used for them, as it ignores CMAKE_ARGS (CPU vs CUDA)
#   TARS_SETUP_SELFCHECK=0          skip the final self-check
#   TARS_SETUP_SELFCHECK_TIMEOUT=S  seconds to wait for /health 200 (default 300)
#   TARS_NODE_NAME, TARS_HOST, TARS_PORT, TARS_ADVERTISE_URL, TARS_CLUSTER_NAME
#                                   written into env/.env.pc1 when it is created (defaults pc1,
#                                   0.0.0.0, 8000, this host's LAN address, tars); they also override
#                                   the file for the self-check, exactly as they do for the node
#   Any other TARS_* variable reaches the node started by the self-check.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/setup_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/setup_common.sh"

ENV_FILE=env/.env.pc1

TLS=0; SERVICE=0
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    --tls) TLS=1 ;;
    --service) SERVICE=1 ;;
    --remove-service) SERVICE_SCRIPT=setup_pc1.sh; remove_service pc1; exit 0 ;;
    *) die "unknown argument '$1'" "setup_pc1.sh takes --tls, --service or --remove-service; see bash scripts/setup_pc1.sh --help" ;;
  esac
  shift
done
[ "$SERVICE" = 1 ] && TOTAL_STEPS=11

printf '%sTARS Distributed — setting up PC1 (server) in %s%s\n' "$_B" "$ROOT" "$_0"

install_stack pc1

# ----------------------------------------------------------------------------- 8. env file
step "Settings file $ENV_FILE"
TOKEN=$(env_get "$ROOT/$ENV_FILE" TARS_CLUSTER_TOKEN)
if [ -n "$TOKEN" ]; then
  unchanged "$ENV_FILE exists; its cluster token is kept (delete the file to start over)"
else
  [ -f "$ROOT/$ENV_FILE" ] && die "$ENV_FILE exists but has no TARS_CLUSTER_TOKEN" \
    "add a line TARS_CLUSTER_TOKEN=<token> or delete $ENV_FILE and re-run to generate one"
  TOKEN=$("$VPY" "$PROBE" token)
  choose_api_key "${TARS_HOST:-0.0.0.0}"
  write_env_file pc1 server 8000 "" \
    "0.0.0.0 listens on the LAN so PC2 can join; 127.0.0.1 keeps the node to this machine." PC2 \
    "Shared secret of the /rpc channel: PC2 needs the same value (setup_pc2.sh --token ...)." \
    "# Comma-separated model ids to serve; empty = the embedded defaults (tars models list)." "TARS_MODELS=" \
    "# This cluster's name on the LAN: setup_pc2.sh --token ... (no address) finds PC1 by it over mDNS." \
    "TARS_CLUSTER_NAME=${TARS_CLUSTER_NAME:-tars}"
  changed "wrote $ENV_FILE with a new cluster token"
fi
ensure_private "$ROOT/$ENV_FILE"
[ "$TLS" = 1 ] && setup_tls pc1
node_address 8000
ADVERTISE=${TARS_ADVERTISE_URL:-$(env_get "$ROOT/$ENV_FILE" TARS_ADVERTISE_URL)}
PC1_ADDR=${ADVERTISE#http://}; PC1_ADDR=${PC1_ADDR#https://}; PC1_ADDR=${PC1_ADDR%/}
[ "${PC1_ADDR##*:}" = 8000 ] && PC1_ADDR=${PC1_ADDR%:8000}
info ""
SCHEME=http; PC2_TOKEN=$TOKEN
if [ -n "$(env_get "$ROOT/$ENV_FILE" TARS_TLS_CERT)" ]; then
  SCHEME=https
  TLS_FP=$(cd "$ROOT" && "$VPY" -m distributed.tls fingerprint "$(env_get "$ROOT/$ENV_FILE" TARS_TLS_CERT)")
  PC2_TOKEN="$TOKEN#sha256:$TLS_FP"  # the token and the certificate PC2 pins, in one value
  export TARS_PROBE_PIN=$TLS_FP       # the self-check below pins it too
fi
info "${_B}Cluster token for PC2:${_0} $PC2_TOKEN"
if [ "$SCHEME" = https ]; then
  info "On PC2 run:  bash scripts/setup_pc2.sh ${ADVERTISE:-<PC1 URL>} --token '$PC2_TOKEN'"
else
  info "On PC2 run:  bash scripts/setup_pc2.sh ${PC1_ADDR:-<PC1 address>} --token $TOKEN"
fi
if [ "${TARS_DISCOVERY:-$(env_get "$ROOT/$ENV_FILE" TARS_DISCOVERY)}" != off ] && [[ "$PC1_ADDR" != 127.* ]]; then
  info "   (on the same LAN the address may be left out: PC2 finds PC1 over mDNS)"
fi
wsl_advice "$PORT" "$ADVERTISE"
KEY=$(env_get "$ROOT/$ENV_FILE" TARS_API_KEY)
if [ -n "$KEY" ]; then
  info "${_B}API key for clients:${_0} $KEY   (TARS_API_KEY in $ENV_FILE; /health needs none)"
  CA=""; [ "$SCHEME" = https ] && CA="--cacert $(env_get "$ROOT/$ENV_FILE" TARS_TLS_CERT) "
  info "  curl $CA-H 'Authorization: Bearer $KEY' ${ADVERTISE:-$SCHEME://$HOST:$PORT}/v1/models"
  info "  OpenAI SDK: OpenAI(base_url='${ADVERTISE:-$SCHEME://$HOST:$PORT}/v1', api_key='$KEY'); dashboard: paste it when asked"
else
  case "$HOST" in 127.*|localhost) ;; *) warn "no API key: every client on the LAN may use this node (set TARS_API_KEY in $ENV_FILE)" ;; esac
fi

write_launcher pc1 "$ENV_FILE"
[ "$SERVICE" = 1 ] && setup_service pc1 server  # started now: the self-check below checks that node

# ----------------------------------------------------------------------------- 10. self-check
step "Self-check: start the node, wait for /health, stop it"
if ! selfcheck_enabled; then
  info "TARS_SETUP_SELFCHECK=0: skipped"
  summary
  exit 0
fi
CHECK_HOST=$HOST
[ "$CHECK_HOST" = 0.0.0.0 ] && CHECK_HOST=127.0.0.1
URL="$SCHEME://$CHECK_HOST:$PORT"
TIMEOUT=${TARS_SETUP_SELFCHECK_TIMEOUT:-300}
NODE_PID=""
LOG=""
stop_node() {
  [ -n "$NODE_PID" ] || return 0
  kill -TERM "$NODE_PID" 2>/dev/null || true
  for _ in $(seq 1 30); do kill -0 "$NODE_PID" 2>/dev/null || break; sleep 0.5; done
  kill -KILL "$NODE_PID" 2>/dev/null || true
  wait "$NODE_PID" 2>/dev/null || true
  NODE_PID=""
}
trap stop_node EXIT

check_port "$HOST" "$PORT"
if [ "$PORT_STATE" = node ]; then
  info "a TARS node already listens on $URL: checking that one instead of starting another"
elif [ "$PORT_STATE" = other ]; then
  die "port $PORT on $HOST is already in use ($PORT_REASON) by another program" \
    "find it with: ss -ltnp 'sport = :$PORT' — stop it, or choose another port: set TARS_PORT in $ENV_FILE (or TARS_PORT=8010 bash scripts/setup_pc1.sh)"
else
  LOG=$(mktemp "${TMPDIR:-/tmp}/tars-selfcheck-pc1.XXXXXX")
  info "starting: $VPY -m distributed serve --env-file $ENV_FILE (log: $LOG)"
  (cd "$ROOT" && exec "$VPY" -m distributed serve --env-file "$ENV_FILE") >"$LOG" 2>&1 &
  NODE_PID=$!
fi

start=$(date +%s)
last_note=0
while :; do
  http_get "$URL/health"
  now=$(date +%s); waited=$((now - start))
  if [ "$HTTP_STATUS" = 200 ]; then break; fi
  if [ -n "$NODE_PID" ] && ! kill -0 "$NODE_PID" 2>/dev/null; then
    printf '\n      last lines of the node log (%s):\n' "$LOG" >&2
    tail -n 25 "$LOG" | sed 's/^/        /' >&2
    die "the node exited during the self-check (see its log above)" \
      "run ./run_pc1.sh in the foreground to see the whole error; a port clash is fixed with TARS_PORT in $ENV_FILE"
  fi
  if [ "$waited" -ge "$TIMEOUT" ]; then
    die "the node did not report healthy within ${TIMEOUT}s (last /health: $HTTP_STATUS $HTTP_BODY)" \
      "see the log $LOG; a slow first start is normal while models are assembled: raise TARS_SETUP_SELFCHECK_TIMEOUT"
  fi
  if [ $((waited - last_note)) -ge 5 ]; then
    info "waiting for $URL/health (${waited}s): ${HTTP_STATUS} ${HTTP_BODY:0:120}"
    last_note=$waited
  fi
  sleep 1
done
ok "self-check passed: $URL/health answered 200 after $(( $(date +%s) - start ))s: ${HTTP_BODY:0:200}"
stop_node
trap - EXIT
[ -n "$LOG" ] && rm -f "$LOG"

summary
printf '\nStart PC1 with:  ./run_pc1.sh      (then open %s/ for the dashboard)\n' "$URL"
