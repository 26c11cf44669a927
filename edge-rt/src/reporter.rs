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
    let since = chrono::DateTime::from_timestamp_millis(link.since_ms).unwrap_or_default();
    let (status, reason, message) = match (link.connected, link.ever_connected) {
        (true, _) => ("True", "Connected", "connected to cloud-gw".to_string()),
        (false, true) => (
            "False",
            "Disconnected",
            format!("no link to cloud-gw since {}", since.to_rfc3339()),
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
    pub fn new(store: Arc<Store>, pods: Arc<PodManager>) -> Reporter {
        let node_name = pods.context().node.node_name.clone();
        Reporter {
            store,
            pods,
            node_name,
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
            let body = json!({"name": self.node_name, "conditions": node_conditions(&link)});
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

/// What the cloud needs to write a pod's status back.
fn pod_status_body(p: &Pod) -> serde_json::Value {
    json!({
        "namespace": pods::namespace(p),
        "name": pods::name(p),
        "uid": pods::uid(p),
        "status": p.status,
    })
}
