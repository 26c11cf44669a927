//! What a device grant adds to a container, in the shape of the Container
//! Device Interface's `containerEdits`: device nodes (each with its cgroup
//! rule), environment, mounts, hooks and extra groups. edge-rt's
//! accelerator allocator fills one in per container (from its own
//! detection and from vendors' CDI specs); [`ContainerEdits::apply`] writes
//! it into the OCI spec, so libcontainer makes the nodes and the device
//! cgroup rules (v1's devices.allow or v2's eBPF program) from there.

use std::path::PathBuf;

use serde_json::{json, Value};

use super::RuntimeError;

/// A device node the container gets, and may use (`access`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceNode {
    /// Where it appears in the container.
    pub path: PathBuf,
    /// 'c' (character) or 'b' (block).
    pub kind: char,
    pub major: i64,
    pub minor: i64,
    pub file_mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// The cgroup access: some of "rwm".
    pub access: String,
}

/// A mount a device stack needs (driver libraries, sockets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EditMount {
    pub host_path: PathBuf,
    pub container_path: String,
    /// "bind" unless said.
    pub fstype: Option<String>,
    pub options: Vec<String>,
}

/// When a hook runs, by the OCI runtime spec's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookStage {
    Prestart,
    CreateRuntime,
    CreateContainer,
    StartContainer,
    Poststart,
    Poststop,
}

impl HookStage {
    pub fn parse(s: &str) -> Option<HookStage> {
        Some(match s {
            "prestart" => HookStage::Prestart,
            "createRuntime" => HookStage::CreateRuntime,
            "createContainer" => HookStage::CreateContainer,
            "startContainer" => HookStage::StartContainer,
            "poststart" => HookStage::Poststart,
            "poststop" => HookStage::Poststop,
            _ => return None,
        })
    }

    fn key(self) -> &'static str {
        match self {
            HookStage::Prestart => "prestart",
            HookStage::CreateRuntime => "createRuntime",
            HookStage::CreateContainer => "createContainer",
            HookStage::StartContainer => "startContainer",
            HookStage::Poststart => "poststart",
            HookStage::Poststop => "poststop",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    pub stage: HookStage,
    pub path: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub timeout: Option<i64>,
}

/// Everything a container's devices add to it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerEdits {
    pub nodes: Vec<DeviceNode>,
    /// `NAME=value`, applied over the container's own environment (the
    /// vendor's stack reads these: NVIDIA_VISIBLE_DEVICES and the like).
    pub env: Vec<(String, String)>,
    pub mounts: Vec<EditMount>,
    pub hooks: Vec<Hook>,
    pub additional_gids: Vec<u32>,
}

impl ContainerEdits {
    pub fn is_empty(&self) -> bool {
        *self == ContainerEdits::default()
    }

    /// Add `other`'s edits; a node or mount at a path already given is not
    /// given twice (a spec's common edits and a device's may both name
    /// `/dev/nvidiactl`).
    pub fn merge(&mut self, other: ContainerEdits) {
        for n in other.nodes {
            if !self.nodes.iter().any(|m| m.path == n.path) {
                self.nodes.push(n);
            }
        }
        for (k, v) in other.env {
            match self.env.iter_mut().find(|(x, _)| *x == k) {
                Some(e) => e.1 = v,
                None => self.env.push((k, v)),
            }
        }
        for m in other.mounts {
            if !self
                .mounts
                .iter()
                .any(|x| x.container_path == m.container_path)
            {
                self.mounts.push(m);
            }
        }
        for h in other.hooks {
            if !self.hooks.contains(&h) {
                self.hooks.push(h);
            }
        }
        for g in other.additional_gids {
            if !self.additional_gids.contains(&g) {
                self.additional_gids.push(g);
            }
        }
    }

    /// Write the edits into a generated OCI spec: nodes into
    /// `linux.devices` with an allow rule each after the deny-all, mounts
    /// after the volumes, environment over the container's, hooks, groups.
    pub fn apply(&self, spec: &mut Value) -> Result<(), RuntimeError> {
        if self.is_empty() {
            return Ok(());
        }
        let bad = |m: &str| RuntimeError::Config(format!("device edits: {m}"));
        let mut devices = Vec::new();
        let mut rules = Vec::new();
        for n in &self.nodes {
            if n.kind != 'c' && n.kind != 'b' {
                return Err(bad(&format!(
                    "{}: type {:?} is not c or b",
                    n.path.display(),
                    n.kind
                )));
            }
            if !n.path.is_absolute() {
                return Err(bad(&format!("{}: not an absolute path", n.path.display())));
            }
            let mut d = json!({
                "path": n.path,
                "type": n.kind.to_string(),
                "major": n.major,
                "minor": n.minor,
            });
            if let Some(m) = n.file_mode {
                d["fileMode"] = json!(m);
            }
            if let Some(u) = n.uid {
                d["uid"] = json!(u);
            }
            if let Some(g) = n.gid {
                d["gid"] = json!(g);
            }
            devices.push(d);
            let access = if n.access.is_empty() {
                "rwm"
            } else {
                &n.access
            };
            if !access.chars().all(|c| "rwm".contains(c)) {
                return Err(bad(&format!(
                    "{}: permissions {access:?} are not some of rwm",
                    n.path.display()
                )));
            }
            rules.push(json!({"allow": true, "type": n.kind.to_string(), "major": n.major, "minor": n.minor, "access": access}));
        }
        let linux = spec
            .get_mut("linux")
            .and_then(Value::as_object_mut)
            .ok_or_else(|| bad("the spec has no linux section"))?;
        if !devices.is_empty() {
            linux.insert("devices".into(), Value::Array(devices));
        }
        if let Some(Value::Array(r)) = linux
            .get_mut("resources")
            .and_then(|r| r.get_mut("devices"))
        {
            r.extend(rules);
        }
        if let Some(Value::Array(mounts)) = spec.get_mut("mounts") {
            for m in &self.mounts {
                let fstype = m.fstype.clone().unwrap_or_else(|| "bind".into());
                let mut options = m.options.clone();
                if fstype == "bind" && !options.iter().any(|o| o == "bind" || o == "rbind") {
                    options.push("rbind".into());
                }
                mounts.push(json!({"destination": m.container_path, "type": fstype, "source": m.host_path, "options": options}));
            }
        }
        if let Some(process) = spec.get_mut("process") {
            if let Some(Value::Array(env)) = process.get_mut("env") {
                for (k, v) in &self.env {
                    let prefix = format!("{k}=");
                    env.retain(|e| !e.as_str().is_some_and(|s| s.starts_with(&prefix)));
                    env.push(json!(format!("{k}={v}")));
                }
            }
            if let Some(Value::Array(gids)) = process
                .get_mut("user")
                .and_then(|u| u.get_mut("additionalGids"))
            {
                for g in &self.additional_gids {
                    if !gids.iter().any(|x| x.as_u64() == Some(u64::from(*g))) {
                        gids.push(json!(g));
                    }
                }
            }
        }
        if !self.hooks.is_empty() {
            let hooks = spec
                .as_object_mut()
                .ok_or_else(|| bad("the spec is not an object"))?
                .entry("hooks")
                .or_insert_with(|| json!({}));
            for h in &self.hooks {
                // CDI's args, like the OCI spec's, start with argv[0].
                let args = if h.args.is_empty() {
                    vec![h.path.display().to_string()]
                } else {
                    h.args.clone()
                };
                let mut v = json!({"path": h.path, "args": args});
                if !h.env.is_empty() {
                    v["env"] = json!(h.env);
                }
                if let Some(t) = h.timeout {
                    v["timeout"] = json!(t);
                }
                match hooks.get_mut(h.stage.key()) {
                    Some(Value::Array(a)) => a.push(v),
                    _ => hooks[h.stage.key()] = json!([v]),
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(path: &str, minor: i64) -> DeviceNode {
        DeviceNode {
            path: path.into(),
            kind: 'c',
            major: 195,
            minor,
            file_mode: Some(0o666),
            uid: None,
            gid: None,
            access: "rw".into(),
        }
    }

    #[test]
    fn nodes_get_an_allow_rule_each_after_the_deny_all() {
        let mut spec = json!({
            "process": {"env": ["PATH=/bin", "A=1"], "user": {"uid": 0, "gid": 0, "additionalGids": [5]}},
            "mounts": [],
            "linux": {"resources": {"devices": [{"allow": false, "access": "rwm"}]}},
        });
        let edits = ContainerEdits {
            nodes: vec![node("/dev/nvidia0", 0), node("/dev/nvidiactl", 255)],
            env: vec![
                ("A".into(), "2".into()),
                ("NVIDIA_VISIBLE_DEVICES".into(), "0".into()),
            ],
            mounts: vec![EditMount {
                host_path: "/usr/lib/libcuda.so.1".into(),
                container_path: "/usr/lib/libcuda.so.1".into(),
                fstype: None,
                options: vec!["ro".into()],
            }],
            hooks: vec![Hook {
                stage: HookStage::CreateContainer,
                path: "/usr/bin/nvidia-cdi-hook".into(),
                args: vec!["nvidia-cdi-hook".into(), "update-ldcache".into()],
                env: vec![],
                timeout: None,
            }],
            additional_gids: vec![44, 5],
        };
        edits.apply(&mut spec).unwrap();
        let rules = &spec["linux"]["resources"]["devices"];
        assert_eq!(rules[0]["allow"], false, "deny-all stays first");
        assert_eq!(rules[1]["minor"], 0);
        assert_eq!(rules[1]["access"], "rw");
        assert_eq!(rules[2]["minor"], 255);
        assert_eq!(spec["linux"]["devices"][0]["path"], "/dev/nvidia0");
        assert_eq!(spec["linux"]["devices"][0]["fileMode"], 0o666);
        let env: Vec<&str> = spec["process"]["env"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        assert_eq!(env, ["PATH=/bin", "A=2", "NVIDIA_VISIBLE_DEVICES=0"]);
        assert_eq!(spec["process"]["user"]["additionalGids"], json!([5, 44]));
        assert_eq!(spec["mounts"][0]["options"], json!(["ro", "rbind"]));
        assert_eq!(
            spec["hooks"]["createContainer"][0]["args"],
            json!(["nvidia-cdi-hook", "update-ldcache"])
        );
    }

    #[test]
    fn bad_permissions_or_types_are_refused() {
        let mut spec =
            json!({"linux": {"resources": {"devices": []}}, "mounts": [], "process": {}});
        let mut n = node("/dev/x", 1);
        n.access = "rwx".into();
        let e = ContainerEdits {
            nodes: vec![n],
            ..Default::default()
        };
        assert!(e.apply(&mut spec.clone()).is_err());
        let mut n = node("/dev/x", 1);
        n.kind = 'p';
        let e = ContainerEdits {
            nodes: vec![n],
            ..Default::default()
        };
        assert!(e.apply(&mut spec).is_err());
    }

    #[test]
    fn merging_keeps_one_of_each_path() {
        let mut a = ContainerEdits {
            nodes: vec![node("/dev/nvidiactl", 255)],
            ..Default::default()
        };
        a.merge(ContainerEdits {
            nodes: vec![node("/dev/nvidiactl", 255), node("/dev/nvidia1", 1)],
            env: vec![("X".into(), "1".into())],
            ..Default::default()
        });
        assert_eq!(a.nodes.len(), 2);
        assert_eq!(a.env, [("X".to_string(), "1".to_string())]);
    }
}
