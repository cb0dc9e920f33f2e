#!/usr/bin/env bash
# The demo: a local registry, a private containerd and cas-snapshotter, a real image built
# by our fixture builder, pulled with --snapshotter cas and run with runc.
#
#   scripts/demo.sh up     (make demo)       KEEP=1 leaves everything running
#   scripts/demo.sh down   (make demo-down)
#
# Everything lives under $DEMO_DIR (default /tmp/cas-demo); a system containerd is never
# touched (own root, state and sockets).
set -euo pipefail

BIN=${BIN:-$(cd "$(dirname "$0")/.." && pwd)/target/debug}
DEMO_DIR=${DEMO_DIR:-/tmp/cas-demo}
PORT=${PORT:-5055}
REG=127.0.0.1:$PORT
SOCK=$DEMO_DIR/cas.sock
CTRD_SOCK=$DEMO_DIR/containerd/containerd.sock
ROOT=$DEMO_DIR/store
ctr() { command ctr --address "$CTRD_SOCK" "$@"; }
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

down() {
  for p in containerd cas-snapshotter registry; do
    if [ -f "$DEMO_DIR/$p.pid" ]; then
      kill "$(cat "$DEMO_DIR/$p.pid")" 2>/dev/null || true
    fi
  done
  sleep 1
  for p in containerd cas-snapshotter registry; do
    if [ -f "$DEMO_DIR/$p.pid" ]; then
      kill -9 "$(cat "$DEMO_DIR/$p.pid")" 2>/dev/null || true
      rm -f "$DEMO_DIR/$p.pid"
    fi
  done
  # leftover mounts of containers and views, deepest first
  awk -v d="$DEMO_DIR/" 'index($5, d) == 1 {print $5}' /proc/self/mountinfo | sort -r |
    while read -r m; do umount -l "$m" 2>/dev/null || true; done
  rm -rf "$DEMO_DIR"
  echo "demo stopped and removed ($DEMO_DIR)"
}

wait_for() { # wait_for SECONDS CMD...
  local t=$1; shift
  for _ in $(seq "$((t * 10))"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  "$@"
}

up() {
  [ "$(id -u)" = 0 ] || { echo "demo: run as root (it mounts filesystems and starts containerd)" >&2; exit 1; }
  [ -e "$DEMO_DIR" ] && down >/dev/null
  mkdir -p "$DEMO_DIR"/{registry,containerd}
  trap 'echo "demo failed; logs in $DEMO_DIR/*.log" >&2' ERR

  say "starting a local OCI registry on $REG"
  cat > "$DEMO_DIR/registry.yml" <<YML
version: 0.1
log: {level: warn}
storage: {filesystem: {rootdirectory: $DEMO_DIR/registry}}
http: {addr: $REG}
YML
  docker-registry serve "$DEMO_DIR/registry.yml" > "$DEMO_DIR/registry.log" 2>&1 &
  echo $! > "$DEMO_DIR/registry.pid"
  wait_for 10 curl -sf "http://$REG/v2/"

  say "starting cas-snapshotter (store $ROOT, socket $SOCK)"
  "$BIN/cas-snapshotter" --root "$ROOT" --address "$SOCK" > "$DEMO_DIR/cas-snapshotter.log" 2>&1 &
  echo $! > "$DEMO_DIR/cas-snapshotter.pid"
  wait_for 10 test -S "$SOCK"

  say "starting a private containerd with [proxy_plugins.cas]"
  cat > "$DEMO_DIR/containerd.toml" <<TOML
version = 2
root = "$DEMO_DIR/containerd/root"
state = "$DEMO_DIR/containerd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$CTRD_SOCK"
[ttrpc]
  address = "$CTRD_SOCK.ttrpc"
[debug]
  address = "$DEMO_DIR/containerd/debug.sock"
[proxy_plugins]
  [proxy_plugins.cas]
    type = "snapshot"
    address = "$SOCK"
[plugins."io.containerd.internal.v1.opt"]
  path = "$DEMO_DIR/containerd/opt"
TOML
  containerd --config "$DEMO_DIR/containerd.toml" > "$DEMO_DIR/containerd.log" 2>&1 &
  echo $! > "$DEMO_DIR/containerd.pid"
  wait_for 20 ctr version
  grep -A3 'proxy_plugins.cas' "$DEMO_DIR/containerd.toml"

  say "building two fixture images with our builder and pushing them"
  "$BIN/cas-fixture" build --image base --busybox /bin/busybox --out "$DEMO_DIR/img-base"
  "$BIN/cas-fixture" build --image app --busybox /bin/busybox --out "$DEMO_DIR/img-app"
  "$BIN/cas-fixture" push --layout "$DEMO_DIR/img-base" --registry "$REG" --repo fixture/base --tag 1
  "$BIN/cas-fixture" push --layout "$DEMO_DIR/img-app" --registry "$REG" --repo fixture/app --tag 1

  say "ctr images pull --snapshotter cas (the app image shares the base image's first layer)"
  ctr images pull --plain-http --snapshotter cas "$REG/fixture/base:1"
  ctr images pull --plain-http --snapshotter cas "$REG/fixture/app:1"
  ctr snapshots --snapshotter cas ls

  say "ctr run --snapshotter cas: a container reading its rootfs"
  ctr run --rm --snapshotter cas "$REG/fixture/base:1" demo-1 sh -c 'cat /etc/fixture-release; echo; ls -l /'

  say "what is on disk"
  echo "stub layers (metadata only):"; du -sh "$ROOT/snapshots"
  echo "objects (file contents, each once):"; du -sh "$ROOT/cas/objects"
  say "casctl stats"
  "$BIN/casctl" --root "$ROOT" stats
  say "casctl fsck"
  "$BIN/casctl" --root "$ROOT" fsck

  if [ -n "${KEEP:-}" ]; then
    say "left running; try: ctr --address $CTRD_SOCK images ls; make demo-down stops it"
  else
    say "stopping everything the demo started"
    down
  fi
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
