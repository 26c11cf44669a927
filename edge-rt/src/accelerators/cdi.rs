//! Container Device Interface specs: the JSON or YAML files vendors' tools
//! write to `/etc/cdi` and `/var/run/cdi` (nvidia-ctk, Intel's plugin, ...)
//! saying what a named device adds to a container. Read here by hand
//! rather than with the `container-device-interface` crate, whose schema
//! validator pulls an HTTP client and a CLI parser into a library; the
//! format is small (`cncf-tags/container-device-interface`, SPEC.md).
//!
//! A device is named `vendor.com/class=name`. Directories later in the
//! list win a name (`/var/run/cdi` over `/etc/cdi`); two files of one
//! directory defining a name are a conflict and neither is used.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::runtime::edits::{ContainerEdits, DeviceNode, EditMount, Hook, HookStage};

#[derive(Debug, thiserror::Error)]
pub enum CdiError {
    #[error("{0}: {1}")]
    Parse(PathBuf, String),
    #[error("CDI device {0:?} is not a qualified name (vendor.com/class=name)")]
    BadName(String),
    #[error("CDI device {0:?} is not defined by any spec in {1}")]
    Unknown(String, String),
    #[error("CDI device {name:?} is defined twice in {dir}: ambiguous, not used")]
    Conflict { name: String, dir: String },
    #[error("CDI device {name:?}: node {path}: {error}")]
    Node {
        name: String,
        path: String,
        error: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SpecFile {
    cdi_version: String,
    kind: String,
    /// Allowed by the spec, not used here.
    #[serde(default, rename = "annotations")]
    _annotations: BTreeMap<String, String>,
    devices: Vec<DeviceEntry>,
    #[serde(default)]
    container_edits: Edits,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct DeviceEntry {
    name: String,
    #[serde(default, rename = "annotations")]
    _annotations: BTreeMap<String, String>,
    container_edits: Edits,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Edits {
    #[serde(default)]
    env: Vec<String>,
    #[serde(default)]
    device_nodes: Vec<NodeEntry>,
    #[serde(default)]
    mounts: Vec<MountEntry>,
    #[serde(default)]
    hooks: Vec<HookEntry>,
    #[serde(default)]
    additional_gids: Vec<u32>,
    /// Resource control settings edge-rt does not apply (said in a
    /// warning when a device using them is given).
    #[serde(default)]
    intel_rdt: Option<serde_json::Value>,
    #[serde(default)]
    net_devices: Vec<serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct NodeEntry {
    path: String,
    host_path: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    major: Option<i64>,
    minor: Option<i64>,
    file_mode: Option<u32>,
    permissions: Option<String>,
    uid: Option<u32>,
    gid: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct MountEntry {
    host_path: String,
    container_path: String,
    #[serde(default)]
    options: Vec<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HookEntry {
    hook_name: String,
    path: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: Vec<String>,
    timeout: Option<i64>,
}

/// A device found in a spec: its own edits and its spec's common ones.
#[derive(Debug, Clone)]
struct Defined {
    device: Edits,
    common: Edits,
    file: PathBuf,
}

/// Every CDI device the spec directories define.
#[derive(Debug, Default)]
pub struct Registry {
    devices: BTreeMap<String, Defined>,
    /// Names two files of one directory define (not usable).
    conflicts: BTreeMap<String, String>,
    /// Files that could not be read, with why (logged at load).
    pub errors: Vec<CdiError>,
    dirs: String,
}

/// The versions of the spec this reader knows (0.3.0 up to 1.1.0; older
/// ones are long gone from vendors' tools).
fn version_known(v: &str) -> bool {
    matches!(
        v,
        "0.3.0" | "0.4.0" | "0.5.0" | "0.6.0" | "0.7.0" | "0.8.0" | "1.0.0" | "1.1.0"
    )
}

/// A kind is `vendor.com/class`: a DNS-subdomain-like vendor, one class.
fn kind_valid(kind: &str) -> bool {
    let Some((vendor, class)) = kind.split_once('/') else {
        return false;
    };
    let part = |s: &str, extra: &[char]| {
        !s.is_empty()
            && s.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
            && s.chars().last().is_some_and(|c| c.is_ascii_alphanumeric())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || extra.contains(&c))
    };
    part(vendor, &['-', '.', '_']) && part(class, &['-', '_', '.'])
}

/// Split `vendor.com/class=name`.
pub fn parse_qualified(q: &str) -> Result<(&str, &str), CdiError> {
    let bad = || CdiError::BadName(q.to_string());
    let (kind, name) = q.split_once('=').ok_or_else(bad)?;
    let name_ok = !name.is_empty()
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c));
    if !kind_valid(kind) || !name_ok {
        return Err(bad());
    }
    Ok((kind, name))
}

impl Registry {
    /// Read every `*.json`, `*.yaml` and `*.yml` of `dirs`, in order.
    pub fn load(dirs: &[PathBuf]) -> Registry {
        let mut r = Registry {
            dirs: dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            ..Default::default()
        };
        for dir in dirs {
            let Ok(rd) = std::fs::read_dir(dir) else {
                continue;
            };
            let mut files: Vec<PathBuf> = rd
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    matches!(
                        p.extension().and_then(|e| e.to_str()),
                        Some("json" | "yaml" | "yml")
                    )
                })
                .collect();
            files.sort();
            // This directory's names, to find those two of its files define.
            let mut here: BTreeMap<String, PathBuf> = BTreeMap::new();
            for f in files {
                let spec = match read_spec(&f) {
                    Ok(s) => s,
                    Err(e) => {
                        r.errors.push(e);
                        continue;
                    }
                };
                for d in spec.devices {
                    let q = format!("{}={}", spec.kind, d.name);
                    if parse_qualified(&q).is_err() {
                        r.errors.push(CdiError::BadName(q));
                        continue;
                    }
                    if here.insert(q.clone(), f.clone()).is_some() {
                        r.conflicts.insert(q.clone(), dir.display().to_string());
                        r.devices.remove(&q);
                        continue;
                    }
                    r.conflicts.remove(&q);
                    r.devices.insert(
                        q,
                        Defined {
                            device: d.container_edits,
                            common: spec.container_edits.clone(),
                            file: f.clone(),
                        },
                    );
                }
            }
        }
        r
    }

    pub fn contains(&self, qualified: &str) -> bool {
        self.devices.contains_key(qualified)
    }

    pub fn device_count(&self) -> usize {
        self.devices.len()
    }

    /// What a device adds to a container: its spec's common edits, then its
    /// own; nodes without numbers take them from the host's node.
    pub fn edits(&self, qualified: &str) -> Result<ContainerEdits, CdiError> {
        parse_qualified(qualified)?;
        if let Some(dir) = self.conflicts.get(qualified) {
            return Err(CdiError::Conflict {
                name: qualified.into(),
                dir: dir.clone(),
            });
        }
        let d = self
            .devices
            .get(qualified)
            .ok_or_else(|| CdiError::Unknown(qualified.into(), self.dirs.clone()))?;
        let mut out = ContainerEdits::default();
        for e in [&d.common, &d.device] {
            if e.intel_rdt.is_some() || !e.net_devices.is_empty() {
                tracing::warn!(device = qualified, file = %d.file.display(), "CDI intelRdt and netDevices edits are not applied by edge-rt");
            }
            out.merge(convert(qualified, e)?);
        }
        Ok(out)
    }
}

fn read_spec(f: &Path) -> Result<SpecFile, CdiError> {
    let err = |e: String| CdiError::Parse(f.to_path_buf(), e);
    let text = std::fs::read_to_string(f).map_err(|e| err(e.to_string()))?;
    let spec: SpecFile = if f.extension().and_then(|e| e.to_str()) == Some("json") {
        serde_json::from_str(&text).map_err(|e| err(e.to_string()))?
    } else {
        serde_yaml_ng::from_str(&text).map_err(|e| err(e.to_string()))?
    };
    if !version_known(&spec.cdi_version) {
        return Err(err(format!(
            "cdiVersion {:?} is not one this edge-rt reads (0.3.0 to 1.1.0)",
            spec.cdi_version
        )));
    }
    if !kind_valid(&spec.kind) {
        return Err(err(format!("kind {:?} is not vendor.com/class", spec.kind)));
    }
    if spec.devices.is_empty() {
        return Err(err("a spec must define at least one device".into()));
    }
    Ok(spec)
}

fn convert(q: &str, e: &Edits) -> Result<ContainerEdits, CdiError> {
    let mut out = ContainerEdits::default();
    for kv in &e.env {
        let (k, v) = kv.split_once('=').unwrap_or((kv.as_str(), ""));
        out.env.push((k.to_string(), v.to_string()));
    }
    for n in &e.device_nodes {
        out.nodes.push(node(q, n)?);
    }
    for m in &e.mounts {
        out.mounts.push(EditMount {
            host_path: m.host_path.clone().into(),
            container_path: m.container_path.clone(),
            fstype: m.kind.clone(),
            options: m.options.clone(),
        });
    }
    for h in &e.hooks {
        let stage = HookStage::parse(&h.hook_name).ok_or_else(|| CdiError::Node {
            name: q.into(),
            path: h.path.clone(),
            error: format!("unknown hookName {:?}", h.hook_name),
        })?;
        out.hooks.push(Hook {
            stage,
            path: h.path.clone().into(),
            args: h.args.clone(),
            env: h.env.clone(),
            timeout: h.timeout,
        });
    }
    out.additional_gids = e
        .additional_gids
        .iter()
        .copied()
        .filter(|g| *g != 0)
        .collect();
    Ok(out)
}

/// A spec's node, its type and numbers from the host's node where the
/// spec leaves them out (as CDI says: `hostPath`, else `path`).
fn node(q: &str, n: &NodeEntry) -> Result<DeviceNode, CdiError> {
    let host = n.host_path.as_deref().unwrap_or(&n.path);
    let err = |error: String| CdiError::Node {
        name: q.into(),
        path: n.path.clone(),
        error,
    };
    let (kind, major, minor, mode) = match (n.kind.as_deref(), n.major, n.minor) {
        (Some(k), Some(ma), Some(mi)) if k == "c" || k == "b" || k == "u" => {
            (k.replace('u', "c"), ma, mi, n.file_mode)
        }
        _ => {
            let (kind, ma, mi, mode) = stat_node(Path::new(host)).map_err(err)?;
            (kind.to_string(), ma, mi, n.file_mode.or(Some(mode)))
        }
    };
    let permissions = match n.permissions.as_deref() {
        None | Some("") => "rwm".to_string(),
        Some("none") => String::new(),
        Some(p) => p.to_string(),
    };
    Ok(DeviceNode {
        path: n.path.clone().into(),
        kind: kind.chars().next().unwrap_or('c'),
        major,
        minor,
        file_mode: mode,
        uid: n.uid,
        gid: n.gid,
        access: permissions,
    })
}

/// A host node's type, numbers and permission bits.
pub fn stat_node(p: &Path) -> Result<(char, i64, i64, u32), String> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let m = std::fs::metadata(p).map_err(|e| e.to_string())?;
    let kind = if m.file_type().is_char_device() {
        'c'
    } else if m.file_type().is_block_device() {
        'b'
    } else {
        return Err("not a device node".into());
    };
    let rdev = m.rdev();
    let major = nix::sys::stat::major(rdev) as i64;
    let minor = nix::sys::stat::minor(rdev) as i64;
    Ok((kind, major, minor, m.mode() & 0o7777))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert_eq!(
            parse_qualified("nvidia.com/gpu=0").unwrap(),
            ("nvidia.com/gpu", "0")
        );
        assert!(parse_qualified("nvidia.com/gpu=GPU-1a2b:3").is_ok());
        assert!(parse_qualified("nvidia.com/gpu").is_err());
        assert!(parse_qualified("gpu=0").is_err());
        assert!(parse_qualified("nvidia.com/gpu=").is_err());
        assert!(parse_qualified("nvidia.com/gpu=../x").is_err());
    }

    #[test]
    fn later_directories_win_and_conflicts_are_not_used() {
        let d = tempfile::tempdir().unwrap();
        let (etc, run) = (d.path().join("etc"), d.path().join("run"));
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::create_dir_all(&run).unwrap();
        std::fs::write(
            etc.join("vendor.yaml"),
            r#"
cdiVersion: "0.6.0"
kind: example.com/npu
containerEdits:
  env: ["NPU_LIB=/usr/lib/npu"]
  mounts:
    - {hostPath: /usr/lib/npu, containerPath: /usr/lib/npu, options: [ro, bind]}
devices:
  - name: "0"
    containerEdits:
      env: ["NPU_VISIBLE=0"]
      deviceNodes:
        - {path: /dev/npu0, type: c, major: 240, minor: 0, permissions: rw}
      hooks:
        - {hookName: createContainer, path: /usr/bin/npu-hook, args: [npu-hook, ldcache]}
  - name: "1"
    containerEdits:
      deviceNodes:
        - {path: /dev/npu1, type: c, major: 240, minor: 1}
"#,
        )
        .unwrap();
        std::fs::write(
            run.join("override.json"),
            r#"{"cdiVersion": "1.0.0", "kind": "example.com/npu",
                "devices": [{"name": "1", "containerEdits": {"env": ["FROM_RUN=1"],
                  "deviceNodes": [{"path": "/dev/npu1", "type": "c", "major": 240, "minor": 9}]}}]}"#,
        )
        .unwrap();
        // Two files of one directory defining one name.
        for f in ["a.json", "b.json"] {
            std::fs::write(
                run.join(f),
                r#"{"cdiVersion": "0.5.0", "kind": "example.com/cam",
                    "devices": [{"name": "x", "containerEdits": {"env": ["A=1"]}}]}"#,
            )
            .unwrap();
        }
        std::fs::write(run.join("broken.yaml"), "cdiVersion: 9.9.9\n").unwrap();
        let r = Registry::load(&[etc, run]);
        assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
        let e = r.edits("example.com/npu=0").unwrap();
        assert_eq!(
            e.env,
            [
                ("NPU_LIB".to_string(), "/usr/lib/npu".to_string()),
                ("NPU_VISIBLE".to_string(), "0".to_string())
            ]
        );
        assert_eq!(e.nodes[0].access, "rw");
        assert_eq!(e.mounts[0].options, ["ro", "bind"]);
        assert_eq!(e.hooks[0].stage, HookStage::CreateContainer);
        // /var/run/cdi's device 1 replaced /etc/cdi's (common edits and all).
        let e = r.edits("example.com/npu=1").unwrap();
        assert_eq!(e.nodes[0].minor, 9);
        assert_eq!(e.env, [("FROM_RUN".to_string(), "1".to_string())]);
        assert!(matches!(
            r.edits("example.com/cam=x"),
            Err(CdiError::Conflict { .. })
        ));
        assert!(matches!(
            r.edits("example.com/npu=7"),
            Err(CdiError::Unknown(..))
        ));
    }

    #[test]
    fn a_node_without_numbers_takes_the_hosts() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("null.yaml"),
            r#"
cdiVersion: "0.5.0"
kind: example.com/null
devices:
  - name: n
    containerEdits:
      deviceNodes: [{path: /dev/xnull, hostPath: /dev/null}]
"#,
        )
        .unwrap();
        let r = Registry::load(&[d.path().to_path_buf()]);
        let e = r.edits("example.com/null=n").unwrap();
        assert_eq!(
            (e.nodes[0].kind, e.nodes[0].major, e.nodes[0].minor),
            ('c', 1, 3)
        );
        assert_eq!(e.nodes[0].access, "rwm");
    }
}
