//! From a Kubernetes container (plus its pod's context and its image's
//! config) to an OCI runtime spec, merged the way the kubelet and containerd
//! do it: entrypoint/cmd rules, `$(VAR)` expansion, user from the security
//! context or the image, containerd's default capabilities, masked and
//! read-only `/proc` paths, and cgroup limits from resources.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Container, PodSecurityContext, SecurityContext};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use oci_spec::image::ImageConfiguration;
use serde_json::{json, Value};

use super::init::InitMount;
use super::RuntimeError;

/// containerd's default capability set for unprivileged containers.
pub const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Every capability edge-rt itself may grant (its bounding set): what
/// "privileged" and "ALL" mean here. A gateway's init has them all; a
/// restricted host may not, and asking for more would fail at capset.
pub fn all_caps() -> Vec<String> {
    let mut v: Vec<String> = caps::read(None, caps::CapSet::Bounding)
        .map(|set| set.into_iter().map(|c| c.to_string()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

const MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A bind mount into the container (volumes, /etc/hosts and the like).
#[derive(Debug, Clone)]
pub struct BindMount {
    pub source: PathBuf,
    pub destination: String,
    pub read_only: bool,
}

/// Namespaces a container joins rather than creates.
#[derive(Debug, Clone, Default)]
pub struct SharedNamespaces {
    /// None: the host's network (hostNetwork pods).
    pub network: Option<PathBuf>,
    pub ipc: Option<PathBuf>,
    /// None with hostNetwork: the host's UTS namespace, as the kubelet does.
    pub uts: Option<PathBuf>,
}

/// Everything the spec is made from.
pub struct SpecInput<'a> {
    pub container: &'a Container,
    pub pod_security: Option<&'a PodSecurityContext>,
    pub image: &'a ImageConfiguration,
    pub rootfs: &'a Path,
    pub extra_env: &'a [(String, String)],
    pub mounts: &'a [BindMount],
    pub namespaces: &'a SharedNamespaces,
    pub host_network: bool,
    pub hostname: &'a str,
    pub cgroups_path: &'a str,
    /// The host runs a unified (v2-only) cgroup hierarchy.
    pub cgroup_v2: bool,
    /// edge-rt's init makes the container-local mounts it can make faster
    /// than libcontainer (see `init`): the v1 cgroup view, and /dev/pts,
    /// /dev/mqueue and /dev/shm for a root init. False writes every mount in
    /// config.json, the standard form any OCI runtime runs (the benchmark's
    /// bundle for runc).
    pub mounts_by_init: bool,
    pub pids_limit: Option<i64>,
    pub annotations: BTreeMap<String, String>,
}

/// The spec and what the init must do that the spec cannot say.
#[derive(Debug)]
pub struct Generated {
    pub spec: Value,
    /// Capabilities the workload holds (for the seccomp profile).
    pub caps: Vec<String>,
    pub seccomp: bool,
    /// CAP_SYS_ADMIN is in the permitted set only for edge-rt's init (to
    /// install seccomp for a container allowed to escalate, to mount the
    /// cgroup view); it is dropped before the workload runs.
    pub init_sys_admin: bool,
    /// The init mounts the v1 cgroup view: `Some(read_only)`.
    pub cgroup_view: Option<bool>,
    /// Fresh filesystems the init mounts under the container's /dev.
    pub init_mounts: Vec<InitMount>,
}

/// A container-local mount of a fresh filesystem (no host source), as the
/// OCI spec writes it; edge-rt's init can make it itself.
struct LocalMount {
    destination: &'static str,
    fstype: &'static str,
    source: &'static str,
    options: &'static [&'static str],
}

const DEV_PTS: LocalMount = LocalMount {
    destination: "/dev/pts",
    fstype: "devpts",
    source: "devpts",
    options: &[
        "nosuid",
        "noexec",
        "newinstance",
        "ptmxmode=0666",
        "mode=0620",
        "gid=5",
    ],
};
const DEV_MQUEUE: LocalMount = LocalMount {
    destination: "/dev/mqueue",
    fstype: "mqueue",
    source: "mqueue",
    options: &["nosuid", "noexec", "nodev"],
};
const DEV_SHM: LocalMount = LocalMount {
    destination: "/dev/shm",
    fstype: "tmpfs",
    source: "shm",
    options: &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
};

impl LocalMount {
    fn oci(&self) -> Value {
        json!({"destination": self.destination, "type": self.fstype, "source": self.source, "options": self.options})
    }

    /// mount(2)'s flags and data from the OCI options.
    fn for_init(&self) -> InitMount {
        use nix::mount::MsFlags;
        let mut flags = MsFlags::empty();
        let mut data = Vec::new();
        for o in self.options {
            match *o {
                "nosuid" => flags |= MsFlags::MS_NOSUID,
                "noexec" => flags |= MsFlags::MS_NOEXEC,
                "nodev" => flags |= MsFlags::MS_NODEV,
                other => data.push(other),
            }
        }
        InitMount {
            target: self.destination.into(),
            fstype: self.fstype.into(),
            source: self.source.into(),
            flags,
            data: data.join(","),
        }
    }
}

fn config_err(msg: impl Into<String>) -> RuntimeError {
    RuntimeError::Config(msg.into())
}

/// Kubernetes' `$(VAR)` expansion: defined names are replaced, `$$` is a
/// literal `$`, anything else stays as written.
pub fn expand(s: &str, env: &BTreeMap<String, String>) -> String {
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'$' && i + 1 < b.len() {
            if b[i + 1] == b'$' {
                out.push('$');
                i += 2;
                continue;
            }
            if b[i + 1] == b'(' {
                if let Some(end) = s[i + 2..].find(')') {
                    let name = &s[i + 2..i + 2 + end];
                    if let Some(v) = env.get(name) {
                        out.push_str(v);
                    } else {
                        out.push_str(&s[i..i + 3 + end]);
                    }
                    i += 3 + end;
                    continue;
                }
            }
        }
        let ch = s[i..].chars().next().unwrap_or('\u{fffd}');
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

/// The process arguments by Kubernetes' rules:
/// command replaces the entrypoint (and drops the image's cmd); args alone
/// replace the cmd.
pub fn process_args(
    c: &Container,
    image: &ImageConfiguration,
    env: &BTreeMap<String, String>,
) -> Result<Vec<String>, RuntimeError> {
    let cfg = image.config().as_ref();
    let entrypoint = cfg.and_then(|c| c.entrypoint().clone()).unwrap_or_default();
    let cmd = cfg.and_then(|c| c.cmd().clone()).unwrap_or_default();
    let x = |v: &Vec<String>| v.iter().map(|s| expand(s, env)).collect::<Vec<_>>();
    let args = match (&c.command, &c.args) {
        (Some(command), args) if !command.is_empty() => {
            let mut a = x(command);
            a.extend(args.as_ref().map(x).unwrap_or_default());
            a
        }
        (_, Some(args)) if !args.is_empty() => {
            let mut a = entrypoint;
            a.extend(x(args));
            a
        }
        _ => {
            let mut a = entrypoint;
            a.extend(cmd);
            a
        }
    };
    if args.is_empty() {
        return Err(config_err(format!(
            "container {:?}: no command given and the image has no entrypoint or cmd",
            c.name
        )));
    }
    Ok(args)
}

/// Environment: image, then the container's (later names win), each value
/// expanded against what came before it.
pub fn environment(
    c: &Container,
    image: &ImageConfiguration,
    extra: &[(String, String)],
    hostname: &str,
) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for kv in image
        .config()
        .as_ref()
        .and_then(|c| c.env().clone())
        .unwrap_or_default()
    {
        if let Some((k, v)) = kv.split_once('=') {
            env.insert(k.to_string(), v.to_string());
        }
    }
    env.entry("PATH".into())
        .or_insert_with(|| DEFAULT_PATH.into());
    env.insert("HOSTNAME".into(), hostname.into());
    for (k, v) in extra {
        env.insert(k.clone(), v.clone());
    }
    for e in c.env.iter().flatten() {
        if e.value_from.is_some() {
            // Resolved by the caller into `extra` (configMap, secret, field refs).
            continue;
        }
        let v = expand(e.value.as_deref().unwrap_or(""), &env);
        env.insert(e.name.clone(), v);
    }
    env
}

/// Parse a CPU quantity to millicores ("500m", "2", "0.25").
pub fn cpu_millis(q: &Quantity) -> Result<i64, RuntimeError> {
    let s = q.0.trim();
    let bad = || config_err(format!("bad cpu quantity {s:?}"));
    if let Some(m) = s.strip_suffix('m') {
        return m.parse::<i64>().map_err(|_| bad());
    }
    let f: f64 = s.parse().map_err(|_| bad())?;
    if !(0.0..1e9).contains(&f) {
        return Err(bad());
    }
    Ok((f * 1000.0).ceil() as i64)
}

/// Parse a memory quantity to bytes ("64Mi", "1G", "129e6", "1000").
pub fn bytes(q: &Quantity) -> Result<i64, RuntimeError> {
    let s = q.0.trim();
    let bad = || config_err(format!("bad memory quantity {s:?}"));
    const SUFFIXES: &[(&str, f64)] = &[
        ("Ki", 1024.0),
        ("Mi", 1048576.0),
        ("Gi", 1073741824.0),
        ("Ti", 1099511627776.0),
        ("Pi", 1125899906842624.0),
        ("Ei", 1152921504606846976.0),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
        ("m", 1e-3),
    ];
    for (suf, mul) in SUFFIXES {
        if let Some(n) = s.strip_suffix(suf) {
            let f: f64 = n.parse().map_err(|_| bad())?;
            return Ok((f * mul).ceil() as i64);
        }
    }
    let f: f64 = s.parse().map_err(|_| bad())?;
    Ok(f.ceil() as i64)
}

/// Read a file of the container's root without following a symlink out.
fn read_rootfs_file(rootfs: &Path, rel: &str) -> Option<String> {
    let p = rootfs.join(rel);
    let m = fs::symlink_metadata(&p).ok()?;
    if !m.is_file() {
        return None;
    }
    fs::read_to_string(p).ok()
}

/// Resolve an image `User` ("1000", "1000:1000", "app", "app:staff").
fn resolve_user(spec: &str, rootfs: &Path) -> Result<(u32, Option<u32>), RuntimeError> {
    let (u, g) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let passwd = read_rootfs_file(rootfs, "etc/passwd").unwrap_or_default();
    let (uid, primary) = if let Ok(n) = u.parse::<u32>() {
        let primary = passwd.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() > 3 && f[2] == u)
                .then(|| f[3].parse().ok())
                .flatten()
        });
        (n, primary)
    } else {
        passwd
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f.len() > 3 && f[0] == u).then(|| (f[2].parse().ok(), f[3].parse().ok()))
            })
            .and_then(|(a, b)| a.map(|a| (a, b)))
            .ok_or_else(|| config_err(format!("user {u:?} not found in the image's /etc/passwd")))?
    };
    let gid = match g {
        None => primary,
        Some(g) => Some(match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => read_rootfs_file(rootfs, "etc/group")
                .unwrap_or_default()
                .lines()
                .find_map(|l| {
                    let f: Vec<&str> = l.split(':').collect();
                    (f.len() > 2 && f[0] == g)
                        .then(|| f[2].parse().ok())
                        .flatten()
                })
                .ok_or_else(|| {
                    config_err(format!("group {g:?} not found in the image's /etc/group"))
                })?,
        }),
    };
    Ok((uid, gid))
}

fn caps_for(sc: Option<&SecurityContext>) -> Vec<String> {
    if sc.and_then(|s| s.privileged).unwrap_or(false) {
        return all_caps();
    }
    let norm = |c: &String| {
        let c = c.to_ascii_uppercase();
        if c == "ALL" || c.starts_with("CAP_") {
            c
        } else {
            format!("CAP_{c}")
        }
    };
    let mut caps: Vec<String> = DEFAULT_CAPS.iter().map(|s| s.to_string()).collect();
    if let Some(c) = sc.and_then(|s| s.capabilities.as_ref()) {
        let drop: Vec<String> = c.drop.iter().flatten().map(norm).collect();
        if drop.iter().any(|d| d == "ALL") {
            caps.clear();
        } else {
            caps.retain(|x| !drop.contains(x));
        }
        for a in c.add.iter().flatten().map(norm) {
            if a == "ALL" {
                caps = all_caps();
            } else if !caps.contains(&a) {
                caps.push(a);
            }
        }
    }
    caps
}

/// Build the OCI runtime spec.
pub fn generate(i: &SpecInput) -> Result<Generated, RuntimeError> {
    let c = i.container;
    let sc = c.security_context.as_ref();
    let psc = i.pod_security;
    let privileged = sc.and_then(|s| s.privileged).unwrap_or(false);

    let env = environment(c, i.image, i.extra_env, i.hostname);
    let args = process_args(c, i.image, &env)?;
    let cwd = c
        .working_dir
        .clone()
        .filter(|w| !w.is_empty())
        .or_else(|| {
            i.image
                .config()
                .as_ref()
                .and_then(|c| c.working_dir().clone())
                .filter(|w| !w.is_empty())
        })
        .unwrap_or_else(|| "/".into());
    if !cwd.starts_with('/') {
        return Err(config_err(format!("workingDir {cwd:?} is not absolute")));
    }

    // User: container security context, then pod's, then the image's.
    let image_user = i
        .image
        .config()
        .as_ref()
        .and_then(|c| c.user().clone())
        .filter(|u| !u.is_empty());
    let (mut uid, mut gid) = match image_user {
        Some(u) => resolve_user(&u, i.rootfs)?,
        None => (0, Some(0)),
    };
    if let Some(u) = sc
        .and_then(|s| s.run_as_user)
        .or(psc.and_then(|p| p.run_as_user))
    {
        uid = u32::try_from(u).map_err(|_| config_err(format!("runAsUser {u} out of range")))?;
        if gid.is_none() || image_user_is_none(i.image) {
            gid = Some(0);
        }
    }
    if let Some(g) = sc
        .and_then(|s| s.run_as_group)
        .or(psc.and_then(|p| p.run_as_group))
    {
        gid =
            Some(u32::try_from(g).map_err(|_| config_err(format!("runAsGroup {g} out of range")))?);
    }
    let gid = gid.unwrap_or(0);
    if sc
        .and_then(|s| s.run_as_non_root)
        .or(psc.and_then(|p| p.run_as_non_root))
        .unwrap_or(false)
        && uid == 0
    {
        return Err(config_err(format!(
            "container {:?} has runAsNonRoot and would run as root",
            c.name
        )));
    }
    let mut groups: Vec<i64> = psc
        .and_then(|p| p.supplemental_groups.clone())
        .unwrap_or_default();
    if let Some(fs_group) = psc.and_then(|p| p.fs_group) {
        groups.push(fs_group);
    }

    let caps = caps_for(sc);
    let allow_escalation = privileged
        || sc
            .and_then(|s| s.allow_privilege_escalation)
            .unwrap_or(false);
    let seccomp = !privileged
        && match sc
            .and_then(|s| s.seccomp_profile.as_ref())
            .or(psc.and_then(|p| p.seccomp_profile.as_ref()))
            .map(|p| p.type_.as_str())
        {
            None | Some("RuntimeDefault") => true,
            Some("Unconfined") => false,
            Some(other) => {
                return Err(config_err(format!(
                    "seccompProfile type {other:?} is not supported (RuntimeDefault or Unconfined)"
                )))
            }
        };
    let has_admin = caps.iter().any(|c| c == "CAP_SYS_ADMIN");
    let cgroup_view = (!i.cgroup_v2 && i.mounts_by_init).then_some(!privileged);
    // The init runs as the container's user; root owns the /dev tmpfs, so
    // only a root init can make the mount points there without
    // CAP_DAC_OVERRIDE. Other users get these mounts from libcontainer.
    let dev_by_init = i.mounts_by_init && uid == 0;
    let keep_admin =
        !has_admin && ((seccomp && allow_escalation) || cgroup_view.is_some() || dev_by_init);
    let mut permitted = caps.clone();
    if keep_admin {
        permitted.push("CAP_SYS_ADMIN".into());
    }
    // Capabilities for a non-root user stay out of the effective set, as in
    // containerd: they come back only through file capabilities or setuid.
    let effective = if uid == 0 { caps.clone() } else { vec![] };

    let read_only_root = sc
        .and_then(|s| s.read_only_root_filesystem)
        .unwrap_or(false);

    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", if privileged { "rw" } else { "ro" }]}),
        // The container's own cgroup, for programs that size themselves by
        // their limits (JVMs, Go's and .NET's runtimes), as containerd does.
        // On v1 that is one mount per hierarchy, which libcontainer makes
        // through pathrs at ~100 us each; edge-rt's init mounts them with
        // plain syscalls into this tmpfs instead (a quarter of the cost).
        // The tmpfs belongs to the container's user, who is the init by
        // then: it makes the hierarchies' directories without
        // CAP_DAC_OVERRIDE, and the init leaves it read-only.
        if cgroup_view.is_some() {
            json!({"destination": "/sys/fs/cgroup", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "noexec", "nodev", "mode=755", "size=64k", format!("uid={uid}"), format!("gid={gid}")]})
        } else {
            json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", if privileged { "rw" } else { "ro" }]})
        },
    ];
    // Fresh filesystems under the container's own /dev: libcontainer
    // mounts each through pathrs' verified walk (~100 us); the init, after
    // pivot_root, with plain mount(2), where no path can leave the
    // container's root.
    let mut init_mounts = Vec::new();
    for m in [DEV_PTS, DEV_MQUEUE, DEV_SHM] {
        if i.mounts.iter().any(|u| u.destination == m.destination) {
            continue; // a volume there (an emptyDir at /dev/shm) wins
        }
        if dev_by_init {
            init_mounts.push(m.for_init());
        } else {
            mounts.push(m.oci());
        }
    }
    for m in i.mounts {
        let mut opts = vec!["rbind", "rprivate"];
        if m.read_only {
            opts.push("ro");
        }
        mounts.push(json!({"destination": m.destination, "type": "bind", "source": m.source, "options": opts}));
    }

    let mut namespaces = vec![json!({"type": "pid"}), json!({"type": "mount"})];
    let ns = |kind: &str, path: &Option<PathBuf>| match path {
        Some(p) => json!({"type": kind, "path": p}),
        None => json!({"type": kind}),
    };
    if !i.host_network {
        namespaces.push(ns("network", &i.namespaces.network));
        namespaces.push(ns("uts", &i.namespaces.uts));
    }
    namespaces.push(ns("ipc", &i.namespaces.ipc));
    // A private cgroup namespace on v2 (the kubelet's default there), so
    // /sys/fs/cgroup shows the container's own cgroup as its root. On v1
    // too when the init mounts the view: mounted inside the namespace, each
    // hierarchy's root is the container's cgroup.
    if i.cgroup_v2 || cgroup_view.is_some() {
        namespaces.push(json!({"type": "cgroup"}));
    }

    let mut resources = serde_json::Map::new();
    let limits = c
        .resources
        .as_ref()
        .and_then(|r| r.limits.clone())
        .unwrap_or_default();
    let requests = c
        .resources
        .as_ref()
        .and_then(|r| r.requests.clone())
        .unwrap_or_default();
    let mut cpu = serde_json::Map::new();
    if let Some(q) = limits.get("cpu") {
        let m = cpu_millis(q)?;
        cpu.insert("period".into(), json!(100_000u64));
        cpu.insert("quota".into(), json!((m * 100).max(1000)));
    }
    if let Some(q) = requests.get("cpu").or(limits.get("cpu")) {
        let m = cpu_millis(q)?;
        cpu.insert("shares".into(), json!(((m * 1024) / 1000).max(2) as u64));
    }
    if !cpu.is_empty() {
        resources.insert("cpu".into(), Value::Object(cpu));
    }
    if let Some(q) = limits.get("memory") {
        let b = bytes(q)?;
        if b < 4 * 1024 * 1024 {
            return Err(config_err(format!(
                "memory limit {} is below the 4 MiB minimum",
                q.0
            )));
        }
        // Swap equal to the limit: no swap on top, so the limit is the limit.
        resources.insert("memory".into(), json!({"limit": b, "swap": b}));
    }
    if let Some(p) = i.pids_limit {
        resources.insert("pids".into(), json!({"limit": p}));
    }
    if i.cgroup_v2 {
        // An OOM kill takes the whole container, not one process of it, as
        // the kubelet sets it on v2: a half-killed container is worse.
        resources.insert("unified".into(), json!({"memory.oom.group": "1"}));
    }
    resources.insert(
        "devices".into(),
        if privileged {
            json!([{"allow": true, "access": "rwm"}])
        } else {
            json!([{"allow": false, "access": "rwm"}])
        },
    );

    let mut linux = json!({
        "cgroupsPath": i.cgroups_path,
        "namespaces": namespaces,
        "resources": Value::Object(resources),
    });
    if !privileged {
        linux["maskedPaths"] = json!(MASKED_PATHS);
        linux["readonlyPaths"] = json!(READONLY_PATHS);
    }

    let process = json!({
        "terminal": false,
        "user": {"uid": uid, "gid": gid, "additionalGids": groups},
        "args": args,
        "env": env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
        "cwd": cwd,
        "capabilities": {
            "bounding": caps,
            "effective": effective,
            "permitted": permitted,
            "inheritable": [],
            "ambient": [],
        },
        "noNewPrivileges": !allow_escalation,
    });
    let mut process = process;
    if allow_escalation {
        // libcontainer treats any present value as "set"; absent means allow.
        if let Some(o) = process.as_object_mut() {
            o.remove("noNewPrivileges");
        }
    }

    let spec = json!({
        "ociVersion": "1.0.2",
        "process": process,
        "root": {"path": i.rootfs, "readonly": read_only_root},
        "hostname": if i.host_network { Value::Null } else { json!(i.hostname) },
        "mounts": mounts,
        "linux": linux,
        "annotations": i.annotations,
    });
    Ok(Generated {
        spec,
        caps,
        seccomp,
        init_sys_admin: keep_admin,
        cgroup_view,
        init_mounts,
    })
}

fn image_user_is_none(image: &ImageConfiguration) -> bool {
    image
        .config()
        .as_ref()
        .and_then(|c| c.user().clone())
        .filter(|u| !u.is_empty())
        .is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(entry: &[&str], cmd: &[&str]) -> ImageConfiguration {
        serde_json::from_value(json!({
            "architecture": "amd64", "os": "linux",
            "config": {"Entrypoint": entry, "Cmd": cmd, "Env": ["PATH=/bin", "A=1"]},
            "rootfs": {"type": "layers", "diff_ids": []}
        }))
        .unwrap()
    }

    fn container(command: Option<&[&str]>, args: Option<&[&str]>) -> Container {
        Container {
            name: "c".into(),
            command: command.map(|v| v.iter().map(|s| s.to_string()).collect()),
            args: args.map(|v| v.iter().map(|s| s.to_string()).collect()),
            ..Default::default()
        }
    }

    #[test]
    fn kubernetes_entrypoint_and_cmd_rules() {
        let img = image(&["/ep"], &["cmd1"]);
        let env = BTreeMap::new();
        assert_eq!(
            process_args(&container(None, None), &img, &env).unwrap(),
            ["/ep", "cmd1"]
        );
        assert_eq!(
            process_args(&container(None, Some(&["x"])), &img, &env).unwrap(),
            ["/ep", "x"]
        );
        assert_eq!(
            process_args(&container(Some(&["/c"]), None), &img, &env).unwrap(),
            ["/c"]
        );
        assert_eq!(
            process_args(&container(Some(&["/c"]), Some(&["y"])), &img, &env).unwrap(),
            ["/c", "y"]
        );
        assert!(process_args(&container(None, None), &image(&[], &[]), &env).is_err());
    }

    #[test]
    fn variable_expansion() {
        let env = BTreeMap::from([("A".to_string(), "1".to_string())]);
        assert_eq!(expand("$(A)-$(B)-$$(A)-$", &env), "1-$(B)-$(A)-$");
    }

    #[test]
    fn quantities() {
        assert_eq!(cpu_millis(&Quantity("250m".into())).unwrap(), 250);
        assert_eq!(cpu_millis(&Quantity("1.5".into())).unwrap(), 1500);
        assert_eq!(bytes(&Quantity("64Mi".into())).unwrap(), 64 << 20);
        assert_eq!(bytes(&Quantity("1G".into())).unwrap(), 1_000_000_000);
        assert!(bytes(&Quantity("lots".into())).is_err());
    }

    fn input<'a>(c: &'a Container, img: &'a ImageConfiguration) -> SpecInput<'a> {
        SpecInput {
            container: c,
            pod_security: None,
            image: img,
            rootfs: Path::new("/nonexistent"),
            extra_env: &[],
            mounts: &[],
            namespaces: &NO_NAMESPACES,
            host_network: false,
            hostname: "p",
            cgroups_path: "/edge-rt/x",
            cgroup_v2: false,
            mounts_by_init: true,
            pids_limit: Some(10),
            annotations: BTreeMap::new(),
        }
    }

    static NO_NAMESPACES: SharedNamespaces = SharedNamespaces {
        network: None,
        ipc: None,
        uts: None,
    };

    #[test]
    fn spec_parses_as_oci() {
        let img = image(&["/bin/sh"], &[]);
        let c = container(None, None);
        let g = generate(&input(&c, &img)).unwrap();
        let spec: oci_spec::runtime::Spec = serde_json::from_value(g.spec).unwrap();
        assert_eq!(
            spec.process().as_ref().unwrap().no_new_privileges(),
            Some(true)
        );
        assert!(g.seccomp);
        // A root init on v1: the cgroup view and /dev's fresh filesystems
        // are its own, in a cgroup namespace, with CAP_SYS_ADMIN held for it.
        assert_eq!(g.cgroup_view, Some(true));
        let targets: Vec<&str> = g.init_mounts.iter().map(|m| m.target.as_str()).collect();
        assert_eq!(targets, ["/dev/pts", "/dev/mqueue", "/dev/shm"]);
        assert_eq!(
            g.init_mounts[0].data,
            "newinstance,ptmxmode=0666,mode=0620,gid=5"
        );
        assert!(g.init_sys_admin);
        let destinations = |spec: &oci_spec::runtime::Spec| -> Vec<String> {
            spec.mounts()
                .iter()
                .flatten()
                .map(|m| m.destination().display().to_string())
                .collect()
        };
        assert!(!destinations(&spec).contains(&"/dev/pts".to_string()));
        let ns = spec.linux().as_ref().unwrap().namespaces().clone().unwrap();
        assert!(ns
            .iter()
            .any(|n| n.typ() == oci_spec::runtime::LinuxNamespaceType::Cgroup));

        // The standard form: every mount in the spec, nothing left to the init.
        let standard = generate(&SpecInput {
            mounts_by_init: false,
            ..input(&c, &img)
        })
        .unwrap();
        assert!(standard.init_mounts.is_empty() && standard.cgroup_view.is_none());
        assert!(!standard.init_sys_admin);
        let spec: oci_spec::runtime::Spec = serde_json::from_value(standard.spec).unwrap();
        for d in ["/dev/pts", "/dev/mqueue", "/dev/shm", "/sys/fs/cgroup"] {
            assert!(destinations(&spec).contains(&d.to_string()), "{d}");
        }

        // A non-root init cannot make mount points in root's /dev.
        let mut user = c.clone();
        user.security_context = Some(SecurityContext {
            run_as_user: Some(1000),
            ..Default::default()
        });
        let g = generate(&input(&user, &img)).unwrap();
        assert!(g.init_mounts.is_empty() && g.cgroup_view.is_some());
    }
}
