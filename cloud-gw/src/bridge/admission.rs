//! Autonomy, not eviction: a mutating admission webhook that makes pods
//! bound for edge nodes tolerate `unreachable` and `not-ready` for good.
//!
//! Without it, the API server's DefaultTolerationSeconds plugin gives
//! every pod 300 s of toleration, and five minutes into a cut the node
//! lifecycle controller evicts the edge's pods and recreates them
//! elsewhere, though they are still running on the gateway. Tolerations
//! can only be set when a pod is created, so this must be an admission
//! webhook (on CREATE), run by the standard admission chain after the
//! built-in plugins.
//!
//! A pod counts as bound for the edge when it selects edge nodes (a
//! nodeSelector or required node affinity on `node-role.kubernetes.io/edge`),
//! tolerates the edge taint, or names an edge node in `spec.nodeName`.
//!
//! The cluster's defaults are replaced by unbounded tolerations; any other
//! tolerationSeconds was the user's choice and stays. The defaults are
//! whatever this cluster's admission chain adds (300 s unless the API
//! server's `--default-not-ready-toleration-seconds` and
//! `--default-unreachable-toleration-seconds` say otherwise, and clusters
//! often set 60 or less): cloud-gw learns them by creating a pod without
//! tolerations as a dry run (nothing is stored) and reading what came back
//! ([`probe_defaults`]), at start and every few minutes. A toleration equal
//! to the default it replaces is taken for the default: a user who wants
//! exactly that bound opts out instead. Opting out: the annotation
//! `outrigger.io/autonomy: disabled` on a pod, or the label
//! `outrigger.io/autonomy=disabled` on a namespace (the webhook's
//! namespaceSelector then skips it; the annotation is also checked here).

use std::collections::HashSet;

use k8s_openapi::api::core::v1::{Pod, Toleration};
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use kube::core::DynamicObject;
use serde_json::{json, Value};

use super::nodes::EDGE_ROLE;

/// Annotation (pods) and label (namespaces) that opt out with "disabled"
/// (not "off", which YAML 1.1, as kubectl reads it, turns into false).
pub const AUTONOMY: &str = "outrigger.io/autonomy";
const KEYS: [&str; 2] = [
    "node.kubernetes.io/unreachable",
    "node.kubernetes.io/not-ready",
];

/// The tolerationSeconds the cluster's admission chain gives a pod that
/// has none, per key (DefaultTolerationSeconds: 300 unless configured).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Defaults {
    pub unreachable: Option<i64>,
    pub not_ready: Option<i64>,
}

impl Default for Defaults {
    /// The API server's own, until the cluster's are known.
    fn default() -> Defaults {
        Defaults {
            unreachable: Some(300),
            not_ready: Some(300),
        }
    }
}

impl Defaults {
    fn for_key(&self, key: &str) -> Option<i64> {
        match key {
            "node.kubernetes.io/unreachable" => self.unreachable,
            "node.kubernetes.io/not-ready" => self.not_ready,
            _ => None,
        }
    }

    /// What the admission chain added to a pod created without tolerations.
    pub fn from_admitted(pod: &Pod) -> Defaults {
        let seconds = |key: &str| {
            pod.spec
                .as_ref()?
                .tolerations
                .iter()
                .flatten()
                .find(|t| {
                    t.key.as_deref() == Some(key) && t.effect.as_deref() == Some("NoExecute")
                })?
                .toleration_seconds
        };
        Defaults {
            unreachable: seconds("node.kubernetes.io/unreachable"),
            not_ready: seconds("node.kubernetes.io/not-ready"),
        }
    }
}

/// What the webhook decides with: the edge nodes known now, the
/// cluster's default tolerations, and the namespaces opted out.
#[derive(Debug, Clone, Default)]
pub struct Context {
    pub edge_nodes: HashSet<String>,
    pub defaults: Defaults,
    pub opted_out_namespaces: HashSet<String>,
}

/// Learn the cluster's default tolerations: a pod with none, created in
/// `namespace` as a dry run (admitted, defaulted, not stored), comes back
/// with what the admission chain adds. The probe is as plain as a pod can
/// be and passes the "restricted" Pod Security level.
pub async fn probe_defaults(
    client: kube::Client,
    namespace: &str,
) -> Result<Defaults, kube::Error> {
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "outrigger-toleration-probe-",
                     "labels": {"app.kubernetes.io/name": "cloud-gw-probe"},
                     "annotations": {AUTONOMY: "disabled"}},
        "spec": {
            "automountServiceAccountToken": false,
            "securityContext": {"runAsNonRoot": true, "runAsUser": 65532,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "probe", "image": "probe.invalid/none",
                            "securityContext": {"allowPrivilegeEscalation": false,
                                                "capabilities": {"drop": ["ALL"]}}}]
        }
    }))
    .map_err(kube::Error::SerdeError)?;
    let pp = kube::api::PostParams {
        dry_run: true,
        ..Default::default()
    };
    let admitted = kube::Api::<Pod>::namespaced(client, namespace)
        .create(&pp, &pod)
        .await?;
    Ok(Defaults::from_admitted(&admitted))
}

fn selects_edge(pod: &Pod, edge_nodes: &HashSet<String>) -> bool {
    let Some(spec) = &pod.spec else {
        return false;
    };
    if spec
        .node_selector
        .as_ref()
        .is_some_and(|s| s.contains_key(EDGE_ROLE))
    {
        return true;
    }
    if spec
        .node_name
        .as_ref()
        .is_some_and(|n| edge_nodes.contains(n))
    {
        return true;
    }
    if spec
        .tolerations
        .iter()
        .flatten()
        .any(|t| t.key.as_deref() == Some(EDGE_ROLE))
    {
        return true;
    }
    spec.affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| {
            n.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .is_some_and(|r| {
            r.node_selector_terms.iter().any(|t| {
                t.match_expressions.iter().flatten().any(|e| {
                    e.key == EDGE_ROLE && e.operator != "DoesNotExist" && e.operator != "NotIn"
                })
            })
        })
}

/// Whether a pod's not-ready/unreachable tolerations are bounded (or
/// missing): the only pods [`tolerations_for`] may change.
pub fn bounded(pod: &Pod) -> bool {
    let tolerations = pod.spec.as_ref().and_then(|s| s.tolerations.as_ref());
    KEYS.iter().any(|key| {
        !tolerations.into_iter().flatten().any(|t| {
            t.key.as_deref() == Some(*key)
                && matches!(t.effect.as_deref(), None | Some("NoExecute"))
                && t.toleration_seconds.is_none()
        })
    })
}

/// The pod's tolerations as they should be, if they should change: the
/// cluster's default bounds on not-ready and unreachable lifted (and the
/// two tolerations added, unbounded, if it has none). Only ever a change
/// the API server also allows on a running pod (tolerations added, or their
/// tolerationSeconds changed), so the same answer serves the webhook and
/// pods already bound (`autonomy`).
pub fn tolerations_for(pod: &Pod, ctx: &Context) -> Option<Vec<Toleration>> {
    let edge_nodes = &ctx.edge_nodes;
    let opted_out = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(AUTONOMY))
        .is_some_and(|v| v == "disabled")
        || pod
            .metadata
            .namespace
            .as_ref()
            .is_some_and(|ns| ctx.opted_out_namespaces.contains(ns));
    if opted_out || !selects_edge(pod, edge_nodes) {
        return None;
    }
    let old = pod
        .spec
        .as_ref()
        .and_then(|s| s.tolerations.clone())
        .unwrap_or_default();
    let is_default = |t: &Toleration| {
        let key = t.key.as_deref().unwrap_or("");
        KEYS.contains(&key)
            && t.effect.as_deref() == Some("NoExecute")
            && t.operator.as_deref() == Some("Exists")
            && t.toleration_seconds.is_some()
            && t.toleration_seconds == ctx.defaults.for_key(key)
    };
    let mut new: Vec<Toleration> = old
        .iter()
        .map(|t| match is_default(t) {
            true => Toleration {
                toleration_seconds: None,
                ..t.clone()
            },
            false => t.clone(),
        })
        .collect();
    for key in KEYS {
        let covered = new.iter().any(|t| {
            t.key.as_deref() == Some(key) && matches!(t.effect.as_deref(), None | Some("NoExecute"))
        });
        if !covered {
            new.push(Toleration {
                key: Some(key.to_string()),
                operator: Some("Exists".into()),
                effect: Some("NoExecute".into()),
                toleration_seconds: None,
                value: None,
            });
        }
    }
    (new != old).then_some(new)
}

/// The request of an AdmissionReview, or the refusal that says why it
/// cannot be read.
fn request(body: &[u8]) -> Result<AdmissionRequest<DynamicObject>, Value> {
    let review: AdmissionReview<DynamicObject> = serde_json::from_slice(body).map_err(|e| {
        json!(AdmissionResponse::invalid(format!("not an AdmissionReview: {e}")).into_review())
    })?;
    review
        .try_into()
        .map_err(|e: kube::core::admission::ConvertAdmissionReviewError| {
            json!(AdmissionResponse::invalid(e.to_string()).into_review())
        })
}

/// One AdmissionReview in, its answer out. A request that cannot be read
/// is answered with a refusal saying why.
pub fn review(body: &[u8], ctx: &Context) -> Value {
    let req = match request(body) {
        Ok(r) => r,
        Err(refusal) => return refusal,
    };
    let mut out = json!(AdmissionResponse::from(&req).into_review());
    let pod: Option<Pod> = req
        .object
        .as_ref()
        .and_then(|o| serde_json::to_value(o).ok())
        .and_then(|v| serde_json::from_value(v).ok());
    if let Some(t) = pod.as_ref().and_then(|p| tolerations_for(p, ctx)) {
        let has = pod
            .as_ref()
            .and_then(|p| p.spec.as_ref())
            .is_some_and(|s| s.tolerations.is_some());
        let op = if has { "replace" } else { "add" };
        let patch = json!([{"op": op, "path": "/spec/tolerations", "value": t}]);
        // The wire format is a base64 string ([]byte in Go); kube's
        // response type would write an array of numbers.
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD
            .encode(serde_json::to_vec(&patch).unwrap_or_default());
        out["response"]["patchType"] = "JSONPatch".into();
        out["response"]["patch"] = b64.into();
        tracing::debug!(pod = ?req.name, "edge pod: unreachable/not-ready tolerated for good");
    }
    out
}

/// A Device, checked against its model (`outrigger_proto::device::check`,
/// as the edge checks it): refused with every problem named, or allowed.
/// A device whose model does not exist (yet) is allowed with a warning:
/// its status says so until the model comes.
pub fn review_device(
    body: &[u8],
    model: impl Fn(&str, &str) -> Option<outrigger_proto::device::DeviceModelSpec>,
) -> Value {
    use outrigger_proto::device::{check, Device};
    let req = match request(body) {
        Ok(r) => r,
        Err(refusal) => return refusal,
    };
    let allowed = AdmissionResponse::from(&req);
    // The schema has checked its shape; what does not parse here is the
    // API server's to refuse, not ours.
    let Some(device) = req
        .object
        .as_ref()
        .and_then(|o| serde_json::to_value(o).ok())
        .and_then(|v| serde_json::from_value::<Device>(v).ok())
    else {
        return json!(allowed.into_review());
    };
    let ns = req.namespace.clone().unwrap_or_else(|| "default".into());
    let Some(m) = model(&ns, &device.spec.model) else {
        let mut out = json!(allowed.into_review());
        out["response"]["warnings"] = json!([format!(
            "DeviceModel {ns}/{} does not exist: the device will not run until it does",
            device.spec.model
        )]);
        return out;
    };
    let problems = check(&device.spec, &m);
    if problems.is_empty() {
        return json!(allowed.into_review());
    }
    let reasons: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
    json!(allowed
        .deny(format!(
            "Device {ns}/{} does not fit DeviceModel {}: {}",
            device.metadata.name.as_deref().unwrap_or(""),
            device.spec.model,
            reasons.join("; ")
        ))
        .into_review())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_is_checked_against_its_model() {
        let model: outrigger_proto::device::DeviceModelSpec = serde_json::from_value(json!({
            "properties": [{"name": "setpoint", "type": "float", "access": "ReadWrite", "minimum": 5, "maximum": 30}]
        }))
        .unwrap();
        let review = |desired: &str, model_name: &str| {
            json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
                "uid": "u1", "kind": {"group": "devices.outrigger.io", "version": "v1alpha1", "kind": "Device"},
                "resource": {"group": "devices.outrigger.io", "version": "v1alpha1", "resource": "devices"},
                "operation": "CREATE", "namespace": "plant", "name": "boiler",
                "userInfo": {"username": "admin"},
                "object": {"apiVersion": "devices.outrigger.io/v1alpha1", "kind": "Device",
                    "metadata": {"name": "boiler", "namespace": "plant"},
                    "spec": {"model": model_name, "nodeName": "gw", "protocol": {"mqtt": {}},
                             "properties": [{"name": "setpoint", "desired": desired}]}}}})
            .to_string()
        };
        let find = |ns: &str, n: &str| (ns == "plant" && n == "thermostat").then(|| model.clone());
        let ok = review_device(review("21", "thermostat").as_bytes(), find);
        assert_eq!(ok["response"]["allowed"], true, "{ok}");
        let no = review_device(review("99", "thermostat").as_bytes(), find);
        assert_eq!(no["response"]["allowed"], false, "{no}");
        let msg = no["response"]["status"]["message"].as_str().unwrap();
        assert!(
            msg.contains("spec.properties[0].desired") && msg.contains("above the maximum 30"),
            "{msg}"
        );
        let later = review_device(review("99", "not-yet").as_bytes(), find);
        assert_eq!(later["response"]["allowed"], true);
        assert!(later["response"]["warnings"][0]
            .as_str()
            .unwrap()
            .contains("does not exist"));
    }

    fn pod(spec: Value, annotations: Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "annotations": annotations},
            "spec": spec,
        }))
        .unwrap()
    }

    fn containers() -> Value {
        json!([{"name": "c", "image": "i"}])
    }

    fn ctx(nodes: &[&str], seconds: i64) -> Context {
        Context {
            edge_nodes: nodes.iter().map(|n| n.to_string()).collect(),
            defaults: Defaults {
                unreachable: Some(seconds),
                not_ready: Some(seconds),
            },
            opted_out_namespaces: HashSet::from(["legacy".to_string()]),
        }
    }

    #[test]
    fn edge_pods_get_unbounded_tolerations_and_others_are_left_alone() {
        let nodes = ctx(&["gw-1"], 300);
        // The defaults DefaultTolerationSeconds adds, plus a user's own.
        let defaults = json!([
            {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
            {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
            {"key": "dedicated", "operator": "Equal", "value": "x", "effect": "NoSchedule"}
        ]);
        let by_selector = pod(
            json!({"containers": containers(), "nodeSelector": {EDGE_ROLE: ""}, "tolerations": defaults}),
            json!({}),
        );
        let t = tolerations_for(&by_selector, &nodes).expect("changed");
        assert_eq!(t.len(), 3);
        assert!(t.iter().all(|t| t.toleration_seconds.is_none()));
        assert!(t.iter().any(|t| t.key.as_deref() == Some("dedicated")));
        for k in KEYS {
            assert!(t.iter().any(|t| t.key.as_deref() == Some(k)));
        }
        // Bound by name to an edge node, no tolerations yet (no defaults
        // plugin in front of us): both are added.
        let by_name = pod(
            json!({"containers": containers(), "nodeName": "gw-1"}),
            json!({}),
        );
        assert_eq!(tolerations_for(&by_name, &nodes).unwrap().len(), 2);
        // A cloud pod, an opted-out pod, and a user's own bound: unchanged.
        let cloud = pod(
            json!({"containers": containers(), "nodeName": "worker-3"}),
            json!({}),
        );
        assert!(tolerations_for(&cloud, &nodes).is_none());
        let out = pod(
            json!({"containers": containers(), "nodeName": "gw-1"}),
            json!({AUTONOMY: "disabled"}),
        );
        assert!(tolerations_for(&out, &nodes).is_none());
        let own = pod(
            json!({"containers": containers(), "nodeName": "gw-1", "tolerations": [
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 3600},
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 3600}]}),
            json!({}),
        );
        assert!(tolerations_for(&own, &nodes).is_none());
        // Required node affinity on the edge role.
        let affinity = pod(
            json!({"containers": containers(), "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution":
                {"nodeSelectorTerms": [{"matchExpressions": [{"key": EDGE_ROLE, "operator": "Exists"}]}]}}}}),
            json!({}),
        );
        assert!(tolerations_for(&affinity, &nodes).is_some());
    }

    #[test]
    fn a_review_is_answered_with_a_json_patch_and_garbage_with_a_refusal() {
        let nodes = Context::default();
        let request = json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
                "requestResource": {"group": "", "version": "v1", "resource": "pods"},
                "name": "p", "namespace": "default", "operation": "CREATE",
                "userInfo": {"username": "admin"},
                "object": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                           "spec": {"containers": containers(), "nodeSelector": {EDGE_ROLE: ""}}},
                "dryRun": false
            }
        });
        let out = review(&serde_json::to_vec(&request).unwrap(), &nodes);
        let r = &out["response"];
        assert_eq!(r["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
        assert_eq!(r["allowed"], true);
        assert_eq!(r["patchType"], "JSONPatch");
        use base64::Engine;
        let patch = base64::engine::general_purpose::STANDARD
            .decode(r["patch"].as_str().unwrap())
            .unwrap();
        let patch: Value = serde_json::from_slice(&patch).unwrap();
        assert_eq!(patch[0]["op"], "add");
        assert_eq!(patch[0]["path"], "/spec/tolerations");
        let bad = review_of(b"{not json");
        assert_eq!(bad["response"]["allowed"], false);
    }

    fn review_of(b: &[u8]) -> Value {
        review(b, &Context::default())
    }

    #[test]
    fn the_clusters_own_defaults_are_replaced_whatever_they_are() {
        let with = |seconds: i64| {
            pod(
                json!({"containers": containers(), "nodeName": "gw-1", "tolerations": [
                    {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": seconds},
                    {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": seconds}]}),
                json!({}),
            )
        };
        // A cluster that defaults to 60 s: 60 is its default, 300 a user's.
        let sixty = ctx(&["gw-1"], 60);
        let t = tolerations_for(&with(60), &sixty).expect("defaults replaced");
        assert!(t.iter().all(|t| t.toleration_seconds.is_none()), "{t:?}");
        assert!(tolerations_for(&with(300), &sixty).is_none());
        // A change the API server allows on a running pod: the same
        // tolerations, in the same order, their bound lifted.
        let old = with(60).spec.unwrap().tolerations.unwrap();
        assert_eq!(t.len(), old.len());
        for (a, b) in t.iter().zip(&old) {
            assert_eq!(
                (&a.key, &a.operator, &a.effect),
                (&b.key, &b.operator, &b.effect)
            );
        }
        // In a namespace that opted out: left alone.
        let mut legacy = with(60);
        legacy.metadata.namespace = Some("legacy".into());
        assert!(tolerations_for(&legacy, &sixty).is_none());
        // What a dry-run pod came back with is what is learned.
        assert_eq!(Defaults::from_admitted(&with(45)), ctx(&[], 45).defaults);
        let bare = pod(json!({"containers": containers()}), json!({}));
        let none = Defaults::from_admitted(&bare);
        assert_eq!((none.unreachable, none.not_ready), (None, None));
    }
}
