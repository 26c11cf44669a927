//! The streams cloud-gw opens on the link (`kubectl logs`, `exec`,
//! `attach` and `port-forward` to this node's pods, and its resource
//! statistics; see `outrigger_proto::stream`): one task per stream,
//! sending within the credit the cloud gives back, so a reader that stalls
//! holds one window of its own stream and nothing else.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use outrigger_proto::message::Message;
use outrigger_proto::stream::{
    Credit, ExecRequest, LogRequest, PortForwardRequest, Request, StreamError, StreamMsg,
};
use tokio::sync::{mpsc, Notify};

use crate::pods::exec::{self, Input};
use crate::pods::logs::{self, LogOptions, LookupError};
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
    /// A process's input (exec streams).
    inputs: mpsc::UnboundedSender<Input>,
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
                let (inputs, from_cloud) = mpsc::unbounded_channel();
                let task = tokio::spawn(serve(
                    self.pods.clone(),
                    channel,
                    request,
                    from_cloud,
                    LinkSink {
                        channel,
                        gate: gate.clone(),
                        out: Tagged {
                            run,
                            out: self.out.clone(),
                        },
                    },
                ));
                self.open.insert(
                    channel,
                    Open {
                        run,
                        gate,
                        task: task.abort_handle(),
                        inputs,
                    },
                );
                None
            }
            StreamMsg::Stdin { bytes } => self.input(channel, Input::Stdin(bytes)),
            StreamMsg::StdinEnd => self.input(channel, Input::StdinEnd),
            StreamMsg::Resize { width, height } => self.input(
                channel,
                Input::Resize {
                    cols: width,
                    rows: height,
                },
            ),
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
            StreamMsg::Opened
            | StreamMsg::Data { .. }
            | StreamMsg::Stderr { .. }
            | StreamMsg::Stats { .. }
            | StreamMsg::Exit { .. } => {
                tracing::debug!(channel, "stream message the cloud does not send; ignored");
                None
            }
        }
    }

    fn input(&mut self, channel: u8, i: Input) -> Option<Message> {
        if let Some(s) = self.open.get(&channel) {
            // A stream that takes no input (a log) drops it.
            let _ = s.inputs.send(i);
        }
        None
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

impl LinkSink {
    /// `bytes` as messages of `kind`, within the stream's credit.
    async fn bytes(
        &mut self,
        mut bytes: &[u8],
        kind: fn(Vec<u8>) -> StreamMsg,
    ) -> std::io::Result<()> {
        while !bytes.is_empty() {
            let n = self.gate.take(bytes.len()).await;
            let (now, rest) = bytes.split_at(n);
            self.out.send(self.channel, kind(now.to_vec())).await?;
            bytes = rest;
        }
        Ok(())
    }
}

fn data(bytes: Vec<u8>) -> StreamMsg {
    StreamMsg::Data { bytes }
}

fn stderr(bytes: Vec<u8>) -> StreamMsg {
    StreamMsg::Stderr { bytes }
}

impl logs::Sink for LinkSink {
    async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.bytes(bytes, data).await
    }
}

impl exec::Output for LinkSink {
    async fn started(&mut self) -> std::io::Result<()> {
        self.out.send(self.channel, StreamMsg::Opened).await
    }

    async fn stdout(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.bytes(bytes, data).await
    }

    async fn stderr(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.bytes(bytes, stderr).await
    }

    async fn took_stdin(&mut self, n: usize) {
        let bytes = u32::try_from(n).unwrap_or(u32::MAX);
        let _ = self
            .out
            .send(self.channel, StreamMsg::Credit { bytes })
            .await;
    }
}

async fn serve(
    pods: Arc<PodManager>,
    channel: u8,
    request: Request,
    inputs: mpsc::UnboundedReceiver<Input>,
    mut sink: LinkSink,
) {
    let end = match request {
        Request::Logs(req) => log(&pods, &req, &mut sink).await,
        Request::Exec(req) => run(&pods, &req, inputs, &mut sink).await,
        Request::Attach(req) => attach(&pods, &req, inputs, &mut sink).await,
        Request::PortForward(req) => forward(&pods, &req, inputs, &mut sink).await,
        Request::Stats => stats(&pods, &mut sink).await,
    };
    let _ = sink.out.send(channel, StreamMsg::End { error: end }).await;
}

/// The running container an exec or attach is for, and which of its stdio
/// the client wants (a terminal has one output, as a kubelet's).
fn session_of(
    pods: &PodManager,
    req: &ExecRequest,
) -> Result<(crate::runtime::ContainerRecord, exec::Streams), StreamError> {
    let rec = pods
        .exec_record(
            &req.namespace,
            &req.pod,
            Some(&req.uid),
            Some(&req.container),
        )
        .map_err(lookup)?;
    let streams = exec::Streams {
        stdin: req.stdin,
        stdout: req.stdout,
        stderr: req.stderr && !req.tty,
        tty: req.tty,
    };
    Ok((rec, streams))
}

/// A command in a container over a stream: its exit code as `Exit`, then
/// the stream's end; the error it ends with if it could not run.
async fn run(
    pods: &PodManager,
    req: &ExecRequest,
    inputs: mpsc::UnboundedReceiver<Input>,
    sink: &mut LinkSink,
) -> Option<StreamError> {
    let (rec, streams) = match session_of(pods, req) {
        Ok(s) => s,
        Err(e) => return Some(e),
    };
    match exec::run(pods, &rec, &req.command, streams, inputs, sink).await {
        Ok(code) => {
            let _ = sink.out.send(sink.channel, StreamMsg::Exit { code }).await;
            None
        }
        // Not started: the kubelet's answer to a command that cannot run.
        Err(exec::ExecError::Start(m)) => Some(StreamError::new(500, m)),
        Err(exec::ExecError::Io(e)) => {
            Some(StreamError::new(500, format!("relaying the command: {e}")))
        }
    }
}

/// The container's own process over a stream; the error it ends with if
/// it could not attach.
async fn attach(
    pods: &PodManager,
    req: &ExecRequest,
    inputs: mpsc::UnboundedReceiver<Input>,
    sink: &mut LinkSink,
) -> Option<StreamError> {
    let (rec, streams) = match session_of(pods, req) {
        Ok(s) => s,
        Err(e) => return Some(e),
    };
    match crate::pods::attach::attach(pods, &rec, streams, inputs, sink).await {
        Ok(()) => None,
        Err(e) => Some(StreamError::new(
            500,
            format!("attaching to {}: {e}", rec.name),
        )),
    }
}

/// A connection to a port of the pod over a stream; the error it ends
/// with if the port cannot be reached or the connection fails.
async fn forward(
    pods: &PodManager,
    req: &PortForwardRequest,
    inputs: mpsc::UnboundedReceiver<Input>,
    sink: &mut LinkSink,
) -> Option<StreamError> {
    let netns = match pods.netns_of(&req.namespace, &req.pod, Some(&req.uid)) {
        Ok(n) => n,
        Err(e) => return Some(lookup(e)),
    };
    match crate::pods::forward::forward(netns, req.port, inputs, sink).await {
        Ok(()) => None,
        Err(e) => Some(StreamError::new(500, e.to_string())),
    }
}

/// The node's resource statistics, once.
async fn stats(pods: &PodManager, sink: &mut LinkSink) -> Option<StreamError> {
    let summary = crate::stats::summary(pods).await;
    let _ = sink
        .out
        .send(
            sink.channel,
            StreamMsg::Stats {
                summary: Box::new(summary),
            },
        )
        .await;
    None
}

fn lookup(e: LookupError) -> StreamError {
    match e {
        LookupError::NotFound(m) => StreamError::new(404, m),
        LookupError::BadRequest(m) => StreamError::new(400, m),
    }
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
        Err(e) => return Some(lookup(e)),
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
