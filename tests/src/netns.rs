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
