#!/usr/bin/env bash
# The SD card image of an i.MX 8M Plus EVK gateway (genimage.cfg.in beside
# this script: NXP's boot image, then boot, root and data partitions,
# labelled as /etc/fstab mounts them). Buildroot runs it after
# imx8-bootloader-prepare.sh made imx8-boot-sd.bin, with BR2_CONFIG,
# BINARIES_DIR and BUILD_DIR set.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cfg=$BINARIES_DIR/genimage-outrigger.cfg

# The kernel and the device trees the defconfig builds.
files='"Image"'
dts=$(sed -n 's/^BR2_LINUX_KERNEL_INTREE_DTS_NAME="\(.*\)"$/\1/p' "$BR2_CONFIG")
for d in $dts; do
	files="$files, \"$(basename "$d").dtb\""
done
sed "s|@FILES@|$files|" "$here/genimage.cfg.in" >"$cfg"

"$here/../common/genimage.sh" "$cfg"
