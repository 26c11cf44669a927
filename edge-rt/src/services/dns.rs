//! The node's DNS server for its pods: the cluster's names answered from
//! the [`Table`] (so they resolve through days offline), everything else
//! forwarded to the host's resolvers. The records are kube-dns' (the
//! Kubernetes DNS specification):
//!
//! - `<svc>.<ns>.svc.<domain>`: A/AAAA of the ClusterIPs, or of the ready
//!   endpoints of a headless Service; CNAME for an ExternalName one;
//! - `<host>.<svc>.<ns>.svc.<domain>`: a headless Service's endpoint by
//!   hostname (or its address with dashes);
//! - `_<port>._<proto>.<svc>.<ns>.svc.<domain>`: SRV per named port;
//! - `<a-b-c-d>.<ns>.pod.<domain>`: the address itself;
//! - PTR for ClusterIPs and headless endpoints.
//!
//! Names under the domain that match nothing are NXDOMAIN (with the zone's
//! SOA, so resolvers cache the miss for its short TTL). Messages go
//! through `hickory-proto`'s codec; only forwarded queries are relayed as
//! the bytes they came in.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, PTR, SOA, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::watch;

use super::table::{Service, Table};

/// Answers' TTL (CoreDNS' kubernetes plugin's default).
const TTL: u32 = 5;
/// How long an upstream gets before the next is asked.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest message over UDP without EDNS (RFC 1035).
const UDP_PLAIN: usize = 512;

/// What the table says about one question.
#[derive(Debug, PartialEq)]
pub enum Answer {
    /// The name is the cluster's: these records (none: it exists, but not
    /// with that type).
    Records(Vec<Record>),
    /// The cluster's domain has no such name.
    NxDomain,
    /// Not the cluster's: ask upstream.
    Forward,
}

fn labels(name: &Name) -> Vec<String> {
    let s = name.to_lowercase().to_ascii();
    s.trim_end_matches('.')
        .split('.')
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

fn ip_records(
    name: &Name,
    ips: impl IntoIterator<Item = IpAddr>,
    qtype: RecordType,
) -> Vec<Record> {
    ips.into_iter()
        .filter_map(|ip| match (ip, qtype) {
            (IpAddr::V4(v4), RecordType::A | RecordType::ANY) => {
                Some(Record::from_rdata(name.clone(), TTL, RData::A(A(v4))))
            }
            (IpAddr::V6(v6), RecordType::AAAA | RecordType::ANY) => {
                Some(Record::from_rdata(name.clone(), TTL, RData::AAAA(AAAA(v6))))
            }
            _ => None,
        })
        .collect()
}

/// An endpoint's name in a headless Service: its hostname, else its
/// address with dashes.
fn endpoint_label(hostname: Option<&str>, ip: IpAddr) -> String {
    match hostname.filter(|h| !h.is_empty()) {
        Some(h) => h.to_string(),
        None => ip.to_string().replace(['.', ':'], "-"),
    }
}

fn fqdn(parts: &[&str], domain: &str) -> Option<Name> {
    let mut s = parts.join(".");
    s.push('.');
    s.push_str(domain);
    s.push('.');
    Name::from_ascii(s).ok()
}

fn service_records(t: &Table, s: &Service, name: &Name, qtype: RecordType) -> Vec<Record> {
    if let Some(ext) = &s.external_name {
        let Ok(target) = Name::from_ascii(format!("{}.", ext.trim_end_matches('.'))) else {
            return Vec::new();
        };
        return vec![Record::from_rdata(
            name.clone(),
            TTL,
            RData::CNAME(CNAME(target)),
        )];
    }
    if s.headless {
        return ip_records(
            name,
            s.endpoints.iter().filter(|e| e.ready).map(|e| e.ip),
            qtype,
        );
    }
    let _ = t;
    ip_records(name, s.cluster_ips.iter().copied(), qtype)
}

fn srv_records(t: &Table, s: &Service, port: &str, proto: &str, name: &Name) -> Vec<Record> {
    let Some(p) = s
        .ports
        .iter()
        .find(|p| !p.name.is_empty() && p.name == port && p.protocol.as_str() == proto)
    else {
        return Vec::new();
    };
    let svc_name = |parts: &[&str]| fqdn(parts, &t.domain);
    if s.headless {
        return s
            .endpoints
            .iter()
            .filter(|e| e.ready)
            .filter_map(|e| {
                let host = endpoint_label(e.hostname.as_deref(), e.ip);
                let target = svc_name(&[&host, &s.name, &s.namespace, "svc"])?;
                let port = e.port_for(p)?;
                Some(Record::from_rdata(
                    name.clone(),
                    TTL,
                    RData::SRV(SRV::new(0, 100, port, target)),
                ))
            })
            .collect();
    }
    svc_name(&[&s.name, &s.namespace, "svc"])
        .map(|target| {
            vec![Record::from_rdata(
                name.clone(),
                TTL,
                RData::SRV(SRV::new(0, 100, p.port, target)),
            )]
        })
        .unwrap_or_default()
}

fn ptr_records(t: &Table, ip: IpAddr, name: &Name) -> Option<Vec<Record>> {
    for s in t.services.values() {
        let target = if s.cluster_ips.contains(&ip) {
            fqdn(&[&s.name, &s.namespace, "svc"], &t.domain)
        } else if s.headless {
            s.endpoints.iter().find(|e| e.ip == ip).and_then(|e| {
                let host = endpoint_label(e.hostname.as_deref(), e.ip);
                fqdn(&[&host, &s.name, &s.namespace, "svc"], &t.domain)
            })
        } else {
            None
        };
        if let Some(target) = target {
            return Some(vec![Record::from_rdata(
                name.clone(),
                TTL,
                RData::PTR(PTR(target)),
            )]);
        }
    }
    None
}

/// The dashed address of a pod record (`10-88-0-5`, or IPv6's with `-`).
fn dashed_ip(label: &str) -> Option<IpAddr> {
    if let Ok(v4) = label.replace('-', ".").parse::<Ipv4Addr>() {
        return Some(IpAddr::V4(v4));
    }
    label
        .replace('-', ":")
        .parse::<Ipv6Addr>()
        .ok()
        .map(IpAddr::V6)
}

/// The answer to one question from the table.
pub fn answer(t: &Table, q: &Query) -> Answer {
    let name = q.name();
    let qtype = q.query_type();
    let l = labels(name);
    if qtype == RecordType::PTR {
        return match name.parse_arpa_name().ok().map(|net| net.addr()) {
            Some(ip) => match ptr_records(t, ip, name) {
                Some(r) => Answer::Records(r),
                None => Answer::Forward,
            },
            None => Answer::Forward,
        };
    }
    let domain: Vec<&str> = t.domain.split('.').filter(|s| !s.is_empty()).collect();
    if l.len() < domain.len() || l[l.len() - domain.len()..] != domain[..] {
        return Answer::Forward;
    }
    let rest: Vec<&str> = l[..l.len() - domain.len()]
        .iter()
        .map(String::as_str)
        .collect();
    match rest.as_slice() {
        // The domain itself, `svc.<domain>`, `<ns>.svc.<domain>`, `pod.<domain>`:
        // names that exist with no records.
        [] | ["svc"] | ["pod"] | [_, "svc"] | [_, "pod"] => Answer::Records(Vec::new()),
        [svc, ns, "svc"] => match t.service(ns, svc) {
            Some(s) => Answer::Records(service_records(t, s, name, qtype)),
            None => Answer::NxDomain,
        },
        [port, proto, svc, ns, "svc"] if port.starts_with('_') && proto.starts_with('_') => {
            match t.service(ns, svc) {
                Some(s) if qtype == RecordType::SRV => {
                    Answer::Records(srv_records(t, s, &port[1..], &proto[1..], name))
                }
                Some(_) => Answer::Records(Vec::new()),
                None => Answer::NxDomain,
            }
        }
        [host, svc, ns, "svc"] => match t.service(ns, svc) {
            Some(s) if s.headless => {
                let ips = s
                    .endpoints
                    .iter()
                    .filter(|e| endpoint_label(e.hostname.as_deref(), e.ip) == *host)
                    .map(|e| e.ip)
                    .collect::<Vec<_>>();
                if ips.is_empty() {
                    Answer::NxDomain
                } else {
                    Answer::Records(ip_records(name, ips, qtype))
                }
            }
            _ => Answer::NxDomain,
        },
        [ip, _ns, "pod"] => match dashed_ip(ip) {
            Some(ip) => Answer::Records(ip_records(name, [ip], qtype)),
            None => Answer::NxDomain,
        },
        _ => Answer::NxDomain,
    }
}

fn soa(domain: &str) -> Option<Record> {
    let zone = Name::from_ascii(format!("{domain}.")).ok()?;
    let mname = Name::from_ascii(format!("ns.dns.{domain}.")).ok()?;
    let rname = Name::from_ascii(format!("hostmaster.{domain}.")).ok()?;
    Some(Record::from_rdata(
        zone,
        TTL,
        RData::SOA(SOA::new(mname, rname, 1, 7200, 1800, 86400, TTL)),
    ))
}

/// The response to a request the table answers; None: forward it.
pub fn respond(t: &Table, req: &Message) -> Option<Message> {
    let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
    resp.metadata.recursion_desired = req.metadata.recursion_desired;
    resp.metadata.recursion_available = true;
    resp.add_queries(req.queries.iter().cloned());
    if req.metadata.op_code != OpCode::Query || req.queries.len() != 1 {
        resp.metadata.response_code = ResponseCode::NotImp;
        return Some(resp);
    }
    match answer(t, &req.queries[0]) {
        Answer::Forward => return None,
        Answer::Records(r) => {
            if r.is_empty() {
                resp.add_authorities(soa(&t.domain));
            }
            resp.metadata.authoritative = true;
            resp.add_answers(r);
        }
        Answer::NxDomain => {
            resp.metadata.authoritative = true;
            resp.metadata.response_code = ResponseCode::NXDomain;
            resp.add_authorities(soa(&t.domain));
        }
    }
    if let Some(e) = &req.edns {
        let mut e = e.clone();
        e.set_max_payload(e.max_payload().max(UDP_PLAIN as u16));
        resp.set_edns(e);
    }
    Some(resp)
}

/// The bytes of a response, cut to `limit` (the TC bit set) if longer.
fn encode(resp: &Message, limit: usize) -> Option<Vec<u8>> {
    let bytes = resp.to_vec().ok()?;
    if bytes.len() <= limit {
        return Some(bytes);
    }
    resp.truncate().to_vec().ok()
}

fn servfail(req: &Message) -> Option<Vec<u8>> {
    let mut r = Message::error_msg(
        req.metadata.id,
        req.metadata.op_code,
        ResponseCode::ServFail,
    );
    r.add_queries(req.queries.iter().cloned());
    r.to_vec().ok()
}

/// The host's resolvers, from its resolv.conf, without `ours` (a host
/// pointed at the node's own server would loop).
fn upstreams(resolv_conf: &std::path::Path, ours: &[IpAddr]) -> Vec<SocketAddr> {
    let text = std::fs::read_to_string(resolv_conf).unwrap_or_default();
    text.lines()
        .filter_map(|l| l.strip_prefix("nameserver"))
        .filter_map(|ip| ip.trim().parse::<IpAddr>().ok())
        .filter(|ip| !ours.contains(ip))
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// What the server needs: the table as it changes, where upstreams are
/// written, its own addresses.
#[derive(Clone)]
pub struct Server {
    pub table: watch::Receiver<Arc<Table>>,
    pub resolv_conf: std::path::PathBuf,
    pub ours: Vec<IpAddr>,
}

impl Server {
    /// Ask the upstreams in turn; their answer's bytes, or None.
    async fn forward_udp(&self, query: &[u8], id: u16) -> Option<Vec<u8>> {
        for up in upstreams(&self.resolv_conf, &self.ours) {
            let bind: SocketAddr = if up.is_ipv4() {
                (Ipv4Addr::UNSPECIFIED, 0).into()
            } else {
                (Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let Ok(sock) = UdpSocket::bind(bind).await else {
                continue;
            };
            if sock.connect(up).await.is_err() || sock.send(query).await.is_err() {
                continue;
            }
            let mut buf = vec![0u8; 65535];
            let deadline = tokio::time::Instant::now() + UPSTREAM_TIMEOUT;
            while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
                // Only the answer to this query (its id), not a stray one.
                if n >= 2 && u16::from_be_bytes([buf[0], buf[1]]) == id {
                    buf.truncate(n);
                    return Some(buf);
                }
            }
            tracing::debug!(upstream = %up, "upstream resolver did not answer");
        }
        None
    }

    async fn forward_tcp(&self, query: &[u8]) -> Option<Vec<u8>> {
        for up in upstreams(&self.resolv_conf, &self.ours) {
            let r = tokio::time::timeout(UPSTREAM_TIMEOUT, async {
                let mut s = TcpStream::connect(up).await?;
                let len = u16::try_from(query.len()).map_err(std::io::Error::other)?;
                s.write_all(&len.to_be_bytes()).await?;
                s.write_all(query).await?;
                read_frame(&mut s).await
            })
            .await;
            if let Ok(Ok(b)) = r {
                return Some(b);
            }
        }
        None
    }

    /// One request's response bytes (UDP: cut to what the client takes).
    async fn handle(&self, bytes: &[u8], udp: bool) -> Option<Vec<u8>> {
        let req = match Message::from_vec(bytes) {
            Ok(m) if m.metadata.message_type == MessageType::Query => m,
            Ok(_) => return None,
            Err(e) => {
                tracing::debug!(error = %e, "malformed DNS request");
                // An id to answer to: a FORMERR; else nothing.
                if bytes.len() >= 2 {
                    let id = u16::from_be_bytes([bytes[0], bytes[1]]);
                    return Message::error_msg(id, OpCode::Query, ResponseCode::FormErr)
                        .to_vec()
                        .ok();
                }
                return None;
            }
        };
        let limit = if udp {
            usize::from(req.max_payload()).max(UDP_PLAIN)
        } else {
            usize::from(u16::MAX)
        };
        let local = {
            let t = self.table.borrow();
            respond(&t, &req)
        };
        if let Some(resp) = local {
            return encode(&resp, limit);
        }
        let fwd = if udp {
            self.forward_udp(bytes, req.metadata.id).await
        } else {
            self.forward_tcp(bytes).await
        };
        fwd.or_else(|| servfail(&req))
    }

    /// Serve UDP on `sock`: the cluster's names in the loop, forwarded ones
    /// in tasks of their own (a slow upstream never holds up the rest).
    pub async fn serve_udp(self, sock: UdpSocket) {
        let sock = Arc::new(sock);
        let mut buf = vec![0u8; 65535];
        loop {
            let (n, peer) = match sock.recv_from(&mut buf).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "DNS socket");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let req = &buf[..n];
            let local = Message::from_vec(req).ok().and_then(|m| {
                let t = self.table.borrow();
                respond(&t, &m).map(|r| (r, m.max_payload()))
            });
            match local {
                Some((resp, max)) => {
                    if let Some(out) = encode(&resp, usize::from(max).max(UDP_PLAIN)) {
                        let _ = sock.send_to(&out, peer).await;
                    }
                }
                None => {
                    let (me, sock, req) = (self.clone(), sock.clone(), req.to_vec());
                    tokio::spawn(async move {
                        if let Some(out) = me.handle(&req, true).await {
                            let _ = sock.send_to(&out, peer).await;
                        }
                    });
                }
            }
        }
    }

    pub async fn serve_tcp(self, listener: TcpListener) {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let me = self.clone();
            tokio::spawn(async move {
                // Several queries may come on one connection (RFC 7766).
                while let Ok(Ok(req)) =
                    tokio::time::timeout(Duration::from_secs(10), read_frame(&mut s)).await
                {
                    let Some(out) = me.handle(&req, false).await else {
                        break;
                    };
                    let Ok(len) = u16::try_from(out.len()) else {
                        break;
                    };
                    if s.write_all(&len.to_be_bytes()).await.is_err()
                        || s.write_all(&out).await.is_err()
                    {
                        break;
                    }
                }
            });
        }
    }
}

async fn read_frame(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 2];
    s.read_exact(&mut len).await?;
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut buf).await?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::table::tests::sample;

    fn ask(t: &Table, name: &str, qtype: RecordType) -> Answer {
        answer(t, &Query::query(Name::from_ascii(name).unwrap(), qtype))
    }

    fn rdata(a: Answer) -> Vec<String> {
        match a {
            Answer::Records(r) => r.iter().map(|r| r.data.to_string()).collect(),
            other => vec![format!("{other:?}")],
        }
    }

    #[test]
    fn services_endpoints_and_pods_by_name() {
        let local = [(("plant".into(), "web-a".into()), true)].into();
        let t = sample("a", &local);
        assert_eq!(
            rdata(ask(&t, "web.plant.svc.cluster.local.", RecordType::A)),
            vec!["10.0.0.20"]
        );
        // Case does not matter; AAAA of a v4-only Service is no data.
        assert_eq!(
            rdata(ask(&t, "WEB.Plant.svc.cluster.local.", RecordType::A)),
            vec!["10.0.0.20"]
        );
        assert!(rdata(ask(&t, "web.plant.svc.cluster.local.", RecordType::AAAA)).is_empty());
        assert_eq!(
            rdata(ask(&t, "db.plant.svc.cluster.local.", RecordType::A)),
            vec!["10.244.2.7"]
        );
        assert_eq!(
            rdata(ask(&t, "db-0.db.plant.svc.cluster.local.", RecordType::A)),
            vec!["10.244.2.7"]
        );
        assert_eq!(
            rdata(ask(
                &t,
                "_http._tcp.web.plant.svc.cluster.local.",
                RecordType::SRV
            )),
            vec!["0 100 80 web.plant.svc.cluster.local."]
        );
        assert_eq!(
            rdata(ask(
                &t,
                "_pg._tcp.db.plant.svc.cluster.local.",
                RecordType::SRV
            )),
            vec!["0 100 5432 db-0.db.plant.svc.cluster.local."]
        );
        assert_eq!(
            rdata(ask(&t, "out.plant.svc.cluster.local.", RecordType::A)),
            vec!["example.org."]
        );
        assert_eq!(
            rdata(ask(
                &t,
                "10-244-1-9.plant.pod.cluster.local.",
                RecordType::A
            )),
            vec!["10.244.1.9"]
        );
        assert_eq!(
            ask(&t, "nope.plant.svc.cluster.local.", RecordType::A),
            Answer::NxDomain
        );
        assert_eq!(ask(&t, "example.org.", RecordType::A), Answer::Forward);
        assert_eq!(
            rdata(ask(&t, "20.0.0.10.in-addr.arpa.", RecordType::PTR)),
            vec!["web.plant.svc.cluster.local."]
        );
        assert_eq!(
            ask(&t, "1.1.168.192.in-addr.arpa.", RecordType::PTR),
            Answer::Forward
        );
    }

    #[test]
    fn responses_are_authoritative_and_misses_carry_the_soa() {
        let t = sample("a", &Default::default());
        let mut req = Message::query();
        req.add_query(Query::query(
            Name::from_ascii("nope.plant.svc.cluster.local.").unwrap(),
            RecordType::A,
        ));
        let resp = respond(&t, &req).unwrap();
        assert_eq!(resp.metadata.response_code, ResponseCode::NXDomain);
        assert!(resp.metadata.authoritative);
        assert_eq!(resp.authorities.len(), 1);
        // Round trip through the codec.
        let back = Message::from_vec(&resp.to_vec().unwrap()).unwrap();
        assert_eq!(back.metadata.id, req.metadata.id);
        let mut fwd = Message::query();
        fwd.add_query(Query::query(
            Name::from_ascii("example.org.").unwrap(),
            RecordType::A,
        ));
        assert!(respond(&t, &fwd).is_none());
    }
}
