//! Watch streams: one JSON event per line on a chunked response, with the
//! cacher's selector semantics (an object entering the selection is
//! ADDED, one leaving it is DELETED), periodic BOOKMARKs, the
//! initial-events-end bookmark for `sendInitialEvents`, an ERROR event
//! with a 410 Status for a revision older than the history kept, and
//! `timeoutSeconds`.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Frame;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::api::{Api, Filter, WatchStart};
use super::resources::ResourceDef;
use super::store::{Change, ChangeKind};
use super::table;

/// A response body fed from a channel.
pub struct ChannelBody {
    pub rx: mpsc::Receiver<Bytes>,
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

#[derive(Clone)]
pub enum Format {
    Json,
    /// A Table per event, with includeObject.
    Table(String),
    Partial,
}

pub struct Params {
    pub bookmarks: bool,
    pub initial_end: bool,
    pub timeout: Duration,
    pub interval: Duration,
    pub format: Format,
}

fn translate(filter: &Filter, c: &Change) -> Option<(&'static str, Value)> {
    let now_in = filter.matches(&c.obj);
    let was_in = c.old.as_ref().is_some_and(|o| filter.matches(o));
    match c.kind {
        ChangeKind::Added => now_in.then(|| ("ADDED", (*c.obj).clone())),
        ChangeKind::Deleted => now_in.then(|| ("DELETED", (*c.obj).clone())),
        ChangeKind::Modified => match (was_in, now_in) {
            (true, true) => Some(("MODIFIED", (*c.obj).clone())),
            (false, true) => Some(("ADDED", (*c.obj).clone())),
            (true, false) => {
                // What the watcher last saw, at the revision it left.
                let mut old = (**c.old.as_ref()?).clone();
                old["metadata"]["resourceVersion"] = json!(c.rv.to_string());
                Some(("DELETED", old))
            }
            (false, false) => None,
        },
    }
}

fn render(def: &ResourceDef, format: &Format, obj: &Value) -> Value {
    let obj = Api::out(def, obj);
    match format {
        Format::Json => obj,
        Format::Partial => table::partial(def, &obj),
        Format::Table(include) => table::table(
            def,
            &[&obj],
            include,
            json!({"resourceVersion": obj["metadata"]["resourceVersion"]}),
        ),
    }
}

fn line(kind: &str, object: Value) -> Bytes {
    let mut s = json!({"type": kind, "object": object}).to_string();
    s.push('\n');
    Bytes::from(s)
}

fn bookmark(def: &ResourceDef, rv: u64, initial_end: bool) -> Bytes {
    let mut meta = json!({"resourceVersion": rv.to_string(), "creationTimestamp": null});
    if initial_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    line(
        "BOOKMARK",
        json!({"kind": def.kind, "apiVersion": def.api_version(), "metadata": meta}),
    )
}

pub async fn run(
    api: Arc<Api>,
    def: Arc<ResourceDef>,
    filter: Filter,
    start: WatchStart,
    tx: mpsc::Sender<Bytes>,
    p: Params,
) {
    macro_rules! send {
        ($b:expr) => {
            if tx.send($b).await.is_err() {
                return;
            }
        };
    }
    if let Some(e) = start.expired {
        send!(line("ERROR", e.to_status()));
        return;
    }
    for o in &start.initial {
        send!(line("ADDED", render(&def, &p.format, o)));
    }
    if p.initial_end {
        send!(bookmark(&def, start.rv, true));
    }
    for c in &start.replay {
        if let Some((k, o)) = translate(&filter, c) {
            send!(line(k, render(&def, &p.format, &o)));
        }
    }
    let Some(mut rx) = start.rx else {
        return;
    };
    let deadline = tokio::time::sleep(p.timeout);
    tokio::pin!(deadline);
    let mut tick = tokio::time::interval(p.interval.max(Duration::from_millis(10)));
    tick.tick().await;
    loop {
        tokio::select! {
            c = rx.recv() => {
                let Some(c) = c else { return };
                if let Some((k, o)) = translate(&filter, &c) {
                    send!(line(k, render(&def, &p.format, &o)));
                }
            }
            _ = tick.tick(), if p.bookmarks => {
                // Everything up to the bookmark's revision goes first, so
                // a client resuming from it misses nothing.
                let rv = api.current_rv();
                let mut after = vec![];
                while let Ok(c) = rx.try_recv() {
                    if c.rv <= rv {
                        if let Some((k, o)) = translate(&filter, &c) {
                            send!(line(k, render(&def, &p.format, &o)));
                        }
                    } else {
                        after.push(c);
                    }
                }
                send!(bookmark(&def, rv, false));
                for c in after {
                    if let Some((k, o)) = translate(&filter, &c) {
                        send!(line(k, render(&def, &p.format, &o)));
                    }
                }
            }
            _ = &mut deadline => return,
            _ = tx.closed() => return,
        }
    }
}
