#!/bin/sh
# Partitions edge-rt uses, mounted by label: boot (vfat; what is
# provisioned at flash time in /boot/outrigger: the join token, the store
# key), data (edge-rt's data directory).
set -e
TARGET_DIR=$1
FSTAB="$TARGET_DIR/etc/fstab"
mkdir -p "$TARGET_DIR/boot" "$TARGET_DIR/var/lib/edge-rt"
grep -q '^LABEL=boot ' "$FSTAB" ||
	echo 'LABEL=boot /boot vfat defaults,fmask=0177,dmask=0077 0 0' >>"$FSTAB"
grep -q '^LABEL=data ' "$FSTAB" ||
	echo 'LABEL=data /var/lib/edge-rt ext4 defaults,noatime 0 2' >>"$FSTAB"
