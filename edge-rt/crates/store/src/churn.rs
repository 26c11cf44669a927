//! A heavy, endless write load on a real store: object puts and deletes in
//! batches with their cursors, status and event churn, and acks, the mix a
//! node sees while syncing with pods crash-looping. The crash test kills
//! `edge-rt store churn` at random instants; every line it printed was
//! printed after its commit returned, so the test knows what must survive:
//!
//! ```text
//! put KIND UID RV     the object is stored at RV (or a later version)
//! del KIND UID RV     the object is gone (or back at a later version)
//! out SEQ CLASS KEY   the row is in the outbox (unless acked or replaced)
//! ack? SEQ CLASS KEY  about to be acked: gone or not, both are right
//! ack SEQ CLASS KEY   the row is gone
//! ```

use std::io::Write;

use serde_json::json;

use super::{now_ms, Change, Class, Kind, Object, Report, Source, Store, StoreError};

/// Objects the load cycles through (a third of each kind).
pub const POOL: u64 = 300;

/// A small xorshift: the load only needs to be varied, and a seed makes a
/// failing run repeatable.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// The object `i` of the pool at resourceVersion `rv`, `pad` bytes of data.
pub fn object(i: u64, rv: u64, pad: usize) -> Object {
    let kind = Kind::ALL[(i % 3) as usize];
    let body = json!({
        "apiVersion": "v1",
        "kind": kind.as_str(),
        "metadata": {
            "name": format!("o{i}"),
            "namespace": "churn",
            "uid": format!("u{i}"),
            "resourceVersion": rv.to_string(),
        },
        "data": { "rv": rv.to_string(), "pad": "x".repeat(pad) },
    });
    Object {
        kind,
        namespace: "churn".into(),
        name: format!("o{i}"),
        uid: format!("u{i}"),
        resource_version: rv.to_string(),
        source: Source::Cloud,
        body,
    }
}

/// The next resourceVersion: one past every cursor, so a version is never
/// reused even after a crash between commit and print.
fn next_rv(store: &Store) -> Result<u64, StoreError> {
    let mut max = 0;
    for k in Kind::ALL {
        if let Some(c) = store.cursor(k)? {
            max = max.max(c.parse::<u64>().unwrap_or(0));
        }
    }
    Ok(max + 1)
}

/// Run the load for `rounds` rounds (forever if None), printing what was
/// committed to `out`.
pub fn run(
    store: &Store,
    seed: u64,
    rounds: Option<u64>,
    out: &mut dyn Write,
) -> Result<(), StoreError> {
    let mut rng = Rng::new(seed);
    let mut rv = next_rv(store)?;
    let mut event = rng.next_u64() >> 20;
    let io = |e: std::io::Error| StoreError::Io {
        path: "stdout".into(),
        source: e,
    };
    writeln!(out, "ready {rv}")
        .and_then(|_| out.flush())
        .map_err(io)?;
    let mut round = 0u64;
    while rounds.is_none_or(|n| round < n) {
        round += 1;
        // Objects, with the cursors they advance.
        let n = 20 + rng.below(80);
        let mut changes = Vec::new();
        let mut lines = String::new();
        let mut cursors = std::collections::BTreeMap::new();
        for _ in 0..n {
            let i = rng.below(POOL);
            let kind = Kind::ALL[(i % 3) as usize];
            if rng.below(100) < 15 {
                changes.push(Change::Delete {
                    kind,
                    uid: format!("u{i}"),
                });
                lines.push_str(&format!("del {} u{i} {rv}\n", kind.as_str()));
            } else {
                changes.push(Change::Put(object(i, rv, 50 + rng.below(1500) as usize)));
                lines.push_str(&format!("put {} u{i} {rv}\n", kind.as_str()));
            }
            cursors.insert(kind, rv.to_string());
            rv += 1;
        }
        let cursors: Vec<(Kind, String)> = cursors.into_iter().collect();
        store.apply(&changes, &cursors)?;
        out.write_all(lines.as_bytes()).map_err(io)?;

        // Status and event churn.
        let mut reports = Vec::new();
        for _ in 0..10 + rng.below(20) {
            if rng.below(4) == 0 {
                event += 1;
                reports.push(Report {
                    class: Class::Event,
                    key: format!("ev{event}"),
                    body: json!({"reason": "BackOff", "n": event}),
                });
            } else {
                reports.push(Report {
                    class: Class::Status,
                    key: format!("pod/p{}", rng.below(50)),
                    body: json!({"phase": "Running", "round": round}),
                });
            }
        }
        let seqs = store.report(&reports, now_ms())?;
        let mut lines = String::new();
        for (s, r) in seqs.iter().zip(&reports) {
            let class = if r.class == Class::Event {
                "event"
            } else {
                "status"
            };
            lines.push_str(&format!("out {s} {class} {}\n", r.key));
        }
        out.write_all(lines.as_bytes()).map_err(io)?;

        // The cloud acks some of what is pending.
        let pending = store.pending(0, 200)?;
        let acked: Vec<&super::OutboxRow> = pending.iter().filter(|_| rng.below(2) == 0).collect();
        let intent: String = acked
            .iter()
            .map(|r| format!("ack? {} {} {}\n", r.seq, r.class.as_str(), r.key))
            .collect();
        out.write_all(intent.as_bytes())
            .and_then(|_| out.flush())
            .map_err(io)?;
        store.ack(&acked.iter().map(|r| r.seq).collect::<Vec<_>>())?;
        let lines: String = acked
            .iter()
            .map(|r| format!("ack {} {} {}\n", r.seq, r.class.as_str(), r.key))
            .collect();
        out.write_all(lines.as_bytes()).map_err(io)?;
        out.flush().map_err(io)?;
    }
    Ok(())
}
