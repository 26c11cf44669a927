//! A `cloud-gw` for the suites: its own CA in a temporary directory,
//! serving objects from files (`serve`) or from a cluster (`run`), on
//! 127.0.0.1 or inside a network namespace; and edges joined to it.

use std::path::PathBuf;
use std::process::{Child, Command, Output};
use std::time::Duration;

use anyhow::{ensure, Context, Result};

use crate::registry::free_port;
use crate::util::*;

/// A `cloud-gw serve` with its own CA, on 127.0.0.1 or in a namespace.
pub struct Cloud {
    pub dir: tempfile::TempDir,
    pub child: Child,
    /// The URL edges join and link to (`wss://addr:port`).
    pub server: String,
    pub netns: Option<String>,
    pub addr: std::net::SocketAddr,
    pub node_cert_validity: String,
    /// `cloud-gw run` against this cluster; `serve` from `objects/` when None.
    pub kubeconfig: Option<PathBuf>,
    /// Keep the CA and tokens in this Secret (NAMESPACE/NAME) of the
    /// cluster, as replicas do, instead of `dir`.
    pub secret: Option<String>,
    /// Health and metrics (plain HTTP), and the admission webhook (HTTPS).
    pub http: std::net::SocketAddr,
    pub webhook: std::net::SocketAddr,
    /// The address of the kubelet ports of edge nodes (`run` only; a port
    /// per node, in the Node's status).
    pub kubelet: std::net::IpAddr,
    /// More arguments for `run` (e.g. `--webhook-config NAME`).
    pub run_args: Vec<String>,
}

/// The address cloud-gw's kubelet ports listen on in the tests: one of
/// this host's, added to `lo` once (shared by every test; it stays).
pub const KUBELET_IP: [u8; 4] = [10, 250, 250, 1];

fn kubelet_ip() -> Option<std::net::IpAddr> {
    let ip = std::net::IpAddr::from(KUBELET_IP);
    let o = Command::new("ip")
        .args(["addr", "add", &format!("{ip}/32"), "dev", "lo"])
        .output()
        .ok()?;
    // Added now, or by an earlier test ("already assigned").
    let fine = o.status.success() || String::from_utf8_lossy(&o.stderr).contains("already");
    fine.then_some(ip)
}

impl Drop for Cloud {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Cloud {
    pub fn cmd(dir: &std::path::Path, args: &[&str]) -> Result<Output> {
        let o = Command::new(cloud_gw_bin())
            .arg("--dir")
            .arg(dir)
            .args(args)
            .output()
            .context("running cloud-gw (build it: cargo nextest run --workspace)")?;
        ensure!(
            o.status.success(),
            "cloud-gw {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        Ok(o)
    }

    pub async fn start() -> Result<Cloud> {
        Cloud::start_in(None, "127.0.0.1", "90d").await
    }

    /// `cloud-gw run` on 127.0.0.1, bridging to the cluster of `kubeconfig`.
    pub async fn start_kube(kubeconfig: &std::path::Path) -> Result<Cloud> {
        Cloud::start_kube_with(kubeconfig, &[], None).await
    }

    /// The same with more arguments for `run`, and the webhook on `webhook`
    /// (an address chosen beforehand, for a webhook configuration made
    /// before cloud-gw starts).
    pub async fn start_kube_with(
        kubeconfig: &std::path::Path,
        run_args: &[&str],
        webhook: Option<std::net::SocketAddr>,
    ) -> Result<Cloud> {
        Cloud::start_kube_at(kubeconfig, "127.0.0.1", run_args, webhook).await
    }

    /// The same, listening on `addr` (edges in network namespaces reach
    /// it there).
    pub async fn start_kube_at(
        kubeconfig: &std::path::Path,
        addr: &str,
        run_args: &[&str],
        webhook: Option<std::net::SocketAddr>,
    ) -> Result<Cloud> {
        let mut c = Cloud::prepare(None, addr, "90d", Some(kubeconfig), None, None, &[])?;
        c.run_args = run_args.iter().map(|a| a.to_string()).collect();
        if let Some(w) = webhook {
            c.webhook = w;
        }
        c.spawn().await?;
        Ok(c)
    }

    /// `cloud-gw run` (with a cluster) or `serve` on 127.0.0.1 whose
    /// certificate also names `sans`: for edges that reach this host by
    /// another address (a QEMU guest reaches it at 10.0.2.2).
    pub async fn start_for(kubeconfig: Option<&std::path::Path>, sans: &[&str]) -> Result<Cloud> {
        let mut c = Cloud::prepare(None, "127.0.0.1", "90d", kubeconfig, None, None, sans)?;
        c.spawn().await?;
        Ok(c)
    }

    /// A replica: `cloud-gw run` with its CA and tokens in `secret` of the
    /// cluster, on `port` if given (a replica taking over another's).
    pub async fn start_replica(
        kubeconfig: &std::path::Path,
        secret: &str,
        port: Option<u16>,
    ) -> Result<Cloud> {
        Cloud::start_with(
            None,
            "127.0.0.1",
            "90d",
            Some(kubeconfig),
            Some(secret),
            port,
        )
        .await
    }

    /// cloud-gw listening on `addr`, inside network namespace `netns`.
    pub async fn start_in(
        netns: Option<&str>,
        addr: &str,
        node_cert_validity: &str,
    ) -> Result<Cloud> {
        Cloud::start_with(netns, addr, node_cert_validity, None, None, None).await
    }

    async fn start_with(
        netns: Option<&str>,
        addr: &str,
        node_cert_validity: &str,
        kubeconfig: Option<&std::path::Path>,
        secret: Option<&str>,
        port: Option<u16>,
    ) -> Result<Cloud> {
        let mut c = Cloud::prepare(
            netns,
            addr,
            node_cert_validity,
            kubeconfig,
            secret,
            port,
            &[],
        )?;
        c.spawn().await?;
        Ok(c)
    }

    /// Everything but the process.
    fn prepare(
        netns: Option<&str>,
        addr: &str,
        node_cert_validity: &str,
        kubeconfig: Option<&std::path::Path>,
        secret: Option<&str>,
        port: Option<u16>,
        sans: &[&str],
    ) -> Result<Cloud> {
        let dir = tempfile::tempdir()?;
        // A replica makes (or adopts) the CA in the Secret itself.
        if secret.is_none() {
            let mut args = vec!["init", "--san", addr];
            for s in sans {
                args.extend(["--san", s]);
            }
            Cloud::cmd(dir.path(), &args)?;
        }
        let port = match port {
            Some(p) => p,
            None => free_port()?,
        };
        let ip: std::net::IpAddr = addr.parse()?;
        let mut c = Cloud {
            dir,
            child: Command::new("true").spawn()?,
            server: format!("wss://{addr}:{port}"),
            netns: netns.map(str::to_string),
            addr: std::net::SocketAddr::new(ip, port),
            node_cert_validity: node_cert_validity.to_string(),
            kubeconfig: kubeconfig.map(PathBuf::from),
            secret: secret.map(str::to_string),
            http: std::net::SocketAddr::new(ip, free_port()?),
            webhook: std::net::SocketAddr::new(ip, free_port()?),
            // Not loopback: the API server's nodes/proxy refuses addresses
            // that are not global unicast.
            kubelet: if kubeconfig.is_some() {
                kubelet_ip().unwrap_or(ip)
            } else {
                ip
            },
            run_args: Vec::new(),
        };
        let _ = c.child.wait();
        Ok(c)
    }

    /// Start (or start again) the server, appending to its log.
    pub async fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("cloud-gw.log"))?;
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(cloud_gw_bin());
                c
            }
            None => Command::new(cloud_gw_bin()),
        };
        cmd.args(self.global_args());
        match &self.kubeconfig {
            Some(_) => {
                cmd.arg("run");
                cmd.args(["--lease-period", "2s", "--status-period", "10s"]);
                cmd.arg("--webhook-listen").arg(self.webhook.to_string());
                cmd.arg("--kubelet-listen").arg(self.kubelet.to_string());
                cmd.args(["--san", &self.addr.ip().to_string()]);
                cmd.args(&self.run_args);
            }
            None => {
                cmd.arg("serve")
                    .arg("--objects")
                    .arg(self.dir.path().join("objects"));
            }
        }
        cmd.arg("--http-listen").arg(self.http.to_string());
        self.child = cmd
            .arg("--listen")
            .arg(self.addr.to_string())
            .args([
                "--heartbeat",
                "2s",
                "--node-cert-validity",
                &self.node_cert_validity,
            ])
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let addr = self.addr;
        wait_for("cloud-gw to listen", Duration::from_secs(10), || async {
            std::net::TcpStream::connect(addr).ok()
        })
        .await?;
        Ok(())
    }

    pub async fn restart(&mut self) -> Result<()> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.spawn().await
    }

    /// `--dir`, and where the Secret and cluster are if it keeps its PKI
    /// in one.
    fn global_args(&self) -> Vec<std::ffi::OsString> {
        let mut a: Vec<std::ffi::OsString> = vec!["--dir".into(), self.dir.path().into()];
        if let Some(k) = &self.kubeconfig {
            a.push("--kubeconfig".into());
            a.push(k.into());
        }
        if let Some(s) = &self.secret {
            a.push("--secret".into());
            a.push(s.into());
        }
        a
    }

    /// A `cloud-gw` command against this one's keeper.
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        let o = Command::new(cloud_gw_bin())
            .args(self.global_args())
            .args(args)
            .output()
            .context("running cloud-gw")?;
        ensure!(
            o.status.success(),
            "cloud-gw {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        Ok(o)
    }

    pub fn token(&self, ttl: &str) -> Result<String> {
        let o = self.cli(&["token", "create", "--ttl", ttl])?;
        Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("cloud-gw.log")).unwrap_or_default()
    }

    pub async fn logged(&self, what: &str) -> Result<()> {
        wait_for(what, Duration::from_secs(10), || async {
            self.log().contains(what).then_some(())
        })
        .await
        .with_context(|| format!("cloud-gw log:\n{}", self.log()))
    }
}

pub fn join(node: &Node, server: &str, token: &str, name: &str) -> Result<Output> {
    join_with(node, server, token, name, &[])
}

/// `edge-rt join` with more arguments (e.g. `--labels k=v`).
pub fn join_with(
    node: &Node,
    server: &str,
    token: &str,
    name: &str,
    extra: &[&str],
) -> Result<Output> {
    Ok(Command::new(edge_rt_bin())
        .arg("--config")
        .arg(&node.config)
        .args([
            "join",
            "--server",
            server,
            "--token",
            token,
            "--node-name",
            name,
        ])
        .args(extra)
        .output()?)
}

/// A fresh node joined to `cloud` as `name`.
pub fn joined(cloud: &Cloud, name: &str) -> Result<Node> {
    let node = Node::new()?;
    let o = join(&node, &cloud.server, &cloud.token("10m")?, name)?;
    ensure!(o.status.success(), "join: {}", stderr(&o));
    Ok(node)
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn link_dir(node: &Node) -> PathBuf {
    node.dir.path().join("data/link")
}

pub async fn cloud_connected(node: &Node) -> Result<()> {
    wait_for("CloudConnected=True", Duration::from_secs(15), || async {
        let o = node.cli(&["status", "-o", "json"]).ok()?;
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
        v["conditions"]
            .as_array()?
            .iter()
            .any(|c| c["type"] == "CloudConnected" && c["status"] == "True")
            .then_some(())
    })
    .await
    .with_context(|| node.daemon_log())
}

/// Packets to and from a local TCP port dropped, so that connections hang
/// (as on a dead cellular link) rather than reset; restored on drop.
pub struct PortCut {
    port: u16,
    iface: String,
    active: bool,
}

impl PortCut {
    fn rules(&self, op: &str) -> Result<()> {
        for dir in ["--dport", "--sport"] {
            let port = self.port.to_string();
            let o = Command::new("iptables")
                .args([
                    "-w",
                    op,
                    "INPUT",
                    "-i",
                    &self.iface,
                    "-p",
                    "tcp",
                    dir,
                    &port,
                    "-j",
                    "DROP",
                ])
                .output()
                .context("iptables")?;
            ensure!(
                o.status.success(),
                "iptables {op}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        Ok(())
    }

    pub fn cut(port: u16) -> Result<PortCut> {
        PortCut::cut_on("lo", port)
    }

    /// The same for what comes in through interface `iface`.
    pub fn cut_on(iface: &str, port: u16) -> Result<PortCut> {
        let c = PortCut {
            port,
            iface: iface.to_string(),
            active: true,
        };
        c.rules("-I")?;
        Ok(c)
    }

    pub fn restore(&mut self) -> Result<()> {
        if self.active {
            self.active = false;
            self.rules("-D")?;
        }
        Ok(())
    }
}

impl Drop for PortCut {
    fn drop(&mut self) {
        let _ = self.restore();
    }
}

/// A TCP relay on 127.0.0.1 to `target`: an edge that links through it can
/// be cut alone (`PortCut::cut(relay.port)`) while others linked straight
/// to the same cloud-gw stay up. It runs on a thread of its own, so a test
/// blocked on a command (a join) does not stall it.
pub struct Relay {
    pub port: u16,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Relay {
    pub fn start(target: std::net::SocketAddr) -> Result<Relay> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("relay".into())
            .spawn(move || {
                rt.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                        return;
                    };
                    let accept = async {
                        while let Ok((mut inbound, _)) = listener.accept().await {
                            tokio::spawn(async move {
                                if let Ok(mut out) = tokio::net::TcpStream::connect(target).await {
                                    let _ =
                                        tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                                }
                            });
                        }
                    };
                    tokio::select! {
                        _ = accept => {}
                        _ = stopped => {}
                    }
                });
            })?;
        Ok(Relay {
            port,
            stop: Some(stop),
        })
    }

    /// The link URL through the relay.
    pub fn server(&self) -> String {
        format!("wss://127.0.0.1:{}", self.port)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}
