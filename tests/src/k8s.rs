//! A real Kubernetes control plane for the suites: kube-apiserver,
//! kube-controller-manager and kube-scheduler (v1.36) with etcd, from the
//! archive in `../shared/k8s`, started the way controller-runtime's envtest
//! starts them: own certificates, ports and data directory, on 127.0.0.1,
//! stopped at the end with nothing left running.
//!
//! The scenarios get a [`Cluster`]:
//! - `$OUTRIGGER_KUBECONFIG` names a cluster of the user's: it is used as
//!   it is (shared with whatever else runs there);
//! - under nextest, one control plane per test run, shared by the tests of
//!   the run: the first test that asks starts it as a process of its own
//!   (`control-plane`, this crate's binary), which stops it once nextest
//!   has exited;
//! - otherwise (a test binary run by hand) a control plane of the test's
//!   own, stopped when it is dropped.
//!
//! Either way each test owns its namespace and its nodes ([`Scope`]) and
//! removes them when it ends, so tests can share a cluster.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use sha2::{Digest, Sha256};

use crate::pki::{self, Ca, Credential};
use crate::registry::free_port;

/// The archive's file name in `../shared/k8s`.
const ARCHIVE: &str = "k8s-v1.36.2-etcd-3.5.30-linux-amd64.tar.xz";
const BINARIES: [&str; 4] = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
];
/// The Service range and the API server's address in it.
const SERVICE_CIDR: &str = "10.0.0.0/24";
const SERVICE_IP: &str = "10.0.0.1";

/// How the control plane is set up. The defaults are what the suites run
/// against: tolerations and node monitoring as clusters often shorten them.
#[derive(Debug, Clone)]
pub struct Options {
    /// `--default-not-ready-toleration-seconds` and
    /// `--default-unreachable-toleration-seconds` (the API server's own
    /// default is 300; clusters often set 60 or less).
    pub default_toleration_seconds: u32,
    /// A node whose Lease is this old is marked unreachable.
    pub node_monitor_grace_period: Duration,
    pub node_monitor_period: Duration,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            default_toleration_seconds: 60,
            node_monitor_grace_period: Duration::from_secs(20),
            node_monitor_period: Duration::from_secs(5),
        }
    }
}

/// Where the unpacked binaries are: `$OUTRIGGER_K8S_BIN`, or the archive
/// (`$OUTRIGGER_K8S_ARCHIVE`, else `../shared/k8s` beside the workspace, or
/// `/work/shared/k8s`)
/// checked against its SHA256SUMS and unpacked once into
/// `$OUTRIGGER_K8S_CACHE` (default `/var/cache/outrigger/k8s`).
pub fn binaries() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("OUTRIGGER_K8S_BIN").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d));
    }
    let archive = match std::env::var_os("OUTRIGGER_K8S_ARCHIVE").filter(|d| !d.is_empty()) {
        Some(a) => PathBuf::from(a),
        None => [
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/k8s"),
            PathBuf::from("/work/shared/k8s"),
        ]
        .into_iter()
        .map(|d| d.join(ARCHIVE))
        .find(|a| a.is_file())
        .unwrap_or_else(|| PathBuf::from("../shared/k8s").join(ARCHIVE)),
    };
    ensure!(
        archive.is_file(),
        "no Kubernetes control plane archive at {} (set OUTRIGGER_K8S_ARCHIVE or OUTRIGGER_K8S_BIN)",
        archive.display()
    );
    let cache = std::env::var_os("OUTRIGGER_K8S_CACHE")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/outrigger/k8s"));
    std::fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    // One unpacker at a time; the others wait and find it done.
    let lock = std::fs::File::create(cache.join(".lock"))?;
    lock.lock()?;
    let bytes =
        std::fs::read(&archive).with_context(|| format!("reading {}", archive.display()))?;
    let sum = hex::encode(Sha256::digest(&bytes));
    if let Ok(sums) = std::fs::read_to_string(archive.with_file_name("SHA256SUMS")) {
        let name = archive.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if let Some(want) = sums
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(name))
            .and_then(|l| l.split_whitespace().next())
        {
            ensure!(
                want == sum,
                "{}: SHA-256 {sum}, SHA256SUMS says {want}",
                archive.display()
            );
        }
    }
    let dir = cache.join(&sum[..16]);
    if dir.join(".complete").exists() {
        return Ok(dir);
    }
    let tmp = cache.join(format!("{}.tmp", &sum[..16]));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    let o = Command::new("tar")
        .arg("-xJf")
        .arg(&archive)
        .arg("-C")
        .arg(&tmp)
        .output()
        .context("running tar")?;
    ensure!(
        o.status.success(),
        "unpacking {}: {}",
        archive.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    for b in BINARIES {
        ensure!(tmp.join(b).is_file(), "{} has no {b}", archive.display());
    }
    std::fs::write(tmp.join(".complete"), &sum)?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir)?;
    Ok(dir)
}

/// A running control plane. Dropping it stops every process and removes
/// its directories.
pub struct ControlPlane {
    dir: tempfile::TempDir,
    /// etcd's data, on tmpfs: the suites need no durability and etcd's
    /// fsyncs on a VM disk would slow every write.
    _etcd_data: tempfile::TempDir,
    url: String,
    ca: Ca,
    kubeconfig: PathBuf,
    stop: Option<mpsc::Sender<()>>,
    keeper: Option<std::thread::JoinHandle<()>>,
}

struct Ports {
    etcd: u16,
    etcd_peer: u16,
    apiserver: u16,
    controller_manager: u16,
    scheduler: u16,
}

impl ControlPlane {
    pub fn start(opts: &Options) -> Result<ControlPlane> {
        let bin = binaries()?;
        let dir = tempfile::Builder::new()
            .prefix("outrigger-k8s-")
            .tempdir_in(var_tmp()?)?;
        let etcd_data = tempfile::Builder::new()
            .prefix("outrigger-etcd-")
            .tempdir_in(if Path::new("/dev/shm").is_dir() {
                Path::new("/dev/shm")
            } else {
                dir.path()
            })?;
        let d = dir.path();
        let ports = Ports {
            etcd: free_port()?,
            etcd_peer: free_port()?,
            apiserver: free_port()?,
            controller_manager: free_port()?,
            scheduler: free_port()?,
        };
        let url = format!("https://127.0.0.1:{}", ports.apiserver);

        // Certificates as a kubeadm cluster has them, all from one CA.
        let ca = Ca::named("outrigger-test-kubernetes-ca")?;
        let write = |name: &str, text: &str| -> Result<PathBuf> {
            let p = d.join(name);
            std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
            Ok(p)
        };
        let ca_crt = write("ca.crt", &ca.cert_pem)?;
        let ca_key = write("ca.key", &ca.key_pem)?;
        let service_ip: IpAddr = SERVICE_IP.parse()?;
        let (crt, key) = ca.server_cert(&[service_ip])?;
        let (apiserver_crt, apiserver_key) =
            (write("apiserver.crt", &crt)?, write("apiserver.key", &key)?);
        let (crt, key) = ca.client_cert("kube-apiserver-kubelet-client", &["system:masters"])?;
        let (kubelet_crt, kubelet_key) = (
            write("apiserver-kubelet-client.crt", &crt)?,
            write("apiserver-kubelet-client.key", &key)?,
        );
        let sa = rcgen::KeyPair::generate()?;
        let sa_key = write("sa.key", &sa.serialize_pem())?;
        let sa_pub = write("sa.pub", &sa.public_key_pem())?;
        let kubeconfig = d.join("admin.kubeconfig");
        let (crt, key) = ca.client_cert("outrigger-admin", &["system:masters"])?;
        pki::write_kubeconfig(
            &kubeconfig,
            &url,
            &ca.cert_pem,
            "outrigger-admin",
            Credential::Cert {
                cert_pem: &crt,
                key_pem: &key,
            },
        )?;
        let component_kubeconfig = |user: &str| -> Result<PathBuf> {
            let (crt, key) = ca.client_cert(user, &[])?;
            let p = d.join(format!("{}.kubeconfig", user.replace(':', "-")));
            pki::write_kubeconfig(
                &p,
                &url,
                &ca.cert_pem,
                user,
                Credential::Cert {
                    cert_pem: &crt,
                    key_pem: &key,
                },
            )?;
            Ok(p)
        };
        let cm_kubeconfig = component_kubeconfig("system:kube-controller-manager")?;
        let scheduler_kubeconfig = component_kubeconfig("system:kube-scheduler")?;

        let etcd_url = format!("http://127.0.0.1:{}", ports.etcd);
        let peer_url = format!("http://127.0.0.1:{}", ports.etcd_peer);
        let etcd = {
            let mut c = Command::new(bin.join("etcd"));
            c.arg("--data-dir")
                .arg(etcd_data.path())
                .args(["--name", "default"])
                .args(["--listen-client-urls", &etcd_url])
                .args(["--advertise-client-urls", &etcd_url])
                .args(["--listen-peer-urls", &peer_url])
                .args(["--initial-advertise-peer-urls", &peer_url])
                .args(["--initial-cluster", &format!("default={peer_url}")])
                .arg("--unsafe-no-fsync");
            c
        };
        let tol = opts.default_toleration_seconds.to_string();
        let apiserver = {
            let mut c = Command::new(bin.join("kube-apiserver"));
            c.args([
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                "--endpoint-reconciler-type=none",
                "--authorization-mode=Node,RBAC",
                "--allow-privileged=true",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                // As kubeadm clusters have it: a node may only touch its
                // own Node and pods.
                "--enable-admission-plugins=NodeRestriction",
            ])
            .arg(format!("--secure-port={}", ports.apiserver))
            .arg(format!("--etcd-servers={etcd_url}"))
            .arg(format!("--service-cluster-ip-range={SERVICE_CIDR}"))
            .arg(format!("--default-not-ready-toleration-seconds={tol}"))
            .arg(format!("--default-unreachable-toleration-seconds={tol}"))
            .arg(flag("--client-ca-file", &ca_crt))
            .arg(flag("--tls-cert-file", &apiserver_crt))
            .arg(flag("--tls-private-key-file", &apiserver_key))
            .arg(flag("--kubelet-client-certificate", &kubelet_crt))
            .arg(flag("--kubelet-client-key", &kubelet_key))
            .arg(flag("--service-account-key-file", &sa_pub))
            .arg(flag("--service-account-signing-key-file", &sa_key));
            c
        };
        let secs = |d: Duration| format!("{}s", d.as_secs().max(1));
        let controller_manager = {
            let mut c = Command::new(bin.join("kube-controller-manager"));
            c.args([
                "--bind-address=127.0.0.1",
                "--leader-elect=false",
                "--controllers=*",
                "--use-service-account-credentials=true",
            ])
            .arg(flag("--kubeconfig", &cm_kubeconfig))
            .arg(flag("--authentication-kubeconfig", &cm_kubeconfig))
            .arg(flag("--authorization-kubeconfig", &cm_kubeconfig))
            .arg(format!("--secure-port={}", ports.controller_manager))
            .arg(flag("--service-account-private-key-file", &sa_key))
            .arg(flag("--root-ca-file", &ca_crt))
            .arg(flag("--cluster-signing-cert-file", &ca_crt))
            .arg(flag("--cluster-signing-key-file", &ca_key))
            .arg(format!("--service-cluster-ip-range={SERVICE_CIDR}"))
            // The node IPAM controller gives every Node a pod CIDR (edge
            // nodes of a site route to each other's).
            .args([
                "--allocate-node-cidrs=true",
                "--cluster-cidr=10.244.0.0/16",
                "--node-cidr-mask-size=24",
            ])
            .arg(format!(
                "--node-monitor-grace-period={}",
                secs(opts.node_monitor_grace_period)
            ))
            .arg(format!(
                "--node-monitor-period={}",
                secs(opts.node_monitor_period)
            ));
            c
        };
        let scheduler = {
            let mut c = Command::new(bin.join("kube-scheduler"));
            c.args(["--bind-address=127.0.0.1", "--leader-elect=false"])
                .arg(flag("--kubeconfig", &scheduler_kubeconfig))
                .arg(flag("--authentication-kubeconfig", &scheduler_kubeconfig))
                .arg(flag("--authorization-kubeconfig", &scheduler_kubeconfig))
                .arg(format!("--secure-port={}", ports.scheduler));
            c
        };

        // The processes belong to a thread that lives as long as this
        // value: each dies with it (PR_SET_PDEATHSIG follows the thread
        // that spawned it), so even a test killed outright leaves nothing.
        let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let logs = d.to_path_buf();
        let apiserver_port = ports.apiserver;
        let keeper = std::thread::Builder::new()
            .name("control-plane".into())
            .spawn(move || {
                let mut procs = Procs::default();
                let started = (|| -> Result<()> {
                    procs.spawn("etcd", etcd, &logs)?;
                    procs.wait_until("etcd", Duration::from_secs(30), || {
                        http_get(
                            SocketAddr::from(([127, 0, 0, 1], ports.etcd)),
                            "/health",
                            false,
                        )
                        .is_ok_and(|(code, body)| code == 200 && body.contains("true"))
                    })?;
                    procs.spawn("kube-apiserver", apiserver, &logs)?;
                    let api = SocketAddr::from(([127, 0, 0, 1], apiserver_port));
                    procs.wait_until("kube-apiserver", Duration::from_secs(90), || {
                        http_get(api, "/readyz", true).is_ok_and(|(code, _)| code == 200)
                    })?;
                    procs.spawn("kube-controller-manager", controller_manager, &logs)?;
                    procs.spawn("kube-scheduler", scheduler, &logs)?;
                    let sched = SocketAddr::from(([127, 0, 0, 1], ports.scheduler));
                    procs.wait_until("kube-scheduler", Duration::from_secs(60), || {
                        http_get(sched, "/healthz", true).is_ok_and(|(code, _)| code == 200)
                    })?;
                    let cm = SocketAddr::from(([127, 0, 0, 1], ports.controller_manager));
                    procs.wait_until("kube-controller-manager", Duration::from_secs(60), || {
                        http_get(cm, "/healthz", true).is_ok_and(|(code, _)| code == 200)
                    })?;
                    Ok(())
                })()
                .map_err(|e| anyhow::anyhow!("{e:#}\n{}", logs_tail(&logs)));
                let ok = started.is_ok();
                let _ = ready_tx.send(started);
                if ok {
                    // Until told to stop, or until the owner is gone.
                    let _ = stop_rx.recv();
                }
                procs.stop_all();
            })?;
        let mut cp = ControlPlane {
            dir,
            _etcd_data: etcd_data,
            url,
            ca,
            kubeconfig,
            stop: Some(stop_tx),
            keeper: Some(keeper),
        };
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                cp.shutdown();
                return Err(e);
            }
            Err(_) => {
                cp.shutdown();
                bail!("the control plane's keeper thread ended");
            }
        }
        // Controllers at work: the service account controller has made the
        // default namespace's account, the CA publisher its ConfigMap.
        let t = Instant::now();
        loop {
            let sa = cp
                .kubectl()
                .args(["get", "serviceaccount", "default", "-n", "default"])
                .output()?;
            let cm = cp
                .kubectl()
                .args(["get", "configmap", "kube-root-ca.crt", "-n", "default"])
                .output()?;
            if sa.status.success() && cm.status.success() {
                break;
            }
            if t.elapsed() > Duration::from_secs(60) {
                let e = anyhow::anyhow!(
                    "the controllers made no default ServiceAccount in a minute\n{}",
                    cp.logs_tail()
                );
                cp.shutdown();
                return Err(e);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(cp)
    }

    fn shutdown(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.keeper.take() {
            let _ = t.join();
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The admin kubeconfig (group system:masters).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca.cert_pem
    }

    /// A kubeconfig with a client certificate for `user` in `groups`.
    pub fn cert_kubeconfig(&self, user: &str, groups: &[&str]) -> Result<PathBuf> {
        let (crt, key) = self.ca.client_cert(user, groups)?;
        let p = self
            .dir
            .path()
            .join(format!("{}.kubeconfig", user.replace(':', "-")));
        pki::write_kubeconfig(
            &p,
            &self.url,
            &self.ca.cert_pem,
            user,
            Credential::Cert {
                cert_pem: &crt,
                key_pem: &key,
            },
        )?;
        Ok(p)
    }

    pub fn kubectl(&self) -> Command {
        kubectl(&self.kubeconfig)
    }

    /// The last lines each component logged (for errors).
    pub fn logs_tail(&self) -> String {
        logs_tail(self.dir.path())
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn logs_tail(dir: &Path) -> String {
    let mut out = String::new();
    for b in BINARIES {
        let text = std::fs::read_to_string(dir.join(format!("{b}.log"))).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(15);
        out.push_str(&format!(
            "--- {b} (last lines)\n{}\n",
            lines[from..].join("\n")
        ));
    }
    out
}

fn flag(name: &str, path: &Path) -> String {
    format!("{name}={}", path.display())
}

fn var_tmp() -> Result<&'static Path> {
    std::fs::create_dir_all("/var/tmp")?;
    Ok(Path::new("/var/tmp"))
}

/// `kubectl --kubeconfig K` ($KUBECTL, else the one on the PATH).
pub fn kubectl(kubeconfig: &Path) -> Command {
    let bin = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into());
    let mut c = Command::new(bin);
    c.arg("--kubeconfig").arg(kubeconfig);
    c
}

/// The control plane's processes, started in order and stopped in reverse.
#[derive(Default)]
struct Procs {
    running: Vec<(&'static str, Child)>,
}

impl Procs {
    fn spawn(&mut self, name: &'static str, mut cmd: Command, logs: &Path) -> Result<()> {
        let log = std::fs::File::create(logs.join(format!("{name}.log")))?;
        // SAFETY: prctl only, between fork and exec.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        self.running.push((name, child));
        Ok(())
    }

    /// Poll `ready` until it holds; fail early if a process has exited.
    fn wait_until(
        &mut self,
        what: &str,
        timeout: Duration,
        ready: impl Fn() -> bool,
    ) -> Result<()> {
        let t = Instant::now();
        loop {
            if ready() {
                return Ok(());
            }
            for (name, c) in self.running.iter_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    bail!("{name} exited ({st}) while waiting for {what}");
                }
            }
            if t.elapsed() > timeout {
                bail!("{what} not ready after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop_all(&mut self) {
        while let Some((_, mut c)) = self.running.pop() {
            if let Ok(pid) = i32::try_from(c.id()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// TLS over `tcp` to a server of ours at `addr`, its certificate not
/// verified (loopback, a process the test started).
pub fn insecure_tls(
    tcp: TcpStream,
    addr: SocketAddr,
) -> Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>> {
    let cfg = rustls::ClientConfig::builder_with_provider(pki::provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(NoVerify))
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), name)?;
    Ok(rustls::StreamOwned::new(conn, tcp))
}

/// A GET on loopback (HTTPS without verifying: this is a readiness poll
/// of a process we started); status code and body.
fn http_get(addr: SocketAddr, path: &str, tls: bool) -> Result<(u16, String)> {
    let mut tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let mut raw = Vec::new();
    if tls {
        let mut s = insecure_tls(tcp, addr)?;
        s.write_all(req.as_bytes())?;
        // A server that closes without close_notify still gave us the body.
        let _ = s.read_to_end(&mut raw);
    } else {
        tcp.write_all(req.as_bytes())?;
        tcp.read_to_end(&mut raw)?;
    }
    let text = String::from_utf8_lossy(&raw);
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no HTTP status line")?;
    let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    Ok((code, body.to_string()))
}

#[derive(Debug)]
struct NoVerify;

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        pki::provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A name unique to this process and moment, for objects in a shared
/// cluster (`prefix-<6 hex digits>`).
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut h = Sha256::new();
    h.update(t.to_le_bytes());
    h.update(std::process::id().to_le_bytes());
    h.update(N.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    format!("{prefix}-{}", &hex::encode(h.finalize())[..6])
}

/// The cluster a scenario runs against (see the module doc).
pub enum Cluster {
    /// `$OUTRIGGER_KUBECONFIG`'s, or the control plane this test run shares.
    Shared { kubeconfig: PathBuf },
    /// A control plane of this test's own.
    Own(ControlPlane),
}

impl Cluster {
    /// `$OUTRIGGER_KUBECONFIG`, else this nextest run's control plane,
    /// else one of this process's own.
    pub fn get() -> Result<Cluster> {
        if let Some(k) = std::env::var_os("OUTRIGGER_KUBECONFIG").filter(|k| !k.is_empty()) {
            return Ok(Cluster::Shared {
                kubeconfig: PathBuf::from(k),
            });
        }
        if let Some(kubeconfig) = shared_by_run()? {
            return Ok(Cluster::Shared { kubeconfig });
        }
        Cluster::own(&Options::default())
    }

    /// A control plane for this caller alone (a scenario that changes
    /// something cluster-wide).
    pub fn own(opts: &Options) -> Result<Cluster> {
        Ok(Cluster::Own(ControlPlane::start(opts)?))
    }

    pub fn kubeconfig(&self) -> &Path {
        match self {
            Cluster::Shared { kubeconfig } => kubeconfig,
            Cluster::Own(cp) => cp.kubeconfig(),
        }
    }

    pub fn kubectl(&self) -> Command {
        kubectl(self.kubeconfig())
    }

    /// `cloud-gw manifests`' DeviceModel and Device definitions, applied
    /// and Established.
    pub fn install_device_crds(&self) -> Result<()> {
        let mut yaml = String::new();
        for d in cloud_gw::crds::definitions() {
            yaml.push_str("---\n");
            yaml.push_str(&serde_yaml_ng::to_string(&d)?);
        }
        let mut apply = self.kubectl();
        apply.args(["apply", "--server-side", "-f", "-"]);
        crate::util::with_stdin(apply, &yaml).context("CRDs not applied")?;
        let o = self
            .kubectl()
            .args([
                "wait",
                "--for=condition=Established",
                "crd/devices.devices.outrigger.io",
                "crd/devicemodels.devices.outrigger.io",
                "--timeout=30s",
            ])
            .output()?;
        anyhow::ensure!(
            o.status.success(),
            "CRDs not established: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        Ok(())
    }
}

/// Under nextest: the run's shared control plane, started by the first
/// test to ask (the `control-plane` binary, which stops it when nextest
/// is gone). None outside nextest.
fn shared_by_run() -> Result<Option<PathBuf>> {
    let Some(run) = std::env::var_os("NEXTEST_RUN_ID").filter(|r| !r.is_empty()) else {
        return Ok(None);
    };
    let dir = var_tmp()?.join(format!(
        "outrigger-k8s-run-{}",
        run.to_string_lossy().replace('/', "_")
    ));
    std::fs::create_dir_all(&dir)?;
    let lock = std::fs::File::create(dir.join(".lock"))?;
    lock.lock()?;
    let ready = dir.join("ready");
    if let Ok(k) = std::fs::read_to_string(&ready) {
        return Ok(Some(PathBuf::from(k.trim())));
    }
    if let Ok(why) = std::fs::read_to_string(dir.join("failed")) {
        bail!("this run's control plane failed to start:\n{why}");
    }
    let log = std::fs::File::create(dir.join("control-plane.log"))?;
    let mut cmd = Command::new(crate::util::workspace_bin("control-plane"));
    cmd.arg("--dir")
        .arg(&dir)
        .arg("--watch-pid")
        .arg(nix::unistd::getppid().as_raw().to_string());
    // Its own session: it outlives this test, not the run.
    // SAFETY: setsid only, between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            nix::unistd::setsid()
                .map(|_| ())
                .map_err(std::io::Error::from)
        });
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting control-plane (built with the tests crate)")?;
    let t = Instant::now();
    loop {
        if let Ok(k) = std::fs::read_to_string(&ready) {
            return Ok(Some(PathBuf::from(k.trim())));
        }
        if let Ok(Some(st)) = child.try_wait() {
            let log = std::fs::read_to_string(dir.join("control-plane.log")).unwrap_or_default();
            let _ = std::fs::write(dir.join("failed"), &log);
            bail!("control-plane exited ({st}):\n{log}");
        }
        if t.elapsed() > Duration::from_secs(180) {
            let _ = child.kill();
            bail!("the shared control plane did not start in 3 minutes");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What one test owns in a cluster: a namespace of its own (with its
/// default ServiceAccount made by the real controller), the Nodes its edges
/// become and the cluster-scoped objects it makes. All removed on drop.
pub struct Scope {
    kubeconfig: PathBuf,
    pub namespace: String,
    owned: std::sync::Mutex<Vec<(String, String)>>,
}

impl Scope {
    pub fn new(cluster: &Cluster, prefix: &str) -> Result<Scope> {
        let namespace = unique(prefix);
        let s = Scope {
            kubeconfig: cluster.kubeconfig().to_path_buf(),
            namespace,
            owned: Default::default(),
        };
        let o = s
            .kubectl()
            .args(["create", "namespace", &s.namespace])
            .output()?;
        ensure!(
            o.status.success(),
            "creating namespace {}: {}",
            s.namespace,
            String::from_utf8_lossy(&o.stderr)
        );
        // Pods are refused until the namespace's ServiceAccount exists.
        let t = Instant::now();
        while !s
            .kubectl()
            .args(["get", "serviceaccount", "default", "-n", &s.namespace])
            .output()?
            .status
            .success()
        {
            ensure!(
                t.elapsed() < Duration::from_secs(30),
                "no default ServiceAccount in {} after 30 s",
                s.namespace
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(s)
    }

    /// kubectl in this scope's namespace.
    pub fn kubectl(&self) -> Command {
        let mut c = kubectl(&self.kubeconfig);
        c.args(["-n", &self.namespace]);
        c
    }

    /// Remove this cluster-scoped object (e.g. `node`, NAME) at the end.
    pub fn owns(&self, kind: &str, name: &str) {
        self.owned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((kind.to_string(), name.to_string()));
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        let owned = std::mem::take(&mut *self.owned.lock().unwrap_or_else(|e| e.into_inner()));
        for (kind, name) in owned.iter().rev() {
            let _ = kubectl(&self.kubeconfig)
                .args(["delete", kind, name, "--ignore-not-found", "--wait=false"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            if kind == "node" {
                let _ = kubectl(&self.kubeconfig)
                    .args(["delete", "lease", name, "-n", "kube-node-lease"])
                    .args(["--ignore-not-found", "--wait=false"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
        // Pods in it go at once: the nodes that ran them are gone.
        let _ = kubectl(&self.kubeconfig)
            .args(["delete", "pods", "--all", "-n", &self.namespace])
            .args(["--force", "--grace-period=0", "--wait=false"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = kubectl(&self.kubeconfig)
            .args(["delete", "namespace", &self.namespace, "--wait=false"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
