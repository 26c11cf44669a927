//! meta.k8s.io/v1 Table rendering, for `kubectl get`: the columns
//! kube-apiserver's printers give the built-in kinds (priority 1 = only
//! with `-o wide`), CRD additionalPrinterColumns, NAME/AGE otherwise.

use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::resources::ResourceDef;

/// kubectl's duration.HumanDuration.
pub fn human_duration(secs: i64) -> String {
    let s = secs.max(0);
    let (m, h, d) = (s / 60, s / 3600, s / 86400);
    if s < 120 {
        format!("{s}s")
    } else if m < 10 {
        format!("{m}m{}s", s % 60)
    } else if m < 180 {
        format!("{m}m")
    } else if h < 8 {
        format!("{h}h{}m", m % 60)
    } else if h < 48 {
        format!("{h}h")
    } else if h < 24 * 8 {
        format!("{d}d{}h", h % 24)
    } else if h < 24 * 365 * 2 {
        format!("{d}d")
    } else if d < 365 * 8 {
        format!("{}y{}d", d / 365, d % 365)
    } else {
        format!("{}y", d / 365)
    }
}

pub fn age(ts: &Value) -> String {
    match ts
        .as_str()
        .and_then(|s| OffsetDateTime::parse(s, &Rfc3339).ok())
    {
        Some(t) => human_duration((OffsetDateTime::now_utc() - t).whole_seconds()),
        None => "<unknown>".into(),
    }
}

fn col(name: &str, ty: &str, priority: u8) -> Value {
    let format = if name == "Name" { "name" } else { "" };
    json!({"name": name, "type": ty, "format": format, "description": "", "priority": priority})
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn or_none(v: &Value) -> String {
    let t = s(v);
    if t.is_empty() {
        "<none>".into()
    } else {
        t
    }
}

fn len(v: &Value) -> i64 {
    v.as_object().map(|m| m.len()).unwrap_or(0) as i64
}

fn pod_status(p: &Value) -> String {
    let mut reason = s(&p["status"]["phase"]);
    if let Some(r) = p["status"]["reason"].as_str() {
        reason = r.to_string();
    }
    for c in p["status"]["containerStatuses"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if let Some(r) = c["state"]["waiting"]["reason"].as_str() {
            reason = r.to_string();
        } else if let Some(r) = c["state"]["terminated"]["reason"].as_str() {
            reason = r.to_string();
        } else if c["state"]["terminated"].is_object() {
            reason = format!("ExitCode:{}", c["state"]["terminated"]["exitCode"]);
        }
    }
    if p["metadata"]["deletionTimestamp"].is_string() {
        reason = if p["status"]["reason"] == "NodeLost" {
            "Unknown".into()
        } else {
            "Terminating".into()
        };
    }
    reason
}

/// A simple JSONPath (`.a.b[0].c`) as CRD printer columns use.
fn json_path<'a>(obj: &'a Value, path: &str) -> &'a Value {
    let mut v = obj;
    for part in path.trim_start_matches('.').split('.') {
        let (name, idx) = match part.find('[') {
            Some(i) => (
                &part[..i],
                part[i + 1..].trim_end_matches(']').parse::<usize>().ok(),
            ),
            None => (part, None),
        };
        if !name.is_empty() {
            v = &v[name];
        }
        if let Some(i) = idx {
            v = &v[i];
        }
    }
    v
}

/// Column definitions and one row of cells per object.
fn columns(def: &ResourceDef) -> Vec<Value> {
    let age = col("Age", "string", 0);
    let name = col("Name", "string", 0);
    match (def.group.as_str(), def.plural.as_str()) {
        ("", "pods") => vec![
            name,
            col("Ready", "string", 0),
            col("Status", "string", 0),
            col("Restarts", "string", 0),
            age,
            col("IP", "string", 1),
            col("Node", "string", 1),
            col("Nominated Node", "string", 1),
            col("Readiness Gates", "string", 1),
        ],
        ("", "nodes") => vec![
            name,
            col("Status", "string", 0),
            col("Roles", "string", 0),
            age,
            col("Version", "string", 0),
            col("Internal-IP", "string", 1),
            col("External-IP", "string", 1),
            col("OS-Image", "string", 1),
            col("Kernel-Version", "string", 1),
            col("Container-Runtime", "string", 1),
        ],
        ("", "configmaps") => vec![name, col("Data", "integer", 0), age],
        ("", "secrets") => vec![
            name,
            col("Type", "string", 0),
            col("Data", "string", 0),
            age,
        ],
        ("", "namespaces") => vec![name, col("Status", "string", 0), age],
        ("", "events") => vec![
            col("Last Seen", "string", 0),
            col("Type", "string", 0),
            col("Reason", "string", 0),
            col("Object", "string", 0),
            col("Message", "string", 0),
        ],
        ("", "services") => vec![
            name,
            col("Type", "string", 0),
            col("Cluster-IP", "string", 0),
            col("External-IP", "string", 0),
            col("Port(s)", "string", 0),
            age,
        ],
        ("coordination.k8s.io", "leases") => vec![name, col("Holder", "string", 0), age],
        ("apps", "deployments") => vec![
            name,
            col("Ready", "string", 0),
            col("Up-to-date", "string", 0),
            col("Available", "string", 0),
            age,
        ],
        ("apps", "replicasets") => vec![
            name,
            col("Desired", "integer", 0),
            col("Current", "integer", 0),
            col("Ready", "integer", 0),
            age,
        ],
        ("admissionregistration.k8s.io", _) => vec![name, col("Webhooks", "integer", 0), age],
        ("rbac.authorization.k8s.io", "roles" | "clusterroles") => {
            vec![name, col("Created At", "date", 0)]
        }
        ("rbac.authorization.k8s.io", "rolebindings" | "clusterrolebindings") => vec![
            name,
            col("Role", "string", 0),
            age,
            col("Users", "string", 1),
            col("Groups", "string", 1),
            col("ServiceAccounts", "string", 1),
        ],
        ("apiextensions.k8s.io", "customresourcedefinitions") => {
            vec![name, col("Created At", "date", 0)]
        }
        _ => {
            let mut cols = vec![name];
            for c in &def.printer_columns {
                let n = c["name"].as_str().unwrap_or_default();
                let t = c["type"].as_str().unwrap_or("string");
                cols.push(col(n, t, c["priority"].as_u64().unwrap_or(0) as u8));
            }
            if !def.printer_columns.iter().any(|c| c["name"] == "Age") {
                cols.push(age);
            }
            cols
        }
    }
}

fn cells(def: &ResourceDef, o: &Value) -> Vec<Value> {
    let m = &o["metadata"];
    let name = json!(s(&m["name"]));
    let age_cell = json!(age(&m["creationTimestamp"]));
    let st = &o["status"];
    match (def.group.as_str(), def.plural.as_str()) {
        ("", "pods") => {
            let statuses = st["containerStatuses"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let ready = statuses.iter().filter(|c| c["ready"] == true).count();
            let total = o["spec"]["containers"].as_array().map_or(0, |a| a.len());
            let restarts: i64 = statuses
                .iter()
                .map(|c| c["restartCount"].as_i64().unwrap_or(0))
                .sum();
            let gates = o["spec"]["readinessGates"]
                .as_array()
                .map_or(0, |a| a.len());
            vec![
                name,
                json!(format!("{ready}/{total}")),
                json!(pod_status(o)),
                json!(restarts.to_string()),
                age_cell,
                json!(or_none(&st["podIP"])),
                json!(or_none(&o["spec"]["nodeName"])),
                json!(or_none(&st["nominatedNodeName"])),
                json!(if gates == 0 {
                    "<none>".to_string()
                } else {
                    format!("0/{gates}")
                }),
            ]
        }
        ("", "nodes") => {
            let conds = st["conditions"].as_array().cloned().unwrap_or_default();
            let mut status = match conds.iter().find(|c| c["type"] == "Ready") {
                Some(c) if c["status"] == "True" => "Ready".to_string(),
                Some(c) if c["status"] == "False" => "NotReady".to_string(),
                _ => "Unknown".to_string(),
            };
            if o["spec"]["unschedulable"] == true {
                status.push_str(",SchedulingDisabled");
            }
            let mut roles: Vec<String> = m["labels"]
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(|(k, _)| k.strip_prefix("node-role.kubernetes.io/").map(String::from))
                .filter(|r| !r.is_empty())
                .collect();
            roles.sort();
            let addr = |t: &str| {
                st["addresses"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|a| a["type"] == t)
                    .map(|a| s(&a["address"]))
                    .unwrap_or_else(|| "<none>".into())
            };
            let info = &st["nodeInfo"];
            vec![
                name,
                json!(status),
                json!(if roles.is_empty() {
                    "<none>".into()
                } else {
                    roles.join(",")
                }),
                age_cell,
                json!(s(&info["kubeletVersion"])),
                json!(addr("InternalIP")),
                json!(addr("ExternalIP")),
                json!(or_none(&info["osImage"])),
                json!(or_none(&info["kernelVersion"])),
                json!(or_none(&info["containerRuntimeVersion"])),
            ]
        }
        ("", "configmaps") => vec![
            name,
            json!(len(&o["data"]) + len(&o["binaryData"])),
            age_cell,
        ],
        ("", "secrets") => vec![
            name,
            json!(s(&o["type"])),
            json!(len(&o["data"]).to_string()),
            age_cell,
        ],
        ("", "namespaces") => vec![name, json!(s(&st["phase"])), age_cell],
        ("", "events") => {
            let last = [
                &o["lastTimestamp"],
                &o["eventTime"],
                &m["creationTimestamp"],
            ]
            .into_iter()
            .find(|v| v.is_string())
            .cloned()
            .unwrap_or(Value::Null);
            let io = &o["involvedObject"];
            vec![
                json!(age(&last)),
                json!(s(&o["type"])),
                json!(s(&o["reason"])),
                json!(format!(
                    "{}/{}",
                    s(&io["kind"]).to_lowercase(),
                    s(&io["name"])
                )),
                json!(s(&o["message"])),
            ]
        }
        ("", "services") => {
            let ports: Vec<String> = o["spec"]["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| {
                    format!(
                        "{}/{}",
                        s(&p["port"]),
                        p["protocol"].as_str().unwrap_or("TCP")
                    )
                })
                .collect();
            vec![
                name,
                json!(o["spec"]["type"].as_str().unwrap_or("ClusterIP")),
                json!(or_none(&o["spec"]["clusterIP"])),
                json!("<none>"),
                json!(if ports.is_empty() {
                    "<none>".into()
                } else {
                    ports.join(",")
                }),
                age_cell,
            ]
        }
        ("coordination.k8s.io", "leases") => {
            vec![name, json!(s(&o["spec"]["holderIdentity"])), age_cell]
        }
        ("apps", "deployments") => {
            let n = |v: &Value| v.as_i64().unwrap_or(0);
            vec![
                name,
                json!(format!(
                    "{}/{}",
                    n(&st["readyReplicas"]),
                    n(&o["spec"]["replicas"])
                )),
                json!(n(&st["updatedReplicas"])),
                json!(n(&st["availableReplicas"])),
                age_cell,
            ]
        }
        ("apps", "replicasets") => {
            let n = |v: &Value| v.as_i64().unwrap_or(0);
            vec![
                name,
                json!(n(&o["spec"]["replicas"])),
                json!(n(&st["replicas"])),
                json!(n(&st["readyReplicas"])),
                age_cell,
            ]
        }
        ("admissionregistration.k8s.io", _) => vec![
            name,
            json!(o["webhooks"].as_array().map_or(0, |a| a.len())),
            age_cell,
        ],
        ("apiextensions.k8s.io", "customresourcedefinitions")
        | ("rbac.authorization.k8s.io", "roles" | "clusterroles") => {
            vec![name, m["creationTimestamp"].clone()]
        }
        ("rbac.authorization.k8s.io", "rolebindings" | "clusterrolebindings") => {
            // rbac.SubjectsStrings.
            let (mut users, mut groups, mut sas) = (vec![], vec![], vec![]);
            for sub in o["subjects"].as_array().into_iter().flatten() {
                let n = s(&sub["name"]);
                match sub["kind"].as_str() {
                    Some("User") => users.push(n),
                    Some("Group") => groups.push(n),
                    Some("ServiceAccount") => sas.push(format!("{}/{n}", s(&sub["namespace"]))),
                    _ => {}
                }
            }
            let rr = &o["roleRef"];
            vec![
                name,
                json!(format!("{}/{}", s(&rr["kind"]), s(&rr["name"]))),
                age_cell,
                json!(users.join(", ")),
                json!(groups.join(", ")),
                json!(sas.join(", ")),
            ]
        }
        _ => {
            let mut out = vec![name];
            for c in &def.printer_columns {
                let v = json_path(o, c["jsonPath"].as_str().unwrap_or_default());
                out.push(if c["type"] == "date" {
                    json!(age(v))
                } else {
                    v.clone()
                });
            }
            if !def.printer_columns.iter().any(|c| c["name"] == "Age") {
                out.push(age_cell);
            }
            out
        }
    }
}

pub fn partial(def: &ResourceDef, o: &Value) -> Value {
    let _ = def;
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": o["metadata"],
    })
}

/// A Table of `objs`. `include` is includeObject: None, Metadata
/// (default) or Object.
pub fn table(def: &ResourceDef, objs: &[&Value], include: &str, list_meta: Value) -> Value {
    let rows: Vec<Value> = objs
        .iter()
        .map(|o| {
            let mut row = json!({"cells": cells(def, o)});
            match include {
                "None" => {}
                "Object" => row["object"] = (*o).clone(),
                _ => row["object"] = partial(def, o),
            }
            row
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": list_meta,
        "columnDefinitions": columns(def),
        "rows": rows,
    })
}
