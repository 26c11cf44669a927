//! A process run in a pod's running container as `kubectl exec` (through
//! the cloud link) and `edge-rt exec` (the local API) drive it: its stdio
//! as pipes or a terminal, what the client sends (stdin, its end, terminal
//! sizes) in, what the process writes out, its exit code at the end.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

use crate::runtime::exec::Stdio;
use crate::runtime::ContainerRecord;

use super::logs::LookupError;
use super::PodManager;

/// What a client sends to a running process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    Stdin(Vec<u8>),
    /// The client's stdin ended.
    StdinEnd,
    Resize {
        cols: u16,
        rows: u16,
    },
}

/// Where the process's output goes. An error means the client is gone
/// (the process is then killed).
pub trait Output {
    /// The process runs (the client may be told, and send its input).
    fn started(&mut self) -> impl std::future::Future<Output = std::io::Result<()>>;
    fn stdout(&mut self, bytes: &[u8]) -> impl std::future::Future<Output = std::io::Result<()>>;
    fn stderr(&mut self, bytes: &[u8]) -> impl std::future::Future<Output = std::io::Result<()>>;
    /// `n` bytes of stdin were handed to the process (flow control).
    fn took_stdin(&mut self, n: usize) -> impl std::future::Future<Output = ()>;
}

/// Which of the process's stdio the client wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Streams {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}

impl PodManager {
    /// The running container a process is to be run in.
    pub fn exec_record(
        &self,
        namespace: &str,
        name: &str,
        uid: Option<&str>,
        container: Option<&str>,
    ) -> Result<ContainerRecord, LookupError> {
        let rec = self.log_record(namespace, name, uid, container, false)?;
        if rec.exit.is_some() {
            return Err(LookupError::BadRequest(format!(
                "cannot exec into container {} of pod {name}: it is not running",
                rec.name
            )));
        }
        Ok(rec)
    }
}

/// A non-blocking descriptor (a pipe end or a pty master) for tokio.
pub struct Fd(AsyncFd<OwnedFd>);

impl Fd {
    pub fn new(fd: OwnedFd) -> std::io::Result<Fd> {
        let flags = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)?;
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags))?;
        // SAFETY: the AsyncFd owns the descriptor from here on.
        Ok(Fd(unsafe { AsyncFd::register(fd) }?))
    }

    pub fn raw(&self) -> i32 {
        self.0.get_ref().as_raw_fd()
    }

    /// Read some bytes; 0 at the end (EIO on a pty whose other side closed
    /// counts as the end).
    pub async fn read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let mut g = self.0.readable().await?;
            match g
                .try_io(|fd| nix::unistd::read(fd.as_raw_fd(), buf).map_err(std::io::Error::from))
            {
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }

    pub async fn write_all(&self, mut buf: &[u8]) -> std::io::Result<()> {
        while !buf.is_empty() {
            let mut g = self.0.writable().await?;
            match g.try_io(|fd| {
                // SAFETY: plain write from a live buffer to our descriptor.
                let n = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
                if n < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            }) {
                Ok(Ok(n)) => buf = &buf[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }
}

/// Set a terminal's size.
pub fn resize(fd: i32, cols: u16, rows: u16) {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize from a live struct.
    unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) };
}

/// The process's ends and ours.
struct Ends {
    stdio: Stdio,
    input: Option<Fd>,
    out: Option<Fd>,
    err: Option<Fd>,
}

/// A terminal of the container's own devpts (where `tty` and ttyname look
/// it up): its ptmx opened through the container's root, the slave taken
/// from the master (TIOCGPTPEER), so no path inside the container is
/// trusted. The host's devpts if the container has none of its own.
fn terminal(pid: Option<i32>) -> std::io::Result<(OwnedFd, OwnedFd)> {
    use std::os::fd::FromRawFd;
    let ptmx = pid.map(|p| format!("/proc/{p}/root/dev/pts/ptmx"));
    let opened = ptmx.as_deref().and_then(|p| {
        std::fs::File::options()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(p)
            .ok()
    });
    let Some(master) = opened.map(OwnedFd::from) else {
        tracing::debug!(
            ?ptmx,
            "no devpts of the container's own; the terminal is the host's"
        );
        let pty = nix::pty::openpty(None, None)?;
        return Ok((pty.master, pty.slave));
    };
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads an int; TIOCGPTPEER returns a new
    // descriptor (or -1), owned below.
    let slave = unsafe {
        if libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        );
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        OwnedFd::from_raw_fd(fd)
    };
    Ok((master, slave))
}

fn ends(s: Streams, pid: Option<i32>) -> std::io::Result<Ends> {
    let devnull = || {
        std::fs::File::options()
            .read(true)
            .write(true)
            .open("/dev/null")
            .map(OwnedFd::from)
    };
    if s.tty {
        // One terminal for all three; its master is both our input and
        // output (stderr goes to it too, as a kubelet's does).
        let (master, slave) = terminal(pid)?;
        let stdio = Stdio {
            stdin: slave.try_clone()?,
            stdout: slave.try_clone()?,
            stderr: slave,
            tty: true,
        };
        return Ok(Ends {
            stdio,
            input: None,
            out: Some(Fd::new(master)?),
            err: None,
        });
    }
    let pair = |wanted: bool| -> std::io::Result<(OwnedFd, Option<OwnedFd>)> {
        if wanted {
            let (r, w) = nix::unistd::pipe()?;
            Ok((r, Some(w)))
        } else {
            Ok((devnull()?, None))
        }
    };
    let (in_r, in_w) = pair(s.stdin)?;
    let (out_r, out_w) = if s.stdout {
        let (r, w) = nix::unistd::pipe()?;
        (Some(r), w)
    } else {
        (None, devnull()?)
    };
    let (err_r, err_w) = if s.stderr {
        let (r, w) = nix::unistd::pipe()?;
        (Some(r), w)
    } else {
        (None, devnull()?)
    };
    Ok(Ends {
        stdio: Stdio {
            stdin: in_r,
            stdout: out_w,
            stderr: err_w,
            tty: false,
        },
        input: in_w.map(Fd::new).transpose()?,
        out: out_r.map(Fd::new).transpose()?,
        err: err_r.map(Fd::new).transpose()?,
    })
}

/// How long a terminal session waits for the client's size before its
/// command starts anyway.
const FIRST_SIZE: std::time::Duration = std::time::Duration::from_millis(500);

/// What came before the command started, then what comes.
async fn next_input(
    early: &mut std::collections::VecDeque<Input>,
    inputs: &mut mpsc::UnboundedReceiver<Input>,
) -> Option<Input> {
    match early.pop_front() {
        Some(i) => Some(i),
        None => inputs.recv().await,
    }
}

/// Read from `fd` if there is one (0, the end, if not).
async fn read(fd: &Option<Fd>, buf: &mut [u8]) -> std::io::Result<usize> {
    match fd {
        Some(f) => f.read(buf).await,
        None => Ok(0),
    }
}

/// Why a process could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Start(String),
}

/// Run `command` in `rec`'s container and relay it: `inputs` in, output
/// to `out`, until the process has exited and its output is drained (or
/// the client went: the process is killed). The exit code.
pub async fn run(
    pods: &PodManager,
    rec: &ContainerRecord,
    command: &[String],
    streams: Streams,
    mut inputs: mpsc::UnboundedReceiver<Input>,
    out: &mut impl Output,
) -> Result<i32, ExecError> {
    let e = ends(streams, rec.pid)?;
    // A terminal gets the client's size before the command starts (kubectl
    // and edge-rt exec send it first): a command that asks at once sees it.
    let mut early = std::collections::VecDeque::new();
    if let (true, Some(master)) = (streams.tty, &e.out) {
        let first = tokio::time::timeout(FIRST_SIZE, async {
            while let Some(i) = inputs.recv().await {
                if let Input::Resize { cols, rows } = i {
                    resize(master.raw(), cols, rows);
                    return;
                }
                early.push_back(i);
            }
        });
        let _ = first.await;
    }
    let process = pods
        .context()
        .rt
        .exec(&rec.id, command, e.stdio)
        .map_err(|err| ExecError::Start(super::describe(&err)))?;
    if out.started().await.is_err() {
        process.kill();
        return Ok(process.wait().await);
    }
    let tty = streams.tty;
    let (mut input, stdout, stderr) = (e.input, e.out, e.err);
    let (mut out_open, mut err_open, mut client_open) = (stdout.is_some(), stderr.is_some(), true);
    let mut buf_o = vec![0u8; 16 * 1024];
    let mut buf_e = vec![0u8; 16 * 1024];
    let gone = |process: &crate::runtime::exec::ExecProcess| process.kill();
    // With nothing to read (no stdout or stderr asked for), wait for the
    // process itself.
    if !out_open && !err_open {
        loop {
            tokio::select! {
                code = process.wait() => return Ok(code),
                i = next_input(&mut early, &mut inputs), if client_open => match i {
                    Some(Input::Stdin(data)) => {
                        if let Some(w) = &input {
                            if w.write_all(&data).await.is_err() {
                                input = None;
                            }
                        }
                        out.took_stdin(data.len()).await;
                    }
                    Some(Input::StdinEnd) => input = None,
                    Some(Input::Resize { .. }) => {}
                    None => {
                        client_open = false;
                        gone(&process);
                    }
                },
            }
        }
    }
    while out_open || err_open {
        tokio::select! {
            n = read(&stdout, &mut buf_o), if out_open => match n? {
                0 => out_open = false,
                n => if out.stdout(&buf_o[..n]).await.is_err() {
                    client_open = false;
                    gone(&process);
                },
            },
            n = read(&stderr, &mut buf_e), if err_open => match n? {
                0 => err_open = false,
                n => if out.stderr(&buf_e[..n]).await.is_err() {
                    client_open = false;
                    gone(&process);
                },
            },
            i = next_input(&mut early, &mut inputs), if client_open => match i {
                Some(Input::Stdin(data)) => {
                    let n = data.len();
                    if tty {
                        if let Some(m) = &stdout {
                            m.write_all(&data).await?;
                        }
                    } else if let Some(w) = &input {
                        // A process that closed its stdin: drop the rest.
                        if w.write_all(&data).await.is_err() {
                            input = None;
                        }
                    }
                    out.took_stdin(n).await;
                }
                Some(Input::StdinEnd) => {
                    if tty {
                        if let Some(m) = &stdout {
                            m.write_all(&[4]).await?; // ^D
                        }
                    }
                    input = None;
                }
                Some(Input::Resize { cols, rows }) => {
                    if let (true, Some(m)) = (tty, &stdout) {
                        resize(m.raw(), cols, rows);
                    }
                }
                // The client is gone: so is the point of the process.
                None => {
                    client_open = false;
                    gone(&process);
                }
            },
        }
    }
    drop(input);
    Ok(process.wait().await)
}
