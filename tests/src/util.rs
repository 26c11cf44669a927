//! Small helpers shared by the suites.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use edge_rt::image::ImageStore;
use edge_rt::runtime::{Runtime, RuntimeConfig};
use k8s_openapi::api::core::v1::Pod;

/// Poll `f` until it returns Some, or fail after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Tests here run real containers and need root. Outside CI a non-root run
/// skips them loudly; in CI (CI=true) not being root is a failure.
pub fn require_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("CI").is_ok() {
        panic!("these tests must run as root in CI");
    }
    eprintln!("SKIPPED: needs root");
    false
}

/// A workspace binary next to the test executable's directory.
/// A binary of the workspace, beside the running one: tests run from
/// `<profile>/deps/`, the tests crate's own binaries from `<profile>/`.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("target dir");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("target dir");
    }
    dir.join(name)
}

/// The edge-rt binary next to the test executable (or $EDGE_RT_BIN).
pub fn edge_rt_bin() -> PathBuf {
    match std::env::var("EDGE_RT_BIN") {
        Ok(p) => p.into(),
        Err(_) => workspace_bin("edge-rt"),
    }
}

/// The cloud-gw binary (built by `cargo nextest run --workspace`).
pub fn cloud_gw_bin() -> PathBuf {
    workspace_bin("cloud-gw")
}

/// An image store and runtime in a temporary directory, with a unique
/// cgroup parent so tests do not meet.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub store: Arc<ImageStore>,
    pub cfg: RuntimeConfig,
}

impl Env {
    pub fn new() -> Result<Env> {
        let dir = tempfile::Builder::new().prefix("outrigger-").tempdir()?;
        let store = Arc::new(ImageStore::open(dir.path().join("images"))?);
        let name = dir
            .path()
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let cfg = RuntimeConfig {
            state_dir: dir.path().join("run"),
            log_dir: dir.path().join("logs"),
            cgroup_parent: format!("/outrigger-test/{name}"),
            ..Default::default()
        };
        Ok(Env { dir, store, cfg })
    }

    pub fn runtime(&self) -> Result<Arc<Runtime>> {
        Ok(Runtime::open(self.cfg.clone(), self.store.clone())?)
    }
}

use edge_rt::image::ImageRecord;
use edge_rt::runtime::{ContainerRecord, ContainerRequest, ExitInfo, PodRef};
use k8s_openapi::api::core::v1::Container;

/// Import the busybox fixture image into a store; returns its record.
pub fn busybox_image(store: &ImageStore) -> Result<ImageRecord> {
    let tmp = tempfile::tempdir()?;
    crate::fixtures::add_to_layout(
        tmp.path(),
        "latest",
        &crate::fixtures::ImageSpec::busybox()?,
    )?;
    let mut v = edge_rt::image::archive::import(store, tmp.path(), Some("busybox:latest"))?;
    v.pop().ok_or_else(|| anyhow::anyhow!("nothing imported"))
}

/// A container running `sh -c SCRIPT`.
pub fn sh(name: &str, script: &str) -> Container {
    Container {
        name: name.into(),
        image: Some("busybox:latest".into()),
        command: Some(vec!["sh".into(), "-c".into(), script.into()]),
        ..Default::default()
    }
}

pub fn pod(name: &str) -> PodRef {
    PodRef {
        uid: format!("{name}-{}", std::process::id()),
        name: name.into(),
        namespace: "default".into(),
        host_network: false,
        resolv_conf: None,
    }
}

pub fn request(pod: &PodRef, image: &ImageRecord, c: Container) -> ContainerRequest {
    ContainerRequest {
        pod: pod.clone(),
        container: c,
        pod_security: None,
        image: image.clone(),
        extra_env: vec![],
        mounts: vec![],
        attempt: 0,
        edits: Default::default(),
        volume_images: vec![],
    }
}

/// The content of a CRI log file's records, one per line (checked to be
/// well-formed along the way).
pub fn log_lines(path: &Path) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path)?;
    let mut out = Vec::new();
    for line in text.lines() {
        let r = edge_rt::runtime::logs::parse_line(line)
            .ok_or_else(|| anyhow::anyhow!("not a CRI log line: {line:?}"))?;
        out.push((r.stream, r.content));
    }
    Ok(out)
}

/// Run a container to its end; returns its exit and its log.
pub async fn run_to_exit(
    rt: &Arc<Runtime>,
    req: ContainerRequest,
) -> Result<(ContainerRecord, ExitInfo, Vec<(String, String)>)> {
    let rec = rt.run(req)?;
    let exit = tokio::time::timeout(Duration::from_secs(60), rt.wait(&rec.id)).await??;
    // The log pumps finish once the FIFOs close; give them a moment.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let lines = log_lines(&rec.log_path)?;
    Ok((rec, exit, lines))
}

/// Remove every container and sandbox of a runtime (end of a test).
pub async fn teardown(rt: &Arc<Runtime>) {
    for r in rt.list() {
        if r.exit.is_none() {
            let _ = rt.stop(&r.id, Duration::from_secs(1)).await;
        }
        let _ = rt.remove(&r.id);
        let _ = rt.remove_sandbox(&r.pod.uid);
    }
}

/// A node directory for running the edge-rt binary: config, manifests,
/// preload directory (with the busybox image archive) and state, outside
/// /tmp and /run so that edge-rt as PID 1 may mount over those.
pub struct Node {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub manifests: PathBuf,
    pub state: PathBuf,
    pub logs: PathBuf,
    /// The embedded MQTT broker's port (on loopback).
    pub mqtt_port: u16,
}

impl Node {
    pub fn new() -> Result<Node> {
        std::fs::create_dir_all("/var/tmp")?;
        let dir = tempfile::Builder::new()
            .prefix("outrigger-node-")
            .tempdir_in("/var/tmp")?;
        let d = dir.path();
        let manifests = d.join("pods");
        let preload = d.join("preload");
        std::fs::create_dir_all(&manifests)?;
        std::fs::create_dir_all(&preload)?;
        let layout = tempfile::tempdir()?;
        crate::fixtures::add_to_layout(
            layout.path(),
            "latest",
            &crate::fixtures::ImageSpec::busybox()?,
        )?;
        crate::fixtures::archive(layout.path(), &preload.join("busybox.tar"))?;
        let name = d
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let state = d.join("run");
        let logs = d.join("logs");
        let config = d.join("config.toml");
        // Every node runs its embedded broker, each on a port of its own.
        let mqtt_port = crate::registry::free_port()?;
        std::fs::write(
            &config,
            format!(
                "[node]\ndata_dir = {:?}\nmanifests_dir = {:?}\npreload_dir = {:?}\n\n[runtime]\nstate_dir = {:?}\nlog_dir = {:?}\ncgroup_parent = \"/outrigger-test/{name}\"\n\n# Suites that need pod networking set up a bridge of their own.\n[network]\nenabled = false\n\n[devices]\n{}\n",
                d.join("data"),
                manifests,
                preload,
                state,
                logs,
                Self::broker_line(mqtt_port),
            ),
        )?;
        Ok(Node {
            dir,
            config,
            manifests,
            state,
            logs,
            mqtt_port,
        })
    }

    fn broker_line(port: u16) -> String {
        format!("broker_listen = [\"127.0.0.1:{port}\"]")
    }

    /// Replace the node's `[devices]` settings (it has the embedded broker
    /// on `mqtt_port` until then).
    pub fn devices_config(&self, body: &str) -> Result<()> {
        let cfg = std::fs::read_to_string(&self.config)?;
        let line = Self::broker_line(self.mqtt_port);
        anyhow::ensure!(
            cfg.contains(&line),
            "the node's [devices] section was changed already"
        );
        std::fs::write(&self.config, cfg.replace(&line, body))?;
        Ok(())
    }

    /// Trust the registry whose CA certificate is at `ca_pem` for pulls.
    pub fn trust_registry(&self, ca_pem: &Path) -> Result<()> {
        let mut cfg = std::fs::read_to_string(&self.config)?;
        cfg.push_str(&format!("\n[registry]\nca_bundle = {ca_pem:?}\n"));
        std::fs::write(&self.config, cfg)?;
        Ok(())
    }

    pub fn command(&self) -> std::process::Command {
        let mut c = std::process::Command::new(edge_rt_bin());
        c.arg("--config")
            .arg(&self.config)
            .arg("run")
            // libcontainer logs from inside the new container land in its
            // stderr: keep them to errors, as edge-rt does by default.
            .env("RUST_LOG", "info,libcgroups=error,libcontainer=error");
        c
    }

    /// Run an `edge-rt` CLI command against this node's daemon.
    pub fn cli(&self, args: &[&str]) -> Result<std::process::Output> {
        Ok(std::process::Command::new(edge_rt_bin())
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()?)
    }

    /// `edge-rt pods -o json`, parsed.
    pub fn pods(&self) -> Result<Vec<k8s_openapi::api::core::v1::Pod>> {
        let out = self.cli(&["pods", "-A", "-o", "json"])?;
        if !out.status.success() {
            bail!("edge-rt pods: {}", String::from_utf8_lossy(&out.stderr));
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        Ok(serde_json::from_value(v["items"].clone())?)
    }

    /// Start `edge-rt run` on this node, its log going to `<dir>/edge-rt.log`,
    /// and wait until its API answers.
    pub async fn start(&self) -> Result<Daemon> {
        self.start_in(None).await
    }

    /// The same inside network namespace `netns` (`ip netns` names it;
    /// only the network namespace is entered: cgroups and mounts are the
    /// host's).
    pub async fn start_in(&self, netns: Option<&str>) -> Result<Daemon> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("edge-rt.log"))?;
        let mut cmd = self.command();
        if let Some(ns) = netns {
            let inner = cmd;
            cmd = std::process::Command::new("nsenter");
            cmd.arg(format!("--net=/run/netns/{ns}"))
                .arg("--")
                .arg(inner.get_program())
                .args(inner.get_args());
            for (k, v) in inner.get_envs() {
                if let Some(v) = v {
                    cmd.env(k, v);
                }
            }
        }
        // It dies with the test: a killed test leaves no edge-rt behind.
        // SAFETY: prctl only, between fork and exec.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let d = Daemon { child };
        wait_for("the local API", Duration::from_secs(30), || async {
            self.cli(&["status"]).ok().filter(|o| o.status.success())
        })
        .await
        .with_context(|| format!("edge-rt log:\n{}", self.daemon_log()))?;
        Ok(d)
    }

    /// `edge-rt logs POD` (empty if it fails).
    pub fn pod_logs(&self, pod: &str) -> String {
        self.cli(&["logs", pod])
            .map(|o| text(&o))
            .unwrap_or_default()
    }

    /// Wait (30 s) until pod `pod` has logged `needle`; its log.
    pub async fn wait_log(&self, pod: &str, needle: &str) -> Result<String> {
        wait_for(
            &format!("{pod} logging {needle:?}"),
            Duration::from_secs(30),
            || async {
                let l = self.pod_logs(pod);
                l.contains(needle).then_some(l)
            },
        )
        .await
        .with_context(|| {
            format!(
                "{pod} logs:\n{}\nedge-rt:\n{}",
                self.pod_logs(pod),
                self.daemon_log()
            )
        })
    }

    /// What the daemon has logged so far.
    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("edge-rt.log")).unwrap_or_default()
    }

    pub fn records(&self) -> Vec<ContainerRecord> {
        edge_rt::runtime::load_records(&self.state)
    }

    pub fn record(&self, container: &str) -> Option<ContainerRecord> {
        self.records().into_iter().find(|r| r.name == container)
    }

    /// Stop whatever a test left running and remove it.
    pub async fn cleanup(&self) -> Result<()> {
        for r in self.records() {
            if r.exit.is_none() {
                if let Some(pid) = r.pid {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        let store = Arc::new(ImageStore::open(self.dir.path().join("data/images"))?);
        let cfg: edge_rt::config::Config = toml_from(&self.config)?;
        let rt = Runtime::open(cfg.runtime, store)?;
        for r in rt.list() {
            let _ = tokio::time::timeout(Duration::from_secs(5), rt.wait(&r.id)).await;
        }
        teardown(&rt).await;
        Ok(())
    }
}

fn toml_from(p: &Path) -> Result<edge_rt::config::Config> {
    Ok(edge_rt::config::Config::load(p)?)
}

/// A running `edge-rt run`; killed when dropped (its containers stay, as
/// they would: call `Node::cleanup`).
pub struct Daemon {
    pub child: std::process::Child,
}

impl Daemon {
    /// Stop it as a service manager does (SIGTERM), and wait for it to go.
    pub fn terminate(mut self) -> Result<std::process::ExitStatus> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        let t0 = std::time::Instant::now();
        loop {
            if let Some(st) = self.child.try_wait()? {
                return Ok(st);
            }
            if t0.elapsed() > Duration::from_secs(20) {
                bail!("edge-rt did not exit within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn pid_alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

pub use edge_rt::runtime::unmount_under;

impl Drop for Env {
    fn drop(&mut self) {
        unmount_under(self.dir.path());
    }
}

impl Drop for Node {
    /// Whatever a failed test left: its containers killed (drop the
    /// `Daemon` first, or it restarts them), its mounts undone.
    fn drop(&mut self) {
        for r in self.records() {
            if let (None, Some(pid)) = (&r.exit, r.pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        unmount_under(self.dir.path());
    }
}

/// A one-container busybox pod manifest.
pub fn manifest(name: &str, script: &str, extra: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n{extra}  containers:\n  - name: main\n    image: busybox:latest\n    imagePullPolicy: Never\n    command: [\"sh\", \"-c\", {script:?}]\n"
    )
}

pub fn find<'a>(pods: &'a [Pod], name: &str) -> Option<&'a Pod> {
    pods.iter()
        .find(|p| p.metadata.name.as_deref() == Some(name))
}

pub fn phase(p: &Pod) -> &str {
    p.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

/// Wait (30 s) until the node's pod `name` satisfies `pred`.
pub async fn wait_pod(
    node: &Node,
    name: &str,
    what: &str,
    pred: impl Fn(&Pod) -> bool,
) -> Result<Pod> {
    let r = wait_for(what, Duration::from_secs(30), || async {
        node.pods()
            .ok()
            .and_then(|v| find(&v, name).filter(|p| pred(p)).cloned())
    })
    .await;
    r.with_context(|| format!("{name}; edge-rt log:\n{}", node.daemon_log()))
}

/// A command's stdout as text.
/// Run `cmd` with `input` on its stdin: its stdout, or its stderr as the
/// error.
pub fn with_stdin(mut cmd: std::process::Command, input: &str) -> Result<String> {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(input.as_bytes())?;
    let o = child.wait_with_output()?;
    if !o.status.success() {
        bail!("{}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(text(&o))
}

pub fn text(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The restart count of a pod's first container on the node (-1 if the
/// pod or its status is not there).
pub fn restarts(node: &Node, pod: &str) -> Result<i32> {
    Ok(node
        .pods()?
        .iter()
        .find(|p| p.metadata.name.as_deref() == Some(pod))
        .and_then(|p| {
            p.status
                .as_ref()?
                .container_statuses
                .as_ref()?
                .first()
                .map(|c| c.restart_count)
        })
        .unwrap_or(-1))
}
