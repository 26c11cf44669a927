# edge-rt's kernel fragment on the Raspberry Pi kernels (kernel-yocto
# merges .cfg fragments of SRC_URI into the board's defconfig).
FILESEXTRAPATHS:prepend := "${THISDIR}/../../../../recipes-kernel/linux/files:"
SRC_URI:append = " file://outrigger.cfg"
