//! What the server serves: built-in resources and those CRDs add, with the
//! facts discovery publishes and the per-type knowledge the generic storage
//! needs (status subresource, generation, list merge strategies).

use std::sync::Arc;

use serde_json::Value;

pub const VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

#[derive(Debug, Clone)]
pub struct ResourceDef {
    pub group: String,
    pub version: String,
    pub plural: String,
    pub singular: String,
    pub kind: String,
    pub list_kind: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    /// Has a status subresource: the main resource ignores `.status`.
    pub status: bool,
    /// metadata.generation counts spec changes.
    pub generation: bool,
    /// Only some verbs (selfsubjectreviews: create).
    pub verbs: Vec<&'static str>,
    /// The CRD that defines it (custom resources only).
    pub crd: Option<String>,
    /// CRD additionalPrinterColumns for tables.
    pub printer_columns: Vec<Value>,
}

/// Storage identity: all versions of a resource share one store, as the
/// real server keeps one storage version per group-resource.
pub type StoreKey = (String, String);

impl ResourceDef {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
    pub fn store_key(&self) -> StoreKey {
        (self.group.clone(), self.plural.clone())
    }
    pub fn custom(&self) -> bool {
        self.crd.is_some()
    }
    pub fn has_verb(&self, v: &str) -> bool {
        self.verbs.contains(&v)
    }
    /// Pods are the only built-in kind deleted gracefully.
    pub fn is(&self, group: &str, plural: &str) -> bool {
        self.group == group && self.plural == plural
    }
}

#[allow(clippy::too_many_arguments)]
fn def(
    group: &str,
    version: &str,
    plural: &str,
    kind: &str,
    namespaced: bool,
    short: &[&str],
    status: bool,
    generation: bool,
) -> ResourceDef {
    ResourceDef {
        group: group.into(),
        version: version.into(),
        plural: plural.into(),
        singular: kind.to_lowercase(),
        kind: kind.into(),
        list_kind: format!("{kind}List"),
        namespaced,
        short_names: short.iter().map(|s| s.to_string()).collect(),
        categories: vec![],
        status,
        generation,
        verbs: VERBS.to_vec(),
        crd: None,
        printer_columns: vec![],
    }
}

pub fn builtins() -> Vec<ResourceDef> {
    let all = |mut d: ResourceDef| {
        d.categories = vec!["all".into()];
        d
    };
    let mut ssr = def(
        "authentication.k8s.io",
        "v1",
        "selfsubjectreviews",
        "SelfSubjectReview",
        false,
        &[],
        false,
        false,
    );
    ssr.verbs = vec!["create"];
    vec![
        def(
            "",
            "v1",
            "namespaces",
            "Namespace",
            false,
            &["ns"],
            true,
            false,
        ),
        def("", "v1", "nodes", "Node", false, &["no"], true, false),
        all(def("", "v1", "pods", "Pod", true, &["po"], true, false)),
        def(
            "",
            "v1",
            "configmaps",
            "ConfigMap",
            true,
            &["cm"],
            false,
            false,
        ),
        def("", "v1", "secrets", "Secret", true, &[], false, false),
        def("", "v1", "events", "Event", true, &["ev"], false, false),
        all(def(
            "",
            "v1",
            "services",
            "Service",
            true,
            &["svc"],
            true,
            false,
        )),
        def(
            "",
            "v1",
            "serviceaccounts",
            "ServiceAccount",
            true,
            &["sa"],
            false,
            false,
        ),
        def(
            "coordination.k8s.io",
            "v1",
            "leases",
            "Lease",
            true,
            &[],
            false,
            false,
        ),
        all(def(
            "apps",
            "v1",
            "deployments",
            "Deployment",
            true,
            &["deploy"],
            true,
            true,
        )),
        all(def(
            "apps",
            "v1",
            "replicasets",
            "ReplicaSet",
            true,
            &["rs"],
            true,
            true,
        )),
        def(
            "rbac.authorization.k8s.io",
            "v1",
            "roles",
            "Role",
            true,
            &[],
            false,
            false,
        ),
        def(
            "rbac.authorization.k8s.io",
            "v1",
            "rolebindings",
            "RoleBinding",
            true,
            &[],
            false,
            false,
        ),
        def(
            "rbac.authorization.k8s.io",
            "v1",
            "clusterroles",
            "ClusterRole",
            false,
            &[],
            false,
            false,
        ),
        def(
            "rbac.authorization.k8s.io",
            "v1",
            "clusterrolebindings",
            "ClusterRoleBinding",
            false,
            &[],
            false,
            false,
        ),
        def(
            "admissionregistration.k8s.io",
            "v1",
            "mutatingwebhookconfigurations",
            "MutatingWebhookConfiguration",
            false,
            &[],
            false,
            true,
        ),
        def(
            "apiextensions.k8s.io",
            "v1",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            false,
            &["crd", "crds"],
            true,
            true,
        ),
        ssr,
    ]
}

/// The resources a CRD defines, one per served version; Err names the
/// invalid field.
pub fn crd_defs(crd: &Value) -> Result<Vec<ResourceDef>, (String, String)> {
    let bad = |f: &str, m: &str| Err((f.to_string(), m.to_string()));
    let spec = &crd["spec"];
    let group = spec["group"].as_str().unwrap_or_default();
    let names = &spec["names"];
    let plural = names["plural"].as_str().unwrap_or_default();
    let kind = names["kind"].as_str().unwrap_or_default();
    if group.is_empty() {
        return bad("spec.group", "Required value");
    }
    if plural.is_empty() {
        return bad("spec.names.plural", "Required value");
    }
    if kind.is_empty() {
        return bad("spec.names.kind", "Required value");
    }
    let name = crd["metadata"]["name"].as_str().unwrap_or_default();
    if name != format!("{plural}.{group}") {
        return bad(
            "metadata.name",
            "must be spec.names.plural+\".\"+spec.group",
        );
    }
    let scope = spec["scope"].as_str().unwrap_or_default();
    if scope != "Namespaced" && scope != "Cluster" {
        return bad(
            "spec.scope",
            "Unsupported value: supported values: \"Cluster\", \"Namespaced\"",
        );
    }
    let strs = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let versions = spec["versions"].as_array().cloned().unwrap_or_default();
    if versions.is_empty() {
        return bad(
            "spec.versions",
            "Required value: must have exactly one version marked as storage version",
        );
    }
    if versions.iter().filter(|v| v["storage"] == true).count() != 1 {
        return bad(
            "spec.versions",
            "Invalid value: must have exactly one version marked as storage version",
        );
    }
    let mut out = vec![];
    for v in versions {
        if v["served"] != true {
            continue;
        }
        let version = v["name"].as_str().unwrap_or_default();
        if version.is_empty() {
            return bad("spec.versions[].name", "Required value");
        }
        out.push(ResourceDef {
            group: group.into(),
            version: version.into(),
            plural: plural.into(),
            singular: names["singular"]
                .as_str()
                .map(String::from)
                .unwrap_or_else(|| kind.to_lowercase()),
            kind: kind.into(),
            list_kind: names["listKind"]
                .as_str()
                .map(String::from)
                .unwrap_or_else(|| format!("{kind}List")),
            namespaced: scope == "Namespaced",
            short_names: strs(&names["shortNames"]),
            categories: strs(&names["categories"]),
            status: v["subresources"]["status"].is_object(),
            generation: true,
            verbs: VERBS.to_vec(),
            crd: Some(name.to_string()),
            printer_columns: v["additionalPrinterColumns"]
                .as_array()
                .cloned()
                .unwrap_or_default(),
        });
    }
    Ok(out)
}

/// Everything served, built-in first, then CRDs in creation order.
#[derive(Default)]
pub struct Registry {
    defs: Vec<Arc<ResourceDef>>,
}

impl Registry {
    pub fn new() -> Registry {
        Registry {
            defs: builtins().into_iter().map(Arc::new).collect(),
        }
    }

    pub fn all(&self) -> &[Arc<ResourceDef>] {
        &self.defs
    }

    pub fn find(&self, group: &str, version: &str, plural: &str) -> Option<Arc<ResourceDef>> {
        self.defs
            .iter()
            .find(|d| d.group == group && d.version == version && d.plural == plural)
            .cloned()
    }

    /// Groups in discovery order with their versions (preferred first).
    pub fn groups(&self) -> Vec<(String, Vec<String>)> {
        let mut out: Vec<(String, Vec<String>)> = vec![];
        for d in &self.defs {
            match out.iter_mut().find(|(g, _)| *g == d.group) {
                Some((_, vs)) => {
                    if !vs.contains(&d.version) {
                        vs.push(d.version.clone())
                    }
                }
                None => out.push((d.group.clone(), vec![d.version.clone()])),
            }
        }
        out
    }

    pub fn in_group_version(&self, group: &str, version: &str) -> Vec<Arc<ResourceDef>> {
        self.defs
            .iter()
            .filter(|d| d.group == group && d.version == version)
            .cloned()
            .collect()
    }

    /// Replace what a CRD defines. Err when another resource has the names.
    pub fn set_crd(&mut self, crd: &str, defs: Vec<ResourceDef>) -> Result<(), String> {
        for d in &defs {
            if let Some(other) = self.defs.iter().find(|o| {
                o.crd.as_deref() != Some(crd) && o.group == d.group && o.plural == d.plural
            }) {
                return Err(format!(
                    "{}.{} is already served",
                    other.plural, other.group
                ));
            }
        }
        self.remove_crd(crd);
        self.defs.extend(defs.into_iter().map(Arc::new));
        Ok(())
    }

    pub fn remove_crd(&mut self, crd: &str) {
        self.defs.retain(|d| d.crd.as_deref() != Some(crd));
    }
}

/// How a list field merges in strategic merge patch and server-side apply.
#[derive(Debug, Clone, PartialEq)]
pub enum ListKind {
    /// Replaced whole (no patch strategy; every list of a custom resource).
    Atomic,
    /// Merged by this key (patchMergeKey / listMapKey).
    Map(&'static str),
    /// A set of scalars merged by value (metadata.finalizers).
    Set,
}

/// The patch strategy of a built-in type's list field, from the tags in
/// k8s.io/api. `path` is the field path from the object root without list
/// indices, e.g. ["spec", "containers", "ports"].
pub fn list_kind(def: &ResourceDef, path: &[&str]) -> ListKind {
    if def.custom() {
        return ListKind::Atomic;
    }
    let Some(field) = path.last() else {
        return ListKind::Atomic;
    };
    let in_container = path[..path.len() - 1]
        .iter()
        .any(|p| matches!(*p, "containers" | "initContainers" | "ephemeralContainers"));
    match *field {
        "finalizers" if path.len() == 2 && path[0] == "metadata" => ListKind::Set,
        "ownerReferences" if path[0] == "metadata" => ListKind::Map("uid"),
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "volumes"
        | "imagePullSecrets"
        | "resourceClaims"
        | "schedulingGates"
            if !in_container =>
        {
            ListKind::Map("name")
        }
        "env" if in_container => ListKind::Map("name"),
        "volumeMounts" if in_container => ListKind::Map("mountPath"),
        "volumeDevices" if in_container => ListKind::Map("devicePath"),
        "ports" if in_container => ListKind::Map("containerPort"),
        "ports" if def.kind == "Service" && path == ["spec", "ports"] => ListKind::Map("port"),
        "webhooks" if def.kind == "MutatingWebhookConfiguration" && path.len() == 1 => {
            ListKind::Map("name")
        }
        "conditions" => ListKind::Map("type"),
        "addresses" if def.kind == "Node" => ListKind::Map("type"),
        "podIPs" | "hostIPs" => ListKind::Map("ip"),
        "hostAliases" => ListKind::Map("ip"),
        "topologySpreadConstraints" => ListKind::Map("topologyKey"),
        _ => ListKind::Atomic,
    }
}

/// Fields a field selector may name, beyond metadata.name/namespace.
pub fn selectable_fields(def: &ResourceDef) -> &'static [&'static str] {
    match (def.group.as_str(), def.plural.as_str()) {
        ("", "pods") => &[
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ],
        ("", "events") => &[
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
        ],
        ("", "secrets") => &["type"],
        ("", "nodes") => &["spec.unschedulable"],
        ("", "namespaces") => &["status.phase"],
        ("apps", "replicasets") => &["status.replicas"],
        _ => &[],
    }
}
