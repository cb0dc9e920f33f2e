#!/usr/bin/env bash
# The demo: a local registry, a private containerd and cas-snapshotter, two images built by
# our fixture builder that share content, pulled with --snapshotter cas and run with runc.
# With containerd 2.x (make deps unpacks it beside the system's 1.6) layers are applied by
# our differ (cas-diff) in one pass, and the demo shows what each pull wrote; with 1.6 they
# are written by containerd's applier and ingested at Commit.
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
CTRD_CACHE=${CAS_CONTAINERD_CACHE:-/var/cache/cas-snapshotter/containerd}
CTRD_BIN=
if [ -x "$CTRD_CACHE/2/usr/bin/containerd" ] && [ -x "$CTRD_CACHE/2/usr/bin/ctr" ]; then
  CTRD_BIN=$CTRD_CACHE/2/usr/bin
fi
# the ctr of the same release (the system's is found on PATH, past this function)
ctr() {
  if [ -n "$CTRD_BIN" ]; then "$CTRD_BIN/ctr" --address "$CTRD_SOCK" "$@"
  else command ctr --address "$CTRD_SOCK" "$@"; fi
}
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

# What the last pull's layers cost, from the daemon's log: per layer, its files' bytes
# against the bytes of new content written, and whether cas-diff applied it in one pass
# or containerd's applier wrote it and Commit ingested it.
LOG_SEEN=0
pull_cost() {
  local log=$DEMO_DIR/cas-snapshotter.log
  local lines; lines=$(tail -n +"$((LOG_SEEN + 1))" "$log")
  LOG_SEEN=$(wc -l < "$log")
  echo "-- what pulling $1 cost:"
  sed 's/\x1b\[[0-9;]*m//g' <<<"$lines" | awk '
    / layer applied / { how = "applied in one pass (cas-diff)" }
    / committed .*applied=false/ { how = "written by containerd, ingested at Commit" }
    / layer applied | committed .*applied=false/ {
      delete v
      for (i = 1; i <= NF; i++) { n = index($i, "="); if (n) v[substr($i, 1, n - 1)] = substr($i, n + 1) }
      printf "   layer %s: %s files, %.1f MB of file content, %.2f MB new written, %s ms\n",
        how, v["files"], v["logical_bytes"] / 1e6, v["new_bytes"] / 1e6, v["elapsed_ms"]
    }'
}

# What both configs share: a root, state and sockets of the demo's own, and cas.
containerd_common_config() { # VERSION DISABLED_PLUGINS QUOTE
  cat <<TOML
version = $1
root = "$DEMO_DIR/containerd/root"
state = "$DEMO_DIR/containerd/state"
disabled_plugins = [$2]
[grpc]
  address = "$CTRD_SOCK"
[ttrpc]
  address = "$CTRD_SOCK.ttrpc"
[debug]
  address = "$DEMO_DIR/containerd/debug.sock"
[plugins.$3io.containerd.internal.v1.opt$3]
  path = "$DEMO_DIR/containerd/opt"
[proxy_plugins]
  [proxy_plugins.cas]
    type = "snapshot"
    address = "$SOCK"
TOML
}

# containerd 2.x: the transfer service unpacks into cas with cas-diff (and into overlayfs
# with walking); other client-side unpacks go through the diff service, cas-diff first.
containerd_v3_config() {
  containerd_common_config 3 '"io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime", "io.containerd.podsandbox.controller.v1.podsandbox", "io.containerd.nri.v1.nri"' "'"
  cat <<TOML
  [proxy_plugins.cas-diff]
    type = "diff"
    address = "$SOCK"
[plugins.'io.containerd.service.v1.diff-service']
  default = ["cas-diff", "walking"]
[plugins.'io.containerd.transfer.v1.local']
  config_path = "$DEMO_DIR/containerd/certs.d"
  [[plugins.'io.containerd.transfer.v1.local'.unpack_config]]
    platform = "linux"
    snapshotter = "cas"
    differ = "cas-diff"
  [[plugins.'io.containerd.transfer.v1.local'.unpack_config]]
    platform = "linux"
    snapshotter = "overlayfs"
    differ = "walking"
TOML
}

# containerd 1.6 (config version 2): no proxy differs (a type = "diff" entry panics it).
containerd_v2_config() {
  containerd_common_config 2 '"io.containerd.grpc.v1.cri"' '"'
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
  # The differ reads blobs from this containerd's content store, or else through its socket.
  cat > "$DEMO_DIR/cas-snapshotter.toml" <<TOML
[differ]
content_dir = "$DEMO_DIR/containerd/root/io.containerd.content.v1.content"
containerd_address = "$CTRD_SOCK"
TOML
  cat "$DEMO_DIR/cas-snapshotter.toml"
  "$BIN/cas-snapshotter" --root "$ROOT" --address "$SOCK" --config "$DEMO_DIR/cas-snapshotter.toml" \
    > "$DEMO_DIR/cas-snapshotter.log" 2>&1 &
  echo $! > "$DEMO_DIR/cas-snapshotter.pid"
  wait_for 10 test -S "$SOCK"

  if [ -n "$CTRD_BIN" ]; then
    say "starting a private containerd $("$CTRD_BIN/containerd" --version | awk '{print $3}') with [proxy_plugins.cas] and cas-diff"
    containerd_v3_config > "$DEMO_DIR/containerd.toml"
    # plain HTTP for the local registry (the transfer service reads hosts.toml)
    mkdir -p "$DEMO_DIR/containerd/certs.d/$REG"
    printf 'server = "http://%s"\n[host."http://%s"]\n  capabilities = ["pull", "resolve"]\n' \
      "$REG" "$REG" > "$DEMO_DIR/containerd/certs.d/$REG/hosts.toml"
  else
    say "starting the system's containerd $(containerd --version | awk '{print $3}') with [proxy_plugins.cas]"
    echo "containerd 2.x is not in $CTRD_CACHE/2 (make deps unpacks it): 1.6 has no proxy differs, so"
    echo "layers are written by containerd's applier and ingested at Commit (the slower path)"
    containerd_v2_config > "$DEMO_DIR/containerd.toml"
  fi
  # a cached release finds its own shim on PATH first
  PATH="${CTRD_BIN:+$CTRD_BIN:}$PATH" "${CTRD_BIN:+$CTRD_BIN/}containerd" --config "$DEMO_DIR/containerd.toml" \
    > "$DEMO_DIR/containerd.log" 2>&1 &
  echo $! > "$DEMO_DIR/containerd.pid"
  wait_for 20 ctr version
  sed -n '/^\[proxy_plugins\]/,$p' "$DEMO_DIR/containerd.toml"

  say "building two fixture images with our builder and pushing them"
  "$BIN/cas-fixture" build --image base --busybox /bin/busybox --out "$DEMO_DIR/img-base"
  "$BIN/cas-fixture" build --image app --busybox /bin/busybox --out "$DEMO_DIR/img-app"
  "$BIN/cas-fixture" push --layout "$DEMO_DIR/img-base" --registry "$REG" --repo fixture/base --tag 1
  "$BIN/cas-fixture" push --layout "$DEMO_DIR/img-app" --registry "$REG" --repo fixture/app --tag 1

  say "ctr images pull --snapshotter cas: the base image, then the app image, which shares its first layer and a 2 MiB file"
  ctr images pull --plain-http --snapshotter cas "$REG/fixture/base:1"
  pull_cost base
  ctr images pull --plain-http --snapshotter cas "$REG/fixture/app:1"
  pull_cost app
  ctr snapshots --snapshotter cas ls

  say "ctr run --snapshotter cas: a container reading its rootfs"
  ctr run --rm --snapshotter cas "$REG/fixture/base:1" demo-1 sh -c 'cat /etc/fixture-release; echo; ls -l /'

  say "what is on disk"
  # -x: an image layer is mounted at its fs; count the image, not the tree it shows
  echo "layers (metadata only: EROFS images or stub trees):"; du -shx "$ROOT/snapshots"
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
