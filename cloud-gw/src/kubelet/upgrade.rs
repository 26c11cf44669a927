//! The HTTP upgrades a kubelet takes for exec, attach and port-forward: a
//! WebSocket (`Sec-WebSocket-Protocol` offers) or SPDY/3.1 (one
//! `X-Stream-Protocol-Version` header per offer), and the 101 answer that
//! names the protocol chosen. Both 101s must name it: a SPDY client that
//! finds no version falls back to the oldest protocol (no exit codes), a
//! WebSocket client fails.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderMap, HeaderValue};
use hyper::{Response, StatusCode};

use super::{spdy, Body};

pub const STREAM_PROTOCOL_VERSION: &str = "x-stream-protocol-version";
const ACCEPTED_VERSIONS: &str = "x-accepted-stream-protocol-versions";

/// What a request asks to upgrade to.
#[derive(Debug, PartialEq, Eq)]
pub enum Upgrade {
    /// A WebSocket: its key and the subprotocols offered.
    WebSocket { key: String, offered: Vec<String> },
    /// SPDY/3.1: the stream protocols offered.
    Spdy { offered: Vec<String> },
}

fn values<'a>(h: &'a HeaderMap, name: &str) -> impl Iterator<Item = String> + 'a {
    h.get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
}

impl Upgrade {
    /// The upgrade a request asks for, if any.
    pub fn of(h: &HeaderMap) -> Option<Upgrade> {
        let to = h.get(hyper::header::UPGRADE)?.to_str().ok()?.trim();
        if to.eq_ignore_ascii_case("websocket") {
            let key = h
                .get(hyper::header::SEC_WEBSOCKET_KEY)?
                .to_str()
                .ok()?
                .to_string();
            Some(Upgrade::WebSocket {
                key,
                offered: values(h, "sec-websocket-protocol").collect(),
            })
        } else if to.eq_ignore_ascii_case(spdy::UPGRADE) {
            Some(Upgrade::Spdy {
                offered: values(h, STREAM_PROTOCOL_VERSION).collect(),
            })
        } else {
            None
        }
    }

    pub fn offers(&self, protocol: &str) -> bool {
        let offered = match self {
            Upgrade::WebSocket { offered, .. } | Upgrade::Spdy { offered } => offered,
        };
        offered.iter().any(|p| p == protocol)
    }

    pub fn is_websocket(&self) -> bool {
        matches!(self, Upgrade::WebSocket { .. })
    }

    /// The protocol served for this kind of upgrade (`websocket` or
    /// `spdy`) if it is offered; else the refusal to answer with.
    pub fn choose(
        &self,
        websocket: &'static str,
        spdy: &'static str,
    ) -> Result<&'static str, Box<Response<Body>>> {
        let served = if self.is_websocket() { websocket } else { spdy };
        if self.offers(served) {
            Ok(served)
        } else {
            Err(Box::new(self.refuse(&[served])))
        }
    }

    /// The 101 that takes `protocol`.
    pub fn accept(&self, protocol: &'static str) -> Response<Body> {
        let mut r = empty(StatusCode::SWITCHING_PROTOCOLS);
        let h = r.headers_mut();
        h.insert(
            hyper::header::CONNECTION,
            HeaderValue::from_static("Upgrade"),
        );
        match self {
            Upgrade::WebSocket { key, .. } => {
                h.insert(
                    hyper::header::UPGRADE,
                    HeaderValue::from_static("websocket"),
                );
                h.insert(
                    hyper::header::SEC_WEBSOCKET_PROTOCOL,
                    HeaderValue::from_static(protocol),
                );
                let accept =
                    tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
                if let Ok(v) = HeaderValue::from_str(&accept) {
                    h.insert(hyper::header::SEC_WEBSOCKET_ACCEPT, v);
                }
            }
            Upgrade::Spdy { .. } => {
                h.insert(
                    hyper::header::UPGRADE,
                    HeaderValue::from_static(spdy::UPGRADE),
                );
                h.insert(STREAM_PROTOCOL_VERSION, HeaderValue::from_static(protocol));
            }
        }
        r
    }

    /// The refusal when none of `served` was offered: for SPDY a kubelet's
    /// 403 with the versions it takes; for a WebSocket a 400 (kubectl then
    /// tries SPDY).
    pub fn refuse(&self, served: &[&str]) -> Response<Body> {
        let list = served.join(", ");
        match self {
            Upgrade::Spdy { offered } => {
                let mut r = super::text(
                    StatusCode::FORBIDDEN,
                    format!("unable to upgrade: unable to negotiate protocol: client supports {offered:?}, server accepts [{list}]\n"),
                );
                if let Ok(v) = HeaderValue::from_str(&list) {
                    r.headers_mut().insert(ACCEPTED_VERSIONS, v);
                }
                r
            }
            Upgrade::WebSocket { offered, .. } => super::text(
                StatusCode::BAD_REQUEST,
                format!("unable to upgrade: this kubelet endpoint takes the WebSocket subprotocols [{list}], the client offered {offered:?}\n"),
            ),
        }
    }
}

pub fn empty(code: StatusCode) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::new())
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *r.status_mut() = code;
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offers_are_read_as_clients_send_them() {
        let mut h = HeaderMap::new();
        h.insert("upgrade", HeaderValue::from_static("SPDY/3.1"));
        h.append(
            STREAM_PROTOCOL_VERSION,
            HeaderValue::from_static("v5.channel.k8s.io"),
        );
        h.append(
            STREAM_PROTOCOL_VERSION,
            HeaderValue::from_static("v4.channel.k8s.io"),
        );
        let u = Upgrade::of(&h).unwrap();
        assert!(u.offers("v4.channel.k8s.io") && !u.offers("portforward.k8s.io"));
        let r = u.accept("v4.channel.k8s.io");
        assert_eq!(r.status(), 101);
        assert_eq!(r.headers()[STREAM_PROTOCOL_VERSION], "v4.channel.k8s.io");
        assert_eq!(u.refuse(&["portforward.k8s.io"]).status(), 403);

        let mut h = HeaderMap::new();
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert(
            "sec-websocket-key",
            HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="),
        );
        h.insert(
            "sec-websocket-protocol",
            HeaderValue::from_static("SPDY/3.1+portforward.k8s.io, v4.channel.k8s.io"),
        );
        let u = Upgrade::of(&h).unwrap();
        assert!(u.offers("SPDY/3.1+portforward.k8s.io"));
        let r = u.accept("SPDY/3.1+portforward.k8s.io");
        assert_eq!(
            r.headers()["sec-websocket-accept"],
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert!(Upgrade::of(&HeaderMap::new()).is_none());
    }
}
