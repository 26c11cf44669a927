################################################################################
#
# edge-rt
#
################################################################################

# This repository at a commit (or a release tag); point _SITE at your mirror.
EDGE_RT_VERSION = 35f2b5f7d5454594676305a06436e90ce0304e87
EDGE_RT_SITE = https://github.com/outrigger-io/outrigger.git
EDGE_RT_SITE_METHOD = git
# One member of the workspace (the lock file is the workspace's).
EDGE_RT_SUBDIR = edge-rt
EDGE_RT_LICENSE = Apache-2.0, MIT, ISC, Zlib, BSD-3-Clause, Unicode-3.0, MPL-2.0, CC0-1.0
EDGE_RT_LICENSE_FILES = LICENSE
# The workspace's release profile strips; Buildroot strips the target.
EDGE_RT_CARGO_ENV = CARGO_PROFILE_RELEASE_STRIP=false

EDGE_RT_PROVISION_DIR = $(call qstrip,$(BR2_PACKAGE_EDGE_RT_PROVISION_DIR))
EDGE_RT_DATA_DIR = $(call qstrip,$(BR2_PACKAGE_EDGE_RT_DATA_DIR))
# The files an image needs, shared with the Yocto layer: in the source.
EDGE_RT_FILES = $(@D)/boards/common/edge-rt

define EDGE_RT_INSTALL_FILES
	$(INSTALL) -D -m 0644 $(EDGE_RT_FILES)/config.toml \
		$(TARGET_DIR)/etc/edge-rt/config.toml
	$(INSTALL) -d $(TARGET_DIR)/etc/edge-rt/pods \
		$(TARGET_DIR)/usr/share/edge-rt/images \
		$(TARGET_DIR)$(EDGE_RT_DATA_DIR) \
		$(TARGET_DIR)$(EDGE_RT_PROVISION_DIR)
	$(INSTALL) -D -m 0755 $(EDGE_RT_FILES)/edge-rt-join \
		$(TARGET_DIR)/usr/libexec/edge-rt/join
	$(SED) 's,@DATA_DIR@,$(EDGE_RT_DATA_DIR),g;s,@PROVISION_DIR@,$(EDGE_RT_PROVISION_DIR),g;s,@BINDIR@,/usr/bin,g;s,@LIBEXECDIR@,/usr/libexec,g' \
		$(TARGET_DIR)/etc/edge-rt/config.toml \
		$(TARGET_DIR)/usr/libexec/edge-rt/join
endef
EDGE_RT_POST_INSTALL_TARGET_HOOKS += EDGE_RT_INSTALL_FILES

define EDGE_RT_INSTALL_INIT_SYSV
	$(INSTALL) -D -m 0755 $(EDGE_RT_FILES)/edge-rt.init \
		$(TARGET_DIR)/etc/init.d/S99edge-rt
	$(SED) 's,@BINDIR@,/usr/bin,g;s,@LIBEXECDIR@,/usr/libexec,g' \
		$(TARGET_DIR)/etc/init.d/S99edge-rt
endef

define EDGE_RT_INSTALL_INIT_SYSTEMD
	$(foreach u,edge-rt.service edge-rt-join.service,
		$(INSTALL) -D -m 0644 $(EDGE_RT_FILES)/$(u) \
			$(TARGET_DIR)/usr/lib/systemd/system/$(u)
		$(SED) 's,@BINDIR@,/usr/bin,g;s,@LIBEXECDIR@,/usr/libexec,g;s,@PROVISION_DIR@,$(EDGE_RT_PROVISION_DIR),g' \
			$(TARGET_DIR)/usr/lib/systemd/system/$(u)
	)
endef

$(eval $(cargo-package))
