#!/usr/bin/env bash
# Set up PC2, the worker host, in this checkout, joined to PC1:
#
#   bash scripts/setup_pc2.sh [<PC1 address>] [--token TOKEN] [--tls] [--service] && ./run_pc2.sh
#
# <PC1 address> is PC1's LAN address (192.168.1.10), optionally with a port
# (192.168.1.10:8000) or as a URL (http://192.168.1.10:8000). Without it (and without an
# env/.env.pc2 that names PC1 already) PC1 is looked for on the LAN over mDNS: exactly one
# cluster answering is joined; several are listed (and one asked for, when a person is
# there; TARS_CLUSTER_NAME=NAME picks one). An mDNS answer is only a hint: the self-check
# still proves that the node found accepts the token. TOKEN is the cluster token
# setup_pc1.sh printed on PC1; without --token it is asked for (when a person is there)
# or taken from an existing env/.env.pc2. A PC1 set up with --tls prints TOKEN#sha256:FP:
# PC2 then reaches PC1 over HTTPS and pins that certificate (TARS_TLS_PINS).
#   --tls   PC2 serves HTTPS too, with its own self-signed certificate (env/tls/pc2.crt);
#           PC1 learns its fingerprint when PC2 joins (over the pinned channel)
#   --service, --remove-service   as in setup_pc1.sh (the unit is env/tars-pc2.service)
# env/.env.pc2 is made 0600 (it holds the token), also when it was copied by hand.
#
# Checks Python, creates .venv, installs the CUDA or CPU builds (as setup_pc1.sh), installs
# this project, shows the hardware profile and the model plan, writes env/.env.pc2
# (TARS_PEERS=http://<PC1>:8000 and the token), writes ./run_pc2.sh and finishes with a
# self-check: PC1's /health is reachable and PC1 accepts the token on /rpc.
# Safe to run again: what is already done is skipped, and the end says so.
# Asks nothing when stdin is not a terminal or CI is set.
#
# Overrides (environment variables):
#   PYTHON, TARS_VENV, TARS_SETUP_BUILD, CUDA_HOME, TARS_SETUP_SKIP_INSTALL, TARS_SETUP_VERBOSE,
#   TARS_TORCH_CPU_INDEX, TARS_WHEEL_CACHE, TARS_SETUP_SELFCHECK=0   as in setup_pc1.sh
#   TARS_PC1_PORT=8000              PC1's port when the address has none
#   TARS_CLUSTER_NAME=NAME          without an address: join the cluster of that name
#   TARS_DISCOVERY_TIMEOUT=4        seconds to listen for PC1 on the LAN
#   TARS_NODE_NAME, TARS_HOST, TARS_PORT, TARS_ADVERTISE_URL
#                                   written into env/.env.pc2 when it is created (defaults pc2,
#                                   0.0.0.0, 8001, this host's address on the route to PC1)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/setup_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/setup_common.sh"

ENV_FILE=env/.env.pc2
usage="usage: bash scripts/setup_pc2.sh [<PC1 address>] [--token TOKEN] [--tls] [--service | --remove-service]"

PC1_ARG=""; TOKEN_ARG=""; TLS=0; SERVICE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --tls) TLS=1; shift ;;
    --service) SERVICE=1; shift ;;
    --remove-service) SERVICE_SCRIPT=setup_pc2.sh; remove_service pc2; exit 0 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    --token) [ $# -ge 2 ] || die "--token needs a value" "$usage"; TOKEN_ARG=$2; shift 2 ;;
    --token=*) TOKEN_ARG=${1#--token=}; shift ;;
    -*) die "unknown option '$1'" "$usage" ;;
    *) [ -z "$PC1_ARG" ] || die "unexpected argument '$1'" "$usage"; PC1_ARG=$1; shift ;;
  esac
done

[ "$SERVICE" = 1 ] && TOTAL_STEPS=11

# pc1_url_of ADDRESS: PC1's base URL from an address, address:port or URL (sets PC1_URL).
pc1_url_of() {
  case "$1" in
    http://*|https://*) PC1_URL=${1%/} ;;
    *:*) PC1_URL="http://$1" ;;
    *) PC1_URL="http://$1:${TARS_PC1_PORT:-8000}" ;;
  esac
}

# discover_pc1: PC1 found on the LAN over mDNS (distributed/discovery.py), as PC1_URL and
# FOUND_CLUSTER; several clusters are listed (and one chosen, when a person is there).
discover_pc1() {
  local args=(find --timeout "${TARS_DISCOVERY_TIMEOUT:-4}") out rc=0 fix
  [ -n "${TARS_CLUSTER_NAME:-}" ] && args+=(--cluster "$TARS_CLUSTER_NAME")
  info "no PC1 address given: looking for PC1 on the LAN (mDNS _tars._tcp${TARS_CLUSTER_NAME:+, cluster $TARS_CLUSTER_NAME}, ${TARS_DISCOVERY_TIMEOUT:-4} s)"
  out=$(cd "$ROOT" && "$VPY" -m distributed.discovery "${args[@]}" 2>&1) || rc=$?
  fix="give PC1's address instead: bash scripts/setup_pc2.sh <PC1 address> --token <token> ('hostname -I' on PC1 shows it)"
  case $rc in
    0) ;;
    3)
      if interactive; then
        warn "no TARS cluster answered on the LAN (mDNS does not cross Wi-Fi client isolation, VLANs or WSL's NAT networking)"
        local answer; read -r -p "      PC1 address (its LAN IP, e.g. 192.168.1.10): " answer
        [ -n "$answer" ] || die "PC1's address is missing" "$fix"
        pc1_url_of "$answer"; return 0
      fi
      die "no TARS cluster answered on the LAN${TARS_CLUSTER_NAME:+ under the name $TARS_CLUSTER_NAME} (mDNS, ${TARS_DISCOVERY_TIMEOUT:-4} s)" \
        "$fix. mDNS does not cross Wi-Fi client isolation, VLANs or WSL's NAT networking; on PC1 TARS_DISCOVERY must be on and TARS_HOST not 127.0.0.1" ;;
    4)
      local i=0 line choice=""
      printf '      several TARS clusters answer on the LAN:\n'
      while IFS=$'\t' read -r c n u _; do i=$((i + 1)); printf '        %d) cluster %s: %s at %s\n' "$i" "$c" "$n" "$u"; done <<<"$out"
      if interactive; then
        read -r -p "      Which one (1-$i, or PC1's address)? " choice
      fi
      if [[ "$choice" =~ ^[0-9]+$ ]] && [ "$choice" -ge 1 ] && [ "$choice" -le "$i" ]; then
        out=$(sed -n "${choice}p" <<<"$out")
      elif [ -n "$choice" ]; then
        pc1_url_of "$choice"; return 0
      else
        die "several TARS clusters answer on the LAN (listed above): which one is PC1's?" \
          "name it: TARS_CLUSTER_NAME=<cluster> bash scripts/setup_pc2.sh --token <token>, or give PC1's address: bash scripts/setup_pc2.sh <address> --token <token>"
      fi ;;
    *) die "LAN discovery could not run: ${out:0:300}" "$fix" ;;
  esac
  local node
  IFS=$'\t' read -r FOUND_CLUSTER node PC1_URL _ <<<"$out"
  ok "found cluster '$FOUND_CLUSTER' on the LAN: its planner $node at $PC1_URL (an mDNS hint: the token check below proves it)"
}

# PC1's base URL from an address, address:port or URL; none: found on the LAN after the install.
EXISTING_PEERS=$(env_get "$ROOT/$ENV_FILE" TARS_PEERS)
PC1_URL=""; FOUND_CLUSTER=""
if [ -z "$PC1_ARG" ] && [ -n "$EXISTING_PEERS" ]; then
  PC1_URL=${EXISTING_PEERS%%,*}
fi
[ -z "$PC1_ARG" ] || pc1_url_of "$PC1_ARG"
check_pc1_url() {
  [[ "$PC1_URL" =~ ^https?://[A-Za-z0-9._-]+(:[0-9]+)?$ ]] || die "'$PC1_URL' is not a valid PC1 address" \
    "give PC1's IP address or host name, e.g. 192.168.1.10 or 192.168.1.10:8000"
}
[ -z "$PC1_URL" ] || check_pc1_url

printf '%sTARS Distributed — setting up PC2 (worker) in %s, joining %s%s\n' "$_B" "$ROOT" \
  "${PC1_URL:-the PC1 found on the LAN}" "$_0"

install_stack pc2
info "this is the plan of PC2 alone: once it joins, PC1 plans both hosts together (tars status, the dashboard)"

# ----------------------------------------------------------------------------- 8. env file
step "Settings file $ENV_FILE"
if [ -z "$PC1_URL" ]; then
  discover_pc1   # sets PC1_URL and FOUND_CLUSTER, or stops with what to do
  check_pc1_url
fi
TOKEN=${TOKEN_ARG:-$(env_get "$ROOT/$ENV_FILE" TARS_CLUSTER_TOKEN)}
if [ -z "$TOKEN" ] && interactive; then
  read -r -p "Cluster token (printed by setup_pc1.sh on PC1): " TOKEN
fi
# PC1 with --tls prints TOKEN#sha256:FINGERPRINT: the token, and the certificate to pin.
PIN=""
if [[ "$TOKEN" == *"#"* ]]; then
  PIN=${TOKEN#*#}; PIN=${PIN#sha256:}; TOKEN=${TOKEN%%#*}
  [[ "$PIN" =~ ^[0-9a-fA-F:]{64,95}$ ]] || die "the certificate fingerprint after '#' in --token is not a SHA-256" \
    "copy the --token value exactly as setup_pc1.sh --tls printed it"
  PC1_URL="https://${PC1_URL#*://}"  # a pinned PC1 serves HTTPS
  export TARS_PROBE_PIN=$PIN          # the self-check pins it too
fi
[ -n "$TOKEN" ] || die "no cluster token" \
  "pass the token setup_pc1.sh printed on PC1: $usage   (on PC1: grep TARS_CLUSTER_TOKEN env/.env.pc1)"
[[ "$TOKEN" =~ ^[A-Za-z0-9._~+/=-]+$ ]] || die "the cluster token contains spaces or quotes" \
  "copy it exactly as printed by setup_pc1.sh (letters, digits, - and _)"

if [ -f "$ROOT/$ENV_FILE" ]; then
  if [ "$EXISTING_PEERS" = "$PC1_URL" ] && [ "$(env_get "$ROOT/$ENV_FILE" TARS_CLUSTER_TOKEN)" = "$TOKEN" ]; then
    unchanged "$ENV_FILE already joins $PC1_URL with this token"
  else
    # Only the two lines this script owns change; the rest of the file is the user's.
    "$VPY" "$PROBE" env-set "$ROOT/$ENV_FILE" "TARS_PEERS=$PC1_URL" "TARS_CLUSTER_TOKEN=$TOKEN"
    changed "updated TARS_PEERS / TARS_CLUSTER_TOKEN in $ENV_FILE"
  fi
else
  pc1_host=${PC1_URL#*://}; pc1_host=${pc1_host%:*}
  write_env_file pc2 worker 8001 "$pc1_host" "0.0.0.0 listens on the LAN so PC1 can forward requests here." PC1 \
    "Shared secret of the /rpc channel: the value from PC1's env/.env.pc1." \
    "# PC1, the node this one joins (comma-separated base URLs)." "TARS_PEERS=$PC1_URL" \
    "# The cluster's name on the LAN (as PC1 advertises it)." "TARS_CLUSTER_NAME=${FOUND_CLUSTER:-${TARS_CLUSTER_NAME:-tars}}"
  changed "wrote $ENV_FILE (joins $PC1_URL)"
fi
if [ -n "$FOUND_CLUSTER" ] && [ "$(env_get "$ROOT/$ENV_FILE" TARS_CLUSTER_NAME)" != "$FOUND_CLUSTER" ]; then
  "$VPY" "$PROBE" env-set "$ROOT/$ENV_FILE" "TARS_CLUSTER_NAME=$FOUND_CLUSTER"
  changed "set TARS_CLUSTER_NAME=$FOUND_CLUSTER in $ENV_FILE (the cluster found on the LAN)"
fi
if [ -n "$PIN" ] && [ "$(env_get "$ROOT/$ENV_FILE" TARS_TLS_PINS)" != "$PIN" ]; then
  "$VPY" "$PROBE" env-set "$ROOT/$ENV_FILE" "TARS_TLS_PINS=$PIN"
  changed "pinned PC1's TLS certificate in $ENV_FILE (TARS_TLS_PINS=sha256:$PIN)"
fi
ensure_private "$ROOT/$ENV_FILE"
[ "$TLS" = 1 ] && setup_tls pc2
node_address 8001
wsl_advice "$PORT" "${TARS_ADVERTISE_URL:-$(env_get "$ROOT/$ENV_FILE" TARS_ADVERTISE_URL)}"

write_launcher pc2 "$ENV_FILE"
[ "$SERVICE" = 1 ] && setup_service pc2 worker

# ----------------------------------------------------------------------------- 10. self-check
step "Self-check: PC1 reachable and the token accepted"
if ! selfcheck_enabled; then
  info "TARS_SETUP_SELFCHECK=0: skipped"
  summary
  exit 0
fi
check_port "$HOST" "$PORT"
case "$PORT_STATE" in
  node) ok "a TARS node already runs on port $PORT here (./run_pc2.sh is up)" ;;
  other) die "port $PORT on $HOST, which this node will use, is already in use ($PORT_REASON)" \
           "find the program with: ss -ltnp 'sport = :$PORT' — stop it, or set TARS_PORT in $ENV_FILE to a free port" ;;
  *) ok "port $PORT is free for this node" ;;
esac

http_get "$PC1_URL/health"
case "$HTTP_STATUS" in
  unreachable)
    die "PC1 is unreachable at $PC1_URL ($HTTP_BODY)" \
      "start PC1 first (./run_pc1.sh on PC1); check the address ('hostname -I' on PC1) and that PC1's firewall lets TCP ${PC1_URL##*:} in (sudo ufw allow ${PC1_URL##*:}/tcp); 'ping ${PC1_URL#*://}' should answer" ;;
  200) ok "PC1 answers at $PC1_URL/health: ${HTTP_BODY:0:160}" ;;
  503) ok "PC1 answers at $PC1_URL/health (still loading its models): ${HTTP_BODY:0:160}" ;;
  *) die "$PC1_URL/health answered HTTP $HTTP_STATUS: is a TARS Distributed node listening there? (${HTTP_BODY:0:160})" \
       "check the address and port of PC1 (TARS_PORT in PC1's env/.env.pc1)" ;;
esac

http_rpc "$PC1_URL" "$TOKEN" node.health
case "$HTTP_STATUS" in
  200) ok "PC1 accepted the cluster token on /rpc (node.health: ${HTTP_BODY:0:160})" ;;
  401|403)
    die "token rejected: PC1 answered $HTTP_STATUS on /rpc — this token is not PC1's cluster token" \
      "copy the token from PC1 (grep TARS_CLUSTER_TOKEN env/.env.pc1 on PC1) and re-run: bash scripts/setup_pc2.sh ${PC1_ARG:-${PC1_URL#*://}} --token <token>" ;;
  unreachable) die "PC1's /rpc did not answer ($HTTP_BODY)" "check that PC1 is still running and reachable at $PC1_URL" ;;
  *) die "PC1's /rpc answered HTTP $HTTP_STATUS (${HTTP_BODY:0:160})" \
       "PC1 may run an older version: update both hosts to the same checkout and re-run" ;;
esac

summary
printf '\nStart PC2 with:  ./run_pc2.sh      (it joins %s; the dashboard of either host shows both)\n' "$PC1_URL"
