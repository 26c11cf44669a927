//! The kubelet API of the edge nodes this replica holds links to, as the
//! API server (and metrics scrapers) call a kubelet:
//!
//! - `/containerLogs/{ns}/{pod}/{container}`: the log comes from the pod's
//!   node down a stream of its link ([`crate::streams`]);
//! - `/exec`, `/attach` ([`exec`]): a WebSocket (v5, when the Node declares
//!   `ExtendWebSocketsToKubelet` the API server passes kubectl's on as it
//!   is) or SPDY (an API server translating, or kubectl's fallback);
//! - `/portForward` ([`portforward`]): SPDY, raw or inside a WebSocket;
//! - `/stats/summary`, `/metrics/resource` ([`stats`]): measured on the
//!   node when asked; `/healthz`.
//!
//! How callers get here ([`ports`]): each Node's status carries this
//! replica's address (types Hostname and InternalIP, which the API server
//! and metrics-server try first) and a port of the node's own
//! (`daemonEndpoints.kubeletEndpoint.Port`), written by the replica that
//! holds the node's link, so the address follows the link and the port
//! says which node a request without a pod in its path is about. A path
//! that names a pod is served for the pod's node, as the cache has it.
//!
//! Who may: as a kubelet with `--authentication-token-webhook` and
//! `--authorization-mode=Webhook`. A client certificate from the cluster's
//! client CA (the API server's kubelet client certificate), or a bearer
//! token the API server's TokenReview accepts, says who is asking; a
//! SubjectAccessReview on the node (resource `nodes`, subresource `proxy`
//! for what names a pod, `stats` and `metrics` for those paths, the verb
//! from the method) says whether they may. Anything else gets 401 or 403.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::PostParams;
use kube::Api;
use outrigger_proto::stream::{LogRequest, Request as StreamRequest, StreamMsg};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::Digest as _;
use tokio::net::TcpListener;

use crate::streams::{Links, Stream};

pub mod exec;
pub mod portforward;
pub mod ports;
pub mod spdy;
mod stats;
mod upgrade;

use upgrade::Upgrade;

/// What a Node served here declares (sorted, as the API server requires):
/// exec and attach WebSockets come through as they are.
pub const DECLARED_FEATURES: &[&str] = &["ExtendWebSocketsToKubelet"];

/// Allowed answers are kept this long, denials this long (a kubelet's
/// webhook authorizer defaults).
const ALLOWED_TTL: Duration = Duration::from_secs(300);
const DENIED_TTL: Duration = Duration::from_secs(30);
/// TokenReview answers are kept this long (a kubelet's webhook
/// authenticator default).
const REVIEW_TTL: Duration = Duration::from_secs(120);

type Body = BoxBody<Bytes, std::io::Error>;

/// How long a node may take to start a stream (a kubelet's stream
/// creation timeout).
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(30);

/// An exec, attach or forwarded connection with nothing either way this
/// long ends (a kubelet's default `--streaming-connection-idle-timeout`).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(4 * 3600);

/// Where a pod runs, as the caches have it.
pub trait Pods: Send + Sync + 'static {
    /// The node and uid of a pod bound to an edge node.
    fn locate(&self, namespace: &str, name: &str) -> Option<(String, String)>;
}

#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    #[error("TLS setup of the kubelet endpoint: {0}")]
    Tls(String),
}

/// Who is asking.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct User {
    name: String,
    groups: Vec<String>,
    uid: Option<String>,
}

/// A bearer token's SHA-256.
type TokenHash = [u8; 32];

/// What a SubjectAccessReview asks: (user, verb, subresource, node).
type Asked = (User, String, String, String);

pub struct Kubelet {
    links: Arc<Links>,
    pods: Arc<dyn Pods>,
    client: kube::Client,
    /// Recent SubjectAccessReview answers.
    decided: Mutex<HashMap<Asked, (bool, Instant)>>,
    /// Recent TokenReview answers, by the token's SHA-256 (the token
    /// itself is not kept).
    reviewed: Mutex<HashMap<TokenHash, (Option<User>, Instant)>>,
}

/// cloud-gw's serving certificate, its key, and the CA that signed it.
pub struct Serving {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca: CertificateDer<'static>,
}

/// TLS of the endpoint: the serving certificate; client certificates
/// verified against the cluster's client CA, optional so that bearer
/// tokens work too.
fn tls(serving: &Serving, client_ca_pem: &str) -> Result<tokio_rustls::TlsAcceptor, KubeletError> {
    let err = |e: &dyn std::fmt::Display| KubeletError::Tls(e.to_string());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(client_ca_pem.as_bytes()) {
        roots.add(c.map_err(|e| err(&e))?).map_err(|e| err(&e))?;
    }
    if roots.is_empty() {
        return Err(KubeletError::Tls(
            "the client CA holds no certificate".into(),
        ));
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
        .allow_unauthenticated()
        .build()
        .map_err(|e| err(&e))?;
    let cert = CertificateDer::from_pem_slice(serving.cert_pem.as_bytes()).map_err(|e| err(&e))?;
    let key = PrivateKeyDer::from_pem_slice(serving.key_pem.as_bytes()).map_err(|e| err(&e))?;
    let mut c = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![cert, serving.ca.clone()], key)
        .map_err(|e| err(&e))?;
    // Upgrades (exec, attach, port-forward) are HTTP/1.1 only.
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(c)))
}

/// The user a client certificate names: CN, and O as groups (as the API
/// server reads its own client certificates).
fn user_of(cert: &CertificateDer<'_>) -> Option<User> {
    let (_, c) = x509_parser::parse_x509_certificate(cert).ok()?;
    let name = c
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    let groups = c
        .subject()
        .iter_organization()
        .filter_map(|o| o.as_str().ok().map(str::to_string))
        .collect();
    Some(User {
        name,
        groups,
        uid: None,
    })
}

fn text(code: StatusCode, body: impl Into<String>) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(body.into()))
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *r.status_mut() = code;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The verb a kubelet authorizes a request as.
fn verb(m: &Method) -> &'static str {
    match *m {
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE => "delete",
        _ => "get",
    }
}

/// `/containerLogs` query parameters to a log request.
pub fn log_request(
    namespace: &str,
    pod: &str,
    container: &str,
    query: &str,
    now_unix: i64,
) -> Result<LogRequest, String> {
    let mut r = LogRequest {
        namespace: namespace.into(),
        pod: pod.into(),
        container: container.into(),
        ..Default::default()
    };
    let flag = |v: &str| matches!(v, "true" | "1" | "True");
    let num = |k: &str, v: &str| {
        v.parse::<i64>()
            .ok()
            .filter(|n| *n >= 0)
            .ok_or_else(|| format!("{k}: not a number of zero or more: {v:?}"))
    };
    let mut since_seconds = None;
    let mut since_time = None;
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match k.as_ref() {
            "follow" => r.follow = flag(&v),
            "previous" => r.previous = flag(&v),
            "timestamps" => r.timestamps = flag(&v),
            "tailLines" => r.tail_lines = Some(num(&k, &v)? as u64),
            "limitBytes" => r.limit_bytes = Some(num(&k, &v)? as u64),
            "sinceSeconds" => since_seconds = Some(num(&k, &v)?),
            "sinceTime" => {
                let t: jiff::Timestamp = v
                    .parse()
                    .map_err(|e| format!("sinceTime: not an RFC 3339 time: {v:?}: {e}"))?;
                since_time = Some(t.as_second());
            }
            _ => {}
        }
    }
    r.since_unix = match (since_seconds, since_time) {
        (Some(_), Some(_)) => return Err("at most one of sinceTime or sinceSeconds".into()),
        (Some(s), None) => Some(now_unix - s),
        (None, t) => t,
    };
    Ok(r)
}

/// A status line for an error a stream ended with.
fn code(c: u16) -> StatusCode {
    StatusCode::from_u16(c).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// A log as a response body: bytes as they come from the edge, credited
/// back as hyper takes them, so the edge sends no faster than the client
/// reads. A link lost midway fails the body (the API server sees the
/// response cut, not a clean end).
struct LogBody {
    stream: Stream,
}

impl hyper::body::Body for LogBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        loop {
            return match self.stream.poll_recv(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Some(StreamMsg::Data { bytes })) => {
                    self.stream.credit(bytes.len());
                    if bytes.is_empty() {
                        continue;
                    }
                    Poll::Ready(Some(Ok(Frame::data(Bytes::from(bytes)))))
                }
                Poll::Ready(Some(StreamMsg::End { error: None })) => Poll::Ready(None),
                Poll::Ready(Some(StreamMsg::End { error: Some(e) })) => {
                    Poll::Ready(Some(Err(std::io::Error::other(e.message))))
                }
                Poll::Ready(Some(_)) => continue,
                Poll::Ready(None) => Poll::Ready(Some(Err(std::io::Error::other(
                    "the edge node's link was lost",
                )))),
            };
        }
    }
}

impl Kubelet {
    pub fn new(links: Arc<Links>, pods: Arc<dyn Pods>, client: kube::Client) -> Kubelet {
        Kubelet {
            links,
            pods,
            client,
            decided: Mutex::new(HashMap::new()),
            reviewed: Mutex::new(HashMap::new()),
        }
    }

    /// Serve the nodes' ports (as [`ports::Ports`] opens them) once the
    /// client CA is known: `client_ca`, or the cluster's, which the API
    /// server publishes shortly after it starts (until then the endpoint
    /// waits; edges are served meanwhile).
    pub async fn start(
        self: Arc<Self>,
        mut opened: tokio::sync::mpsc::UnboundedReceiver<ports::Opened>,
        serving: Serving,
        client_ca: Option<String>,
    ) {
        let client_ca = match client_ca {
            Some(ca) => ca,
            None => loop {
                match cluster_client_ca(self.client.clone()).await {
                    Ok(ca) if !ca.is_empty() => break ca,
                    Ok(_) => tracing::warn!(
                        "no client-ca-file in kube-system/extension-apiserver-authentication yet; the kubelet endpoint waits"
                    ),
                    Err(e) => tracing::warn!(
                        error = %e,
                        "cannot read the cluster's client CA (kube-system/extension-apiserver-authentication; or give --kubelet-client-ca); the kubelet endpoint waits"
                    ),
                }
                tokio::time::sleep(Duration::from_secs(5)).await;
            },
        };
        let tls = match tls(&serving, &client_ca) {
            Ok(tls) => tls,
            Err(e) => {
                tracing::error!(error = %e, "kubelet endpoint not started");
                return;
            }
        };
        tracing::info!("kubelet endpoint of edge nodes: a port per node");
        while let Some(o) = opened.recv().await {
            let me = self.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let mut close = o.close;
                tokio::select! {
                    _ = me.serve(o.listener, o.node, tls) => {}
                    _ = &mut close => {}
                }
            });
        }
    }

    /// Accept on one node's port.
    async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        node: String,
        tls: tokio_rustls::TlsAcceptor,
    ) {
        let node: Arc<str> = node.into();
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept (kubelet)");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let me = self.clone();
            let tls = tls.clone();
            let node = node.clone();
            tokio::spawn(async move {
                let s = match tokio::time::timeout(Duration::from_secs(10), tls.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "kubelet endpoint: TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
                let _ = s.get_ref().0.set_nodelay(true);
                let cert_user = s
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(user_of);
                let svc = hyper::service::service_fn(move |r| {
                    let me = me.clone();
                    let cert_user = cert_user.clone();
                    let node = node.clone();
                    async move { Ok::<_, Infallible>(me.handle(cert_user, peer, &node, r).await) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .with_upgrades()
                    .await
                {
                    tracing::debug!(%peer, error = %e, "kubelet endpoint connection");
                }
            });
        }
    }

    /// A request on `node`'s port.
    async fn handle(
        &self,
        cert_user: Option<User>,
        peer: SocketAddr,
        node: &str,
        req: Request<Incoming>,
    ) -> Response<Body> {
        let user = match cert_user {
            Some(u) => u,
            None => match self.token_user(&req).await {
                Ok(Some(u)) => u,
                Ok(None) => return text(StatusCode::UNAUTHORIZED, "Unauthorized\n"),
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "TokenReview failed");
                    return text(StatusCode::UNAUTHORIZED, "Unauthorized\n");
                }
            },
        };
        let path = req.uri().path().to_string();
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        match parts.as_slice() {
            ["healthz"] => text(StatusCode::OK, "ok"),
            ["stats", "summary"] | ["metrics", "resource"] => {
                let summary = path == "/stats/summary";
                self.stats(&user, &req, node, summary).await
            }
            ["containerLogs", ns, pod, container] => {
                self.logs(&user, &req, ns, pod, container).await
            }
            // With or without the pod's uid before the container, as a
            // kubelet routes them.
            [kind @ ("exec" | "attach"), ns, pod, .., container] if parts.len() <= 5 => {
                let attach = *kind == "attach";
                let (ns, pod, container) = (ns.to_string(), pod.to_string(), container.to_string());
                self.session(&user, req, &ns, &pod, &container, attach).await
            }
            ["portForward", ns, pod] | ["portForward", ns, pod, _] => {
                let (ns, pod) = (ns.to_string(), pod.to_string());
                self.port_forward(&user, req, &ns, &pod).await
            }
            _ => text(
                StatusCode::NOT_FOUND,
                format!("404 page not found: {path} (this endpoint serves /containerLogs, /exec, /attach, /portForward, /stats/summary, /metrics/resource and /healthz)\n"),
            ),
        }
    }

    /// The node and uid of the pod a request names, if `user` may reach
    /// it there (a kubelet's `proxy` subresource); else the answer.
    async fn place(
        &self,
        user: &User,
        method: &Method,
        ns: &str,
        pod: &str,
    ) -> Result<(String, String), Response<Body>> {
        let Some((node, uid)) = self.pods.locate(ns, pod) else {
            return Err(text(
                StatusCode::NOT_FOUND,
                format!("pod \"{pod}\" does not exist\n"),
            ));
        };
        match self.authorize(user, method, "proxy", &node).await {
            Some(denied) => Err(denied),
            None => Ok((node, uid)),
        }
    }

    async fn logs(
        &self,
        user: &User,
        req: &Request<Incoming>,
        ns: &str,
        pod: &str,
        container: &str,
    ) -> Response<Body> {
        let (node, uid) = match self.place(user, req.method(), ns, pod).await {
            Ok(p) => p,
            Err(answer) => return answer,
        };
        let now = jiff::Timestamp::now().as_second();
        let mut lr = match log_request(ns, pod, container, req.uri().query().unwrap_or(""), now) {
            Ok(r) => r,
            Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")),
        };
        lr.uid = uid;
        // 500, not 503: the API server passes a 500's text on to kubectl
        // (a 503's it replaces with "unable to handle the request").
        let mut stream = match self.links.open(&node, StreamRequest::Logs(lr)).await {
            Ok(s) => s,
            Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        };
        // The edge says whether it has that log before any byte of it.
        let first = tokio::time::timeout(OPEN_TIMEOUT, async {
            loop {
                match stream.recv().await {
                    Some(StreamMsg::Opened) => return None,
                    Some(StreamMsg::End { error: Some(e) }) => {
                        return Some(text(code(e.code), format!("{}\n", e.message)))
                    }
                    Some(StreamMsg::End { error: None }) => return Some(text(StatusCode::OK, "")),
                    Some(_) => continue,
                    None => {
                        return Some(text(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            format!("the link of node {node:?} was lost\n"),
                        ))
                    }
                }
            }
        })
        .await;
        match first {
            Ok(None) => {}
            Ok(Some(answer)) => return answer,
            Err(_) => {
                return text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!(
                        "node {node:?} did not answer within {} s\n",
                        OPEN_TIMEOUT.as_secs()
                    ),
                )
            }
        }
        let mut r = Response::new(LogBody { stream }.boxed());
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("text/plain"),
        );
        r
    }

    /// exec and attach (`attach`): a WebSocket (v5) or SPDY (v4) session
    /// with a process of the container, through an exec or attach stream
    /// of the node's link.
    async fn session(
        &self,
        user: &User,
        mut req: Request<Incoming>,
        ns: &str,
        pod: &str,
        container: &str,
        attach: bool,
    ) -> Response<Body> {
        let (node, uid) = match self.place(user, req.method(), ns, pod).await {
            Ok(p) => p,
            Err(answer) => return answer,
        };
        let query = req.uri().query().unwrap_or("");
        let mut er = match exec::exec_request(ns, pod, container, query, attach) {
            Ok(r) => r,
            Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")),
        };
        er.uid = uid;
        let what = if attach { "attach" } else { "exec" };
        let Some(up) = Upgrade::of(req.headers()) else {
            return text(
                StatusCode::BAD_REQUEST,
                format!(
                    "{what} needs an upgrade to a WebSocket ({}) or SPDY/3.1 ({})\n",
                    exec::V5,
                    exec::V4
                ),
            );
        };
        let protocol = match up.choose(exec::V5, exec::V4) {
            Ok(p) => p,
            Err(refused) => return *refused,
        };
        let spdy = !up.is_websocket();
        tracing::info!(node, namespace = ns, pod, container, command = ?er.command, stdin = er.stdin, tty = er.tty, spdy, user = user.name, "{what}");
        // The stream opens before the answer, so a node out of reach is a
        // plain HTTP error; whether the command runs comes in the session.
        let request = if attach {
            StreamRequest::Attach(er.clone())
        } else {
            StreamRequest::Exec(er.clone())
        };
        let stream = match self.links.open(&node, request).await {
            Ok(s) => s,
            Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        };
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            match upgrade.await {
                Ok(u) if spdy => exec::over_spdy(u, stream, node, er).await,
                Ok(u) => exec::over_websocket(u, stream, node).await,
                Err(e) => tracing::debug!(error = %e, "{what}: the upgrade did not complete"),
            }
        });
        up.accept(protocol)
    }

    /// port-forward: SPDY, raw or inside a WebSocket; each forwarded
    /// connection a port-forward stream of the node's link.
    async fn port_forward(
        &self,
        user: &User,
        mut req: Request<Incoming>,
        ns: &str,
        pod: &str,
    ) -> Response<Body> {
        let (node, uid) = match self.place(user, req.method(), ns, pod).await {
            Ok(p) => p,
            Err(answer) => return answer,
        };
        let Some(up) = Upgrade::of(req.headers()) else {
            return text(
                StatusCode::BAD_REQUEST,
                format!(
                    "port-forward needs an upgrade to SPDY/3.1 ({}) or a WebSocket ({})\n",
                    portforward::PROTOCOL,
                    portforward::WS_PROTOCOL
                ),
            );
        };
        let protocol = match up.choose(portforward::WS_PROTOCOL, portforward::PROTOCOL) {
            Ok(p) => p,
            Err(refused) => return *refused,
        };
        let ws = up.is_websocket();
        if !self.links.is_connected(&node) {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("{}\n", crate::streams::OpenError::NotConnected(node)),
            );
        }
        tracing::info!(
            node,
            namespace = ns,
            pod,
            websocket = ws,
            user = user.name,
            "port-forward"
        );
        let target = portforward::Target {
            links: self.links.clone(),
            node,
            namespace: ns.to_string(),
            pod: pod.to_string(),
            uid,
        };
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            match upgrade.await {
                Ok(u) if ws => portforward::over_websocket(u, target).await,
                Ok(u) => portforward::serve(TokioIo::new(u), target).await,
                Err(e) => tracing::debug!(error = %e, "port-forward: the upgrade did not complete"),
            }
        });
        up.accept(protocol)
    }

    /// `/stats/summary` (JSON) or `/metrics/resource` (Prometheus) of the
    /// node whose port was called, measured on the node now.
    async fn stats(
        &self,
        user: &User,
        req: &Request<Incoming>,
        node: &str,
        summary: bool,
    ) -> Response<Body> {
        let sub = if summary { "stats" } else { "metrics" };
        if let Some(denied) = self.authorize(user, req.method(), sub, node).await {
            return denied;
        }
        let mut stream = match self.links.open(node, StreamRequest::Stats).await {
            Ok(s) => s,
            Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        };
        let got = tokio::time::timeout(OPEN_TIMEOUT, async {
            loop {
                match stream.recv().await {
                    Some(StreamMsg::Stats { summary }) => return Ok(summary),
                    Some(StreamMsg::End { error: Some(e) }) => return Err(e.message),
                    Some(StreamMsg::End { error: None }) | None => {
                        return Err(format!("node {node:?} sent no statistics"))
                    }
                    Some(_) => {}
                }
            }
        })
        .await;
        let s = match got {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
            Err(_) => {
                return text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!(
                        "node {node:?} did not answer within {} s\n",
                        OPEN_TIMEOUT.as_secs()
                    ),
                )
            }
        };
        let (body, kind) = if summary {
            (
                serde_json::to_string(&s).unwrap_or_default(),
                "application/json",
            )
        } else {
            (stats::resource_metrics(&s), stats::PROMETHEUS_TEXT)
        };
        let mut r = text(StatusCode::OK, body);
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static(kind),
        );
        r
    }

    /// The user of a bearer token, by the API server's TokenReview; None
    /// without a token or when the API server does not know it.
    async fn token_user(&self, req: &Request<Incoming>) -> Result<Option<User>, kube::Error> {
        let Some(token) = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        else {
            return Ok(None);
        };
        let token = token.trim();
        let key: TokenHash = sha2::Sha256::digest(token.as_bytes()).into();
        let now = Instant::now();
        {
            let mut reviewed = self.reviewed.lock().unwrap_or_else(|p| p.into_inner());
            reviewed.retain(|_, (_, until)| *until > now);
            if let Some((user, _)) = reviewed.get(&key) {
                return Ok(user.clone());
            }
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_string(),
                ..Default::default()
            },
            ..Default::default()
        };
        let out = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await?;
        let user = out
            .status
            .filter(|s| s.authenticated == Some(true))
            .and_then(|st| st.user)
            .and_then(|u| {
                Some(User {
                    name: u.username?,
                    groups: u.groups.unwrap_or_default(),
                    uid: u.uid,
                })
            });
        self.reviewed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, (user.clone(), now + REVIEW_TTL));
        Ok(user)
    }

    /// None if `user` may `method` the node's `subresource`; else the
    /// answer to send (403 as a kubelet words it).
    async fn authorize(
        &self,
        user: &User,
        method: &Method,
        subresource: &str,
        node: &str,
    ) -> Option<Response<Body>> {
        let verb = verb(method);
        let key = (
            user.clone(),
            verb.to_string(),
            subresource.to_string(),
            node.to_string(),
        );
        let cached = self
            .decided
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .filter(|(_, until)| *until > Instant::now())
            .map(|(ok, _)| *ok);
        let allowed = match cached {
            Some(ok) => ok,
            None => {
                let review = SubjectAccessReview {
                    spec: SubjectAccessReviewSpec {
                        user: Some(user.name.clone()),
                        groups: Some(user.groups.clone()),
                        uid: user.uid.clone(),
                        resource_attributes: Some(ResourceAttributes {
                            verb: Some(verb.into()),
                            version: Some("v1".into()),
                            group: Some(String::new()),
                            resource: Some("nodes".into()),
                            subresource: Some(subresource.into()),
                            name: Some(node.into()),
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                    ..Default::default()
                };
                match Api::<SubjectAccessReview>::all(self.client.clone())
                    .create(&PostParams::default(), &review)
                    .await
                {
                    Ok(r) => {
                        let ok = r.status.is_some_and(|s| s.allowed);
                        let ttl = if ok { ALLOWED_TTL } else { DENIED_TTL };
                        let now = Instant::now();
                        let mut decided = self.decided.lock().unwrap_or_else(|p| p.into_inner());
                        decided.retain(|_, (_, until)| *until > now);
                        decided.insert(key, (ok, now + ttl));
                        ok
                    }
                    Err(e) => {
                        tracing::warn!(user = user.name, error = %e, "SubjectAccessReview failed");
                        false
                    }
                }
            }
        };
        (!allowed).then(|| {
            text(
                StatusCode::FORBIDDEN,
                format!(
                    "Forbidden (user={}, verb={verb}, resource=nodes, subresource(s)=[{subresource}])\n",
                    user.name
                ),
            )
        })
    }
}

/// The cluster's client CA, as the API server publishes it for servers
/// that authenticate its clients (kube-system/extension-apiserver-authentication).
pub async fn cluster_client_ca(client: kube::Client) -> Result<String, kube::Error> {
    let cm = Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(client, "kube-system")
        .get("extension-apiserver-authentication")
        .await?;
    Ok(cm
        .data
        .and_then(|mut d| d.remove("client-ca-file"))
        .unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_queries_as_the_api_server_sends_them() {
        let r = log_request(
            "ns",
            "p",
            "c",
            "follow=true&limitBytes=100&tailLines=5&timestamps=true",
            1000,
        )
        .unwrap();
        assert!(r.follow && r.timestamps && !r.previous);
        assert_eq!((r.tail_lines, r.limit_bytes), (Some(5), Some(100)));
        let r = log_request("ns", "p", "c", "sinceSeconds=30", 1000).unwrap();
        assert_eq!(r.since_unix, Some(970));
        let r = log_request("ns", "p", "c", "sinceTime=2026-01-01T00%3A00%3A00Z", 0).unwrap();
        assert_eq!(r.since_unix, Some(1_767_225_600));
        assert!(log_request("ns", "p", "c", "tailLines=-1", 0).is_err());
        assert!(log_request("ns", "p", "c", "sinceTime=yesterday", 0).is_err());
    }

    #[test]
    fn verbs_follow_the_method() {
        assert_eq!(verb(&Method::GET), "get");
        assert_eq!(verb(&Method::POST), "create");
    }
}
