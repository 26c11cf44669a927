//! kube-bench: from `kubectl apply` of a pod bound to a connected edge node
//! to `kubectl wait` seeing it Ready (image present), through the API
//! server for tests, a real cloud-gw and a real edge-rt running the
//! container. Side by side, the baseline without the cluster: the same pod
//! given to edge-rt directly (`edge-rt apply`), polled until Ready.
//!
//! As root, after `cargo build --release --workspace`:
//!   CARGO_TARGET_DIR=... target/release/kube-bench [--iterations 20]

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use clap::Parser;
use outrigger_tests::apiserver::TestApiServer;
use outrigger_tests::cloud::{join_with, Cloud};
use outrigger_tests::util::{find, wait_for, Node};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 20)]
    iterations: usize,
}

fn pod(name: &str, node: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  nodeName: {node}\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: main\n    image: busybox:latest\n    imagePullPolicy: Never\n    command: [\"sh\", \"-c\", \"while true; do sleep 1; done\"]\n"
    )
}

fn piped(mut c: Command, input: &str) -> Result<()> {
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(input.as_bytes())?;
    let o = child.wait_with_output()?;
    ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    Ok(())
}

fn stats(v: &mut [f64]) -> (f64, f64, f64) {
    use edge_rt::bench::percentile;
    (percentile(v, 0.5), percentile(v, 0.9), percentile(v, 1.0))
}

fn ready(p: &k8s_openapi::api::core::v1::Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let api = TestApiServer::start()?;
    let cloud = Cloud::start_kube(api.kubeconfig()).await?;
    let node = Node::new()?;
    let o = join_with(
        &node,
        &cloud.server,
        &cloud.token("10m")?,
        "bench-edge",
        &[],
    )?;
    ensure!(
        o.status.success(),
        "join: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let _daemon = node.start().await?;
    wait_for("the node Ready", Duration::from_secs(30), || async {
        let o = api
            .kubectl()
            .args([
                "get",
                "node",
                "bench-edge",
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
            ])
            .output()
            .ok()?;
        (String::from_utf8_lossy(&o.stdout) == "True").then_some(())
    })
    .await?;

    let mut through_cluster = Vec::new();
    for i in 0..args.iterations {
        let name = format!("bench-{i}");
        let t = Instant::now();
        let mut apply = api.kubectl();
        apply.args(["apply", "-f", "-"]);
        piped(apply, &pod(&name, "bench-edge"))?;
        let o = api
            .kubectl()
            .args([
                "wait",
                "--for=condition=Ready",
                &format!("pod/{name}"),
                "--timeout=60s",
            ])
            .output()?;
        ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        through_cluster.push(t.elapsed().as_secs_f64() * 1000.0);
        let o = api.kubectl().args(["delete", "pod", &name]).output()?;
        ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }

    let mut direct = Vec::new();
    for i in 0..args.iterations {
        let name = format!("direct-{i}");
        let t = Instant::now();
        let mut apply = Command::new(outrigger_tests::util::edge_rt_bin());
        apply
            .arg("--config")
            .arg(&node.config)
            .args(["apply", "-f", "-"]);
        piped(apply, &pod(&name, "bench-edge"))?;
        wait_for("Ready", Duration::from_secs(60), || async {
            let pods = node.pods().ok()?;
            find(&pods, &name).filter(|p| ready(p)).map(|_| ())
        })
        .await?;
        direct.push(t.elapsed().as_secs_f64() * 1000.0);
        let o = node.cli(&["delete", "pod", &name])?;
        ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let (cm, c9, cx) = stats(&mut through_cluster);
    let (dm, d9, dx) = stats(&mut direct);
    println!(
        "pod start, image present, {} runs each (ms; kubectl and edge-rt CLI processes included)",
        args.iterations
    );
    println!("{:<52} {:>8} {:>8} {:>8}", "path", "median", "p90", "max");
    println!(
        "{:<52} {:>8.0} {:>8.0} {:>8.0}",
        "kubectl apply -> kubectl wait Ready (cloud-gw, link)", cm, c9, cx
    );
    println!(
        "{:<52} {:>8.0} {:>8.0} {:>8.0}",
        "baseline: edge-rt apply -> Ready on the node", dm, d9, dx
    );
    node.cleanup().await
}
