//! Streams inside the link: `kubectl logs`, `exec`, `attach` and
//! `port-forward`, and the node's resource statistics (`kubectl top`,
//! metrics scrapers), carried as numbered channels of the node's one
//! WebSocket.
//!
//! The cloud opens a stream (`Open` on a free channel, 16..=255); the edge
//! answers `Opened` or `End` with an error (a pod it does not run, a
//! container that has not started), then `Data`, then `End`. Either side
//! may end it; a channel is free again once both have seen an `End`.
//!
//! Flow control is per stream, each way, and by bytes: a sender has
//! [`WINDOW`] bytes of credit when the stream opens and sends bytes
//! (`Data`, `Stderr`; `Stdin` the other way) only within it; the receiver
//! gives credit back (`Credit`) as its consumer takes the bytes.
//! A stalled reader so holds at most one window in flight and never holds
//! up the sync and status frames that share the link, nor other streams.

use serde::{Deserialize, Serialize};

/// Bytes a sender may have sent and not been credited for, per stream.
pub const WINDOW: u32 = 256 << 10;

/// The largest `Data` payload: a frame of it stays small next to the sync
/// frames it shares the link with.
pub const CHUNK: usize = 64 << 10;

/// One message on a stream channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum StreamMsg {
    /// Cloud to edge: start this.
    Open {
        request: Request,
    },
    /// Edge to cloud: it started (the cloud may answer its client now).
    Opened,
    /// Bytes of the stream: a log's, or a process's stdout.
    Data {
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// A process's stderr.
    Stderr {
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// The node's resource statistics (the answer to [`Request::Stats`]).
    Stats {
        summary: Box<crate::stats::Summary>,
    },
    /// Cloud to edge: a process's stdin (or what a forwarded connection's
    /// client sent), its end, a terminal's size.
    Stdin {
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    StdinEnd,
    Resize {
        width: u16,
        height: u16,
    },
    /// Edge to cloud: the process exited with this code (an `End` follows).
    Exit {
        code: i32,
    },
    /// The receiver passed on this many more bytes: the sender may send as
    /// many more.
    Credit {
        bytes: u32,
    },
    /// The sender is done: cleanly, or with why not.
    End {
        error: Option<StreamError>,
    },
}

/// What a stream is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Request {
    Logs(LogRequest),
    Exec(ExecRequest),
    /// The container's own process: its output as it comes, stdin if the
    /// container keeps it open (`command` is empty).
    Attach(ExecRequest),
    /// A TCP connection to a port in the pod's network namespace: bytes
    /// each way (`Stdin` in, `Data` out), `StdinEnd` for the client's
    /// half-close; the pod's end of the connection ends the stream.
    PortForward(PortForwardRequest),
    /// The node's, its pods' and their containers' resource use, once.
    Stats,
}

/// A port of a pod, as the kubelet's `/portForward` is asked for it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortForwardRequest {
    pub namespace: String,
    pub pod: String,
    #[serde(default)]
    pub uid: String,
    pub port: u16,
}

/// A command to run in a container, as the kubelet's `/exec` is asked for
/// it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    pub namespace: String,
    pub pod: String,
    pub container: String,
    #[serde(default)]
    pub uid: String,
    pub command: Vec<String>,
    #[serde(default)]
    pub stdin: bool,
    #[serde(default)]
    pub stdout: bool,
    #[serde(default)]
    pub stderr: bool,
    #[serde(default)]
    pub tty: bool,
}

/// A container's log, as the kubelet's `/containerLogs` is asked for it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRequest {
    pub namespace: String,
    pub pod: String,
    /// Empty: the pod's only container.
    pub container: String,
    /// The pod's uid as the cloud knows it: a pod of the same name made
    /// again is another pod.
    #[serde(default)]
    pub uid: String,
    #[serde(default)]
    pub follow: bool,
    #[serde(default)]
    pub previous: bool,
    #[serde(default)]
    pub timestamps: bool,
    #[serde(default)]
    pub tail_lines: Option<u64>,
    /// Only lines written at or after this (Unix seconds); `sinceSeconds`
    /// is turned into this by the cloud, so both sides agree on "now".
    #[serde(default)]
    pub since_unix: Option<i64>,
    #[serde(default)]
    pub limit_bytes: Option<u64>,
}

/// Why a stream could not start or ended early, as an HTTP status and a
/// message (what a kubelet would answer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamError {
    pub code: u16,
    pub message: String,
}

impl StreamError {
    pub fn new(code: u16, message: impl Into<String>) -> StreamError {
        StreamError {
            code,
            message: message.into(),
        }
    }
}

/// Credit kept by a sender: what it may still send on one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credit {
    left: u64,
}

impl Default for Credit {
    fn default() -> Credit {
        Credit {
            left: u64::from(WINDOW),
        }
    }
}

impl Credit {
    /// How much of `want` may go now.
    pub fn take(&mut self, want: usize) -> usize {
        let n = (want as u64).min(self.left).min(CHUNK as u64);
        self.left -= n;
        n as usize
    }

    /// The receiver credited `bytes`. A receiver crediting beyond the
    /// window is a broken peer; it gets no more than the window.
    pub fn give(&mut self, bytes: u32) {
        self.left = (self.left + u64::from(bytes)).min(u64::from(WINDOW));
    }

    pub fn left(&self) -> u64 {
        self.left
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credit_bounds_what_is_in_flight() {
        let mut c = Credit::default();
        let mut sent = 0;
        loop {
            let n = c.take(100_000);
            if n == 0 {
                break;
            }
            assert!(n <= CHUNK);
            sent += n;
        }
        assert_eq!(sent, WINDOW as usize);
        c.give(1000);
        assert_eq!(c.take(5000), 1000);
        c.give(u32::MAX);
        assert_eq!(c.left(), u64::from(WINDOW));
    }
}
