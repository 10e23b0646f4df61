#!/usr/bin/env bash
# Two stock Docker engines side by side on one machine, as two "hosts" for
# the docker htype's tests, demo and benchmark (see ../shared/LAB.md,
# "Docker"). Each engine NAME gets its own data root (/var/lib/phaul-docker-NAME,
# a shared mount: runc's restore needs it), exec root (/run/phaul-docker-NAME),
# API socket (/run/phaul-docker-NAME.sock), containerd, bridge and cgroup
# parent, and stays off the host firewall (--iptables=false). No systemd, no
# registry, and never the machine's own /var/run/docker.sock. A test's
# user-defined networks should name their bridges pdk-NAME-* (`-o
# com.docker.network.bridge.name=...`): stop removes those too.
#
#   scripts/docker-engines.sh start NAME SUBNET_OCTET   # e.g. start a 1: bridge 10.204.1.1/24
#   scripts/docker-engines.sh stop NAME                  # stop it, remove its containers' processes, unmount
#   scripts/docker-engines.sh purge NAME                 # stop, then delete its data root
#   scripts/docker-engines.sh socket NAME                # print its socket path
#
# NAME: 1-11 lower-case letters and digits. SUBNET_OCTET: 0-255, a subnet
# 10.204.OCTET.0/24 no other interface has. Containerd's leftover checkpoint
# copies (TMPDIR) stay under the data root, so purge removes them too.
#
# Needs dockerd (docker.io) and CRIU at /usr/local/sbin/criu (scripts/setup.sh).
set -euo pipefail

log() { printf '[docker-engines] %s\n' "$*" >&2; }
die() { printf '[docker-engines] error: %s\n' "$*" >&2; exit 1; }

cmd=${1:-}; name=${2:-}
[ -n "$cmd" ] && [ -n "$name" ] || die "usage: $0 start|stop|purge|socket NAME [SUBNET_OCTET]"
[[ "$name" =~ ^[a-z0-9]{1,11}$ ]] ||
  die "engine name must be 1-11 lower-case letters and digits (its bridge is pdk-NAME): $name"
root=/var/lib/phaul-docker-$name
exec_root=/run/phaul-docker-$name
sock=$exec_root.sock
pidfile=$exec_root.pid
bridge=pdk-$name
conf=/etc/phaul-docker/$name.json
logf=/var/log/phaul-docker-$name.log

# Whether PID runs: exists and is not a zombie (a dockerd whose parent is a
# subreaper that does not reap it, e.g. a test process, stays one).
alive() {
  local st
  st=$(sed -n 's/^.*) \(.\).*$/\1/p' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}
# The engine's dockerd (the pid file's, if that is a dockerd and runs).
dockerd_pid() {
  local pid
  pid=$(cat "$pidfile" 2>/dev/null) || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] && alive "$pid" &&
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = dockerd ] && echo "$pid"
}
running() { dockerd_pid >/dev/null; }

# The engine's cgroup directories (--cgroup-parent, one per hierarchy; the
# name is matched whole, so engine a never finds engine ab's).
engine_cgroups() {
  find /sys/fs/cgroup -mindepth 1 -maxdepth 6 -type d -name "phaul-docker-$name" -prune 2>/dev/null || true
}

# Its containers' processes, also when dockerd or the shims are gone (their
# containers keep running, reparented to init): SIGKILL to every task in the
# engine's cgroups, thawed first (a paused container's tasks die only when
# thawed).
kill_containers() {
  local cgs pids
  cgs=$(engine_cgroups)
  [ -n "$cgs" ] || return 0
  for _ in $(seq 50); do
    find $cgs -name freezer.state 2>/dev/null | while read -r f; do
      [ "$(cat "$f" 2>/dev/null)" = THAWED ] || echo THAWED >"$f" 2>/dev/null || true
    done
    pids=$(find $cgs -name cgroup.procs -exec cat {} + 2>/dev/null | sort -u)
    [ -n "$pids" ] || return 0
    kill -9 $pids 2>/dev/null || true
    sleep 0.1
  done
  log "warning: $name: processes left in its cgroups: $pids"
}

stop() {
  local pid p cgs
  if pid=$(dockerd_pid); then
    # dockerd stops its containers (up to their stop timeouts) and its
    # containerd.
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 150); do alive "$pid" || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  kill_containers
  # Its containerd and shims, if they outlived it (matched by the exec
  # root with its slash, so that engine a never matches engine ab's).
  for p in $(pgrep -f "containerd.* $exec_root/" || true); do kill -9 "$p" 2>/dev/null || true; done
  for _ in $(seq 50); do pgrep -f "containerd.* $exec_root/" >/dev/null || break; sleep 0.1; done
  # Whatever of its mounts is left (overlay layers, netns, shm), deepest first.
  for m in $(awk -v r="$root/" -v e="$exec_root/" 'index($5, r) == 1 || index($5, e) == 1 {print $5}' \
    /proc/self/mountinfo | sort -r); do
    umount -l "$m" 2>/dev/null || true
  done
  # Its cgroups, now empty (deepest first).
  cgs=$(engine_cgroups)
  if [ -n "$cgs" ]; then find $cgs -depth -type d -exec rmdir {} + 2>/dev/null || true; fi
  rm -f "$pidfile" "$sock"
  ip link del "$bridge" 2>/dev/null || true
  # Bridges of its user-defined networks named after it (pdk-NAME-*: the
  # engine leaves them when it stops).
  for l in $(ip -o link show type bridge | awk -F': ' '{print $2}' | grep "^$bridge-" || true); do
    ip link del "$l" 2>/dev/null || true
  done
}

case "$cmd" in
  socket) echo "$sock" ;;
  start)
    octet=${3:-}
    [[ "$octet" =~ ^[0-9]{1,3}$ ]] && [ "$octet" -le 255 ] ||
      die "start needs a subnet octet 0-255 (10.204.OCTET.0/24)"
    command -v dockerd >/dev/null || die "dockerd not found: apt-get install docker.io (scripts/setup.sh does)"
    if running && [ -S "$sock" ]; then log "$name already runs ($sock)"; echo "$sock"; exit 0; fi
    stop
    # Two engines on one subnet would fight over its route.
    used=$(ip -4 -o addr show to "10.204.$octet.0/24" | awk '{print $2}' | sort -u | xargs)
    [ -z "$used" ] || die "subnet 10.204.$octet.0/24 is in use (on $used): choose another octet"
    mkdir -p "$root" "$exec_root" "$(dirname "$conf")"
    # runc restores mounts with shared propagation into the data root: it
    # must be a shared mount (dockerd makes it one only when it does not look
    # like a child of another engine's root; / is private here).
    if ! awk -v r="$root" '$5 == r {f=1} END {exit !f}' /proc/self/mountinfo; then
      mount --bind "$root" "$root"
    fi
    mount --make-shared "$root"
    ip link add "$bridge" type bridge
    ip addr add "10.204.$octet.1/24" dev "$bridge"
    ip link set "$bridge" up
    echo '{"experimental": true}' >"$conf"
    # runc runs the first criu on PATH: phaul's (4.2) before the
    # distribution's. TMPDIR: containerd (started before dockerd sets its
    # own) copies every checkpoint into a temporary directory and leaves it
    # there (containerd #10166); under the data root, purge removes them.
    env -u XDG_RUNTIME_DIR TMPDIR="$root/tmp" \
      PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin setsid dockerd \
      --config-file "$conf" --data-root "$root" --exec-root "$exec_root" \
      --pidfile "$pidfile" -H "unix://$sock" --bridge="$bridge" \
      --iptables=false --ip-forward=false --ip-masq=false \
      --cgroup-parent="phaul-docker-$name" >"$logf" 2>&1 </dev/null &
    started=$!
    for _ in $(seq 300); do
      if [ -S "$sock" ] && docker -H "unix://$sock" version >/dev/null 2>&1; then
        log "$name: dockerd $(cat "$pidfile") on $sock (data root $root, bridge $bridge 10.204.$octet.1/24, log $logf)"
        echo "$sock"; exit 0
      fi
      kill -0 "$started" 2>/dev/null || break
      sleep 0.1
    done
    tail -n 20 "$logf" >&2 || true
    why="did not answer on $sock within 30 s"
    kill -0 "$started" 2>/dev/null || why="exited"
    stop
    die "dockerd $name $why (log: $logf)"
    ;;
  stop) stop; log "$name stopped" ;;
  purge)
    stop
    while awk -v r="$root" '$5 == r {f=1} END {exit !f}' /proc/self/mountinfo; do
      umount -l "$root" || break
    done
    rm -rf "$root" "$exec_root" "$conf"
    log "$name purged"
    ;;
  *) die "unknown command $cmd (start|stop|purge|socket)" ;;
esac
