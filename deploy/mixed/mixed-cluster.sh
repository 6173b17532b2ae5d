#!/bin/bash
# Mixed dual-stack cluster: node A = real flannel, nodes B, C = our flanneld, in network
# namespaces (hub bridge + etcd, three nodes, one pod each); checks ping and TCP between every
# pod pair over IPv4 and IPv6 and prints the lease values and subnet files of both.
# Usage (root): GO=/path/to/flannel/flanneld mixed-cluster.sh vxlan|host-gw
#   [KEEP=1 keeps the testbed for poking; then mixed-cluster.sh cleanup TAG]
# GO: flannel's binary, e.g. v0.20.2 built from its tag with `go build -mod=vendor .` (Debian's
# golang-go 1.19 builds it offline). OURS: our flanneld (default: this checkout's release build).
# Needs etcd, etcdctl, iproute2, iptables. See docs/ipv6-plan.md ("Mixed cluster").
set -u
GO=${GO:?set GO to a flannel flanneld binary}
OURS=${OURS:-$(cd "$(dirname "$0")/../.." && pwd)/target/release/flanneld}
OUT=${OUT:-/tmp/flannel-mixed}
T() { timeout 20 "$@"; }

cleanup() { # $1 = tag
  local tag=$1 d=$OUT/$1
  for f in "$d"/*.pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null; done
  sleep 1
  for f in "$d"/*.pid; do [ -f "$f" ] && kill -9 "$(cat "$f")" 2>/dev/null; rm -f "$f"; done
  for ns in $(cat "$d/netns" 2>/dev/null); do ip netns del "$ns" 2>/dev/null; done
  rm -f "$d/netns"
}
if [ "${1:-}" = cleanup ]; then cleanup "$2"; exit 0; fi

BACKEND=${1:-vxlan}
TAG=mx$(printf %04x $RANDOM)
D=$OUT/$TAG; mkdir -p "$D"
echo "tag $TAG, backend $BACKEND, logs in $D"
[ "${KEEP:-0}" = 1 ] || trap 'cleanup $TAG' EXIT
HUB=$TAG-hub
addns() { [ -e /run/netns/$1 ] && { echo "netns $1 exists"; exit 1; }; ip netns add "$1"; echo "$1" >> "$D/netns"; ip -n "$1" link set lo up; }
X() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
spawn() { # name ns cmd...
  local name=$1 ns=$2; shift 2
  ip netns exec "$ns" "$@" > "$D/$name.log" 2>&1 < /dev/null & echo $! > "$D/$name.pid"
}

# --- underlay: hub bridge 172.30.0.1/24 + fd00:210::1/64, nodes .11-.13 / ::b-::d
addns $HUB
ip -n $HUB link add br0 type bridge
X $HUB sysctl -qw net.ipv6.conf.all.disable_ipv6=0 net.ipv6.conf.default.accept_ra=0
ip -n $HUB addr add 172.30.0.1/24 dev br0
ip -n $HUB -6 addr add fd00:210::1/64 dev br0 nodad
ip -n $HUB link set br0 up
for i in 1 2 3; do
  n=$TAG-n$i; addns $n
  ip -n $n link add eth0 type veth peer name h$i netns $HUB
  ip -n $HUB link set h$i master br0 up
  X $n sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.disable_ipv6=0 net.ipv6.conf.all.accept_ra=0 \
      net.ipv6.conf.default.accept_ra=0 net.ipv6.conf.all.forwarding=1
  ip -n $n addr add 172.30.0.1$i/24 dev eth0
  ip -n $n -6 addr add fd00:210::$(printf %x $((10+i)))/64 dev eth0 nodad
  ip -n $n link set eth0 up
  ip -n $n route add default via 172.30.0.1
  ip -n $n -6 route add default via fd00:210::1
done

# --- etcd in the hub
spawn etcd $HUB etcd --name default --data-dir "$D/etcd" --listen-client-urls http://172.30.0.1:2379,http://127.0.0.1:2379 \
  --advertise-client-urls http://172.30.0.1:2379 --listen-peer-urls http://127.0.0.1:2380 \
  --initial-advertise-peer-urls http://127.0.0.1:2380 --initial-cluster default=http://127.0.0.1:2380 --log-level warn
E() { T ip netns exec $HUB env ETCDCTL_API=3 etcdctl --endpoints http://127.0.0.1:2379 "$@"; }
for _ in $(seq 50); do E endpoint health >/dev/null 2>&1 && break; sleep 0.2; done
E put /coreos.com/network/config "{\"Network\":\"10.5.0.0/16\",\"EnableIPv6\":true,\"IPv6Network\":\"fd10::/48\",\"Backend\":{\"Type\":\"$BACKEND\"}}" >/dev/null

# --- daemons: n1 flannel v0.20.2, n2 n3 ours
EP=http://172.30.0.1:2379
spawn fl1 $TAG-n1 $GO --etcd-endpoints $EP --iface eth0 ${FLPUB6:-} --ip-masq --subnet-file "$D/n1.env" ${GOARGS:-}
for i in 2 3; do
  spawn fl$i $TAG-n$i env RUST_LOG=info $OURS --etcd-endpoints $EP --iface eth0 --ip-masq --subnet-file "$D/n$i.env" \
    --node-name node$i --cni-data-dir "$D/cni$i" --healthz-port 0 ${OURSARGS:-}
done
for i in 1 2 3; do for _ in $(seq 150); do [ -s "$D/n$i.env" ] && break; sleep 0.2; done
  [ -s "$D/n$i.env" ] || { echo "node $i wrote no subnet file:"; tail -20 "$D/fl$i.log"; exit 1; }; done

# --- one pod per node behind cni0, addresses .2 / ::2 from the subnet file, MTU = FLANNEL_MTU
for i in 1 2 3; do
  n=$TAG-n$i p=$TAG-p$i; . "$D/n$i.env"
  s4=${FLANNEL_SUBNET%/*}; s6=${FLANNEL_IPV6_SUBNET%/*}
  addns $p
  ip -n $n link add cni0 type bridge
  ip -n $n addr add $FLANNEL_SUBNET dev cni0
  ip -n $n -6 addr add $FLANNEL_IPV6_SUBNET dev cni0 nodad
  ip -n $n link set cni0 up
  ip -n $p link add eth0 type veth peer name vp netns $n
  ip -n $n link set vp mtu $FLANNEL_MTU master cni0 up
  ip -n $p link set eth0 mtu $FLANNEL_MTU up
  ip -n $p addr add ${s4%.1}.2/24 dev eth0
  ip -n $p -6 addr add ${s6%::1}::2/64 dev eth0 nodad
  ip -n $p route add default via $s4
  ip -n $p -6 route add default via $s6
  echo "${s4%.1}.2 ${s6%::1}::2" > "$D/p$i.addr"
  spawn bulk$i $p socat TCP6-LISTEN:7001,ipv6only=0,fork,reuseaddr EXEC:"wc -c"
  spawn tcp$i $p socat -T5 TCP6-LISTEN:7000,ipv6only=0,fork,reuseaddr SYSTEM:"echo pod$i \$SOCAT_PEERADDR"
done
sleep 3

echo "== subnet files"; for i in 1 2 3; do echo "-- n$i"; cat "$D/n$i.env"; done
echo "== leases"; E get --prefix /coreos.com/network/subnets/ | paste - -
echo "== checks (from -> to family: ping, tcp)"
fail=0
for a in 1 2 3; do for b in 1 2 3; do [ $a = $b ] && continue
  for fam in 4 6; do
    read v4 v6 < "$D/p$b.addr"; dst=$v4; [ $fam = 6 ] && dst=$v6
    pr=ok; T ip netns exec $TAG-p$a ping -$fam -c2 -i0.2 -W2 $dst >/dev/null || { pr=FAIL; fail=1; }
    [ $fam = 6 ] && th="[$dst]" || th=$dst
    r=$(T ip netns exec $TAG-p$a socat -T3 - TCP:$th:7000 </dev/null 2>/dev/null)
    r=$(echo "$r" | python3 -c 'import ipaddress,sys
w=sys.stdin.read().split()
a=ipaddress.ip_address(w[1].strip("[]")) if len(w)>1 else None
print(w[0] if w else "", (a.ipv4_mapped or a) if a else "")')
    read sv4 sv6 < "$D/p$a.addr"; src=$sv4; [ $fam = 6 ] && src=$sv6
    tr="ok (server saw $src)"; [ "$r" = "pod$b $src" ] || { tr="FAIL($r)"; fail=1; }
    echo "p$a -> p$b IPv$fam ($dst): ping $pr, tcp $tr"
  done
done; done
echo "== big packets with DF: IPv4 -s 1402 (1430 B) / IPv6 -s 1382 (1430 B) and -s 1400 (1448 B)"
for a in 1 2 3; do for b in 1 2 3; do [ $a = $b ] && continue
  read v4 v6 < "$D/p$b.addr"
  for t in "4 1402 $v4" "6 1382 $v6" "6 1400 $v6"; do set -- $t
    o=$(T ip netns exec $TAG-p$a ping -$1 -c2 -i0.3 -W2 -s $2 -M do $3 2>&1 | grep -E 'received|too big|too long' | sort -u | tr '\n' ' ')
    echo "p$a -> p$b IPv$1 -s $2: $o"
  done
done; done
echo "== 4 MB TCP each way over IPv6 and IPv4 between p1 (flannel node) and p2 (ours)"
for a in 1 2; do b=$((3-a)); read v4 v6 < "$D/p$b.addr"
  for dst in "[$v6]" $v4; do
    r=$(head -c 4000000 /dev/zero | T ip netns exec $TAG-p$a socat -t5 - TCP:$dst:7001 2>&1)
    echo "p$a -> p$b $dst: server counted $r bytes"
  done
done
echo "== devices"
for i in 1 2 3; do echo "-- n$i"; ip -n $TAG-n$i -o link show | grep -E 'flannel|cni0|eth0' | awk '{print $2, $4, $5}'; ip -n $TAG-n$i -6 route | grep fd10; ip -n $TAG-n$i route | grep 10.5; done
echo "== leases with addresses/MACs masked (identical lines = same shape)"
E get --prefix /coreos.com/network/subnets/ --print-value-only | sed -E 's/"[0-9a-f]{2}(:[0-9a-f]{2}){5}"/"MAC"/g; s/"172\.30\.0\.1[0-9]"/"IP4"/; s/"fd00:210::[0-9a-f]+"/"IP6"/' | sort | uniq -c
echo "== etcd lease TTLs (granted)"
E get --prefix /coreos.com/network/subnets/ -w json | python3 -c 'import json,sys,base64
for kv in json.load(sys.stdin)["kvs"]: print(base64.b64decode(kv["key"]).decode(), "%x" % kv["lease"])' | while read k l; do
  echo "$k $(E lease timetolive $l | grep -o 'granted with TTL([0-9]*s)')"; done
echo "== daemons alive"; for f in "$D"/fl*.pid; do kill -0 "$(cat "$f")" 2>/dev/null && echo "$(basename "$f" .pid) up" || echo "$(basename "$f" .pid) DEAD"; done
echo "RESULT: $([ $fail = 0 ] && echo all pings/tcp ok || echo FAILURES)"
