#!/usr/bin/env bash
# Install phaul on this host: build it (release), put `phaul` in PREFIX/bin
# and its htype plugins in PREFIX/lib/phaul/plugins (where `phaul` looks by
# default, next to its binary), CRIU via scripts/setup.sh, and with
# --systemd the phaul-serve unit and its settings file. Idempotent: files
# already up to date are reported as such, and an existing
# /etc/phaul/serve.env is never overwritten.
#
#   sudo ./scripts/install.sh --systemd             # this host, /usr/local
#   ./scripts/install.sh --destdir /tmp/stage --no-criu --systemd   # a staging tree
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  cat <<'EOF'
usage: scripts/install.sh [--prefix DIR] [--destdir DIR] [--no-criu] [--systemd] [--no-build]

  --prefix DIR   install under DIR (default /usr/local): DIR/bin/phaul,
                 DIR/lib/phaul/plugins/*.so
  --destdir DIR  stage the whole tree under DIR (for packaging); allowed
                 without root; needs --no-criu
  --no-criu      do not build and install CRIU (scripts/setup.sh does that:
                 CRIU >= 4.2 into /usr/local/sbin/criu, and `criu check`)
  --systemd      also install /etc/systemd/system/phaul-serve.service and,
                 if missing, /etc/phaul/serve.env (its settings)
  --no-build     install what target/release holds (built before, e.g. as
                 your user with `cargo build --release`)
EOF
}

log() { printf '[install] %s\n' "$*" >&2; }
die() { printf '[install] error: %s\n' "$*" >&2; exit 1; }

prefix=/usr/local destdir="" criu=1 systemd=0 build=1
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; prefix=$2; shift ;;
    --prefix=*) prefix=${1#*=} ;;
    --destdir) [ $# -ge 2 ] || die "--destdir needs a directory"; destdir=$2; shift ;;
    --destdir=*) destdir=${1#*=} ;;
    --no-criu) criu=0 ;;
    --systemd) systemd=1 ;;
    --no-build) build=0 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown option: $1" ;;
  esac
  shift
done
case "$prefix" in /*) ;; *) die "--prefix must be an absolute path (got $prefix)" ;; esac
prefix=${prefix%/}
if [ -n "$destdir" ]; then
  mkdir -p "$destdir"
  destdir=$(cd "$destdir" && pwd)
  [ "$destdir" != / ] || destdir=""
fi

if [ "$(id -u)" != 0 ] && [ -z "$destdir" ]; then
  die "run as root to install into $prefix (or stage a tree with --destdir DIR)"
fi
if [ "$criu" = 1 ] && [ -n "$destdir" ]; then
  die "CRIU is built and installed on this system by scripts/setup.sh (as root, with apt), not under --destdir: pass --no-criu"
fi

# --- CRIU: scripts/setup.sh builds and checks it (idempotent) ---------------
if [ "$criu" = 1 ]; then
  log "CRIU: running scripts/setup.sh"
  ./scripts/setup.sh
fi

# --- Build -------------------------------------------------------------------
target=${CARGO_TARGET_DIR:-target}/release
if [ "$build" = 1 ]; then
  command -v cargo >/dev/null ||
    die "cargo not found${SUDO_USER:+ (sudo resets PATH)}: build as your user with 'cargo build --release', then run this with --no-build"
  log "building phaul (cargo build --release)"
  cargo build --release --quiet
fi

# The htype drivers: the cdylib of every crate under plugins/.
plugins=()
for manifest in plugins/*/Cargo.toml; do
  lib=$(awk '/^\[lib\]/ {l = 1; next} /^\[/ {l = 0}
             l && /^name *=/ {gsub(/[" ]/, ""); sub(/^name=/, ""); print; exit}' "$manifest")
  [ -n "$lib" ] || die "$manifest: no [lib] name (a plugin is a cdylib)"
  plugins+=("$target/lib$lib.so")
done
for f in "$target/phaul" "${plugins[@]}"; do
  [ -f "$f" ] || die "$f is missing: build first (cargo build --release), or drop --no-build"
done

# --- Install -----------------------------------------------------------------
# put SRC DST MODE: install SRC as DST (under DESTDIR), saying whether it changed.
put() {
  local dst="$destdir$2"
  if [ -f "$dst" ] && cmp -s "$1" "$dst" && [ "$(stat -c %a "$dst")" = "${3#0}" ]; then
    log "unchanged  $2"
  else
    install -D -m "$3" "$1" "$dst"
    log "installed  $2"
  fi
}
# dir DIR MODE: create DIR (under DESTDIR) if missing; an existing one is left as it is.
dir() {
  if [ -d "$destdir$1" ]; then return; fi
  install -d -m "$2" "$destdir$1"
  log "created    $1 (mode $2)"
}

bindir=$prefix/bin
plugindir=$prefix/lib/phaul/plugins
put "$target/phaul" "$bindir/phaul" 0755
for p in "${plugins[@]}"; do put "$p" "$plugindir/$(basename "$p")" 0755; done
put README.md "$prefix/share/doc/phaul/README.md" 0644

if [ "$systemd" = 1 ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  # The shipped files name /usr/local; point them at this prefix.
  at_prefix() { sed "s#/usr/local/\(bin/phaul\|lib/phaul\|share/doc/phaul\)#$prefix/\1#g" "$1"; }
  at_prefix deploy/phaul-serve.service >"$tmp/phaul-serve.service"
  at_prefix deploy/phaul.env >"$tmp/serve.env"
  put "$tmp/phaul-serve.service" /etc/systemd/system/phaul-serve.service 0644
  dir /etc/phaul 0755
  dir /etc/phaul/tls 0700
  if [ -e "$destdir/etc/phaul/serve.env" ]; then
    if cmp -s "$tmp/serve.env" "$destdir/etc/phaul/serve.env"; then
      log "unchanged  /etc/phaul/serve.env"
    else
      log "kept       /etc/phaul/serve.env (yours; the shipped one is deploy/phaul.env)"
    fi
  else
    put "$tmp/serve.env" /etc/phaul/serve.env 0644
  fi
  if [ -z "$destdir" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    log "systemctl daemon-reload: done"
  fi
fi

# --- Check -------------------------------------------------------------------
# The installed binary must find the installed plugins on its own.
log "phaul htypes (the installed binary, its default plugin directory):"
env -u PHAUL_PLUGIN_DIR "$destdir$bindir/phaul" htypes >&2 ||
  die "$destdir$bindir/phaul loads no driver from $destdir$plugindir"
log "done: $bindir/phaul, plugins in $plugindir${destdir:+ (under $destdir)}"
if [ "$systemd" = 1 ]; then
  log "next: certificates in /etc/phaul/tls (phaul certs issue ... --out /etc/phaul/tls),"
  log "      settings in /etc/phaul/serve.env, then: systemctl enable --now phaul-serve"
fi
