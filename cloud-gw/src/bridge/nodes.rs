//! Each edge node as an ordinary Node: created at join (or adopted if one
//! of that name exists), its status written from what the edge reports,
//! and while its link is up, the Lease in `kube-node-lease` renewed and
//! the status rewritten with a fresh heartbeat, as a kubelet does. When the
//! link drops both stop, and the cluster's node lifecycle controller marks
//! the node unreachable on its own schedule.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, NodeAddress};
use kube::api::{Patch, PatchParams, PostParams};
use kube::Api;
use outrigger_proto::report::NodeReport;
use serde_json::{json, Value};

use super::{lock, Inner};

/// The label that makes a Node an edge node (and pods select on).
pub const EDGE_ROLE: &str = "node-role.kubernetes.io/edge";
const LEASE_NAMESPACE: &str = "kube-node-lease";
/// A kubelet's: four renewals may be missed before the lease runs out.
const LEASE_SECONDS: i32 = 40;

/// UTC now as the API server writes Time (seconds) or MicroTime.
pub fn timestamp(micros: bool) -> String {
    let now = jiff::Timestamp::now();
    if micros {
        format!("{now:.6}")
    } else {
        format!("{now:.0}")
    }
}

pub(crate) fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(r) if r.code == code)
}

fn labels_for(node: &str, user: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut l = BTreeMap::from([
        (EDGE_ROLE.to_string(), String::new()),
        ("kubernetes.io/hostname".to_string(), node.to_string()),
        ("kubernetes.io/os".to_string(), "linux".to_string()),
    ]);
    l.extend(user.clone());
    l
}

/// Create the Node, or adopt the one of that name (its labels merged with
/// ours). Safe when replicas race: a create that finds it made adopts.
pub(crate) async fn ensure(
    inner: &Inner,
    node: &str,
    labels: &BTreeMap<String, String>,
) -> Result<(), kube::Error> {
    let api = Api::<Node>::all(inner.client.clone());
    let labels = labels_for(node, labels);
    let taints = inner
        .cfg
        .edge_taint
        .then(|| json!([{"key": EDGE_ROLE, "effect": "NoSchedule"}]));
    if api.get_opt(node).await?.is_none() {
        let mut body = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": node, "labels": labels},
            "spec": {},
        });
        if let Some(t) = &taints {
            body["spec"]["taints"] = t.clone();
        }
        let n: Node = serde_json::from_value(body).map_err(kube::Error::SerdeError)?;
        match api.create(&PostParams::default(), &n).await {
            Ok(_) => {
                tracing::info!(node, "Node created");
                return Ok(());
            }
            Err(e) if is_status(&e, 409) => {}
            Err(e) => return Err(e),
        }
    }
    let mut patch = json!({"metadata": {"labels": labels}});
    if let Some(t) = taints {
        patch["spec"] = json!({"taints": t});
    }
    api.patch(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    tracing::info!(node, "existing Node adopted");
    Ok(())
}

/// Write the Node's status from the edge's report: its conditions (plus the
/// pressure conditions a kubelet reports), capacity, allocatable, node info
/// and addresses. Transition times are kept while a condition holds, so
/// the write is stateless and any replica may do it.
pub(crate) async fn write_status(
    inner: &Inner,
    node: &str,
    report: &NodeReport,
) -> Result<(), kube::Error> {
    let api = Api::<Node>::all(inner.client.clone());
    let existing = match api.get_opt(node).await? {
        Some(n) => n,
        None => {
            ensure(inner, node, &BTreeMap::new()).await?;
            api.get(node).await?
        }
    };
    let old: Vec<Value> = existing
        .status
        .as_ref()
        .and_then(|s| serde_json::to_value(&s.conditions).ok())
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default();
    let now = timestamp(false);
    let mut conditions: Vec<Value> = report
        .conditions
        .iter()
        .filter_map(|c| serde_json::to_value(c).ok())
        .collect();
    for (t, reason, msg) in [
        (
            "MemoryPressure",
            "EdgeHasSufficientMemory",
            "edge-rt has sufficient memory available",
        ),
        (
            "DiskPressure",
            "EdgeHasNoDiskPressure",
            "edge-rt has no disk pressure",
        ),
        (
            "PIDPressure",
            "EdgeHasSufficientPID",
            "edge-rt has sufficient PID available",
        ),
    ] {
        if !conditions.iter().any(|c| c["type"] == t) {
            conditions
                .push(json!({"type": t, "status": "False", "reason": reason, "message": msg}));
        }
    }
    for c in conditions.iter_mut() {
        c["lastHeartbeatTime"] = now.clone().into();
        let before = old.iter().find(|o| o["type"] == c["type"]);
        match before {
            Some(o) if o["status"] == c["status"] && o["lastTransitionTime"].is_string() => {
                c["lastTransitionTime"] = o["lastTransitionTime"].clone();
            }
            _ if c["lastTransitionTime"].is_string() => {}
            _ => c["lastTransitionTime"] = now.clone().into(),
        }
    }
    // The kubelet port of this node on this replica (opened now if it has
    // none): the API server and metrics scrapers come here for it.
    let endpoint = inner
        .cfg
        .kubelet
        .as_ref()
        .and_then(|p| match p.endpoint(node) {
            Ok(a) => Some(a),
            Err(e) => {
                tracing::warn!(error = %e, "kubectl logs, exec and top cannot reach this node");
                None
            }
        });
    let mut status = json!({
        "conditions": conditions,
        "daemonEndpoints": {"kubeletEndpoint": {"Port": endpoint.map_or(0, |a| a.port())}},
    });
    // Written always (empty too), so a replica that stops declaring
    // clears what another declared.
    if let (Some(_), Some(p)) = (endpoint, &inner.cfg.kubelet) {
        status["declaredFeatures"] = json!(p.declared_features());
    }
    if !report.capacity.is_empty() {
        status["capacity"] = serde_json::to_value(&report.capacity).unwrap_or_default();
    }
    if !report.allocatable.is_empty() {
        status["allocatable"] = serde_json::to_value(&report.allocatable).unwrap_or_default();
    }
    if let Some(info) = &report.node_info {
        status["nodeInfo"] = serde_json::to_value(info).unwrap_or_default();
    }
    status["addresses"] =
        serde_json::to_value(addresses(endpoint, &report.addresses)).unwrap_or_default();
    api.patch_status(
        node,
        &PatchParams::default(),
        &Patch::Merge(&json!({"status": status})),
    )
    .await?;
    // The architecture is known once the edge reports: label it as a
    // kubelet would, so nodeSelectors on kubernetes.io/arch work.
    let arch = report
        .node_info
        .as_ref()
        .map(|i| i.architecture.as_str())
        .unwrap_or("");
    let labels = existing.metadata.labels.unwrap_or_default();
    if !arch.is_empty() && labels.get("kubernetes.io/arch").map(String::as_str) != Some(arch) {
        let patch = json!({"metadata": {"labels": {"kubernetes.io/arch": arch}}});
        api.patch(node, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }
    Ok(())
}

/// The addresses the cluster may dial for this node. With a kubelet
/// endpoint: this replica's, as Hostname (which the API server tries
/// first) and InternalIP (which metrics-server and Prometheus try first),
/// then the edge's own as ExternalIP, which nothing dials before the
/// others (they are for people: `kubectl get nodes -o wide`). Without
/// one, the edge's own as it reports them. IP addresses only: a name the
/// edge reports would send the API server to its resolver for something
/// that leads nowhere.
pub fn addresses(
    kubelet: Option<std::net::SocketAddr>,
    reported: &[NodeAddress],
) -> Vec<NodeAddress> {
    let at = |t: &str, a: String| NodeAddress {
        type_: t.into(),
        address: a,
    };
    let mut out: Vec<NodeAddress> = Vec::new();
    if let Some(k) = kubelet {
        out.push(at("Hostname", k.ip().to_string()));
        out.push(at("InternalIP", k.ip().to_string()));
    }
    for a in reported
        .iter()
        .filter(|a| matches!(a.type_.as_str(), "InternalIP" | "ExternalIP"))
        .filter(|a| a.address.parse::<std::net::IpAddr>().is_ok())
    {
        let a = match kubelet {
            Some(_) => at("ExternalIP", a.address.clone()),
            None => a.clone(),
        };
        if !out.contains(&a) {
            out.push(a);
        }
    }
    out
}

/// Renew (or create) the node's Lease, as a kubelet does: one update of
/// the Lease as last written (`last`), read again only when that fails on a
/// conflict or there is none yet. A node whose Node object is gone (deleted
/// by hand) is registered again first, as a kubelet re-registers.
async fn renew_lease(
    inner: &Inner,
    node: &str,
    last: &mut Option<Lease>,
) -> Result<(), kube::Error> {
    let api = Api::<Lease>::namespaced(inner.client.clone(), LEASE_NAMESPACE);
    let now = timestamp(true);
    let renewed = |l: &Lease| -> Result<Lease, kube::Error> {
        let mut v = serde_json::to_value(l).map_err(kube::Error::SerdeError)?;
        v["spec"]["renewTime"] = now.clone().into();
        v["spec"]["holderIdentity"] = node.into();
        v["spec"]["leaseDurationSeconds"] = LEASE_SECONDS.into();
        serde_json::from_value(v).map_err(kube::Error::SerdeError)
    };
    if let Some(l) = last.as_ref() {
        match api
            .replace(node, &PostParams::default(), &renewed(l)?)
            .await
        {
            Ok(l) => {
                *last = Some(l);
                return Ok(());
            }
            Err(e) if is_status(&e, 409) || is_status(&e, 404) => *last = None,
            Err(e) => return Err(e),
        }
    }
    if let Some(l) = api.get_opt(node).await? {
        *last = Some(
            api.replace(node, &PostParams::default(), &renewed(&l)?)
                .await?,
        );
        return Ok(());
    }
    let nodes = Api::<Node>::all(inner.client.clone());
    let owner = match nodes.get_opt(node).await? {
        Some(n) => n,
        None => {
            ensure(inner, node, &BTreeMap::new()).await?;
            nodes.get(node).await?
        }
    };
    // Owned by the Node, as a kubelet's: it goes when the Node does.
    let l: Lease = serde_json::from_value(json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": node, "namespace": LEASE_NAMESPACE,
                     "ownerReferences": [{"apiVersion": "v1", "kind": "Node",
                                          "name": node, "uid": owner.metadata.uid}]},
        "spec": {"holderIdentity": node, "leaseDurationSeconds": LEASE_SECONDS,
                 "renewTime": now},
    }))
    .map_err(kube::Error::SerdeError)?;
    *last = Some(api.create(&PostParams::default(), &l).await?);
    Ok(())
}

async fn renew_lease_slotted(
    inner: &Inner,
    node: &str,
    last: &mut Option<Lease>,
) -> Result<(), kube::Error> {
    match inner.api_slots.acquire().await {
        Ok(_slot) => renew_lease(inner, node, last).await,
        Err(_) => Ok(()),
    }
}

/// While a node's link task runs, the node counts as served here (its
/// pods' tokens are kept fresh); when it ends (aborted with the link), its
/// report is forgotten and it no longer counts.
struct Forget(Arc<Inner>, String);

impl Forget {
    fn new(inner: Arc<Inner>, node: String) -> Forget {
        super::pod_tokens::serve(&inner, &node, true);
        Forget(inner, node)
    }
}

impl Drop for Forget {
    fn drop(&mut self) {
        if let Some(p) = &self.0.cfg.kubelet {
            p.left(&self.1);
        }
        lock(&self.0.reports).remove(&self.1);
        super::pod_tokens::serve(&self.0, &self.1, false);
    }
}

/// While the node's link is up: the Lease every `lease_period`, the status
/// again every `status_period` (changes are written as they come).
pub(crate) async fn keep_alive(inner: Arc<Inner>, node: String) {
    let _forget = Forget::new(inner.clone(), node.clone());
    let mut lease = tokio::time::interval(inner.cfg.lease_period);
    lease.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut status = tokio::time::interval(inner.cfg.status_period);
    status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    status.tick().await;
    let mut failing = false;
    let mut last = None;
    loop {
        tokio::select! {
            _ = lease.tick() => match renew_lease_slotted(&inner, &node, &mut last).await {
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!(node, "lease renewed again");
                }
                Ok(()) => {}
                Err(e) => {
                    if !failing {
                        tracing::warn!(node, error = %e, "lease not renewed");
                    }
                    failing = true;
                }
            },
            _ = status.tick() => {
                let report = lock(&inner.reports).get(&node).cloned();
                if let Some(r) = report {
                    let Ok(_slot) = inner.api_slots.acquire().await else {
                        return;
                    };
                    if let Err(e) = write_status(&inner, &node, &r).await {
                        tracing::warn!(node, error = %e, "node status not written");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ip_addresses_reach_the_node() {
        let a = |t: &str, addr: &str| NodeAddress {
            type_: t.into(),
            address: addr.into(),
        };
        let reported = [
            a("InternalIP", "192.168.7.20"),
            a("Hostname", "gw-7"),
            a("InternalIP", "gw-7.local"),
            a("ExternalIP", "2001:db8::7"),
            a("InternalDNS", "gw-7.plant.example"),
        ];
        assert_eq!(
            addresses(None, &reported),
            vec![
                a("InternalIP", "192.168.7.20"),
                a("ExternalIP", "2001:db8::7")
            ]
        );
        assert!(addresses(None, &[]).is_empty());
        // The kubelet endpoint of the replica holding the link comes first;
        // the edge's own are for people only.
        let here = "10.1.2.3:10250".parse().ok();
        assert_eq!(
            addresses(here, &reported),
            vec![
                a("Hostname", "10.1.2.3"),
                a("InternalIP", "10.1.2.3"),
                a("ExternalIP", "192.168.7.20"),
                a("ExternalIP", "2001:db8::7")
            ]
        );
    }
}
