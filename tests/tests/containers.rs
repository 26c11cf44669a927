//! Containers for real: libcontainer in-process, as root, from an image
//! built from busybox-static.

use std::time::{Duration, Instant};

use anyhow::Result;
use k8s_openapi::api::core::v1::{
    Capabilities, ResourceRequirements, SeccompProfile, SecurityContext,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use outrigger_tests::util::*;

#[tokio::test]
async fn exit_code_and_cri_log() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let env = Env::new()?;
    let img = busybox_image(&env.store)?;
    let rt = env.runtime()?;
    let p = pod("exitcode");
    let (rec, exit, lines) = run_to_exit(
        &rt,
        request(
            &p,
            &img,
            sh(
                "main",
                "echo out-line; echo err-line >&2; printf partial; exit 7",
            ),
        ),
    )
    .await?;
    assert_eq!(exit.exit_code, 7);
    assert_eq!(exit.reason, "Error");
    assert!(
        lines.contains(&("stdout".into(), "out-line".into())),
        "{lines:?}"
    );
    assert!(
        lines.contains(&("stderr".into(), "err-line".into())),
        "{lines:?}"
    );
    assert!(
        lines.contains(&("stdout".into(), "partial".into())),
        "{lines:?}"
    );
    assert!(rec.log_path.starts_with(&env.cfg.log_dir));
    assert_eq!(
        rt.get(&rec.id).and_then(|r| r.exit).map(|e| e.exit_code),
        Some(7)
    );
    let (_, ok, _) = run_to_exit(&rt, request(&p, &img, sh("ok", "true"))).await?;
    assert_eq!((ok.exit_code, ok.reason.as_str()), (0, "Completed"));
    // Waiting after the exit, with nobody waiting when it happened.
    let late = rt.run(request(&p, &img, sh("late", "exit 3")))?;
    wait_for("exit recorded", Duration::from_secs(10), || async {
        rt.get(&late.id).and_then(|r| r.exit)
    })
    .await?;
    let exit = tokio::time::timeout(Duration::from_secs(5), rt.wait(&late.id)).await??;
    assert_eq!(exit.exit_code, 3);
    teardown(&rt).await;
    Ok(())
}

#[tokio::test]
async fn oom_kill_is_reported() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let env = Env::new()?;
    let img = busybox_image(&env.store)?;
    let rt = env.runtime()?;
    let mut c = sh("hog", "exec dd if=/dev/zero of=/dev/null bs=64M count=1");
    c.resources = Some(ResourceRequirements {
        limits: Some([("memory".to_string(), Quantity("16Mi".into()))].into()),
        ..Default::default()
    });
    let (_, exit, lines) = run_to_exit(&rt, request(&pod("oom"), &img, c)).await?;
    assert_eq!(exit.reason, "OOMKilled", "{exit:?} {lines:?}");
    assert_eq!(exit.exit_code, 137);
    teardown(&rt).await;
    Ok(())
}

#[tokio::test]
async fn pids_limit_holds() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut env = Env::new()?;
    env.cfg.pids_limit = Some(12);
    let img = busybox_image(&env.store)?;
    let rt = env.runtime()?;
    // Try to start 40 sleepers; count how many processes the container holds.
    // Counting with a glob: no fork needed once the limit is reached.
    // A shell that fails to fork dies, so an inner one does the forking.
    let script = "sh -c 'i=0; while [ $i -lt 40 ]; do sleep 30 & i=$((i+1)); done' 2>/dev/null; set -- /proc/[0-9]*; echo $#";
    let (_, _, lines) = run_to_exit(&rt, request(&pod("pids"), &img, sh("forker", script))).await?;
    let count: usize = lines
        .iter()
        .filter(|(s, _)| s == "stdout")
        .find_map(|(_, l)| l.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no count in {lines:?}"))?;
    // init + sh + sleepers (+ ls and grep while counting) within the limit.
    assert!(count <= 12, "{count} processes under a limit of 12");
    assert!(count >= 8, "the limit should still allow some: {count}");
    teardown(&rt).await;
    Ok(())
}

#[tokio::test]
async fn sigterm_trap_gets_its_grace_period() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let env = Env::new()?;
    let img = busybox_image(&env.store)?;
    let rt = env.runtime()?;
    let script = "trap 'echo got-term; sleep 1; echo cleaned; exit 42' TERM; echo ready; while true; do sleep 0.1; done";
    let rec = rt.run(request(&pod("term"), &img, sh("trapper", script)))?;
    wait_for("ready", Duration::from_secs(10), || async {
        log_lines(&rec.log_path)
            .ok()
            .filter(|l| l.iter().any(|(_, c)| c == "ready"))
    })
    .await?;
    let exit = rt.stop(&rec.id, Duration::from_secs(10)).await?;
    assert_eq!(exit.exit_code, 42, "{exit:?}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let lines = log_lines(&rec.log_path)?;
    assert!(lines.iter().any(|(_, c)| c == "cleaned"), "{lines:?}");
    teardown(&rt).await;
    Ok(())
}

#[tokio::test]
async fn ignoring_sigterm_gets_killed_after_grace() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let env = Env::new()?;
    let img = busybox_image(&env.store)?;
    let rt = env.runtime()?;
    let script = "trap '' TERM; echo ready; while true; do sleep 0.1; done";
    let rec = rt.run(request(&pod("stubborn"), &img, sh("stubborn", script)))?;
    wait_for("ready", Duration::from_secs(10), || async {
        log_lines(&rec.log_path)
            .ok()
            .filter(|l| l.iter().any(|(_, c)| c == "ready"))
    })
    .await?;
    let t0 = Instant::now();
    let exit = rt.stop(&rec.id, Duration::from_millis(1500)).await?;
    let took = t0.elapsed();
    assert_eq!((exit.exit_code, exit.signal), (137, Some(9)), "{exit:?}");
    assert!(
        took >= Duration::from_millis(1500),
        "killed before the grace period ended: {took:?}"
    );
    teardown(&rt).await;
    Ok(())
}

fn ns_of(pid: i32, kind: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}"))
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

/// The pid of the workload (the init's child) of a container.
fn workload_pid(init: i32) -> i32 {
    let children =
        std::fs::read_to_string(format!("/proc/{init}/task/{init}/children")).unwrap_or_default();
    children
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(init)
}

#[tokio::test]
async fn pod_containers_share_net_ipc_uts_and_host_network_uses_the_hosts() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let env = Env::new()?;
    let img = busybox_image(&env.store)?;
    let rt = env.runtime()?;
    let p = pod("shared");
    let a = rt.run(request(&p, &img, sh("a", "hostname; sleep 30")))?;
    let b = rt.run(request(&p, &img, sh("b", "sleep 30")))?;
    let (pa, pb) = (a.pid.unwrap_or(0), b.pid.unwrap_or(0));
    let me = std::process::id() as i32;
    for kind in ["net", "ipc", "uts"] {
        assert_eq!(ns_of(pa, kind), ns_of(pb, kind), "{kind} shared in the pod");
        assert_ne!(ns_of(pa, kind), ns_of(me, kind), "{kind} not the host's");
    }
    assert_ne!(
        ns_of(pa, "pid"),
        ns_of(pb, "pid"),
        "each container has its own pid namespace"
    );
    wait_for("hostname in log", Duration::from_secs(5), || async {
        log_lines(&a.log_path)
            .ok()
            .filter(|l| l.iter().any(|(_, c)| c == "shared"))
    })
    .await?;

    let mut hp = pod("hostnet");
    hp.host_network = true;
    let h = rt.run(request(&hp, &img, sh("h", "sleep 30")))?;
    let ph = h.pid.unwrap_or(0);
    assert_eq!(
        ns_of(ph, "net"),
        ns_of(me, "net"),
        "hostNetwork uses the host's network"
    );
    assert_eq!(
        ns_of(ph, "uts"),
        ns_of(me, "uts"),
        "hostNetwork uses the host's UTS namespace"
    );
    assert_ne!(ns_of(ph, "ipc"), ns_of(me, "ipc"));
    teardown(&rt).await;
    Ok(())
}

#[tokio::test]
async fn security_context_is_enforced() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let env = Env::new()?;
    let img = busybox_image(&env.store)?;
    let rt = env.runtime()?;
    let p = pod("security");
    let probe = "id -u; id -g; grep -E '^(CapEff|CapPrm|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status; \
                 touch /rootfs-write && echo rootfs-writable || echo rootfs-readonly; \
                 unshare -n true 2>/dev/null && echo unshare-ok || echo unshare-denied; \
                 wc -c < /proc/kcore; echo 1 > /proc/sys/vm/drop_caches 2>/dev/null && echo procsys-writable || echo procsys-readonly";
    let field = |lines: &[(String, String)], key: &str| -> String {
        lines
            .iter()
            .find_map(|(_, l)| l.strip_prefix(key).map(|v| v.trim().to_string()))
            .unwrap_or_default()
    };
    let has = |lines: &[(String, String)], s: &str| lines.iter().any(|(_, l)| l == s);

    // Defaults: root, containerd's capabilities, no_new_privs, seccomp filter.
    let (_, _, d) = run_to_exit(&rt, request(&p, &img, sh("default", probe))).await?;
    assert_eq!(d[0].1, "0");
    assert_eq!(
        field(&d, "CapEff:"),
        "00000000a80425fb",
        "containerd's default set: {d:?}"
    );
    assert_eq!(
        field(&d, "CapPrm:"),
        "00000000a80425fb",
        "CAP_SYS_ADMIN edge-rt's init held (cgroup view on v1) is gone: {d:?}"
    );
    assert_eq!(field(&d, "NoNewPrivs:"), "1");
    assert_eq!(field(&d, "Seccomp:"), "2");
    assert!(
        has(&d, "rootfs-writable") && has(&d, "unshare-denied") && has(&d, "procsys-readonly"),
        "{d:?}"
    );
    assert!(has(&d, "0"), "/proc/kcore is masked: {d:?}");

    // runAsUser/runAsGroup, read-only root, all capabilities dropped.
    let mut c = sh("locked", probe);
    c.security_context = Some(SecurityContext {
        run_as_user: Some(1000),
        run_as_group: Some(3000),
        read_only_root_filesystem: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: Some(vec!["NET_BIND_SERVICE".into()]),
        }),
        ..Default::default()
    });
    let (_, _, l) = run_to_exit(&rt, request(&p, &img, c)).await?;
    assert_eq!(
        (l[0].1.as_str(), l[1].1.as_str()),
        ("1000", "3000"),
        "{l:?}"
    );
    assert_eq!(
        field(&l, "CapBnd:"),
        "0000000000000400",
        "only NET_BIND_SERVICE: {l:?}"
    );
    assert_eq!(
        field(&l, "CapEff:"),
        "0000000000000000",
        "non-root has no effective caps"
    );
    assert!(has(&l, "rootfs-readonly"), "{l:?}");

    // allowPrivilegeEscalation: no no_new_privs, still filtered.
    let mut c = sh("escalate", probe);
    c.security_context = Some(SecurityContext {
        allow_privilege_escalation: Some(true),
        ..Default::default()
    });
    let (_, _, l) = run_to_exit(&rt, request(&p, &img, c)).await?;
    assert_eq!(field(&l, "NoNewPrivs:"), "0", "{l:?}");
    assert_eq!(field(&l, "Seccomp:"), "2", "{l:?}");
    assert_eq!(
        field(&l, "CapEff:"),
        "00000000a80425fb",
        "the seccomp helper capability is gone: {l:?}"
    );
    assert_eq!(field(&l, "CapPrm:"), "00000000a80425fb", "{l:?}");

    // Unconfined: no filter, and still no CAP_SYS_ADMIN left over.
    let mut c = sh("unconfined", probe);
    c.security_context = Some(SecurityContext {
        seccomp_profile: Some(SeccompProfile {
            type_: "Unconfined".into(),
            ..Default::default()
        }),
        ..Default::default()
    });
    let (_, _, l) = run_to_exit(&rt, request(&p, &img, c)).await?;
    assert_eq!(field(&l, "Seccomp:"), "0", "{l:?}");
    assert_eq!(field(&l, "CapEff:"), "00000000a80425fb", "{l:?}");
    assert_eq!(field(&l, "CapPrm:"), "00000000a80425fb", "{l:?}");

    // Privileged: every capability, no seccomp, nothing masked.
    let mut c = sh("privileged", probe);
    c.security_context = Some(SecurityContext {
        privileged: Some(true),
        ..Default::default()
    });
    let (_, _, l) = run_to_exit(&rt, request(&p, &img, c)).await?;
    assert_eq!(field(&l, "Seccomp:"), "0", "{l:?}");
    assert_eq!(field(&l, "NoNewPrivs:"), "0", "{l:?}");
    assert!(has(&l, "unshare-ok"), "{l:?}");
    let own = std::fs::read_to_string("/proc/self/status")?;
    let own_bnd = own
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .unwrap_or_default()
        .trim()
        .to_string();
    assert_eq!(
        field(&l, "CapEff:"),
        own_bnd,
        "privileged holds everything edge-rt may grant: {l:?}"
    );
    teardown(&rt).await;
    Ok(())
}

fn c_limits() -> [(String, Quantity); 2] {
    [
        ("cpu".to_string(), Quantity("250m".into())),
        ("memory".to_string(), Quantity("32Mi".into())),
    ]
}

fn limits_of(l: &[(String, Quantity)]) -> Option<ResourceRequirements> {
    Some(ResourceRequirements {
        limits: Some(l.iter().cloned().collect()),
        ..Default::default()
    })
}

#[tokio::test]
async fn cpu_and_memory_limits_reach_the_cgroup() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let env = Env::new()?;
    let img = busybox_image(&env.store)?;
    let rt = env.runtime()?;
    let mut c = sh("limited", "sleep 30");
    c.resources = limits_of(&c_limits());
    let rec = rt.run(request(&pod("limits"), &img, c))?;
    let rel = rec.cgroup.trim_start_matches('/');
    if std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        let max = std::fs::read_to_string(format!("/sys/fs/cgroup/{rel}/cpu.max"))?;
        assert_eq!(max.trim(), "25000 100000");
        let mem = std::fs::read_to_string(format!("/sys/fs/cgroup/{rel}/memory.max"))?;
        assert_eq!(mem.trim(), (32u64 << 20).to_string());
    } else {
        let quota = std::fs::read_to_string(format!("/sys/fs/cgroup/cpu/{rel}/cpu.cfs_quota_us"))?;
        assert_eq!(quota.trim(), "25000");
        let mem =
            std::fs::read_to_string(format!("/sys/fs/cgroup/memory/{rel}/memory.limit_in_bytes"))?;
        assert_eq!(mem.trim(), (32u64 << 20).to_string());
    }
    let _ = workload_pid(rec.pid.unwrap_or(0));

    // The container sees its own limits at /sys/fs/cgroup, as programs that
    // size themselves by them expect (v1 layout here, v2 in the VM suite),
    // and cannot change them.
    let mut reader = sh(
        "reader",
        "cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max; \
         cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us 2>/dev/null || cut -d' ' -f1 /sys/fs/cgroup/cpu.max; \
         grep -c ' /sys/fs/cgroup' /proc/self/mountinfo; \
         mkdir /sys/fs/cgroup/x 2>/dev/null && echo view-writable || echo view-readonly; \
         (echo 1 > /sys/fs/cgroup/memory/memory.limit_in_bytes) 2>/dev/null && echo limit-writable || echo limit-readonly; \
         grep -E ' /dev/(pts|mqueue|shm) ' /proc/self/mountinfo | \
           awk '{ for (i = 7; i < NF; i++) if ($i == \"-\") { print $5, $(i + 1); break } }' | sort",
    );
    reader.resources = limits_of(&c_limits());
    let (_, exit, lines) = run_to_exit(&rt, request(&pod("reader"), &img, reader)).await?;
    assert_eq!(exit.exit_code, 0, "{lines:?}");
    let out: Vec<&str> = lines.iter().map(|(_, l)| l.as_str()).collect();
    assert_eq!(out[0], (32u64 << 20).to_string(), "{out:?}");
    assert_eq!(out[1], "25000", "{out:?}");
    let host_hierarchies = std::fs::read_to_string("/proc/self/cgroup")?
        .lines()
        .filter(|l| l.split(':').nth(1).is_some_and(|c| !c.is_empty()))
        .count();
    if host_hierarchies > 0 {
        // v1: the tmpfs and one mount per hierarchy, as on the host.
        assert_eq!(out[2], (host_hierarchies + 1).to_string(), "{out:?}");
    }
    assert_eq!(
        &out[3..],
        [
            "view-readonly",
            "limit-readonly",
            // Made by edge-rt's init, not libcontainer, for a root container.
            "/dev/mqueue mqueue",
            "/dev/pts devpts",
            "/dev/shm tmpfs",
        ],
        "{out:?}"
    );
    teardown(&rt).await;
    Ok(())
}

#[tokio::test]
async fn logs_rotate_by_size() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut env = Env::new()?;
    env.cfg.log_max_bytes = 4096;
    env.cfg.log_max_files = 3;
    let img = busybox_image(&env.store)?;
    let rt = env.runtime()?;
    let (rec, exit, _) = run_to_exit(
        &rt,
        request(
            &pod("chatty"),
            &img,
            sh("chatty", "for i in $(seq 500); do echo line-$i; done"),
        ),
    )
    .await?;
    assert_eq!(exit.exit_code, 0);
    let live = log_lines(&rec.log_path)?;
    assert_eq!(live.last().map(|l| l.1.as_str()), Some("line-500"));
    let mut rotated = rec.log_path.clone().into_os_string();
    rotated.push(".1");
    assert!(std::path::Path::new(&rotated).exists());
    let mut third = rec.log_path.clone().into_os_string();
    third.push(".3");
    assert!(!std::path::Path::new(&third).exists(), "at most 3 files");
    assert!(std::fs::metadata(&rec.log_path)?.len() <= 4096);
    teardown(&rt).await;
    Ok(())
}

#[tokio::test]
async fn exec_runs_inside_the_container_and_returns_its_exit_code() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let env = Env::new()?;
    let img = busybox_image(&env.store)?;
    let rt = env.runtime()?;
    let mut c = sh("target", "sleep 30");
    c.security_context = Some(SecurityContext {
        run_as_user: Some(1000),
        ..Default::default()
    });
    let rec = rt.run(request(&pod("execpod"), &img, c))?;
    let script = "echo hi; hostname; id -u; ls /proc | grep -c '^[0-9]'; exit 5";
    let args: Vec<String> = ["sh", "-c", script].iter().map(|s| s.to_string()).collect();
    let (code, out) = rt
        .exec_capture(&rec.id, &args, Duration::from_secs(10), 4096)
        .await?
        .expect("finished in time");
    assert_eq!(code, 5, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    // The container's UTS namespace, user, and PID namespace (its init, the
    // sleeper and this shell: a handful, not the host's hundreds).
    assert_eq!(&lines[..3], &["hi", "execpod", "1000"], "{out}");
    let procs: usize = lines[3].parse()?;
    assert!(procs <= 5, "{out}");

    // A command that does not finish in time is killed.
    let slow: Vec<String> = ["sleep", "30"].iter().map(|s| s.to_string()).collect();
    let t0 = std::time::Instant::now();
    assert!(rt
        .exec_capture(&rec.id, &slow, Duration::from_millis(300), 4096)
        .await?
        .is_none());
    assert!(t0.elapsed() < Duration::from_secs(5));
    teardown(&rt).await;
    Ok(())
}
