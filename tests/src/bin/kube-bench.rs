//! kube-bench: pod start through a real Kubernetes control plane (v1.36,
//! `outrigger_tests::k8s`), a real cloud-gw and a real edge-rt running the
//! container, image present:
//!
//! - a plain Deployment (image and a nodeSelector for edge nodes, nothing
//!   else) from `kubectl apply` until its pod is Running, the real
//!   controllers making the pod and the real scheduler placing it (the bar:
//!   a median of at most 1 s);
//! - a Pod bound by name, `kubectl apply` to `kubectl wait` Ready (the
//!   figure measured against the API server for tests before);
//! - the baseline without a cluster: the same pod given to edge-rt
//!   directly (`edge-rt apply`), polled until Ready;
//! - `kubectl exec POD -- true` (the API server, cloud-gw's kubelet
//!   endpoint, a stream of the link) beside `edge-rt exec` on the node;
//! - `kubectl logs -f --timestamps`: from the time the runtime stamped a
//!   line to kubectl printing it;
//! - `kubectl port-forward`: bulk throughput (an HTTP GET of a large file)
//!   beside a connection made straight into the pod's network namespace,
//!   with 100 idle forwarded connections open; and pushes (a ConfigMap
//!   patched in the cluster until the node's store has it) with the link
//!   otherwise idle and during the transfer.
//!
//! As root, after `cargo build --release --workspace`:
//!   CARGO_TARGET_DIR=... target/release/kube-bench [--iterations 20] [--only port-forward]

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use clap::Parser;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use outrigger_tests::cloud::{join_with, Cloud};
use outrigger_tests::fixtures::{add_to_layout, ImageSpec};
use outrigger_tests::k8s::{Cluster, Scope};
use outrigger_tests::registry::Registry;
use outrigger_tests::util::{find, wait_for, with_stdin, Node};

#[path = "kube-bench/forward.rs"]
mod forward;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 20)]
    iterations: usize,
    /// One part only: start, exec, logs or port-forward.
    #[arg(long)]
    only: Option<String>,
    /// Size of the file port-forward carries, in MB.
    #[arg(long, default_value_t = 64)]
    forward_mb: usize,
}

impl Args {
    fn runs(&self, part: &str) -> bool {
        self.only.as_deref().is_none_or(|o| o == part)
    }
}

fn deployment(name: &str, image: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {name}}}\nspec:\n  selector: {{matchLabels: {{app: {name}}}}}\n  template:\n    metadata: {{labels: {{app: {name}}}}}\n    spec:\n      nodeSelector: {{node-role.kubernetes.io/edge: \"\"}}\n      containers: [{{name: web, image: {image:?}}}]\n"
    )
}

fn pod(name: &str, node: &str, image: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  nodeName: {node}\n  terminationGracePeriodSeconds: 1\n  containers: [{{name: web, image: {image:?}}}]\n"
    )
}

fn piped(c: Command, input: &str) -> Result<()> {
    with_stdin(c, input).map(drop)
}

fn stats(v: &mut [f64]) -> (f64, f64, f64) {
    use edge_rt::bench::percentile;
    (percentile(v, 0.5), percentile(v, 0.9), percentile(v, 1.0))
}

fn ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn running(p: &Pod) -> bool {
    p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
}

/// Milliseconds from `kubectl apply` of `yaml` until a pod labelled
/// `app=<app>` is Running, as a watch on the API server sees it.
async fn apply_until_running(
    scope: &Scope,
    pods: &kube::Api<Pod>,
    yaml: &str,
    app: &str,
) -> Result<f64> {
    let lp = kube::api::WatchParams::default()
        .labels(&format!("app={app}"))
        .timeout(60);
    let rv = pods
        .list(&kube::api::ListParams::default().labels(&format!("app={app}")))
        .await?
        .metadata
        .resource_version
        .unwrap_or_default();
    let mut watch = pods.watch(&lp, &rv).await?.boxed();
    let t = Instant::now();
    piped(
        {
            let mut c = scope.kubectl();
            c.args(["apply", "-f", "-"]);
            c
        },
        yaml,
    )?;
    while let Some(ev) = watch.next().await {
        if let kube::api::WatchEvent::Added(p) | kube::api::WatchEvent::Modified(p) = ev? {
            if running(&p) {
                return Ok(t.elapsed().as_secs_f64() * 1000.0);
            }
        }
    }
    anyhow::bail!("{app}: no pod Running within 60 s")
}

/// `kubectl logs -f --timestamps`: how long after the runtime stamped each
/// of `lines` lines kubectl printed it (ms).
async fn logs_follow(scope: &Scope, image: &str, lines: usize) -> Result<Vec<f64>> {
    let talk = "talk";
    let mut apply = scope.kubectl();
    apply.args(["apply", "-f", "-"]);
    piped(
        apply,
        &pod(talk, "bench-edge", image).replace(
            "containers: [{name: web, image:",
            "containers: [{name: web, command: [sh, -c, 'while true; do echo tick; usleep 200000; done'], image:",
        ),
    )?;
    let o = scope
        .kubectl()
        .args(["wait", "--for=condition=Ready", "pod/talk", "--timeout=60s"])
        .output()?;
    ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut follow = scope
        .kubectl()
        .args(["logs", "-f", "--timestamps", "--tail=0", talk])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let out = follow
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("stdout"))?;
    let followed = tokio::task::spawn_blocking(move || -> Result<Vec<f64>> {
        use std::io::BufRead;
        let mut lag = Vec::new();
        for l in std::io::BufReader::new(out).lines().take(lines) {
            let now = jiff::Timestamp::now();
            let l = l?;
            let stamp: jiff::Timestamp = l.split(' ').next().unwrap_or("").parse()?;
            lag.push((now - stamp).total(jiff::Unit::Millisecond)?);
        }
        Ok(lag)
    })
    .await??;
    let _ = follow.kill();
    let _ = follow.wait();
    Ok(followed)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let cluster = Cluster::own(&Default::default())?;
    let scope = Scope::new(&cluster, "bench")?;
    // A plain image from a registry: busybox serving HTTP, pulled once.
    let registry = Registry::start(None)?;
    let layout = tempfile::tempdir()?;
    let mut web = ImageSpec::busybox()?;
    web.cmd = ["httpd", "-f", "-p", "8080", "-h", "/"]
        .map(String::from)
        .to_vec();
    add_to_layout(layout.path(), "1", &web)?;
    let image = registry.push(layout.path(), "1", "bench/web")?;

    let cloud = Cloud::start_kube(cluster.kubeconfig()).await?;
    let node = Node::new()?;
    node.trust_registry(&registry.ca_pem)?;
    scope.owns("node", "bench-edge");
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
    let daemon = node.start().await?;
    wait_for("the node Ready", Duration::from_secs(30), || async {
        let o = cluster
            .kubectl()
            .args(["get", "node", "bench-edge", "-o"])
            .arg("jsonpath={.status.conditions[?(@.type==\"Ready\")].status}")
            .output()
            .ok()?;
        (String::from_utf8_lossy(&o.stdout) == "True").then_some(())
    })
    .await?;
    let client = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(cluster.kubeconfig())?,
            &Default::default(),
        )
        .await?,
    )?;
    let pods = kube::Api::<Pod>::namespaced(client, &scope.namespace);
    // The first start pulls the image; not counted.
    apply_until_running(&scope, &pods, &deployment("warm", &image), "warm").await?;

    let gone = |what: &str, name: &str| -> Result<()> {
        let o = scope
            .kubectl()
            .args(["delete", what, name, "--wait=true", "--timeout=60s"])
            .output()?;
        ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        Ok(())
    };
    let mut rows = Vec::new();
    if args.runs("start") {
        let mut deployed = Vec::new();
        for i in 0..args.iterations {
            let name = format!("web-{i}");
            deployed
                .push(apply_until_running(&scope, &pods, &deployment(&name, &image), &name).await?);
            gone("deployment", &name)?;
        }

        let mut bound = Vec::new();
        for i in 0..args.iterations {
            let name = format!("bench-{i}");
            let t = Instant::now();
            let mut apply = scope.kubectl();
            apply.args(["apply", "-f", "-"]);
            piped(apply, &pod(&name, "bench-edge", &image))?;
            let o = scope
                .kubectl()
                .args([
                    "wait",
                    "--for=condition=Ready",
                    &format!("pod/{name}"),
                    "--timeout=60s",
                ])
                .output()?;
            ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            bound.push(t.elapsed().as_secs_f64() * 1000.0);
            gone("pod", &name)?;
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
            piped(apply, &pod(&name, "bench-edge", &image))?;
            wait_for("Ready", Duration::from_secs(60), || async {
                let pods = node.pods().ok()?;
                find(&pods, &name).filter(|p| ready(p)).map(|_| ())
            })
            .await?;
            direct.push(t.elapsed().as_secs_f64() * 1000.0);
            let o = node.cli(&["delete", "pod", &name])?;
            ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
        rows.push((
            "kubectl apply Deployment -> pod Running (scheduler)",
            stats(&mut deployed),
        ));
        rows.push((
            "kubectl apply Pod (nodeName) -> kubectl wait Ready",
            stats(&mut bound),
        ));
        rows.push((
            "baseline: edge-rt apply -> Ready on the node",
            stats(&mut direct),
        ));
    }
    if args.runs("exec") {
        // kubectl exec through the link, beside edge-rt's own on the node.
        let warm = pods
            .list(&kube::api::ListParams::default().labels("app=warm"))
            .await?
            .items
            .into_iter()
            .find(running)
            .and_then(|p| p.metadata.name)
            .ok_or_else(|| anyhow::anyhow!("the warm pod is gone"))?;
        let mut kexec = Vec::new();
        let mut local = Vec::new();
        for _ in 0..args.iterations {
            let t = Instant::now();
            let o = scope
                .kubectl()
                .args(["exec", &warm, "--", "true"])
                .output()?;
            ensure!(
                o.status.success(),
                "kubectl exec: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            kexec.push(t.elapsed().as_secs_f64() * 1000.0);
            let t = Instant::now();
            let o = node.cli(&["exec", "-n", &scope.namespace, &warm, "--", "true"])?;
            ensure!(
                o.status.success(),
                "edge-rt exec: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            local.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        rows.push((
            "kubectl exec POD -- true (through the link)",
            stats(&mut kexec),
        ));
        rows.push((
            "baseline: edge-rt exec POD -- true on the node",
            stats(&mut local),
        ));
    }
    if args.runs("logs") {
        let mut followed = logs_follow(&scope, &image, args.iterations.max(20) * 5).await?;
        rows.push((
            "kubectl logs -f: line stamped -> kubectl prints it",
            stats(&mut followed),
        ));
    }
    if !rows.is_empty() {
        println!(
            "an edge node through a real control plane v1.36, image present, {} runs each (ms; kubectl and edge-rt CLI processes included)",
            args.iterations
        );
        println!("{:<54} {:>8} {:>8} {:>8}", "path", "median", "p90", "max");
        for (label, (m, p9, x)) in rows {
            println!("{label:<54} {m:>8.0} {p9:>8.0} {x:>8.0}");
        }
    }
    if args.runs("port-forward") {
        let client = pods.clone().into_client();
        let f = forward::bench(
            &scope,
            client,
            &node,
            &image,
            args.forward_mb,
            args.iterations.max(20) * 10,
        )
        .await?;
        f.print(args.forward_mb);
    }
    if std::env::var_os("KUBE_BENCH_LOGS").is_some() {
        eprintln!(
            "cloud-gw:\n{}\nedge-rt:\n{}",
            cloud.log(),
            node.daemon_log()
        );
    }
    drop(daemon);
    node.cleanup().await
}
