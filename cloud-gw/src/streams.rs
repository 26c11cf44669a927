//! Streams inside the links this replica holds (see
//! `outrigger_proto::stream`): the kubelet endpoint opens one on the link
//! of the pod's node; the link loop multiplexes them with sync and status.
//!
//! - [`Links`]: the links held here, by node; [`Links::open`] starts a
//!   stream on one and gives a [`Stream`] to read from.
//! - [`Mux`]: a link loop's side: channel numbers, what comes in routed to
//!   its stream, what streams send handed to the loop to write.
//!
//! A channel is free again only once the edge has ended its side, so a
//! late message of an old stream never reaches a new one. The link going
//! drops every stream's sender: its reader sees the end and says so.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use outrigger_proto::message::Message;
use outrigger_proto::stream::{Credit, Request, StreamMsg};
use tokio::sync::{mpsc, oneshot};

use crate::metrics::METRICS;

/// Stream channels are one byte: 16..=255.
const FIRST: u8 = 16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("node {0:?} has no link to this cloud-gw replica")]
    NotConnected(String),
    #[error("edge-rt on node {node:?} speaks link protocol 1.{minor}, too old for streams (1.{since} or newer)")]
    TooOld {
        node: String,
        minor: u16,
        since: u16,
    },
    #[error("node {0:?} has 240 streams open already")]
    Full(String),
    #[error("the link of node {0:?} went while the stream was opening")]
    LinkGone(String),
}

/// What a stream's owner asks of the link loop.
pub enum Cmd {
    Open {
        request: Request,
        to: mpsc::UnboundedSender<StreamMsg>,
        reply: oneshot::Sender<Result<u8, OpenError>>,
    },
    Send {
        channel: u8,
        msg: StreamMsg,
    },
}

struct Held {
    /// Which connection of the node (a reconnect here replaces it).
    id: u64,
    minor: u16,
    cmds: mpsc::UnboundedSender<Cmd>,
}

/// The links this replica holds.
#[derive(Default)]
pub struct Links {
    held: Mutex<HashMap<String, Held>>,
    next_id: std::sync::atomic::AtomicU64,
}

/// A link's place in [`Links`], removed when the link loop drops it.
pub struct Attached {
    links: Arc<Links>,
    node: String,
    id: u64,
}

impl Drop for Attached {
    fn drop(&mut self) {
        let mut held = self.links.lock();
        if held.get(&self.node).is_some_and(|h| h.id == self.id) {
            held.remove(&self.node);
        }
    }
}

impl Links {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A link of `node` at protocol minor `minor` is up here: streams to
    /// it come as commands to its loop.
    pub fn attach(
        self: &Arc<Self>,
        node: &str,
        minor: u16,
    ) -> (Attached, mpsc::UnboundedReceiver<Cmd>) {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (cmds, rx) = mpsc::unbounded_channel();
        self.lock()
            .insert(node.to_string(), Held { id, minor, cmds });
        (
            Attached {
                links: self.clone(),
                node: node.to_string(),
                id,
            },
            rx,
        )
    }

    pub fn is_connected(&self, node: &str) -> bool {
        self.lock().contains_key(node)
    }

    /// Open a stream to `node`.
    pub async fn open(&self, node: &str, request: Request) -> Result<Stream, OpenError> {
        let cmds = {
            let held = self.lock();
            let h = held
                .get(node)
                .ok_or_else(|| OpenError::NotConnected(node.to_string()))?;
            if h.minor < outrigger_proto::STREAMS_SINCE_MINOR {
                return Err(OpenError::TooOld {
                    node: node.to_string(),
                    minor: h.minor,
                    since: outrigger_proto::STREAMS_SINCE_MINOR,
                });
            }
            h.cmds.clone()
        };
        let (to, from) = mpsc::unbounded_channel();
        let (reply, answer) = oneshot::channel();
        let gone = || OpenError::LinkGone(node.to_string());
        cmds.send(Cmd::Open { request, to, reply })
            .map_err(|_| gone())?;
        let channel = answer.await.map_err(|_| gone())??;
        Ok(Stream {
            channel,
            from,
            cmds,
            ended: false,
            credit: Credit::default(),
            input: Vec::new(),
            input_end: false,
        })
    }
}

/// One open stream, as its owner sees it. Dropping it ends it.
pub struct Stream {
    channel: u8,
    from: mpsc::UnboundedReceiver<StreamMsg>,
    cmds: mpsc::UnboundedSender<Cmd>,
    /// The edge ended it: nothing to tell it.
    ended: bool,
    /// What the edge may take of the client's input now, what waits for
    /// that, and whether the input's end waits behind it.
    credit: Credit,
    input: Vec<u8>,
    input_end: bool,
}

impl Stream {
    /// The edge's next message; None once the link is gone (an `End` comes
    /// as a message). The edge's credit for input is taken here (and what
    /// waited for it sent), not returned.
    pub async fn recv(&mut self) -> Option<StreamMsg> {
        loop {
            let m = self.from.recv().await;
            if !self.took(&m) {
                return m;
            }
        }
    }

    pub fn poll_recv(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<StreamMsg>> {
        loop {
            let p = self.from.poll_recv(cx);
            match p {
                std::task::Poll::Ready(m) if !self.took(&m) => return std::task::Poll::Ready(m),
                std::task::Poll::Ready(_) => {}
                std::task::Poll::Pending => return p,
            }
        }
    }

    /// Handle what is the stream's own business: the end, and credit (true:
    /// taken, not for the owner).
    fn took(&mut self, m: &Option<StreamMsg>) -> bool {
        match m {
            Some(StreamMsg::End { .. }) => {
                self.ended = true;
                false
            }
            Some(StreamMsg::Credit { bytes }) => {
                self.credit.give(*bytes);
                self.pump();
                true
            }
            _ => false,
        }
    }

    /// The client's input (stdin, a forwarded connection's bytes), sent as
    /// the edge's credit allows.
    pub fn push_input(&mut self, bytes: &[u8]) {
        self.input.extend_from_slice(bytes);
        self.pump();
    }

    /// The end of the client's input, passed on after what it sent before.
    pub fn end_input(&mut self) {
        self.input_end = true;
        self.pump();
    }

    /// Whether input waits for the edge's credit: read no more from the
    /// client meanwhile.
    pub fn input_waiting(&self) -> bool {
        !self.input.is_empty()
    }

    fn pump(&mut self) {
        while !self.input.is_empty() {
            let n = self.credit.take(self.input.len());
            if n == 0 {
                return;
            }
            let bytes: Vec<u8> = self.input.drain(..n).collect();
            self.send(StreamMsg::Stdin { bytes });
        }
        if std::mem::take(&mut self.input_end) {
            self.send(StreamMsg::StdinEnd);
        }
    }

    /// Send the edge a message of this stream (stdin, a resize).
    pub fn send(&self, msg: StreamMsg) {
        let _ = self.cmds.send(Cmd::Send {
            channel: self.channel,
            msg,
        });
    }

    /// `bytes` were passed on to the client: the edge may send as many more.
    pub fn credit(&self, bytes: usize) {
        let bytes = u32::try_from(bytes).unwrap_or(u32::MAX);
        let _ = self.cmds.send(Cmd::Send {
            channel: self.channel,
            msg: StreamMsg::Credit { bytes },
        });
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if !self.ended {
            let _ = self.cmds.send(Cmd::Send {
                channel: self.channel,
                msg: StreamMsg::End { error: None },
            });
        }
    }
}

impl Drop for Mux {
    fn drop(&mut self) {
        METRICS
            .streams_open
            .fetch_sub(self.open.len() as u64, Relaxed);
    }
}

/// A link loop's streams.
#[derive(Default)]
pub struct Mux {
    /// Open channels: where the edge's messages go (None: our side ended,
    /// waiting for the edge's End before the number is used again).
    open: HashMap<u8, Option<mpsc::UnboundedSender<StreamMsg>>>,
    /// Where the search for a free channel starts: numbers go round, so a
    /// freed one rests before it is used again.
    next: u8,
}

impl Mux {
    /// A command of a stream owner; what to send the edge.
    pub fn command(&mut self, cmd: Cmd, node: &str) -> Option<Message> {
        match cmd {
            Cmd::Open { request, to, reply } => {
                let Some(channel) = self.free() else {
                    let _ = reply.send(Err(OpenError::Full(node.to_string())));
                    return None;
                };
                self.open.insert(channel, Some(to));
                METRICS.streams_open.fetch_add(1, Relaxed);
                let _ = reply.send(Ok(channel));
                Some(Message::Stream {
                    channel,
                    msg: StreamMsg::Open { request },
                })
            }
            Cmd::Send { channel, msg } => {
                let entry = self.open.get_mut(&channel)?;
                if matches!(msg, StreamMsg::End { .. }) {
                    *entry = None;
                }
                Some(Message::Stream { channel, msg })
            }
        }
    }

    /// A stream message from the edge; what to answer it, if anything.
    pub fn inbound(&mut self, channel: u8, msg: StreamMsg) -> Option<Message> {
        let end = matches!(msg, StreamMsg::End { .. });
        if let StreamMsg::Data { bytes } = &msg {
            METRICS.stream_bytes.fetch_add(bytes.len() as u64, Relaxed);
        }
        let answer = match self.open.get(&channel) {
            Some(Some(to)) => match to.send(msg) {
                Ok(()) => None,
                // Its owner is gone without saying so: end our side.
                Err(_) if !end => {
                    self.open.insert(channel, None);
                    Some(Message::Stream {
                        channel,
                        msg: StreamMsg::End { error: None },
                    })
                }
                Err(_) => None,
            },
            // Ours ended: late data is dropped.
            Some(None) => None,
            None if end => None,
            None => Some(Message::Stream {
                channel,
                msg: StreamMsg::End { error: None },
            }),
        };
        if end && self.open.remove(&channel).is_some() {
            METRICS.streams_open.fetch_sub(1, Relaxed);
        }
        answer
    }

    fn free(&mut self) -> Option<u8> {
        let span = 256 - FIRST as usize;
        for i in 0..span {
            let c = FIRST + ((self.next as usize + i) % span) as u8;
            if !self.open.contains_key(&c) {
                self.next = ((self.next as usize + i + 1) % span) as u8;
                return Some(c);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outrigger_proto::stream::LogRequest;

    fn open(m: &mut Mux) -> (u8, mpsc::UnboundedReceiver<StreamMsg>) {
        let (to, from) = mpsc::unbounded_channel();
        let (reply, mut answer) = oneshot::channel();
        let sent = m.command(
            Cmd::Open {
                request: Request::Logs(LogRequest::default()),
                to,
                reply,
            },
            "n",
        );
        let c = answer.try_recv().unwrap().unwrap();
        assert!(matches!(sent, Some(Message::Stream { channel, .. }) if channel == c));
        (c, from)
    }

    #[test]
    fn a_channel_is_reused_only_after_the_edge_ended_it() {
        let mut m = Mux::default();
        let (a, _ra) = open(&mut m);
        // Our side ends; the edge's late data is dropped, its End frees it.
        m.command(
            Cmd::Send {
                channel: a,
                msg: StreamMsg::End { error: None },
            },
            "n",
        );
        assert!(m.inbound(a, StreamMsg::Data { bytes: vec![1] }).is_none());
        let mut seen = vec![a];
        for _ in 0..239 {
            let (c, r) = open(&mut m);
            assert!(!seen.contains(&c), "{c} given twice");
            seen.push(c);
            std::mem::forget(r);
        }
        // All 240 taken (one still closing).
        let (to, _from) = mpsc::unbounded_channel();
        let (reply, mut answer) = oneshot::channel();
        assert!(m
            .command(
                Cmd::Open {
                    request: Request::Logs(LogRequest::default()),
                    to,
                    reply
                },
                "n"
            )
            .is_none());
        assert_eq!(answer.try_recv().unwrap(), Err(OpenError::Full("n".into())));
        m.inbound(a, StreamMsg::End { error: None });
        let (c, _r) = open(&mut m);
        assert_eq!(c, a);
    }

    #[test]
    fn messages_reach_their_stream_and_strays_are_ended() {
        let mut m = Mux::default();
        let (a, mut ra) = open(&mut m);
        assert!(m.inbound(a, StreamMsg::Opened).is_none());
        assert_eq!(ra.try_recv().unwrap(), StreamMsg::Opened);
        // A channel nobody opened: the edge is told to stop.
        assert!(matches!(
            m.inbound(200, StreamMsg::Data { bytes: vec![] }),
            Some(Message::Stream {
                channel: 200,
                msg: StreamMsg::End { .. }
            })
        ));
        // The owner went without a word: our side ends at its next message.
        drop(ra);
        assert!(m.inbound(a, StreamMsg::Data { bytes: vec![] }).is_some());
    }

    #[test]
    fn an_edge_cannot_open_a_stream() {
        // Only the cloud opens streams: an edge asking for a connection to
        // some pod (its own or another node's) is told to stop, and
        // nothing is opened.
        let mut m = Mux::default();
        let open = StreamMsg::Open {
            request: Request::PortForward(outrigger_proto::stream::PortForwardRequest {
                namespace: "ns".into(),
                pod: "elsewhere".into(),
                uid: String::new(),
                port: 22,
            }),
        };
        assert!(matches!(
            m.inbound(40, open),
            Some(Message::Stream {
                channel: 40,
                msg: StreamMsg::End { .. }
            })
        ));
        assert!(m.open.is_empty());
    }
}
