//! `edge-rt bench services`: the node's DNS server beside dnsmasq, what
//! 1,000 Services add to edge-rt's memory, and what a ClusterIP adds to a
//! request to a pod on another gateway.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use serde_json::json;

use super::{percentile, status_kib, vm_rss_kib, BenchNode};
use crate::config::Config;
use crate::services::{rules, table};
use crate::store::{Change, Kind, Object, Source, Store};

fn service_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, (i / 250) as u8, (i % 250 + 1) as u8)
}

/// N Services of namespace `bench`, each with a slice of one endpoint.
fn objects(n: usize) -> Vec<Object> {
    let mut out = Vec::new();
    for i in 0..n {
        let name = format!("svc-{i}");
        let ip = service_ip(i).to_string();
        let svc = json!({"metadata": {"name": name, "namespace": "bench", "uid": format!("svc-uid-{i}")},
            "spec": {"clusterIP": ip, "clusterIPs": [ip],
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}});
        let slice = json!({"metadata": {"name": format!("{name}-x"), "namespace": "bench", "uid": format!("slice-uid-{i}"),
                                        "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [format!("10.97.{}.{}", i / 250, i % 250 + 1)],
                           "conditions": {"ready": true}, "nodeName": "elsewhere"}]});
        for (kind, body) in [(Kind::Service, svc), (Kind::EndpointSlice, slice)] {
            out.push(Object {
                kind,
                namespace: "bench".into(),
                name: body["metadata"]["name"].as_str().unwrap_or_default().into(),
                uid: body["metadata"]["uid"].as_str().unwrap_or_default().into(),
                resource_version: "1".into(),
                source: Source::Cloud,
                body,
            });
        }
    }
    out
}

/// One query's answer time, or None if it went unanswered or wrong.
async fn ask(sock: &tokio::net::UdpSocket, name: &str, id: u16) -> Option<f64> {
    let mut q = Message::query();
    q.metadata.id = id;
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(Name::from_ascii(name).ok()?, RecordType::A));
    let bytes = q.to_vec().ok()?;
    let t0 = Instant::now();
    sock.send(&bytes).await.ok()?;
    let mut buf = [0u8; 1500];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(1), sock.recv(&mut buf))
            .await
            .ok()?
            .ok()?;
        let m = Message::from_vec(&buf[..n]).ok()?;
        if m.metadata.id != id {
            continue;
        }
        let ok = m.metadata.response_code == ResponseCode::NoError && m.answers.len() == 1;
        return ok.then(|| t0.elapsed().as_secs_f64() * 1000.0);
    }
}

/// `clients` concurrent askers for `secs` seconds: (queries per second,
/// p50 ms, p99 ms, failures).
async fn load(
    server: SocketAddr,
    n: usize,
    clients: usize,
    secs: u64,
) -> Result<(f64, f64, f64, usize)> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let sock = tokio::net::UdpSocket::bind("0.0.0.0:0").await?;
        sock.connect(server).await?;
        tasks.push(tokio::spawn(async move {
            let (mut lat, mut failed) = (Vec::new(), 0usize);
            let mut i = c * 7919;
            while Instant::now() < deadline {
                i = (i + 7919) % n;
                let name = format!("svc-{i}.bench.svc.cluster.local.");
                match ask(&sock, &name, (i % 65535) as u16).await {
                    Some(ms) => lat.push(ms),
                    None => failed += 1,
                }
            }
            (lat, failed)
        }));
    }
    let (mut all, mut failed) = (Vec::new(), 0);
    for t in tasks {
        let (l, f) = t.await?;
        all.extend(l);
        failed += f;
    }
    let qps = all.len() as f64 / secs as f64;
    Ok((
        qps,
        percentile(&mut all, 0.5),
        percentile(&mut all, 0.99),
        failed,
    ))
}

fn dnsmasq(hosts: &Path, port: u16) -> Result<std::process::Child> {
    Command::new("dnsmasq")
        .args([
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
            "--user=root",
            "--pid-file=",
        ])
        .arg(format!("--port={port}"))
        .arg(format!("--addn-hosts={}", hosts.display()))
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("dnsmasq (apt install dnsmasq-base)")
}

async fn node_with(cfg: &Config, dir: &Path, services: usize) -> Result<BenchNode> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    if services > 0 {
        let scfg = crate::store::StoreConfig {
            path: Some(dir.join("store.db")),
            key_file: Some(dir.join("store.key")),
            ..Default::default()
        };
        let store = Store::open(&scfg, dir)?;
        let changes: Vec<Change> = objects(services).into_iter().map(Change::Put).collect();
        store.apply(&changes, &[])?;
    }
    // The store is made before the node directory is cleared: keep it.
    BenchNode::start_keeping(cfg, dir, true, "[services]\nroutes = false\n").await
}

pub async fn run(
    cfg: &Config,
    services: usize,
    clients: usize,
    secs: u64,
    runs: usize,
    dir: &Path,
) -> Result<()> {
    // Memory: a node with N Services in its store beside one with none,
    // alternating; medians.
    let (mut with, mut without) = (Vec::new(), Vec::new());
    let (mut with_anon, mut without_anon) = (Vec::new(), Vec::new());
    let mut served = None;
    for r in 0..runs.max(1) {
        for (n, out, anon) in [
            (services, &mut with, &mut with_anon),
            (0, &mut without, &mut without_anon),
        ] {
            let node = node_with(cfg, &dir.join(format!("n{n}")), n).await?;
            tokio::time::sleep(Duration::from_secs(3)).await;
            let pid = node.child.id();
            out.push(vm_rss_kib(pid).unwrap_or(0) as f64 / 1024.0);
            anon.push(status_kib(pid, "RssAnon:").unwrap_or(0) as f64 / 1024.0);
            if n > 0 && r == 0 {
                let gw = node.gateway().context("no pod bridge")?;
                let at = SocketAddr::new(gw.into(), 53);
                served = Some(load(at, services, clients, secs).await?);
            }
            node.finish(cfg).await?;
            crate::services::remove_rules().map_err(anyhow::Error::msg)?;
        }
    }
    // dnsmasq with the same names from a hosts file.
    let hosts = dir.join("hosts");
    let text: String = (0..services)
        .map(|i| format!("{} svc-{i}.bench.svc.cluster.local\n", service_ip(i)))
        .collect();
    std::fs::write(&hosts, text)?;
    let port = 15353;
    let mut child = dnsmasq(&hosts, port)?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let base = load(
        SocketAddr::from(([127, 0, 0, 1], port)),
        services,
        clients,
        secs,
    )
    .await;
    let rss_dnsmasq = vm_rss_kib(child.id()).unwrap_or(0) as f64 / 1024.0;
    let _ = child.kill();
    let _ = child.wait();
    let base = base?;
    let Some(ours) = served else {
        bail!("edge-rt was not measured");
    };
    let (w, wo) = (percentile(&mut with, 0.5), percentile(&mut without, 0.5));
    let (wa, woa) = (
        percentile(&mut with_anon, 0.5),
        percentile(&mut without_anon, 0.5),
    );
    println!("DNS, {services} Services, {clients} clients, {secs} s, A queries for Service names:");
    println!(
        "{:<22} {:>10} {:>9} {:>9} {:>8}",
        "server", "queries/s", "p50 ms", "p99 ms", "failed"
    );
    for (who, (qps, p50, p99, failed)) in
        [("edge-rt (node DNS)", ours), ("dnsmasq (hosts file)", base)]
    {
        println!("{who:<22} {qps:>10.0} {p50:>9.3} {p99:>9.3} {failed:>8}");
    }
    println!(
        "edge-rt RSS: {w:.1} MiB with {services} Services, {wo:.1} MiB without: +{:.1} MiB (medians of {runs}); dnsmasq {rss_dnsmasq:.1} MiB",
        w - wo
    );
    println!(
        "  of which anonymous (heap, stacks): {wa:.1} MiB with, {woa:.1} MiB without: +{:.1} MiB",
        wa - woa
    );
    Ok(())
}

fn ip(args: &[&str]) -> Result<()> {
    let o = Command::new("ip").args(args).output().context("ip")?;
    ensure!(
        o.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(())
}

/// Two gateways of a site and a pod behind each, in network namespaces:
/// pod-a (10.244.1.5) - gw-a - site - gw-b - pod-b (10.244.2.5).
struct Site;

const NS: [&str; 4] = ["orb-pa", "orb-ga", "orb-gb", "orb-pb"];

impl Site {
    fn new() -> Result<Site> {
        Site::clean();
        for ns in NS {
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        let link = |a: &str, ia: &str, b: &str, ib: &str| -> Result<()> {
            ip(&[
                "-n", a, "link", "add", ia, "type", "veth", "peer", "name", ib, "netns", b,
            ])?;
            ip(&["-n", a, "link", "set", ia, "up"])?;
            ip(&["-n", b, "link", "set", ib, "up"])
        };
        link("orb-pa", "eth0", "orb-ga", "pod")?;
        link("orb-ga", "site", "orb-gb", "site")?;
        link("orb-gb", "pod", "orb-pb", "eth0")?;
        for (ns, dev, addr) in [
            ("orb-pa", "eth0", "10.244.1.5/24"),
            ("orb-ga", "pod", "10.244.1.1/24"),
            ("orb-ga", "site", "192.168.78.2/24"),
            ("orb-gb", "site", "192.168.78.3/24"),
            ("orb-gb", "pod", "10.244.2.1/24"),
            ("orb-pb", "eth0", "10.244.2.5/24"),
        ] {
            ip(&["-n", ns, "addr", "add", addr, "dev", dev])?;
        }
        ip(&[
            "-n",
            "orb-pa",
            "route",
            "add",
            "default",
            "via",
            "10.244.1.1",
        ])?;
        ip(&[
            "-n",
            "orb-pb",
            "route",
            "add",
            "default",
            "via",
            "10.244.2.1",
        ])?;
        ip(&[
            "-n",
            "orb-ga",
            "route",
            "add",
            "10.244.2.0/24",
            "via",
            "192.168.78.3",
        ])?;
        ip(&[
            "-n",
            "orb-gb",
            "route",
            "add",
            "10.244.1.0/24",
            "via",
            "192.168.78.2",
        ])?;
        for ns in ["orb-ga", "orb-gb"] {
            let o = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    ns,
                    "sysctl",
                    "-qw",
                    "net.ipv4.ip_forward=1",
                ])
                .output()?;
            ensure!(o.status.success(), "ip_forward in {ns}");
        }
        Ok(Site)
    }

    fn clean() {
        for ns in NS {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        Site::clean();
    }
}

/// Run `f` on a thread inside network namespace `ns`.
fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let path = format!("/run/netns/{ns}");
    let h = crate::sys::thread("bench-netns", move || -> Result<T> {
        let fd = std::fs::File::open(&path)?;
        nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET)?;
        f()
    })?;
    h.join()
        .map_err(|_| anyhow::anyhow!("netns thread panicked"))?
}

/// Request/response times (ms) of `n` connections to `to`: connect, one
/// line out, its echo back, close.
fn requests(to: SocketAddr, n: usize) -> Result<Vec<f64>> {
    use std::io::{Read, Write};
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        let mut s = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
        s.set_nodelay(true)?;
        s.write_all(b"ping\n")?;
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf)?;
        out.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(out)
}

/// The ClusterIP bar: the same requests from pod-a to pod-b, at its
/// address and through a Service's ClusterIP (gw-a's rules, as edge-rt
/// renders them), alternating in rounds; medians.
pub fn cluster_ip(requests_per_round: usize, rounds: usize, others: usize) -> Result<()> {
    let _site = Site::new()?;
    // pod-b: an echo server.
    in_netns("orb-pb", || -> Result<()> {
        let l = std::net::TcpListener::bind("10.244.2.5:8080")?;
        crate::sys::thread("bench-echo", move || {
            use std::io::{Read, Write};
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let _ = s.set_nodelay(true);
                let mut buf = [0u8; 5];
                if s.read_exact(&mut buf).is_ok() {
                    let _ = s.write_all(&buf);
                }
            }
        })?;
        Ok(())
    })?;
    // gw-a: the rules for one Service whose one endpoint is pod-b, on gw-b.
    let nodes: Vec<k8s_openapi::api::core::v1::Node> = serde_json::from_value(json!([
        {"metadata": {"name": "gw-a", "labels": {table::ZONE: "site"}}, "spec": {"podCIDR": "10.244.1.0/24"}},
        {"metadata": {"name": "gw-b", "labels": {table::ZONE: "site"}}, "spec": {"podCIDR": "10.244.2.0/24"},
         "status": {"addresses": [{"type": "InternalIP", "address": "192.168.78.3"}]}}
    ]))?;
    // The measured Service last in the chain (names sort before "echo"),
    // behind `others` with endpoints of their own: the worst case.
    let mut svc_json = vec![json!({"metadata": {"name": "echo", "namespace": "bench"},
         "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "tcp", "port": 80}]}})];
    let mut slice_json = vec![
        json!({"metadata": {"name": "echo-x", "namespace": "bench", "labels": {"kubernetes.io/service-name": "echo"}},
         "addressType": "IPv4", "ports": [{"name": "tcp", "port": 8080}],
         "endpoints": [{"addresses": ["10.244.2.5"], "nodeName": "gw-b", "zone": "site"}]}),
    ];
    for i in 0..others {
        let name = format!("a-{i}");
        svc_json.push(json!({"metadata": {"name": name, "namespace": "bench"},
            "spec": {"clusterIP": service_ip(i + 20).to_string(), "ports": [{"name": "tcp", "port": 80}]}}));
        slice_json.push(json!({"metadata": {"name": format!("{name}-x"), "namespace": "bench", "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "ports": [{"name": "tcp", "port": 8080}],
            "endpoints": [{"addresses": [format!("10.244.2.{}", i % 200 + 20)], "nodeName": "gw-b", "zone": "site"}]}));
    }
    let services: Vec<k8s_openapi::api::core::v1::Service> =
        serde_json::from_value(serde_json::Value::Array(svc_json))?;
    let slices: Vec<k8s_openapi::api::discovery::v1::EndpointSlice> =
        serde_json::from_value(serde_json::Value::Array(slice_json))?;
    let t = table::Table::build("gw-a", &nodes, &services, &slices, &Default::default());
    let text = rules::render(
        &t,
        &rules::Local {
            pod_cidr: "10.244.1.0/24".into(),
            dns: None,
            bridge_nf: true,
        },
        &BTreeSet::new(),
    );
    let mut c = Command::new("ip")
        .args(["netns", "exec", "orb-ga", "iptables-restore", "--noflush"])
        .stdin(Stdio::piped())
        .spawn()?;
    if let Some(mut w) = c.stdin.take() {
        use std::io::Write;
        w.write_all(text.as_bytes())?;
    }
    ensure!(c.wait()?.success(), "iptables-restore in gw-a");
    for (table, chain, target) in [
        ("nat", "PREROUTING", rules::SERVICES),
        ("nat", "POSTROUTING", rules::POSTROUTING),
    ] {
        let o = Command::new("ip")
            .args([
                "netns", "exec", "orb-ga", "iptables", "-t", table, "-I", chain, "1", "-j", target,
            ])
            .output()?;
        ensure!(o.status.success(), "jump in gw-a");
    }
    let direct: SocketAddr = "10.244.2.5:8080".parse()?;
    let via: SocketAddr = "10.96.0.10:80".parse()?;
    let (mut d, mut v) = (Vec::new(), Vec::new());
    // Warm up both paths (ARP, routes), then alternate.
    in_netns("orb-pa", move || {
        requests(direct, 50).and(requests(via, 50))
    })?;
    for _ in 0..rounds.max(1) {
        d.extend(in_netns("orb-pa", move || {
            requests(direct, requests_per_round)
        })?);
        v.extend(in_netns("orb-pa", move || {
            requests(via, requests_per_round)
        })?);
    }
    let (d50, v50) = (percentile(&mut d, 0.5), percentile(&mut v, 0.5));
    println!("A request (connect, 5 bytes each way, close) from a pod on gateway A to a pod on gateway B, {} Services in gateway A's rules:", others + 1);
    println!(
        "{:<22} {:>9} {:>9} {:>9}",
        "path", "p50 ms", "p90 ms", "p99 ms"
    );
    for (path, p50, times) in [("pod IP", d50, &mut d), ("ClusterIP (rules)", v50, &mut v)] {
        let (p90, p99) = (percentile(times, 0.9), percentile(times, 0.99));
        println!("{path:<22} {p50:>9.3} {p90:>9.3} {p99:>9.3}");
    }
    println!(
        "ClusterIP adds {:+.3} ms median ({} requests each)",
        v50 - d50,
        d.len()
    );
    Ok(())
}
