//! Running a process inside a running container (`edge-rt exec`, exec
//! probes and hooks) through libcontainer's tenant builder: the process
//! joins the container's namespaces and cgroup with the container's user,
//! capabilities, no_new_privs and our seccomp profile, and is our child, so
//! its exit code comes back through the one reaper.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::oci_spec::runtime::Spec;
use libcontainer::syscall::syscall::SyscallType;
use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use tokio::io::unix::AsyncFd;

use super::seccomp::{self, Profile};
use super::{pidfd_open, pidfd_signal, Runtime, RuntimeError};
use outrigger_sys::{fork_guard, reaper};

/// The standard streams of an exec'd process.
pub struct Stdio {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    /// The three are a terminal's: make it the controlling one.
    pub tty: bool,
}

/// What runs in the new process right before the command: libcontainer
/// has joined the container; we add the seccomp profile (and a
/// controlling terminal), then exec.
#[derive(Clone)]
struct ExecInit {
    seccomp: Option<Arc<Profile>>,
    drop_sys_admin: bool,
    tty: bool,
}

impl Executor for ExecInit {
    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        DefaultExecutor {}.validate(spec)
    }

    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        let args: Vec<std::ffi::CString> = spec
            .process()
            .as_ref()
            .and_then(|p| p.args().as_ref())
            .ok_or(ExecutorError::InvalidArg)?
            .iter()
            .map(|a| std::ffi::CString::new(a.as_bytes()).map_err(|_| ExecutorError::InvalidArg))
            .collect::<Result<_, _>>()?;
        if args.is_empty() {
            return Err(ExecutorError::InvalidArg);
        }
        if self.tty {
            // A session of its own with the terminal as controlling tty, so
            // job control and ^C work in an interactive shell.
            let _ = nix::unistd::setsid();
            // SAFETY: plain ioctl on our stdin.
            unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) };
        }
        seccomp::enter(self.seccomp.as_deref(), self.drop_sys_admin)
            .map_err(|e| ExecutorError::Other(format!("seccomp: {e}")))?;
        let err = nix::unistd::execvp(&args[0], &args).err();
        Err(ExecutorError::Other(format!("exec {:?}: {err:?}", args[0])))
    }
}

/// A process running inside a container.
pub struct ExecProcess {
    pid: i32,
    /// None once dropped (see Drop).
    pidfd: Option<AsyncFd<OwnedFd>>,
}

impl ExecProcess {
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Wait for the end; the exit code (128 + signal if killed).
    pub async fn wait(&self) -> i32 {
        if let Some(fd) = &self.pidfd {
            let _ = fd.readable().await;
        }
        // The SIGCHLD reaper may not have run yet: ask until it has.
        for _ in 0..100 {
            if let Some(st) = reaper::take(self.pid) {
                return match st {
                    nix::sys::wait::WaitStatus::Exited(_, c) => c,
                    nix::sys::wait::WaitStatus::Signaled(_, s, _) => 128 + s as i32,
                    _ => 255,
                };
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        255
    }

    pub fn kill(&self) {
        if let Some(fd) = &self.pidfd {
            let _ = pidfd_signal(fd.get_ref(), libc::SIGKILL);
        }
    }
}

impl Drop for ExecProcess {
    /// A process nobody waits for any more (a probe cut short) must still
    /// be reaped: it lives in the container's PID namespace, and that
    /// namespace's init cannot finish exiting while it is an unreaped zombie.
    fn drop(&mut self) {
        let (pid, fd) = (self.pid, self.pidfd.take());
        let reap = move || {
            let _ = reaper::take(pid);
            let _ = nix::sys::wait::waitpid(
                nix::unistd::Pid::from_raw(pid),
                Some(nix::sys::wait::WaitPidFlag::WNOHANG),
            );
            reaper::forget(pid);
        };
        match (fd, tokio::runtime::Handle::try_current()) {
            (Some(fd), Ok(h)) => {
                h.spawn(async move {
                    let _ = fd.readable().await;
                    reap();
                });
            }
            _ => reap(),
        }
    }
}

impl Runtime {
    /// Start `args` inside the running container `id`.
    pub fn exec(
        &self,
        id: &str,
        args: &[String],
        stdio: Stdio,
    ) -> Result<ExecProcess, RuntimeError> {
        let record = self
            .get(id)
            .filter(|r| r.exit.is_none())
            .ok_or_else(|| RuntimeError::NotFound(format!("{id} (not running)")))?;
        if args.is_empty() {
            return Err(RuntimeError::Config("exec: no command given".into()));
        }
        let seccomp = match &record.seccomp_caps {
            Some(caps) => Some(Arc::new(
                seccomp::default_profile(caps).map_err(RuntimeError::Config)?,
            )),
            None => None,
        };
        let err = |e: &dyn std::fmt::Display| RuntimeError::Create {
            id: id.to_string(),
            detail: format!("exec: {e}"),
        };
        let tty = stdio.tty;
        // As the container's process runs: same user, groups and directory
        // (the tenant builder would otherwise run as root in "/").
        let spec: serde_json::Value = std::fs::read(self.dir(id).join("bundle/config.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let user = &spec["process"]["user"];
        let uid = user["uid"].as_u64().map(|u| u as u32);
        let gid = user["gid"].as_u64().map(|g| g as u32);
        let gids: Vec<u32> = user["additionalGids"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|g| g.as_u64())
                    .map(|g| g as u32)
                    .collect()
            })
            .unwrap_or_default();
        let cwd = spec["process"]["cwd"]
            .as_str()
            .map(std::path::PathBuf::from);
        let pid = {
            let _barrier = fork_guard::write();
            ContainerBuilder::new(id.to_string(), SyscallType::default())
                .with_root_path(self.cfg.state_dir.join("youki"))
                .map_err(|e| err(&e))?
                .with_executor(ExecInit {
                    seccomp,
                    drop_sys_admin: record.drop_sys_admin,
                    tty,
                })
                .with_stdin(stdio.stdin)
                .with_stdout(stdio.stdout)
                .with_stderr(stdio.stderr)
                .as_tenant()
                .with_container_args(args.to_vec())
                .with_user(uid)
                .with_group(gid)
                .with_additional_gids(gids)
                .with_cwd(cwd)
                .with_detach(true)
                .build()
                .map_err(|e| err(&e))?
                .as_raw()
        };
        reaper::register(pid);
        let fd = pidfd_open(pid).map_err(|e| err(&e))?;
        // SAFETY: the AsyncFd owns the pidfd; nothing else closes it.
        let pidfd = unsafe { AsyncFd::register(fd) }.map_err(|e| err(&e))?;
        tracing::debug!(id, pid, fd = pidfd.get_ref().as_raw_fd(), "exec started");
        Ok(ExecProcess {
            pid,
            pidfd: Some(pidfd),
        })
    }

    /// Run `args` in the container to its end, with no stdin, and return its
    /// exit code and output (first `limit` bytes of stdout and stderr
    /// together). Past `timeout` the process is killed: `Ok(None)`.
    pub async fn exec_capture(
        &self,
        id: &str,
        args: &[String],
        timeout: Duration,
        limit: usize,
    ) -> Result<Option<(i32, String)>, RuntimeError> {
        let (r, w) = nix::unistd::pipe().map_err(|e| RuntimeError::Io {
            what: "pipe".into(),
            source: e.into(),
        })?;
        let devnull = std::fs::File::open("/dev/null").map_err(|e| RuntimeError::Io {
            what: "/dev/null".into(),
            source: e,
        })?;
        let w2 = w.try_clone().map_err(|e| RuntimeError::Io {
            what: "dup".into(),
            source: e,
        })?;
        let p = self.exec(
            id,
            args,
            Stdio {
                stdin: devnull.into(),
                stdout: w,
                stderr: w2,
                tty: false,
            },
        )?;
        let mut reader =
            tokio::net::unix::pipe::Receiver::from_owned_fd(r).map_err(|e| RuntimeError::Io {
                what: "pipe".into(),
                source: e,
            })?;
        let run = async {
            use tokio::io::AsyncReadExt;
            let mut out = Vec::new();
            let mut buf = [0u8; 4096];
            // Until every writer (the process and its children) is gone.
            while let Ok(n) = reader.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                if out.len() < limit {
                    out.extend_from_slice(&buf[..n.min(limit - out.len())]);
                }
            }
            let code = p.wait().await;
            (code, String::from_utf8_lossy(&out).into_owned())
        };
        match tokio::time::timeout(timeout, run).await {
            Ok(r) => Ok(Some(r)),
            Err(_) => {
                p.kill();
                let _ = tokio::time::timeout(Duration::from_secs(5), p.wait()).await;
                Ok(None)
            }
        }
    }
}
