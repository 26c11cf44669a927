//! `edge-rt exec` over the local socket: after the reply line, both sides
//! exchange frames of `kind (1 byte) | length (4 bytes, big endian) |
//! payload`. The server relays the process's output and finally its exit
//! code; the client relays its stdin and terminal size.

use std::os::fd::{AsRawFd, OwnedFd};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Server to client.
pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;
/// Payload: the exit code, i32 big endian.
pub const EXIT: u8 = 3;
/// Client to server.
pub const STDIN: u8 = 0;
pub const STDIN_EOF: u8 = 4;
/// Payload: columns and rows, u16 big endian each.
pub const RESIZE: u8 = 5;

/// Largest frame accepted.
pub const MAX_FRAME: usize = 64 * 1024;

pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    kind: u8,
    payload: &[u8],
) -> std::io::Result<()> {
    let mut head = [0u8; 5];
    head[0] = kind;
    head[1..].copy_from_slice(&(payload.len() as u32).to_be_bytes());
    w.write_all(&head).await?;
    w.write_all(payload).await?;
    w.flush().await
}

/// The next frame, or None at the end of the stream.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Option<(u8, Vec<u8>)>> {
    let mut head = [0u8; 5];
    match r.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes is over the {MAX_FRAME} limit"),
        ));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    Ok(Some((head[0], payload)))
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

/// A terminal's size, if `fd` is one.
pub fn size(fd: i32) -> Option<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes a winsize into a live struct.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_col > 0).then_some((ws.ws_col, ws.ws_row))
}

/// Puts the terminal on stdin in raw mode for as long as it lives.
struct RawMode(Option<nix::sys::termios::Termios>);

impl RawMode {
    fn enter() -> RawMode {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        match tcgetattr(&stdin) {
            Ok(saved) => {
                let mut raw = saved.clone();
                cfmakeraw(&mut raw);
                let _ = tcsetattr(&stdin, SetArg::TCSANOW, &raw);
                RawMode(Some(saved))
            }
            Err(_) => RawMode(None),
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSANOW,
                saved,
            );
        }
    }
}

/// The client side of `edge-rt exec`: relays stdin (when asked) and the
/// terminal size, prints what comes back, and returns the exit code.
pub async fn client(
    socket: &std::path::Path,
    req: &super::Request,
    stdin: bool,
    tty: bool,
) -> anyhow::Result<i32> {
    let (_, stream) = super::call(socket, req).await?;
    let (mut r, mut w) = tokio::io::split(stream);
    let _raw = (tty && nix::unistd::isatty(0).unwrap_or(false)).then(RawMode::enter);
    if tty {
        if let Some((cols, rows)) = size(1).or_else(|| size(0)) {
            let mut p = cols.to_be_bytes().to_vec();
            p.extend_from_slice(&rows.to_be_bytes());
            write_frame(&mut w, RESIZE, &p).await?;
        }
    }
    if stdin {
        tokio::spawn(async move {
            let mut input = tokio::io::stdin();
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match input.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        let _ = write_frame(&mut w, STDIN_EOF, &[]).await;
                        break;
                    }
                    Ok(n) => {
                        if write_frame(&mut w, STDIN, &buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            }
            // Keep the write side open: closing it would tell the server we
            // are gone.
            std::future::pending::<()>().await;
        });
    } else {
        // Hold the write half for the whole session (see above).
        std::mem::forget(w);
    }
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    loop {
        match read_frame(&mut r).await? {
            Some((STDOUT, data)) => {
                stdout.write_all(&data).await?;
                stdout.flush().await?;
            }
            Some((STDERR, data)) => {
                stderr.write_all(&data).await?;
                stderr.flush().await?;
            }
            Some((EXIT, p)) if p.len() == 4 => {
                return Ok(i32::from_be_bytes([p[0], p[1], p[2], p[3]]))
            }
            Some(_) => {}
            None => anyhow::bail!("edge-rt closed the session before the command ended"),
        }
    }
}
