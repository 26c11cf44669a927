//! `kubectl exec` as a v1.36 API server sends it to a node that declares
//! `ExtendWebSocketsToKubelet`: the client's WebSocket
//! (`v5.channel.k8s.io`), proxied as it is, bridged here to an exec stream
//! of the node's link.
//!
//! v5 framing: every message is binary, byte 0 its channel: 0 stdin, 1
//! stdout, 2 stderr, 3 the final status (one `metav1.Status` as JSON), 4
//! terminal sizes (`{"Width":W,"Height":H}`), and `[255, ch]` for a
//! channel the client closed (stdin's end). The session ends with the
//! status on channel 3 and a normal close; an exit code travels as the
//! kubelet words it (reason NonZeroExitCode, cause ExitCode), so kubectl
//! exits with it.

use futures_util::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use outrigger_proto::stream::{Credit, ExecRequest, StreamMsg};
use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::{frame::coding::CloseCode, CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message as Ws;
use tokio_tungstenite::WebSocketStream;

use crate::streams::Stream;

/// The one WebSocket subprotocol served.
pub const V5: &str = "v5.channel.k8s.io";

const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const STATUS: u8 = 3;
const RESIZE: u8 = 4;
const CLOSE: u8 = 255;

/// A kubelet's default `--streaming-connection-idle-timeout`.
const IDLE: std::time::Duration = std::time::Duration::from_secs(4 * 3600);

/// `/exec` query parameters (as the API server sends them: `command`
/// repeated, `input`, `output`, `error`, `tty`) to an exec request.
pub fn exec_request(
    namespace: &str,
    pod: &str,
    container: &str,
    query: &str,
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
            "command" => r.command.push(v.into_owned()),
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
    if r.command.is_empty() {
        return Err("you must specify at least one command for the container".into());
    }
    Ok(r)
}

/// Whether the request is a WebSocket upgrade offering v5.
pub fn offers_v5(headers: &hyper::HeaderMap) -> bool {
    let upgrade = headers
        .get(hyper::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let v5 = headers
        .get_all(hyper::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == V5);
    upgrade && v5
}

/// The final status, as a kubelet's translator writes it on channel 3.
pub fn status(exit: Option<i32>, error: Option<&str>) -> serde_json::Value {
    match (exit, error) {
        (_, Some(message)) => json!({
            "metadata": {}, "status": "Failure", "reason": "InternalError", "code": 500,
            "message": format!("Internal error occurred: {message}"),
        }),
        (Some(0), None) => json!({"metadata": {}, "status": "Success"}),
        (Some(code), None) => json!({
            "metadata": {}, "status": "Failure", "reason": "NonZeroExitCode",
            "message": format!("command terminated with non-zero exit code: command terminated with exit code {code}"),
            "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
        }),
        (None, None) => json!({
            "metadata": {}, "status": "Failure", "reason": "InternalError", "code": 500,
            "message": "Internal error occurred: the command's end was not reported",
        }),
    }
}

fn frame(channel: u8, bytes: &[u8]) -> Ws {
    let mut b = Vec::with_capacity(bytes.len() + 1);
    b.push(channel);
    b.extend_from_slice(bytes);
    Ws::Binary(b.into())
}

/// Relay between the client's WebSocket and the exec stream until the
/// command ends, the client goes, or the link does.
pub async fn bridge(upgraded: hyper::upgrade::Upgraded, mut stream: Stream, node: String) {
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
    // The node says the command runs in time, or why not (the client's
    // first input, its terminal size, is relayed meanwhile: the node
    // waits for it to start a terminal session).
    let mut opened = false;
    let open_by = tokio::time::sleep(super::OPEN_TIMEOUT);
    tokio::pin!(open_by);
    let mut exit = None;
    // A session with nothing either way this long ends (a kubelet's
    // streaming connection idle timeout).
    let idle = tokio::time::sleep(IDLE);
    tokio::pin!(idle);
    // What the edge may take of stdin now, and what waits for that.
    let mut credit = Credit::default();
    let mut pending: Vec<u8> = Vec::new();
    let error: Option<String> = loop {
        idle.as_mut().reset(tokio::time::Instant::now() + IDLE);
        // Stdin that waited for credit goes first.
        while !pending.is_empty() {
            let n = credit.take(pending.len());
            if n == 0 {
                break;
            }
            let bytes: Vec<u8> = pending.drain(..n).collect();
            stream.send(StreamMsg::Stdin { bytes });
        }
        tokio::select! {
            _ = &mut open_by, if !opened => break Some(format!(
                "node {node:?} did not start the command within {} s",
                super::OPEN_TIMEOUT.as_secs()
            )),
            _ = &mut idle => break Some(format!("no input or output for {} h: the session was idle too long", IDLE.as_secs() / 3600)),
            m = stream.recv() => match m {
                Some(StreamMsg::Data { bytes }) => {
                    stream.credit(bytes.len());
                    if tx.send(frame(STDOUT, &bytes)).await.is_err() {
                        return;
                    }
                }
                Some(StreamMsg::Stderr { bytes }) => {
                    stream.credit(bytes.len());
                    if tx.send(frame(STDERR, &bytes)).await.is_err() {
                        return;
                    }
                }
                Some(StreamMsg::Credit { bytes }) => credit.give(bytes),
                Some(StreamMsg::Exit { code }) => exit = Some(code),
                Some(StreamMsg::Opened) => opened = true,
                Some(StreamMsg::End { error }) => break error.map(|e| e.message),
                Some(_) => {}
                None => break Some(format!("the link of node {node:?} was lost")),
            },
            w = rx.next(), if pending.is_empty() => match w {
                Some(Ok(Ws::Binary(b))) => match b.split_first() {
                    Some((&STDIN, data)) if !data.is_empty() => pending.extend_from_slice(data),
                    Some((&CLOSE, [STDIN])) => stream.send(StreamMsg::StdinEnd),
                    Some((&RESIZE, size)) => {
                        if let Ok(s) = serde_json::from_slice::<serde_json::Value>(size) {
                            let dim = |k: &str| s[k].as_u64().and_then(|v| u16::try_from(v).ok());
                            if let (Some(width), Some(height)) = (dim("Width"), dim("Height")) {
                                stream.send(StreamMsg::Resize { width, height });
                            }
                        }
                    }
                    _ => {}
                },
                Some(Ok(Ws::Close(_))) | None | Some(Err(_)) => {
                    // The client went: the stream ends (dropped), the
                    // process with it.
                    return;
                }
                Some(Ok(_)) => {}
            },
        }
    };
    finish(&mut tx, &mut rx, exit, error.as_deref()).await;
}

/// The final status on channel 3, a normal close, and a moment for the
/// client to read them before the connection goes.
async fn finish<S, R>(tx: &mut S, rx: &mut R, exit: Option<i32>, error: Option<&str>)
where
    S: futures_util::Sink<Ws> + Unpin,
    R: futures_util::Stream + Unpin,
{
    let st = status(exit, error);
    let _ = tx.send(frame(STATUS, st.to_string().as_bytes())).await;
    let _ = tx
        .send(Ws::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        })))
        .await;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        while rx.next().await.is_some() {}
    })
    .await;
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
        )
        .unwrap();
        assert_eq!(r.command, ["sh", "-c", "echo hi"]);
        assert!(r.stdin && r.stdout && r.stderr && r.tty);
        assert!(exec_request("ns", "p", "c", "command=ls").is_err());
        assert!(exec_request("ns", "p", "c", "output=1").is_err());
    }

    #[test]
    fn exit_codes_as_the_kubelet_words_them() {
        assert_eq!(status(Some(0), None)["status"], "Success");
        let s = status(Some(3), None);
        assert_eq!(s["reason"], "NonZeroExitCode");
        assert_eq!(s["details"]["causes"][0]["message"], "3");
        assert_eq!(status(None, Some("x"))["reason"], "InternalError");
    }
}
