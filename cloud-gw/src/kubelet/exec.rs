//! `kubectl exec` and `kubectl attach` sessions: a process's stdio between
//! the API server and an exec or attach stream of the node's link, over
//! whichever protocol the API server speaks to a kubelet.
//!
//! - WebSocket `v5.channel.k8s.io` (the Node declares
//!   `ExtendWebSocketsToKubelet`, so the API server passes kubectl's
//!   WebSocket on as it is): every message binary, byte 0 its channel: 0
//!   stdin, 1 stdout, 2 stderr, 3 the final status (one `metav1.Status` as
//!   JSON), 4 terminal sizes (`{"Width":W,"Height":H}`), and `[255, ch]`
//!   for a channel the client closed (stdin's end). It ends with the status
//!   on channel 3 and a normal close.
//! - SPDY/3.1 with `v4.channel.k8s.io` (an API server translating, or
//!   kubectl's fallback): one SPDY stream per channel, named by its
//!   `streamtype` header (error, stdin, stdout, stderr, resize); the status
//!   goes on the error stream, then every stream and the connection close.
//!
//! Either way [`relay`] does the session's work once: the client's input
//! into the link stream within the edge's credit, the process's output out,
//! and the outcome as the kubelet words it (an exit code as reason
//! NonZeroExitCode with cause ExitCode, so kubectl exits with it; a lost
//! link or a refusal as InternalError, never a silent success).

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use outrigger_proto::stream::{ExecRequest, StreamMsg};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::{frame::coding::CloseCode, CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message as Ws;
use tokio_tungstenite::WebSocketStream;

use super::spdy;
use crate::streams::Stream;

/// The WebSocket subprotocol served for exec and attach.
pub const V5: &str = "v5.channel.k8s.io";
/// The SPDY stream protocol served for exec and attach (what CRI streaming
/// servers choose; v5 over SPDY adds nothing).
pub const V4: &str = "v4.channel.k8s.io";

const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const STATUS: u8 = 3;
const RESIZE: u8 = 4;
const CLOSE: u8 = 255;

/// `/exec` (`command` repeated) or `/attach` query parameters, as the API
/// server sends them (`input`, `output`, `error`, `tty`), to a request.
pub fn exec_request(
    namespace: &str,
    pod: &str,
    container: &str,
    query: &str,
    attach: bool,
) -> Result<ExecRequest, String> {
    let mut r = ExecRequest {
        namespace: namespace.into(),
        pod: pod.into(),
        container: container.into(),
        ..Default::default()
    };
    let flag = |v: &str| matches!(v, "1" | "true" | "True");
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match k.as_ref() {
            "command" if !attach => r.command.push(v.into_owned()),
            "input" | "stdin" => r.stdin = flag(&v),
            "output" | "stdout" => r.stdout = flag(&v),
            "error" | "stderr" => r.stderr = flag(&v),
            "tty" => r.tty = flag(&v),
            _ => {}
        }
    }
    if !(r.stdin || r.stdout || r.stderr) {
        return Err("you must specify at least 1 of stdin, stdout, stderr".into());
    }
    if !attach && r.command.is_empty() {
        return Err("you must specify at least one command for the container".into());
    }
    Ok(r)
}

/// The final status, as a kubelet's translator writes it.
pub fn status(exit: Option<i32>, error: Option<&str>) -> serde_json::Value {
    match (exit, error) {
        (_, Some(message)) => json!({
            "metadata": {}, "status": "Failure", "reason": "InternalError", "code": 500,
            "message": format!("Internal error occurred: {message}"),
        }),
        (Some(0), None) | (None, None) => json!({"metadata": {}, "status": "Success"}),
        (Some(code), None) => json!({
            "metadata": {}, "status": "Failure", "reason": "NonZeroExitCode",
            "message": format!("command terminated with non-zero exit code: command terminated with exit code {code}"),
            "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
        }),
    }
}

/// What the client does, whatever protocol it speaks.
#[derive(Debug, PartialEq, Eq)]
pub enum FromClient {
    Stdin(Bytes),
    StdinEnd,
    Resize { width: u16, height: u16 },
}

/// What goes to the client.
#[derive(Debug, PartialEq, Eq)]
pub enum ToClient {
    Stdout(Bytes),
    Stderr(Bytes),
}

/// How a session ended, for the client's status.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub exit: Option<i32>,
    pub error: Option<String>,
}

impl Outcome {
    pub fn status(&self) -> serde_json::Value {
        status(self.exit, self.error.as_deref())
    }
}

/// A terminal size as kubectl sends it (`{"Width":W,"Height":H}`).
fn size(json: &[u8]) -> Option<FromClient> {
    let s = serde_json::from_slice::<serde_json::Value>(json).ok()?;
    let dim = |k: &str| s[k].as_u64().and_then(|v| u16::try_from(v).ok());
    Some(FromClient::Resize {
        width: dim("Width")?,
        height: dim("Height")?,
    })
}

/// Relay between a client and the node's stream until the process ends
/// (its outcome) or the client goes (None: the stream ends with it, and
/// so does the process). `from` closing means the client is gone; stdin's
/// end is a message.
pub async fn relay(
    mut stream: Stream,
    node: &str,
    mut from: mpsc::Receiver<FromClient>,
    to: mpsc::Sender<ToClient>,
) -> Option<Outcome> {
    // The node says the command runs in time, or why not (the client's
    // first input, its terminal size, is relayed meanwhile: the node
    // waits for it to start a terminal session).
    let mut opened = false;
    let open_by = tokio::time::sleep(super::OPEN_TIMEOUT);
    tokio::pin!(open_by);
    let mut exit = None;
    let idle = tokio::time::sleep(super::IDLE_TIMEOUT);
    tokio::pin!(idle);
    let error = loop {
        idle.as_mut()
            .reset(tokio::time::Instant::now() + super::IDLE_TIMEOUT);
        tokio::select! {
            _ = &mut open_by, if !opened => break Some(format!(
                "node {node:?} did not start the session within {} s",
                super::OPEN_TIMEOUT.as_secs()
            )),
            _ = &mut idle => break Some(format!("no input or output for {} h: the session was idle too long", super::IDLE_TIMEOUT.as_secs() / 3600)),
            m = stream.recv() => match m {
                Some(StreamMsg::Data { bytes }) => {
                    let n = bytes.len();
                    to.send(ToClient::Stdout(bytes.into())).await.ok()?;
                    stream.credit(n);
                }
                Some(StreamMsg::Stderr { bytes }) => {
                    let n = bytes.len();
                    to.send(ToClient::Stderr(bytes.into())).await.ok()?;
                    stream.credit(n);
                }
                Some(StreamMsg::Exit { code }) => exit = Some(code),
                Some(StreamMsg::Opened) => opened = true,
                Some(StreamMsg::End { error }) => break error.map(|e| e.message),
                Some(_) => {}
                None => break Some(format!("the link of node {node:?} was lost")),
            },
            // Input waits while the edge has no room for it.
            c = from.recv(), if !stream.input_waiting() => match c? {
                FromClient::Stdin(b) => stream.push_input(&b),
                FromClient::StdinEnd => stream.end_input(),
                FromClient::Resize { width, height } => stream.send(StreamMsg::Resize { width, height }),
            },
        }
    };
    Some(Outcome { exit, error })
}

fn frame(channel: u8, bytes: &[u8]) -> Ws {
    let mut b = Vec::with_capacity(bytes.len() + 1);
    b.push(channel);
    b.extend_from_slice(bytes);
    Ws::Binary(b.into())
}

/// A session over a v5 WebSocket (after the 101).
pub async fn over_websocket(upgraded: hyper::upgrade::Upgraded, stream: Stream, node: String) {
    let ws = WebSocketStream::from_raw_socket(
        TokioIo::new(upgraded),
        Role::Server,
        Some(outrigger_proto::ws::ws_config()),
    )
    .await;
    let (mut tx, mut rx) = ws.split();
    // What real servers do first: an empty message on the lowest writable
    // channel.
    if tx.send(frame(STDOUT, &[])).await.is_err() {
        return;
    }
    let (from_tx, from) = mpsc::channel(8);
    let (to, mut to_rx) = mpsc::channel(8);
    // The client's messages, read on their own so that a full stdin never
    // stops output (nor output stdin).
    let reader = tokio::spawn(async move {
        while let Some(m) = rx.next().await {
            let c = match m {
                Ok(Ws::Binary(b)) => match b.split_first() {
                    Some((&STDIN, data)) if !data.is_empty() => {
                        FromClient::Stdin(Bytes::copy_from_slice(data))
                    }
                    Some((&CLOSE, [STDIN])) => FromClient::StdinEnd,
                    Some((&RESIZE, json)) => match size(json) {
                        Some(r) => r,
                        None => continue,
                    },
                    _ => continue,
                },
                Ok(Ws::Close(_)) | Err(_) => break,
                Ok(_) => continue,
            };
            if from_tx.send(c).await.is_err() {
                break;
            }
        }
    });
    // Owns the receiver: if the client is gone, the relay's next output
    // fails and it ends too.
    let writer = async move {
        while let Some(m) = to_rx.recv().await {
            let f = match m {
                ToClient::Stdout(b) => frame(STDOUT, &b),
                ToClient::Stderr(b) => frame(STDERR, &b),
            };
            tx.send(f).await.ok()?;
        }
        Some(tx)
    };
    let (outcome, tx) = tokio::join!(relay(stream, &node, from, to), writer);
    let (Some(outcome), Some(mut tx)) = (outcome, tx) else {
        reader.abort();
        return;
    };
    let _ = tx
        .send(frame(STATUS, outcome.status().to_string().as_bytes()))
        .await;
    let _ = tx
        .send(Ws::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        })))
        .await;
    // A moment for the client to read them and close its side before the
    // connection goes.
    let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
}

/// The SPDY streams of a session: which the client opens depends on what
/// it asked for.
#[derive(Default)]
struct SpdyStreams {
    error: Option<u32>,
    stdin: Option<spdy::Incoming>,
    stdout: Option<u32>,
    stderr: Option<u32>,
    resize: Option<spdy::Incoming>,
}

/// A session over SPDY (after the 101): wait for the streams the request
/// needs (a kubelet's 30 s), then relay.
pub async fn over_spdy(
    io: hyper::upgrade::Upgraded,
    stream: Stream,
    node: String,
    req: ExecRequest,
) {
    let mut conn = spdy::serve(TokioIo::new(io));
    let tx = conn.tx.clone();
    let tty = req.tty;
    let want = 1
        + usize::from(req.stdin)
        + usize::from(req.stdout)
        + usize::from(req.stderr && !tty)
        + usize::from(tty);
    let mut s = SpdyStreams::default();
    let mut got = 0;
    let gathered = tokio::time::timeout(super::OPEN_TIMEOUT, async {
        while got < want {
            let Some(i) = conn.incoming.recv().await else {
                return false;
            };
            let kind = spdy::header(&i.headers, "streamtype").unwrap_or("");
            let slot_free = match kind {
                "error" => s.error.replace(i.id).is_none(),
                "stdout" => s.stdout.replace(i.id).is_none(),
                "stderr" => s.stderr.replace(i.id).is_none(),
                "stdin" => s.stdin.replace(i).is_none(),
                "resize" => s.resize.replace(i).is_none(),
                _ => {
                    tx.reset(i.id, spdy::PROTOCOL_ERROR).await;
                    continue;
                }
            };
            if slot_free {
                got += 1;
            }
        }
        true
    })
    .await;
    let Some(error_stream) = s.error.filter(|_| gathered == Ok(true)) else {
        tracing::debug!(node, "exec over SPDY: the client did not open its streams");
        tx.close().await;
        return;
    };
    let (from_tx, from) = mpsc::channel(8);
    let (to, mut to_rx) = mpsc::channel(8);
    let (stdin, resize) = (s.stdin.take(), s.resize.take());
    // The client's input, and its connection's end (the client gone).
    let reader = tokio::spawn(async move {
        let mut stdin = stdin;
        let mut resize = resize;
        let mut sizes = Vec::new();
        loop {
            tokio::select! {
                d = async { stdin.as_mut()?.data.recv().await }, if stdin.is_some() => match d {
                    Some(b) => {
                        if from_tx.send(FromClient::Stdin(b)).await.is_err() { return; }
                    }
                    None => {
                        stdin = None;
                        if from_tx.send(FromClient::StdinEnd).await.is_err() { return; }
                    }
                },
                d = async { resize.as_mut()?.data.recv().await }, if resize.is_some() => match d {
                    Some(b) => {
                        // A stream of JSON objects, one per size.
                        sizes.extend_from_slice(&b);
                        let mut de = serde_json::Deserializer::from_slice(&sizes).into_iter::<serde_json::Value>();
                        let mut used = 0;
                        while let Some(Ok(v)) = de.next() {
                            used = de.byte_offset();
                            if let Some(r) = size(v.to_string().as_bytes()) {
                                if from_tx.send(r).await.is_err() { return; }
                            }
                        }
                        sizes.drain(..used);
                    }
                    None => resize = None,
                },
                i = conn.incoming.recv() => match i {
                    // Nothing more is expected of this client.
                    Some(i) => conn.tx.reset(i.id, spdy::REFUSED_STREAM).await,
                    None => return,
                },
            }
        }
    });
    let (out_tx, stdout, stderr) = (tx.clone(), s.stdout, s.stderr);
    let writer = async move {
        while let Some(m) = to_rx.recv().await {
            let (id, b) = match m {
                ToClient::Stdout(b) => (stdout, b),
                ToClient::Stderr(b) => (stderr, b),
            };
            if let Some(id) = id {
                if !out_tx.data(id, b).await {
                    return false;
                }
            }
        }
        true
    };
    let (outcome, written) = tokio::join!(relay(stream, &node, from, to), writer);
    reader.abort();
    if let Some(outcome) = outcome.filter(|_| written) {
        let st = outcome.status().to_string();
        tx.data(error_stream, Bytes::from(st)).await;
    }
    for id in [Some(error_stream), s.stdout, s.stderr]
        .into_iter()
        .flatten()
    {
        tx.fin(id).await;
    }
    tx.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_queries_as_the_api_server_sends_them() {
        let r = exec_request(
            "ns",
            "p",
            "c",
            "command=sh&command=-c&command=echo+hi&error=1&input=1&output=1&tty=1",
            false,
        )
        .unwrap();
        assert_eq!(r.command, ["sh", "-c", "echo hi"]);
        assert!(r.stdin && r.stdout && r.stderr && r.tty);
        assert!(exec_request("ns", "p", "c", "command=ls", false).is_err());
        assert!(exec_request("ns", "p", "c", "output=1", false).is_err());
        // An attach runs nothing.
        let a = exec_request("ns", "p", "c", "output=1&command=ls", true).unwrap();
        assert!(a.command.is_empty() && a.stdout);
    }

    #[test]
    fn exit_codes_as_the_kubelet_words_them() {
        assert_eq!(status(Some(0), None)["status"], "Success");
        assert_eq!(status(None, None)["status"], "Success");
        let s = status(Some(3), None);
        assert_eq!(s["reason"], "NonZeroExitCode");
        assert_eq!(s["details"]["causes"][0]["message"], "3");
        assert_eq!(status(None, Some("x"))["reason"], "InternalError");
    }

    #[test]
    fn terminal_sizes_as_kubectl_sends_them() {
        assert_eq!(
            size(br#"{"Width":80,"Height":24}"#),
            Some(FromClient::Resize {
                width: 80,
                height: 24
            })
        );
        assert_eq!(size(br#"{"Width":-1,"Height":24}"#), None);
        assert_eq!(size(b"nonsense"), None);
    }
}
