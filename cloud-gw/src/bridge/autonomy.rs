//! Autonomy for every pod on an edge node, not only those the webhook could
//! tell apart at creation: a pod bound to an edge node (by the scheduler,
//! whatever selected it; or created while the webhook was down) that still
//! carries the cluster's default not-ready/unreachable bound gets it lifted
//! at once, with the same decision as the webhook
//! ([`admission::tolerations_for`]). The API server allows exactly this on
//! a running pod (tolerations added, or their tolerationSeconds changed),
//! and the node lifecycle controller follows pod updates, so an eviction it
//! had planned for the pod is dropped.
//!
//! Every replica looks (each sees every pod); the patch tests that the
//! tolerations are still those it was decided on, so a replica that comes
//! second, or a pod changed meanwhile, fails the test and is looked at
//! again on its next change or sweep.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Toleration};
use kube::api::{Patch, PatchParams};
use kube::Api;
use serde_json::json;

use super::{admission, lock, Inner};

/// Pods on edge nodes are looked at again this often (what the pod watch
/// saw before the node was known as an edge node, or before the cluster's
/// defaults were learned).
const SWEEP: Duration = Duration::from_secs(30);

/// A pod the watch saw: patch it if it is bound to an edge node with the
/// cluster's default bounds.
pub(crate) fn check(inner: &Arc<Inner>, pod: &Pod) {
    if pod.metadata.deletion_timestamp.is_some() {
        return;
    }
    // Cheap first: every pod change of the cluster passes here.
    let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.as_ref()) else {
        return;
    };
    if !lock(&inner.edge_nodes).contains(node) {
        return;
    }
    let ctx = admission::Context {
        edge_nodes: std::collections::HashSet::from([node.clone()]),
        defaults: *lock(&inner.toleration_defaults),
        opted_out_namespaces: lock(&inner.opted_out).clone(),
    };
    let Some(tolerations) = admission::tolerations_for(pod, &ctx) else {
        return;
    };
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    if !lock(&inner.patching).insert(uid.clone()) {
        return;
    }
    // Only what the patch needs waits for a write slot, not the pod.
    let change = Change {
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        name: pod.metadata.name.clone().unwrap_or_default(),
        old: pod.spec.as_ref().and_then(|s| s.tolerations.clone()),
        new: tolerations,
    };
    let inner = inner.clone();
    tokio::spawn(async move {
        if let Ok(_slot) = inner.api_slots.acquire().await {
            patch(&inner, change).await;
        }
        lock(&inner.patching).remove(&uid);
    });
}

/// A pod's tolerations, as they are and as they should be.
struct Change {
    namespace: String,
    name: String,
    old: Option<Vec<Toleration>>,
    new: Vec<Toleration>,
}

async fn patch(inner: &Inner, c: Change) {
    let (ns, name, tolerations) = (c.namespace, c.name, c.new);
    let p = match c.old {
        Some(old) => json!([
            {"op": "test", "path": "/spec/tolerations", "value": old},
            {"op": "replace", "path": "/spec/tolerations", "value": tolerations},
        ]),
        None => json!([{"op": "add", "path": "/spec/tolerations", "value": tolerations}]),
    };
    let p: json_patch::Patch = match serde_json::from_value(p) {
        Ok(p) => p,
        Err(_) => return,
    };
    let api = Api::<Pod>::namespaced(inner.client.clone(), &ns);
    match api
        .patch(&name, &PatchParams::default(), &Patch::Json::<()>(p))
        .await
    {
        Ok(_) => {
            tracing::info!(
                namespace = ns,
                pod = name,
                "edge pod: the cluster's default not-ready/unreachable bound lifted"
            )
        }
        // Changed meanwhile, or gone: its next change is looked at.
        Err(kube::Error::Api(r)) if matches!(r.code, 404 | 409 | 422) => {}
        Err(e) => {
            tracing::warn!(namespace = ns, pod = name, error = %e, "cannot lift the toleration bound of an edge pod")
        }
    }
}

/// Every pod bound to an edge node, now and then.
pub(crate) async fn sweep(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(SWEEP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let nodes: Vec<String> = lock(&inner.edge_nodes).iter().cloned().collect();
        let pods: Vec<Pod> = {
            let c = lock(&inner.cache);
            nodes.iter().flat_map(|n| c.bounded_pods(n)).collect()
        };
        for p in &pods {
            check(&inner, p);
        }
    }
}
