#!/bin/sh
# Quick start: run edge-rt on its embedded defaults with an example pod and
# an example image built here from Debian's busybox-static (no registry, no
# internet). Needs root, cargo, and `apt-get install busybox-static`.
set -eu
cd "$(dirname "$0")/../.."
cargo build --release -p edge-rt -p outrigger-tests
mkdir -p /usr/share/edge-rt/images /etc/edge-rt/pods
./target/release/make-image /usr/share/edge-rt/images/busybox.tar
cp edge-rt/examples/hello.yaml /etc/edge-rt/pods/hello.yaml
echo "edge-rt starting; in another shell: sudo ./target/release/edge-rt ps; tail -f /var/log/pods/default_hello_*/hello/0.log"
exec ./target/release/edge-rt run
