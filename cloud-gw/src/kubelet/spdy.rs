//! SPDY/3.1, the server side of what Kubernetes' streaming protocols use
//! of it: an API server that translates kubectl's WebSocket into SPDY (a
//! Node not declaring `ExtendWebSocketsToKubelet`, or an older cluster),
//! kubectl's own fallback when a WebSocket is refused, and port-forward,
//! which is SPDY either way (raw, or as the bytes inside a WebSocket).
//!
//! The peer is always moby/spdystream (client-go's), so this is the subset
//! it speaks: the client opens streams (SYN_STREAM, odd ids) and every one
//! is answered (SYN_REPLY, or it blocks forever); DATA with FIN closes a
//! direction; RST_STREAM drops a stream; PING is echoed; GOAWAY ends the
//! connection. Neither side does flow control (spdystream has none), so
//! back-pressure is the socket's: a stream whose consumer is slow stops
//! the reading of the connection. Header blocks are zlib with the SPDY/3
//! dictionary, one inflate context for all that comes in and one deflate
//! context for all that goes out, each block ended by a sync flush.
//!
//! [`Codec`] is the pure part (frames to and from bytes); [`Conn`] runs a
//! connection: it answers what the protocol needs by itself and hands the
//! streams the client opens to its owner as [`Incoming`].

use std::collections::HashMap;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// The zlib dictionary of SPDY/3 header blocks (draft 3, 2.6.10.1).
const DICTIONARY: &[u8] = include_bytes!("spdy3-dictionary.bin");

/// The HTTP upgrade token.
pub const UPGRADE: &str = "SPDY/3.1";

const VERSION: u16 = 3;
const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const HEADERS: u16 = 8;
const FLAG_FIN: u8 = 0x01;

/// RST_STREAM status codes.
pub const PROTOCOL_ERROR: u32 = 1;
pub const REFUSED_STREAM: u32 = 3;
pub const CANCEL: u32 = 5;

/// A header block may inflate to at most this: a client's headers are a
/// few short pairs; anything near this is not a client of ours.
const MAX_HEADERS: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum SpdyError {
    #[error("SPDY: {0}")]
    Protocol(String),
    #[error("SPDY connection: {0}")]
    Io(#[from] std::io::Error),
}

fn protocol(m: impl Into<String>) -> SpdyError {
    SpdyError::Protocol(m.into())
}

/// Header names (lower case) and values, in the order sent.
pub type Headers = Vec<(String, String)>;

/// The first value of `name` (lower case) in `h`.
pub fn header<'a>(h: &'a Headers, name: &str) -> Option<&'a str> {
    h.iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// A frame as read.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    SynStream {
        id: u32,
        fin: bool,
        headers: Headers,
    },
    Data {
        id: u32,
        fin: bool,
        data: Bytes,
    },
    Rst {
        id: u32,
        status: u32,
    },
    Ping {
        id: u32,
    },
    GoAway,
    /// Anything else (SETTINGS, WINDOW_UPDATE, HEADERS, a SYN_REPLY a
    /// server never gets): nothing to do.
    Ignored,
}

/// Frames to and from bytes, with the connection's two zlib contexts.
pub struct Codec {
    inflate: Decompress,
    deflate: Compress,
}

impl Default for Codec {
    fn default() -> Codec {
        let mut deflate = Compress::new(Compression::default(), true);
        // Only fails for a stream already begun.
        let _ = deflate.set_dictionary(DICTIONARY);
        Codec {
            inflate: Decompress::new(true),
            deflate,
        }
    }
}

impl Codec {
    /// One whole frame from the front of `buf`, if it holds one.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, SpdyError> {
        if buf.len() < 8 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([0, buf[5], buf[6], buf[7]]) as usize;
        if buf.len() < 8 + len {
            buf.reserve(8 + len - buf.len());
            return Ok(None);
        }
        let first = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
        let flags = buf[4];
        buf.advance(8);
        let mut p = buf.split_to(len).freeze();
        if first & 0x8000_0000 == 0 {
            let id = first & 0x7fff_ffff;
            if id == 0 {
                return Err(protocol("a data frame on stream 0"));
            }
            return Ok(Some(Frame::Data {
                id,
                fin: flags & FLAG_FIN != 0,
                data: p,
            }));
        }
        let version = ((first >> 16) & 0x7fff) as u16;
        if version != VERSION {
            return Err(protocol(format!("version {version}, not 3")));
        }
        let short = || protocol("a control frame shorter than its kind");
        Ok(Some(match (first & 0xffff) as u16 {
            SYN_STREAM => {
                if p.len() < 10 {
                    return Err(short());
                }
                let id = p.get_u32() & 0x7fff_ffff;
                p.advance(6); // associated stream, priority, slot
                let headers = self.headers(&p)?;
                Frame::SynStream {
                    id,
                    fin: flags & FLAG_FIN != 0,
                    headers,
                }
            }
            // Their blocks still go through the inflater, which must see
            // every block to stay in step.
            SYN_REPLY | HEADERS => {
                if p.len() < 4 {
                    return Err(short());
                }
                p.advance(4);
                self.headers(&p)?;
                Frame::Ignored
            }
            RST_STREAM => {
                if p.len() < 8 {
                    return Err(short());
                }
                Frame::Rst {
                    id: p.get_u32() & 0x7fff_ffff,
                    status: p.get_u32(),
                }
            }
            PING => {
                if p.len() < 4 {
                    return Err(short());
                }
                Frame::Ping { id: p.get_u32() }
            }
            GOAWAY => Frame::GoAway,
            _ => Frame::Ignored,
        }))
    }

    /// A compressed header block, inflated and parsed.
    fn headers(&mut self, mut input: &[u8]) -> Result<Headers, SpdyError> {
        let mut out = Vec::with_capacity(256);
        while !input.is_empty() {
            if out.len() == out.capacity() {
                if out.len() >= MAX_HEADERS {
                    return Err(protocol("a header block over 64 KiB"));
                }
                out.reserve(out.len());
            }
            let before = self.inflate.total_in();
            let r = self
                .inflate
                .decompress_vec(input, &mut out, FlushDecompress::Sync);
            let used = (self.inflate.total_in() - before) as usize;
            input = &input[used..];
            match r {
                Ok(Status::StreamEnd) => break,
                Ok(_) => {}
                Err(e) if e.needs_dictionary().is_some() => {
                    self.inflate
                        .set_dictionary(DICTIONARY)
                        .map_err(|e| protocol(format!("header dictionary: {e}")))?;
                }
                Err(e) => return Err(protocol(format!("header block: {e}"))),
            }
        }
        parse_block(&out)
    }

    /// The header block of `headers`, compressed.
    fn block(&mut self, headers: &[(&str, &str)]) -> Vec<u8> {
        let mut raw = Vec::new();
        raw.put_u32(headers.len() as u32);
        for (n, v) in headers {
            raw.put_u32(n.len() as u32);
            raw.extend(n.bytes().map(|b| b.to_ascii_lowercase()));
            raw.put_u32(v.len() as u32);
            raw.extend_from_slice(v.as_bytes());
        }
        let mut out = Vec::with_capacity(raw.len() + 64);
        let mut input = &raw[..];
        loop {
            if out.len() == out.capacity() {
                out.reserve(64.max(out.len()));
            }
            let before = self.deflate.total_in();
            // Compressing into memory does not fail.
            let _ = self
                .deflate
                .compress_vec(input, &mut out, FlushCompress::Sync);
            input = &input[(self.deflate.total_in() - before) as usize..];
            // A sync flush is whole once it left room unused.
            if input.is_empty() && out.len() < out.capacity() {
                break;
            }
        }
        out
    }

    fn control(out: &mut BytesMut, kind: u16, flags: u8, body: &[u8]) {
        out.put_u32(0x8000_0000 | (u32::from(VERSION) << 16) | u32::from(kind));
        out.put_u32((u32::from(flags) << 24) | body.len() as u32);
        out.extend_from_slice(body);
    }

    /// SYN_REPLY to stream `id`, with no headers.
    pub fn syn_reply(&mut self, id: u32, out: &mut BytesMut) {
        let mut body = id.to_be_bytes().to_vec();
        body.extend(self.block(&[]));
        Codec::control(out, SYN_REPLY, 0, &body);
    }

    /// DATA on stream `id` (`fin`: the last from us), in frames of at
    /// most 16 MiB.
    pub fn data(id: u32, data: &[u8], fin: bool, out: &mut BytesMut) {
        const MAX: usize = (1 << 24) - 1;
        let mut chunks = data.chunks(MAX).peekable();
        if chunks.peek().is_none() {
            out.put_u32(id & 0x7fff_ffff);
            out.put_u32(if fin { u32::from(FLAG_FIN) << 24 } else { 0 });
            return;
        }
        while let Some(c) = chunks.next() {
            let last = fin && chunks.peek().is_none();
            out.put_u32(id & 0x7fff_ffff);
            out.put_u32(((if last { FLAG_FIN } else { 0 } as u32) << 24) | c.len() as u32);
            out.extend_from_slice(c);
        }
    }

    pub fn rst(id: u32, status: u32, out: &mut BytesMut) {
        let mut body = [0u8; 8];
        body[..4].copy_from_slice(&id.to_be_bytes());
        body[4..].copy_from_slice(&status.to_be_bytes());
        Codec::control(out, RST_STREAM, 0, &body);
    }

    pub fn ping(id: u32, out: &mut BytesMut) {
        Codec::control(out, PING, 0, &id.to_be_bytes());
    }

    /// GOAWAY (status OK) naming the last stream the client opened.
    pub fn goaway(last: u32, out: &mut BytesMut) {
        let mut body = [0u8; 8];
        body[..4].copy_from_slice(&last.to_be_bytes());
        Codec::control(out, GOAWAY, 0, &body);
    }

    /// A SYN_STREAM as a client sends it (for tests).
    pub fn syn_stream(&mut self, id: u32, fin: bool, headers: &[(&str, &str)], out: &mut BytesMut) {
        let mut body = id.to_be_bytes().to_vec();
        body.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        body.extend(self.block(headers));
        Codec::control(out, SYN_STREAM, if fin { FLAG_FIN } else { 0 }, &body);
    }
}

/// A header block's name/value pairs (a value holding NULs is several).
fn parse_block(mut b: &[u8]) -> Result<Headers, SpdyError> {
    let bad = || protocol("a malformed header block");
    let take = |b: &mut &[u8]| -> Result<String, SpdyError> {
        if b.len() < 4 {
            return Err(bad());
        }
        let n = b.get_u32() as usize;
        if b.len() < n {
            return Err(bad());
        }
        let s = String::from_utf8_lossy(&b[..n]).into_owned();
        b.advance(n);
        Ok(s)
    };
    if b.len() < 4 {
        return Err(bad());
    }
    let count = b.get_u32() as usize;
    let mut out = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        let name = take(&mut b)?.to_ascii_lowercase();
        let value = take(&mut b)?;
        for v in value.split('\0') {
            out.push((name.clone(), v.to_string()));
        }
    }
    Ok(out)
}

/// What goes out, in the order given.
enum Out {
    Reply(u32),
    Data {
        id: u32,
        data: Bytes,
        fin: bool,
    },
    Rst(u32, u32),
    Ping(u32),
    /// GOAWAY, then the write side is shut.
    Close(u32),
}

/// A stream the client opened: its headers, what it sends, and the way to
/// answer on it. Dropping it leaves the stream as it is (the connection's
/// end closes it).
pub struct Incoming {
    pub id: u32,
    pub headers: Headers,
    /// Its data, until the client's FIN or RST (then None).
    pub data: mpsc::Receiver<Bytes>,
    pub tx: Sender,
}

/// The way to send on a connection; clones share it.
#[derive(Clone)]
pub struct Sender {
    out: mpsc::Sender<Out>,
    /// Changes never; its sender goes when the connection's reader ends.
    read_end: tokio::sync::watch::Receiver<()>,
}

impl Sender {
    /// Bytes on stream `id`; waits while the socket is behind. False once
    /// the connection is gone.
    pub async fn data(&self, id: u32, data: Bytes) -> bool {
        self.out
            .send(Out::Data {
                id,
                data,
                fin: false,
            })
            .await
            .is_ok()
    }

    /// Our last on stream `id` (FIN).
    pub async fn fin(&self, id: u32) {
        let _ = self
            .out
            .send(Out::Data {
                id,
                data: Bytes::new(),
                fin: true,
            })
            .await;
    }

    pub async fn reset(&self, id: u32, status: u32) {
        let _ = self.out.send(Out::Rst(id, status)).await;
    }

    /// GOAWAY and the end of what we send; the connection ends once the
    /// client closes or the reader is dropped.
    pub async fn close(&self) {
        let _ = self.out.send(Out::Close(0)).await;
    }

    /// Resolves once the client's side has ended (closed, reset, broken).
    pub async fn closed(&self) {
        let mut r = self.read_end.clone();
        while r.changed().await.is_ok() {}
    }
}

/// A running connection: the streams the client opens, in order.
pub struct Conn {
    pub incoming: mpsc::Receiver<Incoming>,
    pub tx: Sender,
}

/// Serve SPDY on `io` (after the upgrade): tasks read and write it until
/// either side ends; `Conn` gives the streams to its owner.
pub fn serve<IO>(io: IO) -> Conn
where
    IO: AsyncRead + AsyncWrite + Send + 'static,
{
    let (rd, wr) = tokio::io::split(io);
    let (out_tx, out_rx) = mpsc::channel(16);
    let (in_tx, in_rx) = mpsc::channel(16);
    let codec = std::sync::Arc::new(std::sync::Mutex::new(Codec::default()));
    let (read_end_tx, read_end) = tokio::sync::watch::channel(());
    let tx = Sender {
        out: out_tx,
        read_end,
    };
    tokio::spawn(write_loop(wr, out_rx, codec.clone()));
    let reader = tx.clone();
    tokio::spawn(async move {
        read_loop(rd, in_tx, reader, codec).await;
        drop(read_end_tx);
    });
    Conn {
        incoming: in_rx,
        tx,
    }
}

type Shared = std::sync::Arc<std::sync::Mutex<Codec>>;

fn lock(c: &Shared) -> std::sync::MutexGuard<'_, Codec> {
    c.lock().unwrap_or_else(|p| p.into_inner())
}

async fn write_loop<W: AsyncWrite>(wr: W, mut rx: mpsc::Receiver<Out>, codec: Shared) {
    tokio::pin!(wr);
    let mut buf = BytesMut::with_capacity(16 << 10);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        let mut closing = false;
        // What is queued goes in one write.
        while let Some(o) = next.take() {
            match o {
                Out::Reply(id) => lock(&codec).syn_reply(id, &mut buf),
                Out::Data { id, data, fin } => Codec::data(id, &data, fin, &mut buf),
                Out::Rst(id, status) => Codec::rst(id, status, &mut buf),
                Out::Ping(id) => Codec::ping(id, &mut buf),
                Out::Close(last) => {
                    Codec::goaway(last, &mut buf);
                    closing = true;
                    break;
                }
            }
            if buf.len() < 64 << 10 {
                next = rx.try_recv().ok();
            }
        }
        if wr.write_all(&buf).await.is_err() || wr.flush().await.is_err() {
            return;
        }
        buf.clear();
        if closing {
            let _ = wr.shutdown().await;
            return;
        }
    }
}

async fn read_loop<R: AsyncRead>(
    rd: R,
    incoming: mpsc::Sender<Incoming>,
    tx: Sender,
    codec: Shared,
) {
    tokio::pin!(rd);
    let mut buf = BytesMut::with_capacity(16 << 10);
    let mut streams: HashMap<u32, mpsc::Sender<Bytes>> = HashMap::new();
    loop {
        let decoded = lock(&codec).decode(&mut buf);
        let frame = match decoded {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(error = %e, "SPDY connection ends");
                tx.close().await;
                return;
            }
        };
        let Some(frame) = frame else {
            match rd.read_buf(&mut buf).await {
                Ok(0) => {
                    tracing::trace!("SPDY connection: the client's end");
                    return;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "SPDY connection read");
                    return;
                }
                Ok(_) => continue,
            }
        };
        tracing::trace!(?frame, "SPDY frame");
        match frame {
            Frame::SynStream { id, fin, headers } => {
                if id % 2 == 0 || streams.contains_key(&id) {
                    let _ = tx.out.send(Out::Rst(id, PROTOCOL_ERROR)).await;
                    continue;
                }
                // Answered at once: the client writes nothing before it.
                if tx.out.send(Out::Reply(id)).await.is_err() {
                    return;
                }
                let (dtx, data) = mpsc::channel(8);
                if !fin {
                    streams.insert(id, dtx);
                }
                let s = Incoming {
                    id,
                    headers,
                    data,
                    tx: tx.clone(),
                };
                if incoming.send(s).await.is_err() {
                    tx.out.send(Out::Rst(id, REFUSED_STREAM)).await.ok();
                }
            }
            Frame::Data { id, fin, data } => {
                if let Some(s) = streams.get(&id) {
                    // Waits while its consumer is behind (no flow control:
                    // the socket is the back-pressure).
                    if !data.is_empty() && s.send(data).await.is_err() {
                        streams.remove(&id);
                    }
                }
                if fin {
                    streams.remove(&id);
                }
            }
            Frame::Rst { id, .. } => {
                streams.remove(&id);
            }
            Frame::Ping { id } => {
                let _ = tx.out.send(Out::Ping(id)).await;
            }
            Frame::GoAway => return,
            Frame::Ignored => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dictionary_is_spdy3s() {
        assert_eq!(DICTIONARY.len(), 1423);
        assert!(DICTIONARY.starts_with(b"\0\0\0\x07options"));
    }

    #[test]
    fn header_blocks_share_one_context_each_way() {
        let (mut client, mut server) = (Codec::default(), Codec::default());
        let mut wire = BytesMut::new();
        client.syn_stream(
            1,
            false,
            &[
                ("streamType", "error"),
                ("port", "8080"),
                ("requestID", "0"),
            ],
            &mut wire,
        );
        client.syn_stream(
            3,
            true,
            &[("streamtype", "data"), ("port", "8080")],
            &mut wire,
        );
        Codec::data(3, b"hello", true, &mut wire);
        // Byte by byte: nothing is decoded before it is whole.
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        for b in wire {
            buf.put_u8(b);
            while let Some(f) = server.decode(&mut buf).unwrap() {
                frames.push(f);
            }
        }
        let h = |pairs: &[(&str, &str)]| -> Headers {
            pairs
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(
            frames,
            vec![
                Frame::SynStream {
                    id: 1,
                    fin: false,
                    headers: h(&[
                        ("streamtype", "error"),
                        ("port", "8080"),
                        ("requestid", "0")
                    ])
                },
                Frame::SynStream {
                    id: 3,
                    fin: true,
                    headers: h(&[("streamtype", "data"), ("port", "8080")])
                },
                Frame::Data {
                    id: 3,
                    fin: true,
                    data: Bytes::from_static(b"hello")
                },
            ]
        );
        // Our replies inflate in the client's one context.
        let mut wire = BytesMut::new();
        server.syn_reply(1, &mut wire);
        server.syn_reply(3, &mut wire);
        Codec::ping(7, &mut wire);
        let mut got = Vec::new();
        while let Some(f) = client.decode(&mut wire).unwrap() {
            got.push(f);
        }
        assert_eq!(
            got,
            vec![Frame::Ignored, Frame::Ignored, Frame::Ping { id: 7 }]
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut c = Codec::default();
        let mut b = BytesMut::from(&[0x80u8, 2, 0, 1, 0, 0, 0, 2, 0, 0][..]);
        assert!(c.decode(&mut b).is_err());
        let mut b = BytesMut::from(
            &[
                0x80u8, 3, 0, 1, 0, 0, 0, 12, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 2,
            ][..],
        );
        assert!(c.decode(&mut b).is_err());
        let mut b = BytesMut::from(&[0u8, 0, 0, 0, 0, 0, 0, 0][..]);
        assert!(c.decode(&mut b).is_err());
        assert!(parse_block(&[0, 0, 0, 1, 0, 0, 0, 9, b'a']).is_err());
    }

    #[tokio::test]
    async fn a_connection_answers_streams_pings_and_passes_data() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let mut conn = serve(b);
        let (mut rd, mut wr) = tokio::io::split(a);
        let mut client = Codec::default();
        let mut wire = BytesMut::new();
        client.syn_stream(1, false, &[("streamtype", "data")], &mut wire);
        Codec::ping(9, &mut wire);
        Codec::data(1, b"abc", false, &mut wire);
        wr.write_all(&wire).await.unwrap();
        let mut s = conn.incoming.recv().await.unwrap();
        assert_eq!(header(&s.headers, "streamType"), Some("data"));
        assert_eq!(s.data.recv().await.unwrap(), Bytes::from_static(b"abc"));
        assert!(s.tx.data(1, Bytes::from_static(b"xyz")).await);
        s.tx.fin(1).await;
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        while got.len() < 4 {
            rd.read_buf(&mut buf).await.unwrap();
            while let Some(f) = client.decode(&mut buf).unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got[0], Frame::Ignored); // the SYN_REPLY
        assert_eq!(got[1], Frame::Ping { id: 9 });
        assert_eq!(
            got[2],
            Frame::Data {
                id: 1,
                fin: false,
                data: Bytes::from_static(b"xyz")
            }
        );
        assert!(matches!(
            got[3],
            Frame::Data {
                id: 1,
                fin: true,
                ..
            }
        ));
        let mut wire = BytesMut::new();
        Codec::data(1, b"", true, &mut wire);
        wr.write_all(&wire).await.unwrap();
        assert!(s.data.recv().await.is_none());
    }
}
