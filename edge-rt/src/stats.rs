//! The node's resource statistics, measured when asked (`kubectl top`
//! through cloud-gw's `/metrics/resource`, `/stats/summary`): CPU and
//! memory of the machine (`/proc`), of each pod and container (their
//! cgroups, v1 or v2), filesystems (statfs), containers' writable layers
//! and logs (their sizes on disk; a writable layer is walked at most once
//! a minute), and the CPU rate since the last look.
//!
//! Nothing runs between requests: the cost is the few small files read per
//! container when metrics-server scrapes (every 15 s by default).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use outrigger_proto::stats::{
    ContainerStats, CpuStats, FsStats, MemoryStats, NodeStats, PodReference, PodStats,
    ProcessStats, RlimitStats, RuntimeStats, Summary,
};

use crate::pods::{self, PodManager};
use crate::runtime::cgroups;

/// A writable layer's size is walked again after this long.
const WALK_EVERY: Duration = Duration::from_secs(60);

/// What the last look saw: CPU time by cgroup (for rates), and writable
/// layer sizes by container id (walks are not cheap).
#[derive(Default)]
struct Seen {
    cpu: HashMap<String, (Instant, u64)>,
    layers: HashMap<String, (Instant, u64)>,
}

static SEEN: Mutex<Option<Seen>> = Mutex::new(None);

fn seen<T>(f: impl FnOnce(&mut Seen) -> T) -> T {
    let mut g = SEEN.lock().unwrap_or_else(|p| p.into_inner());
    f(g.get_or_insert_with(Seen::default))
}

fn now_rfc3339() -> String {
    format!("{:.3}", jiff::Timestamp::now())
}

/// CPU stats of a total, with the rate since the last look at `key`.
fn cpu(key: &str, total_ns: u64, time: &str) -> CpuStats {
    cpu_at(key, total_ns, time, Instant::now())
}

fn cpu_at(key: &str, total_ns: u64, time: &str, now: Instant) -> CpuStats {
    let rate = seen(|s| {
        let before = s.cpu.insert(key.to_string(), (now, total_ns));
        before.and_then(|(t, n)| {
            let dt = now.duration_since(t).as_nanos();
            (dt > 0 && total_ns >= n).then(|| ((total_ns - n) as u128 * 1_000_000_000 / dt) as u64)
        })
    });
    CpuStats {
        time: time.to_string(),
        usage_nano_cores: rate,
        usage_core_nano_seconds: Some(total_ns),
    }
}

fn memory(m: &cgroups::Memory, time: &str, limit: Option<u64>) -> MemoryStats {
    MemoryStats {
        time: time.to_string(),
        available_bytes: limit.map(|l| l.saturating_sub(m.working_set)),
        usage_bytes: Some(m.usage),
        working_set_bytes: Some(m.working_set),
        rss_bytes: Some(m.rss),
        page_faults: Some(m.page_faults),
        major_page_faults: Some(m.major_page_faults),
    }
}

/// A filesystem's size and free space.
fn fs_of(path: &Path, time: &str, used: Option<u64>) -> Option<FsStats> {
    let st = nix::sys::statvfs::statvfs(path).ok()?;
    // u32 on 32-bit targets: widen before multiplying.
    #[allow(clippy::unnecessary_cast)]
    let (frag, blocks, avail, files, ffree) = (
        st.fragment_size() as u64,
        st.blocks() as u64,
        st.blocks_available() as u64,
        st.files() as u64,
        st.files_free() as u64,
    );
    Some(FsStats {
        time: time.to_string(),
        capacity_bytes: Some(blocks * frag),
        available_bytes: Some(avail * frag),
        used_bytes: used.or(Some(blocks.saturating_sub(st.blocks_free() as u64) * frag)),
        inodes: Some(files),
        inodes_free: Some(ffree),
        inodes_used: Some(files.saturating_sub(ffree)),
    })
}

/// The machine's CPU time (all CPUs, not idle or waiting), from /proc/stat.
fn node_cpu_ns(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest is in user).
    let busy = [0, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|&i| f.get(i))
        .sum::<u64>();
    // SAFETY: sysconf reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as u64 } else { 100 };
    Some(busy * (1_000_000_000 / hz))
}

/// The machine's memory from /proc/meminfo: (total, as a cgroup's usage).
fn node_memory(meminfo: &str) -> Option<(u64, cgroups::Memory)> {
    let kib = |k: &str| -> Option<u64> {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map(|v| v * 1024)
    };
    let total = kib("MemTotal")?;
    let usage = total.saturating_sub(kib("MemFree")?);
    Some((
        total,
        cgroups::Memory {
            usage,
            working_set: usage.saturating_sub(kib("Inactive(file)").unwrap_or(0)),
            rss: kib("AnonPages").unwrap_or(0),
            page_faults: 0,
            major_page_faults: 0,
        },
    ))
}

/// The size on disk of a container's writable layer, walked at most once
/// a minute (off the runtime thread).
async fn layer_size(id: &str, path: std::path::PathBuf) -> Option<u64> {
    let cached = seen(|s| s.layers.get(id).copied());
    if let Some((at, n)) = cached {
        if at.elapsed() < WALK_EVERY {
            return Some(n);
        }
    }
    let n = crate::sys::blocking(move || crate::image::dir_size(&path).ok())
        .await
        .ok()
        .flatten()?;
    seen(|s| s.layers.insert(id.to_string(), (Instant::now(), n)));
    Some(n)
}

/// Bytes of a container's log files (the live one and rotated ones).
async fn logs_size(log_path: &Path) -> u64 {
    let mut n = 0;
    for f in crate::runtime::logs::files_of(log_path) {
        n += crate::sys::fs::metadata(&f)
            .await
            .map(|m| m.len())
            .unwrap_or(0);
    }
    n
}

/// The statistics of this node and its running pods, now.
pub async fn summary(pods: &PodManager) -> Summary {
    let ctx = pods.context();
    let time = now_rfc3339();
    let proc = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let stat = proc("/proc/stat");
    let start_time = stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse::<i64>().ok())
        .and_then(|s| jiff::Timestamp::from_second(s).ok())
        .map(|t| format!("{t:.0}"));
    let mem = node_memory(&proc("/proc/meminfo"));
    let state_dir = ctx.rt.config().state_dir.clone();
    let node = NodeStats {
        node_name: ctx.node.node_name.clone(),
        start_time,
        cpu: node_cpu_ns(&stat).map(|n| cpu("", n, &time)),
        memory: mem
            .as_ref()
            .map(|(total, m)| memory(m, &time, Some(*total))),
        fs: fs_of(&ctx.volumes_root, &time, None),
        runtime: Some(RuntimeStats {
            image_fs: fs_of(ctx.images.root(), &time, None),
            container_fs: fs_of(&state_dir, &time, None),
        }),
        rlimit: Some(RlimitStats {
            time: time.clone(),
            maxpid: proc("/proc/sys/kernel/pid_max").trim().parse().ok(),
            // loadavg's fourth field: running/total tasks.
            curproc: proc("/proc/loadavg")
                .split_whitespace()
                .nth(3)
                .and_then(|f| f.split('/').nth(1)?.parse().ok()),
        }),
    };
    let records = ctx.rt.list();
    let mut out = Vec::new();
    for pod in pods.list() {
        let uid = pods::uid(&pod).to_string();
        let running: Vec<_> = records
            .iter()
            .filter(|r| r.pod.uid == uid && r.exit.is_none())
            .collect();
        let Some(first) = running.first() else {
            continue;
        };
        let mut containers = Vec::new();
        let mut ephemeral = 0u64;
        for r in &running {
            let u = cgroups::usage(&r.cgroup);
            let layer = layer_size(&r.id, ctx.rt.writable_layer(&r.id)).await;
            let logs = logs_size(&r.log_path).await;
            ephemeral += layer.unwrap_or(0) + logs;
            containers.push(ContainerStats {
                name: r.name.clone(),
                start_time: r.started_at.clone(),
                cpu: u.cpu_ns.map(|n| cpu(&r.cgroup, n, &time)),
                memory: u.memory.as_ref().map(|m| memory(m, &time, None)),
                rootfs: fs_of(&state_dir, &time, layer),
                logs: fs_of(&r.log_path, &time, Some(logs)),
            });
        }
        // The pod's cgroup holds its containers: the parent of theirs.
        let pod_cgroup = Path::new(&first.cgroup)
            .parent()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let u = cgroups::usage(&pod_cgroup);
        out.push(PodStats {
            pod_ref: PodReference {
                name: pod.metadata.name.clone().unwrap_or_default(),
                namespace: pods::namespace(&pod).to_string(),
                uid,
            },
            start_time: pod
                .status
                .as_ref()
                .and_then(|s| s.start_time.as_ref())
                .map(|t| format!("{:.0}", t.0)),
            containers,
            cpu: u.cpu_ns.map(|n| cpu(&pod_cgroup, n, &time)),
            memory: u.memory.as_ref().map(|m| memory(m, &time, None)),
            ephemeral_storage: fs_of(&state_dir, &time, Some(ephemeral)),
            process_stats: u.pids.map(|n| ProcessStats {
                process_count: Some(n),
            }),
        });
    }
    // Rates of cgroups gone since are forgotten.
    seen(|s| {
        s.cpu
            .retain(|k, (at, _)| k.is_empty() || at.elapsed() < Duration::from_secs(600));
        s.layers.retain(|id, _| records.iter().any(|r| &r.id == id));
    });
    Summary { node, pods: out }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_as_the_kernel_writes_them() {
        let stat = "cpu  100 5 50 9000 10 1 2 3 0 0\ncpu0 1 2 3 4\nbtime 1700000000\n";
        // SAFETY: sysconf reads a constant.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        assert_eq!(node_cpu_ns(stat), Some(161 * (1_000_000_000 / hz)));
        let meminfo = "MemTotal:        1000 kB\nMemFree:          200 kB\nAnonPages:  300 kB\nInactive(file):  100 kB\n";
        let (total, m) = node_memory(meminfo).unwrap();
        assert_eq!(total, 1_024_000);
        assert_eq!(m.usage, 800 * 1024);
        assert_eq!(m.working_set, 700 * 1024);
        assert_eq!(m.rss, 300 * 1024);
        assert!(node_memory("nothing").is_none());
    }

    #[test]
    fn cpu_rates_come_from_the_last_look() {
        let t0 = Instant::now();
        let first = cpu_at("test-cgroup", 1_000, "t", t0);
        assert_eq!(first.usage_nano_cores, None);
        let t1 = t0 + Duration::from_millis(20);
        // 10 ms of CPU in 20 ms: half a core.
        let second = cpu_at("test-cgroup", 1_000 + 10_000_000, "t", t1);
        assert_eq!(second.usage_nano_cores, Some(500_000_000));
        // A counter that went back (a new cgroup of that name): no rate.
        let t2 = t1 + Duration::from_millis(20);
        assert_eq!(cpu_at("test-cgroup", 5, "t", t2).usage_nano_cores, None);
    }
}
