//! The embedded MQTT broker as edge-rt runs it: `edge-rt broker`, a child
//! process (rumqttd runs threads, which edge-rt's own process may not:
//! see `outrigger_devices::broker`), started at boot, restarted with a
//! back-off when it exits, and gone with edge-rt (its parent-death signal).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use outrigger_devices::broker::BrokerSettings;

use crate::config::DevicesSection;

/// `host:port` entries of `[devices] broker_listen`, with `bridge` for
/// the pod bridge's address (`bridge_ip`; None when pods have no network).
pub fn listen_addrs(c: &DevicesSection, bridge_ip: Option<Ipv4Addr>) -> Result<Vec<SocketAddr>> {
    c.broker_listen
        .iter()
        // No pod network: no pods to serve on the bridge (the default
        // lists it; a node with `[network] enabled = false` goes without).
        .filter(|l| {
            let skip = bridge_ip.is_none() && l.starts_with("bridge:");
            if skip {
                tracing::info!(listen = %l, "pods have no network: the MQTT broker does not listen on the pod bridge");
            }
            !skip
        })
        .map(|l| {
            let (host, port) = l
                .rsplit_once(':')
                .with_context(|| format!("broker_listen {l:?}: expected host:port"))?;
            let port: u16 = port
                .parse()
                .with_context(|| format!("broker_listen {l:?}: bad port"))?;
            let ip: IpAddr = match host.trim_matches(['[', ']']) {
                "bridge" => match bridge_ip {
                    Some(ip) => ip.into(),
                    None => bail!("broker_listen {l:?}: pods have no network"),
                },
                h => h.parse().with_context(|| {
                    format!("broker_listen {l:?}: not an IP address or \"bridge\"")
                })?,
            };
            Ok(SocketAddr::new(ip, port))
        })
        .collect()
}

/// Where edge-rt itself reaches the embedded broker: its first listener
/// (loopback for an unspecified address).
pub fn local_address(listen: &[SocketAddr]) -> Option<SocketAddr> {
    listen.first().map(|a| {
        let ip = match a.ip() {
            IpAddr::V4(v) if v.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(v) if v.is_unspecified() => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        SocketAddr::new(ip, a.port())
    })
}

/// `user:password` lines (`#` comments, blank lines skipped).
pub fn read_users(path: &Path) -> Result<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the broker users file {}", path.display()))?;
    let mut users = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (u, p) = line.split_once(':').with_context(|| {
            format!("{} line {}: expected user:password", path.display(), n + 1)
        })?;
        if u.is_empty() {
            bail!("{} line {}: empty user name", path.display(), n + 1);
        }
        users.insert(u.to_string(), p.to_string());
    }
    Ok(users)
}

/// What the child is told: its arguments after `edge-rt broker`.
fn child_args(c: &DevicesSection, listen: &[SocketAddr]) -> Vec<String> {
    let mut a = Vec::new();
    for l in listen {
        a.push("--listen".into());
        a.push(l.to_string());
    }
    if let Some(f) = &c.broker_users_file {
        a.push("--users-file".into());
        a.push(f.display().to_string());
    }
    if let (Some(u), Some(f)) = (&c.mqtt_username, &c.mqtt_password_file) {
        a.extend(["--user".into(), u.clone(), "--password-file".into()]);
        a.push(f.display().to_string());
    }
    a
}

/// The child's settings from its arguments.
pub fn settings(
    listen: Vec<SocketAddr>,
    users_file: Option<&Path>,
    user: Option<(&str, &Path)>,
) -> Result<BrokerSettings> {
    let mut users = match users_file {
        Some(f) => read_users(f)?,
        None => BTreeMap::new(),
    };
    if let Some((u, f)) = user {
        let p = std::fs::read_to_string(f)
            .with_context(|| format!("reading the MQTT password {}", f.display()))?;
        users.insert(u.to_string(), p.trim_end().to_string());
    }
    Ok(BrokerSettings {
        listen,
        users,
        ..Default::default()
    })
}

const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A broker that ran this long had a good start: the back-off starts over.
const RAN_WELL: Duration = Duration::from_secs(60);

fn spawn(exe: &Path, args: &[String]) -> std::io::Result<i32> {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("broker")
        .args(args)
        .stdin(std::process::Stdio::null());
    // rumqttd logs every connection at info, and a client's ordinary
    // disconnect as a routing error ("already gone"): warnings only, and
    // not those, unless EDGE_RT_BROKER_LOG says otherwise.
    let filter = std::env::var("EDGE_RT_BROKER_LOG")
        .unwrap_or_else(|_| "warn,rumqttd::router::routing=off".into());
    cmd.env("RUST_LOG", filter);
    // SAFETY: prctl with integer arguments only, async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // A fork like a container's: no thread of ours mid-allocation.
    let _barrier = outrigger_sys::fork_guard::write();
    let child = cmd.spawn()?;
    let pid = child.id() as i32;
    // The one reaper of the process collects it (same thread: no race).
    outrigger_sys::reaper::register(pid);
    Ok(pid)
}

/// Keep the embedded broker running, for as long as edge-rt runs.
pub async fn supervise(c: DevicesSection, listen: Vec<SocketAddr>) {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(error = %e, "the embedded MQTT broker cannot start: no path to edge-rt");
            return;
        }
    };
    let args = child_args(&c, &listen);
    let mut backoff = BACKOFF_FIRST;
    loop {
        let started = tokio::time::Instant::now();
        match spawn(&exe, &args) {
            Ok(pid) => {
                tracing::info!(pid, listen = ?listen, "embedded MQTT broker started");
                let status = loop {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    if let Some(s) = outrigger_sys::reaper::take(pid) {
                        break s;
                    }
                };
                if started.elapsed() >= RAN_WELL {
                    backoff = BACKOFF_FIRST;
                }
                tracing::warn!(pid, ?status, again_in = ?backoff, "embedded MQTT broker exited");
            }
            Err(e) => {
                tracing::error!(exe = %exe.display(), error = %e, again_in = ?backoff, "embedded MQTT broker not started")
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_entries_name_addresses_or_the_bridge() {
        let c = DevicesSection {
            broker_listen: vec![
                "127.0.0.1:1883".into(),
                "bridge:1883".into(),
                "[::1]:1884".into(),
            ],
            ..Default::default()
        };
        let a = listen_addrs(&c, Some(Ipv4Addr::new(10, 88, 0, 1))).unwrap();
        assert_eq!(
            a,
            ["127.0.0.1:1883", "10.88.0.1:1883", "[::1]:1884"]
                .map(|s| s.parse::<SocketAddr>().unwrap())
        );
        // No pod network: the bridge entry is left out, the rest stands.
        assert_eq!(
            listen_addrs(&c, None).unwrap(),
            ["127.0.0.1:1883", "[::1]:1884"].map(|s| s.parse::<SocketAddr>().unwrap())
        );
        for bad in ["localhost:1883", "127.0.0.1", "127.0.0.1:x"] {
            let c = DevicesSection {
                broker_listen: vec![bad.into()],
                ..Default::default()
            };
            assert!(listen_addrs(&c, None).is_err(), "{bad}");
        }
        assert_eq!(
            local_address(&["0.0.0.0:1883".parse().unwrap()]),
            Some("127.0.0.1:1883".parse().unwrap())
        );
    }

    #[test]
    fn users_file_lines_are_user_colon_password() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("users");
        std::fs::write(&f, "# devices\nboiler:s3cret:with:colons\n\npump:x\n").unwrap();
        let u = read_users(&f).unwrap();
        assert_eq!(
            u.get("boiler").map(String::as_str),
            Some("s3cret:with:colons")
        );
        assert_eq!(u.len(), 2);
        std::fs::write(&f, "nocolon\n").unwrap();
        assert!(read_users(&f).unwrap_err().to_string().contains("line 1"));
    }
}
