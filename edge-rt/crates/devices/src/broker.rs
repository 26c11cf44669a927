//! The embedded MQTT broker: rumqttd, configured for a gateway (bounded
//! in-memory logs, MQTT 3.1.1 listeners on the addresses asked for, users
//! with passwords if any are given).
//!
//! rumqttd runs a thread and a runtime per listener. edge-rt's own process
//! must have no threads outside the fork guard (libcontainer clones it to
//! create containers), so the broker runs as a child process of its own,
//! `edge-rt broker`, which edge-rt supervises; [`serve`] is that process's
//! body and blocks for as long as the broker runs.

use std::collections::BTreeMap;
use std::net::SocketAddr;

/// What the broker listens on and whom it lets in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerSettings {
    pub listen: Vec<SocketAddr>,
    /// Username to password; empty: anyone may connect (loopback only is
    /// the default, see the README on who may publish what).
    pub users: BTreeMap<String, String>,
    pub max_connections: usize,
    pub max_payload_bytes: usize,
}

impl Default for BrokerSettings {
    fn default() -> Self {
        BrokerSettings {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 1883))],
            users: BTreeMap::new(),
            max_connections: 1024,
            max_payload_bytes: 64 * 1024,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("the embedded broker has no address to listen on")]
    NoListener,
    #[error("the embedded broker cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the embedded broker stopped: {0}")]
    Stopped(String),
}

/// Messages a subscriber has not read yet are kept in segments of this
/// size, this many per subscription filter: a slow subscriber loses the
/// oldest beyond that, and the broker's memory stays bounded (rumqttd's
/// own defaults are 100 MiB by 10). A busy filter's log fills to this and
/// stays: 128 KiB (some 500 readings) is what a subscriber may lag, and
/// 4 x 128 KiB held the broker 0.6 MB higher under 100 devices.
const SEGMENT_BYTES: usize = 32 * 1024;
const SEGMENTS: usize = 4;

/// rumqttd's configuration for `s`.
pub fn config(s: &BrokerSettings) -> rumqttd::Config {
    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 10_000,
        max_payload_size: s.max_payload_bytes,
        max_inflight_count: 100,
        auth: (!s.users.is_empty()).then(|| s.users.clone().into_iter().collect()),
        external_auth: None,
        // A publish nobody subscribed to is dropped, not kept in a log of
        // its own.
        dynamic_filters: false,
    };
    let v4 = s
        .listen
        .iter()
        .enumerate()
        .map(|(i, addr)| {
            (
                format!("{}", i + 1),
                rumqttd::ServerSettings {
                    name: format!("mqtt-{addr}"),
                    listen: *addr,
                    tls: None,
                    next_connection_delay_ms: 1,
                    connections: connections.clone(),
                },
            )
        })
        .collect();
    rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: s.max_connections,
            max_outgoing_packet_count: 200,
            max_segment_size: SEGMENT_BYTES,
            max_segment_count: SEGMENTS,
            ..Default::default()
        },
        v4: Some(v4),
        ..Default::default()
    }
}

/// Run the broker (blocking). Every address is bound first, so one that
/// cannot be (taken, or the pod bridge not up yet) fails the start and the
/// supervisor tries again, rather than a broker serving only some.
pub fn serve(s: &BrokerSettings) -> Result<(), BrokerError> {
    if s.listen.is_empty() {
        return Err(BrokerError::NoListener);
    }
    // All held at once, so an address given twice fails too.
    let held = s
        .listen
        .iter()
        .map(|addr| {
            std::net::TcpListener::bind(addr).map_err(|source| BrokerError::Bind {
                addr: *addr,
                source,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    drop(held);
    let mut broker = rumqttd::Broker::new(config(s));
    broker
        .start()
        .map_err(|e| BrokerError::Stopped(e.to_string()))?;
    Err(BrokerError::Stopped("every listener ended".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_listener_per_address_with_users_only_when_given() {
        let mut s = BrokerSettings {
            listen: vec![
                "127.0.0.1:1883".parse().unwrap(),
                "10.88.0.1:1883".parse().unwrap(),
            ],
            ..Default::default()
        };
        let c = config(&s);
        let v4 = c.v4.unwrap();
        assert_eq!(v4.len(), 2);
        assert!(v4.values().all(|l| l.connections.auth.is_none()));
        assert!(v4.values().any(|l| l.listen == s.listen[1]));
        assert_eq!(
            c.router.max_segment_size * c.router.max_segment_count,
            128 * 1024
        );
        s.users.insert("edge-rt".into(), "secret".into());
        let c = config(&s);
        let auth = c.v4.unwrap()["1"].connections.auth.clone().unwrap();
        assert_eq!(auth.get("edge-rt").map(String::as_str), Some("secret"));
    }

    /// The vendored patch (edge-rt/vendor/rumqttd.patch): KubeEdge's twin
    /// topics match filters that name "$hw", never a leading wildcard.
    #[test]
    fn dollar_topics_match_filters_that_name_their_first_level() {
        use rumqttd::protocol::matches;
        let t = "$hw/events/device/plant/probe/twin/update";
        assert!(matches(t, "$hw/events/device/+/+/twin/+"));
        assert!(matches(t, "$hw/#"));
        assert!(!matches(t, "#"));
        assert!(!matches(t, "+/events/device/plant/probe/twin/update"));
        assert!(matches("plant/readings", "#"));
    }

    #[test]
    fn an_address_in_use_fails_the_start() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let s = BrokerSettings {
            listen: vec![taken.local_addr().unwrap()],
            ..Default::default()
        };
        assert!(matches!(serve(&s), Err(BrokerError::Bind { .. })));
        let none = BrokerSettings {
            listen: vec![],
            ..Default::default()
        };
        assert!(matches!(serve(&none), Err(BrokerError::NoListener)));
        let free = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let twice = BrokerSettings {
            listen: vec![free, free],
            ..Default::default()
        };
        assert!(matches!(serve(&twice), Err(BrokerError::Bind { .. })));
    }
}
