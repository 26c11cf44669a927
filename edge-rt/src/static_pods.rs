//! Static pod manifests: YAML files (several documents each) in a directory.
//!
//! This is the first, run-once form of standalone mode: each container of
//! each pod is started once, and a restarted edge-rt re-adopts rather than
//! re-runs them. Restart policies, init containers, probes and change
//! tracking belong to the pod reconciler.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use serde::Deserialize;

use crate::image::registry::{self, Progress, PullPolicy, Puller};
use crate::image::ImageStore;
use crate::runtime::{ContainerRequest, PodRef, Runtime, RuntimeError};

/// One manifest document, parsed or not.
pub struct Manifest {
    pub file: PathBuf,
    pub pod: Result<Pod, String>,
}

/// Read every `*.yaml` / `*.yml` file of `dir`, in name order.
pub fn load_dir(dir: &Path) -> Vec<Manifest> {
    let mut files: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(rd) => rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
            .collect(),
        Err(_) => return vec![],
    };
    files.sort();
    let mut out = Vec::new();
    for file in files {
        let text = match fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) => {
                out.push(Manifest {
                    file,
                    pod: Err(e.to_string()),
                });
                continue;
            }
        };
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let value = match serde_yaml_ng::Value::deserialize(doc) {
                Ok(serde_yaml_ng::Value::Null) => continue,
                Ok(v) => v,
                Err(e) => {
                    out.push(Manifest {
                        file: file.clone(),
                        pod: Err(e.to_string()),
                    });
                    break;
                }
            };
            let pod = serde_yaml_ng::from_value::<Pod>(value)
                .map_err(|e| e.to_string())
                .and_then(validate);
            out.push(Manifest {
                file: file.clone(),
                pod,
            });
        }
    }
    out
}

fn validate(pod: Pod) -> Result<Pod, String> {
    if pod.metadata.name.as_deref().unwrap_or("").is_empty() {
        return Err("metadata.name: required".into());
    }
    let spec = pod.spec.as_ref().ok_or("spec: required")?;
    if spec.containers.is_empty() {
        return Err("spec.containers: at least one container is required".into());
    }
    for (i, c) in spec.containers.iter().enumerate() {
        if c.image.as_deref().unwrap_or("").is_empty() {
            return Err(format!("spec.containers[{i}].image: required"));
        }
    }
    Ok(pod)
}

/// A stable uid for a static pod: its own if given, else derived from its
/// namespace and name, so a restarted edge-rt finds its containers again.
pub fn pod_uid(pod: &Pod) -> String {
    if let Some(uid) = pod.metadata.uid.as_ref().filter(|u| !u.is_empty()) {
        return uid.clone();
    }
    let key = format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod.metadata.name.as_deref().unwrap_or("")
    );
    let h = crate::image::sha256_hex(key.as_bytes());
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Start every container of `pod` that has never run. Errors are per
/// container and returned, so one bad pod does not stop the others.
pub async fn start_pod(
    rt: &Arc<Runtime>,
    store: &ImageStore,
    puller: &Puller,
    pod: &Pod,
) -> Vec<(String, String)> {
    let mut errors = Vec::new();
    let Some(spec) = pod.spec.as_ref() else {
        return errors;
    };
    let pref = PodRef {
        uid: pod_uid(pod),
        name: pod.metadata.name.clone().unwrap_or_default(),
        namespace: pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        host_network: spec.host_network.unwrap_or(false),
    };
    let existing: BTreeSet<String> = rt
        .list()
        .into_iter()
        .filter(|r| r.pod.uid == pref.uid)
        .map(|r| r.name)
        .collect();
    for c in &spec.containers {
        if existing.contains(&c.name) {
            continue;
        }
        let image_ref = c.image.clone().unwrap_or_default();
        let policy = PullPolicy::from_k8s(c.image_pull_policy.as_deref(), &image_ref);
        let progress = Progress::default();
        let image = match registry::ensure(store, puller, &image_ref, policy, None, &progress).await
        {
            Ok(i) => i,
            Err(e) => {
                errors.push((c.name.clone(), e.to_string()));
                continue;
            }
        };
        let req = ContainerRequest {
            pod: pref.clone(),
            container: c.clone(),
            pod_security: spec.security_context.clone(),
            image,
            extra_env: vec![],
            mounts: vec![],
            attempt: 0,
        };
        match rt.run(req) {
            Ok(r) => tracing::info!(pod = %pref.name, container = %c.name, id = %r.id, "started"),
            Err(e) => errors.push((c.name.clone(), describe(&e))),
        }
    }
    errors
}

fn describe(e: &RuntimeError) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(x) = src {
        s.push_str(&format!(": {x}"));
        src = x.source();
    }
    s
}
