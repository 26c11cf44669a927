//! Pod status, events and node status into the store's outbox, once a
//! second: only what changed since the last flush, one transaction, so a
//! crash-looping pod costs one small write a second and not one per
//! restart. The link (when connected) sends the outbox on; offline it just
//! holds the newest status per pod and a ring of events.
//!
//! If a flush fails (the disk is full), nothing is marked as reported: the
//! next tick recomputes from live state and tries again, so the outbox
//! catches up by itself when space returns.

use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{NodeAddress, NodeCondition, NodeSystemInfo, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use outrigger_proto::report::{NodeReport, PodReport, Report};

use crate::pods::{self, PodManager};
use crate::store::{self, LinkState, Store, StoreError};

/// Device reports made and committed at once (see [`Reporter::flush`]).
const DEVICE_BATCH: usize = 32;

pub struct Reporter {
    store: Arc<Store>,
    pods: Arc<PodManager>,
    node_name: String,
    /// Capacity, node info and addresses: what a kubelet reports about its
    /// machine (gathered once; they do not change while edge-rt runs).
    facts: NodeReport,
    /// Outbox key -> hash of the body last committed (pods and the node).
    sent: HashMap<String, u64>,
    /// Pods (uids) whose status was committed and not yet their end.
    pods_sent: std::collections::HashSet<String>,
    /// Pods removed and not yet reported gone (kept until a flush commits).
    removed: Vec<String>,
    event_seq: u64,
    /// The last device event committed.
    device_event_seq: u64,
    failing: bool,
    /// (status, event, link, accelerator) generations at the last
    /// successful flush.
    seen: Option<(u64, u64, u64, u64)>,
    devices: Option<Arc<crate::devices::DeviceManager>>,
    /// The link was up at the last look.
    link_up: bool,
}

fn digest(v: &serde_json::Value) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    v.to_string().hash(&mut h);
    h.finish()
}

/// The node's conditions as the link state makes them: Ready (edge-rt
/// runs) and CloudConnected, whose lastTransitionTime is when the node lost
/// (or last regained) the cloud, kept across reboots.
pub fn node_conditions(link: &LinkState) -> Vec<NodeCondition> {
    let since = jiff::Timestamp::from_millisecond(link.since_ms).unwrap_or_default();
    let (status, reason, message) = match (link.connected, link.ever_connected) {
        (true, _) => ("True", "Connected", "connected to cloud-gw".to_string()),
        (false, true) => (
            "False",
            "Disconnected",
            format!("no link to cloud-gw since {since:.0}"),
        ),
        (false, false) => (
            "False",
            "NeverConnected",
            "not joined to a cloud (standalone, or join pending)".to_string(),
        ),
    };
    vec![
        NodeCondition {
            type_: "Ready".into(),
            status: "True".into(),
            reason: Some("EdgeRuntimeReady".into()),
            message: Some("edge-rt is running pods".into()),
            ..Default::default()
        },
        NodeCondition {
            type_: "CloudConnected".into(),
            status: status.into(),
            reason: Some(reason.into()),
            message: Some(message),
            last_transition_time: Some(Time(since)),
            ..Default::default()
        },
    ]
}

impl Reporter {
    pub fn new(store: Arc<Store>, pods: Arc<PodManager>, facts: NodeReport) -> Reporter {
        let node_name = pods.context().node.node_name.clone();
        Reporter {
            store,
            pods,
            node_name,
            facts,
            sent: HashMap::new(),
            pods_sent: Default::default(),
            removed: Vec::new(),
            event_seq: 0,
            device_event_seq: 0,
            failing: false,
            seen: None,
            devices: None,
            link_up: false,
        }
    }

    /// Devices' twins go up too, each when its report cycle says.
    pub fn with_devices(mut self, d: Arc<crate::devices::DeviceManager>) -> Reporter {
        self.devices = Some(d);
        self
    }

    /// What changed since the last successful flush: each report with its
    /// outbox row (made once), and the last event's sequence number.
    fn collect(&mut self) -> (Vec<(Report, store::Report)>, u64) {
        self.removed.extend(self.pods.take_removed());
        // The link came up: every pod's status goes again. A cut longer
        // than the cluster's node monitor grace period got the node's pods
        // marked not Ready by the node lifecycle controller, and a status
        // that did not change here would otherwise never say otherwise.
        let link = self.store.link();
        let up = link.as_ref().is_ok_and(|l| l.connected);
        if up && !self.link_up {
            self.sent.retain(|k, _| !k.starts_with("pod/"));
        }
        self.link_up = up;
        let mut out = Vec::new();
        let mut live = std::collections::BTreeSet::new();
        let changed = |out: &mut Vec<(Report, store::Report)>, r: Report| {
            let row = store::Report::from(&r);
            if self.sent.get(&row.key) != Some(&digest(&row.body)) {
                out.push((r, row));
            }
        };
        for p in self.pods.list() {
            let r = Report::Pod(Box::new(pod_report(&p)));
            live.insert(r.key());
            changed(&mut out, r);
        }
        if let Ok(link) = link {
            let mut node = self.facts.clone();
            node.name = self.node_name.clone();
            // Accelerators come and go (hotplug): counted at each report.
            for (resource, n) in self.pods.context().accelerators.capacity() {
                let q = Quantity(n.to_string());
                node.capacity.insert(resource.clone(), q.clone());
                node.allocatable.insert(resource, q);
            }
            node.conditions = node_conditions(&link);
            changed(&mut out, Report::Node(Box::new(node)));
        }
        // Pods that are gone, even ones that came and went between two
        // flushes: the cloud completes their deletion.
        let gone: std::collections::BTreeSet<String> = self
            .removed
            .iter()
            .chain(&self.pods_sent)
            .cloned()
            .collect();
        for uid in gone {
            let r = Report::PodGone { uid };
            let row = store::Report::from(&r);
            if !live.contains(&row.key) {
                out.push((r, row));
            }
        }
        let events = self.pods.context().events.since(self.event_seq);
        let seq = events.last().map(|e| e.seq).unwrap_or(self.event_seq);
        out.extend(events.into_iter().map(|e| {
            let r = Report::Event(e);
            let row = store::Report::from(&r);
            (r, row)
        }));
        (out, seq)
    }

    /// Commit what changed to the outbox. Returns how many rows went in.
    /// Device reports go in batches, each committed before the next is
    /// made: 200 statuses and their rows at once were the daemon's
    /// high-water mark.
    pub fn flush(&mut self, now_ms: i64) -> Result<usize, StoreError> {
        let mut total = 0;
        loop {
            let (rows, more) = self.flush_batch(now_ms)?;
            total += rows;
            if !more {
                return Ok(total);
            }
        }
    }

    /// One batch; whether more devices may be due.
    fn flush_batch(&mut self, now_ms: i64) -> Result<(usize, bool), StoreError> {
        let ctx = self.pods.context();
        let generations = (
            ctx.status_generation
                .load(std::sync::atomic::Ordering::Relaxed),
            ctx.events.last_seq(),
            self.store.link_generation(),
            ctx.accelerators.generation(),
        );
        let devices = self
            .devices
            .as_ref()
            .map(|d| d.due(now_ms, DEVICE_BATCH))
            .unwrap_or_default();
        let more = devices.len() == DEVICE_BATCH;
        let device_events = self
            .devices
            .as_ref()
            .map(|d| d.events.since(self.device_event_seq))
            .unwrap_or_default();
        // Nothing moved: no pass over the pods (idle nodes stay at 0 % CPU).
        if self.seen == Some(generations)
            && self.pods.removed_pending() == 0
            && devices.is_empty()
            && device_events.is_empty()
        {
            return Ok((0, false));
        }
        let device_event_seq = device_events
            .last()
            .map(|e| e.seq)
            .unwrap_or(self.device_event_seq);
        let (mut pending, seq) = self.collect();
        let device_uids: Vec<String> = devices.iter().map(|d| d.uid.clone()).collect();
        pending.extend(devices.into_iter().map(|d| {
            let r = Report::Device(Box::new(d));
            let row = store::Report::from(&r);
            (r, row)
        }));
        pending.extend(device_events.into_iter().map(|e| {
            let r = Report::DeviceEvent(e);
            let row = store::Report::from(&r);
            (r, row)
        }));
        if pending.is_empty() {
            self.seen = Some(generations);
            return Ok((0, false));
        }
        let (reports, rows): (Vec<Report>, Vec<store::Report>) = pending.into_iter().unzip();
        match self.store.report(&rows, now_ms) {
            Ok(_) => {
                if self.failing {
                    tracing::info!("outbox writable again; status and events caught up");
                    self.failing = false;
                }
                for (r, row) in reports.iter().zip(&rows) {
                    match r {
                        Report::PodGone { uid } => {
                            self.sent.remove(&row.key);
                            self.pods_sent.remove(uid);
                        }
                        Report::Pod(p) => {
                            self.sent.insert(row.key.clone(), digest(&row.body));
                            self.pods_sent.insert(p.uid.clone());
                        }
                        Report::Node(_) => {
                            self.sent.insert(row.key.clone(), digest(&row.body));
                        }
                        Report::Event(_) | Report::Device(_) | Report::DeviceEvent(_) => {}
                    }
                }
                if let Some(d) = &self.devices {
                    d.reported(&device_uids, now_ms);
                }
                self.event_seq = seq;
                self.device_event_seq = device_event_seq;
                self.removed.clear();
                self.seen = Some(generations);
                Ok((reports.len(), more))
            }
            Err(e) => {
                if !self.failing {
                    tracing::error!(error = %e, pending = reports.len(), "cannot write the outbox; pods keep running, status is retried every second");
                    self.failing = true;
                }
                Err(e)
            }
        }
    }
}

/// What the cluster is told about this machine, as a kubelet would put it
/// in the Node's status: capacity (allocatable is the same: edge-rt
/// reserves nothing for itself beyond what it uses), node info, addresses.
/// The name and conditions are filled in with each report.
pub fn node_facts(at: &pods::env::Placement, node: &crate::config::NodeSection) -> NodeReport {
    let mut capacity = std::collections::BTreeMap::new();
    let mut put = |k: &str, v: String| capacity.insert(k.to_string(), Quantity(v));
    put("cpu", (at.node_cpu_millis / 1000).max(1).to_string());
    put("memory", format!("{}Ki", at.node_memory_bytes / 1024));
    if let Ok(st) = nix::sys::statvfs::statvfs(&node.data_dir) {
        // u32 on 32-bit targets (armv7 gateways): widen before multiplying.
        #[allow(clippy::unnecessary_cast)]
        let bytes = st.blocks() as u64 * st.fragment_size() as u64;
        put("ephemeral-storage", format!("{}Ki", bytes / 1024));
    }
    put("pods", node.max_pods.to_string());
    for (k, v) in &node.extended_resources {
        put(k, v.clone());
    }
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    let os_image = read("/etc/os-release")
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_else(|| "Linux".into());
    let uname = nix::sys::utsname::uname().ok();
    let kernel = uname
        .as_ref()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    // Kubernetes' names for architectures (GOARCH).
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        "riscv64" => "riscv64",
        other => other,
    };
    // Addresses by IP only: a Hostname address would send the API server
    // to its resolver for a name that leads nowhere (kubectl logs).
    let addresses = at
        .host_ip
        .iter()
        .map(|ip| NodeAddress {
            type_: "InternalIP".into(),
            address: ip.to_string(),
        })
        .collect();
    let version = env!("CARGO_PKG_VERSION");
    NodeReport {
        name: String::new(),
        allocatable: capacity.clone(),
        capacity,
        addresses,
        node_info: Some(NodeSystemInfo {
            architecture: arch.into(),
            operating_system: "linux".into(),
            os_image,
            kernel_version: kernel,
            machine_id: read("/etc/machine-id"),
            system_uuid: read("/sys/class/dmi/id/product_uuid"),
            boot_id: read("/proc/sys/kernel/random/boot_id"),
            container_runtime_version: format!("outrigger://{version}"),
            // The Kubernetes API the node code is written against, so the
            // cluster's version skew rules hold; ours is the runtime's.
            kubelet_version: kubelet_version(),
            kube_proxy_version: String::new(),
            ..Default::default()
        }),
        conditions: Vec::new(),
    }
}

/// The minor version of the Kubernetes API this code is written against
/// (the k8s-openapi feature it is built with).
pub const fn kube_api_minor() -> u32 {
    k8s_openapi::k8s_if_1_33! { return 33; }
    k8s_openapi::k8s_if_1_34! { return 34; }
    k8s_openapi::k8s_if_1_35! { return 35; }
    k8s_openapi::k8s_if_1_36! { return 36; }
    k8s_openapi::k8s_if_1_37! { return 37; }
    #[allow(unreachable_code)]
    0
}

/// What the node reports as its kubelet version: a kubelet of the API it
/// speaks, within the skew an API server of that version and the three
/// after it accept.
pub fn kubelet_version() -> String {
    format!("v1.{}.0", kube_api_minor())
}

/// What the cloud needs to write a pod's status back.
fn pod_report(p: &Pod) -> PodReport {
    PodReport {
        namespace: pods::namespace(p).to_string(),
        name: pods::name(p).to_string(),
        uid: pods::uid(p).to_string(),
        status: p.status.clone(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_kubelet_version_is_the_api_the_code_is_built_against() {
        // Cargo.toml: k8s-openapi with feature v1_36.
        assert_eq!(super::kubelet_version(), "v1.36.0");
    }
}
