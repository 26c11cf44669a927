//! link-load: simulated edge nodes, many in one process, against a real
//! cloud-gw (the benchmark behind the README's link figures).
//!
//! `scale`: N nodes hold links; cloud-gw's memory per node, idle bytes per
//! node per minute each way, and the latency of pushed objects.
//! `delta`: one node with 200 objects: bytes of a full resync against a
//! reconnect after one object changed, and the time each takes.
//!
//! Node certificates are minted straight from cloud-gw's CA directory
//! (`--dir`), which is also where the objects are written (`objects/`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};
use cloud_gw::keeper::DirKeeper;
use cloud_gw::pki::Pki;
use edge_rt::link::join::{connect_over, hello, key_and_csr};
use k8s_openapi::api::core::v1::NodeCondition;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use outrigger_proto::inventory::Inventory;
use outrigger_proto::kinds::Kind;
use outrigger_proto::message::{Change, Message, Sync};
use outrigger_proto::report::{NodeReport, PodReport, Report};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

#[derive(Parser)]
struct Args {
    /// cloud-gw's --dir (CA to mint node certificates; objects/ inside).
    #[arg(long)]
    dir: PathBuf,
    #[arg(long)]
    server: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Scale {
        #[arg(long, default_value_t = 1000)]
        nodes: usize,
        /// cloud-gw's pid, for its memory.
        #[arg(long)]
        cloud_pid: u32,
        #[arg(long, default_value_t = 200)]
        pushes: usize,
        #[arg(long, default_value_t = 60)]
        idle_secs: u64,
        /// The nodes' ping period (cloud-gw's --heartbeat).
        #[arg(long, default_value_t = 30)]
        heartbeat_secs: u64,
    },
    Delta {
        #[arg(long, default_value_t = 200)]
        objects: usize,
    },
    /// Slow consumers: N nodes with M objects each that never ack, while
    /// every object changes R times; cloud-gw's memory after each round.
    Slow {
        #[arg(long, default_value_t = 100)]
        nodes: usize,
        #[arg(long, default_value_t = 1000)]
        objects: usize,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        #[arg(long)]
        cloud_pid: u32,
    },
    /// cloud-gw `run` against a cluster: N nodes with P pods each (created
    /// in the cluster here), every pod's status written back.
    Kube {
        #[arg(long)]
        kubeconfig: PathBuf,
        #[arg(long, default_value_t = 1000)]
        nodes: usize,
        #[arg(long, default_value_t = 10)]
        pods: usize,
        #[arg(long)]
        cloud_pid: u32,
    },
}

/// A stream that counts the bytes each way.
struct Counted<S> {
    inner: S,
    rx: Arc<AtomicU64>,
    tx: Arc<AtomicU64>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.rx
            .fetch_add((buf.filled().len() - before) as u64, Ordering::Relaxed);
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.tx.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[derive(Default)]
struct Counters {
    rx: Arc<AtomicU64>,
    tx: Arc<AtomicU64>,
}

impl Counters {
    fn total(&self) -> (u64, u64) {
        (
            self.rx.load(Ordering::Relaxed),
            self.tx.load(Ordering::Relaxed),
        )
    }
}

/// A node's TLS settings with a freshly minted certificate.
fn identity(pki: &Pki, name: &str) -> Result<rustls::ClientConfig> {
    let (key, csr) = key_and_csr(name)?;
    let cert = pki.issue_node(name, &csr, Duration::from_secs(86400))?;
    Ok(edge_rt::link::tls::link_config(
        pki.ca_cert_pem.as_bytes(),
        cert.as_bytes(),
        key.as_bytes(),
    )?)
}

fn kinds(inv: &Inventory) -> Message {
    Message::Sync(Sync::Inventory { kinds: inv.clone() })
}

/// One simulated node: connect, hello, inventory, then ack every batch
/// (recording push latencies) and ping every heartbeat, until `stop`.
async fn run_node(
    server: String,
    name: String,
    tls: rustls::ClientConfig,
    counters: Arc<Counters>,
    latencies: Arc<Mutex<Vec<f64>>>,
    heartbeat: Duration,
    connected: Arc<AtomicU64>,
) -> Result<()> {
    let (host, port, _) = edge_rt::link::parse_server(&server)?;
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
    let counted = Counted {
        inner: tcp,
        rx: counters.rx.clone(),
        tx: counters.tx.clone(),
    };
    let mut link = connect_over(&server, "/link", tls, counted).await?;
    hello(&mut link, &name).await?;
    link.send(&kinds(&BTreeMap::new())).await?;
    connected.fetch_add(1, Ordering::Relaxed);
    let mut tick = tokio::time::interval(heartbeat);
    tick.tick().await;
    loop {
        tokio::select! {
            m = link.recv() => {
                if let Message::Sync(Sync::Changes { batch, changes, .. }) = m? {
                    let now = now_ns();
                    for c in changes {
                        if let Change::Put { body, .. } = c {
                            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                            if let Some(t) = v["data"]["pushed_at"].as_str().and_then(|s| s.parse::<u128>().ok()) {
                                latencies.lock().unwrap_or_else(|p| p.into_inner()).push((now.saturating_sub(t)) as f64 / 1e6);
                            }
                        }
                    }
                    link.send(&Message::Sync(Sync::Ack { batch })).await?;
                }
            }
            _ = tick.tick() => link.ping().await?,
        }
    }
}

fn now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    edge_rt::bench::vm_rss_kib(pid).unwrap_or(0)
}

use edge_rt::bench::percentile;

fn raise_nofile() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// Node certificates for `{prefix}0..n`, minted from cloud-gw's CA.
fn identities(args: &Args, prefix: &str, n: usize) -> Result<Vec<(String, rustls::ClientConfig)>> {
    let pki = Pki::load(&DirKeeper::new(&args.dir))?;
    let t = Instant::now();
    let ids = (0..n)
        .map(|i| {
            let name = format!("{prefix}{i}");
            identity(&pki, &name).map(|tls| (name, tls))
        })
        .collect::<Result<_>>()?;
    eprintln!(
        "minted {n} node certificates in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    Ok(ids)
}

/// Run a simulated node per identity, in waves of 200 (each waits until
/// all but 100 of those started have connected), so cloud-gw's accept
/// queue is not flooded. Errors are printed with the node's name.
async fn spawn_nodes<F, Fut>(
    ids: Vec<(String, rustls::ClientConfig)>,
    connected: &Arc<AtomicU64>,
    run: F,
) where
    F: Fn(String, rustls::ClientConfig) -> Fut,
    Fut: std::future::Future<Output = Result<()>> + Send + 'static,
{
    for (i, (name, tls)) in ids.into_iter().enumerate() {
        let node = run(name.clone(), tls);
        tokio::spawn(async move {
            if let Err(e) = node.await {
                eprintln!("{name}: {e:#}");
            }
        });
        if i % 200 == 199 {
            while connected.load(Ordering::Relaxed) + 100 < i as u64 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Wait until `counter` reaches `n`; give up after `limit`.
async fn wait_count(counter: &AtomicU64, n: usize, limit: Duration, what: &str) -> Result<()> {
    let t = Instant::now();
    while (counter.load(Ordering::Relaxed) as usize) < n {
        if t.elapsed() > limit {
            bail!(
                "only {} of {n} nodes {what}",
                counter.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

async fn scale(args: &Args, n: usize, pid: u32, pushes: usize, idle: u64, hb: u64) -> Result<()> {
    raise_nofile();
    let ids = identities(args, "sim-", n)?;
    let rss0 = rss_kib(pid);
    let counters = Arc::new(Counters::default());
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let connected = Arc::new(AtomicU64::new(0));
    let t = Instant::now();
    spawn_nodes(ids, &connected, |name, tls| {
        run_node(
            args.server.clone(),
            name,
            tls,
            counters.clone(),
            latencies.clone(),
            Duration::from_secs(hb),
            connected.clone(),
        )
    })
    .await;
    wait_count(&connected, n, Duration::from_secs(600), "connected").await?;
    let connect_secs = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss1 = rss_kib(pid);

    // Idle: only heartbeats.
    let (rx0, tx0) = counters.total();
    tokio::time::sleep(Duration::from_secs(idle)).await;
    let (rx1, tx1) = counters.total();
    let per_min = |b: u64| b as f64 / n as f64 / (idle as f64 / 60.0);

    // Pushes to distinct nodes, 20 ms apart.
    let objects = args.dir.join("objects");
    for k in 0..pushes {
        let node = format!("sim-{}", k * n / pushes.max(1));
        let d = objects.join(&node);
        std::fs::create_dir_all(&d)?;
        let tmp = d.join(".push.tmp");
        std::fs::write(
            &tmp,
            format!(
                "kind: ConfigMap\nmetadata: {{name: push}}\ndata: {{pushed_at: '{}'}}\n",
                now_ns()
            ),
        )?;
        std::fs::rename(&tmp, d.join("push.yaml"))?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while latencies.lock().unwrap_or_else(|p| p.into_inner()).len() < pushes
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut lat = latencies.lock().unwrap_or_else(|p| p.into_inner()).clone();
    println!("one cloud-gw, {n} simulated edge nodes (heartbeat {hb} s), loopback");
    println!("{:<44} {:>12}", "measure", "value");
    println!(
        "{:<44} {:>10.1} s",
        "all connected and synced", connect_secs
    );
    println!(
        "{:<44} {:>9.1} MB",
        "cloud-gw RSS before / after",
        rss0 as f64 / 1024.0
    );
    println!("{:<44} {:>9.1} MB", "", rss1 as f64 / 1024.0);
    println!(
        "{:<44} {:>9.1} KB",
        "memory per node",
        (rss1.saturating_sub(rss0)) as f64 / n as f64
    );
    println!(
        "{:<44} {:>10.0} B",
        "idle bytes per node per minute, edge -> cloud",
        per_min(tx1 - tx0)
    );
    println!(
        "{:<44} {:>10.0} B",
        "idle bytes per node per minute, cloud -> edge",
        per_min(rx1 - rx0)
    );
    println!(
        "{:<44} {:>10}",
        "pushes delivered",
        format!("{} / {pushes}", lat.len())
    );
    println!(
        "{:<44} {:>9.1} ms",
        "push latency p50",
        percentile(&mut lat, 0.5)
    );
    println!(
        "{:<44} {:>9.1} ms",
        "push latency p99",
        percentile(&mut lat, 0.99)
    );
    Ok(())
}

/// A realistic pod, as an API server hands one out (no status): its
/// hashes, uids and digests differ pod to pod, as real ones do, so
/// compression does not flatter the full resync.
fn pod(i: usize) -> String {
    use sha2::{Digest, Sha256};
    let h = |what: &str| hex::encode(Sha256::digest(format!("{what}-{i}").as_bytes()));
    let (owner, digest, hash) = (h("owner"), h("image"), h("template"));
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: sensor-reader-{i}
  namespace: plant-a
  labels: {{app: sensor-reader, line: "l{line}", tier: edge, pod-template-hash: "{tpl}"}}
  annotations: {{prometheus.io/scrape: "true", prometheus.io/port: "9102", kubectl.kubernetes.io/restartedAt: "2026-11-20T08:00:00Z"}}
  ownerReferences: [{{apiVersion: apps/v1, kind: ReplicaSet, name: "sensor-reader-{tpl}", uid: "{o1}-{o2}-{o3}-{o4}-{o5}", controller: true, blockOwnerDeletion: true}}]
spec:
  nodeSelector: {{node-role.kubernetes.io/edge: ""}}
  tolerations: [{{key: node.kubernetes.io/unreachable, operator: Exists, effect: NoExecute}}]
  containers:
  - name: reader
    image: registry.example.com/plant/sensor-reader:2.4.{i}@sha256:{digest}
    args: [--bus, /dev/ttyUSB0, --interval, 5s, --publish, mqtt://localhost:1883/plant-a/line-{line}]
    env:
    - {{name: SITE, value: plant-a}}
    - {{name: NODE_NAME, valueFrom: {{fieldRef: {{fieldPath: spec.nodeName}}}}}}
    - {{name: TOKEN, valueFrom: {{secretKeyRef: {{name: reader-token, key: token}}}}}}
    resources: {{requests: {{cpu: 50m, memory: 32Mi}}, limits: {{cpu: 200m, memory: 64Mi}}}}
    livenessProbe: {{httpGet: {{path: /healthz, port: 9102}}, periodSeconds: 10, failureThreshold: 3}}
    readinessProbe: {{httpGet: {{path: /ready, port: 9102}}, periodSeconds: 5}}
    volumeMounts: [{{name: config, mountPath: /etc/reader}}, {{name: data, mountPath: /var/lib/reader}}]
    securityContext: {{runAsUser: 1000, runAsGroup: 1000, readOnlyRootFilesystem: true, allowPrivilegeEscalation: false}}
  volumes:
  - {{name: config, configMap: {{name: reader-config}}}}
  - {{name: data, emptyDir: {{sizeLimit: 64Mi}}}}
"#,
        line = i % 7,
        tpl = &hash[..10],
        o1 = &owner[..8],
        o2 = &owner[8..12],
        o3 = &owner[12..16],
        o4 = &owner[16..20],
        o5 = &owner[20..32],
    )
}

/// What a simulated edge keeps across its sessions, as edge-rt's store
/// does: versions, bodies (to apply patches to) and the sync cursors.
#[derive(Default)]
struct SimEdge {
    inventory: Inventory,
    bodies: std::collections::HashMap<String, serde_json::Value>,
    cursors: BTreeMap<Kind, String>,
}

/// Connect as `name` with what `edge` has, until nothing more comes for
/// 300 ms; returns (bytes, seconds, changes), and updates `edge`.
async fn session(
    server: &str,
    name: &str,
    tls: rustls::ClientConfig,
    edge: &mut SimEdge,
) -> Result<(u64, f64, usize)> {
    let SimEdge {
        inventory,
        bodies,
        cursors,
    } = edge;
    let c = Counters::default();
    let t = Instant::now();
    let (host, port, _) = edge_rt::link::parse_server(server)?;
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
    let counted = Counted {
        inner: tcp,
        rx: c.rx.clone(),
        tx: c.tx.clone(),
    };
    let mut link = connect_over(server, "/link", tls, counted).await?;
    let phase = |what: &str| {
        if std::env::var_os("LINK_LOAD_PHASES").is_some() {
            let (rx, tx) = c.total();
            eprintln!("  {what:<28} in {rx:>6} out {tx:>6}");
        }
    };
    phase("TLS + WebSocket");
    let digests = outrigger_proto::inventory::digests_of(inventory);
    // As edge-rt does: the digest rides with the hello.
    let digest = Message::Sync(Sync::Digest {
        kinds: digests,
        cursors: cursors.clone(),
    });
    edge_rt::link::join::hello_with(&mut link, name, Some(&digest)).await?;
    phase("hello, digest");
    let mut changes = 0;
    let mut done = t.elapsed();
    loop {
        match tokio::time::timeout(Duration::from_millis(300), link.recv()).await {
            Ok(Ok(Message::Sync(Sync::Changes {
                batch,
                changes: cs,
                cursors: cur,
            }))) => {
                phase("inventory, a batch");
                let mut stale: BTreeMap<Kind, Vec<String>> = BTreeMap::new();
                for ch in cs {
                    changes += 1;
                    match ch {
                        Change::Put {
                            kind,
                            uid,
                            resource_version,
                            body,
                        } => {
                            bodies.insert(uid.clone(), serde_json::from_slice(&body)?);
                            inventory
                                .entry(kind)
                                .or_default()
                                .insert(uid, resource_version);
                        }
                        Change::Patch {
                            kind,
                            uid,
                            base_version,
                            resource_version,
                            patch,
                        } => {
                            let at_base = inventory.get(&kind).and_then(|m| m.get(&uid))
                                == Some(&base_version);
                            // As edge-rt applies it.
                            let applied = match bodies.get_mut(&uid) {
                                Some(b) if at_base => edge_rt::link::client::apply_patch(b, &patch),
                                _ => false,
                            };
                            if applied {
                                inventory
                                    .entry(kind)
                                    .or_default()
                                    .insert(uid, resource_version);
                            } else {
                                stale.entry(kind).or_default().push(uid);
                            }
                        }
                        Change::Delete { kind, uid } => {
                            bodies.remove(&uid);
                            inventory.entry(kind).or_default().remove(&uid);
                        }
                    }
                }
                if !cur.is_empty() {
                    *cursors = cur;
                }
                for (kind, uids) in stale {
                    link.send(&Message::Sync(Sync::Stale { kind, uids }))
                        .await?;
                }
                link.send(&Message::Sync(Sync::Ack { batch })).await?;
                done = t.elapsed();
            }
            Ok(Ok(Message::Sync(Sync::Query { kinds: q }))) => {
                phase("digest, query");
                let part = outrigger_proto::inventory::answer(inventory, &q);
                link.send(&Message::Sync(Sync::Inventory { kinds: part }))
                    .await?;
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => break,
        }
    }
    phase("changes acked");
    link.close("done").await;
    phase("closed");
    let (rx, tx) = c.total();
    Ok((rx + tx, done.as_secs_f64(), changes))
}

async fn delta(args: &Args, objects: usize) -> Result<()> {
    let pki = Pki::load(&DirKeeper::new(&args.dir))?;
    let name = "delta-node";
    let d = args.dir.join("objects").join(name);
    std::fs::create_dir_all(&d)?;
    for i in 0..objects {
        std::fs::write(d.join(format!("pod-{i}.yaml")), pod(i))?;
    }
    let mut inv = SimEdge::default();
    // One identity and TLS configuration, as a node keeps across reconnects.
    let tls = identity(&pki, name)?;
    let (full, full_t, n_full) = session(&args.server, name, tls.clone(), &mut inv).await?;
    let changed = d.join("pod-17.yaml");
    std::fs::write(&changed, pod(17).replace("2.4.17", "2.5.0"))?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (one, one_t, n_one) = session(&args.server, name, tls.clone(), &mut inv).await?;
    let (none, none_t, n_none) = session(&args.server, name, tls, &mut inv).await?;
    println!("reconnect after a cut: one node with {objects} pods (~2.3 KB of JSON each), loopback; bytes both ways including TLS and WebSocket handshakes");
    println!(
        "{:<40} {:>8} {:>12} {:>10} {:>14}",
        "session", "changes", "bytes", "of full", "converged in"
    );
    for (label, b, t, c) in [
        ("full resync (empty inventory)", full, full_t, n_full),
        ("reconnect, 1 object changed", one, one_t, n_one),
        ("reconnect, nothing changed", none, none_t, n_none),
    ] {
        println!(
            "{label:<40} {c:>8} {b:>12} {:>9.1}% {:>11.0} ms",
            b as f64 * 100.0 / full as f64,
            t * 1000.0
        );
    }
    Ok(())
}

/// One simulated node against `cloud-gw run`: take its pods, ack them,
/// report each Running (and the node), then ping until the end.
async fn run_kube_node(
    server: String,
    name: String,
    tls: rustls::ClientConfig,
    pods: usize,
    done: Arc<AtomicU64>,
    connected: Arc<AtomicU64>,
) -> Result<()> {
    use outrigger_proto::message::{Row, Status};
    let mut link = edge_rt::link::join::connect(&server, "/link", tls).await?;
    hello(&mut link, &name).await?;
    link.send(&kinds(&BTreeMap::new())).await?;
    connected.fetch_add(1, Ordering::Relaxed);
    let mut got = Vec::new();
    let mut reported = false;
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    tick.tick().await;
    loop {
        tokio::select! {
            m = link.recv() => match m? {
                Message::Sync(Sync::Changes { batch, changes, .. }) => {
                    for c in changes {
                        if let Change::Put { kind, body, .. } = c {
                            if kind == Kind::Pod {
                                got.push(serde_json::from_slice::<serde_json::Value>(&body)?);
                            }
                        }
                    }
                    link.send(&Message::Sync(Sync::Ack { batch })).await?;
                    if got.len() >= pods && !reported {
                        reported = true;
                        let now = "2026-11-24T00:00:00Z";
                        let status: k8s_openapi::api::core::v1::PodStatus = serde_json::from_value(serde_json::json!(
                            {"phase": "Running", "startTime": now, "hostIP": "10.0.0.1", "podIP": "10.88.0.2",
                             "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now}],
                             "containerStatuses": [{"name": "reader", "ready": true, "restartCount": 0, "image": "busybox",
                                 "imageID": "", "state": {"running": {"startedAt": now}}}]}))?;
                        let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
                        let mut reports: Vec<Report> = got.iter().map(|p| Report::Pod(Box::new(PodReport {
                            namespace: text(&p["metadata"]["namespace"]),
                            name: text(&p["metadata"]["name"]),
                            uid: text(&p["metadata"]["uid"]),
                            status: Some(status.clone()),
                        }))).collect();
                        let capacity: BTreeMap<String, Quantity> = [("cpu", "4"), ("memory", "4Gi"), ("pods", "110")]
                            .map(|(k, v)| (k.to_string(), Quantity(v.to_string()))).into();
                        reports.push(Report::Node(Box::new(NodeReport {
                            name: name.clone(),
                            conditions: vec![NodeCondition { type_: "Ready".into(), status: "True".into(),
                                reason: Some("EdgeRuntimeReady".into()), ..Default::default() }],
                            allocatable: capacity.clone(),
                            capacity,
                            ..Default::default()
                        })));
                        let rows: Vec<Row> = reports.iter().enumerate().map(|(i, r)| r.to_row(i as i64 + 1)).collect();
                        link.send(&Message::Status(Status::Rows { rows })).await?;
                    }
                }
                Message::Status(Status::Ack { seqs }) => {
                    if seqs.len() > pods {
                        done.fetch_add(1, Ordering::Relaxed);
                    } else {
                        eprintln!("{name}: only {} of {} rows acked", seqs.len(), pods + 1);
                    }
                }
                _ => {}
            },
            _ = tick.tick() => link.ping().await?,
        }
    }
}

async fn kube_scale(
    args: &Args,
    kubeconfig: &std::path::Path,
    n: usize,
    per_node: usize,
    pid: u32,
) -> Result<()> {
    use futures_util::StreamExt;
    use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret};
    use kube::api::{ListParams, PostParams};
    raise_nofile();
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)?;
    let client = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?,
    )?;
    let t = Instant::now();
    let ns: Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "plant-a"}}))?;
    let _ = kube::Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await;
    let cm: ConfigMap = serde_json::from_value(
        serde_json::json!({"metadata": {"name": "reader-config"}, "data": {"a": "1"}}),
    )?;
    let _ = kube::Api::<ConfigMap>::namespaced(client.clone(), "plant-a")
        .create(&PostParams::default(), &cm)
        .await;
    let sec: Secret = serde_json::from_value(
        serde_json::json!({"metadata": {"name": "reader-token"}, "stringData": {"token": "t"}}),
    )?;
    let _ = kube::Api::<Secret>::namespaced(client.clone(), "plant-a")
        .create(&PostParams::default(), &sec)
        .await;
    // The Nodes first, as joining registers them: pods bound to a node that
    // does not exist are the pod garbage collector's.
    let nodes_api = kube::Api::<k8s_openapi::api::core::v1::Node>::all(client.clone());
    let registered = futures_util::stream::iter(0..n)
        .map(|i| {
            let api = nodes_api.clone();
            async move {
                let node = serde_json::from_value(serde_json::json!({
                    "metadata": {"name": format!("sim-{i}"),
                                 "labels": {"node-role.kubernetes.io/edge": "", "kubernetes.io/hostname": format!("sim-{i}")}}
                }))?;
                match api.create(&PostParams::default(), &node).await {
                    Ok(_) => anyhow::Ok(()),
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
                    Err(e) => Err(e.into()),
                }
            }
        })
        .buffer_unordered(32)
        .filter(|r| std::future::ready(r.is_err()))
        .count()
        .await;
    anyhow::ensure!(registered == 0, "{registered} nodes not registered");
    let pods_api = kube::Api::<Pod>::namespaced(client.clone(), "plant-a");
    let created = futures_util::stream::iter(0..n * per_node)
        .map(|i| {
            let api = pods_api.clone();
            async move {
                let mut v: serde_json::Value = serde_yaml_ng::from_str(&pod(i))?;
                v["spec"]["nodeName"] = format!("sim-{}", i / per_node).into();
                // The garbage collector would delete a pod whose owner does
                // not exist (these ReplicaSets are made up).
                if let Some(m) = v["metadata"].as_object_mut() {
                    m.remove("ownerReferences");
                }
                let p: Pod = serde_json::from_value(v)?;
                api.create(&PostParams::default(), &p).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(32)
        .filter(|r| std::future::ready(r.is_err()))
        .count()
        .await;
    anyhow::ensure!(created == 0, "{created} pods not created");
    eprintln!(
        "created {} pods in {:.1} s",
        n * per_node,
        t.elapsed().as_secs_f64()
    );
    // cloud-gw lifts the cluster's default toleration bound on every one
    // of them (they are bound to edge nodes): measured once that is done.
    let t = Instant::now();
    loop {
        let pods = pods_api.list(&ListParams::default()).await?.items;
        let bounded = pods
            .iter()
            .filter(|p| {
                p.spec
                    .as_ref()
                    .and_then(|s| s.tolerations.as_ref())
                    .is_some_and(|ts| {
                        ts.iter().any(|t| {
                            t.key.as_deref() == Some("node.kubernetes.io/not-ready")
                                && t.toleration_seconds.is_some()
                        })
                    })
            })
            .count();
        if bounded == 0 {
            break;
        }
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(300),
            "{bounded} pods still bounded after 5 minutes"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    eprintln!(
        "toleration bounds lifted in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    let rss0 = rss_kib(pid);
    let ids = identities(args, "sim-", n)?;
    let done = Arc::new(AtomicU64::new(0));
    let connected = Arc::new(AtomicU64::new(0));
    let t = Instant::now();
    spawn_nodes(ids, &connected, |name, tls| {
        run_kube_node(
            args.server.clone(),
            name,
            tls,
            per_node,
            done.clone(),
            connected.clone(),
        )
    })
    .await;
    wait_count(&done, n, Duration::from_secs(900), "synced and reported").await?;
    let synced = t.elapsed().as_secs_f64();
    // Settled: leases renewed, nothing else to do.
    tokio::time::sleep(Duration::from_secs(30)).await;
    let rss1 = rss_kib(pid);
    let running = pods_api
        .list(&ListParams::default().fields("status.phase=Running"))
        .await?
        .items
        .len();
    println!("one cloud-gw (run) against a real control plane (v1.36): {n} simulated edge nodes x {per_node} pods");
    println!("{:<44} {:>12}", "measure", "value");
    println!(
        "{:<44} {:>10.1} s",
        "all synced, every pod's status written", synced
    );
    println!("{:<44} {:>12}", "pods Running in the cluster", running);
    println!(
        "{:<44} {:>9.1} MB",
        "cloud-gw RSS, caches listed, no node linked",
        rss0 as f64 / 1024.0
    );
    println!(
        "{:<44} {:>9.1} MB",
        "cloud-gw RSS, all nodes linked, settled",
        rss1 as f64 / 1024.0
    );
    println!(
        "{:<44} {:>9.1} KB",
        "memory per node",
        rss1.saturating_sub(rss0) as f64 / n as f64
    );
    Ok(())
}

/// A node that takes what comes and never acks (a gateway whose store
/// is stuck, say), pinging so that the link stays up. Counts what it got.
async fn run_slow_node(
    server: String,
    name: String,
    tls: rustls::ClientConfig,
    got: Arc<AtomicU64>,
    connected: Arc<AtomicU64>,
) -> Result<()> {
    let mut link = edge_rt::link::join::connect(&server, "/link", tls).await?;
    hello(&mut link, &name).await?;
    link.send(&kinds(&BTreeMap::new())).await?;
    connected.fetch_add(1, Ordering::Relaxed);
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    tick.tick().await;
    loop {
        tokio::select! {
            m = link.recv() => {
                if let Message::Sync(Sync::Changes { changes, .. }) = m? {
                    got.fetch_add(changes.len() as u64, Ordering::Relaxed);
                }
            }
            _ = tick.tick() => link.ping().await?,
        }
    }
}

async fn slow(args: &Args, n: usize, m: usize, rounds: usize, pid: u32) -> Result<()> {
    raise_nofile();
    let objects = args.dir.join("objects");
    let write = |round: usize| -> Result<()> {
        for i in 0..n {
            let d = objects.join(format!("slow-{i}"));
            std::fs::create_dir_all(&d)?;
            let text: String = (0..m)
                .map(|k| {
                    format!(
                        "kind: ConfigMap\nmetadata: {{name: c{k}}}\ndata: {{round: '{round}', reading: '{}'}}\n---\n",
                        "r".repeat(200)
                    )
                })
                .collect();
            let tmp = d.join(".all.tmp");
            std::fs::write(&tmp, text)?;
            std::fs::rename(&tmp, d.join("all.yaml"))?;
        }
        Ok(())
    };
    write(0)?;
    let rss0 = rss_kib(pid);
    let ids = identities(args, "slow-", n)?;
    let got = Arc::new(AtomicU64::new(0));
    let connected = Arc::new(AtomicU64::new(0));
    spawn_nodes(ids, &connected, |name, tls| {
        run_slow_node(
            args.server.clone(),
            name,
            tls,
            got.clone(),
            connected.clone(),
        )
    })
    .await;
    wait_count(&connected, n, Duration::from_secs(300), "connected").await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    println!("one cloud-gw, {n} nodes that never ack, {m} ConfigMaps each (~300 B), every one changed each round");
    println!(
        "{:<28} {:>12} {:>14} {:>16}",
        "after", "cloud-gw RSS", "per slow node", "changes received"
    );
    let row = |what: String, got: u64| {
        let rss = rss_kib(pid);
        println!(
            "{what:<28} {:>9.1} MB {:>11.1} KB {got:>16}",
            rss as f64 / 1024.0,
            rss.saturating_sub(rss0) as f64 / n as f64
        );
    };
    row("connected".into(), got.load(Ordering::Relaxed));
    for r in 1..=rounds {
        write(r)?;
        // The sessions notice (inotify) and re-read; let them settle.
        tokio::time::sleep(Duration::from_secs(5)).await;
        row(format!("round {r} of changes"), got.load(Ordering::Relaxed));
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    match &args.cmd {
        Cmd::Scale {
            nodes,
            cloud_pid,
            pushes,
            idle_secs,
            heartbeat_secs,
        } => {
            scale(
                &args,
                *nodes,
                *cloud_pid,
                *pushes,
                *idle_secs,
                *heartbeat_secs,
            )
            .await
        }
        Cmd::Delta { objects } => delta(&args, *objects).await,
        Cmd::Slow {
            nodes,
            objects,
            rounds,
            cloud_pid,
        } => slow(&args, *nodes, *objects, *rounds, *cloud_pid).await,
        Cmd::Kube {
            kubeconfig,
            nodes,
            pods,
            cloud_pid,
        } => kube_scale(&args, kubeconfig, *nodes, *pods, *cloud_pid).await,
    }
    .context("link-load")
}
