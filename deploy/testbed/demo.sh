#!/usr/bin/env bash
# Multi-node testbed in network namespaces: a hub namespace with the underlay bridge and etcd,
# NODES (default 3) node namespaces each running flanneld. Shows the leases in etcd, each node's
# subnet file and the peers each node sees, then tears everything down (KEEP=1 keeps it up
# until Ctrl-C). Needs root. Touches nothing outside the namespaces it creates.
set -euo pipefail
cd "$(dirname "$0")/../.."
NODES="${NODES:-3}"
[ "$(id -u)" -eq 0 ] || { echo "demo.sh: needs root (network namespaces)" >&2; exit 1; }
bash deploy/install-deps.sh >/dev/null
timeout 1200 cargo build --release -q -p flanneld
BIN="$PWD/target/release/flanneld"

tag=$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')
hub="fl${tag}-hub"
work=$(mktemp -d /tmp/flannel-testbed.XXXXXX)
pids=()
namespaces=()

stop_pid() { # SIGTERM, wait up to 10 s, then SIGKILL
  local pid=$1
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
}
cleanup() {
  set +e
  for pid in "${pids[@]}"; do stop_pid "$pid"; done
  for ((i=${#namespaces[@]}-1; i>=0; i--)); do ip netns del "${namespaces[$i]}"; done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkns() {
  if [ -e "/run/netns/$1" ]; then echo "namespace $1 already exists" >&2; exit 1; fi
  ip netns add "$1"; namespaces+=("$1"); ip -n "$1" link set lo up
}
etcdctl_hub() { timeout 10 ip netns exec "$hub" env ETCDCTL_API=3 etcdctl --endpoints http://172.30.0.1:2379 "$@"; }

echo "== hub $hub: underlay bridge 172.30.0.1/24 and etcd"
mkns "$hub"
ip -n "$hub" link add br0 type bridge
ip -n "$hub" addr add 172.30.0.1/24 dev br0
ip -n "$hub" link set br0 up
ip netns exec "$hub" etcd --name default --data-dir "$work/etcd" \
  --listen-client-urls http://172.30.0.1:2379,http://127.0.0.1:2379 --advertise-client-urls http://172.30.0.1:2379 \
  --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
  --initial-cluster default=http://127.0.0.1:2380 --log-level warn >"$work/etcd.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do etcdctl_hub endpoint health >/dev/null 2>&1 && break; sleep 0.2; done
etcdctl_hub endpoint health >/dev/null || { echo "etcd did not start:"; tail "$work/etcd.log"; exit 1; }
conf='{"Network":"10.5.0.0/16","Backend":{"Type":"alloc"}}'
etcdctl_hub put /coreos.com/network/config "$conf" >/dev/null
echo "   config: $conf"

for i in $(seq "$NODES"); do
  ns="fl${tag}-n$i"; ip4="172.30.0.$((10 + i))"
  mkns "$ns"
  ip -n "$ns" link add eth0 type veth peer name "n$i" netns "$hub"
  ip -n "$hub" link set "n$i" master br0 up
  ip -n "$ns" addr add "$ip4/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" route add default via 172.30.0.1
  RUST_LOG=info ip netns exec "$ns" "$BIN" --etcd-endpoints http://172.30.0.1:2379 \
    --subnet-file "$work/n$i/subnet.env" >"$work/n$i.log" 2>&1 &
  pids+=($!)
  echo "== node $ns ($ip4): flanneld pid $!"
done

for i in $(seq "$NODES"); do
  for _ in $(seq 150); do [ -s "$work/n$i/subnet.env" ] && break; sleep 0.2; done
  [ -s "$work/n$i/subnet.env" ] || { echo "node $i wrote no subnet file:"; cat "$work/n$i.log"; exit 1; }
done
sleep 1

echo; echo "== leases in etcd (flannel's keys and JSON)"
etcdctl_hub get --prefix /coreos.com/network/subnets/ | paste - -
for i in $(seq "$NODES"); do
  echo; echo "== node $i: $work/n$i/subnet.env"; cat "$work/n$i/subnet.env"
  echo "   peers seen:"; grep -o 'peer joined or changed: .*' "$work/n$i.log" | sed 's/^/     /'
done
echo; echo "== underlay traffic: node 1 pings every other node"
for i in $(seq 2 "$NODES"); do
  timeout 10 ip netns exec "fl${tag}-n1" ping -c 2 -W 1 "172.30.0.$((10 + i))" | tail -2 | head -1
done
echo; echo "(pod traffic over the overlay needs a data-plane backend; this build runs 'alloc')"
if [ "${KEEP:-0}" = 1 ]; then
  echo "testbed up (namespaces fl${tag}-*); Ctrl-C to tear down"
  while sleep 3600; do :; done
fi
