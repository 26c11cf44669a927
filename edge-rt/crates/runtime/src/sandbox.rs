//! A pod's shared namespaces without a pause container.
//!
//! The network, IPC and UTS namespaces of a pod are created once by a
//! short-lived thread that unshares them, and are kept alive by bind mounts of
//! their `/proc/thread-self/ns/*` files under the pod's directory. Every
//! container of the pod joins them by path, and they outlive container
//! restarts as a sandbox must. The directory also holds the pod's
//! `/etc/hostname`, `/etc/hosts` and `/etc/resolv.conf`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};

use super::spec::{BindMount, SharedNamespaces};

#[derive(Debug, Clone)]
pub struct Sandbox {
    pub dir: PathBuf,
    pub host_network: bool,
}

const NS_KINDS: &[(&str, CloneFlags)] = &[
    ("net", CloneFlags::CLONE_NEWNET),
    ("ipc", CloneFlags::CLONE_NEWIPC),
    ("uts", CloneFlags::CLONE_NEWUTS),
];

impl Sandbox {
    /// Create (or find, after an edge-rt restart) the sandbox in `dir`;
    /// `resolv_conf` is the pod's (None: the host's).
    pub fn ensure(
        dir: &Path,
        hostname: &str,
        host_network: bool,
        resolv_conf: Option<&str>,
    ) -> io::Result<Sandbox> {
        let sb = Sandbox {
            dir: dir.to_path_buf(),
            host_network,
        };
        let ns_dir = dir.join("ns");
        fs::create_dir_all(&ns_dir)?;
        if !sb.is_live() {
            let kinds: Vec<(&str, CloneFlags)> = NS_KINDS
                .iter()
                .filter(|(k, _)| !(host_network && (*k == "net" || *k == "uts")))
                .copied()
                .collect();
            for (k, _) in &kinds {
                fs::write(ns_dir.join(k), b"")?;
            }
            let host = hostname.to_string();
            let nsd = ns_dir.clone();
            // Namespaces of these kinds belong to a thread: unshare in a thread of
            // our own so the rest of edge-rt stays where it is.
            outrigger_sys::thread("sandbox", move || -> io::Result<()> {
                let flags = kinds.iter().fold(CloneFlags::empty(), |a, (_, f)| a | *f);
                unshare(flags).map_err(io::Error::from)?;
                if kinds.iter().any(|(k, _)| *k == "uts") {
                    nix::unistd::sethostname(&host).map_err(io::Error::from)?;
                }
                if kinds.iter().any(|(k, _)| *k == "net") {
                    loopback_up()?;
                }
                for (k, _) in &kinds {
                    let src = format!("/proc/thread-self/ns/{k}");
                    mount(
                        Some(src.as_str()),
                        &nsd.join(k),
                        None::<&str>,
                        MsFlags::MS_BIND,
                        None::<&str>,
                    )
                    .map_err(|e| io::Error::other(format!("bind {src}: {e}")))?;
                }
                Ok(())
            })?
            .join()
            .map_err(|_| io::Error::other("sandbox thread panicked"))??;
        }
        sb.write_etc_files(hostname, resolv_conf)?;
        Ok(sb)
    }

    fn ns_path(&self, kind: &str) -> PathBuf {
        self.dir.join("ns").join(kind)
    }

    /// Whether the namespace files are still mounted (after an edge-rt
    /// restart they are; after a reboot they are not).
    pub fn is_live(&self) -> bool {
        let ipc = self.ns_path("ipc");
        is_nsfs(&ipc)
    }

    pub fn namespaces(&self) -> SharedNamespaces {
        SharedNamespaces {
            network: (!self.host_network).then(|| self.ns_path("net")),
            ipc: Some(self.ns_path("ipc")),
            uts: (!self.host_network).then(|| self.ns_path("uts")),
        }
    }

    fn write_etc_files(&self, hostname: &str, resolv_conf: Option<&str>) -> io::Result<()> {
        let etc = self.dir.join("etc");
        fs::create_dir_all(&etc)?;
        let host_name = if self.host_network {
            nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_else(|_| hostname.into())
        } else {
            hostname.to_string()
        };
        fs::write(etc.join("hostname"), format!("{host_name}\n"))?;
        let hosts = if self.host_network {
            fs::read_to_string("/etc/hosts").unwrap_or_default()
        } else {
            format!(
                "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{host_name}\n"
            )
        };
        fs::write(etc.join("hosts"), hosts)?;
        let resolv = match resolv_conf {
            Some(r) => r.to_string(),
            None => fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
        };
        fs::write(etc.join("resolv.conf"), resolv)?;
        Ok(())
    }

    /// Bind mounts every container of the pod gets.
    pub fn mounts(&self) -> Vec<BindMount> {
        ["hostname", "hosts", "resolv.conf"]
            .iter()
            .map(|f| BindMount {
                source: self.dir.join("etc").join(f),
                destination: format!("/etc/{f}"),
                read_only: false,
            })
            .collect()
    }

    /// Tear down: unmount the namespace files and remove the directory.
    pub fn remove(&self) -> io::Result<()> {
        for (k, _) in NS_KINDS {
            let p = self.ns_path(k);
            let _ = umount2(&p, MntFlags::MNT_DETACH);
        }
        match fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

// f_type's width differs between targets (long on 64-bit, int on 32-bit).
#[allow(clippy::unnecessary_cast)]
fn is_nsfs(p: &Path) -> bool {
    nix::sys::statfs::statfs(p)
        .map(|s| s.filesystem_type().0 as i64 == 0x6e736673)
        .unwrap_or(false)
}

/// `ip link set lo up` in the calling thread's network namespace.
// The ioctl request type is c_ulong on glibc and c_int on musl.
#[allow(clippy::unnecessary_cast)]
fn loopback_up() -> io::Result<()> {
    // SAFETY: plain socket/ioctl calls on a struct we own.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo\0".iter().enumerate() {
            req.ifr_name[i] = *b as libc::c_char;
        }
        if libc::ioctl(fd, libc::SIOCGIFFLAGS as _, &mut req) < 0 {
            let e = io::Error::last_os_error();
            libc::close(fd);
            return Err(e);
        }
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        let rc = libc::ioctl(fd, libc::SIOCSIFFLAGS as _, &req);
        let e = io::Error::last_os_error();
        libc::close(fd);
        if rc < 0 {
            return Err(e);
        }
    }
    Ok(())
}
