#!/bin/sh
# The Kubernetes bridge's benchmarks, as root, on release builds, against a
# real control plane (kube-apiserver, controller-manager, scheduler v1.36
# and etcd from ../shared/k8s):
#   cargo build --release --workspace --bins
#   sh tests/kube-bench.sh [NODES] [PODS_PER_NODE]
# 1. Pod start through the cluster: a plain Deployment placed by the real
#    scheduler, and a Pod bound by name, each to Running/Ready on a real
#    edge-rt; against edge-rt apply directly. kubectl exec through the
#    link against edge-rt exec on the node, and kubectl logs -f latency.
# 2. cloud-gw's memory with NODES simulated edges of PODS_PER_NODE pods
#    each, every pod's status written back.
set -eu
nodes=${1:-1000}
pods=${2:-10}
bin=${BIN:-${CARGO_TARGET_DIR:-target}/release}
[ -n "${SKIP_START:-}" ] || { "$bin/kube-bench" --iterations 20; echo; }
dir=$(mktemp -d /var/tmp/kube-bench.XXXXXX)
"$bin/control-plane" --dir "$dir/cp" 2>"$dir/cp.log" &
cp=$!
# KEEP=1 keeps the logs (cloud-gw.log, cp.log) in $dir.
trap 'kill $cp $pid 2>/dev/null; wait $cp 2>/dev/null; [ -n "${KEEP:-}" ] || rm -rf "$dir"' EXIT
pid=
while [ ! -s "$dir/cp/ready" ]; do
  kill -0 $cp 2>/dev/null || { cat "$dir/cp.log"; exit 1; }
  sleep 0.2
done
kubeconfig=$(cat "$dir/cp/ready")
"$bin/cloud-gw" --dir "$dir" init --san 127.0.0.1 >/dev/null
RUST_LOG=warn "$bin/cloud-gw" --dir "$dir" --kubeconfig "$kubeconfig" run --listen 127.0.0.1:18444 \
  --http-listen off --webhook-listen off --kubelet-listen off 2>"$dir/cloud-gw.log" &
pid=$!
sleep 2
"$bin/link-load" --dir "$dir" --server wss://127.0.0.1:18444 kube --kubeconfig "$kubeconfig" \
  --nodes "$nodes" --pods "$pods" --cloud-pid "$pid"
