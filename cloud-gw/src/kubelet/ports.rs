//! A kubelet port per edge node, on the replica that holds the node's link.
//!
//! The API server and metrics scrapers reach a kubelet at one of the
//! Node's addresses and `status.daemonEndpoints.kubeletEndpoint.Port`, and
//! what they send names the node only by where it is sent: requests for a
//! pod (logs, exec, attach, port-forward) carry the pod in the path, but
//! `/stats/summary`, `/metrics/resource` and whatever comes through
//! `nodes/proxy` carry nothing, and neither the Host header (the client's)
//! nor SNI (absent without a kubelet CA) help. So each node served here
//! gets a port of its own on this replica's address, and the port says
//! which node is asked about (as KubeEdge gives each node a tunnel port).
//!
//! A port is opened when the node's status is first written here and kept
//! while the link is up; a node that left keeps it for [`KEEP`] (its Node
//! still points here, and a caller is better told "no link" than refused),
//! then it is closed. A node that comes back within that keeps its port.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

/// How long a node that left keeps its port.
pub const KEEP: Duration = Duration::from_secs(600);

/// Which ports to take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Range {
    /// Whatever the kernel gives (its ephemeral range).
    Any,
    /// The first free one in `from..=to`.
    Span { from: u16, to: u16 },
}

impl std::str::FromStr for Range {
    type Err = String;
    fn from_str(s: &str) -> Result<Range, String> {
        if s == "any" {
            return Ok(Range::Any);
        }
        let (a, b) = s
            .split_once('-')
            .ok_or_else(|| format!("{s:?}: a range is FROM-TO (or \"any\")"))?;
        let p = |v: &str| {
            v.trim()
                .parse::<u16>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("{v:?} is not a port"))
        };
        let (from, to) = (p(a)?, p(b)?);
        if from > to {
            return Err(format!("{s:?}: the range ends before it starts"));
        }
        Ok(Range::Span { from, to })
    }
}

/// A node's listener, for the endpoint to accept on until `close` fires.
pub struct Opened {
    pub node: String,
    pub listener: TcpListener,
    pub close: oneshot::Receiver<()>,
}

struct Slot {
    port: u16,
    /// Dropped to close the listener.
    _close: oneshot::Sender<()>,
    /// When the node's link went (None: up).
    left: Option<Instant>,
}

pub struct Ports {
    /// What listeners bind to.
    bind: IpAddr,
    /// What the Nodes say (the address the API server reaches us at).
    advertise: IpAddr,
    range: Range,
    slots: Mutex<HashMap<String, Slot>>,
    opened: mpsc::UnboundedSender<Opened>,
    /// What the Nodes declare (`status.declaredFeatures`).
    declared: &'static [&'static str],
}

#[derive(Debug, thiserror::Error)]
#[error("no free kubelet port for node {node:?} on {bind}: {why}")]
pub struct NoPort {
    node: String,
    bind: IpAddr,
    why: String,
}

impl Ports {
    /// Ports on `bind`, advertised as `advertise`; the listeners opened go
    /// to the receiver (the kubelet endpoint).
    pub fn new(
        bind: IpAddr,
        advertise: IpAddr,
        range: Range,
    ) -> (Ports, mpsc::UnboundedReceiver<Opened>) {
        let (opened, rx) = mpsc::unbounded_channel();
        (
            Ports {
                bind,
                advertise,
                range,
                slots: Mutex::new(HashMap::new()),
                opened,
                declared: super::DECLARED_FEATURES,
            },
            rx,
        )
    }

    /// Declare nothing: the API server then translates kubectl's
    /// WebSockets into SPDY toward these ports (as for an older kubelet).
    pub fn without_websockets(mut self) -> Ports {
        self.declared = &[];
        self
    }

    /// What the Nodes served here declare in `status.declaredFeatures`.
    pub fn declared_features(&self) -> &'static [&'static str] {
        self.declared
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The address and port the API server reaches `node`'s kubelet at
    /// (opened now if it has none), and marks its link up.
    pub fn endpoint(&self, node: &str) -> Result<SocketAddr, NoPort> {
        let mut slots = self.lock();
        if let Some(s) = slots.get_mut(node) {
            s.left = None;
            return Ok(SocketAddr::new(self.advertise, s.port));
        }
        let taken: Vec<u16> = slots.values().map(|s| s.port).collect();
        let listener = self.bind_one(node, &taken)?;
        let port = listener
            .local_addr()
            .map_err(|e| self.no_port(node, e.to_string()))?
            .port();
        let (close_tx, close) = oneshot::channel();
        slots.insert(
            node.to_string(),
            Slot {
                port,
                _close: close_tx,
                left: None,
            },
        );
        let _ = self.opened.send(Opened {
            node: node.to_string(),
            listener,
            close,
        });
        tracing::debug!(node, port, "kubelet port opened");
        Ok(SocketAddr::new(self.advertise, port))
    }

    fn no_port(&self, node: &str, why: String) -> NoPort {
        NoPort {
            node: node.to_string(),
            bind: self.bind,
            why,
        }
    }

    fn bind_one(&self, node: &str, taken: &[u16]) -> Result<TcpListener, NoPort> {
        let try_bind = |port: u16| -> std::io::Result<TcpListener> {
            let s = std::net::TcpListener::bind(SocketAddr::new(self.bind, port))?;
            s.set_nonblocking(true)?;
            TcpListener::from_std(s)
        };
        match self.range {
            Range::Any => try_bind(0).map_err(|e| self.no_port(node, e.to_string())),
            Range::Span { from, to } => {
                let mut last = String::from("every port of the range is in use");
                for p in from..=to {
                    if taken.contains(&p) {
                        continue;
                    }
                    match try_bind(p) {
                        Ok(l) => return Ok(l),
                        Err(e) => last = format!("{p}: {e}"),
                    }
                }
                Err(self.no_port(node, last))
            }
        }
    }

    /// `node`'s link went: its port is kept for [`KEEP`], then closed.
    pub fn left(&self, node: &str) {
        if let Some(s) = self.lock().get_mut(node) {
            s.left.get_or_insert_with(Instant::now);
        }
    }

    /// The node whose port this is, if any.
    pub fn node_of(&self, port: u16) -> Option<String> {
        self.lock()
            .iter()
            .find(|(_, s)| s.port == port)
            .map(|(n, _)| n.clone())
    }

    /// Close the ports of nodes gone longer than `keep`.
    pub fn sweep(&self, keep: Duration) {
        self.lock().retain(|node, s| {
            let stay = s.left.is_none_or(|t| t.elapsed() < keep);
            if !stay {
                tracing::debug!(node, port = s.port, "kubelet port closed");
            }
            stay
        });
    }

    /// Sweep every minute, for as long as the endpoint runs.
    pub async fn sweeper(self: std::sync::Arc<Self>) {
        let mut t = tokio::time::interval(Duration::from_secs(60));
        loop {
            t.tick().await;
            self.sweep(KEEP);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse() {
        assert_eq!("any".parse(), Ok(Range::Any));
        assert_eq!(
            "10250-10260".parse(),
            Ok(Range::Span {
                from: 10250,
                to: 10260
            })
        );
        assert!("10260-10250".parse::<Range>().is_err());
        assert!("0-5".parse::<Range>().is_err());
        assert!("10250".parse::<Range>().is_err());
    }

    #[tokio::test]
    async fn a_node_keeps_its_port_until_it_has_been_gone_a_while() {
        let lo: IpAddr = [127, 0, 0, 1].into();
        let (p, mut opened) = Ports::new(lo, [10, 0, 0, 1].into(), Range::Any);
        let a = p.endpoint("a").unwrap();
        let b = p.endpoint("b").unwrap();
        assert_eq!(a.ip(), IpAddr::from([10, 0, 0, 1]));
        assert_ne!(a.port(), b.port());
        assert_eq!(p.endpoint("a").unwrap(), a);
        assert_eq!(p.node_of(b.port()).as_deref(), Some("b"));
        let first = opened.recv().await.unwrap();
        assert_eq!(first.node, "a");
        let mut close_a = first.close;
        // Gone, then back: the same port.
        p.left("a");
        p.sweep(KEEP);
        assert_eq!(p.endpoint("a").unwrap(), a);
        // Gone for good: the listener is told to close.
        p.left("a");
        p.sweep(Duration::ZERO);
        assert!(p.node_of(a.port()).is_none());
        assert!(close_a
            .try_recv()
            .is_err_and(|e| e == oneshot::error::TryRecvError::Closed));
    }

    #[test]
    fn a_span_gives_distinct_ports_from_its_start() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _g = rt.enter();
        let lo: IpAddr = [127, 0, 0, 1].into();
        // A free stretch of two: the kernel's pick and the next, if both
        // bind (else another pick).
        let base = (0..50)
            .find_map(|_| {
                let a = std::net::TcpListener::bind((lo, 0)).ok()?;
                let port = a.local_addr().ok()?.port().checked_add(1)?;
                let _b = std::net::TcpListener::bind((lo, port)).ok()?;
                Some(port - 1)
            })
            .unwrap();
        let (p, _rx) = Ports::new(
            lo,
            lo,
            Range::Span {
                from: base,
                to: base + 1,
            },
        );
        let x = p.endpoint("x").unwrap().port();
        let y = p.endpoint("y").unwrap().port();
        assert!([base, base + 1].contains(&x) && [base, base + 1].contains(&y) && x != y);
        assert!(p.endpoint("z").is_err());
    }
}
