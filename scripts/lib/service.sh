# shellcheck shell=bash disable=SC2034  # sourced by scripts/setup_pc1.sh and scripts/setup_pc2.sh
# The node as a systemd service: `--service` writes the unit and installs it, `--remove-service`
# takes it out. The unit itself is rendered by scripts/lib/service_unit.py (its docstring says
# what each line is for); a copy always lands in env/ where the user can read it:
#   env/tars-<node>.service       the system unit (/etc/systemd/system, runs as the checkout's owner)
#   env/tars-<node>-user.service  the user unit   (~/.config/systemd/user, with loginctl enable-linger)
# Root where systemd runs: installed, enabled and (re)started, and the script waits until the
# node has told systemd READY=1. Elsewhere: the exact commands are printed.
#
# Overrides (tests, unusual layouts):
#   TARS_SYSTEMD_UNIT_DIR   where system units go (default /etc/systemd/system)
#   TARS_SYSTEMD_RUNNING    1/0: whether systemd runs here (default: /run/systemd/system exists)
#   TARS_SERVICE_TIMEOUT    seconds to wait for the started service to be active (default 600)

SERVICE_UNIT_DIR=${TARS_SYSTEMD_UNIT_DIR:-/etc/systemd/system}

systemd_running() {
  case "${TARS_SYSTEMD_RUNNING:-}" in 1) return 0 ;; 0) return 1 ;; esac
  [ -d /run/systemd/system ]
}
is_root() { [ "$(id -u)" = 0 ]; }

# service_node NODE_DEFAULT: the node name (TARS_NODE_NAME, its env file, else the default)
# and the unit's name: sets SERVICE_NODE, SERVICE_UNIT.
service_node() {
  SERVICE_NODE=${TARS_NODE_NAME:-$(env_get "$ROOT/$ENV_FILE" TARS_NODE_NAME)}
  SERVICE_NODE=${SERVICE_NODE:-$1}
  SERVICE_UNIT="tars-$SERVICE_NODE.service"
}

# The account the system unit runs as: the one who ran sudo, else the checkout's owner.
service_user() {
  local u=${SUDO_USER:-}
  [ -n "$u" ] && [ "$u" != root ] || u=$(stat -c %U "$ROOT" 2>/dev/null || id -un)
  printf '%s' "$u"
}

# The models folder the node will use, as that account sees it (~ is its home).
service_models_dir() {
  local home
  home=$(getent passwd "$1" 2>/dev/null | cut -d: -f6)
  (cd "$ROOT" && HOME=${home:-$HOME} "$VPY" -c 'import sys
from distributed.settings import load_settings
print(load_settings(sys.argv[1]).models_dir)' "$ENV_FILE" 2>/dev/null) || true
}

# render_unit MODE USER: the unit text (mode system|user).
render_unit() {
  local mode=$1 user=$2 group="" modprobe="" models
  if [ "$mode" = system ]; then
    group=$(id -gn "$user" 2>/dev/null || true)
    modprobe=$(command -v nvidia-modprobe 2>/dev/null || true)
  fi
  models=$(service_models_dir "$user")
  "$VPY" "$ROOT/scripts/lib/service_unit.py" render --name "$SERVICE_NODE" --role "$SERVICE_ROLE" \
    --root "$ROOT" --python "$VPY" --env-file "$ENV_FILE" --mode "$mode" --user "$user" --group "$group" \
    --models-dir "$models" --nvidia-modprobe "$modprobe" --script "$SERVICE_SCRIPT"
}

# same_unit FILE TEXT: FILE holds TEXT but for the "Written ... on <date>" line (a re-run changes nothing).
same_unit() { [ -f "$1" ] && [ "$(sed 2d "$1")" = "$(printf '%s\n' "$2" | sed 2d)" ]; }

# put_unit PATH TEXT WHAT: PATH (0644, readable by anyone: it holds no secret) unless it is the same.
put_unit() {
  if same_unit "$1" "$2"; then
    unchanged "$3 is up to date"
  else
    mkdir -p "$(dirname "$1")"
    printf '%s\n' "$2" >"$1"
    chmod 0644 "$1"
    changed "wrote $3"
  fi
}

# setup_service NODE ROLE: the service step of setup_pcN.sh --service.
setup_service() {
  SERVICE_ROLE=$2
  SERVICE_SCRIPT=setup_$1.sh
  step "Service (systemd): start at boot, restart on failure"
  service_node "$1"
  local user sys_text user_text sys_copy=env/tars-$SERVICE_NODE.service user_copy=env/tars-$SERVICE_NODE-user.service
  user=$(service_user)
  sys_text=$(render_unit system "$user") || die "could not write the systemd unit" "see the error above"
  user_text=$(render_unit user "$user") || die "could not write the systemd user unit" "see the error above"
  put_unit "$ROOT/$sys_copy" "$sys_text" "$sys_copy (the system unit)"
  put_unit "$ROOT/$user_copy" "$user_text" "$user_copy (the same as a user unit)"
  if [ "$user" = root ]; then
    warn "the checkout belongs to root, so the service runs as root: a checkout owned by a normal user is safer"
  fi

  if systemd_running && is_root; then
    install_system_unit "$sys_copy"
  elif systemd_running; then
    print_service_commands "$sys_copy" "$user_copy" "$user"
  else
    warn "systemd is not running here, so nothing was installed"
    wsl_systemd_hint
    print_service_commands "$sys_copy" "$user_copy" "$user"
  fi
}

install_system_unit() {
  local copy=$1 dest=$SERVICE_UNIT_DIR/$SERVICE_UNIT reload=0
  if same_unit "$dest" "$(cat "$ROOT/$copy")"; then
    unchanged "$dest is installed"
  else
    install -m 0644 "$ROOT/$copy" "$dest" || die "could not install $dest" "run this script as root (sudo)"
    changed "installed $dest"
    reload=1
  fi
  if [ "$reload" = 1 ]; then systemctl daemon-reload; fi
  if ! systemctl is-enabled --quiet "$SERVICE_UNIT" 2>/dev/null; then
    systemctl enable "$SERVICE_UNIT" 2>&1 | sed 's/^/      /'
    changed "enabled $SERVICE_UNIT (it starts at boot)"
  fi
  if [ "$reload" = 0 ] && systemctl is-active --quiet "$SERVICE_UNIT"; then
    unchanged "$SERVICE_UNIT is running"
  else
    info "starting $SERVICE_UNIT (the node tells systemd READY=1 once /health answers 200)"
    systemctl restart --no-block "$SERVICE_UNIT"
    wait_service_active
    changed "started $SERVICE_UNIT"
  fi
  info "status: systemctl status $SERVICE_UNIT    logs: journalctl -u $SERVICE_UNIT -f"
}

# wait_service_active: until systemd reports the unit active (READY=1 arrived), showing the
# node's own STATUS= line; a failed start shows the journal and stops the script.
wait_service_active() {
  local start now state text last="" timeout=${TARS_SERVICE_TIMEOUT:-600}
  start=$(date +%s)
  while :; do
    state=$(systemctl show -p ActiveState --value "$SERVICE_UNIT" 2>/dev/null || echo unknown)
    text=$(systemctl show -p StatusText --value "$SERVICE_UNIT" 2>/dev/null || true)
    now=$(date +%s)
    [ -n "$text" ] && [ "$text" != "$last" ] && { info "$SERVICE_UNIT: $text"; last=$text; }
    case "$state" in
      active) ok "$SERVICE_UNIT is active after $((now - start))s: ${text:-ready}"; return 0 ;;
      failed|inactive)
        if [ $((now - start)) -ge 3 ]; then
          journalctl -u "$SERVICE_UNIT" -n 30 --no-pager 2>/dev/null | sed 's/^/        /' >&2 || true
          die "$SERVICE_UNIT did not start (state $state)" \
            "see: journalctl -u $SERVICE_UNIT -e; run ./run_$SERVICE_NODE.sh in the foreground to see the error"
        fi ;;
    esac
    [ $((now - start)) -ge "$timeout" ] && die "$SERVICE_UNIT is still $state after ${timeout}s (${text:-no status})" \
      "follow it with: journalctl -u $SERVICE_UNIT -f (a first start may pull models for a long time)"
    sleep 1
  done
}

print_service_commands() {
  local sys_copy=$1 user_copy=$2 user=$3
  info ""
  info "${_B}To run it as a system service${_0} (starts at boot, runs as $user), as root:"
  info "  sudo install -m 0644 $ROOT/$sys_copy $SERVICE_UNIT_DIR/$SERVICE_UNIT"
  info "  sudo systemctl daemon-reload && sudo systemctl enable --now $SERVICE_UNIT"
  info "  (or simply re-run this script with sudo and --service)"
  info "${_B}Or, without root, as a user service${_0} of $(id -un):"
  info "  mkdir -p ~/.config/systemd/user"
  info "  install -m 0644 $ROOT/$user_copy ~/.config/systemd/user/$SERVICE_UNIT"
  info "  systemctl --user daemon-reload && systemctl --user enable --now $SERVICE_UNIT"
  info "  loginctl enable-linger $(id -un)     # start at boot, without logging in"
  info "Status: systemctl [--user] status $SERVICE_UNIT    Logs: journalctl [--user] -u $SERVICE_UNIT -f"
}

# remove_service NODE_DEFAULT: --remove-service. Takes out what this account can remove and
# prints the commands for the rest.
remove_service() {
  service_node "$1"
  printf '%sTARS Distributed — removing the service %s%s\n' "$_B" "$SERVICE_UNIT" "$_0"
  local dest=$SERVICE_UNIT_DIR/$SERVICE_UNIT user_dest=${XDG_CONFIG_HOME:-$HOME/.config}/systemd/user/$SERVICE_UNIT f
  if [ -f "$dest" ]; then
    if is_root; then
      if systemd_running; then
        systemctl disable --now "$SERVICE_UNIT" 2>&1 | sed 's/^/      /' || true
      fi
      rm -f "$dest"
      if systemd_running; then systemctl daemon-reload; fi
      changed "stopped, disabled and removed $dest"
    else
      warn "$dest is a system unit: remove it as root:"
      info "  sudo systemctl disable --now $SERVICE_UNIT && sudo rm $dest && sudo systemctl daemon-reload"
      info "  (or: sudo bash scripts/$SERVICE_SCRIPT --remove-service)"
    fi
  fi
  if [ -f "$user_dest" ]; then
    if systemd_running; then
      systemctl --user disable --now "$SERVICE_UNIT" 2>&1 | sed 's/^/      /' || true
    fi
    rm -f "$user_dest"
    if systemd_running; then systemctl --user daemon-reload 2>/dev/null || true; fi
    changed "stopped, disabled and removed the user unit $user_dest"
  fi
  for f in "$ROOT/env/tars-$SERVICE_NODE.service" "$ROOT/env/tars-$SERVICE_NODE-user.service"; do
    if [ -f "$f" ]; then rm -f "$f"; changed "removed ${f#"$ROOT"/}"; fi
  done
  summary
}
