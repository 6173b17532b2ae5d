#!/usr/bin/env bash
# Installs what building and testing need on Debian 12 (run as root). Idempotent.
set -euo pipefail
pkgs=(protobuf-compiler libprotobuf-dev etcd-server etcd-client iproute2 nftables iperf3
      containernetworking-plugins conntrack jq procps iputils-ping openssl socat debootstrap
      unbound knot dnsperf bind9-dnsutils wireguard-go wireguard-tools curl
      nginx wrk)
# The compose testbed needs a Docker engine and a compose tool: Debian's docker.io where no
# engine is installed, docker-compose unless the engine has the `docker compose` plugin.
if ! command -v dockerd >/dev/null && ! command -v docker >/dev/null; then
  pkgs+=(docker.io)
fi
if ! { command -v docker >/dev/null && docker compose version >/dev/null 2>&1; }; then
  pkgs+=(docker-compose)
fi
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  timeout 600 apt-get update -qq
  timeout 900 apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "cargo not found: install Rust (https://rustup.rs)" >&2; exit 1; }
echo "dependencies present"
