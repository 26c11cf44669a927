//! One MQTT connection for all of a node's MQTT devices: it subscribes to
//! the twin topics devices publish on, hands each message to the device
//! task registered for its id, and publishes what device tasks send. The
//! broker going away and coming back is told to every device (rumqttc
//! reconnects; the hub subscribes again on every connect).
//!
//! A broker named by host is resolved on a guarded blocking thread
//! (`outrigger_sys::blocking`), never by tokio's resolver, which would run
//! getaddrinfo outside the fork guard.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::{mpsc, oneshot};

use crate::mailbox::{mailbox, Receiver, Sender};

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
    /// A message on one of its topics: for a twin device the suffix
    /// (`twin/update`, `twin/get`, `state/update`), for a plain-value one
    /// the property (`<prefix>/<property>`).
    Message { suffix: String, payload: Vec<u8> },
    /// The broker connection came up or went down.
    Broker { up: bool, reason: String },
}

enum Outbound {
    Publish {
        topic: String,
        qos: QoS,
        retain: bool,
        payload: Vec<u8>,
        done: oneshot::Sender<Result<(), String>>,
    },
    /// A plain-value device's prefix came or went: (un)subscribe.
    Prefix { prefix: String, on: bool },
}

/// Device tasks by their id in the twin topics, and plain-value ones by
/// their topic prefix.
#[derive(Default)]
struct Table {
    twin: HashMap<String, Route>,
    plain: HashMap<String, Route>,
}

/// A device task's inbox, and the device (its uid) it belongs to: a
/// restarted device's new task takes its route over from the old one,
/// which may not have been dropped yet; another device may not.
struct Route {
    owner: String,
    tx: Sender<Inbound>,
}

type Routes = Arc<Mutex<Table>>;

impl Table {
    fn all(&mut self) -> impl Iterator<Item = &mut Sender<Inbound>> {
        self.twin
            .values_mut()
            .chain(self.plain.values_mut())
            .map(|r| &mut r.tx)
    }

    /// The task a message is for, and what it is to it.
    fn route<'t>(&mut self, topic: &'t str) -> Option<(&mut Sender<Inbound>, &'t str)> {
        // A device that is gone (its task stopped) gets nothing.
        fn open(r: &mut Route) -> Option<&mut Sender<Inbound>> {
            (!r.tx.is_closed()).then_some(&mut r.tx)
        }
        if let Some((id, suffix)) = twin::split(topic) {
            return Some((self.twin.get_mut(id).and_then(open)?, suffix));
        }
        let (prefix, property) = topic.rsplit_once('/')?;
        Some((self.plain.get_mut(prefix).and_then(open)?, property))
    }
}

fn plain_filter(prefix: &str) -> String {
    format!("{prefix}/+")
}

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

    /// Messages for MQTT id `id`, for device `owner` (its uid), or None if
    /// another device has the id.
    pub fn register(&self, id: &str, owner: &str) -> Option<Receiver<Inbound>> {
        let mut r = lock(&self.routes);
        self.add(&mut r.twin, id, owner)
    }

    /// Drop `owner`'s route of `id` (not one a newer owner took).
    pub fn unregister(&self, id: &str, owner: &str) {
        let mut r = lock(&self.routes);
        if r.twin.get(id).is_some_and(|r| r.owner == owner) {
            r.twin.remove(id);
        }
    }

    /// Messages on `<prefix>/<property>` (subscribed to on every connect),
    /// or None if another device has the prefix.
    pub fn register_plain(&self, prefix: &str, owner: &str) -> Option<Receiver<Inbound>> {
        let rx = {
            let mut r = lock(&self.routes);
            self.add(&mut r.plain, prefix, owner)?
        };
        let _ = self.out.try_send(Outbound::Prefix {
            prefix: prefix.to_string(),
            on: true,
        });
        Some(rx)
    }

    pub fn unregister_plain(&self, prefix: &str, owner: &str) {
        {
            let mut r = lock(&self.routes);
            if r.plain.get(prefix).is_none_or(|r| r.owner != owner) {
                return;
            }
            r.plain.remove(prefix);
        }
        let _ = self.out.try_send(Outbound::Prefix {
            prefix: prefix.to_string(),
            on: false,
        });
    }

    fn add(
        &self,
        map: &mut HashMap<String, Route>,
        key: &str,
        owner: &str,
    ) -> Option<Receiver<Inbound>> {
        if map
            .get(key)
            .is_some_and(|r| r.owner != owner && !r.tx.is_closed())
        {
            return None;
        }
        let (mut tx, rx) = mailbox(64);
        if !self.connected() {
            let _ = tx.try_send(Inbound::Broker {
                up: false,
                reason: "not connected to the broker yet".into(),
            });
        }
        map.insert(
            key.to_string(),
            Route {
                owner: owner.to_string(),
                tx,
            },
        );
        Some(rx)
    }

    /// Publish and wait until the broker has it (QoS 1: its PUBACK is
    /// not awaited here, the client's queue holds it across reconnects).
    pub async fn publish(&self, topic: String, qos: QoS, payload: Vec<u8>) -> Result<(), String> {
        self.send(topic, qos, false, payload).await
    }

    /// The same, retained: the broker hands it to whoever subscribes
    /// later (a device that comes online after the value was set).
    pub async fn publish_retained(
        &self,
        topic: String,
        qos: QoS,
        payload: Vec<u8>,
    ) -> Result<(), String> {
        self.send(topic, qos, true, payload).await
    }

    async fn send(
        &self,
        topic: String,
        qos: QoS,
        retain: bool,
        payload: Vec<u8>,
    ) -> Result<(), String> {
        let (done, rx) = oneshot::channel();
        self.out
            .send(Outbound::Publish {
                topic,
                qos,
                retain,
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
    for tx in lock(routes).all() {
        let _ = tx.try_send(m.clone());
    }
}

/// Requests the client's own queue holds (it drains as the event loop
/// runs); more wait in the hub's.
const CLIENT_QUEUE: usize = 256;
/// Messages the hub keeps while the broker is away or slow; beyond, a
/// publish is refused (the device task says so).
const PENDING_MAX: usize = 8192;

/// What waits to go to the client.
enum Request {
    Publish {
        topic: String,
        qos: QoS,
        retain: bool,
        payload: Vec<u8>,
    },
    Filter {
        filter: String,
        on: bool,
    },
}

/// Hand the client what its queue takes now, in order.
fn feed(client: &AsyncClient, pending: &mut VecDeque<Request>) {
    while let Some(r) = pending.pop_front() {
        let result = match &r {
            Request::Publish {
                topic,
                qos,
                retain,
                payload,
            } => client.try_publish(topic.clone(), *qos, *retain, payload.clone()),
            Request::Filter { filter, on: true } => {
                client.try_subscribe(filter.clone(), QoS::AtLeastOnce)
            }
            Request::Filter { filter, on: false } => client.try_unsubscribe(filter.clone()),
        };
        match result {
            Ok(()) => {}
            Err(rumqttc::ClientError::TryRequest(_)) => {
                pending.push_front(r);
                return;
            }
            Err(e) => tracing::warn!(error = %e, "MQTT request dropped"),
        }
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
                m = out.recv() => match m {
                    None => return,
                    Some(Outbound::Publish { done, .. }) => {
                        let _ = done.send(Err(reason.clone()));
                    }
                    Some(Outbound::Prefix { .. }) => {}
                },
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
    let (client, mut events) = AsyncClient::new(o, CLIENT_QUEUE);
    let mut said: Option<String> = None;
    // What goes to the client, in order. Never handed over by awaiting:
    // the client's queue drains only while its event loop is polled, here,
    // so an await on a full queue would stop this task for good (100
    // devices' first messages before the broker answers fill it).
    let mut pending: VecDeque<Request> = VecDeque::new();
    loop {
        feed(&client, &mut pending);
        tokio::select! {
            m = out.recv() => match m {
                None => return,
                Some(Outbound::Publish { topic, qos, retain, payload, done }) => {
                    let r = if pending.len() >= PENDING_MAX {
                        Err(format!("{PENDING_MAX} MQTT messages wait for the broker already; this one is dropped"))
                    } else {
                        pending.push_back(Request::Publish { topic, qos, retain, payload });
                        Ok(())
                    };
                    let _ = done.send(r);
                }
                // Connected: now; if not, the next connect subscribes.
                Some(Outbound::Prefix { prefix, on }) if up.load(std::sync::atomic::Ordering::Relaxed) => {
                    pending.push_back(Request::Filter { filter: plain_filter(&prefix), on });
                }
                Some(Outbound::Prefix { .. }) => {}
            },
            ev = events.poll() => match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    // Subscriptions before anything waiting.
                    let plain: Vec<String> = lock(&routes).plain.keys().map(|p| plain_filter(p)).collect();
                    for t in SUBSCRIPTIONS.iter().map(|t| t.to_string()).chain(plain).rev() {
                        pending.push_front(Request::Filter { filter: t, on: true });
                    }
                    up.store(true, std::sync::atomic::Ordering::Relaxed);
                    tracing::info!(broker = %cfg.host, port = cfg.port, "MQTT broker connected");
                    said = None;
                    tell(&routes, Inbound::Broker { up: true, reason: String::new() });
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let mut table = lock(&routes);
                    if let Some((tx, suffix)) = table.route(&p.topic) {
                        let m = Inbound::Message { suffix: suffix.to_string(), payload: p.payload.to_vec() };
                        // Never waits: fine under the lock.
                        if tx.try_send(m).is_err() {
                            tracing::warn!(topic = %p.topic, "device task behind; MQTT message dropped");
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
