//! The link the daemon keeps up: connect with the node certificate, hello,
//! heartbeats both ways, reconnect with jittered exponential back-off, the
//! link state in the store (the node's CloudConnected condition), and
//! certificate rotation before expiry over the authenticated link.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outrigger_proto::message::{Control, Message, Row, Status, Sync};
use outrigger_proto::{inventory, report};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use super::join::{connect, hello_with, key_and_csr};
use super::tls::link_config;
use super::{dir, write_file, LinkConfig, LinkError};
use crate::store::{self, Kind, Store};

/// A link up this long counts as healthy: the back-off starts over.
const STABLE: Duration = Duration::from_secs(60);

/// Exponential back-off with full jitter between half and all of the
/// current step, so a fleet that lost the cloud at once does not return
/// at once.
pub struct Backoff {
    step: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            step: min,
            min,
            max,
        }
    }

    pub fn reset(&mut self) {
        self.step = self.min;
    }

    /// The next delay, in [step/2, step]; the step doubles up to the cap.
    pub fn next_delay(&mut self, random: u64) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(self.max);
        let half = step.as_millis() as u64 / 2;
        Duration::from_millis(half + random % (half + 1))
    }
}

fn random() -> u64 {
    use aws_lc_rs::rand::SecureRandom;
    let mut b = [0u8; 8];
    let _ = aws_lc_rs::rand::SystemRandom::new().fill(&mut b);
    u64::from_le_bytes(b)
}

/// The PEM files of the node's identity.
struct Identity {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
}

/// The node's key and certificate, finishing a rotation a crash cut short
/// (the new key is renamed in before the new certificate).
fn identity(d: &Path) -> Result<Identity, LinkError> {
    let (crt, crt_new, key_new) = (
        d.join("node.crt"),
        d.join("node.crt.new"),
        d.join("node.key.new"),
    );
    if crt_new.exists() && !key_new.exists() {
        std::fs::rename(&crt_new, &crt).map_err(|source| LinkError::Io {
            path: crt.clone(),
            source,
        })?;
    }
    let read = |p: PathBuf| std::fs::read(&p).map_err(|source| LinkError::Io { path: p, source });
    Ok(Identity {
        ca: read(d.join("ca.crt"))?,
        cert: read(d.join("node.crt"))?,
        key: read(d.join("node.key"))?,
    })
}

/// (not before, not after) of a PEM certificate, Unix seconds.
fn validity(cert_pem: &[u8]) -> Option<(i64, i64)> {
    let der = CertificateDer::from_pem_slice(cert_pem).ok()?;
    let (_, c) = x509_parser::parse_x509_certificate(&der).ok()?;
    Some((
        c.validity().not_before.timestamp(),
        c.validity().not_after.timestamp(),
    ))
}

/// Whether a certificate is in the last third of its life at `now`.
pub fn due_for_renewal(cert_pem: &[u8], now: i64) -> bool {
    match validity(cert_pem) {
        Some((from, to)) => now >= to - (to - from) / 3,
        None => true,
    }
}

/// How often the outbox is looked at for rows to send.
const OUTBOX_PERIOD: Duration = Duration::from_millis(250);
/// Rows per message, and rows sent ahead of their acks.
const ROWS: usize = 200;
const ROWS_IN_FLIGHT: usize = 1000;

/// What the node has from the cloud, per kind the peer knows: uid ->
/// resourceVersion.
fn inventory(s: &Store, kinds: &[Kind]) -> Result<inventory::Inventory, LinkError> {
    kinds
        .iter()
        .map(|&k| {
            s.inventory(k)
                .map(|inv| (k, inv))
                .map_err(|e| LinkError::Unexpected(e.to_string()))
        })
        .collect()
}

/// The inventory's digests: what a reconnect sends first.
fn digest(s: &Store, kinds: &[Kind]) -> Result<Message, LinkError> {
    let digests = inventory::digests_of(&inventory(s, kinds)?);
    // Where the last sync got to: the cloud may know from there what we
    // have, and skip asking.
    let mut cursors = std::collections::BTreeMap::new();
    for &k in kinds {
        if let Ok(Some(c)) = s.cursor(k) {
            cursors.insert(k, c);
        }
    }
    Ok(Message::Sync(Sync::Digest {
        kinds: digests,
        cursors,
    }))
}

/// A patched object: the stored copy at `base`, patched. None when the
/// store does not have that base (the cloud then sends it whole).
fn patched(
    s: &Store,
    kind: Kind,
    uid: &str,
    base: &str,
    patch: &[u8],
) -> Option<serde_json::Value> {
    let o = s.object(kind, uid).ok()??;
    if o.resource_version != base {
        return None;
    }
    let mut body = o.body;
    apply_patch(&mut body, patch).then_some(body)
}

/// Apply a link patch (JSON Patch, RFC 6902) to `body`; false (and `body`
/// unchanged) if it does not parse or apply.
pub fn apply_patch(body: &mut serde_json::Value, patch: &[u8]) -> bool {
    let Ok(ops) = serde_json::from_slice::<Vec<json_patch::PatchOperation>>(patch) else {
        return false;
    };
    json_patch::patch(body, &ops).is_ok()
}

/// Commit a batch from the cloud. An object that does not parse is logged
/// and left out (it would come back the same every time); a store that
/// refuses (disk full) ends the link, and the batch comes again later.
/// Returns the patches that could not be applied, by kind.
fn commit(
    s: &Store,
    changes: Vec<outrigger_proto::message::Change>,
    cursors: std::collections::BTreeMap<Kind, String>,
) -> Result<std::collections::BTreeMap<Kind, Vec<String>>, LinkError> {
    use outrigger_proto::message::Change as Wire;
    let mut out = Vec::with_capacity(changes.len());
    let mut stale: std::collections::BTreeMap<Kind, Vec<String>> = Default::default();
    for c in changes {
        let c = match c {
            Wire::Patch {
                kind,
                uid,
                base_version,
                resource_version,
                patch,
            } => {
                let body = patched(s, kind, &uid, &base_version, &patch);
                match body.and_then(|b| serde_json::to_vec(&b).ok()) {
                    Some(body) => Wire::Put {
                        kind,
                        uid,
                        resource_version,
                        body,
                    },
                    None => {
                        stale.entry(kind).or_default().push(uid);
                        continue;
                    }
                }
            }
            c => c,
        };
        match c {
            Wire::Put {
                kind,
                uid,
                resource_version,
                body,
            } => {
                let parsed = serde_json::from_slice(&body)
                    .map_err(|e| store::StoreError::Invalid(e.to_string()))
                    .and_then(|v| store::Object::from_body(kind, store::Source::Cloud, v));
                match parsed {
                    Ok(mut o) => {
                        o.uid = uid;
                        o.resource_version = resource_version;
                        out.push(store::Change::Put(o));
                    }
                    Err(e) => {
                        tracing::error!(%kind, uid, error = %e, "object from the cloud refused")
                    }
                }
            }
            Wire::Delete { kind, uid } => out.push(store::Change::Delete { kind, uid }),
            Wire::Patch { .. } => {}
        }
    }
    let cursors: Vec<(Kind, String)> = cursors.into_iter().collect();
    s.apply(&out, &cursors)
        .map_err(|e| LinkError::Unexpected(format!("store: {e}")))?;
    Ok(stale)
}

/// The outbox going up: rows after the last sent, a window of unacked.
#[derive(Default)]
struct Upstream {
    last_sent: i64,
    in_flight: usize,
    /// The outbox generation when the last read found everything sent:
    /// until it moves there is nothing to read.
    drained_at: Option<u64>,
    /// The agreed minor version: rows of reports it does not know stay in
    /// the outbox, unsent, until a newer cloud takes them.
    minor: u16,
}

impl Upstream {
    fn next(&mut self, s: &Store) -> Option<Message> {
        if self.in_flight >= ROWS_IN_FLIGHT {
            return None;
        }
        let generation = s.outbox_generation();
        if self.drained_at == Some(generation) {
            return None;
        }
        let rows = match s.pending(self.last_sent, ROWS) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "reading the outbox");
                return None;
            }
        };
        if rows.len() < ROWS {
            self.drained_at = Some(generation);
        }
        let last = rows.last()?.seq;
        self.last_sent = last;
        let rows: Vec<_> = rows
            .into_iter()
            .filter(|r| report::since_minor_of_key(&r.key) <= self.minor)
            .collect();
        if rows.is_empty() {
            return None;
        }
        self.in_flight += rows.len();
        Some(Message::Status(Status::Rows {
            rows: rows
                .into_iter()
                .map(|r| Row {
                    seq: r.seq,
                    class: r.class,
                    key: r.key,
                    body: serde_json::to_vec(&r.body).unwrap_or_default(),
                })
                .collect(),
        }))
    }

    fn acked(&mut self, s: &Store, seqs: &[i64]) -> Result<(), LinkError> {
        self.in_flight = self.in_flight.saturating_sub(seqs.len());
        s.ack(seqs)
            .map(|_| ())
            .map_err(|e| LinkError::Unexpected(format!("store: {e}")))
    }
}

/// Keep the link up for as long as the daemon runs.
pub async fn run(
    data_dir: PathBuf,
    cfg: LinkConfig,
    store: Option<Arc<Store>>,
    pods: Arc<crate::pods::PodManager>,
) {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    // Kept across reconnects, so TLS resumes the session (no certificates
    // on the wire again); rebuilt when the certificate changes.
    let mut tls: Option<(Vec<u8>, rustls::ClientConfig)> = None;
    loop {
        let t0 = Instant::now();
        let r = session(&data_dir, &cfg, store.as_deref(), pods.clone(), &mut tls).await;
        if let Some(s) = &store {
            if let Err(e) = s.set_link(false, store::now_ms()) {
                tracing::warn!(error = %e, "recording the link state");
            }
        }
        if t0.elapsed() >= STABLE {
            backoff.reset();
        }
        let delay = backoff.next_delay(random());
        match r {
            Ok(()) => tracing::info!(retry_in = ?delay, "link to cloud-gw closed"),
            Err(e) => tracing::warn!(error = %e, retry_in = ?delay, "link to cloud-gw down"),
        }
        tokio::time::sleep(delay).await;
    }
}

async fn session(
    data_dir: &Path,
    cfg: &LinkConfig,
    store: Option<&Store>,
    pods: Arc<crate::pods::PodManager>,
    tls: &mut Option<(Vec<u8>, rustls::ClientConfig)>,
) -> Result<(), LinkError> {
    let d = dir(data_dir);
    let id = identity(&d)?;
    let config = match tls.as_ref() {
        Some((cert, c)) if *cert == id.cert => c.clone(),
        _ => {
            let c = link_config(&id.ca, &id.cert, &id.key)?;
            *tls = Some((id.cert.clone(), c.clone()));
            c
        }
    };
    let mut link = connect(&cfg.server, "/link", config).await?;
    // The digest rides with the hello.
    // It has every kind the store has: a peer skips kinds it does not know.
    let first = store.map(|s| digest(s, &Kind::ALL)).transpose()?;
    let welcome = hello_with(&mut link, &cfg.node, first.as_ref()).await?;
    let heartbeat = Duration::from_secs(u64::from(welcome.heartbeat_secs.max(1)));
    if let Some(s) = store {
        if let Err(e) = s.set_link(true, store::now_ms()) {
            tracing::warn!(error = %e, "recording the link state");
        }
    }
    tracing::info!(server = %cfg.server, node = %cfg.node, ?heartbeat, "connected to cloud-gw");
    let mut tick = tokio::time::interval(heartbeat);
    tick.tick().await;
    let mut outbox = tokio::time::interval(OUTBOX_PERIOD);
    outbox.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut up = Upstream {
        minor: welcome.version.minor,
        ..Default::default()
    };
    // The key of a renewal on its way.
    let mut pending_key: Option<String> = None;
    // kubectl logs of this node's pods; they end with the session.
    let (mut streams, mut stream_out) = super::streams::Streams::new(pods);
    loop {
        // What the cloud sends first (a sync batch is committed before any
        // more stream bytes go out), then status, then streams: a busy
        // stream never holds the node's own business up.
        tokio::select! {
            biased;
            m = link.recv() => match m? {
                Message::Sync(Sync::Changes { batch, changes, cursors }) => {
                    let Some(s) = store else { continue };
                    // Committed before acked: an unacked batch comes again.
                    for (kind, uids) in commit(s, changes, cursors)? {
                        link.send(&Message::Sync(Sync::Stale { kind, uids })).await?;
                    }
                    link.send(&Message::Sync(Sync::Ack { batch })).await?;
                }
                Message::Sync(Sync::Query { kinds }) => {
                    if let Some(s) = store {
                        let inv = inventory::answer(&inventory(s, &Kind::ALL)?, &kinds);
                        link.send(&Message::Sync(Sync::Inventory { kinds: inv })).await?;
                    }
                }
                Message::Status(Status::Ack { seqs }) => {
                    if let Some(s) = store {
                        up.acked(s, &seqs)?;
                    }
                }
                Message::Control(Control::Certificate { cert_pem }) => {
                    let Some(key_pem) = pending_key.take() else { continue };
                    write_file(&d.join("node.key.new"), key_pem.as_bytes(), true)?;
                    write_file(&d.join("node.crt.new"), cert_pem.as_bytes(), false)?;
                    let mv = |a: &str, b: &str| std::fs::rename(d.join(a), d.join(b)).map_err(|source| LinkError::Io { path: d.join(b), source });
                    mv("node.key.new", "node.key")?;
                    mv("node.crt.new", "node.crt")?;
                    tracing::info!(node = %cfg.node, "node certificate renewed");
                }
                Message::Stream { channel, msg } => {
                    if let Some(answer) = streams.handle(channel, msg) {
                        link.send(&answer).await?;
                    }
                }
                Message::Control(Control::Refused { reason }) => return Err(LinkError::Refused(reason)),
                _ => {}
            },
            _ = tick.tick() => {
                if link.idle() > heartbeat * 2 {
                    return Err(LinkError::Unexpected(format!("cloud-gw silent for {:?}", heartbeat * 2)));
                }
                link.ping().await?;
                let cert = std::fs::read(d.join("node.crt")).unwrap_or_default();
                if pending_key.is_none() && due_for_renewal(&cert, store::now_ms() / 1000) {
                    let (key_pem, csr_pem) = key_and_csr(&cfg.node)?;
                    link.send(&Message::Control(Control::RenewCertificate { csr_pem })).await?;
                    pending_key = Some(key_pem);
                    tracing::info!(node = %cfg.node, "asked for a new node certificate");
                }
            }
            _ = outbox.tick(), if store.is_some() => {
                if let Some(m) = store.and_then(|s| up.next(s)) {
                    link.send(&m).await?;
                }
            }
            Some(queued) = stream_out.recv() => {
                if let Some(m) = streams.outgoing(queued) {
                    link.send(&m).await?;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(8));
        let d: Vec<u64> = (0..6)
            .map(|_| b.next_delay(u64::MAX).as_millis() as u64)
            .collect();
        // The upper end of each step's range (random = max)...
        assert!(
            d.iter()
                .zip([1000, 2000, 4000, 8000, 8000, 8000])
                .all(|(x, s)| *x <= s && *x >= s / 2),
            "{d:?}"
        );
        b.reset();
        let low = b.next_delay(0);
        assert_eq!(low, Duration::from_millis(500));
    }
}
