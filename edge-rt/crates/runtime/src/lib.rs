//! Containers, in-process through youki's libcontainer.
//!
//! [`Runtime::run`] turns a Kubernetes container of a pod into a running
//! process: root filesystem from the image store, OCI spec, log FIFOs, then
//! libcontainer's create and start in this very process (no runc, no shim).
//! Each container's state lives under `<state>/containers/<id>/`, and
//! [`Runtime::open`] re-adopts what a previous edge-rt left running: logs go
//! on through the FIFOs, and the exit status comes from the file our init
//! writes (see [`init`]).

pub mod cgroups;
pub mod edits;
pub mod exec;
pub mod init;
pub mod logs;
pub mod network;
pub mod sandbox;
mod seccomp;
pub mod spec;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, PodSecurityContext};
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;

use logs::{LineSplitter, LogFile, Stream};
use outrigger_image::rootfs::{self, RootfsMode};
use outrigger_image::{ImageError, ImageRecord, ImageStore, InUse};
use outrigger_sys::{fork_guard, reaper};
use sandbox::Sandbox;
use spec::{BindMount, SpecInput};

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The container's configuration cannot work (Kubernetes:
    /// CreateContainerConfigError).
    #[error("{0}")]
    Config(String),
    /// Creating or starting failed (Kubernetes: CreateContainerError).
    #[error("creating container {id}: {detail}")]
    Create { id: String, detail: String },
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("no container {0}")]
    NotFound(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> RuntimeError {
    let what = what.into();
    move |source| RuntimeError::Io { what, source }
}

/// Runtime settings (the `[runtime]` table of the node configuration).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Container and sandbox state. On tmpfs: it must not outlive a reboot.
    pub state_dir: PathBuf,
    /// Container logs, `<ns>_<pod>_<uid>/<container>/<restart>.log` as the kubelet lays them out.
    pub log_dir: PathBuf,
    /// Parent of every pod's cgroup.
    pub cgroup_parent: String,
    pub rootfs: RootfsMode,
    /// Rotate a container's log past this many bytes.
    pub log_max_bytes: u64,
    /// Rotated log files kept per container, the live one included.
    pub log_max_files: u32,
    /// Process limit per container (None: unlimited).
    pub pids_limit: Option<i64>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            state_dir: "/run/edge-rt".into(),
            log_dir: "/var/log/pods".into(),
            cgroup_parent: "/edge-rt".into(),
            rootfs: RootfsMode::Auto,
            log_max_bytes: 10 * 1024 * 1024,
            log_max_files: 3,
            pids_limit: Some(4096),
        }
    }
}

/// The pod a container belongs to.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct PodRef {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub host_network: bool,
    /// The pod's /etc/resolv.conf (by its DNS policy); None: the host's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolv_conf: Option<String>,
}

/// Everything needed to run one container.
pub struct ContainerRequest {
    pub pod: PodRef,
    pub container: Container,
    pub pod_security: Option<PodSecurityContext>,
    pub image: ImageRecord,
    /// Environment already resolved from valueFrom and envFrom.
    pub extra_env: Vec<(String, String)>,
    /// Volumes.
    pub mounts: Vec<BindMount>,
    /// Restart count: part of the id and of the log file name.
    pub attempt: u32,
    /// What the container's devices (accelerators) add to it.
    pub edits: edits::ContainerEdits,
    /// Images and artifacts its image volumes mount (kept from GC while
    /// it exists).
    pub volume_images: Vec<ImageRecord>,
}

/// How a container ended.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExitInfo {
    pub exit_code: i32,
    pub signal: Option<i32>,
    /// Kubernetes' reason: Completed, Error or OOMKilled.
    pub reason: String,
    /// RFC 3339.
    pub finished_at: String,
}

/// What edge-rt keeps about a container, on disk and in memory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerRecord {
    pub id: String,
    pub name: String,
    pub pod: PodRef,
    pub attempt: u32,
    pub image: String,
    pub image_digest: String,
    pub layers: Vec<String>,
    /// Images and artifacts mounted as its volumes, and their layers.
    #[serde(default)]
    pub volume_images: Vec<String>,
    #[serde(default)]
    pub volume_layers: Vec<String>,
    pub pid: Option<i32>,
    /// Start time of `pid` in clock ticks since boot: tells a reused pid apart.
    pub pid_start: Option<u64>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub log_path: PathBuf,
    pub cgroup: String,
    pub exit: Option<ExitInfo>,
    /// The capabilities the seccomp profile was made for (None: unconfined),
    /// so processes exec'd into the container get the same profile.
    #[serde(default)]
    pub seccomp_caps: Option<Vec<String>>,
    /// CAP_SYS_ADMIN is held only by edge-rt's init (see `init`), and
    /// dropped before any process of the workload runs.
    #[serde(default)]
    pub drop_sys_admin: bool,
}

struct Live {
    record: ContainerRecord,
    exited: watch::Sender<Option<ExitInfo>>,
    pidfd: Option<Arc<AsyncFd<OwnedFd>>>,
}

pub struct Runtime {
    cfg: RuntimeConfig,
    images: Arc<ImageStore>,
    live: Mutex<HashMap<String, Live>>,
}

fn now_rfc3339() -> String {
    format!("{:.9}", jiff::Timestamp::now())
}

/// A name safe for ids and paths.
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

pub fn pid_start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: count from the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; a non-negative result is a new descriptor we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by the kernel and is ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn pidfd_signal(fd: &OwnedFd, sig: i32) -> io::Result<()> {
    // SAFETY: plain syscall on a descriptor we hold.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            sig,
            std::ptr::null::<u8>(),
            0,
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ESRCH) {
            return Ok(());
        }
        return Err(e);
    }
    Ok(())
}

impl Runtime {
    /// Open the runtime and re-adopt every container a previous edge-rt left.
    pub fn open(cfg: RuntimeConfig, images: Arc<ImageStore>) -> Result<Arc<Runtime>, RuntimeError> {
        for d in [
            cfg.state_dir.join("containers"),
            cfg.state_dir.join("youki"),
            cfg.state_dir.join("pods"),
            cfg.log_dir.clone(),
        ] {
            fs::create_dir_all(&d).map_err(io_err(format!("creating {}", d.display())))?;
        }
        cgroups::prepare_parent(&cfg.cgroup_parent);
        let rt = Arc::new(Runtime {
            cfg,
            images,
            live: Mutex::new(HashMap::new()),
        });
        for record in load_records(&rt.cfg.state_dir) {
            rt.adopt(record);
        }
        Ok(rt)
    }

    pub fn config(&self) -> &RuntimeConfig {
        &self.cfg
    }

    fn dir(&self, id: &str) -> PathBuf {
        self.cfg.state_dir.join("containers").join(id)
    }

    /// A container's writable layer: the overlay's upper directory, or the
    /// copied root filesystem.
    pub fn writable_layer(&self, id: &str) -> PathBuf {
        let dir = self.dir(id);
        let upper = dir.join("scratch").join("upper");
        if upper.is_dir() {
            upper
        } else {
            dir.join("bundle").join("rootfs")
        }
    }

    /// The FIFO that is the stdin of a container that keeps one open
    /// (`stdin: true`), for attaching to it; None for the others.
    pub fn stdin_of(&self, id: &str) -> Option<PathBuf> {
        let p = self.dir(id).join("stdin");
        p.exists().then_some(p)
    }

    /// `<log_dir>/<namespace>_<name>_<uid>`, the kubelet's layout.
    pub fn pod_log_dir(&self, pod: &PodRef) -> PathBuf {
        self.cfg
            .log_dir
            .join(format!("{}_{}_{}", pod.namespace, pod.name, pod.uid))
    }

    pub fn sandbox_dir(&self, pod_uid: &str) -> PathBuf {
        self.cfg.state_dir.join("pods").join(sanitize(pod_uid))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Live>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Create and start a container. Blocks for the creation (tens of ms).
    pub fn run(self: &Arc<Self>, req: ContainerRequest) -> Result<ContainerRecord, RuntimeError> {
        // A hash of the pod uid keeps ids short (they end up in socket
        // paths) and distinct whatever the uids look like.
        let id = format!(
            "{}-{}-{}",
            &outrigger_image::sha256_hex(req.pod.uid.as_bytes())[..12],
            sanitize(&req.container.name),
            req.attempt
        );
        if self
            .lock()
            .get(&id)
            .is_some_and(|l| l.record.exit.is_none())
        {
            return Err(RuntimeError::Create {
                id,
                detail: "a container with this id is running".into(),
            });
        }
        let _ = self.remove(&id);
        let dir = self.dir(&id);
        fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
        let result = self.create_in(&id, &dir, req);
        if result.is_err() {
            let _ = self.cleanup_after_failure(&id, &dir);
        }
        result
    }

    fn create_in(
        self: &Arc<Self>,
        id: &str,
        dir: &Path,
        req: ContainerRequest,
    ) -> Result<ContainerRecord, RuntimeError> {
        let pod = &req.pod;
        let sandbox = Sandbox::ensure(
            &self.sandbox_dir(&pod.uid),
            &pod.name,
            pod.host_network,
            pod.resolv_conf.as_deref(),
        )
        .map_err(io_err(format!("pod sandbox of {}", pod.name)))?;

        if let Some(a) = &req.image.artifact {
            return Err(RuntimeError::Config(format!(
                "{} is an OCI artifact ({}), not a container image: mount it as an image volume",
                req.container.image.as_deref().unwrap_or(&req.image.digest),
                a.artifact_type
            )));
        }
        // Root filesystem.
        let bundle = dir.join("bundle");
        let rootfs = bundle.join("rootfs");
        let lowers = self.images.layer_dirs(&req.image)?;
        rootfs::prepare(self.cfg.rootfs, &lowers, &dir.join("scratch"), &rootfs)
            .map_err(io_err("preparing the root filesystem"))?;
        let _ = self.images.touch(&req.image.digest);

        let image_cfg = self.images.config(&req.image)?;
        let cgroup = format!(
            "{}/pod{}/{}",
            self.cfg.cgroup_parent.trim_end_matches('/'),
            sanitize(&pod.uid),
            id
        );
        let mut mounts = sandbox.mounts();
        mounts.extend(req.mounts.iter().cloned());
        let annotations = BTreeMap::from([
            ("io.kubernetes.pod.name".to_string(), pod.name.clone()),
            (
                "io.kubernetes.pod.namespace".to_string(),
                pod.namespace.clone(),
            ),
            ("io.kubernetes.pod.uid".to_string(), pod.uid.clone()),
            (
                "io.kubernetes.container.name".to_string(),
                req.container.name.clone(),
            ),
        ]);
        let generated = spec::generate(&SpecInput {
            container: &req.container,
            pod_security: req.pod_security.as_ref(),
            image: &image_cfg,
            rootfs: &rootfs,
            extra_env: &req.extra_env,
            mounts: &mounts,
            namespaces: &sandbox.namespaces(),
            host_network: pod.host_network,
            hostname: &pod.name,
            cgroups_path: &cgroup,
            cgroup_v2: cgroups::is_unified(),
            mounts_by_init: true,
            pids_limit: self.cfg.pids_limit,
            annotations,
        })?;
        let mut generated = generated;
        req.edits.apply(&mut generated.spec)?;
        let spec_bytes = serde_json::to_vec_pretty(&generated.spec)
            .map_err(|e| RuntimeError::Config(format!("spec: {e}")))?;
        fs::write(bundle.join("config.json"), spec_bytes).map_err(io_err("writing config.json"))?;
        let profile = if generated.seccomp {
            Some(Arc::new(
                seccomp::default_profile(&generated.caps).map_err(RuntimeError::Config)?,
            ))
        } else {
            None
        };

        // Log FIFOs: the container holds them read-write, so a write never
        // fails for want of a reader while edge-rt restarts.
        let log_path = self
            .pod_log_dir(pod)
            .join(&req.container.name)
            .join(format!("{}.log", req.attempt));
        let mut fifo_fds = Vec::new();
        for s in ["stdout", "stderr"] {
            fifo_fds.push(held_fifo(&dir.join(s))?);
        }
        let exit_path = dir.join("exit");
        let exit_file = fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&exit_path)
            .map_err(io_err("creating the exit status file"))?;
        // Stdin: nothing, or for a container that keeps it open a FIFO it
        // holds read-write as it holds its output (so an edge-rt restart
        // never ends its input), which `kubectl attach` writes to.
        let stdin = if req.container.stdin == Some(true) {
            held_fifo(&dir.join("stdin"))?
        } else {
            fs::File::open("/dev/null").map_err(io_err("/dev/null"))?
        };

        let mut record = ContainerRecord {
            id: id.to_string(),
            name: req.container.name.clone(),
            pod: pod.clone(),
            attempt: req.attempt,
            image: req.container.image.clone().unwrap_or_default(),
            image_digest: req.image.digest.clone(),
            layers: req.image.layers.iter().map(|l| l.diff_id.clone()).collect(),
            volume_images: req.volume_images.iter().map(|i| i.digest.clone()).collect(),
            volume_layers: req
                .volume_images
                .iter()
                .flat_map(|i| i.layers.iter().map(|l| l.diff_id.clone()))
                .collect(),
            pid: None,
            pid_start: None,
            created_at: now_rfc3339(),
            started_at: None,
            log_path: log_path.clone(),
            cgroup: cgroup.clone(),
            exit: None,
            seccomp_caps: generated.seccomp.then(|| generated.caps.clone()),
            drop_sys_admin: generated.init_sys_admin,
        };
        save_record(dir, &record)?;
        // Readers first, so nothing the container writes early is lost.
        let logfile = Arc::new(Mutex::new(
            LogFile::open(&log_path, self.cfg.log_max_bytes, self.cfg.log_max_files)
                .map_err(io_err(format!("log file {}", log_path.display())))?,
        ));
        self.pump_logs(dir, &logfile);

        let executor = init::PodInit {
            exit_fd: exit_file.as_raw_fd(),
            seccomp: profile,
            drop_sys_admin: generated.init_sys_admin,
            cgroup_view: generated.cgroup_view,
            mounts: generated.init_mounts,
        };
        let stderr_fd = fifo_fds.pop().map(OwnedFd::from);
        let stdout_fd = fifo_fds.pop().map(OwnedFd::from);
        let (Some(stdout_fd), Some(stderr_fd)) = (stdout_fd, stderr_fd) else {
            return Err(RuntimeError::Config("log fifos missing".into()));
        };
        let create_err = |e: &dyn std::fmt::Display| RuntimeError::Create {
            id: id.to_string(),
            detail: e.to_string(),
        };
        let mut container = spawn(
            id,
            &self.cfg.state_dir.join("youki"),
            &bundle,
            executor,
            OwnedFd::from(stdin),
            stdout_fd,
            stderr_fd,
        )?;
        drop(exit_file);
        let pid = container
            .pid()
            .ok_or_else(|| create_err(&"libcontainer returned no pid"))?
            .as_raw();
        reaper::register(pid);
        record.pid = Some(pid);
        record.pid_start = pid_start_time(pid);
        let pidfd = pidfd_open(pid).map_err(io_err("pidfd_open"))?;
        container.start().map_err(|e| create_err(&e))?;
        record.started_at = Some(now_rfc3339());
        save_record(dir, &record)?;
        self.watch(record.clone(), Some(pidfd));
        Ok(record)
    }

    fn cleanup_after_failure(&self, id: &str, dir: &Path) -> Result<(), RuntimeError> {
        self.delete_libcontainer_state(id);
        let _ = rootfs::release(&dir.join("scratch"), &dir.join("bundle/rootfs"));
        let _ = fs::remove_dir_all(dir);
        self.lock().remove(id);
        Ok(())
    }

    /// Let libcontainer remove its state and the container's cgroup.
    fn delete_libcontainer_state(&self, id: &str) {
        let dir = self.cfg.state_dir.join("youki").join(id);
        if !dir.exists() {
            return;
        }
        match libcontainer::container::Container::load(dir.clone()) {
            Ok(mut c) => {
                if let Err(e) = c.delete(true) {
                    tracing::warn!(id, error = %e, "libcontainer delete");
                }
            }
            Err(_) => {
                let _ = fs::remove_dir_all(&dir);
            }
        }
    }

    /// Start copying the container's FIFOs into its log file.
    fn pump_logs(&self, dir: &Path, logfile: &Arc<Mutex<LogFile>>) {
        for (name, stream) in [("stdout", Stream::Stdout), ("stderr", Stream::Stderr)] {
            let path = dir.join(name);
            let logfile = logfile.clone();
            let rx = tokio::net::unix::pipe::OpenOptions::new().open_receiver(&path);
            let mut rx = match rx {
                Ok(rx) => rx,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot read container output");
                    continue;
                }
            };
            tokio::spawn(async move {
                let mut split = LineSplitter::default();
                let mut buf = [0u8; 8192];
                loop {
                    let n = match rx.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let mut lf = logfile.lock().unwrap_or_else(|p| p.into_inner());
                    if let Err(e) = split.feed(&buf[..n], |full, c| lf.record(stream, full, c)) {
                        tracing::warn!(error = %e, "writing container log");
                    }
                }
                let mut lf = logfile.lock().unwrap_or_else(|p| p.into_inner());
                let _ = split.finish(|full, c| lf.record(stream, full, c));
            });
        }
    }

    /// Track a container until it exits.
    fn watch(self: &Arc<Self>, record: ContainerRecord, pidfd: Option<OwnedFd>) {
        let (tx, _) = watch::channel(record.exit.clone());
        // SAFETY: the AsyncFd owns the pidfd; nothing else closes it while registered.
        let pidfd = pidfd
            .and_then(|fd| unsafe { AsyncFd::register(fd) }.ok())
            .map(Arc::new);
        let id = record.id.clone();
        let exited = record.exit.is_some();
        self.lock().insert(
            id.clone(),
            Live {
                record,
                exited: tx,
                pidfd: pidfd.clone(),
            },
        );
        if exited {
            return;
        }
        let rt = self.clone();
        tokio::spawn(async move {
            if let Some(fd) = &pidfd {
                // Readable once the process has exited.
                let _ = fd.readable().await;
            }
            rt.on_exit(&id);
        });
    }

    /// Work out how a container ended, record it, release its cgroup.
    fn on_exit(&self, id: &str) {
        let Some(mut record) = self.lock().get(id).map(|l| l.record.clone()) else {
            return;
        };
        let dir = self.dir(id);
        let pid = record.pid.unwrap_or(0);
        let from_wait = if reaper::is_registered(pid) {
            reaper::take(pid)
        } else {
            None
        };
        reaper::forget(pid);
        let from_file = fs::read_to_string(dir.join("exit"))
            .ok()
            .and_then(|s| parse_exit(&s));
        let (code, signal, finished) = match (from_file, from_wait) {
            (Some(f), _) => f,
            (None, Some(nix::sys::wait::WaitStatus::Exited(_, c))) => (c, None, None),
            (None, Some(nix::sys::wait::WaitStatus::Signaled(_, s, _))) => {
                (128 + s as i32, Some(s as i32), None)
            }
            // Killed with its init before it could report, and not our child.
            (None, _) => (137, Some(9), None),
        };
        let oom = cgroups::oom_kills(&record.cgroup) > 0;
        let reason = if oom {
            "OOMKilled"
        } else if code == 0 {
            "Completed"
        } else {
            "Error"
        };
        let info = ExitInfo {
            exit_code: code,
            signal,
            reason: reason.into(),
            finished_at: finished.unwrap_or_else(now_rfc3339),
        };
        record.exit = Some(info.clone());
        if let Err(e) = save_record(&dir, &record) {
            tracing::error!(id, error = %e, "saving exit status");
        }
        self.delete_libcontainer_state(id);
        tracing::info!(id, code, reason, "container exited");
        let mut live = self.lock();
        if let Some(l) = live.get_mut(id) {
            l.record = record;
            l.pidfd = None;
            // send_replace stores the value even when nobody waits yet.
            l.exited.send_replace(Some(info));
        }
    }

    /// Re-adopt a container from its record after an edge-rt restart.
    fn adopt(self: &Arc<Self>, record: ContainerRecord) {
        if record.exit.is_some() {
            self.watch(record, None);
            return;
        }
        let alive = record
            .pid
            .is_some_and(|p| record.pid_start.is_some() && pid_start_time(p) == record.pid_start);
        let pidfd = if alive {
            record.pid.and_then(|p| pidfd_open(p).ok())
        } else {
            None
        };
        if pidfd.is_some() {
            tracing::info!(id = %record.id, pid = record.pid, "re-adopted running container");
            let dir = self.dir(&record.id);
            match LogFile::open(
                &record.log_path,
                self.cfg.log_max_bytes,
                self.cfg.log_max_files,
            ) {
                Ok(lf) => self.pump_logs(&dir, &Arc::new(Mutex::new(lf))),
                Err(e) => tracing::warn!(id = %record.id, error = %e, "reopening log"),
            }
        } else {
            tracing::info!(id = %record.id, "container ended while edge-rt was away");
        }
        let exited_already = pidfd.is_none();
        self.watch(record.clone(), pidfd);
        if exited_already {
            self.on_exit(&record.id);
        }
    }

    pub fn get(&self, id: &str) -> Option<ContainerRecord> {
        self.lock().get(id).map(|l| l.record.clone())
    }

    pub fn list(&self) -> Vec<ContainerRecord> {
        let mut v: Vec<_> = self.lock().values().map(|l| l.record.clone()).collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Wait for a container to exit.
    pub async fn wait(&self, id: &str) -> Result<ExitInfo, RuntimeError> {
        let mut rx = self
            .lock()
            .get(id)
            .map(|l| l.exited.subscribe())
            .ok_or_else(|| RuntimeError::NotFound(id.into()))?;
        loop {
            if let Some(info) = rx.borrow_and_update().clone() {
                return Ok(info);
            }
            if rx.changed().await.is_err() {
                return Err(RuntimeError::NotFound(id.into()));
            }
        }
    }

    /// Send a signal to the container's init (which passes it on).
    pub fn signal(&self, id: &str, sig: i32) -> Result<(), RuntimeError> {
        let fd = self
            .lock()
            .get(id)
            .ok_or_else(|| RuntimeError::NotFound(id.into()))?
            .pidfd
            .clone();
        match fd {
            Some(fd) => {
                pidfd_signal(fd.get_ref(), sig).map_err(io_err(format!("signal {sig} to {id}")))
            }
            None => Ok(()),
        }
    }

    /// SIGTERM, then SIGKILL once `grace` has passed.
    pub async fn stop(&self, id: &str, grace: Duration) -> Result<ExitInfo, RuntimeError> {
        if let Some(info) = self.get(id).and_then(|r| r.exit) {
            return Ok(info);
        }
        let started = Instant::now();
        self.signal(id, libc::SIGTERM)?;
        match tokio::time::timeout(grace, self.wait(id)).await {
            Ok(r) => r,
            Err(_) => {
                tracing::info!(id, grace = ?grace, "grace period over; killing");
                self.signal(id, libc::SIGKILL)?;
                let r = self.wait(id).await;
                tracing::debug!(id, took = ?started.elapsed(), "stopped");
                r
            }
        }
    }

    /// Forget an exited container: root filesystem and state go, logs stay.
    pub fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        if self.lock().get(id).is_some_and(|l| l.record.exit.is_none()) {
            return Err(RuntimeError::Create {
                id: id.into(),
                detail: "cannot remove a running container".into(),
            });
        }
        let dir = self.dir(id);
        self.delete_libcontainer_state(id);
        rootfs::release(&dir.join("scratch"), &dir.join("bundle/rootfs"))
            .map_err(io_err(format!("releasing rootfs of {id}")))?;
        match fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(io_err(format!("removing {}", dir.display()))(e))
            }
            _ => {}
        }
        self.lock().remove(id);
        Ok(())
    }

    /// Create the pod's sandbox now (containers would on their first start)
    /// and return its network namespace, so the network can be set up
    /// before any container runs.
    pub fn ensure_sandbox(&self, pod: &PodRef) -> Result<Option<PathBuf>, RuntimeError> {
        let sb = Sandbox::ensure(
            &self.sandbox_dir(&pod.uid),
            &pod.name,
            pod.host_network,
            pod.resolv_conf.as_deref(),
        )
        .map_err(io_err(format!("pod sandbox of {}", pod.name)))?;
        Ok(sb.namespaces().network)
    }

    /// Tear down a pod's sandbox once none of its containers runs.
    pub fn remove_sandbox(&self, pod_uid: &str) -> Result<(), RuntimeError> {
        if self
            .lock()
            .values()
            .any(|l| l.record.pod.uid == pod_uid && l.record.exit.is_none())
        {
            return Err(RuntimeError::Config(format!(
                "pod {pod_uid} still has running containers"
            )));
        }
        let sb = Sandbox {
            dir: self.sandbox_dir(pod_uid),
            host_network: false,
        };
        sb.remove().map_err(io_err("removing sandbox"))?;
        cgroups::remove_pod(
            &self.cfg.cgroup_parent,
            &format!("pod{}", sanitize(pod_uid)),
        );
        Ok(())
    }

    /// Images and layers that containers (running or not yet removed) use.
    pub fn in_use(&self) -> InUse {
        in_use_by(self.lock().values().map(|l| &l.record))
    }
}

/// Create (not start) a container from a bundle through libcontainer, in
/// this process. The container's init is our child.
pub fn spawn(
    id: &str,
    youki_root: &Path,
    bundle: &Path,
    executor: init::PodInit,
    stdin: OwnedFd,
    stdout: OwnedFd,
    stderr: OwnedFd,
) -> Result<libcontainer::container::Container, RuntimeError> {
    let create_err = |e: &dyn std::fmt::Display| RuntimeError::Create {
        id: id.to_string(),
        detail: e.to_string(),
    };
    let _barrier = fork_guard::write();
    ContainerBuilder::new(id.to_string(), SyscallType::default())
        .with_root_path(youki_root)
        .map_err(|e| create_err(&e))?
        .with_executor(executor)
        .with_stdin(stdin)
        .with_stdout(stdout)
        .with_stderr(stderr)
        .as_init(bundle)
        .with_systemd(false)
        .with_detach(true)
        .build()
        .map_err(|e| create_err(&e))
}

/// A FIFO made anew at `p`, opened read-write: the container holds both
/// ends, so neither side's open ever blocks and its writes never fail for
/// want of a reader while edge-rt restarts.
fn held_fifo(p: &Path) -> Result<fs::File, RuntimeError> {
    let _ = fs::remove_file(p);
    nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o600)).map_err(|e| {
        RuntimeError::Io {
            what: format!("mkfifo {}", p.display()),
            source: e.into(),
        }
    })?;
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .map_err(io_err(format!("open {}", p.display())))
}

/// What the given container records hold: never garbage-collected.
pub fn in_use_by<'a>(records: impl IntoIterator<Item = &'a ContainerRecord>) -> InUse {
    let mut u = InUse::default();
    for r in records {
        u.images.insert(r.image_digest.clone());
        u.layers.extend(r.layers.iter().cloned());
        u.images.extend(r.volume_images.iter().cloned());
        u.layers.extend(r.volume_layers.iter().cloned());
    }
    u
}

fn save_record(dir: &Path, r: &ContainerRecord) -> Result<(), RuntimeError> {
    let bytes = serde_json::to_vec_pretty(r).map_err(|e| RuntimeError::Config(e.to_string()))?;
    let tmp = dir.join("record.json.tmp");
    fs::write(&tmp, bytes).map_err(io_err("writing container record"))?;
    fs::rename(&tmp, dir.join("record.json")).map_err(io_err("writing container record"))
}

/// Every container record in a state directory (readable without the daemon).
pub fn load_records(state_dir: &Path) -> Vec<ContainerRecord> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir(state_dir.join("containers")) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path().join("record.json");
        match fs::read(&p).map(|b| serde_json::from_slice::<ContainerRecord>(&b)) {
            Ok(Ok(r)) => out.push(r),
            Ok(Err(err)) => {
                tracing::warn!(path = %p.display(), error = %err, "unreadable container record")
            }
            Err(_) => {}
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

/// Parse what [`init`] wrote: (exit code, signal, finished at).
fn parse_exit(s: &str) -> Option<(i32, Option<i32>, Option<String>)> {
    let mut it = s.split_whitespace();
    let kind = it.next()?;
    let n: i32 = it.next()?.parse().ok()?;
    let at = it.next().and_then(|t| t.parse::<i64>().ok()).map(|ns| {
        let t = jiff::Timestamp::from_nanosecond(i128::from(ns)).unwrap_or_default();
        format!("{t:.9}")
    });
    match kind {
        "exited" => Some((n, None, at)),
        "signaled" => Some((128 + n, Some(n), at)),
        _ => None,
    }
}

/// Lazily unmount everything mounted under `dir`, deepest first (overlays,
/// namespace files): for tearing down a whole state directory.
pub fn unmount_under(dir: &Path) {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir) && p != dir)
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
    }
}
