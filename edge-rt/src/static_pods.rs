//! Static pod manifests: YAML files (several documents each) in a
//! directory, the source of desired pods in standalone mode.
//!
//! Every document is parsed and validated on its own: a bad one is reported
//! with its file, document and field, and the others still run. As the
//! kubelet does for static pods, a pod's uid is a hash of its namespace,
//! name and content, so an edited manifest is a new pod (the old one stops)
//! and an unchanged one keeps its uid across edge-rt restarts (its running
//! containers are re-adopted, not restarted).

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use outrigger_proto::device::{Device, DeviceModel};
use serde::Deserialize;

/// What a manifest document may hold: pods, the ConfigMaps and Secrets
/// they use, and devices with their models.
#[derive(Debug, Clone)]
pub enum Object {
    Pod(Box<Pod>),
    ConfigMap(ConfigMap),
    Secret(Secret),
    Device(Box<Device>),
    DeviceModel(DeviceModel),
}

impl Object {
    pub fn kind(&self) -> outrigger_proto::kinds::Kind {
        use outrigger_proto::kinds::Kind;
        match self {
            Object::Pod(_) => Kind::Pod,
            Object::ConfigMap(_) => Kind::ConfigMap,
            Object::Secret(_) => Kind::Secret,
            Object::Device(_) => Kind::Device,
            Object::DeviceModel(_) => Kind::DeviceModel,
        }
    }

    pub fn metadata(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        match self {
            Object::Pod(p) => &p.metadata,
            Object::ConfigMap(c) => &c.metadata,
            Object::Secret(s) => &s.metadata,
            Object::Device(d) => &d.metadata,
            Object::DeviceModel(m) => &m.metadata,
        }
    }

    pub fn to_json(&self) -> Result<serde_json::Value, serde_json::Error> {
        match self {
            Object::Pod(p) => serde_json::to_value(p),
            Object::ConfigMap(c) => serde_json::to_value(c),
            Object::Secret(s) => serde_json::to_value(s),
            Object::Device(d) => serde_json::to_value(d),
            Object::DeviceModel(m) => serde_json::to_value(m),
        }
    }
}

/// One manifest document, parsed or not.
pub struct Manifest {
    pub file: PathBuf,
    /// 1-based document number within the file.
    pub doc: usize,
    pub object: Result<Object, String>,
}

impl Manifest {
    /// `file` or `file (document N)`, for messages.
    pub fn place(&self) -> String {
        if self.doc > 1 {
            format!("{} (document {})", self.file.display(), self.doc)
        } else {
            self.file.display().to_string()
        }
    }
}

fn is_manifest(p: &Path) -> bool {
    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
    // Editors' swap and backup files, and hidden files, are not manifests.
    !name.starts_with('.') && p.extension().is_some_and(|e| e == "yaml" || e == "yml")
}

/// Read every `*.yaml` / `*.yml` file of `dir`, in name order. A missing
/// directory is no pods.
pub fn load_dir(dir: &Path) -> Vec<Manifest> {
    let mut files: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(rd) => rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| is_manifest(p))
            .collect(),
        Err(_) => return vec![],
    };
    files.sort();
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for file in files {
        let text = match fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) => {
                out.push(Manifest {
                    file,
                    doc: 1,
                    object: Err(e.to_string()),
                });
                continue;
            }
        };
        for (i, doc) in serde_yaml_ng::Deserializer::from_str(&text).enumerate() {
            let value = match serde_yaml_ng::Value::deserialize(doc) {
                Ok(serde_yaml_ng::Value::Null) => continue,
                Ok(v) => v,
                Err(e) => {
                    // A YAML syntax error ends the file's stream.
                    out.push(Manifest {
                        file: file.clone(),
                        doc: i + 1,
                        object: Err(e.to_string()),
                    });
                    break;
                }
            };
            let object = parse(value).and_then(|o| {
                let (kind, meta) = (o.kind().as_str(), o.metadata());
                let key = (
                    kind,
                    meta.namespace.clone().unwrap_or_default(),
                    meta.name.clone().unwrap_or_default(),
                );
                if seen.insert(key) {
                    Ok(o)
                } else {
                    Err(format!(
                        "metadata.name: {kind} {} is defined twice",
                        meta.name.as_deref().unwrap_or("")
                    ))
                }
            });
            out.push(Manifest {
                file: file.clone(),
                doc: i + 1,
                object,
            });
        }
    }
    out
}

/// One document to a validated pod with its static uid.
fn typed<T: serde::de::DeserializeOwned>(v: serde_yaml_ng::Value) -> Result<T, String> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        format!("{path}: {}", e.inner())
    })
}

/// As [`typed`], through JSON: our own kinds use externally tagged enums
/// (`protocol: {modbus: ...}`), which YAML values read only as YAML tags.
fn typed_json<T: serde::de::DeserializeOwned>(v: serde_yaml_ng::Value) -> Result<T, String> {
    let j = serde_json::to_value(&v).map_err(|e| e.to_string())?;
    serde_path_to_error::deserialize(j).map_err(|e| {
        let path = e.path().to_string();
        format!("{path}: {}", e.inner())
    })
}

fn named(
    meta: &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Result<(), String> {
    let name = meta.name.as_deref().unwrap_or("");
    if !dns_subdomain(name) {
        return Err(format!("metadata.name: {name:?} is not a valid name"));
    }
    meta.namespace.get_or_insert_with(|| "default".into());
    Ok(())
}

/// One document to a validated object (a pod with its static uid).
pub fn parse(v: serde_yaml_ng::Value) -> Result<Object, String> {
    let kind = v
        .get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or("")
        .to_string();
    match kind.as_str() {
        "Pod" => {}
        "ConfigMap" => {
            let mut c: ConfigMap = typed(v)?;
            named(&mut c.metadata)?;
            return Ok(Object::ConfigMap(c));
        }
        "Secret" => {
            let mut s: Secret = typed(v)?;
            named(&mut s.metadata)?;
            return Ok(Object::Secret(s));
        }
        "Device" | "DeviceModel" => {
            let api = v.get("apiVersion").and_then(|a| a.as_str()).unwrap_or("");
            if api != outrigger_proto::device::API_VERSION {
                return Err(format!(
                    "apiVersion: {kind} is {:?}, not {api:?}",
                    outrigger_proto::device::API_VERSION
                ));
            }
            if kind == "Device" {
                let mut d: Device = typed_json(v)?;
                named(&mut d.metadata)?;
                static_object_uid(&kind, &mut d.metadata);
                return Ok(Object::Device(Box::new(d)));
            }
            let mut m: DeviceModel = typed_json(v)?;
            named(&mut m.metadata)?;
            static_object_uid(&kind, &mut m.metadata);
            if let Some(p) = m.spec.check().into_iter().next() {
                return Err(p.to_string());
            }
            return Ok(Object::DeviceModel(m));
        }
        other => {
            return Err(format!(
            "kind: {other:?} is not supported here (Pod, ConfigMap, Secret, Device, DeviceModel)"
        ))
        }
    }
    let content = serde_json::to_vec(&v).map_err(|e| e.to_string())?;
    let mut pod: Pod = typed(v)?;
    validate(&pod)?;
    pod.metadata
        .namespace
        .get_or_insert_with(|| "default".into());
    let uid = static_uid(&pod, &content);
    pod.metadata.uid = Some(uid);
    pod.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert("kubernetes.io/config.source".into(), "file".into());
    Ok(Object::Pod(Box::new(pod)))
}

/// A device's (or model's) uid in a manifest: from its kind, namespace and
/// name only, so an edited desired value keeps the twin it has.
fn static_object_uid(
    kind: &str,
    meta: &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) {
    if meta.uid.is_some() {
        return;
    }
    use sha2::{Digest, Sha256};
    let h = Sha256::digest(
        format!(
            "{kind}/{}/{}",
            meta.namespace.as_deref().unwrap_or(""),
            meta.name.as_deref().unwrap_or("")
        )
        .as_bytes(),
    );
    let mut b = [0u8; 16];
    b.copy_from_slice(&h[..16]);
    meta.uid = Some(uuid::Builder::from_sha1_bytes(b).into_uuid().to_string());
}

fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(dns_label)
}

/// The checks the API server would make on what edge-rt uses, each naming
/// its field.
pub fn validate(pod: &Pod) -> Result<(), String> {
    let name = pod.metadata.name.as_deref().unwrap_or("");
    if name.is_empty() {
        return Err("metadata.name: required".into());
    }
    if !dns_subdomain(name) {
        return Err(format!(
            "metadata.name: {name:?} must be lower-case letters, digits, '-' and '.'"
        ));
    }
    if let Some(ns) = pod.metadata.namespace.as_deref() {
        if !dns_label(ns) {
            return Err(format!(
                "metadata.namespace: {ns:?} is not a valid namespace"
            ));
        }
    }
    let spec = pod.spec.as_ref().ok_or("spec: required")?;
    if spec.containers.is_empty() {
        return Err("spec.containers: at least one container is required".into());
    }
    if let Some(p) = spec.restart_policy.as_deref() {
        if !["Always", "OnFailure", "Never"].contains(&p) {
            return Err(format!(
                "spec.restartPolicy: {p:?} is not one of Always, OnFailure, Never"
            ));
        }
    }
    let mut names = BTreeSet::new();
    let all = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| ("initContainers", c))
        .enumerate()
        .chain(
            spec.containers
                .iter()
                .map(|c| ("containers", c))
                .enumerate(),
        );
    for (i, (list, c)) in all {
        let at = format!("spec.{list}[{i}]");
        if !dns_label(&c.name) {
            return Err(format!(
                "{at}.name: {:?} is not a valid container name",
                c.name
            ));
        }
        if !names.insert(c.name.clone()) {
            return Err(format!("{at}.name: {:?} is used twice", c.name));
        }
        if c.image.as_deref().unwrap_or("").is_empty() {
            return Err(format!("{at}.image: required"));
        }
        for (field, kind, probe) in [
            (
                "livenessProbe",
                crate::pods::probes::Kind::Liveness,
                &c.liveness_probe,
            ),
            (
                "readinessProbe",
                crate::pods::probes::Kind::Readiness,
                &c.readiness_probe,
            ),
            (
                "startupProbe",
                crate::pods::probes::Kind::Startup,
                &c.startup_probe,
            ),
        ] {
            if let Some(p) = probe {
                crate::pods::probes::Settings::new(p, c, kind)
                    .map_err(|e| format!("{at}.{field}: {e}"))?;
            }
        }
        if let Some(p) = c.image_pull_policy.as_deref() {
            if !["Always", "IfNotPresent", "Never"].contains(&p) {
                return Err(format!(
                    "{at}.imagePullPolicy: {p:?} is not one of Always, IfNotPresent, Never"
                ));
            }
        }
    }
    Ok(())
}

/// A static pod's uid: its namespace and name and a hash of its content,
/// formatted as a UUID.
fn static_uid(pod: &Pod, content: &[u8]) -> String {
    let mut key = format!(
        "{}/{}\n",
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod.metadata.name.as_deref().unwrap_or("")
    )
    .into_bytes();
    key.extend_from_slice(content);
    let h = crate::image::sha256_hex(&key);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// boards/*/devices-example.yaml, the boards' serial lines as Devices,
    /// parse as edge-rt parses what it is given, and each Device's
    /// properties are its model's.
    #[test]
    fn the_boards_device_examples_parse() {
        let boards = Path::new(env!("CARGO_MANIFEST_DIR")).join("../boards");
        let mut seen = 0;
        for entry in fs::read_dir(&boards).unwrap() {
            let file = entry.unwrap().path().join("devices-example.yaml");
            let Ok(text) = fs::read_to_string(&file) else {
                continue;
            };
            let mut models = std::collections::BTreeMap::new();
            let mut devices = Vec::new();
            for doc in serde_yaml_ng::Deserializer::from_str(&text) {
                let v = serde_yaml_ng::Value::deserialize(doc).unwrap();
                match parse(v).unwrap_or_else(|e| panic!("{}: {e}", file.display())) {
                    Object::DeviceModel(m) => {
                        let names: Vec<String> =
                            m.spec.properties.iter().map(|p| p.name.clone()).collect();
                        models.insert(m.metadata.name.clone().unwrap_or_default(), names);
                    }
                    Object::Device(d) => devices.push(d),
                    _ => panic!("{}: only DeviceModels and Devices", file.display()),
                }
            }
            for d in devices {
                let props = &models[&d.spec.model];
                for p in &d.spec.properties {
                    assert!(props.contains(&p.name), "{}: {}", file.display(), p.name);
                }
            }
            seen += 1;
        }
        assert!(seen >= 5, "{seen} boards with examples");
    }

    fn write(dir: &Path, name: &str, text: &str) {
        fs::write(dir.join(name), text).unwrap();
    }

    #[test]
    fn errors_name_the_file_and_field_and_spare_the_rest() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            "a.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: good}\nspec:\n  containers: [{name: c, image: busybox}]\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: bad}\nspec:\n  containers: [{name: c, image: busybox, ports: [{containerPort: many}]}]\n",
        );
        write(d.path(), "b.yml", "apiVersion: v1\nkind: Pod\nmetadata: {name: Bad_Name}\nspec: {containers: [{name: c, image: x}]}\n");
        write(d.path(), ".swp.yaml", "garbage: [");
        write(d.path(), "notes.txt", "not a manifest");
        let m = load_dir(d.path());
        assert_eq!(m.len(), 3);
        assert!(m[0].object.is_ok());
        let e = m[1].object.as_ref().unwrap_err();
        assert!(
            e.starts_with("spec.containers[0].ports[0].containerPort"),
            "{e}"
        );
        assert_eq!(
            m[1].place(),
            format!("{} (document 2)", d.path().join("a.yaml").display())
        );
        let e = m[2].object.as_ref().unwrap_err();
        assert!(e.starts_with("metadata.name"), "{e}");
    }

    #[test]
    fn uid_is_stable_and_follows_content() {
        let d = tempfile::tempdir().unwrap();
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c, image: busybox}]}\n";
        write(d.path(), "p.yaml", text);
        let pod = |m: Manifest| match m.object {
            Ok(Object::Pod(p)) => p,
            _ => panic!("not a pod"),
        };
        let a = pod(load_dir(d.path()).remove(0));
        let b = pod(load_dir(d.path()).remove(0));
        assert_eq!(a.metadata.uid, b.metadata.uid);
        write(d.path(), "p.yaml", &text.replace("busybox", "busybox:1"));
        let c = pod(load_dir(d.path()).remove(0));
        assert_ne!(a.metadata.uid, c.metadata.uid);
    }
}
