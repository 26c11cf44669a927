//! A container's environment from envFrom and env[].valueFrom, as the
//! kubelet resolves it: configMapKeyRef, secretKeyRef, fieldRef and
//! resourceFieldRef. Plain `value` entries (and their `$(VAR)` references)
//! are the runtime's; this module hands it the resolved rest.

use k8s_openapi::api::core::v1::{Container, EnvVarSource, Pod, ResourceFieldSelector};

use super::source::{config_map_data, secret_data, Objects};
use crate::runtime::spec::{bytes, cpu_millis};

/// What the pod's downward API can see about where it runs.
#[derive(Debug, Clone, Default)]
pub struct Placement {
    pub node_name: String,
    pub host_ip: Option<String>,
    pub pod_ip: Option<String>,
    /// Node capacity, the default for resourceFieldRef without a limit.
    pub node_cpu_millis: i64,
    pub node_memory_bytes: i64,
}

impl Placement {
    /// This machine: its hostname, CPUs and memory.
    pub fn of_this_node() -> Placement {
        let node_name = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_default();
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let mem_kb: i64 = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            })
            .unwrap_or(0);
        // The source address of the default route, found without sending
        // anything: what the node is reached by (None when offline at start).
        let host_ip = std::net::UdpSocket::bind("0.0.0.0:0")
            .and_then(|s| s.connect("192.0.2.1:9").and_then(|_| s.local_addr()))
            .ok()
            .map(|a| a.ip())
            .filter(|ip| !ip.is_unspecified() && !ip.is_loopback())
            .map(|ip| ip.to_string());
        Placement {
            node_name,
            host_ip,
            pod_ip: None,
            node_cpu_millis: cpus as i64 * 1000,
            node_memory_bytes: mem_kb * 1024,
        }
    }
}

/// The value of a `fieldRef` path.
pub fn field(pod: &Pod, path: &str, at: &Placement) -> Result<String, String> {
    let m = &pod.metadata;
    let map_entry = |map: &Option<std::collections::BTreeMap<String, String>>, rest: &str| {
        let k = rest
            .strip_prefix("['")
            .and_then(|r| r.strip_suffix("']"))
            .ok_or_else(|| format!("fieldRef {path}: use ['key']"))?;
        Ok::<String, String>(
            map.as_ref()
                .and_then(|m| m.get(k))
                .cloned()
                .unwrap_or_default(),
        )
    };
    Ok(match path {
        "metadata.name" => m.name.clone().unwrap_or_default(),
        "metadata.namespace" => m.namespace.clone().unwrap_or_else(|| "default".into()),
        "metadata.uid" => m.uid.clone().unwrap_or_default(),
        "spec.nodeName" => at.node_name.clone(),
        "spec.serviceAccountName" => pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into()),
        "status.hostIP" | "status.hostIPs" => at.host_ip.clone().unwrap_or_default(),
        "status.podIP" | "status.podIPs" => at.pod_ip.clone().unwrap_or_default(),
        p if p.starts_with("metadata.labels") => {
            map_entry(&m.labels, &p["metadata.labels".len()..])?
        }
        p if p.starts_with("metadata.annotations") => {
            map_entry(&m.annotations, &p["metadata.annotations".len()..])?
        }
        other => return Err(format!("fieldRef {other} is not supported")),
    })
}

/// A resourceFieldRef: the container's limit or request, in divisor units
/// (rounded up, as the kubelet does).
pub fn resource(
    c: &Container,
    r: &ResourceFieldSelector,
    at: &Placement,
) -> Result<String, String> {
    let res = c.resources.clone().unwrap_or_default();
    let (limits, requests) = (
        res.limits.unwrap_or_default(),
        res.requests.unwrap_or_default(),
    );
    let e = |x: crate::runtime::RuntimeError| x.to_string();
    let div = r.divisor.as_ref();
    match r.resource.as_str() {
        "limits.cpu" | "requests.cpu" => {
            let q = if r.resource == "limits.cpu" {
                limits.get("cpu")
            } else {
                requests.get("cpu")
            };
            let m = match q {
                Some(q) => cpu_millis(q).map_err(e)?,
                None if r.resource == "limits.cpu" => at.node_cpu_millis,
                None => 0,
            };
            let d = div
                .map(cpu_millis)
                .transpose()
                .map_err(e)?
                .unwrap_or(1000)
                .max(1);
            Ok(((m + d - 1) / d).to_string())
        }
        "limits.memory"
        | "requests.memory"
        | "limits.ephemeral-storage"
        | "requests.ephemeral-storage" => {
            let name = r.resource.split_once('.').map(|x| x.1).unwrap_or("");
            let q = if r.resource.starts_with("limits") {
                limits.get(name)
            } else {
                requests.get(name)
            };
            let b = match q {
                Some(q) => bytes(q).map_err(e)?,
                None if r.resource == "limits.memory" => at.node_memory_bytes,
                None => 0,
            };
            let d = div.map(bytes).transpose().map_err(e)?.unwrap_or(1).max(1);
            Ok(((b + d - 1) / d).to_string())
        }
        other => Err(format!("resourceFieldRef {other} is not supported")),
    }
}

fn value_from(
    src: &EnvVarSource,
    pod: &Pod,
    c: &Container,
    objects: &Objects,
    at: &Placement,
) -> Result<Option<String>, String> {
    let ns = super::namespace(pod);
    if let Some(r) = &src.config_map_key_ref {
        let optional = r.optional.unwrap_or(false);
        let Some(cm) = objects.config_map(ns, &r.name) else {
            return if optional {
                Ok(None)
            } else {
                Err(format!("configmap \"{}\" not found", r.name))
            };
        };
        return match config_map_data(&cm).remove(&r.key) {
            Some(v) => Ok(Some(String::from_utf8_lossy(&v).into_owned())),
            None if optional => Ok(None),
            None => Err(format!(
                "couldn't find key {} in ConfigMap {ns}/{}",
                r.key, r.name
            )),
        };
    }
    if let Some(r) = &src.secret_key_ref {
        let optional = r.optional.unwrap_or(false);
        let Some(s) = objects.secret(ns, &r.name) else {
            return if optional {
                Ok(None)
            } else {
                Err(format!("secret \"{}\" not found", r.name))
            };
        };
        return match secret_data(&s).remove(&r.key) {
            Some(v) => Ok(Some(String::from_utf8_lossy(&v).into_owned())),
            None if optional => Ok(None),
            None => Err(format!(
                "couldn't find key {} in Secret {ns}/{}",
                r.key, r.name
            )),
        };
    }
    if let Some(f) = &src.field_ref {
        return field(pod, &f.field_path, at).map(Some);
    }
    if let Some(r) = &src.resource_field_ref {
        return resource(c, r, at).map(Some);
    }
    Err("valueFrom has no source".into())
}

/// envFrom entries, then every env entry with valueFrom, resolved. An Err
/// is a CreateContainerConfigError.
pub fn resolve(
    pod: &Pod,
    c: &Container,
    objects: &Objects,
    at: &Placement,
) -> Result<Vec<(String, String)>, String> {
    let ns = super::namespace(pod);
    let mut out = Vec::new();
    for from in c.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let entries = if let Some(r) = &from.config_map_ref {
            match objects.config_map(ns, &r.name) {
                Some(cm) => config_map_data(&cm),
                None if r.optional.unwrap_or(false) => continue,
                None => return Err(format!("configmap \"{}\" not found", r.name)),
            }
        } else if let Some(r) = &from.secret_ref {
            match objects.secret(ns, &r.name) {
                Some(s) => secret_data(&s),
                None if r.optional.unwrap_or(false) => continue,
                None => return Err(format!("secret \"{}\" not found", r.name)),
            }
        } else {
            continue;
        };
        for (k, v) in entries {
            let name = format!("{prefix}{k}");
            // The kubelet skips keys that are not valid variable names.
            if name.is_empty() || name.contains('=') || name.as_bytes()[0].is_ascii_digit() {
                continue;
            }
            out.push((name, String::from_utf8_lossy(&v).into_owned()));
        }
    }
    for e in c.env.iter().flatten() {
        if let Some(src) = &e.value_from {
            if let Some(v) =
                value_from(src, pod, c, objects, at).map_err(|m| format!("env {}: {m}", e.name))?
            {
                out.push((e.name.clone(), v));
            }
        }
    }
    Ok(out)
}
