//! `kubectl port-forward` to a pod on an edge node: SPDY/3.1 with
//! `portforward.k8s.io`, either raw (an upgrade to SPDY) or as the bytes
//! of a WebSocket (`SPDY/3.1+portforward.k8s.io`, what kubectl 1.31+ sends
//! and an API server proxies to a Node declaring
//! `ExtendWebSocketsToKubelet`).
//!
//! Each connection kubectl accepts locally is a pair of SPDY streams, an
//! error stream and a data stream, with the same `requestid` (older
//! clients: consecutive stream ids) and the pod's `port`. Each pair becomes
//! one port-forward stream of the node's link: the edge connects to the
//! port inside the pod's network namespace, bytes go each way within
//! per-stream credit, the client's FIN half-closes toward the pod and the
//! pod's end ends the pair. A failure is text on the error stream, as a
//! kubelet writes it (kubectl reports it and drops that connection).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use outrigger_proto::stream::{PortForwardRequest, Request, StreamMsg};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::{frame::coding::CloseCode, CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message as Ws;
use tokio_tungstenite::WebSocketStream;

use super::spdy::{self, Incoming};
use crate::streams::Links;

/// The SPDY stream protocol of port-forward.
pub const PROTOCOL: &str = "portforward.k8s.io";
/// The same as a WebSocket subprotocol (SPDY inside it).
pub const WS_PROTOCOL: &str = "SPDY/3.1+portforward.k8s.io";

/// Where the streams go: a pod on a node.
#[derive(Clone)]
pub struct Target {
    pub links: Arc<Links>,
    pub node: String,
    pub namespace: String,
    pub pod: String,
    pub uid: String,
}

/// One half of a pair, waiting for the other (a kubelet waits 30 s).
#[derive(Default)]
struct Half {
    error: Option<Incoming>,
    data: Option<Incoming>,
    since: Option<tokio::time::Instant>,
}

/// The pair a stream belongs to: its `requestid`, or for a client that
/// sends none, its id (error) or its id less two (data), as a kubelet
/// pairs them.
fn request_id(s: &Incoming) -> String {
    if let Some(r) = spdy::header(&s.headers, "requestid") {
        return r.to_string();
    }
    match spdy::header(&s.headers, "streamtype") {
        Some("data") => s.id.saturating_sub(2).to_string(),
        _ => s.id.to_string(),
    }
}

/// Serve port-forward on an upgraded connection until the client goes.
pub async fn serve<IO>(io: IO, target: Target)
where
    IO: AsyncRead + AsyncWrite + Send + 'static,
{
    let mut conn = spdy::serve(io);
    let mut waiting: HashMap<String, Half> = HashMap::new();
    loop {
        let oldest = waiting.values().filter_map(|h| h.since).min();
        let expiry = async {
            match oldest {
                Some(t) => tokio::time::sleep_until(t + super::OPEN_TIMEOUT).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            i = conn.incoming.recv() => {
                let Some(i) = i else { return };
                let id = request_id(&i);
                tracing::debug!(stream = i.id, request = id, headers = ?i.headers, "port-forward stream");
                let half = waiting.entry(id.clone()).or_default();
                half.since.get_or_insert_with(tokio::time::Instant::now);
                match spdy::header(&i.headers, "streamtype") {
                    Some("error") => half.error = Some(i),
                    Some("data") => half.data = Some(i),
                    _ => {
                        conn.tx.reset(i.id, spdy::PROTOCOL_ERROR).await;
                        continue;
                    }
                }
                if half.error.is_some() && half.data.is_some() {
                    if let Some(Half { error: Some(e), data: Some(d), .. }) = waiting.remove(&id) {
                        tokio::spawn(forward(e, d, target.clone()));
                    }
                }
            }
            _ = expiry => {
                let now = tokio::time::Instant::now();
                let late: Vec<String> = waiting
                    .iter()
                    .filter(|(_, h)| h.since.is_some_and(|t| t + super::OPEN_TIMEOUT <= now))
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in late {
                    if let Some(h) = waiting.remove(&k) {
                        for s in [h.error, h.data].into_iter().flatten() {
                            conn.tx.reset(s.id, spdy::REFUSED_STREAM).await;
                        }
                    }
                }
            }
        }
    }
}

/// The port a stream pair names.
fn port_of(s: &Incoming) -> Result<u16, String> {
    let p = spdy::header(&s.headers, "port").unwrap_or("");
    match p.parse::<u16>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("invalid port {p:?}")),
    }
}

/// One forwarded connection: a pair of SPDY streams and a link stream.
async fn forward(error: Incoming, mut data: Incoming, t: Target) {
    let tx = data.tx.clone();
    let port = port_of(&data).or_else(|_| port_of(&error));
    let failed = match port {
        Ok(port) => relay(&mut data, &t, port).await.err().map(|e| (port, e)),
        Err(e) => Some((0, e)),
    };
    if let Some((port, e)) = failed {
        let text = format!(
            "error forwarding port {port} to pod {}, uid {}: {e}",
            t.pod, t.uid
        );
        tracing::debug!(node = t.node, pod = t.pod, "{text}");
        tx.data(error.id, Bytes::from(text)).await;
    }
    tx.fin(data.id).await;
    tx.fin(error.id).await;
}

/// Bytes both ways until the pod's side ends (Ok), the client goes (Ok:
/// nobody to tell) or something fails (the error to write).
async fn relay(data: &mut Incoming, t: &Target, port: u16) -> Result<(), String> {
    let request = Request::PortForward(PortForwardRequest {
        namespace: t.namespace.clone(),
        pod: t.pod.clone(),
        uid: t.uid.clone(),
        port,
    });
    let mut stream = t
        .links
        .open(&t.node, request)
        .await
        .map_err(|e| e.to_string())?;
    let tx = data.tx.clone();
    let mut opened = false;
    let open_by = tokio::time::sleep(super::OPEN_TIMEOUT);
    tokio::pin!(open_by);
    let idle = tokio::time::sleep(super::IDLE_TIMEOUT);
    tokio::pin!(idle);
    // The client's half-close (its FIN, passed on as the input's end).
    let mut client_done = false;
    loop {
        idle.as_mut()
            .reset(tokio::time::Instant::now() + super::IDLE_TIMEOUT);
        tokio::select! {
            _ = &mut idle => {
                return Err(format!("nothing either way for {} h: the connection was idle too long", super::IDLE_TIMEOUT.as_secs() / 3600));
            }
            _ = &mut open_by, if !opened => {
                return Err(format!("node {:?} did not connect within {} s", t.node, super::OPEN_TIMEOUT.as_secs()));
            }
            m = stream.recv() => match m {
                Some(StreamMsg::Opened) => opened = true,
                Some(StreamMsg::Data { bytes }) => {
                    let n = bytes.len();
                    if !tx.data(data.id, Bytes::from(bytes)).await {
                        return Ok(());
                    }
                    stream.credit(n);
                }
                Some(StreamMsg::End { error: None }) => return Ok(()),
                Some(StreamMsg::End { error: Some(e) }) => return Err(e.message),
                Some(_) => {}
                None => return Err(format!("the link of node {:?} was lost", t.node)),
            },
            // The client's bytes wait while the edge has no room for them.
            d = data.data.recv(), if !client_done && !stream.input_waiting() => match d {
                Some(b) => stream.push_input(&b),
                None => {
                    client_done = true;
                    stream.end_input();
                }
            },
            _ = tx.closed() => return Ok(()),
        }
    }
}

/// Port-forward inside a WebSocket (after the 101): its binary messages
/// are the SPDY connection's bytes, cut anywhere.
pub async fn over_websocket(upgraded: hyper::upgrade::Upgraded, target: Target) {
    let ws = WebSocketStream::from_raw_socket(
        TokioIo::new(upgraded),
        Role::Server,
        Some(outrigger_proto::ws::ws_config()),
    )
    .await;
    let (mut ws_tx, mut ws_rx) = ws.split();
    let (ours, spdy_side) = tokio::io::duplex(256 << 10);
    let (mut rd, mut wr) = tokio::io::split(ours);
    let inbound = tokio::spawn(async move {
        while let Some(Ok(m)) = ws_rx.next().await {
            match m {
                Ws::Binary(b) if wr.write_all(&b).await.is_err() => break,
                Ws::Close(_) => break,
                _ => {}
            }
        }
        let _ = wr.shutdown().await;
    });
    let outbound = async move {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if ws_tx
                        .send(Ws::Binary(Bytes::copy_from_slice(&buf[..n])))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
        let _ = ws_tx
            .send(Ws::Close(Some(CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            })))
            .await;
    };
    tokio::join!(serve(spdy_side, target), outbound);
    let _ = tokio::time::timeout(Duration::from_secs(5), inbound).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn incoming(id: u32, headers: &[(&str, &str)]) -> Incoming {
        let (_tx, data) = tokio::sync::mpsc::channel(1);
        let (a, _b) = tokio::io::duplex(64);
        Incoming {
            id,
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            data,
            tx: spdy::serve(a).tx,
        }
    }

    #[tokio::test]
    async fn pairs_by_request_id_or_by_stream_ids() {
        let e = incoming(1, &[("streamtype", "error"), ("requestid", "7")]);
        assert_eq!(request_id(&e), "7");
        let e = incoming(5, &[("streamtype", "error")]);
        let d = incoming(7, &[("streamtype", "data"), ("port", "80")]);
        assert_eq!(request_id(&e), request_id(&d));
        assert_eq!(port_of(&d), Ok(80));
        assert!(port_of(&incoming(9, &[("port", "http")])).is_err());
        assert!(port_of(&incoming(9, &[("port", "0")])).is_err());
    }
}
