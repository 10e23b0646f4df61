#!/usr/bin/env bash
# Make a fresh Debian 12 machine (as root) ready to build, test and run phaul:
# build dependencies, CRIU >= 4.2 built from Debian's newer source package
# (the distribution's 3.17 fails on this kernel, 4.1 cannot dump sockets on
# Linux 6.16+), and the tools the tests use. Idempotent: whatever is already
# in place is skipped, so a second run takes seconds.
set -euo pipefail

CRIU_MIN="4.2"
CRIU_SUITE="${PHAUL_CRIU_SUITE:-sid}"
CRIU_PREFIX=/usr/local
# CRIU caches what it learns about the kernel (~30 ms of probing per CRIU
# request otherwise) in RUNDIR, but only on tmpfs. phaul's CRIU keeps it in
# /run/criu; where /run is not tmpfs, setup mounts a small tmpfs there.
CRIU_RUNDIR=/run/criu
CACHE="${PHAUL_SETUP_CACHE:-/var/cache/phaul-setup}"

log() { printf '[setup] %s\n' "$*" >&2; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (CRIU needs it to checkpoint and restore)"

# --- Debian packages ---------------------------------------------------------
CRIU_BUILD_DEPS=(libprotobuf-dev libprotobuf-c-dev protobuf-c-compiler protobuf-compiler
  python3-protobuf libnl-3-dev libnet1-dev libcap-dev pkg-config libbsd-dev
  libgnutls28-dev uuid-dev libnftables-dev build-essential xz-utils)
RUNTIME_PKGS=(iproute2 util-linux attr procps psmisc rsync)
# The lxc htype's tests and demo: LXC itself and the busybox template's
# static busybox (containers are created offline).
LXC_PKGS=(lxc busybox-static)
# The docker htype's tests and demo: the stock engine (dockerd, containerd,
# runc). They start engines of their own with scripts/docker-engines.sh;
# the package's own service is never started (see below).
DOCKER_PKGS=(docker.io)

not_installed() {
  local p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
  done
}
mapfile -t missing < <(not_installed "${CRIU_BUILD_DEPS[@]}" "${RUNTIME_PKGS[@]}" "${LXC_PKGS[@]}")
mapfile -t missing_docker < <(not_installed "${DOCKER_PKGS[@]}")
if [ ${#missing[@]} -gt 0 ] || [ ${#missing_docker[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
else
  log "packages: already installed"
fi
if [ ${#missing[@]} -gt 0 ]; then
  log "installing packages: ${missing[*]}"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if [ ${#missing_docker[@]} -gt 0 ]; then
  # docker.io's maintainer scripts start the machine's own engine (on
  # /var/run/docker.sock, managing the firewall) where an init system runs
  # services (not here: no systemd, no runlevel). Unless the machine has a
  # policy of its own, a policy-rc.d denying every start keeps it stopped.
  policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    policy=/usr/sbin/policy-rc.d
    trap 'rm -f "$policy"' EXIT
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 0755 "$policy"
  fi
  log "installing packages: ${missing_docker[*]}"
  apt-get install -y -qq --no-install-recommends "${missing_docker[@]}" >/dev/null
  if [ -n "$policy" ]; then rm -f "$policy"; trap - EXIT; fi
fi

# --- CRIU --------------------------------------------------------------------
version_ge() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]; }

criu_version() {
  "$1" --version 2>/dev/null | awk '/^Version:/ {print $2}'
}

have=""
if [ -x "$CRIU_PREFIX/sbin/criu" ]; then have=$(criu_version "$CRIU_PREFIX/sbin/criu" || true); fi
if [ -n "$have" ] && version_ge "$have" "$CRIU_MIN" && [ -f "$CRIU_PREFIX/share/phaul/criu-src/images/rpc.proto" ] &&
  grep -qa "$CRIU_RUNDIR/criu.kdat" "$CRIU_PREFIX/sbin/criu"; then
  log "criu $have: already installed"
else
  log "building CRIU >= $CRIU_MIN from Debian's $CRIU_SUITE source package"
  mkdir -p "$CACHE"
  srclist=/etc/apt/sources.list.d/phaul-criu-src.list
  trap 'rm -f "$srclist"; apt-get update -qq >/dev/null 2>&1 || true' EXIT
  echo "deb-src http://deb.debian.org/debian $CRIU_SUITE main" >"$srclist"
  apt-get update -qq
  # The checksum Debian publishes for the upstream tarball.
  sha=$(apt-cache showsrc criu | awk '
      /^Version:/ {v=$2}
      /^Checksums-Sha256:/ {s=1; next}
      s && /^ / && /orig\.tar/ {print $1; exit}
      /^[A-Z]/ {s=0}')
  (cd "$CACHE" && rm -rf criu-src-dl && mkdir criu-src-dl && cd criu-src-dl &&
    apt-get source --download-only criu >/dev/null 2>&1 || true)
  orig=$(ls "$CACHE"/criu-src-dl/criu_*.orig.tar.* 2>/dev/null | head -n1)
  [ -n "$orig" ] || die "could not download the CRIU source package from $CRIU_SUITE"
  if [ -n "$sha" ]; then
    echo "$sha  $orig" | sha256sum -c --quiet - || die "checksum mismatch for $orig"
  fi
  rm -f "$srclist"; trap - EXIT; apt-get update -qq >/dev/null 2>&1 || true
  build="$CACHE/build"
  rm -rf "$build" && mkdir -p "$build"
  tar -xf "$orig" -C "$build" --strip-components=1
  log "compiling CRIU (about 30 s)"
  make -C "$build" -j"$(nproc)" criu RUNDIR="$CRIU_RUNDIR" >"$CACHE/criu-build.log" 2>&1 ||
    { tail -n 30 "$CACHE/criu-build.log" >&2; die "CRIU build failed (log: $CACHE/criu-build.log)"; }
  install -D -m 0755 "$build/criu/criu" "$CRIU_PREFIX/sbin/criu"
  # Keep the RPC and image definitions: phaul's CRIU RPC messages follow them.
  rm -rf "$CRIU_PREFIX/share/phaul/criu-src" && mkdir -p "$CRIU_PREFIX/share/phaul/criu-src"
  cp -r "$build/images" "$CRIU_PREFIX/share/phaul/criu-src/"
  have=$(criu_version "$CRIU_PREFIX/sbin/criu")
  version_ge "$have" "$CRIU_MIN" || die "built CRIU $have, need >= $CRIU_MIN"
  log "installed criu $have at $CRIU_PREFIX/sbin/criu"
fi

# The kernel-feature cache directory, on tmpfs so that a reboot clears it.
mkdir -p "$CRIU_RUNDIR"
if [ "$(stat -f -c %T "$CRIU_RUNDIR")" != tmpfs ]; then
  mount -t tmpfs -o size=1m,mode=0700 phaul-criu-kdat "$CRIU_RUNDIR"
  log "mounted a tmpfs on $CRIU_RUNDIR for CRIU's kernel-feature cache (/run is not tmpfs here)"
fi

# CRIU must work on this kernel (it logs a harmless RLIMIT_NOFILE error here).
if ! out=$("$CRIU_PREFIX/sbin/criu" check 2>&1); then
  printf '%s\n' "$out" | tail -n 5 >&2
  die "criu check failed on this kernel"
fi
log "criu check: $(printf '%s\n' "$out" | tail -n1)"

# Post-copy: CRIU's lazy dump grows a pipe to 4 MiB, which root without
# CAP_SYS_RESOURCE (as here) may do only up to fs.pipe-max-size (1 MiB by
# default); phaul raises it itself when it must, saying so.
if [ "$(cat /proc/sys/fs/pipe-max-size)" -lt 4194304 ]; then
  sysctl -qw fs.pipe-max-size=4194304
  log "set fs.pipe-max-size=4194304 (CRIU's lazy dump, for --post-copy)"
fi

# --- Rust --------------------------------------------------------------------
command -v cargo >/dev/null || die "cargo not found: install a Rust toolchain (rustup) first"
if ! command -v cargo-nextest >/dev/null && ! cargo nextest --version >/dev/null 2>&1; then
  log "cargo-nextest not found: tests will run with cargo test"
fi
log "ready"
