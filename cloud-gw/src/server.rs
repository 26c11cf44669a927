//! The edge endpoint: TLS on one port, WebSockets on two paths.
//!
//! - `/join`: server-authenticated TLS (the node has no certificate yet; it
//!   trusts us through the CA pin in its token). Hello, then Join with a
//!   token and a CSR; the answer is a node certificate or the reason not.
//! - `/link`: mutual TLS with a node certificate from our CA. The Hello
//!   must name the node the certificate names.
//!
//! Every refusal is logged with the peer's address and the reason, and the
//! peer is told the reason where the protocol allows it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use outrigger_proto::message::{Control, Message, Status};
use outrigger_proto::ws::{ws_config, Link, LinkError};
use outrigger_proto::{negotiate, Version, VERSION};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;

use std::sync::atomic::Ordering::Relaxed;

use crate::keeper::Keeper;
use crate::metrics::METRICS;
use crate::pki::{Pki, NODE_ORG};
use crate::source::Source;
use crate::tokens::{self, Tokens};

/// How long a peer may take for the TLS and WebSocket handshakes and its
/// first message.
const HANDSHAKE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Each side pings at this period; two silent periods end the link.
    pub heartbeat: Duration,
    /// Lifetime of node certificates (they rotate at two thirds of it).
    pub node_cert_validity: Duration,
    /// How often the objects are looked at again for changes.
    pub rescan: Duration,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            heartbeat: Duration::from_secs(30),
            node_cert_validity: Duration::from_secs(90 * 86400),
            rescan: Duration::from_secs(30),
        }
    }
}

pub struct Gateway {
    keeper: Arc<dyn Keeper>,
    source: Arc<dyn Source>,
    pki: Pki,
    cfg: ServeConfig,
    tls: tokio_rustls::TlsAcceptor,
    /// The links held here, for streams to their nodes.
    links: Arc<crate::streams::Links>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Pki(#[from] crate::pki::PkiError),
    #[error("TLS setup: {0}")]
    Tls(String),
}

/// The node a client certificate names (CN, in organisation NODE_ORG).
fn node_of(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, c) = x509_parser::parse_x509_certificate(cert).ok()?;
    let org_ok = c
        .subject()
        .iter_organization()
        .any(|o| o.as_str().ok() == Some(NODE_ORG));
    let cn = c.subject().iter_common_name().next()?.as_str().ok()?;
    org_ok.then(|| cn.to_string())
}

type Ws = Link<TlsStream<TcpStream>>;

struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

/// Counts a link in the connected-nodes gauge for as long as it lives.
struct Connected;

impl Connected {
    fn new() -> Connected {
        METRICS.connected_nodes.fetch_add(1, Relaxed);
        Connected
    }
}

impl Drop for Connected {
    fn drop(&mut self) {
        METRICS.connected_nodes.fetch_sub(1, Relaxed);
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            t.abort();
        }
    }
}

async fn refuse(link: &mut Ws, peer: SocketAddr, what: &str, reason: String) {
    tracing::warn!(%peer, what, reason, "refused");
    let _ = link
        .send(&Message::Control(Control::Refused {
            reason: reason.clone(),
        }))
        .await;
    link.close(&reason).await;
}

impl Gateway {
    pub fn new(
        keeper: Arc<dyn Keeper>,
        source: Arc<dyn Source>,
        cfg: ServeConfig,
    ) -> Result<Gateway, ServeError> {
        let pki = Pki::load(keeper.as_ref())?;
        let ca = pki.ca_der()?;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(ca.clone())
            .map_err(|e| ServeError::Tls(e.to_string()))?;
        // Optional at the TLS layer so /join works without a certificate;
        // /link then insists. A certificate from another CA fails here.
        let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
            .allow_unauthenticated()
            .build()
            .map_err(|e| ServeError::Tls(e.to_string()))?;
        let cert = CertificateDer::from_pem_slice(pki.server_cert_pem.as_bytes())
            .map_err(|e| ServeError::Tls(format!("server certificate: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(pki.server_key_pem.as_bytes())
            .map_err(|e| ServeError::Tls(format!("server key: {e}")))?;
        // The CA goes in the chain: a joining node finds it there by its pin.
        let mut tls = rustls::ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![cert, ca], key)
            .map_err(|e| ServeError::Tls(e.to_string()))?;
        // Reconnects resume their TLS session: no certificates on the wire
        // again. One small ticket per handshake; sessions cached here
        // (about 1 KB each) for as many nodes as one process serves.
        tls.session_storage = rustls::server::ServerSessionMemoryCache::new(65536);
        tls.send_tls13_tickets = 1;
        Ok(Gateway {
            keeper,
            source,
            pki,
            cfg,
            tls: tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
            links: Default::default(),
        })
    }

    /// The links this replica holds (the kubelet endpoint opens streams on
    /// them).
    pub fn links(&self) -> Arc<crate::streams::Links> {
        self.links.clone()
    }

    pub fn pki(&self) -> &Pki {
        &self.pki
    }

    /// TLS for the admission webhook: the serving certificate, no client
    /// certificates (the API server trusts it by the CA in caBundle).
    pub fn webhook_tls(&self) -> Result<tokio_rustls::TlsAcceptor, ServeError> {
        let cert = CertificateDer::from_pem_slice(self.pki.server_cert_pem.as_bytes())
            .map_err(|e| ServeError::Tls(format!("server certificate: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(self.pki.server_key_pem.as_bytes())
            .map_err(|e| ServeError::Tls(format!("server key: {e}")))?;
        let mut tls = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![cert, self.pki.ca_der()?], key)
            .map_err(|e| ServeError::Tls(e.to_string()))?;
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(tls)))
    }

    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok((tcp, peer)) => {
                    let _ = tcp.set_nodelay(true);
                    tokio::spawn(self.clone().connection(tcp, peer));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    async fn connection(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr) {
        let tls = match tokio::time::timeout(HANDSHAKE, self.tls.accept(tcp)).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                tracing::warn!(%peer, error = %e, "TLS handshake failed (not a TLS client, or a certificate we do not trust)");
                return;
            }
            Err(_) => {
                tracing::warn!(%peer, "no TLS handshake within 10 s");
                return;
            }
        };
        let node = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(node_of);
        let mut path = String::new();
        // tungstenite's callback type fixes this Result's shape.
        #[allow(clippy::result_large_err)]
        let callback = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
            path = req.uri().path().to_string();
            let deny = |code: StatusCode, msg: &str| {
                let mut r = ErrorResponse::new(Some(msg.to_string()));
                *r.status_mut() = code;
                r
            };
            match (path.as_str(), &node) {
                ("/join", _) => Ok(resp),
                ("/link", Some(Some(_))) => Ok(resp),
                ("/link", Some(None)) => Err(deny(
                    StatusCode::FORBIDDEN,
                    "this certificate does not name a node",
                )),
                ("/link", None) => Err(deny(
                    StatusCode::UNAUTHORIZED,
                    "a node certificate is required on /link (run edge-rt join first)",
                )),
                _ => Err(deny(
                    StatusCode::NOT_FOUND,
                    "no such endpoint (/join, /link)",
                )),
            }
        };
        let ws = match tokio::time::timeout(
            HANDSHAKE,
            tokio_tungstenite::accept_hdr_async_with_config(tls, callback, Some(ws_config())),
        )
        .await
        {
            Ok(Ok(ws)) => ws,
            Ok(Err(e)) => {
                tracing::warn!(%peer, path, error = %e, "refused at the WebSocket upgrade");
                return;
            }
            Err(_) => {
                tracing::warn!(%peer, "no WebSocket upgrade within 10 s");
                return;
            }
        };
        let mut link = Link::new(ws);
        match (path.as_str(), node.flatten()) {
            ("/join", _) => self.join(&mut link, peer).await,
            ("/link", Some(name)) => self.link(&mut link, peer, name).await,
            _ => {}
        }
    }

    /// Hello, then the version both speak (or a refusal naming both).
    async fn hello(&self, link: &mut Ws, peer: SocketAddr) -> Option<(String, Version)> {
        let first = tokio::time::timeout(HANDSHAKE, link.recv()).await;
        let (version, node) = match first {
            Ok(Ok(Message::Control(Control::Hello { version, node }))) => (version, node),
            Ok(Ok(other)) => {
                refuse(
                    link,
                    peer,
                    "hello",
                    format!("expected hello, got {other:?}"),
                )
                .await;
                return None;
            }
            Ok(Err(e)) => {
                tracing::warn!(%peer, error = %e, "no hello");
                return None;
            }
            Err(_) => {
                refuse(link, peer, "hello", "no hello within 10 s".into()).await;
                return None;
            }
        };
        match negotiate(VERSION, version) {
            Ok(v) => {
                let welcome = Message::Control(Control::Welcome {
                    version: v,
                    heartbeat_secs: self.cfg.heartbeat.as_secs() as u32,
                });
                link.send(&welcome).await.ok()?;
                Some((node, v))
            }
            Err(e) => {
                refuse(link, peer, "hello", e.to_string()).await;
                None
            }
        }
    }

    async fn join(&self, link: &mut Ws, peer: SocketAddr) {
        if self.hello(link, peer).await.is_none() {
            return;
        }
        let (token_id, token_secret, node, labels, csr_pem) =
            match tokio::time::timeout(HANDSHAKE, link.recv()).await {
                Ok(Ok(Message::Control(Control::Join {
                    token_id,
                    token_secret,
                    node,
                    labels,
                    csr_pem,
                }))) => (token_id, token_secret, node, labels, csr_pem),
                _ => {
                    refuse(link, peer, "join", "expected a join request".into()).await;
                    return;
                }
            };
        let tokens = Tokens::new(self.keeper.as_ref());
        if let Err(e) = tokens.check(&token_id, &token_secret, tokens::now()) {
            let what = format!("join of node {node:?} with token {token_id}");
            refuse(link, peer, &what, e.to_string()).await;
            return;
        }
        match self
            .pki
            .issue_node(&node, &csr_pem, self.cfg.node_cert_validity)
        {
            Ok(cert_pem) => {
                // The Node exists before the node's first link.
                if let Err(e) = self.source.joined(&node, &labels).await {
                    refuse(
                        link,
                        peer,
                        "join",
                        format!("registering node {node:?}: {e}"),
                    )
                    .await;
                    return;
                }
                tracing::info!(%peer, node, token = token_id, "node joined");
                let _ = link
                    .send(&Message::Control(Control::Certificate { cert_pem }))
                    .await;
                link.close("joined").await;
            }
            Err(e) => refuse(link, peer, "join", e.to_string()).await,
        }
    }

    async fn link(&self, link: &mut Ws, peer: SocketAddr, node: String) {
        let Some((claimed, version)) = self.hello(link, peer).await else {
            return;
        };
        if claimed != node {
            let reason = format!("this certificate is node {node:?}'s, not {claimed:?}'s");
            refuse(link, peer, "link", reason).await;
            return;
        }
        tracing::info!(%peer, node, "node connected");
        let silence = self.cfg.heartbeat * 2;
        let mut tick = tokio::time::interval(self.cfg.heartbeat);
        tick.tick().await;
        let mut rescan = tokio::time::interval(self.cfg.rescan);
        rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // What the node's pods need made first (service account tokens),
        // so the first look at its objects finds them.
        self.source.prepare(&node).await;
        let mut sync = crate::sync::Session::new(&node, self.source.as_ref(), version);
        let mut pushed = self.source.subscribe(&node);
        // Lease and node status while the link is up; stopped with it, so
        // the cluster sees the node go unreachable on its own schedule.
        let _alive = AbortOnDrop(self.source.connected(&node));
        let _counted = Connected::new();
        // Streams to this node (kubectl logs) go through this loop.
        let (_attached, mut stream_cmds) = self.links.attach(&node, version.minor);
        let mut mux = crate::streams::Mux::default();
        loop {
            while let Some(m) = sync.next_message() {
                if link.send(&m).await.is_err() {
                    return;
                }
            }
            // Changes for the node first, then what it sends, then
            // streams: a busy stream never holds sync or status up.
            tokio::select! {
                biased;
                Ok(()) = pushed.changed() => sync.refresh(),
                // The node pings every heartbeat and we answer: one ping
                // and one pong a period keeps idle links at a few dozen
                // bytes a minute each way, and both sides see silence.
                _ = tick.tick() => {
                    if link.idle() > silence {
                        tracing::warn!(node, secs = silence.as_secs(), "node silent for two heartbeats; dropping the link");
                        return;
                    }
                }
                _ = rescan.tick() => sync.refresh(),
                m = link.recv() => match m {
                    Ok(Message::Control(Control::RenewCertificate { csr_pem })) => {
                        match self.pki.issue_node(&node, &csr_pem, self.cfg.node_cert_validity) {
                            Ok(cert_pem) => {
                                tracing::info!(node, "node certificate renewed");
                                if link.send(&Message::Control(Control::Certificate { cert_pem })).await.is_err() {
                                    break;
                                }
                            }
                            Err(e) => tracing::warn!(node, error = %e, "renewal refused"),
                        }
                    }
                    Ok(Message::Status(Status::Rows { rows })) => {
                        let seqs = self.source.record(&node, rows).await;
                        if link.send(&Message::Status(Status::Ack { seqs })).await.is_err() {
                            return;
                        }
                    }
                    Ok(Message::Stream { channel, msg }) => {
                        if let Some(answer) = mux.inbound(channel, msg) {
                            if link.send(&answer).await.is_err() {
                                return;
                            }
                        }
                    }
                    Ok(m) => {
                        if let Some(answer) = sync.handle(m) {
                            if link.send(&answer).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(LinkError::Closed(r)) => {
                        tracing::info!(node, reason = r.unwrap_or_default(), "node disconnected");
                        return;
                    }
                    Err(e) => {
                        tracing::info!(node, error = %e, "node link broken");
                        return;
                    }
                },
                Some(cmd) = stream_cmds.recv() => {
                    if let Some(m) = mux.command(cmd, &node) {
                        if link.send(&m).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    }
}
