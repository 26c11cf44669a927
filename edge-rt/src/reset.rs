//! `edge-rt reset`: undo what edge-rt made on this machine, as `keadm
//! reset` and `kubeadm reset` do: every container and pod sandbox (stopped
//! first), the pod network (bridge, leases, iptables rules), the node
//! store, the node's link identity, pods' volumes and logs. Images stay
//! unless asked (pulling them again over a gateway's link is costly); the
//! store key and the configuration stay (they are provisioned, not made).

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::config::Config;
use crate::runtime::Runtime;

/// What a reset removes, for the question asked first and for the report.
pub fn plan(cfg: &Config, images: bool) -> Vec<String> {
    let mut v = vec![
        "every pod and container (stopped first)".to_string(),
        format!(
            "the pod network (bridge {}, its iptables rules, leases)",
            cfg.network.bridge
        ),
        "the Services rules (OUTRIGGER-SERVICES and the chains under it) and the routes to the site's gateways"
            .to_string(),
        format!("the node store ({})", store_path(cfg).display()),
        format!(
            "the node's link identity ({})",
            crate::link::dir(&cfg.node.data_dir).display()
        ),
        format!(
            "pods' volumes ({}) and logs ({})",
            cfg.node.data_dir.join("pods").display(),
            cfg.runtime.log_dir.display()
        ),
        format!("runtime state ({})", cfg.runtime.state_dir.display()),
    ];
    if images {
        v.push(format!("every image ({})", cfg.image_dir().display()));
    }
    v
}

fn store_path(cfg: &Config) -> PathBuf {
    cfg.store
        .path
        .clone()
        .unwrap_or_else(|| cfg.node.data_dir.join("store.db"))
}

/// Asks on the terminal; without one, only `--force` goes on.
pub fn confirm(cfg: &Config, images: bool) -> Result<bool> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        bail!("edge-rt reset asks before removing anything: run it on a terminal, or pass --force");
    }
    let mut err = std::io::stderr();
    writeln!(err, "edge-rt reset removes:")?;
    for p in plan(cfg, images) {
        writeln!(err, "  - {p}")?;
    }
    write!(err, "Go on? [y/N] ")?;
    err.flush()?;
    let mut answer = String::new();
    stdin.lock().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}

/// Does it. Refuses while edge-rt runs: it would make again what this
/// removes.
pub async fn reset(cfg: &Config, images: bool) -> Result<()> {
    let sock = crate::api::socket_path(cfg);
    if tokio::net::UnixStream::connect(&sock).await.is_ok() {
        bail!(
            "edge-rt is running (its API answers on {}): stop it first (systemctl stop edge-rt, or /etc/init.d/S99edge-rt stop)",
            sock.display()
        );
    }
    let store = Arc::new(outrigger_image::ImageStore::open(cfg.image_dir())?);
    let rt = Runtime::open(cfg.runtime.clone(), store)?;
    let records = rt.list();
    for r in records.iter().filter(|r| r.exit.is_none()) {
        // No grace: the node is being wiped, and kubelet's reset does the same.
        // Through the pidfd the runtime opened when it re-adopted the
        // container (a running record always has one): never a reused pid.
        if let Err(e) = rt.signal(&r.id, libc::SIGKILL) {
            tracing::warn!(id = %r.id, error = %e, "killing");
        }
        if tokio::time::timeout(Duration::from_secs(10), rt.wait(&r.id))
            .await
            .is_err()
        {
            bail!("container {} did not exit within 10 s of SIGKILL", r.id);
        }
    }
    let network = if cfg.network.enabled {
        Some(crate::network::Network::new(
            cfg.network.clone(),
            &cfg.runtime.state_dir,
        )?)
    } else {
        None
    };
    let mut pods: Vec<&str> = records.iter().map(|r| r.pod.uid.as_str()).collect();
    pods.sort();
    pods.dedup();
    for r in &records {
        rt.remove(&r.id)
            .with_context(|| format!("removing container {}", r.id))?;
    }
    for uid in pods {
        if let Some(n) = &network {
            n.detach(uid);
        }
        rt.remove_sandbox(uid)
            .with_context(|| format!("removing the sandbox of pod {uid}"))?;
    }
    drop(rt);
    if let Some(n) = &network {
        n.remove_bridge();
    }
    if let Err(e) = crate::services::remove_rules() {
        tracing::warn!("the Services rules: {e}");
    }
    let mut gone = vec![
        store_path(cfg),
        crate::link::dir(&cfg.node.data_dir),
        cfg.node.data_dir.join("pods"),
        cfg.runtime.log_dir.clone(),
        cfg.runtime.state_dir.clone(),
    ];
    for ext in ["-wal", "-shm"] {
        let mut p = store_path(cfg).into_os_string();
        p.push(ext);
        gone.push(p.into());
    }
    if images {
        gone.push(cfg.image_dir());
        // Imported again at the next start, as on a fresh gateway.
        gone.push(cfg.node.data_dir.join("preloaded.json"));
    }
    for p in &gone {
        remove(p)?;
    }
    Ok(())
}

/// `p` and everything below it, a directory's mounts first (pods' Secret
/// and token volumes are tmpfs mounts).
fn remove(p: &Path) -> Result<()> {
    let r = match std::fs::symlink_metadata(p) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => Err(e),
        Ok(m) if m.is_dir() => {
            crate::runtime::unmount_under(p);
            std::fs::remove_dir_all(p)
        }
        Ok(_) => std::fs::remove_file(p),
    };
    r.with_context(|| format!("removing {}", p.display()))
}
