#!/bin/sh
# The link benchmark: one cloud-gw on loopback, then link-load's two runs
# (reconnect bytes against a full resync; N simulated nodes). As root
# (10,000 nodes need file descriptors); release builds:
#   cargo build --release -p cloud-gw -p outrigger-tests --bin cloud-gw --bin link-load
#   sh tests/link-bench.sh [NODES]
set -eu
nodes=${1:-10000}
bin=${CARGO_TARGET_DIR:-target}/release
dir=$(mktemp -d /var/tmp/link-bench.XXXXXX)
"$bin/cloud-gw" --dir "$dir" init --san 127.0.0.1 >/dev/null
RUST_LOG=warn "$bin/cloud-gw" --dir "$dir" serve --listen 127.0.0.1:18443 --http-listen off --objects "$dir/objects" 2>"$dir/cloud-gw.log" &
pid=$!
trap 'kill $pid 2>/dev/null; rm -rf "$dir"' EXIT
sleep 1
"$bin/link-load" --dir "$dir" --server wss://127.0.0.1:18443 delta
echo
"$bin/link-load" --dir "$dir" --server wss://127.0.0.1:18443 scale --nodes "$nodes" --cloud-pid "$pid" --pushes 200 --idle-secs 60
echo
"$bin/link-load" --dir "$dir" --server wss://127.0.0.1:18443 slow --nodes 100 --objects 1000 --rounds 5 --cloud-pid "$pid"
