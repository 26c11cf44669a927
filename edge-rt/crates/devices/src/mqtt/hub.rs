//! One MQTT connection for all of a node's MQTT devices: it subscribes to
//! the twin topics devices publish on, hands each message to the device
//! task registered for its id, and publishes what device tasks send. The
//! broker going away and coming back is told to every device (rumqttc
//! reconnects; the hub subscribes again on every connect).
//!
//! A broker named by host is resolved on a guarded blocking thread
//! (`outrigger_sys::blocking`), never by tokio's resolver, which would run
//! getaddrinfo outside the fork guard.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::{mpsc, oneshot};

use super::twin;

/// Where the broker is and who we are to it.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub keep_alive: Duration,
    pub tls: Tls,
}

/// Whether the connection is TLS.
#[derive(Debug, Clone)]
pub enum Tls {
    Off,
    On(Arc<rustls::ClientConfig>),
    /// TLS was asked for but its settings are wrong (a CA file that does
    /// not read): the hub never connects, in plain text least of all, and
    /// every device says why.
    Broken(String),
}

/// What the hub hands a device task.
#[derive(Debug, Clone, PartialEq)]
pub enum Inbound {
    /// A message on one of its topics (`twin/update`, `twin/get`,
    /// `state/update`).
    Message { suffix: String, payload: Vec<u8> },
    /// The broker connection came up or went down.
    Broker { up: bool, reason: String },
}

struct Outbound {
    topic: String,
    qos: QoS,
    payload: Vec<u8>,
    done: oneshot::Sender<Result<(), String>>,
}

type Routes = Arc<Mutex<HashMap<String, mpsc::Sender<Inbound>>>>;

#[derive(Clone)]
pub struct Hub {
    out: mpsc::Sender<Outbound>,
    routes: Routes,
    up: Arc<std::sync::atomic::AtomicBool>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

const SUBSCRIPTIONS: [&str; 4] = [
    "$hw/events/device/+/twin/+",
    "$hw/events/device/+/+/twin/+",
    "$hw/events/device/+/state/update",
    "$hw/events/device/+/+/state/update",
];

impl Hub {
    /// Connect (and keep connecting) on the current runtime; the task ends
    /// when the last `Hub` is dropped.
    pub fn start(cfg: BrokerConfig) -> Hub {
        let (out, rx) = mpsc::channel(256);
        let hub = Hub {
            out,
            routes: Default::default(),
            up: Default::default(),
        };
        tokio::spawn(run(cfg, rx, hub.routes.clone(), hub.up.clone()));
        hub
    }

    pub fn connected(&self) -> bool {
        self.up.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Messages for device `id`, or None if another device has the id.
    pub fn register(&self, id: &str) -> Option<mpsc::Receiver<Inbound>> {
        let mut r = lock(&self.routes);
        if r.get(id).is_some_and(|tx| !tx.is_closed()) {
            return None;
        }
        let (tx, rx) = mpsc::channel(64);
        if !self.connected() {
            let _ = tx.try_send(Inbound::Broker {
                up: false,
                reason: "not connected to the broker yet".into(),
            });
        }
        r.insert(id.to_string(), tx);
        Some(rx)
    }

    pub fn unregister(&self, id: &str) {
        lock(&self.routes).remove(id);
    }

    /// Publish and wait until the broker has it (QoS 1: its PUBACK is
    /// not awaited here, the client's queue holds it across reconnects).
    pub async fn publish(&self, topic: String, qos: QoS, payload: Vec<u8>) -> Result<(), String> {
        let (done, rx) = oneshot::channel();
        self.out
            .send(Outbound {
                topic,
                qos,
                payload,
                done,
            })
            .await
            .map_err(|_| "the MQTT hub has stopped".to_string())?;
        rx.await
            .map_err(|_| "the MQTT hub has stopped".to_string())?
    }
}

async fn resolve(host: &str, port: u16) -> Result<String, String> {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return Ok(host.to_string());
    }
    let h = host.to_string();
    outrigger_sys::blocking(move || {
        use std::net::ToSocketAddrs;
        (h.as_str(), port)
            .to_socket_addrs()
            .map_err(|e| e.to_string())?
            .next()
            .map(|a| a.ip().to_string())
            .ok_or_else(|| "no address".to_string())
    })
    .await
    .map_err(|e| e.to_string())?
}

fn tell(routes: &Routes, m: Inbound) {
    for tx in lock(routes).values() {
        let _ = tx.try_send(m.clone());
    }
}

async fn run(
    cfg: BrokerConfig,
    mut out: mpsc::Receiver<Outbound>,
    routes: Routes,
    up: Arc<std::sync::atomic::AtomicBool>,
) {
    if let Tls::Broken(reason) = &cfg.tls {
        tracing::error!(broker = %cfg.host, error = %reason, "the MQTT broker's TLS settings are wrong: not connecting");
        loop {
            tell(
                &routes,
                Inbound::Broker {
                    up: false,
                    reason: reason.clone(),
                },
            );
            tokio::select! {
                m = out.recv() => {
                    let Some(m) = m else { return };
                    let _ = m.done.send(Err(reason.clone()));
                }
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    }
    let host = loop {
        match resolve(&cfg.host, cfg.port).await {
            Ok(h) => break h,
            Err(e) => {
                tracing::warn!(broker = %cfg.host, error = %e, "cannot resolve the MQTT broker; again in 5 s");
                tell(
                    &routes,
                    Inbound::Broker {
                        up: false,
                        reason: format!("cannot resolve {}: {e}", cfg.host),
                    },
                );
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    };
    let mut o = MqttOptions::new(cfg.client_id.clone(), host, cfg.port);
    o.set_keep_alive(cfg.keep_alive);
    if let (Some(u), Some(p)) = (&cfg.username, &cfg.password) {
        o.set_credentials(u.clone(), p.clone());
    }
    if let Tls::On(c) = &cfg.tls {
        o.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(c.clone()),
        ));
    }
    let (client, mut events) = AsyncClient::new(o, 256);
    let mut said: Option<String> = None;
    loop {
        tokio::select! {
            m = out.recv() => {
                let Some(m) = m else { return };
                let r = client
                    .publish(m.topic, m.qos, false, m.payload)
                    .await
                    .map_err(|e| e.to_string());
                let _ = m.done.send(r);
            }
            ev = events.poll() => match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    for t in SUBSCRIPTIONS {
                        if let Err(e) = client.try_subscribe(t, QoS::AtLeastOnce) {
                            tracing::warn!(topic = t, error = %e, "MQTT subscribe");
                        }
                    }
                    up.store(true, std::sync::atomic::Ordering::Relaxed);
                    tracing::info!(broker = %cfg.host, port = cfg.port, "MQTT broker connected");
                    said = None;
                    tell(&routes, Inbound::Broker { up: true, reason: String::new() });
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let Some((id, suffix)) = twin::split(&p.topic) else { continue };
                    let tx = lock(&routes).get(id).cloned();
                    if let Some(tx) = tx {
                        let m = Inbound::Message { suffix: suffix.to_string(), payload: p.payload.to_vec() };
                        if tx.try_send(m).is_err() {
                            tracing::warn!(device = id, "device task behind; MQTT message dropped");
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let reason = e.to_string();
                    if said.as_deref() != Some(&reason) {
                        tracing::warn!(broker = %cfg.host, port = cfg.port, error = %reason, "MQTT broker unavailable; reconnecting");
                        said = Some(reason.clone());
                    }
                    if up.swap(false, std::sync::atomic::Ordering::Relaxed) || said.is_some() {
                        tell(&routes, Inbound::Broker { up: false, reason });
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}
