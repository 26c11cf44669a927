//! The actions probes and lifecycle hooks perform: exec in the container,
//! HTTP GET and TCP connect in the pod's network namespace, sleep. One
//! implementation serves liveness, readiness and startup probes, postStart
//! and preStop.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    Container, ExecAction, HTTPGetAction, LifecycleHandler, Probe, TCPSocketAction,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::runtime::Runtime;

/// Output kept from an exec action for messages (the kubelet keeps 10 KiB).
const MAX_OUTPUT: usize = 10 * 1024;

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Exec(Vec<String>),
    HttpGet {
        host: Option<String>,
        port: u16,
        path: String,
        https: bool,
        headers: Vec<(String, String)>,
    },
    Tcp {
        host: Option<String>,
        port: u16,
    },
    Sleep(Duration),
}

/// A port given by number or by the name of one of the container's ports.
fn port(p: &IntOrString, c: &Container) -> Result<u16, String> {
    match p {
        IntOrString::Int(n) => u16::try_from(*n)
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("port {n} is out of range")),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|cp| cp.name.as_deref() == Some(name.as_str()))
            .and_then(|cp| u16::try_from(cp.container_port).ok())
            .ok_or_else(|| format!("container {} has no port named {name}", c.name)),
    }
}

fn exec(e: &ExecAction) -> Result<Action, String> {
    match e.command.as_ref().filter(|c| !c.is_empty()) {
        Some(c) => Ok(Action::Exec(c.clone())),
        None => Err("exec: command is empty".into()),
    }
}

fn http(h: &HTTPGetAction, c: &Container) -> Result<Action, String> {
    Ok(Action::HttpGet {
        host: h.host.clone().filter(|h| !h.is_empty()),
        port: port(&h.port, c)?,
        path: h.path.clone().unwrap_or_else(|| "/".into()),
        https: h.scheme.as_deref() == Some("HTTPS"),
        headers: h
            .http_headers
            .iter()
            .flatten()
            .map(|h| (h.name.clone(), h.value.clone()))
            .collect(),
    })
}

fn tcp(t: &TCPSocketAction, c: &Container) -> Result<Action, String> {
    Ok(Action::Tcp {
        host: t.host.clone().filter(|h| !h.is_empty()),
        port: port(&t.port, c)?,
    })
}

impl Action {
    pub fn of_probe(p: &Probe, c: &Container) -> Result<Action, String> {
        if let Some(e) = &p.exec {
            exec(e)
        } else if let Some(h) = &p.http_get {
            http(h, c)
        } else if let Some(t) = &p.tcp_socket {
            tcp(t, c)
        } else if p.grpc.is_some() {
            Err("grpc probes are not supported by edge-rt".into())
        } else {
            Err("the probe has no action".into())
        }
    }

    pub fn of_hook(h: &LifecycleHandler, c: &Container) -> Result<Action, String> {
        if let Some(e) = &h.exec {
            exec(e)
        } else if let Some(g) = &h.http_get {
            http(g, c)
        } else if let Some(t) = &h.tcp_socket {
            tcp(t, c)
        } else if let Some(s) = &h.sleep {
            Ok(Action::Sleep(Duration::from_secs(s.seconds.max(0) as u64)))
        } else {
            Err("the hook has no action".into())
        }
    }
}

/// Where an action runs: the container and its pod's network.
pub struct Target<'a> {
    pub rt: &'a Runtime,
    pub container_id: &'a str,
    /// The pod's network namespace (None: the host's, for hostNetwork).
    pub netns: Option<PathBuf>,
    /// The pod's IP, the default host for HTTP and TCP actions.
    pub pod_ip: Option<IpAddr>,
}

/// Connect to `addr` from inside `netns`: a short thread enters the
/// namespace just to make the socket (which stays in that namespace); the
/// connect itself is async, so the thread never waits on the network
/// (container creation waits for threads, see `sys`).
pub(crate) async fn connect(
    netns: Option<PathBuf>,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<tokio::net::TcpStream, String> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let make = move || -> std::io::Result<std::os::fd::OwnedFd> {
        if let Some(ns) = &netns {
            let f = std::fs::File::open(ns)?;
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)?;
        }
        let flags = SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK;
        Ok(socket(family, SockType::Stream, flags, None)?)
    };
    let fd = crate::sys::thread("probe-socket", make)
        .map_err(|e| format!("dial tcp {addr}: {e}"))?
        .join()
        .map_err(|_| "the socket thread died".to_string())?
        .map_err(|e| format!("dial tcp {addr}: {e}"))?;
    let socket = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(fd));
    match tokio::time::timeout(timeout, socket.connect(addr)).await {
        Ok(r) => r.map_err(|e| format!("dial tcp {addr}: {e}")),
        Err(_) => Err(format!("dial tcp {addr}: i/o timeout")),
    }
}

fn resolve(host: &Option<String>, target: &Target, port: u16) -> Result<SocketAddr, String> {
    let ip = match host {
        Some(h) => h
            .parse::<IpAddr>()
            .map_err(|_| format!("host {h:?} is not an IP address (names are not resolved)"))?,
        None => target.pod_ip.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
    };
    Ok(SocketAddr::new(ip, port))
}

/// The kubelet does not verify a probe's server certificate (a pod's
/// certificate names a service, not its IP): neither do we. Signatures are
/// still checked, so the handshake is real TLS.
#[derive(Debug)]
struct AnyServerCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServerCert {
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
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

async fn tls(
    stream: tokio::net::TcpStream,
    addr: SocketAddr,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServerCert(provider)))
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls::pki_types::ServerName::IpAddress(addr.ip().into()),
            stream,
        )
        .await
        .map_err(|e| format!("TLS handshake with {addr}: {e}"))
}

/// One GET over an open connection; Ok for 2xx and 3xx, as the kubelet counts.
async fn get<S>(
    stream: S,
    url: &str,
    addr: SocketAddr,
    path: &str,
    headers: &[(String, String)],
) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use http_body_util::{BodyExt, Empty};
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("Get \"{url}\": {e}"))?;
    tokio::spawn(conn);
    let mut req = hyper::Request::get(path)
        .header("host", addr.to_string())
        .header("user-agent", "kube-probe/1.32 (edge-rt)")
        .header("accept", "*/*");
    for (k, v) in headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let req = req
        .body(Empty::<hyper::body::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("Get \"{url}\": {e}"))?;
    let status = resp.status();
    if status.is_success() || status.is_redirection() {
        return Ok(());
    }
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body = String::from_utf8_lossy(&body[..body.len().min(MAX_OUTPUT)]).into_owned();
    Err(format!(
        "HTTP probe failed with statuscode: {}{}",
        status.as_u16(),
        if body.is_empty() {
            String::new()
        } else {
            format!(": {body}")
        }
    ))
}

async fn http_get(
    target: &Target<'_>,
    host: &Option<String>,
    port: u16,
    path: &str,
    https: bool,
    headers: &[(String, String)],
    timeout: Duration,
) -> Result<(), String> {
    let addr = resolve(host, target, port)?;
    let stream = connect(target.netns.clone(), addr, timeout).await?;
    let scheme = if https { "https" } else { "http" };
    let url = format!("{scheme}://{addr}{path}");
    if https {
        get(tls(stream, addr).await?, &url, addr, path, headers).await
    } else {
        get(stream, &url, addr, path, headers).await
    }
}

/// Perform `action` within `timeout`; Err carries the failure as the
/// kubelet words it.
pub async fn run(action: &Action, target: &Target<'_>, timeout: Duration) -> Result<(), String> {
    let work = async {
        match action {
            Action::Exec(cmd) => {
                match target
                    .rt
                    .exec_capture(target.container_id, cmd, timeout, MAX_OUTPUT)
                    .await
                    .map_err(|e| crate::pods::describe(&e))?
                {
                    Some((0, _)) => Ok(()),
                    Some((code, out)) => Err(format!(
                        "command {cmd:?} exited with {code}: {}",
                        out.trim_end()
                    )),
                    None => Err(format!("command {cmd:?} timed out")),
                }
            }
            Action::HttpGet {
                host,
                port,
                path,
                https,
                headers,
            } => http_get(target, host, *port, path, *https, headers, timeout).await,
            Action::Tcp { host, port } => {
                let addr = resolve(host, target, *port)?;
                connect(target.netns.clone(), addr, timeout)
                    .await
                    .map(|_| ())
            }
            Action::Sleep(d) => {
                tokio::time::sleep(*d).await;
                Ok(())
            }
        }
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(format!("timeout after {}s", timeout.as_secs_f64())),
    }
}
