#!/usr/bin/env bash
# make dist-check: `make install` into a scratch DESTDIR, the systemd unit checked with
# `systemd-analyze verify`, the default config parsed by the daemon, then `make
# uninstall` must leave only the config behind.
set -euo pipefail
dest=$(mktemp -d)
trap 'rm -rf "$dest"' EXIT
make --no-print-directory install DESTDIR="$dest" PREFIX=/usr/local INSTALL_PROFILE=debug >/dev/null
for f in usr/local/bin/cas-snapshotter usr/local/bin/casctl etc/systemd/system/cas-snapshotter.service \
         etc/cas-snapshotter/config.toml usr/local/share/cas-snapshotter/containerd-cas.toml; do
  [[ -e $dest/$f ]] || { echo "dist-check: $f not installed"; exit 1; }
done
if command -v systemd-analyze >/dev/null; then
  # verify resolves ExecStart on this machine: point it at the installed binary
  unit=$dest/cas-snapshotter.service
  sed "s|/usr/local/bin/|$dest/usr/local/bin/|; s|/etc/cas-snapshotter/|$dest/etc/cas-snapshotter/|" \
    "$dest/etc/systemd/system/cas-snapshotter.service" > "$unit"
  out=$(systemd-analyze verify --man=no "$unit" 2>&1 | grep -v 'containerd.service' || true)
  [[ -z $out ]] || { echo "dist-check: systemd-analyze verify:"; echo "$out"; exit 1; }
  echo "dist-check: systemd-analyze verify: clean"
else
  echo "dist-check: systemd-analyze not found (package systemd); unit not verified"
fi
# the default config is one the daemon accepts (a bad key would stop it at start)
cfg_root=$dest/store
sed "s|^root = .*|root = \"$cfg_root\"|; s|^address = .*|address = \"$dest/s.sock\"|" \
  "$dest/etc/cas-snapshotter/config.toml" > "$dest/cfg.toml"
"$dest/usr/local/bin/cas-snapshotter" --config "$dest/cfg.toml" >"$dest/daemon.log" 2>&1 &
pid=$!
for _ in $(seq 100); do [[ -S $dest/s.sock ]] && break; sleep 0.05; done
[[ -S $dest/s.sock ]] || { echo "dist-check: the daemon did not start with the default config:"; cat "$dest/daemon.log"; exit 1; }
kill -TERM "$pid"; wait "$pid"
make --no-print-directory uninstall DESTDIR="$dest" PREFIX=/usr/local >/dev/null
left=$(cd "$dest" && find usr etc -type f | sort | tr '\n' ' ')
[[ $left == "etc/cas-snapshotter/config.toml " ]] || { echo "dist-check: uninstall left: $left"; exit 1; }
echo "dist-check: install, unit, default config and uninstall: ok"
