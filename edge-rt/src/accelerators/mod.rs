//! Accelerators (GPUs, NPUs, TPUs and devices the operator names) as
//! extended resources: found under `/dev` at start and whenever `/dev`
//! changes ([`detect`]), counted into the Node's capacity, given to pods'
//! containers exclusively ([`alloc`], slots recorded in the store so a
//! restart or a reboot gives the same ones), and turned into what the
//! container gets: device nodes with their cgroup rules, the vendor's
//! environment, and the vendor's CDI edits ([`cdi`]).
//!
//! Pods may also ask for CDI devices by name in `cdi.k8s.io/*`
//! annotations: a device that is also one of the node's accelerators is
//! allocated like one (so it is never given twice); any other device of
//! the CDI specs is applied as its spec says.

pub mod alloc;
pub mod cdi;
pub mod detect;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Pod;
use serde::{Deserialize, Serialize};

use crate::runtime::edits::{ContainerEdits, DeviceNode};
use crate::store::{Allocation, Store};
use alloc::Shortage;
use detect::Accelerator;

/// `[accelerators]` in the configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AcceleratorConfig {
    /// Look for the accelerators of the built-in table.
    pub detect: bool,
    /// Where device nodes are (tests point it at a directory of their own).
    pub dev_dir: PathBuf,
    /// Where sysfs is.
    pub sys_dir: PathBuf,
    /// CDI spec directories, later ones winning a device name.
    pub cdi_spec_dirs: Vec<PathBuf>,
    /// Honour `cdi.k8s.io/*` annotations on pods.
    pub cdi_annotations: bool,
    /// Built-in resource names to report under another name.
    pub rename: BTreeMap<String, String>,
    /// Devices named by the operator.
    pub device: Vec<ConfiguredDevice>,
}

impl Default for AcceleratorConfig {
    fn default() -> Self {
        AcceleratorConfig {
            detect: true,
            dev_dir: "/dev".into(),
            sys_dir: "/sys".into(),
            cdi_spec_dirs: vec!["/etc/cdi".into(), "/var/run/cdi".into()],
            cdi_annotations: true,
            rename: BTreeMap::new(),
            device: Vec::new(),
        }
    }
}

/// `[[accelerators.device]]`: every node matching `glob` (under `dev_dir`)
/// is a device of `resource`, which `count` containers may hold at once.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConfiguredDevice {
    pub resource: String,
    pub glob: String,
    #[serde(default = "one")]
    pub count: u32,
}

fn one() -> u32 {
    1
}

/// Why a container cannot have its devices.
#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    /// Not now: more than is free (the pod waits).
    #[error(transparent)]
    Shortage(#[from] Shortage),
    /// Not ever as written (a bad CDI annotation, a spec that cannot be
    /// applied).
    #[error("{0}")]
    Config(String),
    #[error("recording the allocation: {0}")]
    Store(String),
}

struct State {
    inventory: Vec<Accelerator>,
    cdi: cdi::Registry,
    allocations: Vec<Allocation>,
}

/// The node's accelerators and who holds them.
pub struct Accelerators {
    cfg: AcceleratorConfig,
    store: Option<Arc<Store>>,
    state: Mutex<State>,
    /// Bumped when the inventory changes (the reporter sends capacity).
    generation: std::sync::atomic::AtomicU64,
    /// Woken when the inventory changed (the reporter flushes).
    pub changed: tokio::sync::Notify,
}

/// The CDI annotation prefix (`cdi.k8s.io/<key>: vendor.com/class=name,...`).
const CDI_PREFIX: &str = "cdi.k8s.io/";

impl Accelerators {
    pub fn new(cfg: AcceleratorConfig, store: Option<Arc<Store>>) -> Arc<Accelerators> {
        let allocations = match &store {
            Some(s) => s.allocations().unwrap_or_else(|e| {
                tracing::error!(error = %e, "reading accelerator allocations; starting with none");
                Vec::new()
            }),
            None => Vec::new(),
        };
        let a = Arc::new(Accelerators {
            state: Mutex::new(State {
                inventory: Vec::new(),
                cdi: cdi::Registry::default(),
                allocations,
            }),
            cfg,
            store,
            generation: Default::default(),
            changed: Default::default(),
        });
        a.rescan();
        a
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Look at /dev and the CDI specs again; true if the inventory changed.
    pub fn rescan(&self) -> bool {
        let inventory = detect::scan(&self.cfg);
        let registry = cdi::Registry::load(&self.cfg.cdi_spec_dirs);
        for e in &registry.errors {
            tracing::warn!(error = %e, "CDI spec not used");
        }
        let mut st = self.state();
        let changed = st.inventory != inventory;
        if changed {
            let count = |v: &[Accelerator]| {
                let mut m: BTreeMap<String, u32> = BTreeMap::new();
                for a in v {
                    *m.entry(a.resource.clone()).or_default() += a.shares;
                }
                m
            };
            tracing::info!(resources = ?count(&inventory), cdi_devices = registry.device_count(), "accelerators");
            st.inventory = inventory;
            self.generation
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        st.cdi = registry;
        changed
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Capacity by resource: each device's share count, summed.
    pub fn capacity(&self) -> BTreeMap<String, u32> {
        let st = self.state();
        let mut m = BTreeMap::new();
        for a in &st.inventory {
            *m.entry(a.resource.clone()).or_default() += a.shares;
        }
        // A configured resource with nothing matching says 0 (the Node
        // shows it, and that it has none).
        for c in &self.cfg.device {
            let name = self.cfg.rename.get(&c.resource).unwrap_or(&c.resource);
            m.entry(name.clone()).or_insert(0);
        }
        m
    }

    /// Whether a resource name is one this node allocates devices for.
    fn known(&self, st: &State, resource: &str) -> bool {
        st.inventory.iter().any(|a| a.resource == resource)
            || self
                .cfg
                .device
                .iter()
                .any(|c| self.cfg.rename.get(&c.resource).unwrap_or(&c.resource) == resource)
            || (self.cfg.detect
                && detect::BUILTIN_RESOURCES
                    .iter()
                    .any(|b| self.cfg.rename.get(*b).map(String::as_str).unwrap_or(b) == resource))
    }

    /// The pod's CDI annotation requests (qualified names), in key order.
    fn cdi_requests(pod: &Pod) -> Vec<String> {
        let mut v = Vec::new();
        for (k, val) in pod.metadata.annotations.iter().flatten() {
            if k.starts_with(CDI_PREFIX) {
                v.extend(
                    val.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(String::from),
                );
            }
        }
        v
    }

    /// What one of the pod's containers gets: the pod's devices are
    /// allocated at its first container's start (all at once: a pod never
    /// holds half of what it needs) and kept until it ends.
    pub fn grant(
        &self,
        pod: &Pod,
        container: &str,
        init: bool,
    ) -> Result<ContainerEdits, GrantError> {
        let uid = pod.metadata.uid.as_deref().unwrap_or("");
        let pod_name = pod.metadata.name.as_deref().unwrap_or("");
        let mut st = self.state();
        let mut wants = alloc::wants(pod, &|r| self.known(&st, r))?;
        // CDI annotations naming one of the node's accelerators: allocated
        // to every app container of the pod, like a request for it.
        let annotated = Self::cdi_requests(pod);
        if !annotated.is_empty() && !self.cfg.cdi_annotations {
            return Err(GrantError::Config(format!(
                "the pod asks for CDI devices ({}) and this node does not honour cdi.k8s.io annotations ([accelerators] cdi_annotations = false)",
                annotated.join(", ")
            )));
        }
        let mut pinned: Vec<(String, String)> = Vec::new();
        let mut plain: Vec<ContainerEdits> = Vec::new();
        for q in &annotated {
            let (kind, name) =
                cdi::parse_qualified(q).map_err(|e| GrantError::Config(e.to_string()))?;
            if st
                .inventory
                .iter()
                .any(|a| a.resource == kind && a.id == name)
            {
                pinned.push((kind.to_string(), name.to_string()));
            } else {
                // Any other CDI device: as its spec says (the registry names
                // a device defined nowhere, or twice).
                plain.push(
                    st.cdi
                        .edits(q)
                        .map_err(|e| GrantError::Config(e.to_string()))?,
                );
            }
        }
        let holds = st.allocations.iter().any(|a| a.pod_uid == uid);
        if !holds && (!wants.is_empty() || !pinned.is_empty()) {
            let mut give = alloc::assign(&st.inventory, &st.allocations, uid, &wants)?;
            for (resource, id) in &pinned {
                if let Some(h) = st
                    .allocations
                    .iter()
                    .find(|a| &a.resource == resource && &a.device == id)
                {
                    return Err(Shortage::Insufficient {
                        resource: resource.clone(),
                        wanted: 1,
                        free: 0,
                        total: 1,
                        holders: vec![h.pod_uid.clone()],
                    }
                    .into());
                }
                if !give
                    .iter()
                    .any(|a| &a.resource == resource && &a.device == id)
                {
                    give.push(Allocation {
                        resource: resource.clone(),
                        device: id.clone(),
                        slot: 0,
                        pod_uid: uid.into(),
                        container: String::new(),
                    });
                }
            }
            if let Some(s) = &self.store {
                s.set_allocations(&give, &[])
                    .map_err(|e| GrantError::Store(e.to_string()))?;
            }
            tracing::info!(pod = pod_name, devices = ?give.iter().map(|a| format!("{}={}", a.resource, a.device)).collect::<Vec<_>>(), "accelerators allocated");
            st.allocations.extend(give);
        }
        let mine: Vec<Allocation> = st
            .allocations
            .iter()
            .filter(|a| a.pod_uid == uid)
            .cloned()
            .collect();
        // This container's devices: its asks, plus (app containers) the
        // devices pinned by annotation.
        wants.retain(|w| w.container == container && w.init == init);
        let mut ids: Vec<(String, String)> = Vec::new();
        for w in &wants {
            for d in alloc::devices_for(&mine, w) {
                ids.push((w.resource.clone(), d.to_string()));
            }
        }
        if !init {
            for (r, id) in &pinned {
                ids.push((r.clone(), id.clone()));
            }
        }
        let mut edits = ContainerEdits::default();
        let mut visible: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (resource, id) in &ids {
            let Some(a) = st
                .inventory
                .iter()
                .find(|a| &a.resource == resource && &a.id == id)
            else {
                // Allocated before and gone since (unplugged): the
                // container starts without it, and says so.
                return Err(GrantError::Config(format!(
                    "{resource} device {id} given to this pod is no longer on the node"
                )));
            };
            edits.merge(self.node_edits(a)?);
            for (k, v) in &a.env {
                visible.entry(k.clone()).or_default().push(v.clone());
            }
            // The vendor's CDI spec for this device, if it has one (its
            // kind is the resource name, its name the device's id:
            // `nvidia-ctk cdi generate` writes nvidia.com/gpu=0).
            let q = format!("{resource}={id}");
            if st.cdi.contains(&q) {
                edits.merge(
                    st.cdi
                        .edits(&q)
                        .map_err(|e| GrantError::Config(e.to_string()))?,
                );
            }
        }
        // One variable for several devices lists them all.
        for (k, v) in visible {
            edits.merge(ContainerEdits {
                env: vec![(k, v.join(","))],
                ..Default::default()
            });
        }
        if !init {
            for e in plain {
                edits.merge(e);
            }
        }
        Ok(edits)
    }

    /// A device's own nodes, at the same path under the container's /dev.
    fn node_edits(&self, a: &Accelerator) -> Result<ContainerEdits, GrantError> {
        let mut e = ContainerEdits::default();
        for p in &a.nodes {
            let (kind, major, minor, mode) = cdi::stat_node(p)
                .map_err(|err| GrantError::Config(format!("{}: {err}", p.display())))?;
            e.nodes.push(DeviceNode {
                path: container_path(&self.cfg.dev_dir, p),
                kind,
                major,
                minor,
                file_mode: Some(mode),
                uid: None,
                gid: None,
                access: "rwm".into(),
            });
        }
        Ok(e)
    }

    /// Free what the pod holds (it ended, or is gone).
    pub fn release(&self, pod_uid: &str) {
        let mut st = self.state();
        if !st.allocations.iter().any(|a| a.pod_uid == pod_uid) {
            return;
        }
        if let Some(s) = &self.store {
            if let Err(e) = s.set_allocations(&[], &[pod_uid.to_string()]) {
                // Kept in memory too: freeing it here but not in the store
                // would give it twice after a restart.
                tracing::error!(pod = pod_uid, error = %e, "freeing accelerators");
                return;
            }
        }
        st.allocations.retain(|a| a.pod_uid != pod_uid);
        tracing::info!(pod = pod_uid, "accelerators freed");
    }

    /// Free what pods not in `live` hold (removed while edge-rt was down).
    pub fn retain(&self, live: &std::collections::BTreeSet<String>) {
        let gone: Vec<String> = {
            let st = self.state();
            let mut v: Vec<String> = st
                .allocations
                .iter()
                .filter(|a| !live.contains(&a.pod_uid))
                .map(|a| a.pod_uid.clone())
                .collect();
            v.dedup();
            v
        };
        for uid in gone {
            self.release(&uid);
        }
    }

    /// Every slot held (for `edge-rt status` and the metrics).
    pub fn allocations(&self) -> Vec<Allocation> {
        self.state().allocations.clone()
    }

    /// Rescan whenever something is created or removed under the device
    /// directories (udev making or removing nodes), a little after the
    /// burst, and every minute regardless (CDI specs, sysfs).
    pub async fn watch(self: Arc<Self>) {
        use futures_util::StreamExt;
        let dirs: Vec<PathBuf> = ["", "dri", "accel", "nvgpu/igpu0"]
            .iter()
            .map(|d| self.cfg.dev_dir.join(d))
            .chain(self.cfg.cdi_spec_dirs.iter().cloned())
            .collect();
        let mask = inotify::WatchMask::CREATE
            | inotify::WatchMask::DELETE
            | inotify::WatchMask::MOVED_TO
            | inotify::WatchMask::MOVED_FROM
            | inotify::WatchMask::CLOSE_WRITE
            | inotify::WatchMask::ATTRIB;
        // Directories that appear later (/dev/dri when a driver loads)
        // are watched from the next look on: adding a watch twice is a
        // no-op.
        let add_watches = |s: &inotify::EventStream<Vec<u8>>| {
            for d in &dirs {
                let _ = s.watches().add(d, mask);
            }
        };
        let mut stream = inotify::Inotify::init()
            .ok()
            .and_then(|ino| ino.into_event_stream(vec![0u8; 1024]).ok());
        if let Some(s) = &stream {
            add_watches(s);
        }
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
        tick.tick().await;
        loop {
            match stream.as_mut() {
                Some(s) => tokio::select! {
                    ev = s.next() => if ev.is_none() { stream = None; continue; },
                    _ = tick.tick() => {}
                },
                None => {
                    tick.tick().await;
                }
            }
            // udev makes a node, then sets its owner and mode: wait for the
            // burst to end.
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            if let Some(s) = stream.as_mut() {
                while let Some(Some(_)) = futures_util::FutureExt::now_or_never(s.next()) {}
                add_watches(s);
            }
            if self.rescan() {
                self.changed.notify_one();
            }
        }
    }
}

/// The container's path of a host node: the same under /dev.
fn container_path(dev_dir: &Path, host: &Path) -> PathBuf {
    match host.strip_prefix(dev_dir) {
        Ok(rel) => Path::new("/dev").join(rel),
        Err(_) => host.to_path_buf(),
    }
}
