//! A network namespace joined to ours by a veth pair, removed on drop: the
//! "other network" of the pod-network suite and cloud-gw's side of the link
//! suite's cuts.

use std::process::Command;

use anyhow::{bail, Result};

pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if !out.status.success() {
        bail!("ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

pub struct VethNs {
    pub ns: String,
    pub host_if: String,
}

impl VethNs {
    /// Namespace `ns` with `eth0` at `ns_cidr`, and `host_if` on our side at
    /// `host_cidr` (leftovers of an earlier run are removed first).
    pub fn new(ns: &str, host_if: &str, host_cidr: &str, ns_cidr: &str) -> Result<VethNs> {
        let _ = ip(&["netns", "del", ns]);
        let _ = ip(&["link", "del", host_if]);
        ip(&["netns", "add", ns])?;
        let v = VethNs {
            ns: ns.to_string(),
            host_if: host_if.to_string(),
        };
        ip(&[
            "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ])?;
        ip(&["addr", "add", host_cidr, "dev", host_if])?;
        ip(&["link", "set", host_if, "up"])?;
        ip(&["-n", ns, "addr", "add", ns_cidr, "dev", "eth0"])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        Ok(v)
    }

    /// A command run inside the namespace.
    pub fn exec(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).arg(program);
        c
    }
}

impl Drop for VethNs {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.ns]);
    }
}

/// A site network: a bridge on our side at `<prefix>.1/24` and gateways in
/// namespaces of their own at `<prefix>.2`, `.3`, ... with a default route
/// through us (where cloud-gw listens). Removed on drop.
pub struct Site {
    pub bridge: String,
    pub prefix: String,
    pub gateways: Vec<String>,
}

impl Site {
    pub fn new(name: &str, prefix: &str, gateways: usize) -> Result<Site> {
        let bridge = format!("{name}-br");
        let _ = ip(&["link", "del", &bridge]);
        let mut s = Site {
            bridge: bridge.clone(),
            prefix: prefix.to_string(),
            gateways: Vec::new(),
        };
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        ip(&["addr", "add", &format!("{prefix}.1/24"), "dev", &bridge])?;
        ip(&["link", "set", &bridge, "up"])?;
        // Bridged frames pass iptables where br_netfilter is on: let the
        // site's own traffic through whatever the FORWARD policy is.
        let _ = Command::new("iptables")
            .args([
                "-I", "FORWARD", "-i", &bridge, "-o", &bridge, "-j", "ACCEPT",
            ])
            .output();
        for i in 0..gateways {
            let ns = format!("{name}-{i}");
            let veth = format!("{name}-v{i}");
            let _ = ip(&["netns", "del", &ns]);
            let _ = ip(&["link", "del", &veth]);
            ip(&["netns", "add", &ns])?;
            s.gateways.push(ns.clone());
            ip(&[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ])?;
            ip(&["link", "set", &veth, "master", &bridge, "up"])?;
            let addr = format!("{prefix}.{}/24", i + 2);
            ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n",
                &ns,
                "route",
                "add",
                "default",
                "via",
                &format!("{prefix}.1"),
            ])?;
        }
        Ok(s)
    }

    /// Gateway `i`'s address on the site.
    pub fn address(&self, i: usize) -> String {
        format!("{}.{}", self.prefix, i + 2)
    }

    /// A command run in gateway `i`'s namespace.
    pub fn exec(&self, i: usize, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.gateways[i]]).arg(program);
        c
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        for ns in &self.gateways {
            let _ = ip(&["netns", "del", ns]);
        }
        let _ = Command::new("iptables")
            .args([
                "-D",
                "FORWARD",
                "-i",
                &self.bridge,
                "-o",
                &self.bridge,
                "-j",
                "ACCEPT",
            ])
            .output();
        let _ = ip(&["link", "del", &self.bridge]);
    }
}
