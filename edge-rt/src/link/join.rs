//! `edge-rt join`: trust cloud-gw by the token's CA pin, send a CSR with
//! the token, and keep the certificate that comes back.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use outrigger_proto::message::{Control, Message};
use outrigger_proto::token::JoinToken;
use outrigger_proto::ws::{ws_client_config, Link};
use outrigger_proto::VERSION;
use rcgen::{CertificateParams, DnType, KeyPair};

use super::tls::{join_config, PinnedCa};
use super::{dir, parse_server, write_file, LinkConfig, LinkError};

const TIMEOUT: Duration = Duration::from_secs(15);

/// A new key and a CSR for it, naming the node (cloud-gw names the
/// certificate itself; the CSR carries the key).
pub fn key_and_csr(node: &str) -> Result<(String, String), LinkError> {
    let cert = |e: rcgen::Error| LinkError::Cert(e.to_string());
    let key = KeyPair::generate().map_err(cert)?;
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, node);
    let csr = p
        .serialize_request(&key)
        .map_err(cert)?
        .pem()
        .map_err(cert)?;
    Ok((key.serialize_pem(), csr))
}

/// Open a WebSocket to `path` on the server with this TLS config.
pub async fn connect(
    server: &str,
    path: &str,
    tls: rustls::ClientConfig,
) -> Result<Link<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>, LinkError> {
    let (host, port, _) = parse_server(server)?;
    let conn = |e: &dyn std::fmt::Display| LinkError::Connect(server.to_string(), e.to_string());
    let tcp = tokio::time::timeout(
        TIMEOUT,
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    .map_err(|_| conn(&"timed out"))?
    .map_err(|e| conn(&e))?;
    let _ = tcp.set_nodelay(true);
    connect_over(server, path, tls, tcp).await
}

/// The TLS and WebSocket steps over a connected stream (the load
/// generator passes one that counts bytes).
pub async fn connect_over<S>(
    server: &str,
    path: &str,
    tls: rustls::ClientConfig,
    tcp: S,
) -> Result<Link<tokio_rustls::client::TlsStream<S>>, LinkError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (host, _, authority) = parse_server(server)?;
    let conn = |e: &dyn std::fmt::Display| LinkError::Connect(server.to_string(), e.to_string());
    let name = rustls::pki_types::ServerName::try_from(host.clone())
        .map_err(|e| LinkError::Url(e.to_string()))?;
    let stream = tokio::time::timeout(
        TIMEOUT,
        tokio_rustls::TlsConnector::from(Arc::new(tls)).connect(name, tcp),
    )
    .await
    .map_err(|_| conn(&"TLS handshake timed out"))?
    .map_err(|e| LinkError::Tls(e.to_string()))?;
    let (ws, _) = tokio::time::timeout(
        TIMEOUT,
        tokio_tungstenite::client_async_with_config(
            format!("wss://{authority}{path}"),
            stream,
            Some(ws_client_config()),
        ),
    )
    .await
    .map_err(|_| conn(&"WebSocket upgrade timed out"))?
    .map_err(|e| match e {
        tokio_tungstenite::tungstenite::Error::Http(r) => LinkError::Refused(format!(
            "{} {}",
            r.status(),
            r.body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default()
        )),
        e => conn(&e),
    })?;
    Ok(Link::new(ws))
}

/// What the cloud's Welcome said.
#[derive(Debug, Clone, Copy)]
pub struct Welcomed {
    pub heartbeat_secs: u32,
    /// The version both sides speak from now on.
    pub version: outrigger_proto::Version,
}

/// Hello, and the Welcome (or the refusal) it gets.
pub async fn hello<S>(link: &mut Link<S>, node: &str) -> Result<Welcomed, LinkError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    hello_with(link, node, None).await
}

/// Hello with a first message right behind it, in the same write (the
/// reconnect's digest): a round trip and a TLS record fewer. Only messages
/// every accepted minor version knows may go before the Welcome.
pub async fn hello_with<S>(
    link: &mut Link<S>,
    node: &str,
    then: Option<&Message>,
) -> Result<Welcomed, LinkError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let hello = Message::Control(Control::Hello {
        version: VERSION,
        node: node.to_string(),
    });
    match then {
        Some(m) => {
            link.feed(&hello).await?;
            link.send(m).await?;
        }
        None => link.send(&hello).await?,
    }
    match tokio::time::timeout(TIMEOUT, link.recv()).await {
        Ok(Ok(Message::Control(Control::Welcome {
            heartbeat_secs,
            version,
        }))) => Ok(Welcomed {
            heartbeat_secs,
            version,
        }),
        Ok(Ok(Message::Control(Control::Refused { reason }))) => Err(LinkError::Refused(reason)),
        Ok(Ok(m)) => Err(LinkError::Unexpected(format!("{m:?}"))),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(LinkError::Unexpected("no answer to hello".into())),
    }
}

/// Join: everything the link needs lands in `<data_dir>/link/`.
pub async fn join(
    data_dir: &Path,
    server: &str,
    token: &JoinToken,
    node: &str,
    labels: BTreeMap<String, String>,
) -> Result<LinkConfig, LinkError> {
    let pinned = Arc::new(PinnedCa::new(&token.ca_pin));
    let mut link = connect(server, "/join", join_config(pinned.clone())?).await?;
    hello(&mut link, node).await?;
    let (key_pem, csr_pem) = key_and_csr(node)?;
    link.send(&Message::Control(Control::Join {
        token_id: token.id.clone(),
        token_secret: token.secret.clone(),
        node: node.to_string(),
        labels: labels.clone(),
        csr_pem,
    }))
    .await?;
    let cert_pem = match tokio::time::timeout(TIMEOUT, link.recv()).await {
        Ok(Ok(Message::Control(Control::Certificate { cert_pem }))) => cert_pem,
        Ok(Ok(Message::Control(Control::Refused { reason }))) => {
            return Err(LinkError::Refused(reason))
        }
        Ok(Ok(m)) => return Err(LinkError::Unexpected(format!("{m:?}"))),
        Ok(Err(e)) => return Err(e.into()),
        Err(_) => return Err(LinkError::Unexpected("no answer to the join".into())),
    };
    let ca = pinned
        .found
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .ok_or_else(|| LinkError::Tls("the pinned CA was not seen".into()))?;
    let ca_pem = pem::encode(&pem::Pem::new("CERTIFICATE", ca.as_ref().to_vec()));
    let d = dir(data_dir);
    write_file(&d.join("node.key"), key_pem.as_bytes(), true)?;
    write_file(&d.join("node.crt"), cert_pem.as_bytes(), false)?;
    write_file(&d.join("ca.crt"), ca_pem.as_bytes(), false)?;
    let cfg = LinkConfig {
        server: server.to_string(),
        node: node.to_string(),
        labels,
    };
    let text = toml::to_string(&cfg).map_err(|e| LinkError::Config(e.to_string()))?;
    write_file(&d.join("link.toml"), text.as_bytes(), false)?;
    Ok(cfg)
}
