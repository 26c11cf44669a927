//! A Kubernetes API server for tests, in-process: **test infrastructure**,
//! not a product part. There is no kube-apiserver on the machines this
//! project builds on, so the suites (and cloud-gw's Kubernetes bridge, and
//! kubectl as a real client) talk to this one instead.
//!
//! It keeps the real API's semantics for what it serves: HTTPS with its own
//! CA; client-certificate (CN = user, O = groups) and bearer-token
//! authentication (no authorization: every authenticated user may do
//! everything); discovery and OpenAPI v3 documents; a global
//! resourceVersion with a bounded change history; create/get/list/update/
//! patch (JSON, merge, strategic, server-side apply)/delete/
//! deletecollection/watch for core v1 namespaces, nodes, pods (with the
//! binding subresource), configmaps, secrets, events, services and
//! serviceaccounts, coordination leases, apps deployments and replicasets,
//! RBAC roles, role bindings, cluster roles and cluster role bindings
//! (stored and validated, never enforced), mutating webhook configurations
//! (called on admission) and CRDs (which make their custom resources
//! servable); status subresources,
//! generation, graceful pod deletion, finalizers; Tables for kubectl.
//!
//! Nothing runs that a cluster's controllers would: no scheduler, no
//! kubelet, no garbage collector, no node lifecycle. Tests play those parts
//! through the API (HTTP or kubectl) like any client. Deleting a namespace
//! deletes what is in it at once (the namespace controller's work).
//!
//! Set `OUTRIGGER_APISERVER_LOG=1` to log every request on stderr.

mod admission;
mod api;
mod fields;
mod http;
mod openapi;
mod patch;
use crate::pki;
mod protobuf;
mod resources;
mod selector;
mod status;
mod store;
mod table;
mod watch;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};

/// An authenticated user.
#[derive(Debug, Clone)]
pub struct User {
    pub name: String,
    pub groups: Vec<String>,
}

/// How to run a [`TestApiServer`].
#[derive(Debug, Clone)]
pub struct Options {
    /// Where to listen; port 0 picks a free one.
    pub listen: SocketAddr,
    /// Changes kept for watches (and continue tokens) to resume from; a
    /// resourceVersion older than these gets 410 Gone.
    pub history: usize,
    /// How often a watch that allows bookmarks gets one.
    pub bookmark_interval: Duration,
    /// How long a watch without timeoutSeconds lasts.
    pub watch_timeout: Duration,
    /// Bearer tokens known from the start: (token, user, groups).
    pub tokens: Vec<(String, String, Vec<String>)>,
    /// Addresses of webhook services, "name.namespace" -> 127.0.0.1:port
    /// (the stand-in for cluster DNS and a Service's endpoints).
    pub services: HashMap<String, SocketAddr>,
    /// Directory for kubeconfigs and kubectl's cache; a temporary one,
    /// removed on drop, if None.
    pub dir: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            history: 10_000,
            bookmark_interval: Duration::from_secs(10),
            watch_timeout: Duration::from_secs(1800),
            tokens: vec![],
            services: HashMap::new(),
            dir: None,
        }
    }
}

pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    if pki::provider().secure_random.fill(&mut b).is_err() {
        // Not expected with aws-lc; uniqueness (not secrecy) matters here.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
            .to_le_bytes();
        for (i, x) in b.iter_mut().enumerate() {
            *x = t[i % t.len()] ^ (i as u8);
        }
    }
    b
}

/// A random (version 4) UUID.
pub(crate) fn uuid() -> String {
    let mut b = random_bytes::<16>();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    outrigger_proto::inventory::uuid_string(&b)
}

enum Dir {
    Temp(tempfile::TempDir),
    Kept(PathBuf),
}

impl Dir {
    fn path(&self) -> &Path {
        match self {
            Dir::Temp(t) => t.path(),
            Dir::Kept(p) => p,
        }
    }
}

/// A running test API server. It runs on its own thread with its own
/// tokio runtime, so it serves sync and async tests alike; it stops when
/// dropped.
pub struct TestApiServer {
    url: String,
    ca_pem: String,
    kubeconfig: PathBuf,
    dir: Dir,
    shared: Arc<http::Shared>,
    ca: pki::Ca,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl TestApiServer {
    pub fn start() -> Result<TestApiServer> {
        TestApiServer::start_with(Options::default())
    }

    pub fn start_with(opts: Options) -> Result<TestApiServer> {
        let dir = match &opts.dir {
            Some(d) => {
                std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
                Dir::Kept(d.clone())
            }
            None => Dir::Temp(
                tempfile::Builder::new()
                    .prefix("test-apiserver")
                    .tempdir()?,
            ),
        };
        let listener = std::net::TcpListener::bind(opts.listen)
            .with_context(|| format!("binding {}", opts.listen))?;
        listener.set_nonblocking(true)?;
        let local = listener.local_addr()?;
        // Clients use the address we listen on, or loopback when that is
        // every address.
        let host: IpAddr = if local.ip().is_unspecified() {
            "127.0.0.1".parse()?
        } else {
            local.ip()
        };
        let address = SocketAddr::new(host, local.port()).to_string();
        let url = format!("https://{address}");

        let ca = pki::Ca::new()?;
        let extra: Vec<IpAddr> = [local.ip()]
            .into_iter()
            .filter(|ip| !ip.is_unspecified() && !ip.is_loopback())
            .collect();
        let (cert, key) = ca.server_cert(&extra)?;
        let tls = pki::server_tls(&ca, &cert, &key)?;

        let (admin_cert, admin_key) = ca.client_cert("outrigger-admin", &["system:masters"])?;
        let kubeconfig = dir.path().join("admin.kubeconfig");
        pki::write_kubeconfig(
            &kubeconfig,
            &url,
            &ca.cert_pem,
            "outrigger-admin",
            pki::Credential::Cert {
                cert_pem: &admin_cert,
                key_pem: &admin_key,
            },
        )?;

        let tokens = opts
            .tokens
            .iter()
            .map(|(t, u, g)| {
                (
                    t.clone(),
                    User {
                        name: u.clone(),
                        groups: g.clone(),
                    },
                )
            })
            .collect();
        let api = Arc::new(api::Api::new(
            opts.history,
            api::ApiOpts {
                bookmark_interval: opts.bookmark_interval,
                watch_timeout: opts.watch_timeout,
                services: opts.services.clone(),
            },
        ));
        let shared = Arc::new(http::Shared {
            api,
            tokens: Mutex::new(tokens),
            address,
            log: std::env::var("OUTRIGGER_APISERVER_LOG").is_ok_and(|v| !v.is_empty() && v != "0"),
        });

        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("test-apiserver")
            .enable_all()
            .build()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let s2 = shared.clone();
        let thread = std::thread::Builder::new()
            .name("test-apiserver".into())
            .spawn(move || {
                rt.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                        return;
                    };
                    tokio::select! {
                        _ = http::serve(listener, acceptor, s2) => {}
                        _ = stopped => {}
                    }
                });
                // Open watches end with the runtime.
                rt.shutdown_timeout(Duration::from_secs(1));
            })?;

        Ok(TestApiServer {
            url,
            ca_pem: ca.cert_pem.clone(),
            kubeconfig,
            dir,
            shared,
            ca,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// The admin kubeconfig: a client certificate for `outrigger-admin` in
    /// group `system:masters`.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The CA that signed the serving and client certificates (PEM).
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The directory kubeconfigs are written to.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Register `token` for `user` and write a kubeconfig that uses it.
    pub fn token_kubeconfig(&self, user: &str, token: &str) -> Result<PathBuf> {
        self.shared
            .tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                token.to_string(),
                User {
                    name: user.to_string(),
                    groups: vec![],
                },
            );
        let path = self.dir.path().join(format!("token-{user}.kubeconfig"));
        pki::write_kubeconfig(
            &path,
            &self.url,
            &self.ca_pem,
            user,
            pki::Credential::Token(token),
        )?;
        Ok(path)
    }

    /// A client certificate and key (PEM) for `user` in `groups`, signed by
    /// the server's CA.
    pub fn client_cert(&self, user: &str, groups: &[&str]) -> Result<(String, String)> {
        self.ca.client_cert(user, groups)
    }

    /// A kubeconfig using a fresh client certificate for `user`.
    pub fn cert_kubeconfig(&self, user: &str, groups: &[&str]) -> Result<PathBuf> {
        let (cert, key) = self.client_cert(user, groups)?;
        let path = self.dir.path().join(format!("cert-{user}.kubeconfig"));
        pki::write_kubeconfig(
            &path,
            &self.url,
            &self.ca_pem,
            user,
            pki::Credential::Cert {
                cert_pem: &cert,
                key_pem: &key,
            },
        )?;
        Ok(path)
    }

    /// `kubectl --kubeconfig <admin>`, with a discovery cache of its own.
    pub fn kubectl(&self) -> Command {
        kubectl_with(&self.kubeconfig, Some(&self.dir.path().join("kube-cache")))
    }
}

impl Drop for TestApiServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn kubectl_with(kubeconfig: &Path, cache: Option<&Path>) -> Command {
    let bin = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into());
    let mut c = Command::new(bin);
    c.arg("--kubeconfig").arg(kubeconfig);
    if let Some(dir) = cache {
        c.arg("--cache-dir").arg(dir);
    }
    c
}

/// A cluster to run scenarios against: the real one named by
/// `$OUTRIGGER_KUBECONFIG`, or a fresh [`TestApiServer`].
pub enum Cluster {
    Real { kubeconfig: PathBuf },
    Test(TestApiServer),
}

impl Cluster {
    pub fn from_env_or_test() -> Result<Cluster> {
        match std::env::var_os("OUTRIGGER_KUBECONFIG") {
            Some(k) if !k.is_empty() => Ok(Cluster::Real {
                kubeconfig: PathBuf::from(k),
            }),
            _ => {
                // Said once per test process (nextest: once per test).
                eprintln!(
                    "OUTRIGGER_KUBECONFIG not set: the real-cluster run is skipped; using the API server for tests"
                );
                Ok(Cluster::Test(TestApiServer::start()?))
            }
        }
    }

    pub fn kubeconfig(&self) -> &Path {
        match self {
            Cluster::Real { kubeconfig } => kubeconfig,
            Cluster::Test(s) => s.kubeconfig(),
        }
    }

    pub fn kubectl(&self) -> Command {
        match self {
            Cluster::Real { kubeconfig } => kubectl_with(kubeconfig, None),
            Cluster::Test(s) => s.kubectl(),
        }
    }

    pub fn is_real(&self) -> bool {
        matches!(self, Cluster::Real { .. })
    }
}
