//! Pod status, events and node status into the store's outbox, once a
//! second: only what changed since the last flush, one transaction, so a
//! crash-looping pod costs one small write a second and not one per
//! restart. The link (when connected) sends the outbox on; offline it just
//! holds the newest status per pod and a ring of events.
//!
//! If a flush fails (the disk is full), nothing is marked as reported: the
//! next tick recomputes from live state and tries again, so the outbox
//! catches up by itself when space returns.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{NodeCondition, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::json;

use crate::pods::{self, PodManager};
use crate::store::{Class, LinkState, Report, Store, StoreError};

pub struct Reporter {
    store: Arc<Store>,
    pods: Arc<PodManager>,
    node_name: String,
    /// Capacity, node info and addresses: what a kubelet reports about its
    /// machine (gathered once; they do not change while edge-rt runs).
    facts: serde_json::Value,
    /// Key -> hash of the body last committed.
    sent: HashMap<String, u64>,
    /// Pods removed and not yet reported gone (kept until a flush commits).
    removed: Vec<String>,
    event_seq: u64,
    failing: bool,
    /// (status, event, link) generations at the last successful flush.
    seen: Option<(u64, u64, u64)>,
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
    pub fn new(store: Arc<Store>, pods: Arc<PodManager>, facts: serde_json::Value) -> Reporter {
        let node_name = pods.context().node.node_name.clone();
        Reporter {
            store,
            pods,
            node_name,
            facts,
            sent: HashMap::new(),
            removed: Vec::new(),
            event_seq: 0,
            failing: false,
            seen: None,
        }
    }

    /// What changed since the last successful flush.
    fn collect(&mut self) -> (Vec<Report>, u64) {
        self.removed.extend(self.pods.take_removed());
        let mut out = Vec::new();
        let mut live = BTreeMap::new();
        for p in self.pods.list() {
            let key = format!("pod/{}", pods::uid(&p));
            live.insert(key.clone(), ());
            let body = pod_status_body(&p);
            if self.sent.get(&key) != Some(&digest(&body)) {
                out.push(Report {
                    class: Class::Status,
                    key,
                    body,
                });
            }
        }
        // Pods that are gone, even ones that came and went between two
        // flushes: the cloud completes their deletion.
        let mut gone: std::collections::BTreeSet<String> =
            self.removed.iter().map(|u| format!("pod/{u}")).collect();
        gone.extend(self.sent.keys().filter(|k| k.starts_with("pod/")).cloned());
        for key in gone {
            if !live.contains_key(&key) {
                let body = json!({"uid": &key[4..], "deleted": true});
                out.push(Report {
                    class: Class::Status,
                    key,
                    body,
                });
            }
        }
        if let Ok(link) = self.store.link() {
            let key = format!("node/{}", self.node_name);
            let mut body = self.facts.clone();
            body["name"] = self.node_name.clone().into();
            body["conditions"] = serde_json::to_value(node_conditions(&link)).unwrap_or_default();
            if self.sent.get(&key) != Some(&digest(&body)) {
                out.push(Report {
                    class: Class::Status,
                    key,
                    body,
                });
            }
        }
        let events = self.pods.context().events.since(self.event_seq);
        let seq = events.last().map(|e| e.seq).unwrap_or(self.event_seq);
        for e in events {
            out.push(Report {
                class: Class::Event,
                key: format!("event/{}", e.id),
                body: serde_json::to_value(&e).unwrap_or_default(),
            });
        }
        (out, seq)
    }

    /// Commit what changed to the outbox. Returns how many rows went in.
    pub fn flush(&mut self, now_ms: i64) -> Result<usize, StoreError> {
        let ctx = self.pods.context();
        let generations = (
            ctx.status_generation
                .load(std::sync::atomic::Ordering::Relaxed),
            ctx.events.last_seq(),
            self.store.link_generation(),
        );
        // Nothing moved: no pass over the pods (idle nodes stay at 0 % CPU).
        if self.seen == Some(generations) && self.pods.removed_pending() == 0 {
            return Ok(0);
        }
        let (reports, seq) = self.collect();
        if reports.is_empty() {
            self.seen = Some(generations);
        }
        if reports.is_empty() {
            return Ok(0);
        }
        match self.store.report(&reports, now_ms) {
            Ok(_) => {
                if self.failing {
                    tracing::info!("outbox writable again; status and events caught up");
                    self.failing = false;
                }
                for r in &reports {
                    if r.class == Class::Status {
                        if r.body["deleted"] == true {
                            self.sent.remove(&r.key);
                        } else {
                            self.sent.insert(r.key.clone(), digest(&r.body));
                        }
                    }
                }
                self.event_seq = seq;
                self.removed.clear();
                self.seen = Some(generations);
                Ok(reports.len())
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
pub fn node_facts(
    at: &pods::env::Placement,
    node: &crate::config::NodeSection,
) -> serde_json::Value {
    let mut capacity = serde_json::Map::new();
    capacity.insert(
        "cpu".into(),
        (at.node_cpu_millis / 1000).max(1).to_string().into(),
    );
    capacity.insert(
        "memory".into(),
        format!("{}Ki", at.node_memory_bytes / 1024).into(),
    );
    if let Ok(st) = nix::sys::statvfs::statvfs(&node.data_dir) {
        // u32 on 32-bit targets (armv7 gateways): widen before multiplying.
        #[allow(clippy::unnecessary_cast)]
        let bytes = st.blocks() as u64 * st.fragment_size() as u64;
        capacity.insert(
            "ephemeral-storage".into(),
            format!("{}Ki", bytes / 1024).into(),
        );
    }
    capacity.insert("pods".into(), node.max_pods.to_string().into());
    for (k, v) in &node.extended_resources {
        capacity.insert(k.clone(), v.clone().into());
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
    let addresses: Vec<_> = at
        .host_ip
        .iter()
        .map(|ip| json!({"type": "InternalIP", "address": ip}))
        .collect();
    let version = env!("CARGO_PKG_VERSION");
    json!({
        "capacity": capacity,
        "allocatable": capacity,
        "addresses": addresses,
        "nodeInfo": {
            "architecture": arch,
            "operatingSystem": "linux",
            "osImage": os_image,
            "kernelVersion": kernel,
            "machineID": read("/etc/machine-id"),
            "systemUUID": read("/sys/class/dmi/id/product_uuid"),
            "bootID": read("/proc/sys/kernel/random/boot_id"),
            "containerRuntimeVersion": format!("outrigger://{version}"),
            // The Kubernetes API the node code is written against, so the
            // cluster's version skew rules hold; ours is the runtime's.
            "kubeletVersion": kubelet_version(),
            "kubeProxyVersion": "",
        },
    })
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
fn pod_status_body(p: &Pod) -> serde_json::Value {
    json!({
        "namespace": pods::namespace(p),
        "name": pods::name(p),
        "uid": pods::uid(p),
        "status": p.status,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_kubelet_version_is_the_api_the_code_is_built_against() {
        // Cargo.toml: k8s-openapi with feature v1_36.
        assert_eq!(super::kubelet_version(), "v1.36.0");
    }
}
