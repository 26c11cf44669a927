//! Pod networking without CNI: each pod's network namespace gets a veth
//! into a bridge on the host, an address from the pod CIDR, a default route
//! through the bridge, and masquerading out; hostPorts are DNAT rules. The
//! same layout the CNI `bridge` + `host-local` + `portmap` plugins make.
//!
//! The work is done by iproute2's `ip` and `iptables` (both on every gateway
//! image that routes), run from a thread that entered the pod's namespace
//! where the command must act inside it. Addresses are leased in files
//! under the state directory (tmpfs, like the namespaces they belong to),
//! so a restarted edge-rt keeps every pod's address.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

/// The `[network]` table of the node configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    /// Off: pods get only loopback (hostNetwork pods are unaffected).
    pub enabled: bool,
    pub bridge: String,
    /// IPv4 CIDR; the bridge takes the first address.
    pub pod_cidr: String,
    /// Masquerade pod traffic leaving through other interfaces.
    pub masquerade: bool,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            enabled: true,
            bridge: "outrigger0".into(),
            pod_cidr: "10.88.0.0/16".into(),
            masquerade: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("pod_cidr {0:?} is not an IPv4 CIDR like 10.88.0.0/16")]
    Cidr(String),
    #[error("no free address left in {0}")]
    Exhausted(String),
    #[error("{cmd}: {detail}")]
    Command { cmd: String, detail: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A pod's address and how to reach it.
#[derive(Debug, Clone, PartialEq)]
pub struct Attachment {
    pub ip: Ipv4Addr,
    pub host_veth: String,
}

/// A hostPort mapping.
#[derive(Debug, Clone, PartialEq)]
pub struct PortMap {
    pub host_port: u16,
    pub container_port: u16,
    /// "tcp" or "udp".
    pub protocol: String,
}

pub struct Network {
    cfg: NetworkConfig,
    /// The pod CIDR (network, prefix): the configured one until the
    /// cluster allocates the node one ([`Network::set_pod_cidr`]).
    cidr: std::sync::RwLock<(Ipv4Addr, u8)>,
    leases: PathBuf,
    /// The bridge and rules were checked (once per edge-rt; reset on a
    /// failure so the next pod checks again).
    bridge_ready: std::sync::atomic::AtomicBool,
}

const HOSTPORT_CHAIN: &str = "OUTRIGGER-HOSTPORTS";

fn run(args: &[&str]) -> Result<String, NetworkError> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| NetworkError::Command {
            cmd: args.join(" "),
            detail: format!("{e} (is {} installed?)", args[0]),
        })?;
    if !out.status.success() {
        return Err(NetworkError::Command {
            cmd: args.join(" "),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Several `ip` commands in one process (`ip -batch`), one per line.
fn ip_batch(lines: &[String]) -> Result<(), NetworkError> {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["-batch", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| NetworkError::Command {
            cmd: "ip -batch".into(),
            detail: format!("{e} (is iproute2 installed?)"),
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(lines.join("\n").as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(NetworkError::Command {
            cmd: format!("ip -batch: {}", lines.join("; ")),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Run `ip` batches inside a network namespace: a thread enters it, and
/// the processes it starts are born there.
fn run_in(netns: &Path, batches: &[Vec<String>]) -> Result<(), NetworkError> {
    let netns = netns.to_path_buf();
    let batches = batches.to_vec();
    outrigger_sys::thread("netns", move || -> Result<(), NetworkError> {
        let f = std::fs::File::open(&netns)?;
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
        for b in &batches {
            ip_batch(b)?;
        }
        Ok(())
    })?
    .join()
    .map_err(|_| NetworkError::Command {
        cmd: "netns thread".into(),
        detail: "panicked".into(),
    })?
}

fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8), NetworkError> {
    let (ip, len) = s
        .split_once('/')
        .ok_or_else(|| NetworkError::Cidr(s.into()))?;
    let ip: Ipv4Addr = ip.parse().map_err(|_| NetworkError::Cidr(s.into()))?;
    let len: u8 = len.parse().map_err(|_| NetworkError::Cidr(s.into()))?;
    if !(8..=30).contains(&len) {
        return Err(NetworkError::Cidr(s.into()));
    }
    let mask = u32::MAX << (32 - len);
    Ok((Ipv4Addr::from(u32::from(ip) & mask), len))
}

/// The gateway (first) address of a pod CIDR.
pub fn gateway_of(cidr: &str) -> Option<Ipv4Addr> {
    parse_cidr(cidr)
        .ok()
        .map(|(net, _)| Ipv4Addr::from(u32::from(net) + 1))
}

impl Network {
    pub fn new(cfg: NetworkConfig, state_dir: &Path) -> Result<Network, NetworkError> {
        let (net, prefix) = parse_cidr(&cfg.pod_cidr)?;
        let leases = state_dir.join("network").join(&cfg.bridge);
        std::fs::create_dir_all(&leases)?;
        Ok(Network {
            cfg,
            cidr: std::sync::RwLock::new((net, prefix)),
            leases,
            bridge_ready: Default::default(),
        })
    }

    fn cidr(&self) -> (Ipv4Addr, u8) {
        *self.cidr.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.cidr().0) + 1)
    }

    /// The pod CIDR new pods get addresses from.
    pub fn pod_cidr(&self) -> String {
        let (net, prefix) = self.cidr();
        format!("{net}/{prefix}")
    }

    /// Take the pod CIDR the cluster allocated: pods started from now on
    /// get addresses from it (the bridge gets its gateway address beside
    /// the old one); running pods keep theirs until their sandbox is made
    /// again. Whether it changed.
    pub fn set_pod_cidr(&self, cidr: &str) -> Result<bool, NetworkError> {
        let new = parse_cidr(cidr)?;
        let mut cur = self.cidr.write().unwrap_or_else(|p| p.into_inner());
        if *cur == new {
            return Ok(false);
        }
        *cur = new;
        self.bridge_ready
            .store(false, std::sync::atomic::Ordering::Relaxed);
        Ok(true)
    }

    /// The rules the bridge needs: masquerading out (when configured) and
    /// forwarding, which a policy may close (Docker does).
    fn bridge_rules(&self) -> Vec<(&'static str, &'static str, Vec<String>)> {
        let br = &self.cfg.bridge;
        let words = |s: &str| shell_words(s);
        let mut v = Vec::new();
        if self.cfg.masquerade {
            let cidr = self.pod_cidr();
            v.push((
                "nat",
                "POSTROUTING",
                words(&format!(
                    "-s {cidr} ! -o {br} -j MASQUERADE -m comment --comment \"outrigger pods out\""
                )),
            ));
        }
        for dir in ["-i", "-o"] {
            v.push((
                "filter",
                "FORWARD",
                words(&format!(
                    "{dir} {br} -j ACCEPT -m comment --comment \"outrigger pods\""
                )),
            ));
        }
        v
    }

    /// Connections from the node itself to a hostPort come back from the
    /// pod through the bridge: masquerade them so replies return.
    fn hostport_masquerade(&self) -> Vec<String> {
        shell_words(&format!(
            "-o {} -m addrtype --src-type LOCAL -j MASQUERADE -m comment --comment \"outrigger hostports\"",
            self.cfg.bridge
        ))
    }

    /// The bridge with the gateway address, forwarding, masquerading and
    /// the hostPort chain. Idempotent.
    pub fn ensure_bridge(&self) -> Result<(), NetworkError> {
        let br = self.cfg.bridge.as_str();
        if run(&["ip", "link", "show", br]).is_err() {
            run(&["ip", "link", "add", br, "type", "bridge"])?;
        }
        let gw = format!("{}/{}", self.gateway(), self.cidr().1);
        if !run(&["ip", "-4", "addr", "show", "dev", br])?.contains(&format!("inet {gw}")) {
            run(&["ip", "addr", "add", &gw, "dev", br])?;
        }
        run(&["ip", "link", "set", br, "up"])?;
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")?;
        for (table, chain, rule) in self.bridge_rules() {
            let rule: Vec<&str> = rule.iter().map(String::as_str).collect();
            ensure_rule(table, chain, &rule)?;
        }
        if run(&["iptables", "-t", "nat", "-S", HOSTPORT_CHAIN]).is_err() {
            run(&["iptables", "-t", "nat", "-N", HOSTPORT_CHAIN])?;
        }
        for chain in ["PREROUTING", "OUTPUT"] {
            ensure_rule(
                "nat",
                chain,
                &[
                    "-m",
                    "addrtype",
                    "--dst-type",
                    "LOCAL",
                    "-j",
                    HOSTPORT_CHAIN,
                ],
            )?;
        }
        Ok(())
    }

    /// Remove the bridge and the rules `ensure_bridge` added (for tests and
    /// for uninstalling; pods must be gone first).
    pub fn remove_bridge(&self) {
        let br = self.cfg.bridge.as_str();
        let mut rules = self.bridge_rules();
        rules.push(("nat", "POSTROUTING", self.hostport_masquerade()));
        for (table, chain, rule) in rules {
            let mut del = vec!["iptables", "-t", table, "-D", chain];
            del.extend(rule.iter().map(String::as_str));
            while run(&del).is_ok() {}
        }
        let _ = run(&["ip", "link", "del", br]);
        let _ = std::fs::remove_dir_all(&self.leases);
    }

    /// The address leased to a pod, if any.
    pub fn lease_of(&self, pod_uid: &str) -> Option<Ipv4Addr> {
        std::fs::read_dir(&self.leases)
            .ok()?
            .flatten()
            .find_map(|e| {
                let owner = std::fs::read_to_string(e.path()).ok()?;
                (owner == pod_uid)
                    .then(|| e.file_name().to_str()?.parse().ok())
                    .flatten()
            })
    }

    fn lease(&self, pod_uid: &str) -> Result<Ipv4Addr, NetworkError> {
        let (net, prefix) = self.cidr();
        let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
        if let Some(ip) = self.lease_of(pod_uid) {
            if u32::from(ip) & mask == u32::from(net) {
                return Ok(ip);
            }
            // From a pod CIDR the node no longer has.
            let _ = std::fs::remove_file(self.leases.join(ip.to_string()));
        }
        let size = 1u32 << (32 - prefix);
        let base = u32::from(net);
        for i in 2..size - 1 {
            let ip = Ipv4Addr::from(base + i);
            let path = self.leases.join(ip.to_string());
            // create_new: two pods never take the same address.
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    use std::io::Write;
                    f.write_all(pod_uid.as_bytes())?;
                    return Ok(ip);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(NetworkError::Exhausted(self.pod_cidr()))
    }

    fn veth_name(pod_uid: &str) -> String {
        format!(
            "veth{}",
            &outrigger_image::sha256_hex(pod_uid.as_bytes())[..10]
        )
    }

    /// Give the pod's namespace its address, route and veth into the bridge.
    pub fn attach(&self, pod_uid: &str, netns: &Path) -> Result<Attachment, NetworkError> {
        use std::sync::atomic::Ordering;
        if !self.bridge_ready.load(Ordering::Relaxed) {
            self.ensure_bridge()?;
            self.bridge_ready.store(true, Ordering::Relaxed);
        }
        let r = self.attach_veth(pod_uid, netns);
        if r.is_err() {
            self.bridge_ready.store(false, Ordering::Relaxed);
        }
        r
    }

    fn attach_veth(&self, pod_uid: &str, netns: &Path) -> Result<Attachment, NetworkError> {
        let ip = self.lease(pod_uid)?;
        let host = Self::veth_name(pod_uid);
        if run(&["ip", "link", "show", &host]).is_err() {
            // The host end is made in the pod's namespace and sent to ours
            // (our pid names our namespace), so its name cannot clash there.
            let pid = std::process::id();
            let peer = format!("{host}p");
            let gw = self.gateway();
            run_in(
                netns,
                &[vec![
                    format!("link add eth0 type veth peer name {peer} netns {pid}"),
                    format!("addr add {ip}/{} dev eth0", self.cidr().1),
                    "link set eth0 up".into(),
                    "link set lo up".into(),
                    format!("route add default via {gw}"),
                ]],
            )?;
            ip_batch(&[
                format!("link set {peer} name {host}"),
                format!("link set {host} master {} up", self.cfg.bridge),
            ])?;
        }
        Ok(Attachment {
            ip,
            host_veth: host,
        })
    }

    /// Map hostPorts to the pod's address.
    pub fn map_ports(
        &self,
        pod_uid: &str,
        ip: Ipv4Addr,
        ports: &[PortMap],
    ) -> Result<(), NetworkError> {
        if ports.is_empty() {
            return Ok(());
        }
        self.unmap_ports(pod_uid)?;
        for p in ports {
            let dest = format!("{ip}:{}", p.container_port);
            let hp = p.host_port.to_string();
            run(&[
                "iptables",
                "-t",
                "nat",
                "-A",
                HOSTPORT_CHAIN,
                "-p",
                &p.protocol,
                "--dport",
                &hp,
                "-j",
                "DNAT",
                "--to-destination",
                &dest,
                "-m",
                "comment",
                "--comment",
                &format!("pod {pod_uid}"),
            ])?;
        }
        let rule = self.hostport_masquerade();
        let rule: Vec<&str> = rule.iter().map(String::as_str).collect();
        ensure_rule("nat", "POSTROUTING", &rule)
    }

    fn unmap_ports(&self, pod_uid: &str) -> Result<(), NetworkError> {
        let Ok(rules) = run(&["iptables", "-t", "nat", "-S", HOSTPORT_CHAIN]) else {
            return Ok(());
        };
        let tag = format!("\"pod {pod_uid}\"");
        for line in rules.lines().filter(|l| l.contains(&tag)) {
            let spec: Vec<String> = shell_words(
                line.trim_start_matches("-A ")
                    .trim_start_matches(HOSTPORT_CHAIN),
            );
            let mut args: Vec<&str> = vec!["iptables", "-t", "nat", "-D", HOSTPORT_CHAIN];
            args.extend(spec.iter().map(String::as_str));
            run(&args)?;
        }
        Ok(())
    }

    /// Undo `attach` and `map_ports`; the namespace itself goes with the sandbox.
    pub fn detach(&self, pod_uid: &str) {
        let _ = self.unmap_ports(pod_uid);
        let _ = run(&["ip", "link", "del", &Self::veth_name(pod_uid)]);
        if let Some(ip) = self.lease_of(pod_uid) {
            let _ = std::fs::remove_file(self.leases.join(ip.to_string()));
        }
    }
}

fn ensure_rule(table: &str, chain: &str, rule: &[&str]) -> Result<(), NetworkError> {
    let mut check = vec!["iptables", "-t", table, "-C", chain];
    check.extend(rule);
    if run(&check).is_ok() {
        return Ok(());
    }
    let mut add = vec!["iptables", "-t", table, "-A", chain];
    add.extend(rule);
    run(&add).map(|_| ())
}

/// Split an `iptables -S` line, honouring double quotes.
fn shell_words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for ch in s.chars() {
        match ch {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_and_rule_words() {
        assert_eq!(
            parse_cidr("10.88.1.7/16").unwrap(),
            (Ipv4Addr::new(10, 88, 0, 0), 16)
        );
        assert!(
            parse_cidr("10.88.0.0").is_err()
                && parse_cidr("x/16").is_err()
                && parse_cidr("10.0.0.0/31").is_err()
        );
        assert_eq!(
            shell_words(" -p tcp --dport 80 -m comment --comment \"pod a-b\" -j DNAT"),
            vec![
                "-p",
                "tcp",
                "--dport",
                "80",
                "-m",
                "comment",
                "--comment",
                "pod a-b",
                "-j",
                "DNAT"
            ]
        );
    }
}
