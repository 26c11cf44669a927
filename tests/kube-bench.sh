#!/bin/sh
# The Kubernetes bridge's benchmarks, as root, on release builds:
#   cargo build --release --workspace --bins
#   sh tests/kube-bench.sh [NODES] [PODS_PER_NODE]
# 1. Pod start through the cluster: kubectl apply -> kubectl wait Ready, a
#    real edge-rt running the container, against edge-rt apply directly.
# 2. cloud-gw's memory with NODES simulated edges of PODS_PER_NODE pods
#    each, every pod's status written back (API server for tests).
set -eu
nodes=${1:-1000}
pods=${2:-10}
bin=${CARGO_TARGET_DIR:-target}/release
"$bin/kube-bench" --iterations 20
echo
dir=$(mktemp -d /var/tmp/kube-bench.XXXXXX)
"$bin/test-apiserver" --dir "$dir/api" --kubeconfig-out "$dir/kubeconfig" --history 200000 >/dev/null 2>"$dir/api.log" &
api=$!
trap 'kill $api $pid 2>/dev/null; rm -rf "$dir"' EXIT
pid=
while [ ! -s "$dir/kubeconfig" ]; do sleep 0.1; done
"$bin/cloud-gw" --dir "$dir" init --san 127.0.0.1 >/dev/null
RUST_LOG=warn "$bin/cloud-gw" --dir "$dir" --kubeconfig "$dir/kubeconfig" run --listen 127.0.0.1:18444 \
  --http-listen off --webhook-listen off 2>"$dir/cloud-gw.log" &
pid=$!
sleep 2
"$bin/link-load" --dir "$dir" --server wss://127.0.0.1:18444 kube --kubeconfig "$dir/kubeconfig" \
  --nodes "$nodes" --pods "$pods" --cloud-pid "$pid"
