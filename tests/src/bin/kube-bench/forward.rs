//! kube-bench's port-forward part: an HTTP GET of a large file through
//! `kubectl port-forward` (the API server, cloud-gw's kubelet port, a
//! stream of the node's link, a connection inside the pod's network
//! namespace) beside the same GET made straight into that namespace, with
//! 100 idle forwarded connections open; and pushes (a ConfigMap the pod
//! mounts, patched in the cluster, until the node's store has it) with the
//! link otherwise idle and during the transfer.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use k8s_openapi::api::core::v1::ConfigMap;
use outrigger_tests::k8s::Scope;
use outrigger_tests::util::{wait_for, with_stdin, Node};

pub struct Figures {
    /// MB/s of each GET.
    direct: Vec<f64>,
    forwarded: Vec<f64>,
    /// ms of each push.
    idle_pushes: Vec<f64>,
    loaded_pushes: Vec<f64>,
    idle_streams: usize,
}

impl Figures {
    pub fn print(mut self, mb: usize) {
        use edge_rt::bench::percentile;
        println!();
        println!(
            "port-forward: HTTP GET of {mb} MB, {} and {} runs (MB/s)",
            self.direct.len(),
            self.forwarded.len()
        );
        println!("{:<58} {:>8} {:>8}", "path", "median", "min");
        let row = |label: &str, v: &mut Vec<f64>| {
            println!(
                "{label:<58} {:>8.1} {:>8.1}",
                percentile(v, 0.5),
                percentile(v, 0.0)
            );
        };
        row(
            "straight into the pod's network namespace",
            &mut self.direct,
        );
        row(
            &format!(
                "kubectl port-forward, {} idle forwards open",
                self.idle_streams
            ),
            &mut self.forwarded,
        );
        println!(
            "pushes: ConfigMap patched -> in the node's store, {} each (ms)",
            self.idle_pushes.len()
        );
        println!("{:<58} {:>8} {:>8}", "link", "p50", "p99");
        for (label, v) in [
            ("otherwise idle", &mut self.idle_pushes),
            ("during the port-forward transfer", &mut self.loaded_pushes),
        ] {
            println!(
                "{label:<58} {:>8.1} {:>8.1}",
                percentile(v, 0.5),
                percentile(v, 0.99)
            );
        }
    }
}

/// GET /big on a connection; the MB/s of the body.
fn get(mut c: TcpStream, mb: usize) -> Result<f64> {
    c.set_read_timeout(Some(Duration::from_secs(120)))?;
    let t = Instant::now();
    write!(c, "GET /big HTTP/1.0\r\nHost: pod\r\n\r\n")?;
    let mut buf = vec![0u8; 256 << 10];
    let mut n = 0usize;
    loop {
        match c.read(&mut buf)? {
            0 => break,
            k => n += k,
        }
    }
    let want = mb * 1_000_000;
    // The headers come first: at least the body.
    ensure!(n >= want, "{n} bytes of a {want}-byte file came");
    Ok(want as f64 / 1e6 / t.elapsed().as_secs_f64())
}

/// A connection to 127.0.0.1:8080 inside the network namespace of `pid`.
fn connect_in(pid: i32) -> Result<TcpStream> {
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))?;
    // A thread of its own: it stays in that namespace and then ends.
    std::thread::spawn(move || -> Result<TcpStream> {
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
        Ok(TcpStream::connect(("127.0.0.1", 8080))?)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the connecting thread died"))?
}

/// The pid of a running container of `pod`, as the node's runtime has it.
fn pid_of(node: &Node, pod: &str) -> Result<i32> {
    let o = node.cli(&["ps", "-o", "json"])?;
    let records: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    records
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["pod"]["name"] == pod && r["exit"].is_null())
        .find_map(|r| r["pid"].as_i64())
        .and_then(|p| i32::try_from(p).ok())
        .context("no running container of the pod")
}

/// Patch the ConfigMap to `n` and wait until the node's store has it (ms).
async fn push(
    api: &kube::Api<ConfigMap>,
    store: &edge_rt::store::Store,
    ns: &str,
    n: usize,
) -> Result<f64> {
    let patch = serde_json::json!({"data": {"n": n.to_string()}});
    let t = Instant::now();
    api.patch(
        "pushes",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&patch),
    )
    .await?;
    let want = n.to_string();
    let deadline = t + Duration::from_secs(30);
    loop {
        let o = store.find(edge_rt::store::Kind::ConfigMap, ns, "pushes")?;
        if o.is_some_and(|o| o.body["data"]["n"] == want.as_str()) {
            return Ok(t.elapsed().as_secs_f64() * 1000.0);
        }
        ensure!(Instant::now() < deadline, "push {n} never reached the node");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// `kubectl port-forward` to the pod's 8080; the process and local port.
fn port_forward(scope: &Scope, pod: &str) -> Result<(std::process::Child, u16)> {
    use std::io::BufRead;
    let mut child = scope
        .kubectl()
        .args(["port-forward", &format!("pod/{pod}"), ":8080"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let mut out = std::io::BufReader::new(child.stdout.take().context("stdout")?);
    let mut line = String::new();
    out.read_line(&mut line)?;
    // Drained: kubectl writes a line per connection, and dies on a write
    // to a closed pipe.
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    let port = line
        .split("127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("kubectl port-forward said {line:?}"))?;
    Ok((child, port))
}

pub async fn bench(
    scope: &Scope,
    client: kube::Client,
    node: &Node,
    image: &str,
    mb: usize,
    pushes: usize,
) -> Result<Figures> {
    let ns = scope.namespace.clone();
    let mut cm = scope.kubectl();
    cm.args(["create", "configmap", "pushes", "--from-literal=n=0"]);
    with_stdin(cm, "")?;
    let pod = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: bulk}}\nspec:\n  nodeName: bench-edge\n  terminationGracePeriodSeconds: 1\n  volumes: [{{name: cfg, configMap: {{name: pushes}}}}]\n  containers:\n  - name: web\n    image: {image:?}\n    command: [sh, -c, 'head -c {mb}000000 /dev/urandom > /big && exec httpd -f -p 8080 -h /']\n    volumeMounts: [{{name: cfg, mountPath: /cfg}}]\n"
    );
    let mut apply = scope.kubectl();
    apply.args(["apply", "-f", "-"]);
    with_stdin(apply, &pod)?;
    let o = scope
        .kubectl()
        .args(["wait", "--for=condition=Ready", "pod/bulk", "--timeout=60s"])
        .output()?;
    ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let pid = pid_of(node, "bulk")?;
    // The file is written before httpd starts: wait until it is served.
    wait_for("the file served", Duration::from_secs(60), || async {
        get(connect_in(pid).ok()?, mb).ok()
    })
    .await?;
    let runs = 5;
    let mut direct = Vec::new();
    for _ in 0..runs {
        direct.push(get(connect_in(pid)?, mb)?);
    }

    let db = node.dir.path().join("data").join("store.db");
    let store = edge_rt::store::Store::open_read_only(&db, None)?;
    let api = kube::Api::<ConfigMap>::namespaced(client, &ns);
    let mut idle_pushes = Vec::new();
    for i in 1..=pushes {
        idle_pushes.push(push(&api, &store, &ns, i).await?);
    }

    let (mut pf, port) = port_forward(scope, "bulk")?;
    // 100 forwarded connections, opened and left idle: 100 streams of the
    // link (httpd waits for their requests).
    let mut idle = Vec::new();
    for _ in 0..100 {
        idle.push(TcpStream::connect(("127.0.0.1", port))?);
    }
    // Each makes its stream once kubectl has taken it: a GET through the
    // forward shows they are through.
    get(TcpStream::connect(("127.0.0.1", port))?, mb)?;
    let forwarded = tokio::task::spawn_blocking(move || -> Result<Vec<f64>> {
        (0..runs)
            .map(|_| get(TcpStream::connect(("127.0.0.1", port))?, mb))
            .collect()
    })
    .await??;
    // Pushes while the transfer goes on, GET after GET.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        std::thread::spawn(move || -> Result<()> {
            while !stop.load(Ordering::Relaxed) {
                get(TcpStream::connect(("127.0.0.1", port))?, mb)?;
            }
            Ok(())
        })
    };
    let mut loaded_pushes = Vec::new();
    for i in 1..=pushes {
        loaded_pushes.push(push(&api, &store, &ns, pushes + i).await?);
    }
    stop.store(true, Ordering::Relaxed);
    tokio::task::spawn_blocking(move || load.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the load thread died"))??;
    drop(idle);
    let _ = pf.kill();
    let _ = pf.wait();
    Ok(Figures {
        direct,
        forwarded,
        idle_pushes,
        loaded_pushes,
        idle_streams: 100,
    })
}
