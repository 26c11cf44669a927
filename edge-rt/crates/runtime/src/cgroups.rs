//! The little edge-rt reads from cgroups itself (libcontainer writes the
//! limits): OOM kill counters and cleanup of the per-pod parents that
//! libcontainer leaves behind. Works on v1, v2 and hybrid hierarchies.

use std::fs;
use std::path::{Path, PathBuf};

const ROOT: &str = "/sys/fs/cgroup";

/// A unified (v2-only) hierarchy is mounted at the root.
pub fn is_unified() -> bool {
    Path::new(ROOT).join("cgroup.controllers").exists()
}

fn memory_dir(cgroup: &str) -> PathBuf {
    let rel = cgroup.trim_start_matches('/');
    if is_unified() {
        Path::new(ROOT).join(rel)
    } else {
        Path::new(ROOT).join("memory").join(rel)
    }
}

/// Make the v1 cpuset parent of all containers hand its CPUs and memory
/// nodes down to every new child (`cgroup.clone_children`).
///
/// A v1 cpuset starts empty and no task can join it until `cpuset.cpus` is
/// written; libcgroups (like runc) then copies the parent's value, and that
/// write makes the kernel rebuild its scheduling domains: ~0.2 ms of every
/// container start here, more on machines with many CPUs. A child cloned
/// from its parent is born populated, so nothing is written and nothing
/// rebuilt. Best effort: without it containers still start, only slower.
pub fn prepare_parent(parent: &str) {
    if is_unified() {
        return;
    }
    let root = Path::new(ROOT).join("cpuset");
    if !root.join("cpuset.cpus").exists() {
        return;
    }
    let mut dir = root.clone();
    for part in Path::new(parent.trim_start_matches('/')).components() {
        let up = dir.clone();
        dir.push(part);
        if let Err(e) = fs::create_dir_all(&dir) {
            tracing::debug!(dir = %dir.display(), "cpuset parent not prepared: {e}");
            return;
        }
        for file in ["cpuset.cpus", "cpuset.mems"] {
            let empty = fs::read_to_string(dir.join(file)).map_or(true, |v| v.trim().is_empty());
            if empty {
                if let Ok(v) = fs::read_to_string(up.join(file)) {
                    let _ = fs::write(dir.join(file), v.trim());
                }
            }
        }
    }
    if let Err(e) = fs::write(dir.join("cgroup.clone_children"), "1") {
        tracing::debug!(dir = %dir.display(), "cgroup.clone_children not set: {e}");
    }
}

/// How many times the kernel's OOM killer struck in this cgroup.
pub fn oom_kills(cgroup: &str) -> u64 {
    let dir = memory_dir(cgroup);
    let (file, key) = if is_unified() {
        ("memory.events", "oom_kill")
    } else {
        ("memory.oom_control", "oom_kill")
    };
    fs::read_to_string(dir.join(file))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(key).and_then(|v| v.trim().parse().ok()))
        })
        .unwrap_or(0)
}

/// Remove a pod's (now empty) cgroup directories in every hierarchy.
pub fn remove_pod(parent: &str, pod: &str) {
    let rel = Path::new(parent.trim_start_matches('/')).join(pod);
    let mut dirs = vec![Path::new(ROOT).join(&rel)];
    if let Ok(rd) = fs::read_dir(ROOT) {
        for e in rd.flatten() {
            dirs.push(e.path().join(&rel));
        }
    }
    for d in dirs {
        if d.is_dir() {
            // Children first; rmdir only succeeds on empty cgroups, as it should.
            if let Ok(rd) = fs::read_dir(&d) {
                for e in rd.flatten() {
                    if e.path().is_dir() {
                        let _ = fs::remove_dir(e.path());
                    }
                }
            }
            let _ = fs::remove_dir(&d);
        }
    }
}

/// What a cgroup has used, as its controllers count it (None: not
/// readable, e.g. a controller not mounted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    /// CPU time, all of it, in nanoseconds.
    pub cpu_ns: Option<u64>,
    pub memory: Option<Memory>,
    /// Tasks in it now.
    pub pids: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Memory {
    pub usage: u64,
    /// Usage less inactive file pages (what the kubelet counts).
    pub working_set: u64,
    pub rss: u64,
    pub page_faults: u64,
    pub major_page_faults: u64,
}

fn read_u64(p: &Path) -> Option<u64> {
    fs::read_to_string(p).ok()?.trim().parse().ok()
}

/// `key value` lines (cpu.stat, memory.stat).
fn stat_of(p: &Path) -> Option<Vec<(String, u64)>> {
    let s = fs::read_to_string(p).ok()?;
    Some(
        s.lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(' ')?;
                Some((k.to_string(), v.trim().parse().ok()?))
            })
            .collect(),
    )
}

fn get(stat: &[(String, u64)], key: &str) -> u64 {
    stat.iter().find(|(k, _)| k == key).map_or(0, |(_, v)| *v)
}

/// What `cgroup` (a path as in a container record) has used. Reads a few
/// small files: cheap enough to do on request.
pub fn usage(cgroup: &str) -> Usage {
    let rel = cgroup.trim_start_matches('/');
    let root = Path::new(ROOT);
    if is_unified() {
        let dir = root.join(rel);
        let cpu_ns = stat_of(&dir.join("cpu.stat")).map(|s| get(&s, "usage_usec") * 1000);
        let memory = read_u64(&dir.join("memory.current")).map(|usage| {
            let s = stat_of(&dir.join("memory.stat")).unwrap_or_default();
            Memory {
                usage,
                working_set: usage.saturating_sub(get(&s, "inactive_file")),
                rss: get(&s, "anon"),
                page_faults: get(&s, "pgfault"),
                major_page_faults: get(&s, "pgmajfault"),
            }
        });
        return Usage {
            cpu_ns,
            memory,
            pids: read_u64(&dir.join("pids.current")),
        };
    }
    let cpu_ns = ["cpuacct", "cpu,cpuacct"]
        .iter()
        .find_map(|c| read_u64(&root.join(c).join(rel).join("cpuacct.usage")));
    let mem = root.join("memory").join(rel);
    let memory = read_u64(&mem.join("memory.usage_in_bytes")).map(|usage| {
        let s = stat_of(&mem.join("memory.stat")).unwrap_or_default();
        Memory {
            usage,
            working_set: usage.saturating_sub(get(&s, "total_inactive_file")),
            rss: get(&s, "total_rss"),
            page_faults: get(&s, "total_pgfault"),
            major_page_faults: get(&s, "total_pgmajfault"),
        }
    });
    Usage {
        cpu_ns,
        memory,
        pids: read_u64(&root.join("pids").join(rel).join("pids.current")),
    }
}

#[cfg(test)]
mod usage_tests {
    use super::*;

    #[test]
    fn stat_files_are_read_by_key() {
        let p = std::env::temp_dir().join(format!("memory.stat.{}", std::process::id()));
        fs::write(&p, "anon 4096\ninactive_file 100\nbogus\npgfault 7\n").unwrap();
        let s = stat_of(&p).unwrap();
        let _ = fs::remove_file(&p);
        assert_eq!(get(&s, "anon"), 4096);
        assert_eq!(get(&s, "pgfault"), 7);
        assert_eq!(get(&s, "missing"), 0);
    }
}
