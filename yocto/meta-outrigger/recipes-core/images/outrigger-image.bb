SUMMARY = "An Outrigger gateway: edge-rt from the first boot"
DESCRIPTION = "A small image that boots straight into edge-rt: it joins \
the cloud on first boot with the token provisioned on the boot partition \
(boot/outrigger/join.conf), and runs its pods from the node store on the \
data partition after every power cut, with or without the cloud."
LICENSE = "MIT"

inherit core-image

IMAGE_INSTALL = "packagegroup-core-boot edge-rt ${CORE_IMAGE_EXTRA_INSTALL}"
IMAGE_LINGUAS = ""

# Partitions: boot (provisioning), root, data (edge-rt's data directory).
IMAGE_FSTYPES:append = " wic"
WKS_FILE:qemux86-64 = "outrigger-qemux86-64.wks"
WKS_FILE:qemuarm64 = "outrigger-qemuarm64.wks"
WKS_FILE:rpi = "outrigger-rpi.wks"
WKS_FILE:mx8-generic-bsp = "outrigger-imx.wks.in"

# Room for images pulled at the factory into the preload directory.
IMAGE_ROOTFS_EXTRA_SPACE = "65536"
