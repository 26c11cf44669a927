# What edge-rt needs of the kernel (namespaces, cgroups, overlayfs, veth,
# bridge, netfilter and NAT, seccomp, USB serial adapters): a fragment
# merged into the machine's configuration (kernel-yocto).
FILESEXTRAPATHS:prepend := "${THISDIR}/files:"
SRC_URI:append = " file://outrigger.cfg"
