//! Pod networking with real namespaces: veth into a bridge, addresses from
//! the pod CIDR, masquerading out to a network the host routes to (another
//! namespace with no route back to pods), pod-to-pod traffic and hostPorts;
//! edge-rt's Service rules in a router namespace (spread, affinity).

use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result};
use edge_rt::network::{Network, NetworkConfig};
use k8s_openapi::api::core::v1::Pod;
use outrigger_tests::netns::VethNs;
use outrigger_tests::podkit::*;
use outrigger_tests::util::{require_root, wait_for};
use serde_json::json;

/// A network outside the node: a namespace behind a veth with a web
/// server, and no route back to the pod CIDR (replies only come back if
/// the node masquerades).
struct Outside {
    // Dropped after the server, as fields drop in order.
    server: std::process::Child,
    net: VethNs,
    pub addr: String,
    _www: tempfile::TempDir,
}

impl Outside {
    fn new(n: u32) -> Result<Outside> {
        let net = VethNs::new(
            &format!("ort-out-{n}"),
            &format!("ortout{n}"),
            &format!("192.168.{n}.1/24"),
            &format!("192.168.{n}.2/24"),
        )?;
        let www = tempfile::tempdir()?;
        std::fs::write(www.path().join("hello"), "from outside\n")?;
        let server = net
            .exec("busybox")
            .args(["httpd", "-f", "-p", "8000", "-h"])
            .arg(www.path())
            .spawn()?;
        Ok(Outside {
            server,
            net,
            addr: format!("192.168.{n}.2"),
            _www: www,
        })
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

/// Removes the test's bridge and its rules however the test ends.
struct BridgeGuard(Network);

impl Drop for BridgeGuard {
    fn drop(&mut self) {
        self.0.remove_bridge();
    }
}

fn pod_ip(p: &Pod) -> Option<String> {
    p.status.as_ref()?.pod_ip.clone()
}

async fn exec(h: &Harness, pod: &str, script: &str) -> Result<(i32, String)> {
    let rec =
        h.rt.list()
            .into_iter()
            .find(|r| r.pod.name == pod && r.exit.is_none())
            .context("running container")?;
    let args: Vec<String> = ["sh", "-c", script].iter().map(|s| s.to_string()).collect();
    h.rt.exec_capture(&rec.id, &args, Duration::from_secs(10), 4096)
        .await?
        .context("exec in time")
}

#[tokio::test]
async fn pods_reach_the_network_each_other_and_host_ports_reach_them() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    // Names and addresses of this test's own, so parallel suites never meet.
    let n = 100 + std::process::id() % 100;
    let cfg = NetworkConfig {
        enabled: true,
        bridge: format!("ortbr{n}"),
        pod_cidr: format!("10.{n}.0.0/24"),
        masquerade: true,
    };
    let outside = Outside::new(n)?;
    let h = Harness::with_network(Some(cfg.clone()))?;
    // A plain server and a TLS server on the host itself (all addresses).
    let host_port = 19000 + n as u16;
    let host_server = std::net::TcpListener::bind(("0.0.0.0", host_port))?;
    std::thread::spawn(move || {
        for mut c in host_server.incoming().flatten() {
            use std::io::{Read, Write};
            let mut buf = [0u8; 1024];
            let _ = c.read(&mut buf);
            let _ = c.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 10\r\n\r\nhost-pong\n");
        }
    });
    let certs = tempfile::tempdir()?;
    outrigger_tests::registry::make_certs(certs.path())?;
    let tls_port = 19100 + n as u16;
    let mut tls_server = Command::new("openssl")
        .args(["s_server", "-quiet", "-www", "-accept"])
        .arg(tls_port.to_string())
        .args(["-cert", "server.crt", "-key", "server.key"])
        .current_dir(certs.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let _bridge = BridgeGuard(Network::new(cfg.clone(), &h.env.cfg.state_dir)?);

    let mut web = sh(
        "web",
        "mkdir -p /www && echo pod-web > /www/index.html && exec httpd -f -p 8080 -h /www",
    );
    web["ports"] = json!([{"containerPort": 8080, "hostPort": 18000 + n}]);
    let mut client = sh("client", "while true; do sleep 0.2; done");
    client["env"] =
        json!([{"name": "MY_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]);
    h.run(vec![
        pod(json!({"metadata": {"name": "web"}, "spec": {"terminationGracePeriodSeconds": 1, "containers": [web]}})),
        pod(json!({"metadata": {"name": "client"}, "spec": {"terminationGracePeriodSeconds": 1, "containers": [client]}})),
    ]);
    let web_pod = h
        .wait("web", "web running with an IP", |p| {
            phase(p) == "Running" && pod_ip(p).is_some()
        })
        .await?;
    let client_pod = h
        .wait("client", "client running", |p| phase(p) == "Running")
        .await?;
    let (web_ip, client_ip) = (
        pod_ip(&web_pod).unwrap(),
        pod_ip(&client_pod).context("client IP")?,
    );
    assert!(
        web_ip.starts_with(&format!("10.{n}.0.")) && web_ip != client_ip,
        "{web_ip} {client_ip}"
    );
    assert_eq!(exec(&h, "client", "echo $MY_IP").await?.1.trim(), client_ip);

    // The host, through the veth and the bridge.
    let (code, out) = exec(
        &h,
        "client",
        &format!("wget -qO- http://10.{n}.0.1:{host_port}/"),
    )
    .await?;
    assert_eq!(
        (code, out.as_str()),
        (0, "host-pong\n"),
        "a server on the host"
    );
    h.wait("client", "ready by its HTTPS probe", |p| {
        app(p, "client").is_some_and(|c| c.ready)
    })
    .await?;
    let _ = tls_server.kill();
    let _ = tls_server.wait();

    // Out through the bridge and the host, masqueraded.
    let (code, out) = exec(
        &h,
        "client",
        &format!("wget -qO- http://{}:8000/hello", outside.addr),
    )
    .await?;
    assert_eq!(
        (code, out.as_str()),
        (0, "from outside\n"),
        "masquerade out"
    );
    // Pod to pod.
    let out = wait_for("web answers", Duration::from_secs(10), || async {
        exec(&h, "client", &format!("wget -qO- http://{web_ip}:8080/"))
            .await
            .ok()
            .filter(|(c, _)| *c == 0)
    })
    .await?;
    assert_eq!(out.1, "pod-web\n");
    // hostPort: from the outside network to the node's address there...
    let hp = 18000 + n;
    let url = format!("http://192.168.{n}.1:{hp}/");
    let outside_wget = [
        "ip",
        "netns",
        "exec",
        &outside.net.ns,
        "busybox",
        "wget",
        "-qO-",
    ];
    // ...and from the node itself.
    let node_wget = ["busybox", "wget", "-qO-"];
    for argv in [&outside_wget[..], &node_wget[..]] {
        let out = Command::new(argv[0]).args(&argv[1..]).arg(&url).output()?;
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "pod-web\n",
            "{argv:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Removal takes the veths, addresses and hostPort rules.
    h.run(vec![]);
    h.pods.settle().await;
    let rules = Command::new("iptables")
        .args(["-t", "nat", "-S", "OUTRIGGER-HOSTPORTS"])
        .output()?;
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert!(!rules.contains(&format!("--dport {hp}")), "{rules}");
    let links = Command::new("ip")
        .args(["link", "show", "master", &cfg.bridge])
        .output()?;
    assert!(String::from_utf8_lossy(&links.stdout).trim().is_empty());

    h.teardown().await;
    drop(outside);
    Ok(())
}

/// A router between a client and two endpoints, each in a namespace of its
/// own, loaded with the rules edge-rt renders for two Services over the
/// same endpoints: one spreads new connections over both, the other
/// (sessionAffinity ClientIP) keeps the client on the one it got first.
/// The kube suite's Services test cannot see affinity: its clients always
/// have an endpoint on their own gateway.
#[test]
fn service_rules_spread_connections_and_client_ip_affinity_keeps_one_endpoint() -> Result<()> {
    use edge_rt::services::{rules, table};
    use outrigger_tests::netns::ip;
    if !require_root() {
        return Ok(());
    }
    struct Namespaces(Vec<&'static str>);
    impl Drop for Namespaces {
        fn drop(&mut self) {
            for ns in &self.0 {
                let _ = ip(&["netns", "del", ns]);
            }
        }
    }
    let nss = Namespaces(vec!["orsv-r", "orsv-c", "orsv-1", "orsv-2"]);
    for ns in &nss.0 {
        let _ = ip(&["netns", "del", ns]);
        ip(&["netns", "add", ns])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
    }
    // The client at 10.247.1.5, the endpoints at 10.247.2.5 and .3.5; the
    // router has .1 on each.
    for (i, ns) in ["orsv-c", "orsv-1", "orsv-2"].iter().enumerate() {
        let (dev, net) = (format!("r{i}"), i + 1);
        ip(&[
            "-n", "orsv-r", "link", "add", &dev, "type", "veth", "peer", "name", "eth0", "netns",
            ns,
        ])?;
        ip(&[
            "-n",
            "orsv-r",
            "addr",
            "add",
            &format!("10.247.{net}.1/24"),
            "dev",
            &dev,
        ])?;
        ip(&["-n", "orsv-r", "link", "set", &dev, "up"])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("10.247.{net}.5/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        ip(&[
            "-n",
            ns,
            "route",
            "add",
            "default",
            "via",
            &format!("10.247.{net}.1"),
        ])?;
    }
    let fwd = Command::new("ip")
        .args([
            "netns",
            "exec",
            "orsv-r",
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ])
        .status()?;
    anyhow::ensure!(fwd.success(), "ip_forward");
    // Each endpoint serves its own name.
    let www = tempfile::tempdir()?;
    let mut servers = Vec::new();
    for n in ["1", "2"] {
        let dir = www.path().join(n);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("name"), format!("endpoint-{n}\n"))?;
        servers.push(
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &format!("orsv-{n}"),
                    "busybox",
                    "httpd",
                    "-f",
                    "-p",
                    "8080",
                    "-h",
                ])
                .arg(&dir)
                .spawn()?,
        );
    }
    struct Kill(Vec<std::process::Child>);
    impl Drop for Kill {
        fn drop(&mut self) {
            for c in &mut self.0 {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
    let _servers = Kill(servers);

    // Both endpoints on the router's node, as the slice controller lists them.
    let nodes: Vec<k8s_openapi::api::core::v1::Node> = serde_json::from_value(
        json!([{"metadata": {"name": "gw"}, "spec": {"podCIDR": "10.247.0.0/16"}}]),
    )?;
    let service = |name: &str, ip: &str, affinity: bool| {
        let mut spec = json!({"clusterIP": ip, "ports": [{"name": "http", "port": 80}]});
        if affinity {
            spec["sessionAffinity"] = json!("ClientIP");
        }
        json!({"metadata": {"name": name, "namespace": "t"}, "spec": spec})
    };
    let slice = |name: &str| {
        json!({"metadata": {"name": format!("{name}-x"), "namespace": "t",
                            "labels": {"kubernetes.io/service-name": name}},
               "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
               "endpoints": [{"addresses": ["10.247.2.5"], "nodeName": "gw"},
                             {"addresses": ["10.247.3.5"], "nodeName": "gw"}]})
    };
    let services: Vec<k8s_openapi::api::core::v1::Service> = serde_json::from_value(json!([
        service("spread", "10.96.7.10", false),
        service("sticky", "10.96.7.11", true)
    ]))?;
    let slices: Vec<k8s_openapi::api::discovery::v1::EndpointSlice> =
        serde_json::from_value(json!([slice("spread"), slice("sticky")]))?;
    let t = table::Table::build("gw", &nodes, &services, &slices, &Default::default());
    let local = rules::Local {
        pod_cidr: "10.247.0.0/16".into(),
        dns: None,
        bridge_nf: false,
    };
    let text = rules::render(&t, &local, &Default::default());
    let mut restore = Command::new("ip")
        .args(["netns", "exec", "orsv-r", "iptables-restore", "--noflush"])
        .stdin(std::process::Stdio::piped())
        .spawn()?;
    if let Some(mut w) = restore.stdin.take() {
        use std::io::Write;
        w.write_all(text.as_bytes())?;
    }
    anyhow::ensure!(restore.wait()?.success(), "iptables-restore:\n{text}");
    let jump = Command::new("ip")
        .args([
            "netns",
            "exec",
            "orsv-r",
            "iptables",
            "-t",
            "nat",
            "-I",
            "PREROUTING",
            "1",
            "-j",
            rules::SERVICES,
        ])
        .status()?;
    anyhow::ensure!(jump.success(), "jump");

    let names = |ip: &str| -> Result<Vec<String>> {
        (0..24)
            .map(|_| {
                let o = Command::new("ip")
                    .args([
                        "netns", "exec", "orsv-c", "timeout", "5", "busybox", "wget", "-q", "-O",
                        "-",
                    ])
                    .arg(format!("http://{ip}/name"))
                    .output()?;
                anyhow::ensure!(
                    o.status.success(),
                    "wget {ip}: {}",
                    String::from_utf8_lossy(&o.stderr)
                );
                Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
            })
            .collect()
    };
    let spread: std::collections::BTreeSet<String> = names("10.96.7.10")?.into_iter().collect();
    assert_eq!(
        spread.len(),
        2,
        "24 connections to a Service of two endpoints: {spread:?}"
    );
    let sticky: std::collections::BTreeSet<String> = names("10.96.7.11")?.into_iter().collect();
    assert_eq!(sticky.len(), 1, "sessionAffinity ClientIP: {sticky:?}");
    Ok(())
}
