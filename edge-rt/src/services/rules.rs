//! ClusterIP and NodePort routing as iptables rules, kube-proxy's layout
//! with edge-rt's chain names: `OUTRIGGER-SERVICES` (jumped to from nat
//! PREROUTING and OUTPUT) matches a Service's address and port and jumps
//! to its `OUTRIGGER-SVC-*` chain, which picks one `OUTRIGGER-SEP-*`
//! (endpoint) chain at random (`statistic`, 1/n, 1/(n-1), ...) among the
//! endpoints [`Service::chosen`] gives (this node's, else the site's, else
//! any), or the one a client used last (`recent`, for sessionAffinity
//! ClientIP); the endpoint chain DNATs. NodePorts are matched last, for
//! addresses of the node. A Service with no endpoint is rejected in the
//! filter table (at once, not after a timeout).
//!
//! Why iptables and not nftables: edge-rt's pod network already speaks
//! iptables (masquerade, hostPorts), every gateway kernel we ship has it
//! (nft-backed on current distributions), and `iptables-restore --noflush`
//! swaps whole chains in one commit per table. The rule set is rebuilt
//! from the table every time, never edited in place: nothing is ever half
//! written, and an edge-rt restart rebuilds the same rules (conntrack keeps
//! established connections meanwhile).

use std::collections::BTreeSet;
use std::fmt::Write;
use std::net::IpAddr;

use sha2::{Digest, Sha256};

use super::table::{Endpoint, Port, Service, Table};

pub const SERVICES: &str = "OUTRIGGER-SERVICES";
const NODEPORTS: &str = "OUTRIGGER-NODEPORTS";
pub const POSTROUTING: &str = "OUTRIGGER-POSTROUTING";
const MARK_MASQ: &str = "OUTRIGGER-MARK-MASQ";
/// Chains edge-rt makes per Service port and endpoint: removed when no
/// longer wanted.
const PREFIXES: [&str; 3] = ["OUTRIGGER-SVC-", "OUTRIGGER-SEP-", "OUTRIGGER-LCL-"];
/// Marks a connection to be masqueraded on the way out (kube-proxy's bit).
const MASQ_MARK: &str = "0x4000/0x4000";

/// What the rules need besides the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Local {
    /// This node's pod CIDR (traffic from pods to a site peer's pods keeps
    /// its addresses).
    pub pod_cidr: String,
    /// The node's DNS server (the cluster DNS address is sent there).
    pub dns: Option<IpAddr>,
    /// Bridged traffic passes iptables (br_netfilter): a pod may reach a
    /// Service served by a pod on its own bridge without masquerading.
    pub bridge_nf: bool,
}

fn chain(prefix: &str, parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    // 14 + 12 characters: under iptables' 28.
    format!(
        "{prefix}{}",
        &hex::encode(h.finalize())[..12].to_uppercase()
    )
}

fn port_label(s: &Service, p: &Port) -> String {
    let name = if p.name.is_empty() {
        p.port.to_string()
    } else {
        p.name.clone()
    };
    format!("{}/{}:{}", s.namespace, s.name, name)
}

fn v4(ip: &IpAddr) -> bool {
    ip.is_ipv4()
}

/// The rule text for `iptables-restore --noflush`. `existing`: chains of
/// ours that exist now (those not wanted any more are flushed and deleted
/// in the same commit).
pub fn render(t: &Table, local: &Local, existing: &BTreeSet<String>) -> String {
    let mut out = Vec::new();
    // Writing to memory does not fail.
    let _ = render_to(t, local, existing, &mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// The same text, written as it is made (into `iptables-restore`'s stdin:
/// the rules of 1,000 Services are a megabyte that never needs to be held
/// whole). Each chain of ours is declared once, just before the rules
/// that first name it: a declaration flushes the chain, and
/// `iptables-restore` (nft and legacy) takes declarations among rules.
pub fn render_to(
    t: &Table,
    local: &Local,
    existing: &BTreeSet<String>,
    w: &mut dyn std::io::Write,
) -> std::io::Result<()> {
    let mut declared: BTreeSet<String> = BTreeSet::new();
    let mut filter = String::new();
    let mut nodeports = String::new();
    let mut chunk = String::new();
    let mut fresh: Vec<String> = [SERVICES, NODEPORTS, POSTROUTING, MARK_MASQ]
        .iter()
        .map(|s| s.to_string())
        .collect();
    w.write_all(b"*nat\n")?;
    let _ = writeln!(chunk, "-A {MARK_MASQ} -j MARK --set-xmark {MASQ_MARK}");
    let _ = writeln!(
        chunk,
        "-A {POSTROUTING} -m mark --mark {MASQ_MARK} -m comment --comment \"outrigger service traffic\" -j MASQUERADE"
    );
    for p in &t.peers {
        for cidr in &p.pod_cidrs {
            let _ = writeln!(
                chunk,
                "-A {POSTROUTING} -s {} -d {cidr} -m comment --comment \"pods of {} keep their addresses\" -j ACCEPT",
                local.pod_cidr, p.name
            );
        }
    }
    // The cluster DNS address answers at the node's own server.
    if let Some(dns) = local.dns.filter(v4) {
        for ip in t.cluster_dns.iter().filter(|i| v4(i)) {
            for proto in ["udp", "tcp"] {
                let _ = writeln!(
                    chunk,
                    "-A {SERVICES} -d {ip}/32 -p {proto} -m {proto} --dport 53 -m comment --comment \"cluster DNS at the node\" -j DNAT --to-destination {dns}:53"
                );
            }
        }
    }
    flush(w, &mut declared, &mut fresh, &mut chunk)?;
    for s in t.services.values() {
        if s.external_name.is_some() || s.headless {
            continue;
        }
        let ips: Vec<&IpAddr> = s.cluster_ips.iter().filter(|i| v4(i)).collect();
        if ips.is_empty() {
            continue;
        }
        let chosen: Vec<&Endpoint> = s
            .chosen(&t.node, t.zone.as_deref())
            .into_iter()
            .filter(|e| v4(&e.ip))
            .collect();
        for p in &s.ports {
            let mut out = Rules {
                nat: &mut chunk,
                chains: &mut fresh,
                filter: &mut filter,
                nodeports: &mut nodeports,
            };
            port_rules(&mut out, t, local, s, p, &ips, &chosen);
            flush(w, &mut declared, &mut fresh, &mut chunk)?;
        }
    }
    chunk.push_str(&nodeports);
    let _ = writeln!(
        chunk,
        "-A {SERVICES} -m addrtype --dst-type LOCAL -m comment --comment \"node ports\" -j {NODEPORTS}"
    );
    flush(w, &mut declared, &mut fresh, &mut chunk)?;
    let stale: Vec<&String> = existing
        .iter()
        .filter(|c| !declared.contains(*c) && PREFIXES.iter().any(|p| c.starts_with(p)))
        .collect();
    for c in &stale {
        writeln!(w, ":{c} - [0:0]")?;
    }
    for c in &stale {
        writeln!(w, "-X {c}")?;
    }
    writeln!(w, "COMMIT\n*filter\n:{SERVICES} - [0:0]")?;
    w.write_all(filter.as_bytes())?;
    w.write_all(b"COMMIT\n")
}

/// The declarations of the chains first named in `chunk`, then `chunk`.
fn flush(
    w: &mut dyn std::io::Write,
    declared: &mut BTreeSet<String>,
    fresh: &mut Vec<String>,
    chunk: &mut String,
) -> std::io::Result<()> {
    for c in fresh.drain(..) {
        if !declared.contains(&c) {
            writeln!(w, ":{c} - [0:0]")?;
            declared.insert(c);
        }
    }
    w.write_all(chunk.as_bytes())?;
    chunk.clear();
    Ok(())
}

/// Where a Service port's rules go: nat rules and the chains they name,
/// filter rules, and NodePort rules (matched after every ClusterIP).
struct Rules<'a> {
    nat: &'a mut String,
    chains: &'a mut Vec<String>,
    filter: &'a mut String,
    nodeports: &'a mut String,
}

fn port_rules(
    out: &mut Rules,
    t: &Table,
    local: &Local,
    s: &Service,
    p: &Port,
    ips: &[&IpAddr],
    chosen: &[&Endpoint],
) {
    let proto = p.protocol.as_str();
    let label = port_label(s, p);
    let targets: Vec<(&Endpoint, u16)> = chosen
        .iter()
        .filter_map(|e| e.port_for(p).map(|port| (*e, port)))
        .collect();
    if targets.is_empty() {
        for ip in ips {
            let _ = writeln!(
                out.filter,
                "-A {SERVICES} -d {ip}/32 -p {proto} -m {proto} --dport {} -m comment --comment \"{label} has no endpoints\" -j REJECT --reject-with icmp-port-unreachable",
                p.port
            );
        }
        if let Some(np) = p.node_port {
            let _ = writeln!(
                out.filter,
                "-A {SERVICES} -m addrtype --dst-type LOCAL -p {proto} -m {proto} --dport {np} -m comment --comment \"{label} has no endpoints\" -j REJECT --reject-with icmp-port-unreachable"
            );
        }
        return;
    }
    let key = [
        s.namespace.as_str(),
        s.name.as_str(),
        p.name.as_str(),
        proto,
    ];
    let svc = chain("OUTRIGGER-SVC-", &key);
    out.chains.push(svc.clone());
    for ip in ips {
        let _ = writeln!(
            out.nat,
            "-A {SERVICES} -d {ip}/32 -p {proto} -m {proto} --dport {} -m comment --comment \"{label} cluster IP\" -j {svc}",
            p.port
        );
    }
    let seps = endpoint_chains(out.nat, out.chains, s, &key, &targets, local);
    pick(out.nat, &svc, &seps, s.affinity_secs);
    let Some(np) = p.node_port else { return };
    if s.external_local {
        // Only this node's endpoints; the client's address kept.
        let lcl = chain("OUTRIGGER-LCL-", &key);
        let here: Vec<String> = targets
            .iter()
            .zip(&seps)
            .filter(|((e, _), _)| e.node.as_deref() == Some(t.node.as_str()))
            .map(|(_, c)| c.clone())
            .collect();
        if here.is_empty() {
            let _ = writeln!(
                out.filter,
                "-A {SERVICES} -m addrtype --dst-type LOCAL -p {proto} -m {proto} --dport {np} -m comment --comment \"{label} has no local endpoints\" -j DROP"
            );
            return;
        }
        out.chains.push(lcl.clone());
        pick(out.nat, &lcl, &here, s.affinity_secs);
        let _ = writeln!(
            out.nodeports,
            "-A {NODEPORTS} -p {proto} -m {proto} --dport {np} -m comment --comment \"{label} node port\" -j {lcl}"
        );
    } else {
        // The endpoint may be on another gateway: its answer must come
        // back through this one.
        let _ = writeln!(
            out.nodeports,
            "-A {NODEPORTS} -p {proto} -m {proto} --dport {np} -m comment --comment \"{label} node port\" -j {MARK_MASQ}"
        );
        let _ = writeln!(
            out.nodeports,
            "-A {NODEPORTS} -p {proto} -m {proto} --dport {np} -m comment --comment \"{label} node port\" -j {svc}"
        );
    }
}

/// One DNAT chain per endpoint; their names, in `targets`' order.
fn endpoint_chains(
    nat: &mut String,
    chains: &mut Vec<String>,
    s: &Service,
    key: &[&str; 4],
    targets: &[(&Endpoint, u16)],
    local: &Local,
) -> Vec<String> {
    let mut out = Vec::new();
    for (e, port) in targets {
        let ip = e.ip.to_string();
        let port_s = port.to_string();
        let sep = chain(
            "OUTRIGGER-SEP-",
            &[key[0], key[1], key[2], key[3], &ip, &port_s],
        );
        chains.push(sep.clone());
        let proto = key[3];
        // A pod reaching itself through its Service (hairpin).
        let _ = writeln!(nat, "-A {sep} -s {ip}/32 -j {MARK_MASQ}");
        if !local.bridge_nf {
            // Without br_netfilter the answer of a pod on the same bridge
            // would skip the reverse NAT: masquerade so it comes back here.
            let _ = writeln!(nat, "-A {sep} -s {} -j {MARK_MASQ}", local.pod_cidr);
        }
        let recent = match s.affinity_secs {
            Some(_) => format!("-m recent --name {sep} --set --rsource "),
            None => String::new(),
        };
        let _ = writeln!(
            nat,
            "-A {sep} -p {proto} {recent}-m {proto} -j DNAT --to-destination {ip}:{port}"
        );
        out.push(sep);
    }
    out
}

/// The choice among endpoint chains: the client's last one while its
/// affinity lasts, else at random, evenly.
fn pick(nat: &mut String, from: &str, seps: &[String], affinity: Option<u32>) {
    if let Some(secs) = affinity {
        for sep in seps {
            let _ = writeln!(
                nat,
                "-A {from} -m recent --name {sep} --rcheck --seconds {secs} --reap -j {sep}"
            );
        }
    }
    let n = seps.len();
    for (i, sep) in seps.iter().enumerate() {
        if i + 1 == n {
            let _ = writeln!(nat, "-A {from} -j {sep}");
        } else {
            let p = 1.0 / (n - i) as f64;
            let _ = writeln!(
                nat,
                "-A {from} -m statistic --mode random --probability {p:.10} -j {sep}"
            );
        }
    }
}

/// Our per-Service chains in `iptables-save` output.
pub fn ours(save: &str) -> BTreeSet<String> {
    save.lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| PREFIXES.iter().any(|p| c.starts_with(p)))
        .map(String::from)
        .collect()
}

/// Every chain of ours in an `iptables-save` text, the fixed ones too
/// (for removing them all).
pub fn all_ours(save: &str) -> BTreeSet<String> {
    let fixed = [SERVICES, NODEPORTS, POSTROUTING, MARK_MASQ];
    save.lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| fixed.contains(c) || PREFIXES.iter().any(|p| c.starts_with(p)))
        .map(String::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::table::tests::sample;

    fn local() -> Local {
        Local {
            pod_cidr: "10.244.1.0/24".into(),
            dns: Some("10.244.1.1".parse().unwrap()),
            bridge_nf: true,
        }
    }

    #[test]
    fn a_service_goes_to_this_nodes_endpoint_and_its_node_port_too() {
        let ready = [(("plant".into(), "web-a".into()), true)].into();
        let t = sample("a", &ready);
        let r = render(&t, &local(), &BTreeSet::new());
        assert!(r.starts_with("*nat\n") && r.ends_with("COMMIT\n"), "{r}");
        assert!(
            r.contains("-d 10.0.0.20/32 -p tcp -m tcp --dport 80"),
            "{r}"
        );
        assert!(
            r.contains("-j DNAT --to-destination 10.244.1.5:8080"),
            "{r}"
        );
        // Only the local endpoint while it is ready.
        assert!(!r.contains("10.244.2.5"), "{r}");
        assert!(r.contains("--dport 30080"), "{r}");
        assert!(r.contains("-d 10.244.2.0/24 -m comment"), "{r}");
        assert!(
            r.contains("-d 10.0.0.10/32 -p udp -m udp --dport 53"),
            "{r}"
        );
        // Headless and ExternalName Services have no rules.
        assert!(!r.contains("plant/db"), "{r}");
        // Its endpoint not ready: the site's, and the chain of the old one
        // goes in the same commit.
        let existing = ours(&r);
        assert!(existing.iter().any(|c| c.starts_with("OUTRIGGER-SEP-")));
        let t2 = sample("a", &[(("plant".into(), "web-a".into()), false)].into());
        let r2 = render(&t2, &local(), &existing);
        assert!(r2.contains("--to-destination 10.244.2.5:8080"), "{r2}");
        assert!(!r2.contains("--to-destination 10.244.1.5"), "{r2}");
        let gone: Vec<&String> = existing
            .iter()
            .filter(|c| c.starts_with("OUTRIGGER-SEP-") && !r2.contains(&format!("-A {c} ")))
            .collect();
        assert_eq!(gone.len(), 1);
        assert!(r2.contains(&format!("-X {}", gone[0])), "{r2}");
    }

    #[test]
    fn endpoints_are_picked_evenly_and_affinity_sticks() {
        let mut nat = String::new();
        let seps: Vec<String> = ["A", "B", "C"].iter().map(|s| s.to_string()).collect();
        pick(&mut nat, "SVC", &seps, Some(30));
        let lines: Vec<&str> = nat.lines().collect();
        assert_eq!(lines.len(), 6);
        assert!(lines[0].contains("--rcheck --seconds 30 --reap -j A"));
        assert!(lines[3].contains("--probability 0.3333333333 -j A"));
        assert!(lines[4].contains("--probability 0.5000000000 -j B"));
        assert_eq!(lines[5], "-A SVC -j C");
    }

    #[test]
    fn a_service_without_endpoints_is_rejected() {
        let t = sample("q", &Default::default());
        let mut t = t;
        if let Some(s) = t.services.get_mut(&("plant".into(), "web".into())) {
            s.endpoints.clear();
        }
        let r = render(&t, &local(), &BTreeSet::new());
        let filter = r.split("*filter").nth(1).unwrap();
        assert!(
            filter.contains("-d 10.0.0.20/32 -p tcp -m tcp --dport 80"),
            "{r}"
        );
        assert!(filter.contains("REJECT"), "{r}");
    }

    #[test]
    fn every_chain_is_declared_once_before_any_rule_names_it() {
        let ready = [(("plant".into(), "web-a".into()), true)].into();
        let t = sample("a", &ready);
        let stale: BTreeSet<String> = ["OUTRIGGER-SVC-000000000000".to_string()].into();
        let r = render(&t, &local(), &stale);
        let nat = r.split("*filter").next().unwrap();
        let mut declared = BTreeSet::new();
        for line in nat.lines() {
            if let Some(c) = line.strip_prefix(':') {
                let c = c.split_whitespace().next().unwrap();
                assert!(declared.insert(c.to_string()), "{c} declared twice:\n{r}");
                continue;
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            for (i, w) in words.iter().enumerate() {
                let names_chain = i > 0 && matches!(words[i - 1], "-A" | "-j" | "-X");
                if names_chain && w.starts_with("OUTRIGGER-") {
                    assert!(
                        declared.contains(*w),
                        "{w} used before its declaration:\n{r}"
                    );
                }
            }
        }
        assert!(nat.contains("-X OUTRIGGER-SVC-000000000000"), "{r}");
    }
}
