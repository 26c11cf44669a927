//! A TCP connection to a port of a pod, as `kubectl port-forward` (through
//! the cloud link) asks for one: made from inside the pod's network
//! namespace to its loopback, so a server listening on 127.0.0.1 only is
//! reached too, as a kubelet's port-forward reaches it. What the client
//! sends goes in, what the pod answers comes out, the client's half-close
//! is passed on, and the pod's end of the connection ends it.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::exec::{Input, Output};
use super::logs::LookupError;
use super::PodManager;

/// How long a connection to the pod may take.
const CONNECT: Duration = Duration::from_secs(10);

/// Why a port could not be reached or the connection failed.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("{0}")]
    Lookup(#[from] LookupError),
    #[error("{0}")]
    Connect(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl PodManager {
    /// The network namespace of a running pod (None: the host's, for a
    /// hostNetwork pod). `uid`, when given, must be the pod's.
    pub fn netns_of(
        &self,
        namespace: &str,
        name: &str,
        uid: Option<&str>,
    ) -> Result<Option<std::path::PathBuf>, LookupError> {
        let pod = self.lookup(namespace, name, uid)?;
        let host = pod
            .spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false);
        let running = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|p| p == "Running");
        if !running {
            return Err(LookupError::BadRequest(format!(
                "pod {name} is not running"
            )));
        }
        Ok((!host).then(|| {
            self.context()
                .rt
                .sandbox_dir(super::uid(&pod))
                .join("ns")
                .join("net")
        }))
    }
}

/// Connect to `port` on the pod's loopback (IPv4, then IPv6).
async fn connect(
    netns: Option<std::path::PathBuf>,
    port: u16,
) -> Result<tokio::net::TcpStream, ForwardError> {
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    match super::actions::connect(netns.clone(), v4, CONNECT).await {
        Ok(s) => Ok(s),
        Err(e4) => {
            let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
            super::actions::connect(netns, v6, CONNECT)
                .await
                .map_err(|_| ForwardError::Connect(e4))
        }
    }
}

/// Forward one connection to `port` of the pod in `netns`: `inputs` in
/// (`took_stdin` once each piece is written), the pod's bytes to
/// `out.stdout`, until the pod closes its end or the client goes.
pub async fn forward(
    netns: Option<std::path::PathBuf>,
    port: u16,
    mut inputs: mpsc::UnboundedReceiver<Input>,
    out: &mut impl Output,
) -> Result<(), ForwardError> {
    let tcp = connect(netns, port).await?;
    let _ = tcp.set_nodelay(true);
    if out.started().await.is_err() {
        return Ok(());
    }
    let (mut rd, mut wr) = tcp.into_split();
    // The writing toward the pod goes on beside the reading from it (a
    // pod that answers while it reads must never wait on us), and says
    // how much it wrote, for the credit.
    let (took_tx, mut took) = mpsc::unbounded_channel::<usize>();
    let writer = async move {
        while let Some(i) = inputs.recv().await {
            match i {
                Input::Stdin(d) => {
                    wr.write_all(&d).await?;
                    let _ = took_tx.send(d.len());
                }
                Input::StdinEnd => {
                    wr.shutdown().await?;
                    // Keep the write half: dropping it would not close
                    // more, and the client may still read.
                    std::future::pending::<()>().await;
                }
                Input::Resize { .. } => {}
            }
        }
        Ok::<(), std::io::Error>(())
    };
    tokio::pin!(writer);
    let mut buf = vec![0u8; 64 << 10];
    loop {
        tokio::select! {
            n = rd.read(&mut buf) => match n? {
                0 => return Ok(()),
                n => {
                    if out.stdout(&buf[..n]).await.is_err() {
                        return Ok(());
                    }
                }
            },
            r = &mut writer => {
                r?;
                // The client went (its input closed without an end).
                return Ok(());
            }
            Some(n) = took.recv() => out.took_stdin(n).await,
        }
    }
}
