# edge-rt's kernel fragment on meta-freescale's linux-fslc-imx kernel (its
# linux-imx.inc inherits kernel-yocto, which merges .cfg fragments of
# SRC_URI into the defconfig).
FILESEXTRAPATHS:prepend := "${THISDIR}/../../../../recipes-kernel/linux/files:"
SRC_URI:append = " file://outrigger.cfg"
