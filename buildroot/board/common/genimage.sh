#!/usr/bin/env bash
# genimage on the configuration $1, images read from and written to
# BINARIES_DIR (the boards' post-image scripts call it; Buildroot sets
# BINARIES_DIR and BUILD_DIR). Every partition comes from an image, so
# genimage's root path can be empty (it would copy a given one whole).
set -euo pipefail
tmp=$BUILD_DIR/genimage.tmp
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
rm -rf "$tmp"
genimage --rootpath "$root" --tmppath "$tmp" \
	--inputpath "$BINARIES_DIR" --outputpath "$BINARIES_DIR" --config "$1"
