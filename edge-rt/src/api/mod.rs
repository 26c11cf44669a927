//! The local API: a Unix socket the CLI (`edge-rt pods`, `describe`, `logs`,
//! `status`) talks to. Only root, or the configured group, can open it: the
//! socket file's owner and mode are the gate (0600, or 0660 with the group).
//!
//! Protocol: the client sends one JSON request line; the server answers
//! with one JSON line (`{"ok": ...}` or `{"error": "..."}`), and for `logs`
//! then streams the log's content until it ends (or, following, until the
//! container exits or the client goes).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

pub mod exec;
pub mod metrics;

use crate::pods::events::PodEvent;
use crate::pods::{self, PodManager};
use crate::runtime::ContainerRecord;

/// Longest request line accepted (an apply of a few large objects).
const MAX_REQUEST: u64 = 4 << 20;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Pods,
    Pod {
        namespace: String,
        name: String,
    },
    Status,
    Logs {
        namespace: String,
        name: String,
        container: Option<String>,
        #[serde(default)]
        previous: bool,
        #[serde(default)]
        follow: bool,
        tail: Option<usize>,
    },
    Exec {
        namespace: String,
        name: String,
        container: Option<String>,
        command: Vec<String>,
        /// Relay the client's stdin.
        #[serde(default)]
        stdin: bool,
        /// Run the command on a terminal.
        #[serde(default)]
        tty: bool,
    },
    /// Commit objects (Pod, ConfigMap, Secret) to the node store as this
    /// node's own: `edge-rt apply -f`.
    Apply {
        objects: Vec<serde_json::Value>,
    },
    /// The node's devices and their twins.
    Devices,
    /// The node's and its pods' resource use (`edge-rt top`).
    Stats,
    /// Set desired values of a device at the node (`Some`), or drop them
    /// (`None`) so the spec's hold again: `edge-rt device set|reset`.
    SetDesired {
        namespace: String,
        name: String,
        values: Vec<(String, Option<String>)>,
    },
    /// Remove an object `edge-rt apply` put in the store.
    Delete {
        kind: String,
        namespace: String,
        name: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PodDetail {
    pub pod: k8s_openapi::api::core::v1::Pod,
    pub events: Vec<PodEvent>,
}

/// The node summary of `edge-rt status`.
#[derive(Debug, Serialize, Deserialize)]
pub struct NodeStatus {
    pub version: String,
    pub hostname: String,
    pub arch: String,
    pub kernel: String,
    pub cgroup: String,
    pub pid1: bool,
    pub uptime_secs: u64,
    pub pods: usize,
    pub pods_by_phase: std::collections::BTreeMap<String, usize>,
    pub containers_running: usize,
    pub restarts: u64,
    pub images: usize,
    pub image_bytes: u64,
    pub image_budget_bytes: u64,
    pub rss_bytes: u64,
    #[serde(default)]
    pub conditions: Vec<k8s_openapi::api::core::v1::NodeCondition>,
    /// The store's counts, or why there is no store.
    #[serde(default)]
    pub store: Option<Result<crate::store::Stats, String>>,
    /// Accelerators by resource: (slots in all, slots held).
    #[serde(default)]
    pub accelerators: std::collections::BTreeMap<String, (u32, u32)>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl From<pods::logs::LookupError> for ApiError {
    fn from(e: pods::logs::LookupError) -> ApiError {
        match e {
            pods::logs::LookupError::NotFound(m) => ApiError::NotFound(m),
            pods::logs::LookupError::BadRequest(m) => ApiError::BadRequest(m),
        }
    }
}

/// What the server needs from the daemon.
pub struct Server {
    pub pods: Arc<PodManager>,
    pub started: Instant,
    pub pid1: bool,
    pub image_budget: u64,
    pub store: Option<Arc<crate::store::Store>>,
    pub devices: Arc<crate::devices::DeviceManager>,
}

/// Bind the socket with the permissions that make it root's (and the
/// group's, if one is configured).
pub fn bind(path: &Path, group: Option<&str>) -> anyhow::Result<UnixListener> {
    use anyhow::Context as _;
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // A socket left by an edge-rt that was killed: nobody listens on it.
    if path.exists() && std::os::unix::net::UnixStream::connect(path).is_err() {
        let _ = std::fs::remove_file(path);
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    let mode = match group {
        Some(g) => {
            let grp = nix::unistd::Group::from_name(g)
                .ok()
                .flatten()
                .with_context(|| format!("api group {g:?} does not exist"))?;
            nix::unistd::chown(path, None, Some(grp.gid))
                .with_context(|| format!("chown {}", path.display()))?;
            0o660
        }
        None => 0o600,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))?;
    Ok(listener)
}

impl Server {
    pub async fn serve(self: Arc<Self>, listener: UnixListener) {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let me = self.clone();
                    tokio::spawn(async move {
                        if let Err(e) = me.connection(stream).await {
                            tracing::debug!(error = %e, "api connection");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "api accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    async fn connection(&self, stream: UnixStream) -> std::io::Result<()> {
        let (r, mut w) = stream.into_split();
        // One byte at a time up to the newline: whatever follows the request
        // (exec's stdin frames) must stay in the socket for the relay.
        let mut line = Vec::new();
        let mut r = r;
        let mut byte = [0u8; 1];
        while line.len() < MAX_REQUEST as usize && r.read(&mut byte).await? == 1 && byte[0] != b'\n'
        {
            line.push(byte[0]);
        }
        let line = String::from_utf8_lossy(&line).into_owned();
        let req = match serde_json::from_str::<Request>(&line) {
            Ok(r) => r,
            Err(e) => {
                return reply::<()>(
                    &mut w,
                    Err(ApiError::BadRequest(format!("bad request: {e}"))),
                )
                .await
            }
        };
        match req {
            Request::Pods => reply(&mut w, Ok(self.pods.list())).await,
            Request::Pod { namespace, name } => {
                let r = self
                    .detail(&namespace, &name)
                    .and_then(|d| Ok(serde_json::to_value(d).map_err(std::io::Error::from)?));
                reply(&mut w, r).await
            }
            Request::Status => reply(&mut w, Ok(self.status())).await,
            Request::Devices => reply(&mut w, Ok(self.devices.list())).await,
            Request::Stats => reply(&mut w, Ok(crate::stats::summary(&self.pods).await)).await,
            Request::Logs {
                namespace,
                name,
                container,
                previous,
                follow,
                tail,
            } => {
                let rec = match self.pods.log_record(
                    &namespace,
                    &name,
                    None,
                    container.as_deref(),
                    previous,
                ) {
                    Ok(r) => r,
                    Err(e) => return reply::<()>(&mut w, Err(e.into())).await,
                };
                reply(&mut w, Ok(serde_json::Value::Null)).await?;
                let opts = pods::logs::LogOptions {
                    follow,
                    tail_lines: tail.map(|n| n as u64),
                    ..Default::default()
                };
                pods::logs::stream(&self.pods.context().rt, &rec, &opts, &mut w).await?;
                w.shutdown().await
            }
            Request::Exec {
                namespace,
                name,
                container,
                command,
                stdin,
                tty,
            } => {
                let rec = match self
                    .pods
                    .exec_record(&namespace, &name, None, container.as_deref())
                {
                    Ok(r) => r,
                    Err(e) => return reply::<()>(&mut w, Err(e.into())).await,
                };
                self.exec(&rec, &command, stdin, tty, r, w).await
            }
            Request::Apply { objects } => {
                let r = self.apply(objects);
                reply(&mut w, r).await
            }
            Request::SetDesired {
                namespace,
                name,
                values,
            } => {
                let r = self.set_desired(&namespace, &name, &values);
                reply(&mut w, r).await
            }
            Request::Delete {
                kind,
                namespace,
                name,
            } => {
                let r = self.delete(&kind, &namespace, &name);
                reply(&mut w, r).await
            }
        }
    }

    /// Checked by the device manager, kept in the store (so it holds
    /// across restarts and goes up with the device's status), applied by
    /// the daemon's next reconcile.
    fn set_desired(
        &self,
        namespace: &str,
        name: &str,
        values: &[(String, Option<String>)],
    ) -> Result<serde_json::Value, ApiError> {
        let store = self.node_store()?;
        let plan = self
            .devices
            .plan_set(namespace, name, values, crate::store::now_ms())
            .map_err(ApiError::BadRequest)?;
        store.set_local_desired(&plan.put, &plan.drop)?;
        for p in &plan.put {
            tracing::info!(device = name, namespace, property = %p.property, value = %p.value, base = ?p.base, "desired value set at the node");
        }
        Ok(serde_json::to_value(plan.said).map_err(std::io::Error::from)?)
    }

    fn node_store(&self) -> Result<&crate::store::Store, ApiError> {
        self.store.as_deref().ok_or_else(|| {
            ApiError::BadRequest("this node has no store (see the daemon's log)".into())
        })
    }

    /// Validate every object first (all or nothing), then commit them in
    /// one transaction. An object keeps its uid across applies, as in
    /// Kubernetes; objects the cloud sent are the cloud's to change.
    fn apply(&self, docs: Vec<serde_json::Value>) -> Result<serde_json::Value, ApiError> {
        use crate::store::{Change, Kind, Object, Source};
        let store = self.node_store()?;
        let mut changes = Vec::new();
        let mut done = Vec::new();
        for (i, doc) in docs.into_iter().enumerate() {
            let bad = |m: String| ApiError::BadRequest(format!("object {}: {m}", i + 1));
            let yaml = serde_yaml_ng::to_value(&doc).map_err(|e| bad(e.to_string()))?;
            let typed = crate::static_pods::parse(yaml).map_err(bad)?;
            let (kind, mut body) = (typed.kind(), typed.to_json());
            // A device's uid is the store's to give, as a pod's is.
            if kind == Kind::Device || kind == Kind::DeviceModel {
                if let Ok(b) = body.as_mut() {
                    if let Some(m) = b["metadata"].as_object_mut() {
                        m.remove("uid");
                    }
                }
            }
            let body_ref = body.as_mut().map_err(|e| bad(e.to_string()))?;
            let meta = &mut body_ref["metadata"];
            if let Some(a) = meta["annotations"].as_object_mut() {
                a.remove("kubernetes.io/config.source");
            }
            let ns = meta["namespace"].as_str().unwrap_or("default").to_string();
            let name = meta["name"].as_str().unwrap_or("").to_string();
            let existing = store.find(kind, &ns, &name)?;
            let (uid, rv, verb) = match &existing {
                Some(o) if o.source == Source::Cloud => {
                    return Err(bad(format!(
                        "{} {ns}/{name} came from the cloud: change it there",
                        kind.as_str()
                    )))
                }
                Some(o) => (
                    o.uid.clone(),
                    o.resource_version.parse::<u64>().unwrap_or(0) + 1,
                    "configured",
                ),
                None => (crate::store::new_uid(), 1, "created"),
            };
            meta["uid"] = uid.into();
            meta["resourceVersion"] = rv.to_string().into();
            let body = body.map_err(|e| bad(e.to_string()))?;
            let unchanged = existing.as_ref().is_some_and(|o| {
                let mut old = o.body.clone();
                old["metadata"]["resourceVersion"] = body["metadata"]["resourceVersion"].clone();
                old == body
            });
            if unchanged {
                done.push(format!("{}/{name} unchanged", kind.as_str().to_lowercase()));
                continue;
            }
            changes.push(Change::Put(Object::from_body(kind, Source::Local, body)?));
            done.push(format!("{}/{name} {verb}", kind.as_str().to_lowercase()));
        }
        store.apply(&changes, &[])?;
        Ok(serde_json::to_value(done).unwrap_or_default())
    }

    fn delete(&self, kind: &str, ns: &str, name: &str) -> Result<serde_json::Value, ApiError> {
        use crate::store::{Change, Source};
        let store = self.node_store()?;
        let kind = crate::store::parse_kind(kind)?;
        let Some(o) = store.find(kind, ns, name)? else {
            return Err(ApiError::NotFound(format!(
                "{} {ns}/{name} is not in the store",
                kind.as_str()
            )));
        };
        if o.source == Source::Cloud {
            return Err(ApiError::BadRequest(format!(
                "{} {ns}/{name} came from the cloud: delete it there",
                kind.as_str()
            )));
        }
        store.apply(&[Change::Delete { kind, uid: o.uid }], &[])?;
        Ok(format!("{}/{name} deleted", kind.as_str().to_lowercase()).into())
    }

    async fn exec(
        &self,
        rec: &ContainerRecord,
        command: &[String],
        stdin: bool,
        tty: bool,
        mut r: tokio::net::unix::OwnedReadHalf,
        mut w: tokio::net::unix::OwnedWriteHalf,
    ) -> std::io::Result<()> {
        use pods::exec::Input;
        // Frames in from their own task: a frame read halfway is never
        // dropped by the relay's select.
        let (tx, inputs) = tokio::sync::mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            while let Ok(Some((kind, p))) = exec::read_frame(&mut r).await {
                let input = match kind {
                    exec::STDIN => Input::Stdin(p),
                    exec::STDIN_EOF => Input::StdinEnd,
                    exec::RESIZE if p.len() == 4 => Input::Resize {
                        cols: u16::from_be_bytes([p[0], p[1]]),
                        rows: u16::from_be_bytes([p[2], p[3]]),
                    },
                    _ => continue,
                };
                if tx.send(input).is_err() {
                    break;
                }
            }
        });
        let streams = pods::exec::Streams {
            stdin,
            stdout: true,
            stderr: !tty,
            tty,
        };
        let mut out = Frames {
            w: &mut w,
            started: false,
        };
        // The reply line goes before the first output, once the process runs.
        let r = pods::exec::run(&self.pods, rec, command, streams, inputs, &mut out).await;
        reader.abort();
        match r {
            Ok(code) => {
                exec::write_frame(&mut w, exec::EXIT, &code.to_be_bytes()).await?;
                w.shutdown().await
            }
            Err(e) if !out.started => {
                reply::<()>(&mut w, Err(ApiError::BadRequest(e.to_string()))).await
            }
            Err(e) => Err(std::io::Error::other(e.to_string())),
        }
    }

    fn find(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<k8s_openapi::api::core::v1::Pod, ApiError> {
        self.pods.find(namespace, name).ok_or_else(|| {
            ApiError::NotFound(format!(
                "pods \"{name}\" not found in namespace \"{namespace}\""
            ))
        })
    }

    fn detail(&self, namespace: &str, name: &str) -> Result<PodDetail, ApiError> {
        let pod = self.find(namespace, name)?;
        let events = self.pods.context().events.about(pods::uid(&pod));
        Ok(PodDetail { pod, events })
    }

    fn status(&self) -> NodeStatus {
        let pods = self.pods.list();
        let mut by_phase = std::collections::BTreeMap::new();
        let mut restarts = 0u64;
        for p in &pods {
            let st = p.status.clone().unwrap_or_default();
            *by_phase.entry(st.phase.unwrap_or_default()).or_insert(0) += 1;
            for c in st
                .container_statuses
                .iter()
                .flatten()
                .chain(st.init_container_statuses.iter().flatten())
            {
                restarts += c.restart_count.max(0) as u64;
            }
        }
        let ctx = self.pods.context();
        let images = ctx.images.list().unwrap_or_default();
        let uname = nix::sys::utsname::uname().ok();
        NodeStatus {
            version: env!("CARGO_PKG_VERSION").into(),
            hostname: uname
                .as_ref()
                .map(|u| u.nodename().to_string_lossy().into_owned())
                .unwrap_or_default(),
            arch: std::env::consts::ARCH.into(),
            kernel: uname
                .as_ref()
                .map(|u| u.release().to_string_lossy().into_owned())
                .unwrap_or_default(),
            cgroup: if crate::runtime::cgroups::is_unified() {
                "v2"
            } else {
                "v1 (or hybrid)"
            }
            .into(),
            pid1: self.pid1,
            uptime_secs: self.started.elapsed().as_secs(),
            pods: pods.len(),
            pods_by_phase: by_phase,
            containers_running: ctx.rt.list().iter().filter(|r| r.exit.is_none()).count(),
            restarts,
            images: images.len(),
            image_bytes: ctx.images.disk_usage().unwrap_or(0),
            image_budget_bytes: self.image_budget,
            rss_bytes: rss_bytes(),
            conditions: self
                .store
                .as_ref()
                .and_then(|s| s.link().ok())
                .map(|l| crate::reporter::node_conditions(&l))
                .unwrap_or_default(),
            store: Some(match &self.store {
                Some(s) => s.stats().map_err(|e| e.to_string()),
                None => Err("no store: it could not be opened (see the daemon's log)".into()),
            }),
            accelerators: {
                let held = ctx.accelerators.allocations();
                ctx.accelerators
                    .capacity()
                    .into_iter()
                    .map(|(r, n)| {
                        let used = held.iter().filter(|a| a.resource == r).count() as u32;
                        (r, (n, used))
                    })
                    .collect()
            },
        }
    }
}

/// The local exec session's output: the reply line, then frames.
struct Frames<'a> {
    w: &'a mut tokio::net::unix::OwnedWriteHalf,
    started: bool,
}

impl pods::exec::Output for Frames<'_> {
    async fn started(&mut self) -> std::io::Result<()> {
        self.started = true;
        reply(self.w, Ok(serde_json::Value::Null)).await
    }

    async fn stdout(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        exec::write_frame(self.w, exec::STDOUT, bytes).await
    }

    async fn stderr(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        exec::write_frame(self.w, exec::STDERR, bytes).await
    }

    async fn took_stdin(&mut self, _: usize) {}
}

/// `{"ok": ...}` or `{"error": "..."}`, serialized straight from `r` (a
/// JSON tree of 200 devices first would be the daemon's high-water mark).
async fn reply<T: serde::Serialize>(
    w: &mut tokio::net::unix::OwnedWriteHalf,
    r: Result<T, ApiError>,
) -> std::io::Result<()> {
    #[derive(serde::Serialize)]
    #[serde(rename_all = "lowercase")]
    enum Answer<T> {
        Ok(T),
        Error(String),
    }
    let mut line =
        serde_json::to_vec(&r.map_or_else(|e| Answer::Error(e.to_string()), Answer::Ok))?;
    line.push(b'\n');
    w.write_all(&line).await
}

pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// The socket of a node configuration.
pub fn socket_path(cfg: &crate::config::Config) -> PathBuf {
    cfg.api
        .socket
        .clone()
        .unwrap_or_else(|| cfg.runtime.state_dir.join("edge-rt.sock"))
}

/// Client side: send a request, read the reply line; the stream is left
/// positioned at whatever follows (a log).
pub async fn call(
    socket: &Path,
    req: &Request,
) -> anyhow::Result<(serde_json::Value, BufReader<UnixStream>)> {
    call_then(socket, req, &[]).await
}

/// The same, with `then` sent right after the request (exec's terminal
/// size, so the command starts on a terminal of the right size).
pub async fn call_then(
    socket: &Path,
    req: &Request,
    then: &[u8],
) -> anyhow::Result<(serde_json::Value, BufReader<UnixStream>)> {
    use anyhow::Context as _;
    let mut s = UnixStream::connect(socket).await.with_context(|| {
        format!(
            "cannot reach edge-rt at {} (is `edge-rt run` running, and are you root or in its api group?)",
            socket.display()
        )
    })?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    line.extend_from_slice(then);
    s.write_all(&line).await?;
    let mut r = BufReader::new(s);
    let mut head = String::new();
    r.read_line(&mut head).await?;
    let v: serde_json::Value =
        serde_json::from_str(&head).context("edge-rt sent a reply that is not JSON")?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        anyhow::bail!("{e}");
    }
    Ok((v.get("ok").cloned().unwrap_or_default(), r))
}
