//! Services at the edge: the node's DNS server, ClusterIP and NodePort
//! rules, and routes to the pods of the other gateways of its site, all
//! from what the store holds (the cloud's Services, EndpointSlices and
//! site Nodes) and the node's own pods, so they work through days
//! offline.
//!
//! - [`table`]: the store's objects and the pods' readiness as one table
//!   (pure);
//! - [`dns`]: the DNS server over the table (hickory-proto's codec);
//! - [`rules`]: the table as iptables rules (pure), applied here;
//! - [`routes`]: routes to the site's pod CIDRs.
//!
//! One task rebuilds the table when the store or a pod's status changes
//! and applies what differs.

pub mod dns;
pub mod routes;
pub mod rules;
pub mod table;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::pods::PodManager;
use crate::store::{Kind, Store};
use table::Table;

/// `[services]` in the configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServicesConfig {
    /// Serve DNS to the pods (on the pod bridge's address, port 53) and
    /// give ClusterFirst pods that address as their nameserver.
    pub dns: bool,
    /// Where the DNS server listens; empty: the pod bridge's address.
    pub dns_listen: Vec<SocketAddr>,
    /// ClusterIP and NodePort rules.
    pub rules: bool,
    /// Routes to the pod CIDRs of the site's other gateways (through their
    /// addresses, which must be on a network this gateway shares).
    pub routes: bool,
}

impl Default for ServicesConfig {
    fn default() -> Self {
        ServicesConfig {
            dns: true,
            dns_listen: Vec::new(),
            rules: true,
            routes: true,
        }
    }
}

/// The table from the store now.
pub fn read_table(store: &Store, node: &str, pods: &PodManager, domain: &str) -> Table {
    use crate::desired::stored::load;
    let mut t = Table::build(
        node,
        &load(store, Kind::Node),
        &load(store, Kind::Service),
        &load(store, Kind::EndpointSlice),
        &table::local_ready(&pods.list()),
    );
    // No Node heard of yet: the configured domain.
    if !store_has_domain(store, node) {
        t.domain = domain.to_string();
    }
    t
}

fn store_has_domain(store: &Store, node: &str) -> bool {
    use crate::desired::stored::load;
    load::<k8s_openapi::api::core::v1::Node>(store, Kind::Node)
        .iter()
        .any(|n| {
            n.metadata.name.as_deref() == Some(node)
                && n.metadata
                    .annotations
                    .as_ref()
                    .is_some_and(|a| a.contains_key(table::CLUSTER_DOMAIN))
        })
}

/// This node's pod CIDR as the cluster allocated it (its Node's
/// spec.podCIDR, once the cloud sent it), read before any pod starts.
pub fn allocated_pod_cidr(store: &Store, node: &str) -> Option<String> {
    use crate::desired::stored::load;
    load::<k8s_openapi::api::core::v1::Node>(store, Kind::Node)
        .into_iter()
        .find(|n| n.metadata.name.as_deref() == Some(node))
        .and_then(|n| n.spec)
        .and_then(|s| s.pod_cidr)
        .filter(|c| !c.is_empty())
}

/// Let bridged traffic through iptables (br_netfilter), as Service
/// traffic between pods of one bridge needs. Whether it is on.
fn bridge_netfilter() -> bool {
    let p = std::path::Path::new("/proc/sys/net/bridge/bridge-nf-call-iptables");
    if !p.exists() {
        let _ = std::process::Command::new("modprobe")
            .arg("br_netfilter")
            .output();
    }
    std::fs::write(p, "1").is_ok()
}

fn run(cmd: &str, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
    use std::io::Write;
    let mut c = std::process::Command::new(cmd);
    c.args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .stdin(if stdin.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        });
    let mut child = c.spawn().map_err(|e| format!("{cmd}: {e}"))?;
    if let (Some(input), Some(mut w)) = (stdin, child.stdin.take()) {
        w.write_all(input.as_bytes())
            .map_err(|e| format!("{cmd}: {e}"))?;
    }
    let out = child.wait_with_output().map_err(|e| format!("{cmd}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The jumps into our chains from the built-in ones, first in each.
fn ensure_jumps() -> Result<(), String> {
    // The chains exist before anything jumps to them.
    run(
        "iptables-restore",
        &["--noflush"],
        Some(&format!(
            "*nat\n:{s} - [0:0]\n:{p} - [0:0]\nCOMMIT\n*filter\n:{s} - [0:0]\nCOMMIT\n",
            s = rules::SERVICES,
            p = rules::POSTROUTING
        )),
    )?;
    let jumps = [
        ("nat", "PREROUTING", rules::SERVICES, "outrigger services"),
        ("nat", "OUTPUT", rules::SERVICES, "outrigger services"),
        ("nat", "POSTROUTING", rules::POSTROUTING, "outrigger services"),
        ("filter", "FORWARD", rules::SERVICES, "outrigger services"),
        ("filter", "OUTPUT", rules::SERVICES, "outrigger services"),
    ];
    for (table, chain, target, comment) in jumps {
        let rule = ["-m", "comment", "--comment", comment, "-j", target];
        let mut check = vec!["-t", table, "-C", chain];
        check.extend(rule);
        if run("iptables", &check, None).is_err() {
            let mut add = vec!["-t", table, "-I", chain, "1"];
            add.extend(rule);
            run("iptables", &add, None)?;
        }
    }
    Ok(())
}

/// Rebuild the rules from the table in one `iptables-restore`.
fn apply_rules(t: &Table, local: &rules::Local) -> Result<(), String> {
    ensure_jumps()?;
    let save = run("iptables-save", &["-t", "nat"], None)?;
    let text = rules::render(t, local, &rules::ours(&save));
    run("iptables-restore", &["--noflush"], Some(&text)).map(|_| ())
}

/// What the task publishes and applies from.
pub struct Setup {
    pub cfg: ServicesConfig,
    pub node: String,
    pub domain: String,
    /// The node's own pod CIDR (the bridge's).
    pub pod_cidr: String,
    /// The pod bridge's address (the DNS server's default).
    pub gateway: Option<Ipv4Addr>,
    pub resolv_conf: std::path::PathBuf,
}

/// Start the DNS server and keep rules and routes following the store.
/// Returns the table's channel (what else reads it), or None with
/// nothing to serve from.
pub async fn start(
    setup: Setup,
    store: Arc<Store>,
    pods: Arc<PodManager>,
) -> watch::Receiver<Arc<Table>> {
    let first = read_table(&store, &setup.node, &pods, &setup.domain);
    let (tx, rx) = watch::channel(Arc::new(first));
    if setup.cfg.dns {
        let listen: Vec<SocketAddr> = if setup.cfg.dns_listen.is_empty() {
            setup
                .gateway
                .map(|g| SocketAddr::new(IpAddr::V4(g), 53))
                .into_iter()
                .collect()
        } else {
            setup.cfg.dns_listen.clone()
        };
        let server = dns::Server {
            table: rx.clone(),
            resolv_conf: setup.resolv_conf.clone(),
            ours: listen.iter().map(|a| a.ip()).collect(),
        };
        for addr in listen {
            match (
                tokio::net::UdpSocket::bind(addr).await,
                tokio::net::TcpListener::bind(addr).await,
            ) {
                (Ok(u), Ok(t)) => {
                    tracing::info!(%addr, "DNS for pods");
                    tokio::spawn(server.clone().serve_udp(u));
                    tokio::spawn(server.clone().serve_tcp(t));
                }
                (Err(e), _) | (_, Err(e)) => {
                    tracing::error!(%addr, error = %e, "the DNS server cannot listen; pods get the host's resolver")
                }
            }
        }
    }
    tokio::spawn(follow(setup, store, pods, tx));
    rx
}

/// Rebuild on every store change and pod status change; apply what
/// changed.
async fn follow(
    setup: Setup,
    store: Arc<Store>,
    pods: Arc<PodManager>,
    tx: watch::Sender<Arc<Table>>,
) {
    let bridge_nf = crate::sys::blocking(bridge_netfilter)
        .await
        .unwrap_or(false);
    let mut changed = store.subscribe();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut generation = u64::MAX;
    let mut applied: Option<(Table, rules::Local)> = None;
    let mut routed: Option<BTreeSet<(String, Ipv4Addr)>> = None;
    loop {
        let t = read_table(&store, &setup.node, &pods, &setup.domain);
        let local = rules::Local {
            pod_cidr: setup.pod_cidr.clone(),
            dns: setup.gateway.filter(|_| setup.cfg.dns).map(IpAddr::V4),
            bridge_nf,
        };
        if **tx.borrow() != t {
            tx.send_replace(Arc::new(t.clone()));
        }
        if setup.cfg.rules && applied.as_ref() != Some(&(t.clone(), local.clone())) {
            let (t2, l2) = (t.clone(), local.clone());
            let started = std::time::Instant::now();
            match crate::sys::blocking(move || apply_rules(&t2, &l2)).await {
                Ok(Ok(())) => {
                    tracing::info!(services = t.services.len(), ms = started.elapsed().as_millis() as u64, "service rules rebuilt");
                    applied = Some((t.clone(), local));
                }
                Ok(Err(e)) => tracing::error!(error = %e, "service rules not applied; retrying"),
                Err(e) => tracing::error!(error = %e, "service rules not applied; retrying"),
            }
        }
        if setup.cfg.routes {
            let want = routes::wanted(&t);
            if routed.as_ref() != Some(&want) {
                let w = want.clone();
                match crate::sys::blocking(move || routes::apply(&w)).await {
                    Ok(Ok(())) => routed = Some(want),
                    Ok(Err(e)) => tracing::error!(error = %e, "site routes not applied; retrying"),
                    Err(e) => tracing::error!(error = %e, "site routes not applied; retrying"),
                }
            }
        }
        // Wait for a change: the store, or a pod's status.
        loop {
            tokio::select! {
                r = changed.changed() => {
                    if r.is_err() {
                        return;
                    }
                    break;
                }
                _ = tick.tick() => {
                    let g = pods.context().status_generation.load(std::sync::atomic::Ordering::Relaxed);
                    let retry = (setup.cfg.rules && applied.is_none()) || (setup.cfg.routes && routed.is_none());
                    if g != generation || retry {
                        generation = g;
                        break;
                    }
                }
            }
        }
    }
}
