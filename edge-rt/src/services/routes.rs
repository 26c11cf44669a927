//! Routes to the pods of the site's other gateways: each peer's pod CIDR
//! through the peer's address, as plain kernel routes (no tunnel: the
//! gateways of a site share a network, and pods keep their addresses end
//! to end; traffic between sites goes through the cloud's Services, not
//! here). Routes are tagged with their own protocol number, so those no
//! longer wanted are found and removed, and nothing else is touched.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use super::table::Table;

/// `proto` of our routes (`ip route show proto 199`).
pub const PROTO: &str = "199";

/// (CIDR, via) per site peer with both known.
pub fn wanted(t: &Table) -> BTreeSet<(String, Ipv4Addr)> {
    t.peers
        .iter()
        .filter_map(|p| p.address.map(|a| (p, a)))
        .flat_map(|(p, a)| {
            p.pod_cidrs
                .iter()
                .filter(|c| c.parse::<Ipv4Net>().is_ok())
                .map(move |c| (c.clone(), a))
        })
        // Never over this node's own pods.
        .filter(|(c, _)| t.pod_cidr.as_deref() != Some(c.as_str()))
        .collect()
}

/// Just enough CIDR parsing to keep a malformed one off the command line.
struct Ipv4Net;

impl std::str::FromStr for Ipv4Net {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        let (ip, len) = s.split_once('/').ok_or(())?;
        ip.parse::<Ipv4Addr>().map_err(|_| ())?;
        match len.parse::<u8>() {
            Ok(0..=32) => Ok(Ipv4Net),
            _ => Err(()),
        }
    }
}

/// Make the routes `want`, and remove ours that are not in it.
pub async fn apply(want: &BTreeSet<(String, Ipv4Addr)>) -> Result<(), String> {
    let have = super::run("ip", &["-4", "route", "show", "proto", PROTO], None).await?;
    for line in have.lines() {
        let mut f = line.split_whitespace();
        let (Some(dst), Some("via"), Some(via)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let keep = via
            .parse::<Ipv4Addr>()
            .is_ok_and(|v| want.contains(&(dst.to_string(), v)));
        if !keep {
            super::run("ip", &["route", "del", dst, "proto", PROTO], None).await?;
        }
    }
    let mut errors = Vec::new();
    for (cidr, via) in want {
        let via = via.to_string();
        if let Err(e) = super::run(
            "ip",
            &["route", "replace", cidr, "via", &via, "proto", PROTO],
            None,
        )
        .await
        {
            errors.push(e);
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::table::Peer;

    #[test]
    fn a_route_per_peer_with_a_cidr_and_an_address() {
        let t = Table {
            pod_cidr: Some("10.244.1.0/24".into()),
            peers: vec![
                Peer {
                    name: "b".into(),
                    pod_cidrs: vec!["10.244.2.0/24".into()],
                    address: Some("192.168.50.3".parse().unwrap()),
                },
                Peer {
                    name: "no-address".into(),
                    pod_cidrs: vec!["10.244.3.0/24".into()],
                    address: None,
                },
                Peer {
                    name: "bad".into(),
                    pod_cidrs: vec!["10.244.4.0/99".into(), "10.244.1.0/24".into()],
                    address: Some("192.168.50.4".parse().unwrap()),
                },
            ],
            ..Default::default()
        };
        assert_eq!(
            wanted(&t).into_iter().collect::<Vec<_>>(),
            vec![("10.244.2.0/24".to_string(), "192.168.50.3".parse().unwrap())]
        );
    }
}
