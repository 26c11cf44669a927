//! A container's log as kubectl asks for it (`kubectl logs` through the
//! cloud link, `edge-rt logs` through the local API): which attempt's log
//! (`previous`), then its CRI records turned back into what the container
//! wrote, with the kubelet's options (tail, since, timestamps, a byte
//! limit), and, following, what comes until the container exits.

use std::io;
use std::time::Duration;

use crate::runtime::{logs, ContainerRecord, Runtime};

use k8s_openapi::api::core::v1::Pod;

use super::PodManager;

/// How much of a log file is read at a time.
const READ_PIECE: usize = 64 << 10;

/// How often a followed log is looked at for more.
const FOLLOW_PERIOD: Duration = Duration::from_millis(100);

/// What part of the log, and how (the kubelet's `/containerLogs` query).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogOptions {
    pub follow: bool,
    /// Each line prefixed with the time the runtime read it (RFC 3339).
    pub timestamps: bool,
    /// Only the last this many lines of what is there now.
    pub tail_lines: Option<u64>,
    /// Only lines from this instant on.
    pub since: Option<jiff::Timestamp>,
    /// Stop after this many bytes.
    pub limit_bytes: Option<u64>,
}

/// A pod, container or attempt not there to read or run in.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    /// No such pod, container or attempt (the kubelet's 404s).
    #[error("{0}")]
    NotFound(String),
    /// A request that cannot be answered as asked (the kubelet's 400s).
    #[error("{0}")]
    BadRequest(String),
}

/// Where a log goes: the local socket or a link stream. An error means the
/// reader went away, and ends the log.
pub trait Sink {
    fn write(&mut self, bytes: &[u8]) -> impl std::future::Future<Output = io::Result<()>>;
}

impl Sink for tokio::net::unix::OwnedWriteHalf {
    async fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        tokio::io::AsyncWriteExt::write_all(self, bytes).await
    }
}

impl PodManager {
    /// A pod of this node by name; `uid`, when given, must be its (a pod
    /// made again under the same name is another pod).
    pub fn lookup(
        &self,
        namespace: &str,
        name: &str,
        uid: Option<&str>,
    ) -> Result<Pod, LookupError> {
        self.find(namespace, name)
            .filter(|p| uid.is_none_or(|u| u.is_empty() || super::uid(p) == u))
            .ok_or_else(|| {
                LookupError::NotFound(format!(
                    "pods \"{name}\" not found in namespace \"{namespace}\""
                ))
            })
    }

    /// The record of the container whose log is asked for: the pod's only
    /// container when none is named, the attempt before the last when
    /// `previous`. `uid`, when given, must be the pod's (a pod made again
    /// under the same name is another pod).
    pub fn log_record(
        &self,
        namespace: &str,
        name: &str,
        uid: Option<&str>,
        container: Option<&str>,
        previous: bool,
    ) -> Result<ContainerRecord, LookupError> {
        let pod = self.lookup(namespace, name, uid)?;
        let spec = pod.spec.clone().unwrap_or_default();
        let names: Vec<String> = spec
            .init_containers
            .iter()
            .flatten()
            .chain(spec.containers.iter())
            .map(|c| c.name.clone())
            .collect();
        let container = match container.filter(|c| !c.is_empty()) {
            Some(c) if names.iter().any(|n| n == c) => c.to_string(),
            Some(c) => {
                return Err(LookupError::BadRequest(format!(
                    "container {c} is not valid for pod {name}"
                )))
            }
            None if spec.containers.len() == 1 => spec.containers[0].name.clone(),
            None => {
                return Err(LookupError::BadRequest(format!(
                    "a container name must be specified for pod {name}, choose one of: [{}]",
                    names.join(" ")
                )))
            }
        };
        let mut attempts: Vec<ContainerRecord> = self
            .context()
            .rt
            .list()
            .into_iter()
            .filter(|r| r.pod.uid == super::uid(&pod) && r.name == container)
            .collect();
        attempts.sort_by_key(|r| r.attempt);
        let pick = if previous {
            attempts.iter().rev().nth(1)
        } else {
            attempts.last()
        };
        pick.cloned().ok_or_else(|| {
            if previous {
                LookupError::BadRequest(format!(
                    "previous terminated container \"{container}\" in pod \"{name}\" not found"
                ))
            } else {
                LookupError::BadRequest(format!(
                    "container \"{container}\" in pod \"{name}\" is waiting to start: ContainerCreating"
                ))
            }
        })
    }
}

/// CRI records to what the container wrote, by the options: which lines
/// (since), how (timestamps), how much (limit).
struct Render<'a> {
    opts: &'a LogOptions,
    written: u64,
    /// Bytes of a torn CRI line (a read that ended inside it).
    torn: Vec<u8>,
}

impl Render<'_> {
    fn done(&self) -> bool {
        self.opts.limit_bytes.is_some_and(|l| self.written >= l)
    }

    /// The records of `text`'s whole lines, rendered: one entry per
    /// written line (partial records are joined to the line they end in).
    fn lines(&mut self, bytes: &[u8]) -> Vec<String> {
        self.torn.extend_from_slice(bytes);
        let Some(cut) = self.torn.iter().rposition(|b| *b == b'\n') else {
            return Vec::new();
        };
        // Whole lines only, so a character split between two reads is
        // decoded whole.
        let rest = self.torn.split_off(cut + 1);
        let whole = String::from_utf8_lossy(&std::mem::replace(&mut self.torn, rest)).into_owned();
        let mut out = Vec::new();
        let mut line = String::new();
        for l in whole.lines() {
            let Some(r) = logs::parse_line(l) else {
                continue;
            };
            if let Some(since) = self.opts.since {
                if r.time.parse::<jiff::Timestamp>().is_ok_and(|t| t < since) {
                    continue;
                }
            }
            if self.opts.timestamps {
                line.push_str(&r.time);
                line.push(' ');
            }
            line.push_str(&r.content);
            if r.full {
                line.push('\n');
                out.push(std::mem::take(&mut line));
            }
        }
        if !line.is_empty() {
            out.push(line);
        }
        out
    }

    /// `lines` cut to what the byte limit still lets through.
    fn limit(&mut self, lines: &[String]) -> Vec<u8> {
        let mut out = Vec::new();
        for l in lines {
            let left = match self.opts.limit_bytes {
                Some(max) => max.saturating_sub(self.written) as usize,
                None => usize::MAX,
            };
            let take = l.len().min(left);
            out.extend_from_slice(&l.as_bytes()[..take]);
            self.written += take as u64;
            if self.done() {
                break;
            }
        }
        out
    }
}

/// Send `rec`'s log to `sink` as `opts` ask; following, until the
/// container has exited and its log is drained, or the sink goes.
pub async fn stream(
    rt: &Runtime,
    rec: &ContainerRecord,
    opts: &LogOptions,
    sink: &mut impl Sink,
) -> io::Result<()> {
    let mut r = Render {
        opts,
        written: 0,
        torn: Vec::new(),
    };
    // What is on disk now, rotated copies first; the live file up to its
    // length now, which is where following goes on. Read a piece at a
    // time: a log may be many megabytes, the gateway's memory is not.
    let files = logs::files_of(&rec.log_path);
    let mut offset = 0u64;
    let mut tail: std::collections::VecDeque<String> = Default::default();
    for f in &files {
        let end = crate::sys::fs::metadata(f)
            .await
            .map(|m| m.len())
            .unwrap_or(0);
        let mut at = 0u64;
        while at < end {
            let want = usize::try_from(end - at)
                .unwrap_or(usize::MAX)
                .min(READ_PIECE);
            let b = crate::sys::fs::read_at(f, at, want)
                .await
                .unwrap_or_default();
            if b.is_empty() {
                break;
            }
            at += b.len() as u64;
            let lines = r.lines(&b);
            match opts.tail_lines {
                Some(n) => {
                    tail.extend(lines);
                    while tail.len() as u64 > n {
                        tail.pop_front();
                    }
                }
                None => {
                    let out = r.limit(&lines);
                    if !out.is_empty() {
                        sink.write(&out).await?;
                    }
                    if r.done() {
                        return Ok(());
                    }
                }
            }
        }
        if *f == rec.log_path {
            offset = at;
        }
    }
    if opts.tail_lines.is_some() {
        let out = r.limit(tail.make_contiguous());
        sink.write(&out).await?;
    }
    if !opts.follow || r.done() {
        return Ok(());
    }
    let mut f = Follower::new(rt, rec, offset);
    while let Some(buf) = f.next().await? {
        let lines = r.lines(&buf);
        let out = r.limit(&lines);
        if !out.is_empty() {
            sink.write(&out).await?;
        }
        if r.done() {
            break;
        }
    }
    Ok(())
}

/// What is written to a container's live log from some offset on, as it
/// comes (a rotation starts over at the new file's start), until the
/// container has exited and the log is drained.
pub struct Follower<'a> {
    rt: &'a Runtime,
    rec: &'a ContainerRecord,
    offset: u64,
}

impl<'a> Follower<'a> {
    pub fn new(rt: &'a Runtime, rec: &'a ContainerRecord, offset: u64) -> Follower<'a> {
        Follower { rt, rec, offset }
    }

    /// The next bytes, None at the end. Cancel-safe: dropped before it
    /// returns, it has taken nothing.
    pub async fn next(&mut self) -> io::Result<Option<Vec<u8>>> {
        loop {
            let exited = self.rt.get(&self.rec.id).is_none_or(|r| r.exit.is_some());
            let len = live_len(self.rec).await;
            if len < self.offset {
                self.offset = 0; // rotated: the live file starts over
            }
            if len > self.offset {
                let want = usize::try_from(len - self.offset)
                    .unwrap_or(usize::MAX)
                    .min(READ_PIECE);
                let buf = crate::sys::fs::read_at(&self.rec.log_path, self.offset, want).await?;
                if buf.is_empty() {
                    // Shorter than its length said (rotated under us).
                    tokio::time::sleep(FOLLOW_PERIOD).await;
                    continue;
                }
                self.offset += buf.len() as u64;
                return Ok(Some(buf));
            }
            if exited {
                // The log pump may still be draining the FIFO: one last look.
                tokio::time::sleep(FOLLOW_PERIOD).await;
                if live_len(self.rec).await == self.offset {
                    return Ok(None);
                }
                continue;
            }
            tokio::time::sleep(FOLLOW_PERIOD).await;
        }
    }
}

/// The length of `rec`'s live log file now (0 if it is not there).
pub async fn live_len(rec: &ContainerRecord) -> u64 {
    crate::sys::fs::metadata(&rec.log_path)
        .await
        .map(|m| m.len())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CRI: &str = "2026-01-01T00:00:00Z stdout P hel\n2026-01-01T00:00:00Z stdout F lo\n2026-01-01T00:00:01Z stderr F two\nnot a record\n2026-01-01T00:00:02Z stdout F three\n";

    fn render(opts: LogOptions, text: &str) -> String {
        let mut r = Render {
            opts: &opts,
            written: 0,
            torn: Vec::new(),
        };
        let lines = r.lines(text.as_bytes());
        String::from_utf8(r.limit(&lines)).unwrap()
    }

    #[test]
    fn records_become_what_was_written() {
        assert_eq!(render(LogOptions::default(), CRI), "hello\ntwo\nthree\n");
    }

    #[test]
    fn timestamps_since_and_limit() {
        let o = LogOptions {
            timestamps: true,
            ..Default::default()
        };
        assert_eq!(
            render(o, CRI).lines().nth(1),
            Some("2026-01-01T00:00:01Z two")
        );
        let o = LogOptions {
            since: Some("2026-01-01T00:00:01Z".parse().unwrap()),
            ..Default::default()
        };
        assert_eq!(render(o, CRI), "two\nthree\n");
        let o = LogOptions {
            limit_bytes: Some(8),
            ..Default::default()
        };
        assert_eq!(render(o, CRI), "hello\ntw");
    }

    #[test]
    fn a_torn_line_waits_for_its_end() {
        let o = LogOptions::default();
        let mut r = Render {
            opts: &o,
            written: 0,
            torn: Vec::new(),
        };
        assert!(r.lines(b"2026-01-01T00:00:00Z stdout F a\xc3").is_empty());
        // A character split between two reads comes out whole.
        assert_eq!(r.lines(b"\xa9bc\n"), vec!["a\u{e9}bc\n".to_string()]);
    }
}
