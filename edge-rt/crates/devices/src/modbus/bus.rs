//! One task per Modbus line: a serial port (RS-485 with several slaves, or
//! RS-232) or a TCP target. The task owns the port; devices send it
//! requests and it carries them out one at a time, in the order they came,
//! with the silence the standard asks for between frames (3.5 characters;
//! 1.75 ms above 19200 baud), so several slaves share one bus.
//!
//! What goes wrong stays with the request it happened to: a slave that
//! does not answer (timeout), answers garbage (bad CRC, another slave's
//! address, a wrong function: tokio-modbus drops what does not check) or an
//! exception code. A port that fails (the USB adapter pulled, the PTY gone)
//! is closed and reopened with back-off; meanwhile requests are answered
//! at once with [`BusError::PortGone`], so every device says what happened
//! and none waits.

use std::io;
use std::time::Duration;

use outrigger_proto::device::{Parity, SerialLine, Table, TcpTarget};
use tokio::sync::{mpsc, oneshot};
use tokio_modbus::client::{Context, Reader, Writer};
use tokio_modbus::prelude::SlaveContext;
use tokio_modbus::Slave;

use super::codec::Words;

/// What a line is: devices with the same one share a task.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LineId {
    Serial(String),
    Tcp(String, u16),
}

impl std::fmt::Display for LineId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LineId::Serial(p) => f.write_str(p),
            LineId::Tcp(h, p) => write!(f, "{h}:{p}"),
        }
    }
}

/// How to open a line.
#[derive(Debug, Clone, PartialEq)]
pub enum LineConfig {
    Serial(SerialLine),
    Tcp(TcpTarget),
}

impl LineConfig {
    pub fn id(&self) -> LineId {
        match self {
            LineConfig::Serial(l) => LineId::Serial(l.port.clone()),
            LineConfig::Tcp(t) => LineId::Tcp(t.host.clone(), t.port),
        }
    }

    /// The silence between two frames: 3.5 character times (a character
    /// is start, data, parity and stop bits), fixed at 1.75 ms above 19200
    /// baud as the standard says; none over TCP.
    pub fn gap(&self) -> Duration {
        match self {
            LineConfig::Tcp(_) => Duration::ZERO,
            LineConfig::Serial(l) if l.baud_rate > 19200 => Duration::from_micros(1750),
            LineConfig::Serial(l) => {
                let bits = 1
                    + u64::from(l.data_bits)
                    + u64::from(l.parity != Parity::None)
                    + u64::from(l.stop_bits);
                Duration::from_micros(bits * 3_500_000 / u64::from(l.baud_rate.max(1)))
            }
        }
    }
}

// A write carries its registers inline (fixed, no allocation); requests
// are few and move once through the line's channel.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Op {
    Read {
        table: Table,
        address: u16,
        count: u16,
    },
    WriteCoil {
        address: u16,
        value: bool,
    },
    WriteRegisters {
        address: u16,
        words: Words,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Bits(Vec<bool>),
    Words(Vec<u16>),
    Written,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("exception from the device: {0}")]
    Exception(String),
    #[error("unusable answer: {0}")]
    Garbage(String),
    #[error("line {line} unavailable: {reason}")]
    PortGone { line: String, reason: String },
    #[error("the line's task has stopped")]
    Closed,
}

impl BusError {
    /// The Reachable condition's reason for it.
    pub fn reason(&self) -> &'static str {
        match self {
            BusError::Timeout(_) => "Timeout",
            BusError::Exception(_) => "Exception",
            BusError::Garbage(_) => "BadResponse",
            BusError::PortGone { .. } => "PortUnavailable",
            BusError::Closed => "Stopped",
        }
    }
}

struct Request {
    slave: u8,
    timeout: Duration,
    op: Op,
    reply: oneshot::Sender<Result<Reply, BusError>>,
}

/// A device's way to its line.
#[derive(Clone)]
pub struct Bus {
    tx: mpsc::Sender<Request>,
}

impl Bus {
    /// Start the line's task on the current runtime; it ends when the last
    /// `Bus` handle is dropped.
    pub fn start(cfg: LineConfig) -> Bus {
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(run(cfg, rx));
        Bus { tx }
    }

    pub async fn call(&self, slave: u8, timeout: Duration, op: Op) -> Result<Reply, BusError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request {
                slave,
                timeout,
                op,
                reply,
            })
            .await
            .map_err(|_| BusError::Closed)?;
        rx.await.map_err(|_| BusError::Closed)?
    }
}

async fn open(cfg: &LineConfig) -> io::Result<Context> {
    match cfg {
        LineConfig::Serial(l) => {
            use tokio_serial::{DataBits, SerialPortBuilderExt, StopBits};
            let parity = match l.parity {
                Parity::None => tokio_serial::Parity::None,
                Parity::Even => tokio_serial::Parity::Even,
                Parity::Odd => tokio_serial::Parity::Odd,
            };
            let data_bits = match l.data_bits {
                5 => DataBits::Five,
                6 => DataBits::Six,
                7 => DataBits::Seven,
                _ => DataBits::Eight,
            };
            let stop_bits = if l.stop_bits == 2 {
                StopBits::Two
            } else {
                StopBits::One
            };
            let port = tokio_serial::new(&l.port, l.baud_rate)
                .parity(parity)
                .data_bits(data_bits)
                .stop_bits(stop_bits)
                .open_native_async()
                .map_err(io::Error::from)?;
            Ok(tokio_modbus::client::rtu::attach(port))
        }
        LineConfig::Tcp(t) => {
            let addr = resolve(&t.host, t.port).await?;
            let s =
                tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
                    .await
                    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
            s.set_nodelay(true)?;
            Ok(tokio_modbus::client::tcp::attach(s))
        }
    }
}

/// A host name through the resolver, on a guarded blocking thread (never
/// tokio's own lookup: it runs getaddrinfo outside the fork guard).
async fn resolve(host: &str, port: u16) -> io::Result<std::net::SocketAddr> {
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Ok((ip, port).into());
    }
    let h = host.to_string();
    outrigger_sys::blocking(move || {
        use std::net::ToSocketAddrs;
        (h.as_str(), port)
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address"))
    })
    .await
    .map_err(|e| io::Error::other(e.to_string()))?
}

async fn run(cfg: LineConfig, mut rx: mpsc::Receiver<Request>) {
    let id = cfg.id();
    let gap = cfg.gap();
    let mut backoff = Duration::from_millis(500);
    let mut said: Option<String> = None;
    loop {
        let mut ctx = match open(&cfg).await {
            Ok(c) => {
                tracing::info!(line = %id, "modbus line open");
                said = None;
                backoff = Duration::from_millis(500);
                c
            }
            Err(e) => {
                let reason = e.to_string();
                if said.as_deref() != Some(&reason) {
                    tracing::warn!(line = %id, error = reason, "modbus line unavailable; retrying");
                    said = Some(reason.clone());
                }
                // Answer what comes meanwhile at once, until it is time to
                // try again.
                let until = tokio::time::Instant::now() + backoff;
                loop {
                    tokio::select! {
                        r = rx.recv() => match r {
                            Some(r) => {
                                let _ = r.reply.send(Err(BusError::PortGone {
                                    line: id.to_string(),
                                    reason: reason.clone(),
                                }));
                            }
                            None => return,
                        },
                        _ = tokio::time::sleep_until(until) => break,
                    }
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        while let Some(r) = rx.recv().await {
            let out = transact(&mut ctx, r.slave, r.timeout, &r.op).await;
            let (broken, reset) = match &out {
                Err(Failure::Port(_)) => (true, true),
                Err(Failure::Reset(_)) => (false, true),
                _ => (false, false),
            };
            let answer = out.map_err(|f| match f {
                Failure::Bus(b) | Failure::Reset(b) => b,
                Failure::Port(e) => BusError::PortGone {
                    line: id.to_string(),
                    reason: e.to_string(),
                },
            });
            let _ = r.reply.send(answer);
            tokio::time::sleep(gap).await;
            if broken {
                tracing::warn!(line = %id, "modbus line failed; reopening");
            }
            if reset {
                // A frame decoder that failed ends its stream: a fresh one,
                // on a fresh descriptor, for the next request.
                break;
            }
        }
        if rx.is_closed() {
            return;
        }
    }
}

enum Failure {
    /// The request failed; the line is fine.
    Bus(BusError),
    /// The request failed and the line must be opened again to go on.
    Reset(BusError),
    /// The port itself failed.
    Port(io::Error),
}

async fn transact(
    ctx: &mut Context,
    slave: u8,
    timeout: Duration,
    op: &Op,
) -> Result<Reply, Failure> {
    ctx.set_slave(Slave(slave));
    let call = async {
        match op {
            Op::Read {
                table,
                address,
                count,
            } => match table {
                Table::Coil => ctx
                    .read_coils(*address, *count)
                    .await
                    .map(|r| r.map(Reply::Bits)),
                Table::DiscreteInput => ctx
                    .read_discrete_inputs(*address, *count)
                    .await
                    .map(|r| r.map(Reply::Bits)),
                Table::InputRegister => ctx
                    .read_input_registers(*address, *count)
                    .await
                    .map(|r| r.map(Reply::Words)),
                Table::HoldingRegister => ctx
                    .read_holding_registers(*address, *count)
                    .await
                    .map(|r| r.map(Reply::Words)),
            },
            Op::WriteCoil { address, value } => ctx
                .write_single_coil(*address, *value)
                .await
                .map(|r| r.map(|_| Reply::Written)),
            Op::WriteRegisters { address, words } if words.len() == 1 => ctx
                .write_single_register(*address, words[0])
                .await
                .map(|r| r.map(|_| Reply::Written)),
            Op::WriteRegisters { address, words } => ctx
                .write_multiple_registers(*address, words)
                .await
                .map(|r| r.map(|_| Reply::Written)),
        }
    };
    match tokio::time::timeout(timeout, call).await {
        Err(_) => Err(Failure::Bus(BusError::Timeout(timeout))),
        Ok(Ok(Ok(reply))) => {
            let short = match (&reply, op) {
                (Reply::Bits(b), Op::Read { count, .. }) => b.len() < usize::from(*count),
                (Reply::Words(w), Op::Read { count, .. }) => w.len() != usize::from(*count),
                _ => false,
            };
            if short {
                return Err(Failure::Bus(BusError::Garbage(
                    "fewer values than asked for".into(),
                )));
            }
            Ok(reply)
        }
        Ok(Ok(Err(exception))) => Err(Failure::Bus(BusError::Exception(exception.to_string()))),
        Ok(Err(tokio_modbus::Error::Protocol(p))) => {
            Err(Failure::Bus(BusError::Garbage(p.to_string())))
        }
        Ok(Err(tokio_modbus::Error::Transport(e))) => match e.kind() {
            // A frame that does not check (CRC, length): the port is fine,
            // but the decoder is done.
            io::ErrorKind::InvalidData => Err(Failure::Reset(BusError::Garbage(e.to_string()))),
            _ => Err(Failure::Port(e)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serial(baud: u32, parity: Parity) -> LineConfig {
        LineConfig::Serial(SerialLine {
            port: "/dev/ttyUSB0".into(),
            baud_rate: baud,
            parity,
            data_bits: 8,
            stop_bits: 1,
        })
    }

    #[test]
    fn the_inter_frame_silence_is_three_and_a_half_characters() {
        // 11 bits a character at 9600 baud: 4.01 ms.
        assert_eq!(
            serial(9600, Parity::Even).gap(),
            Duration::from_micros(4010)
        );
        // No parity: 10 bits.
        assert_eq!(
            serial(9600, Parity::None).gap(),
            Duration::from_micros(3645)
        );
        // Above 19200 the standard fixes it.
        assert_eq!(
            serial(115200, Parity::Even).gap(),
            Duration::from_micros(1750)
        );
    }
}
