//! Standalone mode end to end: the `edge-rt run` binary with a manifest
//! directory, observed through the CLI over the local socket.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use outrigger_tests::util::*;

#[tokio::test]
async fn the_manifest_directory_is_watched_and_a_bad_manifest_spares_the_rest() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let node = Node::new()?;
    let daemon = node.start().await?;
    std::fs::write(
        node.manifests.join("good.yaml"),
        manifest("good", "sleep 300", ""),
    )?;
    // One file, two documents: the first valid, the second broken in one field.
    std::fs::write(
        node.manifests.join("mixed.yaml"),
        format!(
            "{}---\n{}",
            manifest("also-good", "sleep 300", ""),
            manifest("broken", "true", "  restartPolicy: Sometimes\n")
        ),
    )?;
    std::fs::write(node.manifests.join("garbage.yaml"), "kind: Pod\nspec: [")?;

    let t0 = Instant::now();
    let good = wait_pod(&node, "good", "good running", |p| phase(p) == "Running").await?;
    // inotify, not a rescan: well under the 30 s rescan period.
    assert!(t0.elapsed() < Duration::from_secs(10));
    wait_pod(&node, "also-good", "also-good running", |p| {
        phase(p) == "Running"
    })
    .await?;
    let log = node.daemon_log();
    assert!(
        log.contains("mixed.yaml (document 2)") && log.contains("spec.restartPolicy"),
        "the error names the file, document and field:\n{log}"
    );
    assert!(log.contains("garbage.yaml"), "{log}");
    assert!(find(&node.pods()?, "broken").is_none());

    // The table, as kubectl shows it.
    let table = text(&node.cli(&["pods"])?);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("good") && l.contains("1/1") && l.contains("Running")),
        "{table}"
    );

    // A change is a new pod (the kubelet's static pod rule): the old stops.
    let old_uid = good.metadata.uid.clone();
    std::fs::write(
        node.manifests.join("good.yaml"),
        manifest("good", "sleep 301", ""),
    )?;
    wait_pod(&node, "good", "good replaced", |p| {
        p.metadata.uid != old_uid && phase(p) == "Running"
    })
    .await?;
    // Removal: the pod and its containers go.
    std::fs::remove_file(node.manifests.join("mixed.yaml"))?;
    wait_for("also-good removed", Duration::from_secs(30), || async {
        node.pods().ok().filter(|v| find(v, "also-good").is_none())
    })
    .await?;
    wait_for("its container removed", Duration::from_secs(30), || async {
        (!node.records().iter().any(|r| r.pod.name == "also-good")).then_some(())
    })
    .await?;
    let running: Vec<_> = node
        .records()
        .into_iter()
        .filter(|r| r.pod.name == "good" && r.exit.is_none())
        .collect();
    assert_eq!(running.len(), 1, "only the new good runs");

    // The socket is root's alone (no api group configured).
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(node.state.join("edge-rt.sock"))?
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // describe and status.
    let d = text(&node.cli(&["describe", "pod", "good"])?);
    assert!(
        d.contains("Name:         good") && d.contains("Started"),
        "{d}"
    );
    let s = text(&node.cli(&["status"])?);
    assert!(s.contains("Pods:        1 (1 Running)"), "{s}");

    drop(daemon);
    node.cleanup().await?;
    Ok(())
}

#[tokio::test]
async fn logs_follow_tail_and_previous() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let node = Node::new()?;
    let daemon = node.start().await?;
    std::fs::write(
        node.manifests.join("counter.yaml"),
        manifest(
            "counter",
            "i=0; while [ $i -lt 15 ]; do echo line $i; i=$((i+1)); sleep 0.1; done; exit 1",
            "",
        ),
    )?;
    wait_pod(&node, "counter", "running", |p| phase(p) == "Running").await?;

    // -f prints lines as they come and ends when the container does.
    let t0 = Instant::now();
    let out = node.cli(&["logs", "counter", "-f"])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<String> = text(&out).lines().map(str::to_string).collect();
    let want: Vec<String> = (0..15).map(|i| format!("line {i}")).collect();
    assert_eq!(lines, want);
    assert!(t0.elapsed() >= Duration::from_millis(300), "it followed");

    // Restarted (exit 1 under Always): --previous shows the first run.
    wait_pod(&node, "counter", "restarted", |p| {
        p.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .is_some_and(|c| c[0].restart_count >= 1)
    })
    .await?;
    let prev = text(&node.cli(&["logs", "counter", "--previous", "--tail", "2"])?);
    assert_eq!(prev, "line 13\nline 14\n");
    let err = node.cli(&["logs", "nosuch"])?;
    assert!(!err.status.success());
    assert!(String::from_utf8_lossy(&err.stderr).contains("pods \"nosuch\" not found"));

    drop(daemon);
    node.cleanup().await?;
    Ok(())
}

#[tokio::test]
async fn exec_returns_the_exit_code_and_relays_stdin_and_terminals() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let node = Node::new()?;
    let daemon = node.start().await?;
    std::fs::write(
        node.manifests.join("box.yaml"),
        manifest("box", "sleep 300", ""),
    )?;
    wait_pod(&node, "box", "running", |p| phase(p) == "Running").await?;

    let out = node.cli(&[
        "exec",
        "box",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 3",
    ])?;
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(text(&out), "out\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");

    // -i: stdin reaches the command, and its end is the command's EOF.
    let mut child = std::process::Command::new(edge_rt_bin())
        .arg("--config")
        .arg(&node.config)
        .args(["exec", "-i", "box", "--", "sh", "-c", "tr a-z A-Z"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().context("stdin")?;
        stdin.write_all(b"hello from stdin\n")?;
    }
    let out = child.wait_with_output()?;
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "HELLO FROM STDIN\n");

    // -t: the command runs on a terminal.
    let out = node.cli(&[
        "exec",
        "-t",
        "box",
        "--",
        "sh",
        "-c",
        "[ -t 0 ] && [ -t 1 ] && echo on-a-tty",
    ])?;
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out).contains("on-a-tty"), "{}", text(&out));

    // -it from a real terminal (util-linux `script` gives the client one):
    // an interactive shell, raw mode, and its exit code.
    let cmd = format!(
        "{} --config {} exec -it box -- sh",
        edge_rt_bin().display(),
        node.config.display()
    );
    let mut child = std::process::Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().context("stdin")?;
        std::thread::sleep(Duration::from_millis(500));
        stdin.write_all(b"echo answer=$((6*7)); exit 4\n")?;
        std::thread::sleep(Duration::from_millis(500));
    }
    let out = child.wait_with_output()?;
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(text(&out).contains("answer=42"), "{}", text(&out));

    let out = node.cli(&["exec", "box", "-c", "nosuch", "--", "true"])?;
    assert!(!out.status.success());
    drop(daemon);
    node.cleanup().await?;
    Ok(())
}

/// `edge-rt top`: the node's and its pods' CPU and memory, measured from
/// /proc and the pods' cgroups, as `kubectl top` shows them; with no cloud.
#[tokio::test]
async fn top_shows_the_node_and_its_pods_as_kubectl_top_does() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let node = Node::new()?;
    let _daemon = node.start().await?;
    // One pod spins (a core's worth of CPU), one sleeps.
    std::fs::write(
        node.manifests.join("pods.yaml"),
        format!(
            "{}---\n{}",
            manifest("spin", "while true; do :; done", ""),
            manifest("idle", "sleep 300", "")
        ),
    )?;
    wait_pod(&node, "spin", "running", |p| phase(p) == "Running").await?;
    wait_pod(&node, "idle", "running", |p| phase(p) == "Running").await?;
    let o = node.cli(&["top", "pods"])?;
    anyhow::ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let table = text(&o);
    // NAME CPU(cores) MEMORY(bytes)
    let row = |pod: &str| -> Option<(u64, u64)> {
        let l = table.lines().find(|l| l.starts_with(pod))?;
        let mut f = l.split_whitespace().skip(1);
        Some((
            f.next()?.strip_suffix('m')?.parse().ok()?,
            f.next()?.strip_suffix("Mi")?.parse().ok()?,
        ))
    };
    let (spin, _) = row("spin").with_context(|| table.clone())?;
    let (idle, _) = row("idle").with_context(|| table.clone())?;
    // A busy loop on a 2-core machine shared with the test: far above the
    // sleeper's, whatever else runs.
    anyhow::ensure!(spin >= 200 && idle < spin / 4, "{table}");
    let o = node.cli(&["top", "node"])?;
    let node_row = text(&o);
    anyhow::ensure!(
        node_row.contains("CPU(%)") && node_row.lines().nth(1).is_some_and(|l| l.contains('%')),
        "{node_row}"
    );
    // The summary behind it is the kubelet's shape.
    let o = node.cli(&["top", "pods", "-o", "json"])?;
    let s: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    let spin_pod = s["pods"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["podRef"]["name"] == "spin"))
        .context("no spin pod")?;
    anyhow::ensure!(
        spin_pod["containers"][0]["cpu"]["usageCoreNanoSeconds"].as_u64() > Some(0)
            && spin_pod["memory"]["workingSetBytes"].as_u64() > Some(0),
        "{spin_pod}"
    );
    Ok(())
}

/// Pods' /etc/resolv.conf by their DNS policy, as the kubelet writes it:
/// ClusterFirst with the node's cluster DNS and the search list, None with
/// only the pod's dnsConfig, hostNetwork with the host's.
#[tokio::test]
async fn pods_get_the_resolv_conf_their_dns_policy_says() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let node = Node::new()?;
    let host = node.dir.path().join("host-resolv.conf");
    std::fs::write(
        &host,
        "search plant.example\nnameserver 192.0.2.53\noptions edns0\n",
    )?;
    let mut cfg = std::fs::read_to_string(&node.config)?;
    cfg.push_str(&format!(
        "\n[dns]\ncluster_domain = \"cluster.local\"\ncluster_dns = [\"10.96.0.10\"]\nresolv_conf = {host:?}\n"
    ));
    std::fs::write(&node.config, cfg)?;
    let daemon = node.start().await?;
    let show = "cat /etc/resolv.conf; echo done; sleep 300";
    std::fs::write(
        node.manifests.join("first.yaml"),
        manifest("first", show, ""),
    )?;
    std::fs::write(
        node.manifests.join("none.yaml"),
        manifest(
            "none",
            show,
            "  dnsPolicy: None\n  dnsConfig:\n    nameservers: [192.0.2.1]\n    searches: [a.example]\n    options: [{name: ndots, value: \"2\"}]\n",
        ),
    )?;
    std::fs::write(
        node.manifests.join("hostnet.yaml"),
        manifest("hostnet", show, "  hostNetwork: true\n"),
    )?;
    let first = node.wait_log("first", "done").await?;
    assert!(
        first.contains("search default.svc.cluster.local svc.cluster.local cluster.local plant.example\nnameserver 10.96.0.10\noptions ndots:5\n"),
        "{first}"
    );
    let none = node.wait_log("none", "done").await?;
    assert!(
        none.contains("search a.example\nnameserver 192.0.2.1\noptions ndots:2\n"),
        "{none}"
    );
    let hostnet = node.wait_log("hostnet", "done").await?;
    assert!(
        hostnet.contains("search plant.example\nnameserver 192.0.2.53\noptions edns0\n"),
        "{hostnet}"
    );
    drop(daemon);
    node.cleanup().await?;
    Ok(())
}

/// Events not yet sent when edge-rt restarts (a node offline, or never
/// joined) stay in the outbox beside the next run's: a restarted count of
/// event ids once gave new events the ids, and so the outbox rows, of
/// unsent old ones.
#[tokio::test]
async fn unsent_events_survive_a_restart_beside_the_next_runs() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let node = Node::new()?;
    let outbox_events = || -> Option<u64> {
        let o = node.cli(&["store", "stats", "-o", "json"]).ok()?;
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
        v["outbox_events"].as_u64()
    };
    let daemon = node.start().await?;
    std::fs::write(
        node.manifests.join("first.yaml"),
        manifest("first", "sleep 300", ""),
    )?;
    wait_pod(&node, "first", "first running", |p| phase(p) == "Running").await?;
    let before = wait_for(
        "the first run's events in the outbox",
        Duration::from_secs(10),
        || async { outbox_events().filter(|n| *n >= 2) },
    )
    .await?;
    daemon.terminate()?;
    let daemon = node.start().await?;
    std::fs::write(
        node.manifests.join("second.yaml"),
        manifest("second", "sleep 300", ""),
    )?;
    wait_pod(&node, "second", "second running", |p| phase(p) == "Running").await?;
    wait_for(
        "both runs' events in the outbox",
        Duration::from_secs(10),
        || async { outbox_events().filter(|n| *n >= before + 2) },
    )
    .await
    .with_context(|| format!("outbox events: {:?} (first run: {before})", outbox_events()))?;
    drop(daemon);
    node.cleanup().await?;
    Ok(())
}
