//! The container's PID 1: a copy of edge-rt's own init code that never execs.
//!
//! libcontainer hands control to an [`Executor`] once the container is set
//! up. Ours installs the seccomp profile and spawns the workload; it stays
//! on as the container's init. It forwards
//! signals to the workload, reaps orphans, and when the workload ends writes
//! its exit status to a file in edge-rt's state directory (through a file
//! descriptor opened before the container was created, so no path inside the
//! container is needed) and exits with the same status.
//!
//! First it makes the mounts the spec left to it, faster than libcontainer
//! would: the fresh filesystems under /dev (`mount_fresh`) and, on cgroup
//! v1, the container's view of the hierarchies at /sys/fs/cgroup
//! (`mount_hierarchies`).
//!
//! That file is how a restarted edge-rt, which is no longer the container's
//! parent and so cannot wait for it, still learns the exit code. Because the
//! init is our code already in memory, no binary has to exist inside the
//! image.

use std::ffi::CString;
use std::os::fd::RawFd;
use std::sync::Arc;

use libcontainer::oci_spec::runtime::Spec;
use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::seccomp::{self, Profile};

#[derive(Clone)]
pub struct PodInit {
    /// Where the exit status is written (inherited across the clone).
    pub exit_fd: RawFd,
    pub seccomp: Option<Arc<Profile>>,
    /// CAP_SYS_ADMIN is in the permitted set only for this init (for its
    /// mounts, to install seccomp for a container allowed to escalate):
    /// dropped before the workload runs, and by the init itself.
    pub drop_sys_admin: bool,
    /// Mount the v1 cgroup view: `Some(read_only)`.
    pub cgroup_view: Option<bool>,
    /// Fresh filesystems to mount under /dev (see `spec`).
    pub mounts: Vec<InitMount>,
}

/// A mount the init makes with mount(2), after pivot_root.
#[derive(Clone, Debug, PartialEq)]
pub struct InitMount {
    pub target: String,
    pub fstype: String,
    pub source: String,
    pub flags: nix::mount::MsFlags,
    pub data: String,
}

/// Status line format: `exited CODE` or `signaled SIGNO`, then the time in
/// nanoseconds since the epoch.
pub fn format_status(status: &WaitStatus) -> Option<String> {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    match status {
        WaitStatus::Exited(_, code) => Some(format!("exited {code} {t}\n")),
        WaitStatus::Signaled(_, sig, _) => Some(format!("signaled {} {t}\n", *sig as i32)),
        _ => None,
    }
}

fn fail(msg: &str) -> ! {
    let _ = nix::unistd::write(std::io::stderr(), msg.as_bytes());
    // SAFETY: _exit ends this init at once, before any workload exists.
    unsafe { libc::_exit(127) }
}

impl Executor for PodInit {
    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        DefaultExecutor {}.validate(spec)
    }

    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        let args: Vec<CString> = spec
            .process()
            .as_ref()
            .and_then(|p| p.args().as_ref())
            .ok_or(ExecutorError::InvalidArg)?
            .iter()
            .map(|a| CString::new(a.as_bytes()).map_err(|_| ExecutorError::InvalidArg))
            .collect::<Result<_, _>>()?;
        let Some(program) = args.first() else {
            return Err(ExecutorError::InvalidArg);
        };
        close_inherited_fds(self.exit_fd);
        if !self.mounts.is_empty() || self.cgroup_view.is_some() {
            with_sys_admin(|| {
                for m in &self.mounts {
                    mount_fresh(m)?;
                }
                match self.cgroup_view {
                    Some(read_only) => mount_hierarchies(read_only),
                    None => Ok(()),
                }
            })
            .map_err(|e| ExecutorError::Other(format!("container mounts: {e}")))?;
        }
        // The filter goes on this init too, so the workload inherits it
        // through a plain spawn; the init needs nothing it denies.
        if let Err(e) = seccomp::enter(self.seccomp.as_deref(), self.drop_sys_admin) {
            fail(&format!("edge-rt init: installing seccomp profile: {e}\n"));
        }
        let all = SigSet::all();
        all.thread_block()
            .map_err(|e| ExecutorError::Other(e.to_string()))?;
        match spawn(program, &args) {
            Ok(child) => supervise(child, self.exit_fd, &all),
            Err(e) => {
                let _ = nix::unistd::write(
                    std::io::stderr(),
                    format!("edge-rt init: exec {program:?}: {e}\n").as_bytes(),
                );
                report_and_exit(WaitStatus::Exited(Pid::from_raw(0), 127), self.exit_fd)
            }
        }
    }
}

extern "C" {
    static environ: *const *mut libc::c_char;
}

/// Start the workload with posix_spawnp (vfork and exec): this process is a
/// copy of edge-rt, and fork would copy its page tables only for the child
/// to throw them away. The workload starts as a fresh program should: no
/// signal blocked, every signal at its default (an ignored SIGTERM would
/// make a shell's `trap` silently useless), the environment libcontainer
/// set, and no descriptor but stdio (the status file is close-on-exec).
fn spawn(program: &CString, args: &[CString]) -> std::io::Result<Pid> {
    let mut argv: Vec<*mut libc::c_char> = args.iter().map(|a| a.as_ptr().cast_mut()).collect();
    argv.push(std::ptr::null_mut());
    let mut pid: libc::pid_t = 0;
    // SAFETY: attr and the signal sets are initialised before use and
    // destroyed after; argv is null-terminated and its strings outlive the
    // call; environ is the process environment, set by libcontainer.
    let rc = unsafe {
        let mut attr = std::mem::MaybeUninit::<libc::posix_spawnattr_t>::uninit();
        let rc = libc::posix_spawnattr_init(attr.as_mut_ptr());
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        let mut none = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        let mut every = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        libc::sigemptyset(none.as_mut_ptr());
        libc::sigfillset(every.as_mut_ptr());
        libc::posix_spawnattr_setsigmask(attr.as_mut_ptr(), none.as_ptr());
        libc::posix_spawnattr_setsigdefault(attr.as_mut_ptr(), every.as_ptr());
        libc::posix_spawnattr_setflags(
            attr.as_mut_ptr(),
            (libc::POSIX_SPAWN_SETSIGMASK | libc::POSIX_SPAWN_SETSIGDEF) as _,
        );
        let rc = libc::posix_spawnp(
            &mut pid,
            program.as_ptr(),
            std::ptr::null(),
            attr.as_ptr(),
            argv.as_ptr(),
            environ.cast(),
        );
        libc::posix_spawnattr_destroy(attr.as_mut_ptr());
        rc
    };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok(Pid::from_raw(pid))
}

/// Run `f` with CAP_SYS_ADMIN in the effective set (the init holds it in
/// its permitted set for this), as it was before afterwards.
fn with_sys_admin(f: impl FnOnce() -> std::io::Result<()>) -> std::io::Result<()> {
    use caps::{CapSet, Capability};
    let had = caps::has_cap(None, CapSet::Effective, Capability::CAP_SYS_ADMIN)
        .map_err(std::io::Error::other)?;
    if !had {
        caps::raise(None, CapSet::Effective, Capability::CAP_SYS_ADMIN)
            .map_err(std::io::Error::other)?;
    }
    let done = f();
    if !had {
        let _ = caps::drop(None, CapSet::Effective, Capability::CAP_SYS_ADMIN);
    }
    done
}

/// Mount a fresh filesystem (devpts, mqueue, tmpfs). After pivot_root every
/// path resolves inside the container's root, so a symlink in the image
/// can at worst move the mount within the container, never out of it.
fn mount_fresh(m: &InitMount) -> std::io::Result<()> {
    std::fs::create_dir_all(&m.target)
        .map_err(|e| std::io::Error::other(format!("{}: {e}", m.target)))?;
    let data = (!m.data.is_empty()).then_some(m.data.as_str());
    nix::mount::mount(
        Some(m.source.as_str()),
        m.target.as_str(),
        Some(m.fstype.as_str()),
        m.flags,
        data,
    )
    .map_err(|e| std::io::Error::other(format!("{}: {e}", m.target)))
}

/// Mount each v1 hierarchy this process belongs to at
/// /sys/fs/cgroup/<controllers> (a tmpfs from the spec), then make the tmpfs
/// read-only: the layout containerd gives a container on v1, with symlinks
/// for co-mounted controllers (`cpu -> cpu,cpuacct`).
///
/// The container has its own cgroup namespace, so a hierarchy mounted here
/// has the container's cgroup as its root. Mounting an existing hierarchy
/// by its exact controller set reuses it; nothing new is created. The
/// mounts cannot be misdirected: /sys/fs/cgroup is a fresh tmpfs on the
/// container's sysfs, nothing from the image is on the path.
fn mount_hierarchies(read_only: bool) -> std::io::Result<()> {
    use nix::mount::{mount, MsFlags};
    let root = std::path::Path::new("/sys/fs/cgroup");
    let base = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let mut flags = base | MsFlags::MS_RELATIME;
    if read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    for (dir, options) in v1_hierarchies(&std::fs::read_to_string("/proc/self/cgroup")?) {
        let target = root.join(&dir);
        std::fs::create_dir_all(&target)?;
        mount(
            Some("cgroup"),
            &target,
            Some("cgroup"),
            flags,
            Some(options.as_str()),
        )
        .map_err(|e| std::io::Error::other(format!("{}: {e}", target.display())))?;
        if dir.contains(',') {
            for name in dir.split(',') {
                let _ = std::os::unix::fs::symlink(&dir, root.join(name));
            }
        }
    }
    mount(
        None::<&str>,
        root,
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | base,
        None::<&str>,
    )
    .map_err(|e| std::io::Error::other(format!("read-only {}: {e}", root.display())))
}

/// The v1 hierarchies in a /proc/self/cgroup table: (directory name, mount
/// options). `4:cpu,cpuacct:/x` is `cpu,cpuacct`; a named hierarchy
/// `1:name=systemd:/x` is mounted as `systemd` with `none,name=systemd`;
/// the v2 line (`0::/x`) has no controllers and is left out.
fn v1_hierarchies(table: &str) -> Vec<(String, String)> {
    table
        .lines()
        .filter_map(|line| {
            let controllers = line.split(':').nth(1)?;
            if controllers.is_empty() {
                return None;
            }
            Some(match controllers.strip_prefix("name=") {
                Some(name) => (name.to_string(), format!("none,{controllers}")),
                None => (controllers.to_string(), controllers.to_string()),
            })
        })
        .collect()
}

/// This process is a clone of edge-rt that never execs, so close-on-exec
/// does not apply: close every descriptor it inherited (edge-rt's sockets,
/// its API listener, watches, files) but stdio and the status file. Left
/// open, a container would hold edge-rt's listening socket after edge-rt
/// itself is gone.
fn close_inherited_fds(keep: RawFd) {
    let fds: Vec<RawFd> = match std::fs::read_dir("/proc/self/fd") {
        Ok(rd) => rd
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
            .collect(),
        Err(_) => return,
    };
    for fd in fds {
        if fd > 2 && fd != keep {
            // SAFETY: closing descriptors this process inherited and will not
            // use; the directory handle used above is already closed (EBADF).
            unsafe { libc::close(fd) };
        }
    }
}

/// Record the workload's end where edge-rt reads it, and end the container
/// with the same status.
fn report_and_exit(status: WaitStatus, exit_fd: RawFd) -> ! {
    if let Some(line) = format_status(&status) {
        // SAFETY: exit_fd is our own open descriptor; the buffer is live.
        // No fsync: the state directory is tmpfs and only has to outlive
        // edge-rt restarts, not power cuts.
        unsafe { libc::pwrite(exit_fd, line.as_ptr().cast(), line.len(), 0) };
    }
    let code = match status {
        WaitStatus::Exited(_, c) => c,
        WaitStatus::Signaled(_, s, _) => 128 + s as i32,
        _ => 255,
    };
    // SAFETY: ending PID 1 of the container; the kernel kills the rest.
    unsafe { libc::_exit(code) }
}

/// PID 1's loop: forward signals, reap, and report the workload's end.
fn supervise(child: Pid, exit_fd: RawFd, set: &SigSet) -> ! {
    loop {
        let sig = match set.wait() {
            Ok(s) => s,
            Err(_) => continue,
        };
        if sig != Signal::SIGCHLD {
            let _ = kill(child, sig);
            continue;
        }
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(status) if status.pid() == Some(child) => report_and_exit(status, exit_fd),
                Ok(_) => {} // an orphan reaped
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hierarchies_from_proc_self_cgroup() {
        let table = "12:name=systemd:/\n5:cpu,cpuacct:/\n4:memory:/\n0::/\n";
        assert_eq!(
            v1_hierarchies(table),
            [
                ("systemd".to_string(), "none,name=systemd".to_string()),
                ("cpu,cpuacct".to_string(), "cpu,cpuacct".to_string()),
                ("memory".to_string(), "memory".to_string()),
            ]
        );
        assert!(v1_hierarchies("0::/edge-rt/x\n").is_empty());
    }
}
