//! `cloud-gw manifests`: everything a cluster needs to run cloud-gw, for
//! `kubectl apply -f -`: the device CRDs ([`crate::crds`]), its namespace
//! and service account, RBAC with
//! least privilege, the Deployment, the Services (the webhook's, and the
//! edges' way in), and the webhook configurations: mutating (edge pods'
//! tolerations) and validating (a Device against its model), of one name.
//!
//! The webhook's caBundle is left out: the link CA does not exist until
//! the first replica starts, and cloud-gw writes it into the configuration
//! itself at start (see [`inject_ca_bundle`]).

use serde_json::{json, Value};

/// The Secret holding the CA and tokens, and the webhook configuration.
pub const SECRET: &str = "cloud-gw-pki";
pub const WEBHOOK_CONFIG: &str = "outrigger-cloud-gw";
const NAME: &str = "cloud-gw";

#[derive(Debug, Clone)]
pub struct Options {
    pub namespace: String,
    pub image: String,
    pub replicas: u32,
    /// Names edges reach cloud-gw by (for its serving certificate).
    pub sans: Vec<String>,
}

fn labels() -> Value {
    json!({"app.kubernetes.io/name": NAME, "app.kubernetes.io/part-of": "outrigger"})
}

/// The documents, in the order they can be applied.
pub fn documents(o: &Options) -> Vec<Value> {
    let ns = o.namespace.as_str();
    let meta = |name: &str| json!({"name": name, "namespace": ns, "labels": labels()});
    let webhook_host = format!("{NAME}.{ns}.svc");
    let mut sans = o.sans.clone();
    if !sans.contains(&webhook_host) {
        sans.push(webhook_host);
    }
    let mut args = vec![
        "run".to_string(),
        format!("--secret={ns}/{SECRET}"),
        "--listen=0.0.0.0:7443".into(),
        "--webhook-listen=0.0.0.0:8443".into(),
        "--http-listen=0.0.0.0:9090".into(),
        // A kubelet port per edge node served by the replica (the kernel's
        // ephemeral ports; --kubelet-ports=FROM-TO for a range a network
        // policy can name).
        "--kubelet-listen=0.0.0.0".into(),
        format!("--webhook-config={WEBHOOK_CONFIG}"),
    ];
    args.extend(sans.iter().map(|s| format!("--san={s}")));
    let mut docs = crate::crds::definitions();
    docs.extend([
        json!({"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": ns, "labels": {"outrigger.io/autonomy": "disabled"}}}),
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(NAME)}),
        // Cluster-wide: what a kubelet needs toward the API server for many
        // nodes (pods bound to edge nodes, what they use, Node objects,
        // Events), and the one webhook configuration it keeps a CA in.
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": "outrigger:cloud-gw", "labels": labels()},
        "rules": [
          {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch", "create", "patch"]},
          {"apiGroups": [""], "resources": ["nodes/status"], "verbs": ["patch"]},
          // patch: the toleration bound lifted on pods bound to edge nodes.
          {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "delete", "patch"]},
          {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]},
          {"apiGroups": [""], "resources": ["pods/status"], "verbs": ["patch"]},
          {"apiGroups": [""], "resources": ["configmaps", "secrets", "services"], "verbs": ["get", "list", "watch"]},
          {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
          // Tokens for edge pods' projected serviceAccountToken volumes.
          {"apiGroups": [""], "resources": ["serviceaccounts/token"], "verbs": ["create"]},
          {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]},
          // Devices bound to edge nodes and their models down; status up.
          {"apiGroups": [outrigger_proto::device::GROUP], "resources": ["devices", "devicemodels"],
           "verbs": ["get", "list", "watch"]},
          {"apiGroups": [outrigger_proto::device::GROUP], "resources": ["devices/status"], "verbs": ["patch"]},
          // A desired value an operator set at the gateway, into the spec.
          {"apiGroups": [outrigger_proto::device::GROUP], "resources": ["devices"], "verbs": ["patch"]},
          // The kubelet endpoint authenticates and authorizes the API
          // server (and metrics scrapers) as a kubelet does: through the
          // API server (what the system:auth-delegator role grants).
          {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
          {"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"], "verbs": ["create"]},
          {"apiGroups": ["admissionregistration.k8s.io"],
           "resources": ["mutatingwebhookconfigurations", "validatingwebhookconfigurations"],
           "resourceNames": [WEBHOOK_CONFIG], "verbs": ["get", "patch"]}
        ]}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
               "metadata": {"name": "outrigger:cloud-gw", "labels": labels()},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "outrigger:cloud-gw"},
               "subjects": [{"kind": "ServiceAccount", "name": NAME, "namespace": ns}]}),
        // Node leases live in one namespace: renewed there only.
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
               "metadata": {"name": "outrigger:cloud-gw", "namespace": "kube-node-lease", "labels": labels()},
               "rules": [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                          "verbs": ["get", "create", "update"]}]}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": {"name": "outrigger:cloud-gw", "namespace": "kube-node-lease", "labels": labels()},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "outrigger:cloud-gw"},
               "subjects": [{"kind": "ServiceAccount", "name": NAME, "namespace": ns}]}),
        // The cluster's client CA, which signed the API server's kubelet
        // client certificate: the role the API server made for this.
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": {"name": "outrigger:cloud-gw:auth-reader", "namespace": "kube-system", "labels": labels()},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                           "name": "extension-apiserver-authentication-reader"},
               "subjects": [{"kind": "ServiceAccount", "name": NAME, "namespace": ns}]}),
        // Its own Secret: created once, then updated (tokens) by name only;
        // and pods in its own namespace as dry runs only (nothing is
        // stored): how it learns the cluster's default tolerations.
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": meta("outrigger:cloud-gw"),
        "rules": [
          {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
          {"apiGroups": [""], "resources": ["secrets"], "resourceNames": [SECRET], "verbs": ["update"]},
          {"apiGroups": [""], "resources": ["pods"], "verbs": ["create"]}
        ]}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": meta("outrigger:cloud-gw"),
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "outrigger:cloud-gw"},
               "subjects": [{"kind": "ServiceAccount", "name": NAME, "namespace": ns}]}),
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta(NAME),
        "spec": {
          "replicas": o.replicas,
          "selector": {"matchLabels": {"app.kubernetes.io/name": NAME}},
          "template": {
            "metadata": {"labels": labels()},
            "spec": {
              "serviceAccountName": NAME,
              "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
                                  "seccompProfile": {"type": "RuntimeDefault"}},
              // Never on an edge node, tainted or not: cloud-gw is what
              // edge nodes reach the cluster through. Replicas apart.
              "affinity": {
                "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                  {"matchExpressions": [{"key": crate::bridge::nodes::EDGE_ROLE, "operator": "DoesNotExist"}]}]}},
                "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
                  "weight": 100,
                  "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                      "labelSelector": {"matchLabels": {"app.kubernetes.io/name": NAME}}}}]}
              },
              "containers": [{
                "name": NAME, "image": o.image, "args": args,
                // What this replica writes into the Nodes whose links it
                // holds: the API server reaches their kubelet API here.
                // With the apiVersion the API server would default, so a
                // server-side apply over a client-side one does not conflict.
                "env": [{"name": "POD_IP",
                         "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "status.podIP"}}}],
                "ports": [{"name": "edge", "containerPort": 7443}, {"name": "webhook", "containerPort": 8443},
                          {"name": "metrics", "containerPort": 9090}],
                "readinessProbe": {"httpGet": {"path": "/readyz", "port": "metrics"}, "periodSeconds": 5},
                "livenessProbe": {"httpGet": {"path": "/healthz", "port": "metrics"}, "periodSeconds": 10},
                "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "512Mi"}},
                "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                                    "capabilities": {"drop": ["ALL"]}}
              }]
            }
          }
        }}),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": meta(NAME),
               "spec": {"selector": {"app.kubernetes.io/name": NAME},
                        "ports": [{"name": "webhook", "port": 443, "targetPort": "webhook"},
                                  {"name": "metrics", "port": 9090, "targetPort": "metrics"}]}}),
        // The edges' way in: any replica serves any node.
        json!({"apiVersion": "v1", "kind": "Service", "metadata": meta("cloud-gw-edge"),
               "spec": {"type": "LoadBalancer", "selector": {"app.kubernetes.io/name": NAME},
                        "ports": [{"name": "edge", "port": 7443, "targetPort": "edge"}]}}),
        json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": WEBHOOK_CONFIG, "labels": labels()},
        "webhooks": [{
          "name": "edge-autonomy.outrigger.io",
          "clientConfig": {"service": {"name": NAME, "namespace": ns, "path": "/mutate-pods", "port": 443}},
          // Whole, with the scope the API server would default: rules is
          // an atomic list, and a server-side apply over a client-side one
          // conflicts on any difference from what is stored.
          "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"],
                     "scope": "*"}],
          "namespaceSelector": {"matchExpressions": [
            {"key": "outrigger.io/autonomy", "operator": "NotIn", "values": ["disabled"]}]},
          // Pod creation must not hang on cloud-gw: without it a pod
          // is created with the default 300 s tolerations.
          "failurePolicy": "Ignore",
          "sideEffects": "None",
          "admissionReviewVersions": ["v1"],
          "timeoutSeconds": 5,
          "reinvocationPolicy": "IfNeeded"
        }]}),
        json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": WEBHOOK_CONFIG, "labels": labels()},
        "webhooks": [{
          "name": "devices.outrigger.io",
          "clientConfig": {"service": {"name": NAME, "namespace": ns, "path": "/validate-devices", "port": 443}},
          "rules": [{"operations": ["CREATE", "UPDATE"], "apiGroups": [outrigger_proto::device::GROUP],
                     "apiVersions": [outrigger_proto::device::VERSION], "resources": ["devices"], "scope": "*"}],
          // Without cloud-gw a device is still applied: its node checks it
          // with the same code and says what is wrong in its status.
          "failurePolicy": "Ignore",
          "sideEffects": "None",
          "admissionReviewVersions": ["v1"],
          "timeoutSeconds": 5
        }]}),
    ]);
    docs
}

/// The documents as one YAML stream.
pub fn yaml(o: &Options) -> Result<String, serde_yaml_ng::Error> {
    let mut out = String::new();
    for d in documents(o) {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(&d)?);
    }
    Ok(out)
}

/// Write the link CA into the webhook configurations of that name
/// (mutating and validating, every webhook in them), so the API server
/// trusts the webhooks' serving certificate. Absent configurations:
/// nothing to do (the webhooks are optional). True if there was one.
///
/// A server-side apply of the caBundle fields alone, as field manager
/// `cloud-gw`: the rest of the configuration stays the manifests' (applied
/// with kubectl client-side or server-side), so neither kind of apply
/// conflicts with this write, nor removes it.
pub async fn inject_ca_bundle(
    client: kube::Client,
    name: &str,
    ca_pem: &str,
) -> Result<bool, kube::Error> {
    use base64::Engine;
    use k8s_openapi::api::admissionregistration::v1::{
        MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
    };
    let bundle = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let patch = |kind: &str, names: Vec<String>| {
        let hooks: Vec<Value> = names
            .into_iter()
            .map(|n| json!({"name": n, "clientConfig": {"caBundle": bundle}}))
            .collect();
        json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": kind,
            "metadata": {"name": name},
            "webhooks": hooks,
        })
    };
    let pp = kube::api::PatchParams::apply(FIELD_MANAGER).force();
    let apply = kube::api::Patch::Apply;
    let mut any = false;
    let m = kube::Api::<MutatingWebhookConfiguration>::all(client.clone());
    if let Some(c) = m.get_opt(name).await? {
        let names = c
            .webhooks
            .iter()
            .flatten()
            .map(|h| h.name.clone())
            .collect();
        m.patch(
            name,
            &pp,
            &apply(patch("MutatingWebhookConfiguration", names)),
        )
        .await?;
        any = true;
    }
    let v = kube::Api::<ValidatingWebhookConfiguration>::all(client);
    if let Some(c) = v.get_opt(name).await? {
        let names = c
            .webhooks
            .iter()
            .flatten()
            .map(|h| h.name.clone())
            .collect();
        v.patch(
            name,
            &pp,
            &apply(patch("ValidatingWebhookConfiguration", names)),
        )
        .await?;
        any = true;
    }
    Ok(any)
}

/// cloud-gw's name as a field manager (server-side apply).
pub const FIELD_MANAGER: &str = "cloud-gw";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_manifests_parse_back_and_grant_no_more_than_needed() {
        let o = Options {
            namespace: "outrigger-system".into(),
            image: "cloud-gw:test".into(),
            replicas: 2,
            sans: vec!["edge.example.com".into()],
        };
        let text = yaml(&o).unwrap();
        let docs: Vec<Value> = serde_yaml_ng::Deserializer::from_str(&text)
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .collect();
        let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
        for k in [
            "CustomResourceDefinition",
            "Namespace",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "Deployment",
            "Service",
            "MutatingWebhookConfiguration",
            "ValidatingWebhookConfiguration",
        ] {
            assert!(kinds.contains(&k), "{k} missing");
        }
        // No wildcards, and no write access to Secrets beyond its own.
        for d in &docs {
            for r in d["rules"].as_array().into_iter().flatten() {
                assert!(!r.to_string().contains('*'), "{r}");
                let writes = r["verbs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|v| v == "update" || v == "patch");
                if r["resources"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|x| x == "secrets")
                    && writes
                {
                    assert_eq!(r["resourceNames"], json!([SECRET]));
                }
            }
        }
        let args = docs.iter().find(|d| d["kind"] == "Deployment").unwrap()["spec"]["template"]
            ["spec"]["containers"][0]["args"]
            .to_string();
        assert!(
            args.contains("--san=cloud-gw.outrigger-system.svc"),
            "{args}"
        );
        assert!(args.contains("--san=edge.example.com"), "{args}");
    }
}
