//! cloud-gw's HTTP endpoints beside the edge link: `/healthz`, `/readyz`,
//! `/metrics` (plain HTTP, for probes and Prometheus), and the admission
//! webhooks `/mutate-pods` and `/validate-devices` (HTTPS: the API server
//! calls them, trusting the link CA through the webhook configurations'
//! caBundle).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// What the endpoints need to know.
pub trait State: Send + Sync + 'static {
    /// The caches are complete and edges are served.
    fn ready(&self) -> bool;
    /// What the webhook decides with: the edge nodes known now and the
    /// cluster's default tolerations.
    fn admission(&self) -> crate::bridge::admission::Context;
    /// A DeviceModel as the caches have it.
    fn device_model(
        &self,
        namespace: &str,
        name: &str,
    ) -> Option<outrigger_proto::device::DeviceModelSpec>;
}

/// An AdmissionReview is small; anything bigger is not one.
const MAX_BODY: usize = 4 << 20;

fn reply(code: StatusCode, ctype: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = code;
    if let Ok(v) = ctype.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

async fn handle(
    state: Arc<dyn State>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let text = "text/plain; charset=utf-8";
    Ok(match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => reply(StatusCode::OK, text, "ok\n"),
        (&Method::GET, "/readyz") if state.ready() => reply(StatusCode::OK, text, "ok\n"),
        (&Method::GET, "/readyz") => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            text,
            "caches not listed yet\n",
        ),
        (&Method::GET, "/metrics") => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            crate::metrics::render(),
        ),
        (&Method::POST, "/validate-devices") => {
            match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(b) => {
                    let out = crate::bridge::admission::review_device(&b.to_bytes(), |ns, n| {
                        state.device_model(ns, n)
                    });
                    reply(
                        StatusCode::OK,
                        "application/json",
                        serde_json::to_vec(&out).unwrap_or_default(),
                    )
                }
                Err(e) => reply(StatusCode::BAD_REQUEST, text, format!("{e}\n")),
            }
        }
        (&Method::POST, "/mutate-pods") => {
            match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(b) => {
                    let out = crate::bridge::admission::review(&b.to_bytes(), &state.admission());
                    reply(
                        StatusCode::OK,
                        "application/json",
                        serde_json::to_vec(&out).unwrap_or_default(),
                    )
                }
                Err(e) => reply(StatusCode::BAD_REQUEST, text, format!("{e}\n")),
            }
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            text,
            "no such endpoint (/healthz, /readyz, /metrics, /mutate-pods, /validate-devices)\n",
        ),
    })
}

/// Serve the endpoints on `listener`, over TLS if `tls` is given.
pub async fn serve(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    state: Arc<dyn State>,
) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accept (http)");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let state = state.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |r| handle(state.clone(), r));
            let http = hyper::server::conn::http1::Builder::new();
            let r = match tls {
                Some(acceptor) => match acceptor.accept(tcp).await {
                    Ok(s) => http.serve_connection(TokioIo::new(s), svc).await,
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "webhook TLS handshake failed");
                        return;
                    }
                },
                None => http.serve_connection(TokioIo::new(tcp), svc).await,
            };
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "http connection");
            }
        });
    }
}
