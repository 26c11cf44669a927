#!/bin/sh
# cloud-gw's container image, built here from this checkout: a static
# (musl) cloud-gw for each architecture on an empty base (the binary,
# /etc/passwd and /etc/group for the unprivileged user 65532, /tmp), as an
# OCI image layout with one index over the architectures. No Docker needed;
# the layers are reproducible (fixed owners, modes and times).
#
#   cloud-gw/image/build.sh OUT_DIR [TAG]          # ARCHES="amd64 arm64" by default
#   skopeo copy --all oci:OUT_DIR:TAG docker://REGISTRY/outrigger/cloud-gw:TAG
#   cloud-gw manifests --image REGISTRY/outrigger/cloud-gw:TAG --san ... | kubectl apply -f -
#
# Needs cargo with the musl targets (rustup target add x86_64-unknown-linux-musl
# aarch64-unknown-linux-musl) and zig's C compiler for aws-lc (pip install
# ziglang), as the static edge-rt build does; tar, gzip, sha256sum.
# CLOUD_GW_BIN_<ARCH>=path uses a binary built already instead of cargo;
# PROFILE=name builds with another cargo profile (release by default).
set -eu
out=${1:?usage: build.sh OUT_DIR [TAG]}
tag=${2:-$(sed -n 's/^version = "\(.*\)"/\1/p' "$(dirname "$0")/../../Cargo.toml" | head -n 1)}
arches=${ARCHES:-amd64 arm64}
root=$(cd "$(dirname "$0")/../.." && pwd)
target_dir=${CARGO_TARGET_DIR:-$root/target}
profile=${PROFILE:-release}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out/blobs/sha256"

# Write stdin as a blob; print its digest and size.
blob() {
  cat >"$work/blob"
  d=$(sha256sum "$work/blob" | cut -d' ' -f1)
  mv "$work/blob" "$out/blobs/sha256/$d"
  echo "$d $(wc -c <"$out/blobs/sha256/$d")"
}

manifests=""
for arch in $arches; do
  case $arch in
    amd64) triple=x86_64-unknown-linux-musl ;;
    arm64) triple=aarch64-unknown-linux-musl ;;
    *) echo "unknown architecture $arch (amd64, arm64)" >&2; exit 1 ;;
  esac
  bin=$(eval echo "\${CLOUD_GW_BIN_$(echo "$arch" | tr a-z A-Z):-}")
  if [ -z "$bin" ]; then
    (cd "$root" && cargo build --profile "$profile" --locked --target "$triple" -p cloud-gw)
    bin=$target_dir/$triple/$profile/cloud-gw
  fi
  rootfs=$work/rootfs-$arch
  mkdir -p "$rootfs/etc" "$rootfs/tmp"
  cp "$bin" "$rootfs/cloud-gw"
  printf 'root:x:0:0:root:/:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/:/sbin/nologin\n' >"$rootfs/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' >"$rootfs/etc/group"
  chmod 0755 "$rootfs/cloud-gw" "$rootfs/etc"
  chmod 0644 "$rootfs/etc/passwd" "$rootfs/etc/group"
  chmod 1777 "$rootfs/tmp"
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 --format=posix \
    --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
    -C "$rootfs" -cf "$work/layer.tar" .
  diff_id=$(sha256sum "$work/layer.tar" | cut -d' ' -f1)
  set -- $(gzip -9n <"$work/layer.tar" | blob)
  layer=$1 layer_size=$2
  set -- $(printf '{"architecture":"%s","os":"linux","config":{"User":"65532:65532","Entrypoint":["/cloud-gw"],"WorkingDir":"/","Labels":{"org.opencontainers.image.title":"cloud-gw","org.opencontainers.image.version":"%s"}},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]},"history":[{"created_by":"cloud-gw/image/build.sh"}]}' \
    "$arch" "$tag" "$diff_id" | blob)
  config=$1 config_size=$2
  set -- $(printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:%s","size":%s}]}' \
    "$config" "$config_size" "$layer" "$layer_size" | blob)
  entry=$(printf '{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"platform":{"architecture":"%s","os":"linux"}}' "$1" "$2" "$arch")
  manifests=${manifests:+$manifests,}$entry
  echo "cloud-gw $tag for linux/$arch: $(wc -c <"$bin") bytes, layer sha256:$layer" >&2
done

set -- $(printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[%s]}' "$manifests" | blob)
printf '{"imageLayoutVersion":"1.0.0"}' >"$out/oci-layout"
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.index.v1+json","digest":"sha256:%s","size":%s,"annotations":{"org.opencontainers.image.ref.name":"%s"}}]}' \
  "$1" "$2" "$tag" >"$out/index.json"
echo "$out:$tag"
