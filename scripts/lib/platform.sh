# shellcheck shell=bash disable=SC2034  # sourced by scripts/lib/setup_common.sh
# Where the node runs: WSL2 on a Windows PC needs a few settings outside Linux, which the
# setup scripts can only name (QUICK_START.md, "Windows PCs (WSL2)", has the whole path).
#
# Overrides (tests): TARS_OSRELEASE_FILE (default /proc/sys/kernel/osrelease),
#                    TARS_WSL_CONF (default /etc/wsl.conf)

is_wsl() { grep -qiE 'microsoft|wsl' "${TARS_OSRELEASE_FILE:-/proc/sys/kernel/osrelease}" 2>/dev/null; }

# on_windows_drive PATH: the path is on a Windows drive mounted into WSL (drvfs / 9p: /mnt/c ...),
# where chmod does not stick (no "metadata" mount option) and file I/O is slow.
on_windows_drive() {
  local fs
  fs=$(stat -f -c %T "$1" 2>/dev/null || echo "")
  case "$fs" in v9fs|9p|drvfs|fuseblk) return 0 ;; esac
  case "$1" in /mnt/[a-z]/*) return 0 ;; esac
  return 1
}

wsl_systemd_hint() {
  is_wsl || return 0
  info "WSL: systemd starts with WSL once /etc/wsl.conf has, then 'wsl --shutdown' in Windows and reopen:"
  info "  [boot]"
  info "  systemd=true"
}

# wsl_advice PORT ADVERTISED_URL: what to set outside Linux so the LAN reaches this node.
wsl_advice() {
  is_wsl || return 0
  local port=$1 relay=$(( $1 + 1 )) addr=$2
  warn "this is WSL2 on Windows: the LAN reaches the node only with these settings (QUICK_START.md, 'Windows PCs'):"
  info "  1. mirrored networking: in %UserProfile%\\.wslconfig on Windows"
  info "       [wsl2]"
  info "       networkingMode=mirrored"
  info "     then 'wsl --shutdown' (with the default NAT networking WSL has a 172.x address the LAN cannot reach)"
  info "  2. the advertised address must be the Windows PC's LAN address: TARS_ADVERTISE_URL in $ENV_FILE is now"
  info "       ${addr:-(unset)}  — correct it if 'ipconfig' on Windows shows another one"
  info "  3. the firewalls: in an administrator PowerShell on Windows"
  info "       New-NetFirewallRule -DisplayName 'TARS $port' -Direction Inbound -Protocol TCP -LocalPort $port,$relay -Action Allow"
  info "       New-NetFirewallHyperVRule -Name TARS-$port -DisplayName 'TARS $port' -Direction Inbound -VMCreatorId '{40E0AC32-46A5-438A-A0B2-2B479E8F2E90}' -Protocol TCP -LocalPorts $port,$relay"
  info "     (UDP 5353 too, for LAN discovery: the same two commands with -Protocol UDP and port 5353)"
  if ! grep -qsE '^[[:space:]]*systemd[[:space:]]*=[[:space:]]*true' "${TARS_WSL_CONF:-/etc/wsl.conf}"; then
    info "  4. for a service that starts with WSL: /etc/wsl.conf with [boot] systemd=true, then --service"
  fi
  info "  WSL stops when no process a user started runs in it (systemd services do not count): a Windows"
  info "  Task Scheduler task at startup running 'wsl.exe -d <distro> --exec sleep infinity' keeps it up"
  if on_windows_drive "$ROOT"; then
    warn "the checkout is on a Windows drive ($ROOT): move it into the WSL file system (e.g. ~/tars) —"
    warn "file permissions do not hold there (the env file's secrets stay readable) and disk access is slow"
  fi
}
