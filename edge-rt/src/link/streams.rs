//! The streams cloud-gw opens on the link (`kubectl logs` of this node's
//! pods; see `outrigger_proto::stream`): one task per stream, sending
//! within the credit the cloud gives back, so a reader that stalls holds
//! one window of its own stream and nothing else.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use outrigger_proto::message::Message;
use outrigger_proto::stream::{Credit, LogRequest, Request, StreamError, StreamMsg};
use tokio::sync::{mpsc, Notify};

use crate::pods::logs::{self, LogError, LogOptions};
use crate::pods::PodManager;

/// Messages of all streams waiting for the link writer: each stream has at
/// most a few in here, and waits when it is full.
const OUTGOING: usize = 16;

/// A stream's credit, shared between its task and the link loop.
#[derive(Default)]
struct Gate {
    credit: Mutex<Credit>,
    more: Notify,
}

impl Gate {
    fn lock(&self) -> std::sync::MutexGuard<'_, Credit> {
        self.credit.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Up to `want` bytes of credit, waiting while there is none.
    async fn take(&self, want: usize) -> usize {
        loop {
            let more = self.more.notified();
            let n = self.lock().take(want);
            if n > 0 {
                return n;
            }
            more.await;
        }
    }

    fn give(&self, bytes: u32) {
        self.lock().give(bytes);
        self.more.notify_one();
    }
}

struct Open {
    /// Which stream on this channel: what an ended one had queued is not
    /// sent on the channel's next stream.
    run: u64,
    gate: Arc<Gate>,
    task: tokio::task::AbortHandle,
}

/// What a stream task queues for the link writer, tagged with its run.
pub type Outgoing = (u64, Message);

/// This link's open streams. Dropped with the link: every stream task
/// ends (the cloud tells its clients the link went).
pub struct Streams {
    pods: Arc<PodManager>,
    out: mpsc::Sender<Outgoing>,
    open: HashMap<u8, Open>,
    next_run: u64,
}

impl Drop for Streams {
    fn drop(&mut self) {
        for s in self.open.values() {
            s.task.abort();
        }
    }
}

impl Streams {
    /// The streams of one link session, and what they send (for the link
    /// writer).
    pub fn new(pods: Arc<PodManager>) -> (Streams, mpsc::Receiver<Outgoing>) {
        let (out, rx) = mpsc::channel(OUTGOING);
        (
            Streams {
                pods,
                out,
                open: HashMap::new(),
                next_run: 0,
            },
            rx,
        )
    }

    /// A stream message from the cloud; what to answer it, if anything.
    pub fn handle(&mut self, channel: u8, msg: StreamMsg) -> Option<Message> {
        match msg {
            StreamMsg::Open { request } => {
                if let Some(old) = self.open.remove(&channel) {
                    // The cloud reuses a channel only after our End; an Open
                    // on a live one means it lost track: the old one goes.
                    old.task.abort();
                }
                let gate = Arc::new(Gate::default());
                let run = self.next_run;
                self.next_run += 1;
                let task = tokio::spawn(serve(
                    self.pods.clone(),
                    channel,
                    request,
                    gate.clone(),
                    Tagged {
                        run,
                        out: self.out.clone(),
                    },
                ));
                self.open.insert(
                    channel,
                    Open {
                        run,
                        gate,
                        task: task.abort_handle(),
                    },
                );
                None
            }
            StreamMsg::Credit { bytes } => {
                if let Some(s) = self.open.get(&channel) {
                    s.gate.give(bytes);
                }
                None
            }
            // The cloud's client went away: the task stops, and our End
            // lets the cloud use the channel again.
            StreamMsg::End { .. } => {
                let s = self.open.remove(&channel)?;
                s.task.abort();
                Some(Message::Stream {
                    channel,
                    msg: StreamMsg::End { error: None },
                })
            }
            StreamMsg::Opened | StreamMsg::Data { .. } => {
                tracing::debug!(channel, "stream message the cloud does not send; ignored");
                None
            }
        }
    }

    /// What a stream task queued: to send, if its stream is still the
    /// channel's (an ended one is forgotten once its End goes).
    pub fn outgoing(&mut self, (run, m): Outgoing) -> Option<Message> {
        let Message::Stream { channel, msg } = &m else {
            return Some(m);
        };
        if self.open.get(channel).is_none_or(|s| s.run != run) {
            return None;
        }
        if matches!(msg, StreamMsg::End { .. }) {
            self.open.remove(channel);
        }
        Some(m)
    }
}

/// A stream task's way to the link writer.
struct Tagged {
    run: u64,
    out: mpsc::Sender<Outgoing>,
}

impl Tagged {
    async fn send(&self, channel: u8, msg: StreamMsg) -> std::io::Result<()> {
        self.out
            .send((self.run, Message::Stream { channel, msg }))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))
    }
}

/// A link stream as a log's sink: bytes go in `Data` messages within the
/// stream's credit.
struct LinkSink {
    channel: u8,
    gate: Arc<Gate>,
    out: Tagged,
}

impl logs::Sink for LinkSink {
    async fn write(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() {
            let n = self.gate.take(bytes.len()).await;
            let (now, rest) = bytes.split_at(n);
            let data = StreamMsg::Data {
                bytes: now.to_vec(),
            };
            self.out.send(self.channel, data).await?;
            bytes = rest;
        }
        Ok(())
    }
}

async fn serve(pods: Arc<PodManager>, channel: u8, request: Request, gate: Arc<Gate>, out: Tagged) {
    let mut sink = LinkSink { channel, gate, out };
    let end = match request {
        Request::Logs(req) => log(&pods, &req, &mut sink).await,
    };
    let _ = sink.out.send(channel, StreamMsg::End { error: end }).await;
}

/// One container's log down a stream; the error the stream ends with.
async fn log(pods: &PodManager, req: &LogRequest, sink: &mut LinkSink) -> Option<StreamError> {
    let rec = match pods.log_record(
        &req.namespace,
        &req.pod,
        Some(&req.uid),
        Some(&req.container),
        req.previous,
    ) {
        Ok(r) => r,
        Err(LogError::NotFound(m)) => return Some(StreamError::new(404, m)),
        Err(LogError::BadRequest(m)) => return Some(StreamError::new(400, m)),
    };
    if sink
        .out
        .send(sink.channel, StreamMsg::Opened)
        .await
        .is_err()
    {
        return None;
    }
    let opts = LogOptions {
        follow: req.follow,
        timestamps: req.timestamps,
        tail_lines: req.tail_lines,
        since: req
            .since_unix
            .and_then(|s| jiff::Timestamp::from_second(s).ok()),
        limit_bytes: req.limit_bytes,
    };
    match logs::stream(&pods.context().rt, &rec, &opts, sink).await {
        Ok(()) => None,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => None,
        Err(e) => Some(StreamError::new(
            500,
            format!("reading the log of {}: {e}", rec.name),
        )),
    }
}
