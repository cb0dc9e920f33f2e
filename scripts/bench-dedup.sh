#!/usr/bin/env bash
# make bench-dedup: a family of near-duplicate Debian images, pulled into containerd's
# overlayfs and into cas-snapshotter in the same run; reports bytes on disk, our savings
# and the file-level theoretical maximum (bench/results/dedup.md).
#
# Version i of the family is an independent `debootstrap --variant=minbase` base and an
# app image: `apt-get install` of a few packages run in an overlay mount above that base,
# whose upper directory becomes the app layer (as `docker build` makes a RUN layer).
# Independent builds share almost every file's content but differ in layer digests and
# in the mtimes of files generated at install time.
#
# Root filesystems and OCI layouts are cached in $CAS_BENCH_CACHE (default
# /var/cache/cas-bench), outside the repository, and rebuilt when missing.
set -euo pipefail

CACHE=${CAS_BENCH_CACHE:-/var/cache/cas-bench}
VERSIONS=${VERSIONS:-3}
SUITE=${SUITE:-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
APP_PACKAGES=${APP_PACKAGES:-python3 curl ca-certificates}
OUT=${OUT:-bench/results/dedup.md}
# Where registry, containerd and both snapshotters keep their data (default: a temp dir
# on /tmp's filesystem). Point it at another filesystem to compare, e.g. XFS.
WORKDIR=${WORKDIR:-}
BIN=${BIN:?BIN= must name the directory of the built binaries}

[[ $(id -u) == 0 ]] || { echo "bench-dedup: needs root (debootstrap, chroot, mounts, containerd)"; exit 1; }
command -v debootstrap >/dev/null || { echo "bench-dedup: debootstrap missing: run make deps"; exit 1; }

mkdir -p "$CACHE/rootfs" "$CACHE/images"

invalidate_images() {
  rm -rf "$CACHE/images/base-$1" "$CACHE/images/app-$1" "$CACHE/images/base-$1.done" "$CACHE/images/app-$1.done"
}

build_base() {
  local i=$1 dir=$CACHE/rootfs/base-$i
  [[ -e $dir.done ]] && return 0
  echo "bench-dedup: debootstrap $SUITE (version $i)"
  rm -rf "$dir" "$dir.tmp" "$CACHE/rootfs/app-$i" "$CACHE/rootfs/app-$i.done"
  invalidate_images "$i"
  debootstrap --variant=minbase "$SUITE" "$dir.tmp" "$MIRROR" >"$CACHE/rootfs/base-$i.log" 2>&1 \
    || { tail -20 "$CACHE/rootfs/base-$i.log"; exit 1; }
  # As Debian's official images are made: no downloaded packages, no package lists.
  chroot "$dir.tmp" /bin/sh -c 'apt-get clean && rm -rf /var/lib/apt/lists/*'
  mv "$dir.tmp" "$dir"
  touch "$dir.done"
}

build_app() {
  local i=$1 app=$CACHE/rootfs/app-$i
  [[ -e $app.done ]] && return 0
  echo "bench-dedup: apt-get install $APP_PACKAGES (version $i)"
  rm -rf "$app"
  invalidate_images "$i"
  mkdir -p "$app/upper" "$app/work" "$app/merged"
  mount -t overlay overlay -o "lowerdir=$CACHE/rootfs/base-$i,upperdir=$app/upper,workdir=$app/work" "$app/merged"
  mount -t proc proc "$app/merged/proc"
  mount --bind /dev "$app/merged/dev"
  local rc=0
  chroot "$app/merged" /bin/sh -c "
      export DEBIAN_FRONTEND=noninteractive LC_ALL=C
      apt-get update -q &&
      apt-get install -y -q --no-install-recommends $APP_PACKAGES &&
      apt-get clean && rm -rf /var/lib/apt/lists/*" >"$app.log" 2>&1 || rc=$?
  umount "$app/merged/dev" "$app/merged/proc" "$app/merged"
  if [[ $rc != 0 ]]; then tail -20 "$app.log"; exit 1; fi
  rm -rf "$app/work" "$app/merged"
  touch "$app.done"
}

for i in $(seq 1 "$VERSIONS"); do
  build_base "$i"
  build_app "$i"
done
"$BIN/cas-bench" images --cache "$CACHE" --versions "$VERSIONS"
# make bench builds the images this way, and pulls them itself
[[ -n ${IMAGES_ONLY:-} ]] && exit 0
CAS_SNAPSHOTTER_BIN=$BIN/cas-snapshotter CASCTL_BIN=$BIN/casctl \
  "$BIN/cas-bench" dedup --cache "$CACHE" --versions "$VERSIONS" --out "$OUT" ${WORKDIR:+--workdir "$WORKDIR"}
