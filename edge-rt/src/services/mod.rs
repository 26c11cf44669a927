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
/// traffic between pods of one bridge needs. Whether it is on (without
/// it, such traffic is masqueraded instead).
fn bridge_netfilter() -> bool {
    std::fs::write("/proc/sys/net/bridge/bridge-nf-call-iptables", "1").is_ok()
}

/// Run a command to its end; its stdout. Spawned on the runtime thread
/// and registered with the one reaper (which would otherwise take its exit
/// status first); its pipes are worked off the runtime thread.
async fn run(cmd: &str, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
    use std::io::{Read, Write};
    let what = || format!("{cmd} {}", args.join(" "));
    let mut child = std::process::Command::new(cmd)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .stdin(if stdin.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .spawn()
        .map_err(|e| format!("{cmd}: {e} (is it installed?)"))?;
    let pid = child.id() as i32;
    crate::sys::reaper::register(pid);
    let input = stdin.map(String::from);
    let (mut i, mut o, mut e) = (child.stdin.take(), child.stdout.take(), child.stderr.take());
    let io = crate::sys::blocking(move || {
        if let (Some(w), Some(text)) = (i.as_mut(), input) {
            let _ = w.write_all(text.as_bytes());
        }
        drop(i);
        let (mut out, mut err) = (String::new(), String::new());
        if let Some(r) = o.as_mut() {
            let _ = r.read_to_string(&mut out);
        }
        if let Some(r) = e.as_mut() {
            let _ = r.read_to_string(&mut err);
        }
        (out, err)
    })
    .await;
    let status = loop {
        if let Some(st) = crate::sys::reaper::take(pid) {
            break st;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let (out, err) = io.map_err(|e| format!("{}: {e}", what()))?;
    match status {
        nix::sys::wait::WaitStatus::Exited(_, 0) => Ok(out),
        _ => Err(format!("{}: {}", what(), err.trim())),
    }
}

/// The jumps into our chains from the built-in ones, first in each (the
/// chains exist: the rule set made them).
async fn ensure_jumps() -> Result<(), String> {
    let jumps = [
        ("nat", "PREROUTING", rules::SERVICES, "outrigger services"),
        ("nat", "OUTPUT", rules::SERVICES, "outrigger services"),
        (
            "nat",
            "POSTROUTING",
            rules::POSTROUTING,
            "outrigger services",
        ),
        ("filter", "FORWARD", rules::SERVICES, "outrigger services"),
        ("filter", "OUTPUT", rules::SERVICES, "outrigger services"),
    ];
    for (table, chain, target, comment) in jumps {
        let rule = ["-m", "comment", "--comment", comment, "-j", target];
        let mut check = vec!["-t", table, "-C", chain];
        check.extend(rule);
        if run("iptables", &check, None).await.is_err() {
            let mut add = vec!["-t", table, "-I", chain, "1"];
            add.extend(rule);
            run("iptables", &add, None).await?;
        }
    }
    Ok(())
}

/// Rebuild the rules from the table in one `iptables-restore` (a chain
/// declared there is replaced whole in the commit, never seen empty), then
/// make sure the built-in chains jump to them.
async fn apply_rules(t: &Table, local: &rules::Local) -> Result<(), String> {
    let save = run("iptables-save", &["-t", "nat"], None).await?;
    let text = rules::render(t, local, &rules::ours(&save));
    run("iptables-restore", &["--noflush"], Some(&text)).await?;
    ensure_jumps().await
}

/// How long a failed rebuild waits before the next try (a change in
/// between tries sooner).
const RETRY: Duration = Duration::from_secs(5);

/// What the task publishes and applies from.
pub struct Setup {
    pub cfg: ServicesConfig,
    pub node: String,
    pub domain: String,
    /// The pod network (its CIDR follows the cluster's allocation).
    pub network: Option<Arc<crate::network::Network>>,
    /// More addresses to serve DNS on if the bridge has them (the gateway
    /// of the configured pod CIDR, which pods started before the cluster's
    /// allocation use).
    pub dns_also: Vec<Ipv4Addr>,
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
    let mut dns = Listeners {
        server: setup.cfg.dns.then(|| dns::Server {
            table: rx.clone(),
            resolv_conf: setup.resolv_conf.clone(),
            ours: setup
                .cfg
                .dns_listen
                .iter()
                .map(|a| a.ip())
                .chain(setup.network.as_ref().map(|n| IpAddr::V4(n.gateway())))
                .chain(setup.dns_also.iter().map(|a| IpAddr::V4(*a)))
                .collect(),
        }),
        bound: BTreeSet::new(),
    };
    if setup.cfg.dns_listen.is_empty() {
        let gateway = setup.network.as_ref().map(|n| n.gateway());
        for a in gateway.iter().chain(setup.dns_also.iter()) {
            dns.listen(SocketAddr::new(IpAddr::V4(*a), 53), gateway == Some(*a))
                .await;
        }
    } else {
        for a in setup.cfg.dns_listen.clone() {
            dns.listen(a, true).await;
        }
    }
    tokio::spawn(follow(setup, store, pods, tx, dns));
    rx
}

/// The DNS server's sockets, one pair per address.
struct Listeners {
    server: Option<dns::Server>,
    bound: BTreeSet<SocketAddr>,
}

impl Listeners {
    /// Serve on `addr` too (`must`: a failure is an error, not a note).
    async fn listen(&mut self, addr: SocketAddr, must: bool) {
        let Some(server) = &self.server else { return };
        if self.bound.contains(&addr) {
            return;
        }
        match (
            tokio::net::UdpSocket::bind(addr).await,
            tokio::net::TcpListener::bind(addr).await,
        ) {
            (Ok(u), Ok(t)) => {
                tracing::info!(%addr, "DNS for pods");
                tokio::spawn(server.clone().serve_udp(u));
                tokio::spawn(server.clone().serve_tcp(t));
                self.bound.insert(addr);
            }
            (Err(e), _) | (_, Err(e)) if must => {
                tracing::error!(%addr, error = %e, "the DNS server cannot listen; pods get the host's resolver")
            }
            (Err(e), _) | (_, Err(e)) => tracing::debug!(%addr, error = %e, "no DNS here"),
        }
    }
}

/// Rebuild on every store change and pod status change; apply what
/// changed.
async fn follow(
    setup: Setup,
    store: Arc<Store>,
    pods: Arc<PodManager>,
    tx: watch::Sender<Arc<Table>>,
    mut listeners: Listeners,
) {
    let bridge_nf = bridge_netfilter();
    let mut changed = store.subscribe();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut generation = u64::MAX;
    // The DNS server's address (the first gateway: it stays on the bridge
    // when the pod CIDR moves).
    let dns: Option<IpAddr> = match (setup.cfg.dns, setup.cfg.dns_listen.first(), &setup.network) {
        (false, _, _) => None,
        (true, Some(a), _) => Some(a.ip()),
        (true, None, Some(n)) => Some(IpAddr::V4(n.gateway())),
        (true, None, None) => None,
    };
    let mut applied: Option<(Table, rules::Local)> = None;
    let mut routed: Option<BTreeSet<(String, Ipv4Addr)>> = None;
    let mut last_failure: Option<std::time::Instant> = None;
    loop {
        let t = read_table(&store, &setup.node, &pods, &setup.domain);
        if let (Some(n), Some(cidr)) = (&setup.network, &t.pod_cidr) {
            match n.set_pod_cidr(cidr) {
                Ok(true) => {
                    tracing::info!(
                        cidr,
                        "pod CIDR from the cluster: new pods get addresses from it"
                    );
                    // Pods of both ranges find the DNS server at their gateway.
                    if setup.cfg.dns && setup.cfg.dns_listen.is_empty() {
                        if let Err(e) = n.ensure_bridge() {
                            tracing::warn!(error = %e, "pod bridge not ready for the DNS server");
                        }
                        listeners
                            .listen(SocketAddr::new(IpAddr::V4(n.gateway()), 53), true)
                            .await;
                    }
                }
                Ok(false) => {}
                Err(e) => tracing::error!(cidr, error = %e, "the cluster's pod CIDR is not usable"),
            }
        }
        let local = rules::Local {
            pod_cidr: setup
                .network
                .as_ref()
                .map(|n| n.pod_cidr())
                .unwrap_or_default(),
            dns,
            bridge_nf,
        };
        if **tx.borrow() != t {
            tx.send_replace(Arc::new(t.clone()));
        }
        let due = last_failure.is_none_or(|at| at.elapsed() >= RETRY);
        if setup.cfg.rules && due && applied.as_ref() != Some(&(t.clone(), local.clone())) {
            let started = std::time::Instant::now();
            match apply_rules(&t, &local).await {
                Ok(()) => {
                    tracing::info!(
                        services = t.services.len(),
                        ms = started.elapsed().as_millis() as u64,
                        "service rules rebuilt"
                    );
                    applied = Some((t.clone(), local));
                }
                Err(e) => {
                    last_failure = Some(std::time::Instant::now());
                    tracing::error!(error = %e, "service rules not applied; retrying");
                }
            }
        }
        if setup.cfg.routes && due {
            let want = routes::wanted(&t);
            if routed.as_ref() != Some(&want) {
                match routes::apply(&want).await {
                    Ok(()) => routed = Some(want),
                    Err(e) => {
                        last_failure = Some(std::time::Instant::now());
                        tracing::error!(error = %e, "site routes not applied; retrying");
                    }
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
                    let retry = last_failure.is_some_and(|at| at.elapsed() >= RETRY);
                    if g != generation || retry {
                        generation = g;
                        break;
                    }
                }
            }
        }
    }
}
