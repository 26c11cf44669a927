//! The verbs, with the generic registry's semantics (k8s.io/apiserver's
//! `registry/generic/registry.Store`): create with generateName, uid,
//! defaults and admission; update with optimistic concurrency, status
//! subresource isolation and generation; the four patch types; graceful
//! deletion and finalizers; lists with selectors and continue tokens.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{json, Map, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::admission::{self, AdmitReq};
use super::fields;
use super::patch::{json_patch, merge_patch, strategic_merge};
use super::resources::{crd_defs, Registry, ResourceDef};
use super::selector::{labels_of, FieldSelector, LabelSelector};
use super::status::{success, ApiError, ApiResult};
use super::store::{rv_of, Store};
use super::User;

pub struct State {
    pub store: Store,
    pub reg: Registry,
}

pub struct ApiOpts {
    pub bookmark_interval: Duration,
    pub watch_timeout: Duration,
    pub services: HashMap<String, SocketAddr>,
}

pub struct Api {
    state: Mutex<State>,
    pub opts: ApiOpts,
}

/// Per-request facts the verbs need.
pub struct Ctx {
    pub user: User,
    pub query: HashMap<String, String>,
    pub warnings: Vec<String>,
    pub user_agent: String,
}

impl Ctx {
    pub fn q(&self, k: &str) -> Option<&str> {
        self.query
            .get(k)
            .map(String::as_str)
            .filter(|s| !s.is_empty())
    }
    fn dry_run(&self) -> bool {
        self.q("dryRun") == Some("All")
    }
    /// fieldManager, or the user agent's product name, as the real server
    /// defaults it.
    fn manager(&self) -> String {
        match self.q("fieldManager") {
            Some(m) => m.to_string(),
            None => self
                .user_agent
                .split('/')
                .next()
                .filter(|s| !s.is_empty())
                .unwrap_or("unknown")
                .to_string(),
        }
    }
}

pub fn now() -> String {
    let t = OffsetDateTime::now_utc();
    t.replace_nanosecond(0)
        .unwrap_or(t)
        .format(&Rfc3339)
        .unwrap_or_default()
}

fn later(secs: i64) -> String {
    let t = OffsetDateTime::now_utc() + time::Duration::seconds(secs);
    t.replace_nanosecond(0)
        .unwrap_or(t)
        .format(&Rfc3339)
        .unwrap_or_default()
}

fn name_suffix() -> String {
    const ALPHA: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    super::random_bytes::<5>()
        .iter()
        .map(|b| ALPHA[*b as usize % ALPHA.len()] as char)
        .collect()
}

fn meta_str<'a>(o: &'a Value, k: &str) -> &'a str {
    o["metadata"][k].as_str().unwrap_or_default()
}

fn is_dns_subdomain(s: &str) -> bool {
    cloud_gw::pki::valid_node_name(s)
}

fn is_dns_label(s: &str) -> bool {
    !s.contains('.') && is_dns_subdomain(s)
}

const RBAC_GROUP: &str = "rbac.authorization.k8s.io";

/// What path.IsValidPathSegmentName says of a name (RBAC object names).
fn path_segment_name_problem(s: &str) -> Option<&'static str> {
    match s {
        "." => Some("may not be '.'"),
        ".." => Some("may not be '..'"),
        _ if s.contains('/') => Some("may not contain '/'"),
        _ if s.contains('%') => Some("may not contain '%'"),
        _ => None,
    }
}

/// rbac/v1 defaulting: roleRef.apiGroup, and a User or Group subject's
/// apiGroup.
fn rbac_binding_defaults(o: &mut Value) {
    if o["roleRef"].is_object()
        && o["roleRef"]["apiGroup"]
            .as_str()
            .unwrap_or_default()
            .is_empty()
    {
        o["roleRef"]["apiGroup"] = json!(RBAC_GROUP);
    }
    if let Some(subjects) = o.get_mut("subjects").and_then(Value::as_array_mut) {
        for sub in subjects {
            let empty = sub["apiGroup"].as_str().unwrap_or_default().is_empty();
            match sub["kind"].as_str() {
                Some("User" | "Group") if empty => sub["apiGroup"] = json!(RBAC_GROUP),
                _ => {}
            }
        }
    }
}

/// The RBAC validation kube-apiserver does (pkg/apis/rbac/validation):
/// rules name verbs and what they apply to; bindings name a role of a
/// kind they may bind, and that reference never changes.
fn rbac_problems(def: &ResourceDef, o: &Value, old: Option<&Value>) -> Vec<(String, String)> {
    let mut out = vec![];
    let strs = |v: &Value| v.as_array().map_or(0, |a| a.len());
    match def.kind.as_str() {
        "Role" | "ClusterRole" => {
            for (i, r) in o["rules"].as_array().into_iter().flatten().enumerate() {
                let f = format!("rules[{i}]");
                if strs(&r["verbs"]) == 0 {
                    out.push((
                        format!("{f}.verbs"),
                        "Required value: verbs must contain at least one value".into(),
                    ));
                }
                if strs(&r["nonResourceURLs"]) > 0 {
                    if def.namespaced {
                        out.push((
                            format!("{f}.nonResourceURLs"),
                            "Invalid value: namespaced rules cannot apply to non-resource URLs"
                                .into(),
                        ));
                    }
                    if strs(&r["apiGroups"]) > 0 || strs(&r["resources"]) > 0 {
                        out.push((
                            format!("{f}.nonResourceURLs"),
                            "Invalid value: rules cannot apply to both regular resources and non-resource URLs".into(),
                        ));
                    }
                    continue;
                }
                if strs(&r["apiGroups"]) == 0 {
                    out.push((
                        format!("{f}.apiGroups"),
                        "Required value: resource rules must supply at least one api group".into(),
                    ));
                }
                if strs(&r["resources"]) == 0 {
                    out.push((
                        format!("{f}.resources"),
                        "Required value: resource rules must supply at least one resource".into(),
                    ));
                }
            }
        }
        "RoleBinding" | "ClusterRoleBinding" => {
            let rr = &o["roleRef"];
            let group = rr["apiGroup"].as_str().unwrap_or_default();
            if group != RBAC_GROUP {
                out.push((
                    "roleRef.apiGroup".into(),
                    format!("Unsupported value: {group:?}: supported values: \"{RBAC_GROUP}\""),
                ));
            }
            let kind = rr["kind"].as_str().unwrap_or_default();
            let kinds: &[&str] = if def.namespaced {
                &["Role", "ClusterRole"]
            } else {
                &["ClusterRole"]
            };
            if !kinds.contains(&kind) {
                let supported: Vec<String> = kinds.iter().map(|k| format!("{k:?}")).collect();
                out.push((
                    "roleRef.kind".into(),
                    format!(
                        "Unsupported value: {kind:?}: supported values: {}",
                        supported.join(", ")
                    ),
                ));
            }
            let name = rr["name"].as_str().unwrap_or_default();
            if name.is_empty() {
                out.push(("roleRef.name".into(), "Required value".into()));
            } else if let Some(m) = path_segment_name_problem(name) {
                out.push((
                    "roleRef.name".into(),
                    format!("Invalid value: {name:?}: {m}"),
                ));
            }
            for (i, s) in o["subjects"].as_array().into_iter().flatten().enumerate() {
                let f = format!("subjects[{i}]");
                let sname = s["name"].as_str().unwrap_or_default();
                if sname.is_empty() {
                    out.push((format!("{f}.name"), "Required value".into()));
                }
                let group = s["apiGroup"].as_str().unwrap_or_default();
                match s["kind"].as_str().unwrap_or_default() {
                    "ServiceAccount" => {
                        if !group.is_empty() {
                            out.push((
                                format!("{f}.apiGroup"),
                                format!("Unsupported value: {group:?}: supported values: \"\""),
                            ));
                        }
                        if !def.namespaced && s["namespace"].as_str().unwrap_or_default().is_empty()
                        {
                            out.push((format!("{f}.namespace"), "Required value".into()));
                        }
                    }
                    "User" | "Group" => {
                        if group != RBAC_GROUP {
                            out.push((
                                format!("{f}.apiGroup"),
                                format!(
                                    "Unsupported value: {group:?}: supported values: \"{RBAC_GROUP}\""
                                ),
                            ));
                        }
                    }
                    k => out.push((
                        format!("{f}.kind"),
                        format!("Unsupported value: {k:?}: supported values: \"ServiceAccount\", \"User\", \"Group\""),
                    )),
                }
            }
            if let Some(old) = old {
                if old["roleRef"] != o["roleRef"] {
                    out.push((
                        "roleRef".into(),
                        format!("Invalid value: {}: cannot change roleRef", o["roleRef"]),
                    ));
                }
            }
        }
        _ => {}
    }
    out
}

/// Set `path` to `v` unless something is there.
fn default_at(o: &mut Value, path: &[&str], v: Value) {
    let mut cur = o;
    for p in &path[..path.len() - 1] {
        if !cur.is_object() {
            return;
        }
        cur = cur
            .as_object_mut()
            .expect("checked above")
            .entry(p.to_string())
            .or_insert_with(|| json!({}));
    }
    if let Some(m) = cur.as_object_mut() {
        m.entry(path[path.len() - 1].to_string()).or_insert(v);
    }
}

/// Resource lists hold quantities that YAML may give as numbers; the real
/// decoder takes those, k8s-openapi's Quantity wants strings.
fn stringify_quantities(v: &mut Value, in_quantities: bool) {
    match v {
        Value::Object(m) => {
            for (k, child) in m.iter_mut() {
                let q = matches!(
                    k.as_str(),
                    "limits"
                        | "requests"
                        | "capacity"
                        | "allocatable"
                        | "hard"
                        | "used"
                        | "overhead"
                );
                if in_quantities && child.is_number() {
                    *child = Value::String(child.to_string());
                } else {
                    stringify_quantities(child, q);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|e| stringify_quantities(e, false)),
        _ => {}
    }
}

macro_rules! roundtrip {
    ($t:ty, $v:expr) => {{
        let typed: $t = serde_json::from_value($v).map_err(|e| e.to_string())?;
        serde_json::to_value(&typed).map_err(|e| e.to_string())?
    }};
}

/// Decode into the built-in type and back: type errors surface, unknown
/// fields drop, as with the real server's typed decoding.
fn typed(def: &ResourceDef, v: &Value) -> Result<Value, String> {
    use k8s_openapi::api;
    let v = v.clone();
    Ok(match (def.group.as_str(), def.kind.as_str()) {
        ("", "Pod") => roundtrip!(api::core::v1::Pod, v),
        ("", "Node") => roundtrip!(api::core::v1::Node, v),
        ("", "Namespace") => roundtrip!(api::core::v1::Namespace, v),
        ("", "ConfigMap") => roundtrip!(api::core::v1::ConfigMap, v),
        ("", "Secret") => roundtrip!(api::core::v1::Secret, v),
        ("", "Event") => roundtrip!(api::core::v1::Event, v),
        ("", "Service") => roundtrip!(api::core::v1::Service, v),
        ("", "ServiceAccount") => roundtrip!(api::core::v1::ServiceAccount, v),
        ("coordination.k8s.io", "Lease") => roundtrip!(api::coordination::v1::Lease, v),
        ("apps", "Deployment") => roundtrip!(api::apps::v1::Deployment, v),
        ("apps", "ReplicaSet") => roundtrip!(api::apps::v1::ReplicaSet, v),
        ("rbac.authorization.k8s.io", "Role") => roundtrip!(api::rbac::v1::Role, v),
        ("rbac.authorization.k8s.io", "RoleBinding") => roundtrip!(api::rbac::v1::RoleBinding, v),
        ("rbac.authorization.k8s.io", "ClusterRole") => roundtrip!(api::rbac::v1::ClusterRole, v),
        ("rbac.authorization.k8s.io", "ClusterRoleBinding") => {
            roundtrip!(api::rbac::v1::ClusterRoleBinding, v)
        }
        ("admissionregistration.k8s.io", "MutatingWebhookConfiguration") => {
            roundtrip!(api::admissionregistration::v1::MutatingWebhookConfiguration, v)
        }
        ("apiextensions.k8s.io", "CustomResourceDefinition") => roundtrip!(
            k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
            v
        ),
        _ => {
            // Custom resources: no schema here, but metadata is typed.
            let mut v = v;
            let meta = v.get("metadata").cloned().unwrap_or(json!({}));
            let meta = roundtrip!(k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta, meta);
            v["metadata"] = meta;
            v
        }
    })
}

/// Paths in `input` that `output` lost (unknown fields).
fn lost_fields(input: &Value, output: &Value, path: &str, out: &mut Vec<String>) {
    match (input, output) {
        (Value::Object(i), Value::Object(o)) => {
            for (k, v) in i {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match o.get(k) {
                    None if !v.is_null() => out.push(p),
                    Some(ov) => lost_fields(v, ov, &p, out),
                    None => {}
                }
            }
        }
        (Value::Array(i), Value::Array(o)) if i.len() == o.len() => {
            for (n, (a, b)) in i.iter().zip(o).enumerate() {
                lost_fields(a, b, &format!("{path}[{n}]"), out);
            }
        }
        _ => {}
    }
}

/// ((namespace, name) after which to continue, the list's revision).
fn decode_continue(tok: &str) -> ApiResult<(String, u64)> {
    let bad = || ApiError::bad_request("continue key is not valid: illegal base64 data");
    let raw = URL_SAFE_NO_PAD
        .decode(tok.trim_end_matches('='))
        .map_err(|_| bad())?;
    let v: Value = serde_json::from_slice(&raw).map_err(|_| bad())?;
    Ok((
        v["start"].as_str().ok_or_else(bad)?.to_string(),
        v["rv"].as_u64().ok_or_else(bad)?,
    ))
}

fn encode_continue(start: &str, rv: u64) -> String {
    URL_SAFE_NO_PAD.encode(json!({"v": "meta.k8s.io/v1", "rv": rv, "start": start}).to_string())
}

/// Which objects a list or watch wants.
pub struct Filter {
    pub ns: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Filter {
    pub fn new(def: &ResourceDef, ns: Option<&str>, ctx: &Ctx) -> ApiResult<Filter> {
        Ok(Filter {
            ns: ns.map(String::from),
            labels: LabelSelector::parse(ctx.q("labelSelector").unwrap_or_default())?,
            fields: FieldSelector::parse(ctx.q("fieldSelector").unwrap_or_default(), def)?,
        })
    }
    pub fn matches(&self, o: &Value) -> bool {
        self.ns
            .as_deref()
            .is_none_or(|ns| meta_str(o, "namespace") == ns)
            && self.labels.matches(o)
            && self.fields.matches(o)
    }
}

pub struct WatchStart {
    /// Current objects, sent as ADDED (resourceVersion 0 or
    /// sendInitialEvents).
    pub initial: Vec<Arc<Value>>,
    /// Changes after the requested resourceVersion.
    pub replay: Vec<Arc<super::store::Change>>,
    pub rx: Option<tokio::sync::mpsc::UnboundedReceiver<Arc<super::store::Change>>>,
    pub rv: u64,
    /// The requested revision is gone from history: send one ERROR event.
    pub expired: Option<ApiError>,
}

pub enum PatchType {
    Json,
    Merge,
    Strategic,
    Apply,
}

pub struct DeleteOpts {
    pub grace: Option<i64>,
    pub uid: Option<String>,
    pub rv: Option<String>,
}

impl DeleteOpts {
    pub fn parse(body: &[u8], ctx: &Ctx) -> ApiResult<DeleteOpts> {
        let v: Value = if body.iter().all(u8::is_ascii_whitespace) {
            json!({})
        } else {
            serde_json::from_slice(body)
                .map_err(|e| ApiError::bad_request(format!("invalid DeleteOptions: {e}")))?
        };
        let grace =
            match ctx.q("gracePeriodSeconds") {
                Some(g) => Some(g.parse::<i64>().map_err(|_| {
                    ApiError::bad_request(format!("invalid gracePeriodSeconds {g:?}"))
                })?),
                None => v["gracePeriodSeconds"].as_i64(),
            };
        let p = &v["preconditions"];
        Ok(DeleteOpts {
            grace,
            uid: p["uid"].as_str().map(String::from),
            rv: p["resourceVersion"].as_str().map(String::from),
        })
    }
}

impl Api {
    pub fn new(history: usize, opts: ApiOpts) -> Api {
        let mut st = State {
            store: Store::new(history),
            reg: Registry::new(),
        };
        let key = ("".to_string(), "namespaces".to_string());
        for ns in ["default", "kube-node-lease", "kube-public", "kube-system"] {
            st.store.put(
                &key,
                json!({
                    "apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": ns, "uid": super::uuid(), "creationTimestamp": now(),
                                 "labels": {"kubernetes.io/metadata.name": ns}},
                    "spec": {"finalizers": ["kubernetes"]},
                    "status": {"phase": "Active"},
                }),
            );
        }
        Api {
            state: Mutex::new(st),
            opts,
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding it would poison it; the data stays sound
        // (every write is one store call), so go on.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn find(&self, group: &str, version: &str, plural: &str) -> Option<Arc<ResourceDef>> {
        self.lock().reg.find(group, version, plural)
    }

    /// An object as served at `def`'s version.
    pub fn out(def: &ResourceDef, o: &Value) -> Value {
        let mut o = o.clone();
        o["apiVersion"] = json!(def.api_version());
        o["kind"] = json!(def.kind);
        o
    }

    pub fn get(&self, def: &ResourceDef, ns: &str, name: &str) -> ApiResult<Value> {
        let st = self.lock();
        let o = st
            .store
            .get(&def.store_key(), ns, name)
            .ok_or_else(|| ApiError::not_found(&def.group, &def.plural, name))?;
        Ok(Api::out(def, &o))
    }

    /// Matching objects in order, and the list metadata.
    pub fn list(
        &self,
        def: &ResourceDef,
        ns: Option<&str>,
        ctx: &Ctx,
    ) -> ApiResult<(Vec<Value>, Value)> {
        let filter = Filter::new(def, ns, ctx)?;
        let limit: usize = match ctx.q("limit") {
            Some(l) => l
                .parse()
                .map_err(|_| ApiError::bad_request(format!("invalid limit {l:?}")))?,
            None => 0,
        };
        let st = self.lock();
        let (start, list_rv) = match ctx.q("continue") {
            Some(tok) => {
                let (start, rv) = decode_continue(tok)?;
                if rv < st.store.history_start() {
                    return Err(ApiError::expired(
                        "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                    ));
                }
                (Some(start), rv)
            }
            None => (None, st.store.rv()),
        };
        if let (Some(rv), Some("Exact")) = (ctx.q("resourceVersion"), ctx.q("resourceVersionMatch"))
        {
            let rv: u64 = rv
                .parse()
                .map_err(|_| ApiError::bad_request("invalid resource version"))?;
            if rv < st.store.history_start() {
                return Err(ApiError::expired(format!(
                    "too old resource version: {rv} ({})",
                    st.store.history_start()
                )));
            }
        }
        let all = st.store.list(&def.store_key(), ns);
        drop(st);
        let key_of = |o: &Value| format!("{}/{}", meta_str(o, "namespace"), meta_str(o, "name"));
        let mut items = vec![];
        let mut more = None;
        let matching: Vec<&Arc<Value>> = all
            .iter()
            .filter(|o| start.as_ref().is_none_or(|s| key_of(o) > *s))
            .filter(|o| filter.matches(o))
            .collect();
        let total = matching.len();
        for o in matching {
            if limit > 0 && items.len() == limit {
                more = Some(key_of(items.last().expect("limit > 0")));
                break;
            }
            items.push(Api::out(def, o));
        }
        let mut meta = json!({"resourceVersion": list_rv.to_string()});
        if let Some(last) = more {
            meta["continue"] = json!(encode_continue(&last, list_rv));
            meta["remainingItemCount"] = json!(total - items.len());
        }
        Ok((items, meta))
    }

    /// Start a watch: the synthetic ADDED events or the replayed history,
    /// and the live channel, taken under one lock so nothing falls between.
    pub fn watch(&self, def: &ResourceDef, filter: &Filter, ctx: &Ctx) -> ApiResult<WatchStart> {
        let key = def.store_key();
        let mut st = self.lock();
        let current = st.store.rv();
        let rv = ctx.q("resourceVersion").unwrap_or("0");
        let mut start = WatchStart {
            initial: vec![],
            replay: vec![],
            rx: None,
            rv: current,
            expired: None,
        };
        if ctx.q("sendInitialEvents") == Some("true") || rv == "0" {
            start.initial = st
                .store
                .list(&key, filter.ns.as_deref())
                .into_iter()
                .filter(|o| filter.matches(o))
                .collect();
        } else {
            let n: u64 = rv
                .parse()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version {rv:?}")))?;
            match st.store.since(&key, n) {
                Some(changes) => start.replay = changes,
                None => {
                    start.expired = Some(ApiError::expired(format!(
                        "too old resource version: {n} ({})",
                        st.store.history_start()
                    )));
                    return Ok(start);
                }
            }
        }
        start.rx = Some(st.store.watch(&key));
        Ok(start)
    }

    pub fn current_rv(&self) -> u64 {
        self.lock().store.rv()
    }

    /// Check apiVersion/kind against the URL's resource; fill them in.
    fn check_type(def: &ResourceDef, o: &mut Value) -> ApiResult<()> {
        if !o.is_object() {
            return Err(ApiError::bad_request("the body must be a JSON object"));
        }
        if !o["metadata"].is_object() && !o["metadata"].is_null() {
            return Err(ApiError::bad_request("metadata must be an object"));
        }
        if let Some(av) = o["apiVersion"].as_str() {
            let group = av.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
            if group != def.group || (!def.custom() && av != def.api_version()) {
                return Err(ApiError::bad_request(format!(
                    "the API version in the data ({av}) does not match the expected API version ({})",
                    def.api_version()
                )));
            }
        }
        if let Some(k) = o["kind"].as_str() {
            if k != def.kind {
                return Err(ApiError::bad_request(format!(
                    "the kind in the data ({k}) does not match the expected kind ({})",
                    def.kind
                )));
            }
        }
        o["apiVersion"] = json!(def.api_version());
        o["kind"] = json!(def.kind);
        Ok(())
    }

    /// Typed decoding with fieldValidation (Strict fails on unknown
    /// fields, Warn warns, Ignore is silent; all drop them).
    fn decode(def: &ResourceDef, mut o: Value, ctx: &mut Ctx, check: bool) -> ApiResult<Value> {
        stringify_quantities(&mut o, false);
        let out = typed(def, &o).map_err(|e| {
            ApiError::bad_request(format!(
                "{} in version \"{}\" cannot be handled as a {}: {e}",
                def.kind, def.version, def.kind
            ))
        })?;
        if check {
            let mut lost = vec![];
            lost_fields(&o, &out, "", &mut lost);
            if !lost.is_empty() {
                match ctx.q("fieldValidation").unwrap_or("Warn") {
                    "Strict" => {
                        let l: Vec<String> = lost
                            .iter()
                            .map(|p| format!("unknown field \"{p}\""))
                            .collect();
                        return Err(ApiError::bad_request(format!(
                            "strict decoding error: {}",
                            l.join(", ")
                        )));
                    }
                    "Ignore" => {}
                    _ => ctx
                        .warnings
                        .extend(lost.iter().map(|p| format!("unknown field \"{p}\""))),
                }
            }
        }
        Ok(out)
    }

    fn defaults(def: &ResourceDef, o: &mut Value, create: bool) {
        match (def.group.as_str(), def.plural.as_str()) {
            ("", "pods") => pod_defaults(o, create),
            ("", "namespaces") => {
                let name = meta_str(o, "name").to_string();
                o["metadata"]["labels"]["kubernetes.io/metadata.name"] = json!(name);
                default_at(o, &["spec", "finalizers"], json!(["kubernetes"]));
                default_at(o, &["status", "phase"], json!("Active"));
            }
            ("", "secrets") => {
                if let Some(sd) = o.as_object_mut().and_then(|m| m.remove("stringData")) {
                    use base64::engine::general_purpose::STANDARD;
                    for (k, v) in sd.as_object().into_iter().flatten() {
                        o["data"][k] = json!(STANDARD.encode(v.as_str().unwrap_or_default()));
                    }
                }
                default_at(o, &["type"], json!("Opaque"));
            }
            ("", "services") => {
                default_at(o, &["spec", "type"], json!("ClusterIP"));
                default_at(o, &["spec", "sessionAffinity"], json!("None"));
                if let Some(ports) = o
                    .get_mut("spec")
                    .and_then(|s| s.get_mut("ports"))
                    .and_then(Value::as_array_mut)
                {
                    for p in ports {
                        default_at(p, &["protocol"], json!("TCP"));
                        let port = p["port"].clone();
                        default_at(p, &["targetPort"], port);
                    }
                }
            }
            ("apps", "deployments") => {
                default_at(o, &["spec", "replicas"], json!(1));
                default_at(o, &["spec", "revisionHistoryLimit"], json!(10));
                default_at(o, &["spec", "progressDeadlineSeconds"], json!(600));
                default_at(
                    o,
                    &["spec", "strategy"],
                    json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}}),
                );
            }
            ("apps", "replicasets") => default_at(o, &["spec", "replicas"], json!(1)),
            ("rbac.authorization.k8s.io", "rolebindings" | "clusterrolebindings") => {
                rbac_binding_defaults(o)
            }
            ("apiextensions.k8s.io", "customresourcedefinitions") => {
                default_at(o, &["spec", "conversion"], json!({"strategy": "None"}));
                // What the apiextensions controllers inside kube-apiserver
                // set at once: names accepted, established.
                let t = now();
                let storage = o["spec"]["versions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|v| v["storage"] == true)
                    .map(|v| v["name"].clone())
                    .unwrap_or(Value::Null);
                let mut stored = o["status"]["storedVersions"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                if !stored.contains(&storage) {
                    stored.push(storage);
                }
                o["status"] = json!({
                    "acceptedNames": o["spec"]["names"],
                    "conditions": [
                        {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
                         "message": "no conflicts found", "lastTransitionTime": t},
                        {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
                         "message": "the initial names have been accepted", "lastTransitionTime": t},
                    ],
                    "storedVersions": stored,
                });
            }
            _ => {}
        }
    }

    fn validate(def: &ResourceDef, o: &Value, old: Option<&Value>, sub: &str) -> ApiResult<()> {
        let name = meta_str(o, "name");
        let invalid = |f: &str, m: String| {
            Err(ApiError::invalid(
                &def.group,
                &def.kind,
                name,
                &[(f.to_string(), m)],
            ))
        };
        if def.group == RBAC_GROUP {
            // RBAC names are path segments ("system:node" and the like).
            if let Some(m) = path_segment_name_problem(name) {
                return invalid("metadata.name", format!("Invalid value: {name:?}: {m}"));
            }
            let causes = rbac_problems(def, o, old);
            if !causes.is_empty() {
                return Err(ApiError::invalid(&def.group, &def.kind, name, &causes));
            }
        }
        let name_ok = if def.is("", "namespaces") {
            is_dns_label(name)
        } else if def.group == RBAC_GROUP {
            true
        } else {
            is_dns_subdomain(name)
        };
        if !name_ok {
            return invalid(
                "metadata.name",
                format!("Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"),
            );
        }
        if let (Some(old), Some(dt)) = (
            old,
            old.and_then(|o| o["metadata"]["deletionTimestamp"].as_str()),
        ) {
            let _ = dt;
            let before: Vec<&Value> = old["metadata"]["finalizers"]
                .as_array()
                .into_iter()
                .flatten()
                .collect();
            if o["metadata"]["finalizers"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|f| !before.contains(&f))
            {
                return invalid(
                    "metadata.finalizers",
                    "Forbidden: no new finalizers can be added if the object is being deleted"
                        .into(),
                );
            }
        }
        if def.is("", "pods") && sub.is_empty() {
            let cs = o["spec"]["containers"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if cs.is_empty() {
                return invalid("spec.containers", "Required value".into());
            }
            for (i, c) in cs.iter().enumerate() {
                if c["name"].as_str().unwrap_or_default().is_empty() {
                    return invalid(
                        &format!("spec.containers[{i}].name"),
                        "Required value".into(),
                    );
                }
                if c["image"].as_str().unwrap_or_default().is_empty() {
                    return invalid(
                        &format!("spec.containers[{i}].image"),
                        "Required value".into(),
                    );
                }
            }
            if let Some(old) = old {
                let strip = |s: &Value| {
                    let mut s = s.clone();
                    for list in ["containers", "initContainers"] {
                        if let Some(cs) = s.get_mut(list).and_then(Value::as_array_mut) {
                            for c in cs {
                                if let Some(m) = c.as_object_mut() {
                                    m.remove("image");
                                }
                            }
                        }
                    }
                    if let Some(m) = s.as_object_mut() {
                        m.remove("activeDeadlineSeconds");
                        m.remove("tolerations");
                    }
                    s
                };
                if strip(&old["spec"]) != strip(&o["spec"]) {
                    return invalid(
                        "spec",
                        "Forbidden: pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)".into(),
                    );
                }
                let new_tol = o["spec"]["tolerations"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                if old["spec"]["tolerations"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|t| !new_tol.contains(t))
                {
                    return invalid(
                        "spec.tolerations",
                        "Forbidden: existing toleration can not be modified except its tolerationSeconds".into(),
                    );
                }
            }
        }
        if def.is("apiextensions.k8s.io", "customresourcedefinitions") {
            if let Err((f, m)) = crd_defs(o) {
                return invalid(&f, m);
            }
        }
        Ok(())
    }

    /// Labels of a namespace (webhook namespaceSelector).
    fn ns_labels(&self, ns: &str) -> BTreeMap<String, String> {
        let st = self.lock();
        st.store
            .get(&("".into(), "namespaces".into()), "", ns)
            .map(|n| labels_of(&n))
            .unwrap_or_default()
    }

    async fn admit(
        &self,
        def: &ResourceDef,
        sub: &str,
        op: &str,
        obj: Value,
        old: Option<&Value>,
        ctx: &Ctx,
    ) -> ApiResult<Value> {
        // Webhook configurations are never subject to webhooks.
        if def.group == "admissionregistration.k8s.io" {
            return Ok(obj);
        }
        let configs = {
            let st = self.lock();
            st.store.list(
                &(
                    "admissionregistration.k8s.io".into(),
                    "mutatingwebhookconfigurations".into(),
                ),
                None,
            )
        };
        if configs.is_empty() {
            return Ok(obj);
        }
        let name = meta_str(&obj, "name").to_string();
        let ns = meta_str(&obj, "namespace").to_string();
        let req = AdmitReq {
            def,
            sub,
            op,
            name: &name,
            ns: &ns,
            old,
            user: &ctx.user,
            dry_run: ctx.dry_run(),
            ns_labels: self.ns_labels(&ns),
        };
        let out = admission::mutate(&configs, obj, &req, &self.opts.services).await?;
        // What a webhook changed must still decode.
        let mut out = out;
        Api::check_type(def, &mut out).map_err(|e| ApiError::internal(e.message))?;
        let mut quiet = Ctx {
            user: ctx.user.clone(),
            query: HashMap::new(),
            warnings: vec![],
            user_agent: String::new(),
        };
        Api::decode(def, out, &mut quiet, false)
    }

    pub async fn create(
        &self,
        def: &ResourceDef,
        ns: &str,
        mut o: Value,
        ctx: &mut Ctx,
    ) -> ApiResult<(u16, Value)> {
        Api::check_type(def, &mut o)?;
        let body_ns = meta_str(&o, "namespace").to_string();
        if def.namespaced && !body_ns.is_empty() && body_ns != ns {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        let mut o = Api::decode(def, o, ctx, true)?;
        self.create_decoded(def, ns, &mut o, ctx, false).await
    }

    async fn create_decoded(
        &self,
        def: &ResourceDef,
        ns: &str,
        o: &mut Value,
        ctx: &mut Ctx,
        applied: bool,
    ) -> ApiResult<(u16, Value)> {
        let t = now();
        {
            let meta = o["metadata"]
                .as_object_mut()
                .ok_or_else(|| ApiError::bad_request("metadata must be an object"))?;
            if def.namespaced {
                meta.insert("namespace".into(), json!(ns));
            } else {
                meta.remove("namespace");
            }
            for k in [
                "resourceVersion",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "selfLink",
            ] {
                meta.remove(k);
            }
            meta.insert("uid".into(), json!(super::uuid()));
            meta.insert("creationTimestamp".into(), json!(t));
            if def.generation {
                meta.insert("generation".into(), json!(1));
            } else {
                meta.remove("generation");
            }
        }
        let generate = o["metadata"]["generateName"]
            .as_str()
            .map(String::from)
            .filter(|g| !g.is_empty());
        if meta_str(o, "name").is_empty() {
            match &generate {
                Some(g) => o["metadata"]["name"] = json!(format!("{g}{}", name_suffix())),
                None => {
                    return Err(ApiError::invalid(
                        &def.group,
                        &def.kind,
                        "",
                        &[(
                            "metadata.name".into(),
                            "Required value: name or generateName is required".into(),
                        )],
                    ))
                }
            }
        }
        // Status is the controllers' to write, except where the creator is
        // the one reporting it (a kubelet registering its Node).
        if def.status && !def.is("", "nodes") {
            if let Some(m) = o.as_object_mut() {
                m.remove("status");
            }
        }
        Api::defaults(def, o, true);
        Api::validate(def, o, None, "")?;
        if def.namespaced {
            let st = self.lock();
            if st
                .store
                .get(&("".into(), "namespaces".into()), "", ns)
                .is_none()
            {
                return Err(ApiError::not_found("", "namespaces", ns));
            }
        }
        let mut o = self.admit(def, "", "CREATE", o.clone(), None, ctx).await?;
        Api::validate(def, &o, None, "")?;
        if !applied {
            fields::record_update(def, None, &mut o, &ctx.manager(), "", &t);
        }
        if ctx.dry_run() {
            return Ok((201, Api::out(def, &o)));
        }
        let mut st = self.lock();
        let key = def.store_key();
        let mut name = meta_str(&o, "name").to_string();
        if st.store.get(&key, ns, &name).is_some() {
            // A generated name that is taken: pick another, as the real
            // server's clients would have to.
            match &generate {
                Some(g) if !applied => {
                    for _ in 0..8 {
                        name = format!("{g}{}", name_suffix());
                        if st.store.get(&key, ns, &name).is_none() {
                            break;
                        }
                    }
                    o["metadata"]["name"] = json!(name);
                }
                _ => return Err(ApiError::already_exists(&def.group, &def.plural, &name)),
            }
        }
        if def.is("apiextensions.k8s.io", "customresourcedefinitions") {
            let defs = crd_defs(&o)
                .map_err(|(f, m)| ApiError::invalid(&def.group, &def.kind, &name, &[(f, m)]))?;
            st.reg.set_crd(&name, defs).map_err(|m| {
                ApiError::invalid(&def.group, &def.kind, &name, &[("spec.names".into(), m)])
            })?;
        }
        let stored = st.store.put(&key, o);
        Ok((201, Api::out(def, &stored)))
    }

    pub async fn update(
        &self,
        def: &ResourceDef,
        ns: &str,
        name: &str,
        sub: &str,
        mut o: Value,
        ctx: &mut Ctx,
    ) -> ApiResult<(u16, Value)> {
        Api::check_type(def, &mut o)?;
        let body_name = meta_str(&o, "name");
        if body_name != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        let body_ns = meta_str(&o, "namespace");
        if def.namespaced && !body_ns.is_empty() && body_ns != ns {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        let o = Api::decode(def, o, ctx, true)?;
        self.write(def, ns, name, sub, ctx, Write::Put(o)).await
    }

    // The URL's parts, the patch and the request: all needed.
    #[allow(clippy::too_many_arguments)]
    pub async fn patch(
        &self,
        def: &ResourceDef,
        ns: &str,
        name: &str,
        sub: &str,
        pt: PatchType,
        body: &[u8],
        ctx: &mut Ctx,
    ) -> ApiResult<(u16, Value)> {
        let bad = |e: String| ApiError::bad_request(format!("error decoding patch: {e}"));
        let w = match pt {
            PatchType::Apply => {
                let v: Value = serde_yaml_ng::from_slice(body).map_err(|e| bad(e.to_string()))?;
                if ctx.q("fieldManager").is_none() {
                    return Err(ApiError::bad_request(
                        "PATCH with apply requires a fieldManager",
                    ));
                }
                let mut v = v;
                Api::check_type(def, &mut v)?;
                if meta_str(&v, "name") != name {
                    return Err(ApiError::bad_request(format!(
                        "the name of the object ({}) does not match the name on the URL ({name})",
                        meta_str(&v, "name")
                    )));
                }
                let force = ctx.q("force") == Some("true");
                let v = Api::decode(def, v, ctx, true)?;
                Write::Apply(v, force)
            }
            PatchType::Strategic if def.custom() => {
                return Err(ApiError::new(
                    415,
                    "UnsupportedMediaType",
                    "strategic merge patch is not supported for custom resources",
                ))
            }
            pt => {
                let v: Value = serde_json::from_slice(body).map_err(|e| bad(e.to_string()))?;
                Write::Patch(pt, v)
            }
        };
        self.write(def, ns, name, sub, ctx, w).await
    }

    /// Read-modify-write with retries on concurrent changes (unless the
    /// request named a resourceVersion).
    async fn write(
        &self,
        def: &ResourceDef,
        ns: &str,
        name: &str,
        sub: &str,
        ctx: &mut Ctx,
        w: Write,
    ) -> ApiResult<(u16, Value)> {
        let key = def.store_key();
        let t = now();
        let manager = ctx.manager();
        for _ in 0..16 {
            let old = self.lock().store.get(&key, ns, name);
            let Some(old) = old else {
                if let Write::Apply(cfg, force) = &w {
                    let mut o = fields::apply(def, None, cfg, &manager, sub, *force, &t)?;
                    o["apiVersion"] = cfg["apiVersion"].clone();
                    o["kind"] = cfg["kind"].clone();
                    o["metadata"]["name"] = json!(name);
                    return self.create_decoded(def, ns, &mut o, ctx, true).await;
                }
                return Err(ApiError::not_found(&def.group, &def.plural, name));
            };
            let old_out = Api::out(def, &old);
            let new = match &w {
                Write::Put(b) => b.clone(),
                Write::Patch(pt, p) => {
                    let mut cur = old_out.clone();
                    let res = match pt {
                        PatchType::Merge => {
                            merge_patch(&mut cur, p);
                            Ok(())
                        }
                        PatchType::Json => json_patch(&mut cur, p),
                        _ => strategic_merge(def, &cur, p).map(|v| cur = v),
                    };
                    res.map_err(|e| ApiError::new(422, "Invalid", e))?;
                    Api::check_type(def, &mut cur)?;
                    if meta_str(&cur, "name") != name {
                        return Err(ApiError::bad_request(
                            "the name of the object may not change",
                        ));
                    }
                    Api::decode(def, cur, ctx, true)?
                }
                Write::Apply(cfg, force) => {
                    let mut o = fields::apply(def, Some(&old_out), cfg, &manager, sub, *force, &t)?;
                    o["apiVersion"] = json!(def.api_version());
                    o["kind"] = json!(def.kind);
                    // Apply carries no precondition unless it names one.
                    o["metadata"]["resourceVersion"] =
                        match cfg["metadata"]["resourceVersion"].as_str() {
                            Some(rv) => json!(rv),
                            None => old_out["metadata"]["resourceVersion"].clone(),
                        };
                    o
                }
            };
            let want_rv = meta_str(&new, "resourceVersion").to_string();
            if !want_rv.is_empty() && want_rv != meta_str(&old, "resourceVersion") {
                return Err(ApiError::stale(&def.group, &def.plural, name));
            }
            let mut new = prepare_update(def, &old, new, sub);
            Api::defaults(def, &mut new, false);
            Api::validate(def, &new, Some(&old), sub)?;
            if !matches!(w, Write::Apply(..)) {
                fields::record_update(def, Some(&old), &mut new, &manager, sub, &t);
            }
            let mut new = self
                .admit(def, sub, "UPDATE", new, Some(&old_out), ctx)
                .await?;
            // A webhook may not move an object or touch what the server owns.
            new = prepare_update(def, &old, new, sub);
            Api::validate(def, &new, Some(&old), sub)?;
            if ctx.dry_run() {
                return Ok((200, Api::out(def, &new)));
            }
            let mut st = self.lock();
            let cur = st.store.get(&key, ns, name);
            if cur.as_ref().map(|c| rv_of(c)) != Some(rv_of(&old)) {
                if !want_rv.is_empty() {
                    return Err(ApiError::stale(&def.group, &def.plural, name));
                }
                continue;
            }
            if same_content(&old, &new) {
                return Ok((200, old_out));
            }
            let finalized = new["metadata"]["deletionTimestamp"].is_string()
                && new["metadata"]["finalizers"]
                    .as_array()
                    .is_none_or(|f| f.is_empty())
                && new["metadata"]["deletionGracePeriodSeconds"]
                    .as_i64()
                    .unwrap_or(0)
                    == 0;
            if finalized {
                let gone = self.remove_locked(&mut st, def, ns, name);
                return Ok((200, Api::out(def, &gone.unwrap_or(old))));
            }
            if def.is("apiextensions.k8s.io", "customresourcedefinitions") {
                let defs = crd_defs(&new)
                    .map_err(|(f, m)| ApiError::invalid(&def.group, &def.kind, name, &[(f, m)]))?;
                st.reg.set_crd(name, defs).map_err(|m| {
                    ApiError::invalid(&def.group, &def.kind, name, &[("spec.names".into(), m)])
                })?;
            }
            let stored = st.store.put(&key, new);
            return Ok((200, Api::out(def, &stored)));
        }
        Err(ApiError::stale(&def.group, &def.plural, name))
    }

    /// Remove for good, with what goes along: a CRD's custom resources, a
    /// namespace's contents (the namespace controller's work, done at once).
    fn remove_locked(
        &self,
        st: &mut State,
        def: &ResourceDef,
        ns: &str,
        name: &str,
    ) -> Option<Arc<Value>> {
        if def.is("apiextensions.k8s.io", "customresourcedefinitions") {
            if let Some(crd) = st.store.get(&def.store_key(), ns, name) {
                let group = crd["spec"]["group"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                let plural = crd["spec"]["names"]["plural"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                st.reg.remove_crd(name);
                st.store.drop_resource(&(group, plural));
            }
        }
        if def.is("", "namespaces") {
            let namespaced: Vec<_> = st
                .reg
                .all()
                .iter()
                .filter(|d| d.namespaced)
                .map(|d| d.store_key())
                .collect();
            for key in namespaced {
                let names: Vec<String> = st
                    .store
                    .list(&key, Some(name))
                    .iter()
                    .map(|o| meta_str(o, "name").to_string())
                    .collect();
                for n in names {
                    st.store.delete(&key, name, &n);
                }
            }
        }
        st.store.delete(&def.store_key(), ns, name)
    }

    pub fn delete(
        &self,
        def: &ResourceDef,
        ns: &str,
        name: &str,
        opts: &DeleteOpts,
        ctx: &Ctx,
    ) -> ApiResult<(u16, Value)> {
        if def.is("", "namespaces") && matches!(name, "default" | "kube-system" | "kube-public") {
            return Err(ApiError::forbidden(format!(
                "namespaces \"{name}\" is forbidden: this namespace may not be deleted"
            )));
        }
        let mut st = self.lock();
        let key = def.store_key();
        let old = st
            .store
            .get(&key, ns, name)
            .ok_or_else(|| ApiError::not_found(&def.group, &def.plural, name))?;
        let precondition = |what: &str, want: &str, have: &str| {
            ApiError::conflict(
                &def.group,
                &def.plural,
                name,
                &format!("Precondition failed: {what} in precondition: {want}, {what} in object meta: {have}"),
            )
        };
        if let Some(uid) = &opts.uid {
            if uid != meta_str(&old, "uid") {
                return Err(precondition("UID", uid, meta_str(&old, "uid")));
            }
        }
        if let Some(rv) = &opts.rv {
            if rv != meta_str(&old, "resourceVersion") {
                return Err(precondition(
                    "ResourceVersion",
                    rv,
                    meta_str(&old, "resourceVersion"),
                ));
            }
        }
        // Pods on a node go gracefully: the kubelet (here: whoever plays
        // it) finishes with gracePeriodSeconds=0. Unscheduled or finished
        // pods go at once, as in the real pod strategy.
        let mut grace = 0;
        if def.is("", "pods") {
            let phase = old["status"]["phase"].as_str().unwrap_or_default();
            let scheduled = !old["spec"]["nodeName"]
                .as_str()
                .unwrap_or_default()
                .is_empty();
            if scheduled && phase != "Succeeded" && phase != "Failed" {
                grace = opts
                    .grace
                    .or(old["spec"]["terminationGracePeriodSeconds"].as_i64())
                    .unwrap_or(30)
                    .max(0);
            }
        }
        let finalizers = old["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        let pending = old["metadata"]["deletionGracePeriodSeconds"].as_i64();
        if !finalizers && grace == 0 {
            if ctx.dry_run() {
                return Ok((200, Api::out(def, &old)));
            }
            let gone = self.remove_locked(&mut st, def, ns, name).unwrap_or(old);
            return Ok((200, Api::out(def, &gone)));
        }
        // Already being deleted: only a shorter grace period changes it.
        if let Some(p) = pending {
            if grace >= p {
                return Ok((200, Api::out(def, &old)));
            }
        }
        let mut o = (*old).clone();
        if grace > 0 {
            o["metadata"]["deletionTimestamp"] = json!(later(grace));
        } else if o["metadata"]["deletionTimestamp"].is_null() || pending.is_some() {
            o["metadata"]["deletionTimestamp"] = json!(now());
        }
        o["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
        if def.generation {
            let g = o["metadata"]["generation"].as_i64().unwrap_or(1);
            o["metadata"]["generation"] = json!(g + 1);
        }
        if ctx.dry_run() {
            return Ok((200, Api::out(def, &o)));
        }
        let stored = st.store.put(&key, o);
        Ok((200, Api::out(def, &stored)))
    }

    pub fn delete_collection(
        &self,
        def: &ResourceDef,
        ns: Option<&str>,
        opts: &DeleteOpts,
        ctx: &Ctx,
    ) -> ApiResult<(u16, Value)> {
        let mut lctx = Ctx {
            user: ctx.user.clone(),
            query: ctx.query.clone(),
            warnings: vec![],
            user_agent: String::new(),
        };
        lctx.query.remove("limit");
        lctx.query.remove("continue");
        let (items, meta) = self.list(def, ns, &lctx)?;
        let mut out = vec![];
        for o in items {
            match self.delete(
                def,
                meta_str(&o, "namespace"),
                meta_str(&o, "name"),
                opts,
                ctx,
            ) {
                Ok((_, v)) => out.push(v),
                Err(e) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        Ok((
            200,
            json!({"kind": def.list_kind, "apiVersion": def.api_version(), "metadata": meta, "items": out}),
        ))
    }

    /// pods/binding: what a scheduler does to place a pod.
    pub fn bind(&self, ns: &str, name: &str, body: &Value) -> ApiResult<(u16, Value)> {
        let key = ("".to_string(), "pods".to_string());
        let node = body["target"]["name"].as_str().unwrap_or_default();
        if node.is_empty() {
            return Err(ApiError::invalid(
                "",
                "Binding",
                name,
                &[("target.name".into(), "Required value".into())],
            ));
        }
        let mut st = self.lock();
        let pod = st
            .store
            .get(&key, ns, name)
            .ok_or_else(|| ApiError::not_found("", "pods", name))?;
        if let Some(cur) = pod["spec"]["nodeName"].as_str().filter(|n| !n.is_empty()) {
            return Err(ApiError::conflict(
                "",
                "pods",
                name,
                &format!("pod {name} is already assigned to node \"{cur}\""),
            ));
        }
        if pod["metadata"]["deletionTimestamp"].is_string() {
            return Err(ApiError::conflict(
                "",
                "pods",
                name,
                "pod is being deleted, cannot be assigned to a host",
            ));
        }
        let mut p = (*pod).clone();
        p["spec"]["nodeName"] = json!(node);
        let cond = json!({"type": "PodScheduled", "status": "True", "lastProbeTime": null,
                          "lastTransitionTime": now()});
        let mut conds: Vec<Value> = p["status"]["conditions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        conds.retain(|c| c["type"] != "PodScheduled");
        conds.push(cond);
        p["status"]["conditions"] = Value::Array(conds);
        st.store.put(&key, p);
        Ok((201, success(201)))
    }
}

enum Write {
    Put(Value),
    Patch(PatchType, Value),
    Apply(Value, bool),
}

/// Equal but for resourceVersion and managedFields timestamps: a no-op
/// write, which the real server does not store (no new revision).
fn same_content(a: &Value, b: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(m) = v["metadata"].as_object_mut() {
            m.remove("resourceVersion");
            if let Some(Value::Array(mf)) = m.get_mut("managedFields") {
                for e in mf {
                    if let Some(e) = e.as_object_mut() {
                        e.remove("time");
                    }
                }
            }
        }
        v
    };
    strip(a) == strip(b)
}

/// Carry over what a client cannot change; status only through its
/// subresource; generation counts spec changes.
fn prepare_update(def: &ResourceDef, old: &Value, new: Value, sub: &str) -> Value {
    let mut new = if sub == "status" {
        let mut n = old.clone();
        n["status"] = new["status"].clone();
        if let Some(mf) = new["metadata"].get("managedFields") {
            n["metadata"]["managedFields"] = mf.clone();
        }
        if n["status"].is_null() {
            if let Some(m) = n.as_object_mut() {
                m.remove("status");
            }
        }
        n
    } else {
        let mut n = new;
        if def.status {
            match old.get("status") {
                Some(s) => n["status"] = s.clone(),
                None => {
                    if let Some(m) = n.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
        }
        n
    };
    if !new["metadata"].is_object() {
        new["metadata"] = json!({});
    }
    let om = old["metadata"].as_object().cloned().unwrap_or_default();
    let nm = new["metadata"]
        .as_object_mut()
        .expect("made an object above");
    for k in [
        "name",
        "namespace",
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "generation",
        "selfLink",
        "generateName",
    ] {
        match om.get(k) {
            Some(v) => nm.insert(k.into(), v.clone()),
            None => nm.remove(k),
        };
    }
    if nm.get("managedFields").is_none_or(|m| m.is_null()) {
        if let Some(mf) = om.get("managedFields") {
            nm.insert("managedFields".into(), mf.clone());
        }
    }
    nm.insert(
        "resourceVersion".into(),
        om.get("resourceVersion").cloned().unwrap_or(Value::Null),
    );
    if def.generation {
        let body = |v: &Value| {
            let mut m: Map<String, Value> = v.as_object().cloned().unwrap_or_default();
            m.remove("metadata");
            m.remove("status");
            m
        };
        let g = old["metadata"]["generation"].as_i64().unwrap_or(1);
        let bump = body(old) != body(&new);
        new["metadata"]["generation"] = json!(if bump { g + 1 } else { g });
    }
    new
}

fn image_pull_policy(image: &str) -> &'static str {
    let last = image.rsplit('/').next().unwrap_or(image);
    if image.contains('@') {
        return "IfNotPresent";
    }
    match last.split_once(':') {
        Some((_, "latest")) | None => "Always",
        _ => "IfNotPresent",
    }
}

fn qos_class(spec: &Value) -> &'static str {
    let (mut any, mut guaranteed) = (false, true);
    let containers = ["containers", "initContainers"]
        .iter()
        .flat_map(|l| spec[*l].as_array().cloned().unwrap_or_default());
    for c in containers {
        for res in ["cpu", "memory"] {
            let l = &c["resources"]["limits"][res];
            let r = match &c["resources"]["requests"][res] {
                Value::Null => l,
                r => r,
            };
            if !l.is_null() || !r.is_null() {
                any = true;
            }
            if l.is_null() || r != l {
                guaranteed = false;
            }
        }
    }
    if !any {
        "BestEffort"
    } else if guaranteed {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

fn pod_defaults(o: &mut Value, create: bool) {
    if !o["spec"].is_object() {
        return;
    }
    let spec = &mut o["spec"];
    default_at(spec, &["restartPolicy"], json!("Always"));
    default_at(spec, &["dnsPolicy"], json!("ClusterFirst"));
    default_at(spec, &["terminationGracePeriodSeconds"], json!(30));
    default_at(spec, &["schedulerName"], json!("default-scheduler"));
    default_at(spec, &["securityContext"], json!({}));
    default_at(spec, &["enableServiceLinks"], json!(true));
    for list in ["containers", "initContainers"] {
        if let Some(cs) = spec.get_mut(list).and_then(Value::as_array_mut) {
            for c in cs {
                let policy = image_pull_policy(c["image"].as_str().unwrap_or_default());
                default_at(c, &["imagePullPolicy"], json!(policy));
                default_at(
                    c,
                    &["terminationMessagePath"],
                    json!("/dev/termination-log"),
                );
                default_at(c, &["terminationMessagePolicy"], json!("File"));
                default_at(c, &["resources"], json!({}));
                if let Some(ports) = c.get_mut("ports").and_then(Value::as_array_mut) {
                    for p in ports {
                        default_at(p, &["protocol"], json!("TCP"));
                    }
                }
            }
        }
    }
    if create {
        // The Priority and DefaultTolerationSeconds admission plugins,
        // both on by default.
        default_at(spec, &["priority"], json!(0));
        default_at(spec, &["preemptionPolicy"], json!("PreemptLowerPriority"));
        let mut tols = spec["tolerations"].as_array().cloned().unwrap_or_default();
        for key in [
            "node.kubernetes.io/not-ready",
            "node.kubernetes.io/unreachable",
        ] {
            let covered = tols.iter().any(|t| {
                (t["key"] == key || (t["key"].is_null() && t["operator"] == "Exists"))
                    && (t["effect"].is_null() || t["effect"] == "NoExecute")
            });
            if !covered {
                tols.push(json!({"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}));
            }
        }
        spec["tolerations"] = Value::Array(tols);
        let qos = qos_class(&o["spec"]);
        o["status"] = json!({"phase": "Pending", "qosClass": qos});
    }
}
