//! `kubectl attach`: a running container's own process. Its output as it
//! comes from the moment of attaching (what the runtime reads from its
//! stdout and stderr into the log, each to its own stream, or both to one
//! for a terminal), and, for a container that keeps its stdin open
//! (`stdin: true`), what the client types, written to the FIFO the runtime
//! gave it as stdin. Detaching leaves the process as it is: its stdin stays
//! open (`stdinOnce` is not honoured: the FIFO has no end to give it).

use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;

use tokio::sync::mpsc;

use crate::runtime::ContainerRecord;

use super::exec::{ExecError, Fd, Input, Output, Streams};
use super::logs::{self, Follower};
use super::PodManager;

/// The container's stdin, if it keeps one and the client wants it.
fn stdin_of(pods: &PodManager, rec: &ContainerRecord, wanted: bool) -> std::io::Result<Option<Fd>> {
    let Some(path) = wanted
        .then(|| pods.context().rt.stdin_of(&rec.id))
        .flatten()
    else {
        return Ok(None);
    };
    let f = std::fs::File::options()
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    Fd::new(OwnedFd::from(f)).map(Some)
}

/// Whole CRI lines of the log, as what the container wrote: (stderr?,
/// bytes), a line cut between two reads kept for the next.
fn written(torn: &mut Vec<u8>, buf: &[u8]) -> Vec<(bool, Vec<u8>)> {
    torn.extend_from_slice(buf);
    let Some(cut) = torn.iter().rposition(|b| *b == b'\n') else {
        return Vec::new();
    };
    let rest = torn.split_off(cut + 1);
    let whole = std::mem::replace(torn, rest);
    let mut out: Vec<(bool, Vec<u8>)> = Vec::new();
    for l in String::from_utf8_lossy(&whole).lines() {
        let Some(r) = crate::runtime::logs::parse_line(l) else {
            continue;
        };
        let err = r.stream == "stderr";
        let mut b = r.content.into_bytes();
        if r.full {
            b.push(b'\n');
        }
        // Runs of one stream go as one piece.
        match out.last_mut() {
            Some((e, prev)) if *e == err => prev.extend_from_slice(&b),
            _ => out.push((err, b)),
        }
    }
    out
}

/// Attach to `rec`'s process until it exits (its output drained) or the
/// client goes.
pub async fn attach(
    pods: &PodManager,
    rec: &ContainerRecord,
    streams: Streams,
    mut inputs: mpsc::UnboundedReceiver<Input>,
    out: &mut impl Output,
) -> Result<(), ExecError> {
    let mut stdin = stdin_of(pods, rec, streams.stdin)?;
    let rt = &pods.context().rt;
    let start = logs::live_len(rec).await;
    if out.started().await.is_err() {
        return Ok(());
    }
    let mut follower = Follower::new(rt, rec, start);
    let mut torn = Vec::new();
    loop {
        tokio::select! {
            b = follower.next() => {
                let Some(buf) = b? else { return Ok(()) };
                for (err, bytes) in written(&mut torn, &buf) {
                    let sent = match (err && !streams.tty, streams.stdout, streams.stderr) {
                        (false, true, _) => out.stdout(&bytes).await,
                        (true, _, true) => out.stderr(&bytes).await,
                        _ => Ok(()),
                    };
                    if sent.is_err() {
                        return Ok(());
                    }
                }
            }
            i = inputs.recv() => match i {
                Some(Input::Stdin(data)) => {
                    if let Some(w) = &stdin {
                        // A container that no longer reads: the rest is
                        // dropped.
                        if w.write_all(&data).await.is_err() {
                            stdin = None;
                        }
                    }
                    out.took_stdin(data.len()).await;
                }
                Some(Input::StdinEnd) => stdin = None,
                Some(Input::Resize { .. }) => {}
                None => return Ok(()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_is_turned_back_into_what_was_written_by_stream() {
        let mut torn = Vec::new();
        let got = written(
            &mut torn,
            b"2026-01-01T00:00:00Z stdout P hel\n2026-01-01T00:00:00Z stdout F lo\n2026-01-01T00:00:01Z stderr F oops\n2026-01-01T00:00:02Z std",
        );
        assert_eq!(
            got,
            vec![(false, b"hello\n".to_vec()), (true, b"oops\n".to_vec())]
        );
        let got = written(&mut torn, b"out F x\n");
        assert_eq!(got, vec![(false, b"x\n".to_vec())]);
    }
}
