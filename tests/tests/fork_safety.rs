//! Fork safety under load: containers are created (libcontainer's raw
//! `clone3`, whose child keeps running Rust code that allocates) while
//! other threads of edge-rt are busy: image pulls writing blobs and
//! unpacking layers on the blocking pool, TCP and HTTP probes connecting
//! from inside pod namespaces on threads of their own, and `edge-rt logs
//! -f` reading a chatty container's log.
//!
//! What it can and cannot show: the hazard is a thread holding the
//! allocator's lock at the instant of a clone, a window of nanoseconds, so
//! no run can make the old code fail on demand; a hang here (a container
//! that never starts, a daemon that stops answering) is that deadlock, and
//! the test fails on it. What makes it impossible rather than unlikely is
//! structural: every thread and blocking task of edge-rt runs inside the
//! fork guard (`edge_rt::sys`), and clippy refuses the raw calls
//! (`edge-rt/clippy.toml`).

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use outrigger_tests::fixtures::{self, Compression, Entry, ImageSpec, Layer};
use outrigger_tests::registry::Registry;
use outrigger_tests::util::*;

/// Pods created (and deleted) while the rest runs.
const WAVES: usize = 6;
const PODS_PER_WAVE: usize = 4;
/// Distinct images pulled meanwhile (a layer of 2 MB each).
const IMAGES: usize = 6;

fn image_with_payload(i: usize) -> Result<ImageSpec> {
    let mut spec = ImageSpec::busybox()?;
    // Different bytes per image: every pull downloads and unpacks a blob.
    let payload: Vec<u8> = (0..2 * 1024 * 1024u32)
        .map(|n| (n.wrapping_mul(2654435761).wrapping_add(i as u32) >> 13) as u8)
        .collect();
    spec.layers.push(Layer {
        entries: vec![Entry::File(format!("payload-{i}"), payload, 0o644)],
        compression: Compression::Gzip,
    });
    Ok(spec)
}

fn pod(name: &str, image: &str, policy: &str, script: &str, extra: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: main\n    image: {image}\n    imagePullPolicy: {policy}\n    command: [\"sh\", \"-c\", {script:?}]\n{extra}"
    )
}

#[tokio::test]
async fn containers_are_created_while_pulls_probes_and_log_follows_run() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let registry = Registry::start(None)?;
    let mut images = Vec::new();
    for i in 0..IMAGES {
        let layout = tempfile::tempdir()?;
        fixtures::add_to_layout(layout.path(), "v1", &image_with_payload(i)?)?;
        images.push(registry.push(layout.path(), "v1", &format!("stress/img{i}"))?);
    }
    let node = Node::new()?;
    node.trust_registry(&registry.ca_pem)?;
    let _daemon = node.start().await?;

    // Probes every second, TCP and HTTP, from threads inside the pod's
    // namespace; a container that logs without pause, followed.
    let probes = "    readinessProbe: {tcpSocket: {port: 8080}, periodSeconds: 1}\n    livenessProbe: {httpGet: {path: /, port: 8080}, periodSeconds: 1, failureThreshold: 30}\n";
    std::fs::write(
        node.manifests.join("probed.yaml"),
        pod(
            "probed",
            "busybox:latest",
            "Never",
            "mkdir -p /www && echo ok > /www/index.html && exec httpd -f -p 8080 -h /www",
            probes,
        ),
    )?;
    std::fs::write(
        node.manifests.join("chatty.yaml"),
        pod(
            "chatty",
            "busybox:latest",
            "Never",
            // A line every 2 ms: busy, not a flood the follower cannot keep
            // up with in a debug build.
            "i=0; while true; do i=$((i+1)); echo line $i; usleep 2000; done",
            "",
        ),
    )?;
    wait_pod(&node, "chatty", "chatty running", |p| phase(p) == "Running").await?;
    let follow_out = node.dir.path().join("follow.out");
    let mut follow = std::process::Command::new(edge_rt_bin())
        .arg("--config")
        .arg(&node.config)
        .args(["logs", "-f", "chatty"])
        .stdout(std::fs::File::create(&follow_out)?)
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("edge-rt logs -f")?;

    // Pulls: one pod per image, all at once.
    for (i, image) in images.iter().enumerate() {
        std::fs::write(
            node.manifests.join(format!("pull-{i}.yaml")),
            pod(&format!("pull-{i}"), image, "IfNotPresent", "sleep 300", ""),
        )?;
    }
    // Meanwhile, waves of containers created and deleted.
    let t0 = Instant::now();
    let mut created = 0;
    for w in 0..WAVES {
        for k in 0..PODS_PER_WAVE {
            std::fs::write(
                node.manifests.join(format!("churn-{w}-{k}.yaml")),
                pod(
                    &format!("churn-{w}-{k}"),
                    "busybox:latest",
                    "Never",
                    "sleep 300",
                    "",
                ),
            )?;
        }
        for k in 0..PODS_PER_WAVE {
            let name = format!("churn-{w}-{k}");
            wait_pod(&node, &name, "a churned pod running", |p| {
                phase(p) == "Running"
            })
            .await?;
            created += 1;
        }
        for k in 0..PODS_PER_WAVE {
            std::fs::remove_file(node.manifests.join(format!("churn-{w}-{k}.yaml")))?;
        }
    }
    for i in 0..IMAGES {
        wait_pod(&node, &format!("pull-{i}"), "a pulled pod running", |p| {
            phase(p) == "Running"
        })
        .await?;
    }
    let probed = wait_pod(&node, "probed", "the probed pod ready", |p| {
        p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
    })
    .await?;
    let restarts = probed
        .status
        .and_then(|s| s.container_statuses)
        .and_then(|c| c.first().map(|c| c.restart_count))
        .unwrap_or(-1);
    ensure!(
        restarts == 0,
        "the probed container restarted {restarts} times"
    );
    // The follower kept streaming through all of it.
    let before = std::fs::metadata(&follow_out)?.len();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = std::fs::metadata(&follow_out)?.len();
    ensure!(
        after > before && follow.try_wait()?.is_none(),
        "logs -f stopped ({before} -> {after} bytes)"
    );
    let _ = follow.kill();
    let _ = follow.wait();
    eprintln!(
        "{created} containers created in {:.1} s beside {IMAGES} pulls, 2 probes a second and a log follower",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
