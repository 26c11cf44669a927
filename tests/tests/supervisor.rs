//! edge-rt as a process: re-adopting containers after a SIGKILL, reloading
//! on SIGHUP, and as PID 1 of a PID namespace (reaping orphans, shutting
//! down on SIGTERM).

use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use outrigger_tests::util::*;

fn pod(name: &str, container: &str, script: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  containers:\n  - name: {container}\n    image: busybox:latest\n    imagePullPolicy: Never\n    command: [\"sh\", \"-c\", {script:?}]\n"
    )
}

fn log_has(node: &Node, container: &str, text: &str) -> bool {
    node.record(container)
        .and_then(|r| log_lines(&r.log_path).ok())
        .is_some_and(|l| l.iter().any(|(_, c)| c == text))
}

fn spawn(node: &Node) -> Result<Child> {
    Ok(node.command().stdin(Stdio::null()).spawn()?)
}

#[tokio::test]
async fn sigkilled_edge_rt_readopts_its_containers_and_learns_their_exit() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let node = Node::new()?;
    std::fs::write(
        node.manifests.join("survivor.yaml"),
        pod(
            "survivor",
            "main",
            "echo before; sleep 3; echo after; exit 7",
        ),
    )?;
    std::fs::write(
        node.manifests.join("keeper.yaml"),
        pod("keeper", "keeper", "echo up; sleep 120"),
    )?;
    let mut first = spawn(&node)?;
    wait_for("container output", Duration::from_secs(30), || async {
        log_has(&node, "main", "before").then_some(())
    })
    .await?;
    let pid = node.record("main").and_then(|r| r.pid).context("pid")?;

    first.kill()?; // SIGKILL: no chance to clean up
    first.wait()?;
    assert!(pid_alive(pid), "the container outlives edge-rt");

    let mut second = spawn(&node)?;
    let exit = wait_for(
        "exit code after re-adoption",
        Duration::from_secs(30),
        || async { node.record("main").and_then(|r| r.exit) },
    )
    .await?;
    assert_eq!(exit.exit_code, 7, "{exit:?}");
    assert!(
        log_has(&node, "main", "after"),
        "logs kept flowing across the restart"
    );
    let keeper = node.record("keeper").context("keeper")?;
    assert!(keeper.exit.is_none());

    // SIGHUP: a new manifests directory applies without a restart.
    let more = node.dir.path().join("more-pods");
    std::fs::create_dir_all(&more)?;
    std::fs::write(
        more.join("late.yaml"),
        pod("late", "late", "echo late; sleep 60"),
    )?;
    // The keeper moves along (same manifest, same pod: it is not restarted).
    std::fs::copy(node.manifests.join("keeper.yaml"), more.join("keeper.yaml"))?;
    let cfg = std::fs::read_to_string(&node.config)?.replace(
        &format!("manifests_dir = {:?}", node.manifests),
        &format!("manifests_dir = {more:?}"),
    );
    std::fs::write(&node.config, cfg)?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(second.id() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )?;
    wait_for(
        "pod from the reloaded directory",
        Duration::from_secs(20),
        || async { log_has(&node, "late", "late").then_some(()) },
    )
    .await?;

    // SIGTERM to the service: edge-rt exits, the pods run on.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(second.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let status = second.wait()?;
    assert!(status.success(), "{status:?}");
    assert!(
        keeper.pid.is_some_and(pid_alive),
        "containers keep running when the service stops"
    );
    assert_eq!(
        node.record("keeper").and_then(|r| r.pid),
        keeper.pid,
        "the same keeper container throughout"
    );
    node.cleanup().await?;
    Ok(())
}

/// Children of `pid` in state Z.
fn zombie_children(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
            continue;
        };
        let f: Vec<&str> = rest.split(' ').collect();
        if f.len() > 1 && f[0] == "Z" && f[1] == pid.to_string() {
            if let Some(p) = e.file_name().to_str().and_then(|s| s.parse().ok()) {
                out.push(p);
            }
        }
    }
    out
}

#[tokio::test]
async fn as_pid1_it_reaps_orphans_and_shuts_down_on_sigterm() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let node = Node::new()?;
    std::fs::write(
        node.manifests.join("app.yaml"),
        pod("app", "app", "echo up; sleep 300"),
    )?;
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["--pid", "--fork", "--mount", "--mount-proc", "--"])
        .arg(edge_rt_bin())
        .arg("--config")
        .arg(&node.config)
        .arg("run");
    let mut outer = cmd.stdin(Stdio::null()).spawn()?;
    let init = wait_for("edge-rt as PID 1", Duration::from_secs(10), || async {
        let children =
            std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", outer.id())).ok()?;
        children.split_whitespace().next()?.parse::<i32>().ok()
    })
    .await?;
    let status = std::fs::read_to_string(format!("/proc/{init}/status"))?;
    let nspid = status
        .lines()
        .find(|l| l.starts_with("NSpid:"))
        .unwrap_or_default()
        .to_string();
    assert!(
        nspid.trim_end().ends_with("\t1"),
        "edge-rt is PID 1 in its namespace: {nspid}"
    );
    wait_for("app running", Duration::from_secs(30), || async {
        log_has(&node, "app", "up").then_some(())
    })
    .await?;

    // Orphans in its namespace become its children and must be reaped.
    let out = std::process::Command::new("nsenter")
        .args([
            "-t",
            &init.to_string(),
            "-p",
            "-m",
            "--",
            "sh",
            "-c",
            "for i in 1 2 3 4 5; do sleep 1 >/dev/null 2>&1 & done; exit 0",
        ])
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let adopted = std::fs::read_dir("/proc")?
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|s| {
            s.contains("(sleep)")
                && s.rfind(')')
                    .is_some_and(|i| s[i + 2..].split(' ').nth(1) == Some(&init.to_string()))
        })
        .count();
    assert!(adopted >= 1, "orphans were reparented to edge-rt");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        zombie_children(init).is_empty(),
        "zombies left: {:?}",
        zombie_children(init)
    );

    // SIGTERM to init: containers are stopped, then the "machine" (here the
    // PID namespace) goes down.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(init),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while outer.try_wait()?.is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the PID namespace did not shut down"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rec = node.record("app").context("app record")?;
    let exit = rec
        .exit
        .context("the container was stopped and its exit recorded before shutdown")?;
    assert_eq!(exit.exit_code, 143, "{exit:?}");
    node.cleanup().await?;
    Ok(())
}
