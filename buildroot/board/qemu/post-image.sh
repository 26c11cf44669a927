#!/usr/bin/env bash
# After Buildroot's board/qemu/post-image.sh (its start-qemu.sh boots the
# bare root file system): disk.img with boot, root and data partitions
# (genimage.cfg beside this script), and start-outrigger.sh booting it, as
# a gateway's disk is laid out. Buildroot runs it with BR2_CONFIG,
# BINARIES_DIR and BUILD_DIR set.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
"$here/../common/genimage.sh" "$here/genimage.cfg"

# Devices as Buildroot's own start-qemu.sh has them for the board (virtio
# over MMIO on the arm64 virt machine, PCI on x86_64).
if grep -q '^BR2_aarch64=y' "$BR2_CONFIG"; then
	qemu="qemu-system-aarch64 -M virt -cpu cortex-a53" kernel=Image
	console=ttyAMA0 bus=device
else
	qemu="qemu-system-x86_64 -M pc" kernel=bzImage
	console=ttyS0 bus=pci
fi
cat >"$BINARIES_DIR/start-outrigger.sh" <<RUN
#!/bin/sh
# The gateway's disk under QEMU, user networking (the host is 10.0.2.2).
d=\$(dirname "\$0")
exec $qemu -kernel "\$d/$kernel" -smp 2 -m 1024 -nographic \\
	-append "rootwait root=/dev/vda2 console=$console" \\
	-drive file="\$d/disk.img",if=none,format=raw,id=hd0 -device virtio-blk-$bus,drive=hd0 \\
	-netdev user,id=net0 -device virtio-net-$bus,netdev=net0 "\$@"
RUN
chmod 0755 "$BINARIES_DIR/start-outrigger.sh"
