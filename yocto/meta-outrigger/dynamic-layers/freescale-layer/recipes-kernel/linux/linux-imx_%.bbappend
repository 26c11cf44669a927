# edge-rt's kernel fragment on NXP's i.MX kernel (it inherits kernel-yocto,
# which merges .cfg fragments of SRC_URI).
FILESEXTRAPATHS:prepend := "${THISDIR}/../../../../recipes-kernel/linux/files:"
SRC_URI:append = " file://outrigger.cfg"
