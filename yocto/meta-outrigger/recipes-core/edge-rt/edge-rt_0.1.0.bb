SUMMARY = "edge-rt: Kubernetes pods and field devices on a gateway, offline-first"
DESCRIPTION = "The Outrigger node agent: runs pods' containers in-process \
(youki's libcontainer), keeps what it was told in SQLite so pods run on \
through days offline and after reboots, talks to Modbus and MQTT devices, \
and links to cloud-gw, which makes the gateway an ordinary Kubernetes Node."
HOMEPAGE = "https://github.com/outrigger-io/outrigger"
SECTION = "admin"

# edge-rt is Apache-2.0; the crates linked into it add these (from
# `cargo metadata` over its dependency graph, choosing the first of each
# crate's alternatives that is one of these).
LICENSE = "Apache-2.0 & MIT & ISC & Zlib & BSD-3-Clause & Unicode-3.0 & MPL-2.0 & CC0-1.0"
LIC_FILES_CHKSUM = "file://LICENSE;md5=3b83ef96387f14655fc854ddc3c6bd57"

inherit cargo cargo-update-recipe-crates systemd update-rc.d

# This repository. Point these at your mirror or release tag; or build a
# local checkout with externalsrc (INHERIT += "externalsrc",
# EXTERNALSRC:pn-edge-rt = "/path/to/outrigger").
OUTRIGGER_GIT_URI ?= "git://github.com/outrigger-io/outrigger.git;protocol=https;branch=main"
SRC_URI = "${OUTRIGGER_GIT_URI} \
           file://config.toml \
           file://edge-rt.service \
           file://edge-rt-join.service \
           file://edge-rt.init \
           file://edge-rt-join \
"
SRCREV ?= "35f2b5f7d5454594676305a06436e90ce0304e87"
PV = "0.1.0+git"

# Every crate of Cargo.lock by checksum (scripts/update-crates writes it;
# CI fails if it does not match the repository's Cargo.lock).
require ${BPN}-crates.inc

# One member of the workspace; the lock file is the workspace's.
CARGO_MANIFEST_PATH = "${S}/edge-rt/Cargo.toml"
CARGO_LOCK_PATH = "${S}/Cargo.lock"

# The workspace's release profile strips; here the -dbg package does.
export CARGO_PROFILE_RELEASE_STRIP = "false"

# edge-rt sets up the pod network with these (see its README).
RDEPENDS:${PN} = "iproute2 iptables ca-certificates"
# Modules of the kernel fragment (built in on some kernels).
RRECOMMENDS:${PN} = " \
    kernel-module-veth kernel-module-bridge kernel-module-overlay \
    kernel-module-nf-nat kernel-module-iptable-nat kernel-module-iptable-filter \
    kernel-module-xt-masquerade kernel-module-xt-addrtype kernel-module-xt-comment \
    kernel-module-xt-conntrack kernel-module-xt-nat \
    kernel-module-ftdi-sio kernel-module-cp210x kernel-module-ch341 \
    kernel-module-pl2303 kernel-module-cdc-acm \
"

# The boot partition holds what is provisioned at flash time (the join
# token, the store key: not on the data partition); the data partition
# is edge-rt's data directory. Images set these with their partitions.
OUTRIGGER_PROVISION_DIR ?= "/boot/outrigger"
OUTRIGGER_DATA_DIR ?= "/var/lib/edge-rt"

do_install:append() {
    install -d ${D}${sysconfdir}/edge-rt ${D}${sysconfdir}/edge-rt/pods
    install -m 0644 ${UNPACKDIR}/config.toml ${D}${sysconfdir}/edge-rt/config.toml
    sed -i -e 's,@DATA_DIR@,${OUTRIGGER_DATA_DIR},g' \
           -e 's,@PROVISION_DIR@,${OUTRIGGER_PROVISION_DIR},g' \
        ${D}${sysconfdir}/edge-rt/config.toml
    install -d ${D}${libexecdir}/edge-rt
    install -m 0755 ${UNPACKDIR}/edge-rt-join ${D}${libexecdir}/edge-rt/join
    sed -i -e 's,@PROVISION_DIR@,${OUTRIGGER_PROVISION_DIR},g' \
           -e 's,@BINDIR@,${bindir},g' \
        ${D}${libexecdir}/edge-rt/join
    install -d ${D}${datadir}/edge-rt/images

    if ${@bb.utils.contains('DISTRO_FEATURES', 'systemd', 'true', 'false', d)}; then
        install -d ${D}${systemd_system_unitdir}
        for u in edge-rt.service edge-rt-join.service; do
            install -m 0644 ${UNPACKDIR}/$u ${D}${systemd_system_unitdir}/$u
            sed -i -e 's,@BINDIR@,${bindir},g' -e 's,@LIBEXECDIR@,${libexecdir},g' \
                   -e 's,@PROVISION_DIR@,${OUTRIGGER_PROVISION_DIR},g' \
                ${D}${systemd_system_unitdir}/$u
        done
    fi
    if ${@bb.utils.contains('DISTRO_FEATURES', 'sysvinit', 'true', 'false', d)}; then
        install -d ${D}${sysconfdir}/init.d
        install -m 0755 ${UNPACKDIR}/edge-rt.init ${D}${sysconfdir}/init.d/edge-rt
        sed -i -e 's,@BINDIR@,${bindir},g' -e 's,@LIBEXECDIR@,${libexecdir},g' \
            ${D}${sysconfdir}/init.d/edge-rt
    fi
}

SYSTEMD_SERVICE:${PN} = "edge-rt.service edge-rt-join.service"

# sysvinit: the script joins first (once, if a token is provisioned),
# then starts edge-rt.
INITSCRIPT_PACKAGES = "${PN}"
INITSCRIPT_NAME = "edge-rt"
INITSCRIPT_PARAMS = "start 90 2 3 4 5 . stop 10 0 1 6 ."

FILES:${PN} += "${systemd_system_unitdir} ${libexecdir}/edge-rt ${datadir}/edge-rt"
CONFFILES:${PN} = "${sysconfdir}/edge-rt/config.toml"
