#!/bin/sh
# A CNI plugin for the CRI tests' pods that need a network namespace of their own
# (user-namespaced pods cannot share the node's): everything it makes stays inside the
# pod's namespace. As `loopback` it brings `lo` up; as `netns-only` it adds a veth pair
# whose both ends stay in the namespace, `eth0` addressed 10.88.0.2/24, so that CRI has
# an interface to report and no traffic can leave the pod.
set -eu
in_ns() { nsenter --net="$CNI_NETNS" "$@"; }
case "${CNI_COMMAND:-}" in
VERSION)
  echo '{"cniVersion": "1.0.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]}'
  ;;
ADD)
  cat >/dev/null
  if [ "$(basename "$0")" = loopback ]; then
    in_ns ip link set lo up
    echo "{\"cniVersion\": \"1.0.0\", \"interfaces\": [{\"name\": \"lo\", \"sandbox\": \"$CNI_NETNS\"}], \"ips\": [{\"address\": \"127.0.0.1/8\", \"interface\": 0}]}"
  else
    in_ns ip link add "$CNI_IFNAME" type veth peer name "$CNI_IFNAME-peer"
    in_ns ip addr add 10.88.0.2/24 dev "$CNI_IFNAME"
    in_ns ip link set "$CNI_IFNAME-peer" up
    in_ns ip link set "$CNI_IFNAME" up
    echo "{\"cniVersion\": \"1.0.0\", \"interfaces\": [{\"name\": \"$CNI_IFNAME\", \"sandbox\": \"$CNI_NETNS\"}], \"ips\": [{\"address\": \"10.88.0.2/24\", \"interface\": 0}]}"
  fi
  ;;
*)
  # DEL, CHECK, GC, STATUS: the namespace goes with the pod, nothing else was made
  cat >/dev/null || true
  ;;
esac
