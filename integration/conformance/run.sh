#!/usr/bin/env bash
# containerd's snapshotter conformance suite and benchmark against remote snapshotters.
#
#   run.sh build                        build into $BUILD (again only when an input changed)
#   run.sh suite 'CMD TEMPLATE' | ref   containerd's snapshots/testsuite against CMD
#   run.sh bench 'CMD A' ['CMD B' ...]  containerd's snapshots/benchsuite on each CMD
#   run.sh ref-cmd                      print the reference server's template
#   run.sh clean                        unmount what is left under $CONF_TMP, remove it
#
# A template's {root} is a fresh root directory per instance, {sock} the socket to serve
# ({root}.sock); `ref` is containerd's overlayfs served the same way. suite and bench need root.
# Env: BUILD (default <repo>/target/conformance), CONF_TMP (default /tmp/cas-conformance),
#      LOGS (default $BUILD/logs), RUN (regex of suite cases, e.g. 'Basic|Walk'),
#      PARALLEL (cases at once, default 4), TIMEOUT (default 30m), VERBOSE=1 (print the
#      suite's test log), LABELS (bench: comma list, one per CMD), BENCHTIME (default 5x),
#      COUNT (default 1), SNAPSHOTTER_NAME (in requests, default cas),
#      START_TIMEOUT / STOP_TIMEOUT (seconds: until the socket serves, SIGTERM to SIGKILL).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
BUILD="${BUILD:-$REPO/target/conformance}"
CONF_TMP="${CONF_TMP:-/tmp/cas-conformance}"
LOGS="${LOGS:-$BUILD/logs}"
GOCODE=/usr/share/gocode
CONTAINERD="$GOCODE/src/github.com/containerd/containerd"
BIN="$BUILD/bin"
REF="$BIN/refsnapshotter --root {root} --address {sock}"

export GO111MODULE=off GOPROXY=off GOFLAGS=
export GOPATH="$BUILD/gopath:$GOCODE" GOCACHE="$BUILD/gocache"
export CONFORMANCE_NAME="${SNAPSHOTTER_NAME:-cas}"
export CONFORMANCE_START_TIMEOUT="${START_TIMEOUT:-20}" CONFORMANCE_STOP_TIMEOUT="${STOP_TIMEOUT:-10}"

die() { echo "run.sh: $*" >&2; exit 2; }

build() {
  command -v go >/dev/null || die "go not found (apt-get install golang-go)"
  [ -d "$CONTAINERD/snapshots/testsuite" ] ||
    die "containerd sources not found (apt-get install golang-github-containerd-containerd-dev)"
  mkdir -p "$BIN"
  exec 9>"$BUILD/.lock"
  flock 9
  local upstream="$CONTAINERD/snapshots/benchsuite/benchmark_test.go" stamp
  stamp="$( { go version; dpkg-query -W golang-github-containerd-containerd-dev 2>/dev/null || true
              cat "$upstream" "$HERE/run.sh"
              cd "$HERE" && find harness refsnapshotter summary -name '*.go' | sort | xargs cat; } |
            sha256sum | cut -d' ' -f1)"
  if [ "$(cat "$BUILD/stamp" 2>/dev/null)" = "$stamp" ] &&
     [ -x "$BIN/refsnapshotter" ] && [ -x "$BIN/summary" ] && [ -x "$BIN/harness.test" ]; then
    exec 9>&-; return 0
  fi
  echo "run.sh: building into $BUILD" >&2
  local src="$BUILD/gopath/src/casconformance"
  rm -rf "$src" "$BUILD/stamp"
  mkdir -p "$src"
  cp -r "$HERE/harness" "$HERE/refsnapshotter" "$HERE/summary" "$src/"
  # Upstream keeps the benchmark driver in a _test.go file: an unmodified copy joins our
  # harness package. The go.mod only makes GOPATH mode resolve gotest.tools/v3 imports
  # (minimal module compatibility applies to code in a tree with a go.mod).
  cp "$upstream" "$src/harness/benchmark_test.go"
  printf 'module casconformance\n\ngo 1.19\n' >"$src/go.mod"
  go build -o "$BIN/refsnapshotter" casconformance/refsnapshotter
  go build -o "$BIN/summary" casconformance/summary
  go test -c -o "$BIN/harness.test" casconformance/harness
  echo "$stamp" >"$BUILD/stamp"
  exec 9>&-
}

template() { if [ "$1" = ref ]; then echo "$REF"; else echo "$1"; fi; }

need_root() { [ "$(id -u)" = 0 ] || die "$1 needs root (it mounts)"; }

# Lazily unmounts every mount point under $1, deepest first, then removes $1.
sweep() {
  awk -v p="$1/" 'index($5, p) == 1 { print $5 }' /proc/self/mountinfo | sort -r |
    while read -r m; do umount -l "$m" && echo "run.sh: unmounted $m" >&2; done
  rm -rf "$1"
}

suite() {
  [ $# = 1 ] || die "usage: run.sh suite 'CMD TEMPLATE' | ref"
  need_root suite
  build
  local cmd logs tmp rc
  cmd="$(template "$1")"
  logs="$LOGS/suite-$(date +%Y%m%d-%H%M%S)-$$"
  mkdir -p "$logs" "$CONF_TMP"
  tmp="$(mktemp -d "$CONF_TMP/suite-XXXXXX")"
  echo "run.sh: suite against: $cmd" >&2
  echo "run.sh: logs in $logs" >&2
  set +e
  CONFORMANCE_CMD="$cmd" CONFORMANCE_LOGS="$logs" TMPDIR="$tmp" \
    go tool test2json -t "$BIN/harness.test" -test.v -test.run "^TestSnapshotterSuite\$/(${RUN:-.})" \
      -test.parallel "${PARALLEL:-4}" -test.timeout "${TIMEOUT:-30m}" 2>&1 |
    "$BIN/summary" -log "$logs/go-test.log"
  rc=${PIPESTATUS[1]}
  set -e
  sweep "$tmp"
  if [ -n "${VERBOSE:-}" ]; then cat "$logs/go-test.log" >&2; fi
  return "$rc"
}

bench() {
  [ $# -ge 1 ] || die "usage: run.sh bench 'CMD A' ['CMD B' ...]"
  need_root bench
  build
  local -a labels=() envs=()
  IFS=, read -r -a labels <<<"${LABELS:-}"
  local i=0 t label seen=" "
  for t in "$@"; do
    i=$((i + 1))
    label="${labels[$((i - 1))]:-}"
    if [ -z "$label" ]; then
      if [ "$t" = ref ]; then label=ref; else label="$(basename "${t%% *}")"; fi
    fi
    label="$(printf %s "$label" | tr -c 'A-Za-z0-9_.-' _)"
    case "$seen" in *" $label "*) label="${label}_$i" ;; esac
    seen="$seen$label "
    envs+=("CONFORMANCE_CMD_$i=$(template "$t")" "CONFORMANCE_LABEL_$i=$label")
    echo "run.sh: $label: $(template "$t")" >&2
  done
  local logs tmp rc
  logs="$LOGS/bench-$(date +%Y%m%d-%H%M%S)-$$"
  mkdir -p "$logs" "$CONF_TMP"
  tmp="$(mktemp -d "$CONF_TMP/bench-XXXXXX")"
  set +e
  env "${envs[@]}" CONFORMANCE_LOGS="$logs" TMPDIR="$tmp" \
    "$BIN/harness.test" -test.run '^$' -test.bench '^BenchmarkProxy$' \
      -test.benchtime "${BENCHTIME:-5x}" -test.count "${COUNT:-1}" -test.timeout "${TIMEOUT:-30m}" 2>&1 |
    tee "$logs/bench.log"
  rc=${PIPESTATUS[0]}
  set -e
  sweep "$tmp"
  echo "run.sh: log in $logs/bench.log" >&2
  return "$rc"
}

clean() {
  case "$CONF_TMP" in /?*) ;; *) die "CONF_TMP must be an absolute path, not '$CONF_TMP'" ;; esac
  sweep "${CONF_TMP%/}"
}

case "${1:-}" in
  build) build ;;
  suite) shift; suite "$@" ;;
  bench) shift; bench "$@" ;;
  ref-cmd) echo "$REF" ;;
  clean) clean ;;
  *) sed -n '2,17p' "$0" >&2; exit 2 ;;
esac
