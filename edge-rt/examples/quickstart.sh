#!/bin/sh
# Quick start: run edge-rt on its embedded defaults with an example pod and
# an example image built here from Debian's busybox-static (no registry, no
# internet). Needs root, cargo, and `apt-get install busybox-static iptables`
# (iproute2 and iptables give the pod its network).
set -eu
cd "$(dirname "$0")/../.."
cargo build --release -p edge-rt -p outrigger-tests
bin="${CARGO_TARGET_DIR:-target}/release"
mkdir -p /usr/share/edge-rt/images /etc/edge-rt/pods
"$bin/make-image" /usr/share/edge-rt/images/busybox.tar
cp edge-rt/examples/hello.yaml /etc/edge-rt/pods/hello.yaml
echo "edge-rt starting; in another shell: sudo $bin/edge-rt pods; sudo $bin/edge-rt logs hello -f"
exec "$bin/edge-rt" run
