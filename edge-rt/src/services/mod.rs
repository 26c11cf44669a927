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
    use crate::desired::stored::{each, load};
    let nodes: Vec<k8s_openapi::api::core::v1::Node> = load(store, Kind::Node);
    let mut t = Table::new(node, &nodes);
    // No Node of ours heard of yet: the configured domain.
    let told = nodes.iter().any(|n| {
        n.metadata.name.as_deref() == Some(node)
            && n.metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key(table::CLUSTER_DOMAIN))
    });
    if !told {
        t.domain = domain.to_string();
    }
    drop(nodes);
    // Row by row: the typed objects are dropped as soon as the table holds
    // what it needs of them.
    each(store, Kind::Service, |s| t.add_service(&s));
    let local = table::local_ready(&pods.list());
    each(store, Kind::EndpointSlice, |sl| t.add_slice(&sl, &local));
    t.finish()
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

/// What a command is fed on stdin, written from a blocking thread.
type Feed = Box<dyn FnOnce(&mut dyn std::io::Write) -> std::io::Result<()> + Send>;

/// Run a command to its end; its stdout.
async fn run(cmd: &str, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
    let feed = stdin.map(|text| {
        let text = text.to_string();
        Box::new(move |w: &mut dyn std::io::Write| w.write_all(text.as_bytes())) as Feed
    });
    run_with(cmd, args, feed, |_| true).await
}

/// Run a command to its end, fed by `feed`; the lines of its stdout that
/// `keep` takes (read as they come: a large output is never held whole).
/// Spawned on the runtime thread and registered with the one reaper
/// (which would otherwise take its exit status first); its pipes are
/// worked off the runtime thread.
async fn run_with(
    cmd: &str,
    args: &[&str],
    feed: Option<Feed>,
    keep: fn(&str) -> bool,
) -> Result<String, String> {
    use std::io::{BufRead, Read};
    let what = || format!("{cmd} {}", args.join(" "));
    let mut child = std::process::Command::new(cmd)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .stdin(if feed.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .spawn()
        .map_err(|e| format!("{cmd}: {e} (is it installed?)"))?;
    let pid = child.id() as i32;
    crate::sys::reaper::register(pid);
    let (i, o, e) = (child.stdin.take(), child.stdout.take(), child.stderr.take());
    let io = crate::sys::blocking(move || {
        let mut fed = Ok(());
        if let (Some(mut w), Some(feed)) = (i, feed) {
            let mut buffered = std::io::BufWriter::new(&mut w);
            fed = feed(&mut buffered).and_then(|()| std::io::Write::flush(&mut buffered));
        }
        let (mut out, mut err) = (String::new(), String::new());
        if let Some(r) = o {
            for line in std::io::BufReader::new(r).lines().map_while(Result::ok) {
                if keep(&line) {
                    out.push_str(&line);
                    out.push('\n');
                }
            }
        }
        if let Some(mut r) = e {
            let _ = r.read_to_string(&mut err);
        }
        if let Err(e) = fed {
            err = format!("{} (writing its input: {e})", err.trim());
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

/// The jumps from the built-in chains: (table, chain, target, new
/// connections only).
const JUMPS: [(&str, &str, &str, bool); 5] = [
    ("nat", "PREROUTING", rules::SERVICES, false),
    ("nat", "OUTPUT", rules::SERVICES, false),
    ("nat", "POSTROUTING", rules::POSTROUTING, false),
    ("filter", "FORWARD", rules::SERVICES, true),
    ("filter", "OUTPUT", rules::SERVICES, true),
];
const JUMP_COMMENT: &str = "outrigger services";

/// A jump's rule after `-A CHAIN`/`-C CHAIN`: (table, chain, its
/// arguments). Filter jumps take new connections only (what a Service
/// with no endpoints rejects is a new connection; established ones keep
/// going through a rebuild).
fn jump_rules() -> impl Iterator<Item = (&'static str, &'static str, Vec<&'static str>)> {
    JUMPS.into_iter().map(|(table, chain, target, new_only)| {
        let mut rule = Vec::new();
        if new_only {
            rule.extend(["-m", "conntrack", "--ctstate", "NEW"]);
        }
        rule.extend(["-m", "comment", "--comment", JUMP_COMMENT, "-j", target]);
        (table, chain, rule)
    })
}

/// The jumps into our chains from the built-in ones, first in each (the
/// chains exist: the rule set made them).
async fn ensure_jumps() -> Result<(), String> {
    for (table, chain, rule) in jump_rules() {
        let mut check = vec!["-t", table, "-C", chain];
        check.extend(&rule);
        if run("iptables", &check, None).await.is_err() {
            let mut add = vec!["-t", table, "-I", chain, "1"];
            add.extend(&rule);
            run("iptables", &add, None).await?;
        }
    }
    Ok(())
}

/// Remove every jump, rule and chain the Services rules made and the
/// routes to site peers (`edge-rt reset`, the benchmarks); what is not
/// there is skipped. Blocking: no daemon runs then, so nothing else reaps.
/// An error names a table whose chains stayed.
pub fn remove_rules() -> Result<(), String> {
    use std::process::Command;
    let iptables = |args: &[&str]| {
        let _ = Command::new("iptables").args(args).output();
    };
    for (table, chain, rule) in jump_rules() {
        let mut args = vec!["-t", table, "-D", chain];
        args.extend(&rule);
        iptables(&args);
    }
    for table in ["nat", "filter"] {
        let save = Command::new("iptables-save")
            .args(["-t", table])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        // One commit per table: each chain declared (so flushed: they
        // jump to each other), then deleted.
        let chains = rules::all_ours(&save);
        if chains.is_empty() {
            continue;
        }
        let mut text = format!("*{table}\n");
        for c in &chains {
            text += &format!(":{c} - [0:0]\n");
        }
        for c in &chains {
            text += &format!("-X {c}\n");
        }
        text += "COMMIT\n";
        let restore = Command::new("iptables-restore")
            .arg("--noflush")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn();
        let mut child = restore.map_err(|e| format!("iptables-restore: {e}"))?;
        if let Some(mut w) = child.stdin.take() {
            use std::io::Write;
            let _ = w.write_all(text.as_bytes());
        }
        match child.wait() {
            Ok(st) if st.success() => {}
            _ => {
                return Err(format!(
                    "iptables-restore could not remove our {table} chains"
                ))
            }
        }
    }
    let _ = Command::new("ip")
        .args(["-4", "route", "flush", "proto", routes::PROTO])
        .output();
    Ok(())
}

/// Rebuild the rules from the table in one `iptables-restore` (a chain
/// declared there is replaced whole in the commit, never seen empty), then
/// make sure the built-in chains jump to them.
async fn apply_rules(t: &Arc<Table>, local: &rules::Local) -> Result<(), String> {
    // Only the chain declarations of the saved table are kept.
    let save = run_with("iptables-save", &["-t", "nat"], None, |l| {
        l.starts_with(':')
    })
    .await?;
    let existing = rules::ours(&save);
    let (t, local) = (t.clone(), local.clone());
    let feed: Feed = Box::new(move |w| rules::render_to(&t, &local, &existing, w));
    run_with("iptables-restore", &["--noflush"], Some(feed), |_| true).await?;
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
    /// The DNS server's sockets, bound by [`bind_dns`] before pods were
    /// told where their nameserver is.
    pub dns_sockets: Vec<DnsSocket>,
}

/// One address's UDP socket and TCP listener.
pub struct DnsSocket {
    addr: SocketAddr,
    udp: std::net::UdpSocket,
    tcp: std::net::TcpListener,
}

impl DnsSocket {
    pub fn ip(&self) -> IpAddr {
        self.addr.ip()
    }
}

/// Bind the DNS server's addresses (`dns_listen`, else the pod bridge's
/// gateway, made first) before any pod's resolv.conf names them: what
/// could not be bound is logged, and if nothing was, ClusterFirst pods get
/// the host's resolver rather than an address no server answers on.
pub fn bind_dns(cfg: &ServicesConfig, network: Option<&crate::network::Network>) -> Vec<DnsSocket> {
    let addrs: Vec<SocketAddr> = if cfg.dns_listen.is_empty() {
        let Some(n) = network else { return Vec::new() };
        if let Err(e) = n.ensure_bridge() {
            tracing::error!(error = %e, "pod bridge not ready for the DNS server; pods get the host's resolver");
            return Vec::new();
        }
        vec![SocketAddr::new(IpAddr::V4(n.gateway()), 53)]
    } else {
        cfg.dns_listen.clone()
    };
    addrs
        .into_iter()
        .filter_map(|addr| match bind_pair(addr) {
            Ok((udp, tcp)) => Some(DnsSocket { addr, udp, tcp }),
            Err(e) => {
                tracing::error!(%addr, error = %e, "the DNS server cannot listen here");
                None
            }
        })
        .collect()
}

fn bind_pair(addr: SocketAddr) -> std::io::Result<(std::net::UdpSocket, std::net::TcpListener)> {
    let udp = std::net::UdpSocket::bind(addr)?;
    let tcp = std::net::TcpListener::bind(addr)?;
    // Handed to tokio later: non-blocking as it requires.
    udp.set_nonblocking(true)?;
    tcp.set_nonblocking(true)?;
    Ok((udp, tcp))
}

/// Start the DNS server and keep rules and routes following the store.
/// Returns the table's channel (what else reads it), or None with
/// nothing to serve from.
pub async fn start(
    mut setup: Setup,
    store: Arc<Store>,
    pods: Arc<PodManager>,
) -> watch::Receiver<Arc<Table>> {
    // The pods' status generation the first table saw (follow reads the
    // store again only once it moves, or the store changes).
    let generation = pods
        .context()
        .status_generation
        .load(std::sync::atomic::Ordering::Relaxed);
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
    for sock in std::mem::take(&mut setup.dns_sockets) {
        dns.serve(sock);
    }
    // The configured CIDR's gateway too, where pods started before the
    // cluster's allocation look (if the bridge still has it).
    for a in setup.dns_also.clone() {
        dns.listen(SocketAddr::new(IpAddr::V4(a), 53), false);
    }
    tokio::spawn(follow(setup, store, pods, tx, dns, generation));
    rx
}

/// The DNS server's sockets, one pair per address.
struct Listeners {
    server: Option<dns::Server>,
    bound: BTreeSet<SocketAddr>,
}

impl Listeners {
    /// Serve on sockets bound already.
    fn serve(&mut self, sock: DnsSocket) {
        let Some(server) = &self.server else { return };
        let (u, t) = match (
            tokio::net::UdpSocket::from_std(sock.udp),
            tokio::net::TcpListener::from_std(sock.tcp),
        ) {
            (Ok(u), Ok(t)) => (u, t),
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(addr = %sock.addr, error = %e, "the DNS server cannot listen here");
                return;
            }
        };
        tracing::info!(addr = %sock.addr, "DNS for pods");
        tokio::spawn(server.clone().serve_udp(u));
        tokio::spawn(server.clone().serve_tcp(t));
        self.bound.insert(sock.addr);
    }

    /// Bind and serve `addr` if not served yet. `must`: a failure is an
    /// error (pods are told this address), else the address may simply not
    /// be there.
    fn listen(&mut self, addr: SocketAddr, must: bool) {
        if self.server.is_none() || self.bound.contains(&addr) {
            return;
        }
        match bind_pair(addr) {
            Ok((udp, tcp)) => self.serve(DnsSocket { addr, udp, tcp }),
            Err(e) if must => {
                tracing::error!(%addr, error = %e, "the DNS server cannot listen here; pods that name it get no answer")
            }
            Err(e) => tracing::debug!(%addr, error = %e, "no DNS here"),
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
    mut generation: u64,
) {
    let bridge_nf = bridge_netfilter();
    let mut changed = store.subscribe();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The DNS server's address (the first gateway: it stays on the bridge
    // when the pod CIDR moves).
    let dns: Option<IpAddr> = match (setup.cfg.dns, setup.cfg.dns_listen.first(), &setup.network) {
        (false, _, _) => None,
        (true, Some(a), _) => Some(a.ip()),
        (true, None, Some(n)) => Some(IpAddr::V4(n.gateway())),
        (true, None, None) => None,
    };
    // What the rules were last built from (the table shared with the DNS
    // server's, never a copy of it).
    let mut applied: Option<(Arc<Table>, rules::Local)> = None;
    let mut routed: Option<BTreeSet<(String, Ipv4Addr)>> = None;
    let mut last_failure: Option<std::time::Instant> = None;
    // The first round applies the table start() published.
    let mut first = true;
    loop {
        let fresh = if std::mem::take(&mut first) {
            None
        } else {
            Some(read_table(&store, &setup.node, &pods, &setup.domain))
        };
        // One table in memory: the one published, unless this one differs.
        let t = match fresh {
            None => tx.borrow().clone(),
            Some(fresh) if **tx.borrow() == fresh => tx.borrow().clone(),
            Some(fresh) => {
                let t = Arc::new(fresh);
                tx.send_replace(t.clone());
                t
            }
        };
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
                        listeners.listen(SocketAddr::new(IpAddr::V4(n.gateway()), 53), true);
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
        let due = last_failure.is_none_or(|at| at.elapsed() >= RETRY);
        let same = applied
            .as_ref()
            .is_some_and(|(a, l)| (Arc::ptr_eq(a, &t) || **a == *t) && *l == local);
        if setup.cfg.rules && due && !same {
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
