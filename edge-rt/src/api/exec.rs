//! `edge-rt exec` over the local socket: after the reply line, both sides
//! exchange frames of `kind (1 byte) | length (4 bytes, big endian) |
//! payload`. The server relays the process's output and finally its exit
//! code; the client relays its stdin and terminal size.

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
    // The terminal's size goes with the request: the command starts on a
    // terminal of that size.
    let mut first = Vec::new();
    if tty {
        if let Some((cols, rows)) = size(1).or_else(|| size(0)) {
            let mut p = cols.to_be_bytes().to_vec();
            p.extend_from_slice(&rows.to_be_bytes());
            write_frame(&mut first, RESIZE, &p).await?;
        }
    }
    let (_, stream) = super::call_then(socket, req, &first).await?;
    let (mut r, mut w) = tokio::io::split(stream);
    let _raw = (tty && nix::unistd::isatty(0).unwrap_or(false)).then(RawMode::enter);
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
