#!/usr/bin/env bash
# Fetches newer containerd releases for the version tests, next to (not over) the
# system's containerd 1.6: the .debs of Debian's newer suites, unpacked with dpkg-deb -x.
#
#   <cache>/<version>/usr/bin/{containerd,ctr,containerd-shim-runc-v2}
#   <cache>/<series> -> <version>        the link the tests look for (1.7, 2)
#
# <cache> is $CAS_CONTAINERD_CACHE, default /var/cache/cas-snapshotter/containerd.
#
# And a runc that ID-maps mounts (1.2+; Debian 12 has 1.1.5), which containerd 2.x's CRI
# needs for user-namespaced pods: unstable's runc with unstable's libc6 and libseccomp2
# beside it, the binary pointed at them with patchelf (its interpreter and RUNPATH), so
# nothing of the system's changes:
#
#   <runc cache>/<version>/{runc,usr/lib/...}
#   <runc cache>/current -> <version>
#
# <runc cache> is $CAS_RUNC_CACHE, default /var/cache/cas-snapshotter/runc. Likewise
# unstable's skopeo, whose containers/storage writes zstd:chunked layers with a tar-split
# (the partial-pull tests), in $CAS_SKOPEO_CACHE (default /var/cache/cas-snapshotter/skopeo).
# Idempotent: a series already unpacked is kept without asking the mirror (pass --refresh
# to look for a newer release of each series). Every download is checked: the suite's
# InRelease against Debian's archive keyring (gpgv), Packages.xz against InRelease, the
# .deb against Packages.xz.
set -euo pipefail

CACHE=${CAS_CONTAINERD_CACHE:-/var/cache/cas-snapshotter/containerd}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org}
KEYRING=${DEBIAN_KEYRING:-/usr/share/keyrings/debian-archive-keyring.gpg}
ARCH=$(dpkg --print-architecture)

# series  version prefix  suites to look in (the newest matching version wins)
SERIES=(
  "1.7 1.7. debian:trixie debian:trixie-updates debian-security:trixie-security"
  "2   2.    debian:unstable debian:testing"
)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$CACHE"

fail() { echo "containerd-versions: $*" >&2; exit 1; }

# Prints "version filename sha256 archive" of package $1 in archive:suite $2, if any.
lookup() {
  local pkg=$1 archive=${2%%:*} suite=${2#*:}
  local base="$MIRROR/$archive/dists/$suite"
  local tag="$archive-$suite"
  if [ ! -e "$work/$tag.Packages" ]; then
    curl -fsSL --retry 3 -o "$work/$tag.InRelease" "$base/InRelease" || fail "cannot fetch $base/InRelease"
    gpgv --keyring "$KEYRING" --output "$work/$tag.Release" "$work/$tag.InRelease" 2>"$work/$tag.gpgv" \
      || fail "$base/InRelease: bad signature ($(tail -1 "$work/$tag.gpgv")); is debian-archive-keyring current?"
    local want
    want=$(awk -v f="main/binary-$ARCH/Packages.xz" '/^SHA256:/{s=1;next} /^[^ ]/{s=0} s&&$3==f{print $1}' "$work/$tag.Release")
    [ -n "$want" ] || fail "$suite: no main/binary-$ARCH/Packages.xz in Release"
    curl -fsSL --retry 3 -o "$work/$tag.Packages.xz" "$base/main/binary-$ARCH/Packages.xz" || fail "cannot fetch $suite Packages.xz"
    echo "$want  $work/$tag.Packages.xz" | sha256sum -c --quiet - || fail "$suite: Packages.xz does not match Release"
    xz -dc "$work/$tag.Packages.xz" >"$work/$tag.Packages"
  fi
  awk -v p="$pkg" -v a="$archive" '
    /^Package: /{n=$2} /^Version: /{v=$2} /^Filename: /{f=$2} /^SHA256: /{h=$2}
    /^$/{ if (n==p) print v, f, h, a; n="" }
    END{ if (n==p) print v, f, h, a }' "$work/$tag.Packages"
}

# "1.7.24~ds1-6+deb13u1" -> "1.7.24"
upstream() { local v=${1#*:}; v=${v%%[~+-]*}; echo "$v"; }

for line in "${SERIES[@]}"; do
  read -r series prefix suites <<<"$line"
  if [ "${1:-}" != --refresh ] && "$CACHE/$series/usr/bin/containerd" --version >/dev/null 2>&1; then
    echo "containerd-versions: $series present ($(readlink "$CACHE/$series"))"
    continue
  fi
  best=""
  for s in $suites; do
    while read -r v f h a; do
      [ -n "$v" ] || continue
      [[ $(upstream "$v") == "$prefix"* ]] || continue
      if [ -z "$best" ] || dpkg --compare-versions "$v" gt "${best%% *}"; then best="$v $f $h $a"; fi
    done < <(lookup containerd "$s")
  done
  [ -n "$best" ] || fail "no containerd $series.x in ${suites}"
  read -r v f h a <<<"$best"
  ver=$(upstream "$v")
  dest="$CACHE/$ver"
  if [ -x "$dest/usr/bin/containerd" ]; then
    echo "containerd-versions: $ver present ($dest)"
  else
    deb="$work/$(basename "$f")"
    echo "containerd-versions: fetching containerd $v ($a/$f)"
    curl -fsSL --retry 3 -o "$deb" "$MIRROR/$a/$f" || fail "cannot fetch $f"
    echo "$h  $deb" | sha256sum -c --quiet - || fail "$f: sha256 does not match the Packages index"
    rm -rf "$dest.tmp"
    dpkg-deb -x "$deb" "$dest.tmp"
    echo "$v" >"$dest.tmp/DEBIAN-VERSION"
    mv -T "$dest.tmp" "$dest"
  fi
  "$dest/usr/bin/containerd" --version >/dev/null || fail "$dest/usr/bin/containerd does not run here"
  ln -sfn "$ver" "$CACHE/$series"
  echo "containerd-versions: $series -> $("$dest/usr/bin/containerd" --version)"
done

# Unpacks unstable's binary $3 (a path inside package $2) with the packages that follow
# (its libraries, libc6 among them) into <$1>/<version>, points it at them with patchelf
# (interpreter, and an RPATH that its libraries' own dependencies are found by too), and
# links <$1>/current to it. $CHECK (a command run with the binary's path) says whether a
# cached one will do.
beside_its_libs() {
  local cache=$1 pkg=$2 path=$3; shift 3
  local name; name=$(basename "$path")
  mkdir -p "$cache"
  if [ "${REFRESH:-}" != 1 ] && [ -x "$cache/current/$name" ] && $CHECK "$cache/current/$name" 2>/dev/null; then
    echo "containerd-versions: $name present ($(readlink "$cache/current"))"
    return 0
  fi
  local v f h a
  read -r v f h a < <(lookup "$pkg" debian:unstable) || true
  [ -n "${v:-}" ] || fail "no $pkg in unstable"
  local ver; ver=$(upstream "$v")
  local dest="$cache/$ver"
  if [ ! -x "$dest/$name" ]; then
    rm -rf "$dest.tmp"
    mkdir -p "$dest.tmp"
    local dep pv pf ph pa deb
    for dep in "$pkg" "$@"; do
      read -r pv pf ph pa < <(lookup "$dep" debian:unstable) || true
      [ -n "${pv:-}" ] || fail "no $dep in unstable"
      deb="$work/$(basename "$pf")"
      echo "containerd-versions: fetching $dep $pv ($pa/$pf)"
      curl -fsSL --retry 3 -o "$deb" "$MIRROR/$pa/$pf" || fail "cannot fetch $pf"
      echo "$ph  $deb" | sha256sum -c --quiet - || fail "$pf: sha256 does not match the Packages index"
      dpkg-deb -x "$deb" "$dest.tmp/root"
    done
    local libdir interp
    libdir="$dest/root/usr/lib/$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo x86_64-linux-gnu)"
    interp=$(basename "$(patchelf --print-interpreter "$dest.tmp/root/$path")")
    mv "$dest.tmp/root/$path" "$dest.tmp/$name"
    patchelf --set-interpreter "$libdir/$interp" --force-rpath --set-rpath "$libdir" "$dest.tmp/$name"
    echo "$v" >"$dest.tmp/DEBIAN-VERSION"
    mv -T "$dest.tmp" "$dest"
  fi
  $CHECK "$dest/$name" || fail "$dest/$name does not run here or cannot do what the tests need"
  ln -sfn "$ver" "$cache/current"
  echo "containerd-versions: $name -> $ver"
}
[ "${1:-}" = --refresh ] && REFRESH=1

runc_idmaps() { "$1" features | grep -q '"idmap"'; }
CHECK=runc_idmaps beside_its_libs "${CAS_RUNC_CACHE:-/var/cache/cas-snapshotter/runc}" \
  runc usr/sbin/runc libc6 libseccomp2

# A skopeo whose containers/storage (1.55+) writes zstd:chunked with a tar-split and its
# digest in the TOC, for the partial-pull tests (Debian 12's writes none).
skopeo_runs() { "$1" --version >/dev/null; }
CHECK=skopeo_runs beside_its_libs "${CAS_SKOPEO_CACHE:-/var/cache/cas-snapshotter/skopeo}" \
  skopeo usr/bin/skopeo libc6 libgpgme45 libassuan9 libgpg-error0 libsqlite3-0
