//! What edge-rt does as a process supervisor: child subreaper, reaping every
//! zombie, signals (through `signal-hook`), and PID 1's duties when it is
//! the init of a gateway image.

use std::io;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::Path;

use nix::mount::{mount, MsFlags};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use crate::sys::reaper;

/// What the signals ask of the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// SIGTERM: stop (as PID 1: shut the machine down).
    Terminate,
    /// SIGINT: as PID 1 the kernel's Ctrl-Alt-Del: reboot. Otherwise as SIGTERM.
    Interrupt,
    /// SIGHUP: reload the configuration.
    Reload,
}

pub fn is_pid1() -> bool {
    std::process::id() == 1
}

/// Become a child subreaper: orphans below us are ours to reap.
pub fn become_subreaper() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Route signals into the runtime. SIGCHLD is handled here (every exited
/// child is reaped at once); the rest arrive as [`Event`]s.
pub fn install_signals() -> io::Result<mpsc::UnboundedReceiver<Event>> {
    let (tx, rx) = mpsc::unbounded_channel();
    for (sig, ev) in [
        (signal_hook::consts::SIGCHLD, None),
        (signal_hook::consts::SIGTERM, Some(Event::Terminate)),
        (signal_hook::consts::SIGINT, Some(Event::Interrupt)),
        (signal_hook::consts::SIGHUP, Some(Event::Reload)),
    ] {
        let (read, write) = StdUnixStream::pair()?;
        signal_hook::low_level::pipe::register(sig, write)?;
        read.set_nonblocking(true)?;
        let mut read = tokio::net::UnixStream::from_std(read)?;
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 64];
            loop {
                match read.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => match ev {
                        None => {
                            reaper::reap_all();
                        }
                        Some(e) => {
                            if tx.send(e).is_err() {
                                break;
                            }
                        }
                    },
                }
            }
        });
    }
    Ok(rx)
}

/// Mount points already present (from /proc/self/mountinfo).
fn mount_points() -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|s| {
            s.lines()
                .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn mount_if_missing(
    present: &[String],
    src: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) {
    if present.iter().any(|p| p == target) {
        return;
    }
    let _ = std::fs::create_dir_all(target);
    match mount(Some(src), target, Some(fstype), flags, data) {
        Ok(()) => tracing::info!(target, fstype, "mounted"),
        Err(e) => tracing::warn!(target, fstype, error = %e, "mount failed"),
    }
}

/// As PID 1: mount what a system needs before anything else runs. What is
/// already mounted (by an initramfs, or a container manager) is left alone.
pub fn pid1_mounts() {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    if !Path::new("/proc/self").exists() {
        mount_if_missing(&[], "proc", "/proc", "proc", nosuid, None);
    }
    let present = mount_points();
    mount_if_missing(&present, "sysfs", "/sys", "sysfs", nosuid, None);
    mount_if_missing(
        &present,
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    );
    let present = mount_points();
    mount_if_missing(
        &present,
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("gid=5,mode=0620,ptmxmode=0666"),
    );
    mount_if_missing(
        &present,
        "tmpfs",
        "/dev/shm",
        "tmpfs",
        nosuid,
        Some("mode=1777"),
    );
    mount_if_missing(
        &present,
        "tmpfs",
        "/run",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    );
    mount_if_missing(
        &present,
        "tmpfs",
        "/tmp",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    );
    let present = mount_points();
    if mount_if_absent_cgroup(&present) {
        // Delegate every controller to children, as systemd would.
        if let Ok(c) = std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers") {
            let enable: String = c.split_whitespace().map(|c| format!("+{c} ")).collect();
            let _ = std::fs::write("/sys/fs/cgroup/cgroup.subtree_control", enable.trim());
        }
    }
    if let Ok(name) = std::fs::read_to_string("/etc/hostname") {
        let _ = nix::unistd::sethostname(name.trim());
    }
}

fn mount_if_absent_cgroup(present: &[String]) -> bool {
    if present.iter().any(|p| p == "/sys/fs/cgroup") {
        return false;
    }
    mount_if_missing(
        present,
        "cgroup2",
        "/sys/fs/cgroup",
        "cgroup2",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None,
    );
    true
}

/// As PID 1, after the containers are stopped: flush and power off or reboot.
pub fn pid1_halt(reboot: bool) -> ! {
    nix::unistd::sync();
    let how = if reboot {
        nix::sys::reboot::RebootMode::RB_AUTOBOOT
    } else {
        nix::sys::reboot::RebootMode::RB_POWER_OFF
    };
    let _ = nix::sys::reboot::reboot(how);
    // reboot(2) does not return on success; if it failed there is nothing
    // better for init to do than exit (and let the kernel panic loudly).
    std::process::exit(1)
}
