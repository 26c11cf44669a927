#!/usr/bin/env bash
# The SD card image of a Raspberry Pi gateway (genimage.cfg.in beside this
# script: boot, root and data partitions, labelled as /etc/fstab mounts
# them). Buildroot runs it with BINARIES_DIR and BUILD_DIR set, after the
# firmware, the kernel, the device trees and rootfs.ext4 are in
# BINARIES_DIR.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cfg=$BINARIES_DIR/genimage-outrigger.cfg

# The boot partition's files: device trees, the firmware (with the
# config.txt BR2_PACKAGE_RPI_FIRMWARE_CONFIG_FILE gave) and the kernel
# config.txt names.
files=()
for f in "$BINARIES_DIR"/*.dtb "$BINARIES_DIR"/rpi-firmware/*; do
	[ -e "$f" ] && files+=("${f#"$BINARIES_DIR"/}")
done
kernel=$(sed -n 's/^kernel=//p' "$BINARIES_DIR/rpi-firmware/config.txt")
files+=("${kernel:-Image}")
list=$(printf '\\t\\t\\t"%s",\\n' "${files[@]}")
sed "s|#BOOT_FILES#|$list|" "$here/genimage.cfg.in" >"$cfg"

"$here/../common/genimage.sh" "$cfg"
