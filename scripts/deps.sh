#!/usr/bin/env bash
# Installs the Debian 12 packages that building, testing and the demo need.
# Idempotent: does nothing when everything is present (pass --force to reinstall).
set -euo pipefail

PACKAGES=(
  containerd runc            # the container runtime we plug into (1.6 on Debian 12)
  docker-registry            # a local OCI registry on 127.0.0.1 for pulls
  protobuf-compiler          # protoc, for the gRPC code generated at build time
  golang-go golang-github-containerd-containerd-dev   # containerd's snapshotter conformance suite
  busybox-static             # a static shell for the fixture images' containers
  xfsprogs attr util-linux   # mkfs.xfs, getfattr/setfattr, fincore, nsenter
  iproute2                   # ip, for the interfaces of the CRI tests' pods
  debootstrap                # Debian base images for make bench-dedup
  fio pigz zstd              # physical limits of make bench (disk, decompression)
  ca-certificates curl build-essential pkg-config git
  gpgv xz-utils debian-archive-keyring   # checking the newer containerd .debs (below)
  patchelf                   # pointing the newer runc at the libc unpacked beside it
  skopeo                     # zstd:chunked images of an independent producer (partial pulls)
  stargz-snapshotter         # ctr-remote: eStargz images of an independent producer
)

# containerd 1.7 and 2.x for the version and CRI tests, unpacked beside the system's 1.6
# (scripts/containerd-versions.sh; skips what it already has).
fetch_containerd_versions() {
  bash "$(dirname "$0")/containerd-versions.sh"
}

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${1:-}" != --force ] && [ ${#missing[@]} -eq 0 ]; then
  echo "deps: all packages present"
  fetch_containerd_versions
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "deps: missing ${missing[*]}; run as root (apt-get)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
command -v cargo >/dev/null || { echo "deps: cargo not found; install a Rust toolchain (rustup) first" >&2; exit 1; }
echo "deps: installed ${missing[*]}"
fetch_containerd_versions
