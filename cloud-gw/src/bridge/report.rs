//! What an edge node reports, written to the API server the way a kubelet
//! writes it: pod status through the status subresource (with the pod's
//! uid as precondition), Events for what happened to pods, the Node's
//! status, and deletion completed (grace period 0) once the node has
//! stopped a pod being deleted.
//!
//! A node can only write about itself: a pod row counts only for a pod
//! bound to that node (by the cache, not by what the row claims), the node
//! row only for the node its certificate names.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Event, Pod};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::Api;
use outrigger_proto::message::Row;
use outrigger_proto::report::{DeviceEvent, EventType, PodEvent, PodReport, Report};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::nodes::{self, is_status};
use super::{lock, Inner};
use crate::metrics::METRICS;

/// Rows written at once per node.
const CONCURRENT_WRITES: usize = 8;

/// What became of one row.
pub(crate) enum Outcome {
    /// Written, or refused for good (the row would never succeed): ack.
    Done,
    /// A passing failure (API server unreachable, throttled): keep it.
    Retry,
}

/// Errors worth retrying: no answer, or an answer that says later.
fn passing(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(r) => r.code == 429 || r.code >= 500,
        _ => true,
    }
}

pub(crate) fn outcome(what: &str, node: &str, r: Result<(), kube::Error>) -> Outcome {
    if r.is_err() {
        METRICS.api_errors.fetch_add(1, Relaxed);
    }
    match r {
        Ok(()) => Outcome::Done,
        Err(e) if passing(&e) => {
            tracing::debug!(node, what, error = %e, "not written; the node sends it again");
            Outcome::Retry
        }
        Err(e) => {
            tracing::warn!(node, what, error = %e, "refused by the API server; dropped");
            Outcome::Done
        }
    }
}

pub(crate) async fn record(inner: &Arc<Inner>, node: &str, rows: Vec<Row>) -> Vec<i64> {
    futures_util::stream::iter(rows)
        .map(|r| async move {
            let seq = r.seq;
            let Ok(_slot) = inner.api_slots.acquire().await else {
                return None;
            };
            let start = std::time::Instant::now();
            let o = one(inner, node, r).await;
            METRICS.api_write.observe(start.elapsed());
            match o {
                Outcome::Done => {
                    METRICS.status_rows_recorded.fetch_add(1, Relaxed);
                    Some(seq)
                }
                Outcome::Retry => {
                    METRICS.status_rows_retried.fetch_add(1, Relaxed);
                    None
                }
            }
        })
        .buffer_unordered(CONCURRENT_WRITES)
        .filter_map(|s| async move { s })
        .collect()
        .await
}

async fn one(inner: &Arc<Inner>, node: &str, row: Row) -> Outcome {
    let report = match Report::from_row(&row) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(node, error = %e, "unreadable row; dropped");
            return Outcome::Done;
        }
    };
    match report {
        Report::Event(e) => outcome("event", node, event(inner, node, &e).await),
        Report::Node(n) if n.name != node => {
            tracing::warn!(
                node,
                row = n.name,
                "a node reported for another node; dropped"
            );
            Outcome::Done
        }
        Report::Node(n) => {
            lock(&inner.reports).insert(node.to_string(), (*n).clone());
            outcome(
                "node status",
                node,
                nodes::write_status(inner, node, &n).await,
            )
        }
        Report::Pod(p) => pod_status(inner, node, *p).await,
        Report::PodGone { uid } => pod_gone(inner, node, &uid).await,
        Report::Device(d) => super::devices::status(inner, node, *d).await,
        Report::DeviceEvent(e) => {
            outcome("device event", node, device_event(inner, node, &e).await)
        }
    }
}

/// The (namespace, name) of `uid` if it is a pod bound to `node`, and
/// whether it is being deleted.
fn own_pod(inner: &Inner, node: &str, uid: &str) -> Option<(String, String, bool)> {
    let c = lock(&inner.cache);
    let (key, p) = c.pod_by_uid(uid)?;
    (p.node == node).then(|| (key.0.clone(), key.1.clone(), p.terminating))
}

/// The node stopped the pod. If it is being deleted, finish the job; if
/// not, the node will get it again from its next sync.
async fn pod_gone(inner: &Arc<Inner>, node: &str, uid: &str) -> Outcome {
    // Gone from the cluster, or not this node's: nothing to do.
    let Some((ns, name, true)) = own_pod(inner, node, uid) else {
        return Outcome::Done;
    };
    let api = Api::<Pod>::namespaced(inner.client.clone(), &ns);
    outcome("pod deletion", node, delete_now(&api, &name, uid).await)
}

async fn pod_status(inner: &Arc<Inner>, node: &str, report: PodReport) -> Outcome {
    // Gone from the cluster, or not this node's (by the cache, whatever
    // the row claims): nothing to write.
    let uid = report.uid.as_str();
    let Some((ns, name, _)) = own_pod(inner, node, uid) else {
        return Outcome::Done;
    };
    let api = Api::<Pod>::namespaced(inner.client.clone(), &ns);
    // The uid in the patch makes it conditional: a pod recreated under
    // the same name is not given the old one's status.
    let patch = json!({"metadata": {"uid": uid}, "status": report.status});
    let r = api
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ());
    match r {
        Err(e) if is_status(&e, 404) => Outcome::Done,
        r => outcome("pod status", node, r),
    }
}

async fn delete_now(api: &Api<Pod>, name: &str, uid: &str) -> Result<(), kube::Error> {
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: Some(uid.to_string()),
            resource_version: None,
        }),
        ..Default::default()
    };
    match api.delete(name, &dp).await {
        Ok(_) => {
            tracing::info!(
                pod = name,
                uid,
                "pod stopped on its node; deletion completed"
            );
            Ok(())
        }
        // Already gone, or a new pod of that name (uid precondition).
        Err(e) if is_status(&e, 404) || is_status(&e, 409) => Ok(()),
        Err(e) => Err(e),
    }
}

/// A terminating pod its node does not have: delete it for good (once at
/// a time per pod; a failure is retried by the next sync pass).
pub(crate) fn finalize(inner: &Arc<Inner>, node: &str, uid: &str) {
    let Some((ns, name, true)) = own_pod(inner, node, uid) else {
        return;
    };
    if !lock(&inner.finalizing).insert(uid.to_string()) {
        return;
    }
    let inner = inner.clone();
    let uid = uid.to_string();
    tokio::spawn(async move {
        let api = Api::<Pod>::namespaced(inner.client.clone(), &ns);
        if let Err(e) = delete_now(&api, &name, &uid).await {
            tracing::warn!(pod = name, error = %e, "deletion not completed; retried");
        }
        lock(&inner.finalizing).remove(&uid);
    });
}

/// An Event's name: the pod's, then a hash of the event's identity as
/// protocol 1.0 spelled it (the reason and time as JSON strings), so an
/// Event keeps its name across versions.
fn event_name(node: &str, pod: &str, e: &PodEvent) -> String {
    let identity = format!(
        "{node}/{}/{}/{}/{}",
        e.pod_uid,
        e.id,
        serde_json::Value::from(e.reason.as_str()),
        serde_json::Value::from(e.first_timestamp.as_str())
    );
    format!("{pod}.{}", hex::encode(&Sha256::digest(identity)[..8]))
}

/// An Event for what happened to one of the node's pods. Its name comes
/// from the event's identity, so a row sent twice (a reconnect before the
/// ack) updates the same Event instead of making another.
async fn event(inner: &Arc<Inner>, node: &str, e: &PodEvent) -> Result<(), kube::Error> {
    let uid = e.pod_uid.as_str();
    let Some((ns, pod, _)) = own_pod(inner, node, uid) else {
        return Ok(());
    };
    let involved = json!({"apiVersion": "v1", "kind": "Pod", "name": pod,
                          "namespace": ns, "uid": uid, "fieldPath": e.container});
    let ev = Written {
        name: event_name(node, &pod, e),
        namespace: &ns,
        involved,
        kind: e.kind,
        reason: &e.reason,
        message: &e.message,
        count: e.count,
        first: &e.first_timestamp,
        last: &e.last_timestamp,
    };
    write_event(inner, node, ev).await
}

/// An Event for what happened to one of the node's devices (one bound to
/// it by the cache), named as a pod's is.
pub(super) async fn device_event(
    inner: &Arc<Inner>,
    node: &str,
    e: &DeviceEvent,
) -> Result<(), kube::Error> {
    let own = {
        let c = lock(&inner.cache);
        c.device_by_uid(&e.device_uid)
            .filter(|(_, d)| d.node == node)
            .map(|(k, _)| k.clone())
    };
    let Some((ns, name)) = own else {
        return Ok(());
    };
    let identity = format!("{node}/{}/{}/{}", e.device_uid, e.id, e.first_timestamp);
    let involved = json!({"apiVersion": outrigger_proto::device::API_VERSION, "kind": "Device",
                          "name": name, "namespace": ns, "uid": e.device_uid});
    let ev = Written {
        name: format!("{name}.{}", hex::encode(&Sha256::digest(identity)[..8])),
        namespace: &ns,
        involved,
        kind: e.kind,
        reason: &e.reason,
        message: &e.message,
        count: e.count,
        first: &e.first_timestamp,
        last: &e.last_timestamp,
    };
    write_event(inner, node, ev).await
}

/// An Event as it is written.
struct Written<'a> {
    name: String,
    namespace: &'a str,
    involved: serde_json::Value,
    kind: EventType,
    reason: &'a str,
    message: &'a str,
    count: u32,
    first: &'a str,
    last: &'a str,
}

/// Create the Event, or, if a row sent before made it, update its count.
async fn write_event(inner: &Arc<Inner>, node: &str, e: Written<'_>) -> Result<(), kube::Error> {
    let kind = match e.kind {
        EventType::Normal => "Normal",
        EventType::Warning => "Warning",
    };
    let ev = json!({
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": e.name, "namespace": e.namespace},
        "involvedObject": e.involved,
        "reason": e.reason, "message": e.message, "type": kind,
        "count": e.count.max(1),
        "firstTimestamp": e.first, "lastTimestamp": e.last,
        "source": {"component": "edge-rt", "host": node},
        "reportingComponent": "outrigger.io/edge-rt", "reportingInstance": node,
    });
    let api = Api::<Event>::namespaced(inner.client.clone(), e.namespace);
    let typed: Event = serde_json::from_value(ev).map_err(kube::Error::SerdeError)?;
    match api.create(&PostParams::default(), &typed).await {
        Ok(_) => Ok(()),
        Err(err) if is_status(&err, 409) => {
            let patch = json!({"count": typed.count, "lastTimestamp": e.last,
                               "message": e.message});
            api.patch(&e.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map(|_| ())
        }
        // The namespace is gone: so is what the event was about.
        Err(err) if is_status(&err, 404) => Ok(()),
        Err(err) => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_keeps_the_name_protocol_1_0_gave_it() {
        let e = PodEvent {
            pod_uid: "u-1".into(),
            namespace: "ns".into(),
            pod: "web".into(),
            container: None,
            kind: EventType::Warning,
            // A control character: JSON and Rust's Debug escape it apart.
            reason: "Back\u{1b}Off".into(),
            message: "m".into(),
            count: 3,
            first_timestamp: "2026-12-02T10:00:00Z".into(),
            last_timestamp: "2026-12-02T10:01:00Z".into(),
            id: 7,
            seq: 9,
        };
        // 1.0 formatted serde_json::Values with Display.
        let identity = format!(
            "n1/u-1/7/{}/{}",
            serde_json::json!(e.reason),
            serde_json::json!(e.first_timestamp)
        );
        assert_eq!(
            identity,
            "n1/u-1/7/\"Back\\u001bOff\"/\"2026-12-02T10:00:00Z\""
        );
        let want = format!("web.{}", hex::encode(&Sha256::digest(&identity)[..8]));
        assert_eq!(event_name("n1", "web", &e), want);
    }
}
