//! One node's sync, for as long as its link is up: the node's inventory
//! in, only the difference out, then live changes; pipelined batches with
//! a window of unacked ones; status rows in, acked once recorded.
//!
//! The only state is this connection's view of what the node has (its
//! inventory plus what was sent since), rebuilt from the next inventory
//! after any reconnect: any cloud-gw replica can serve any node.

use std::collections::{BTreeMap, HashSet, VecDeque};

use outrigger_proto::inventory::{self, Inventory};
use outrigger_proto::kinds::Kind;
use outrigger_proto::message::{Change, Message, Sync};

use crate::metrics::METRICS;
use crate::source::Source;

/// Changes per batch, and batches sent ahead of their acks.
pub const BATCH: usize = 100;
pub const WINDOW: usize = 8;

/// (kind, uid) of a change.
fn id(c: &Change) -> (Kind, String) {
    match c {
        Change::Put { kind, uid, .. }
        | Change::Patch { kind, uid, .. }
        | Change::Delete { kind, uid } => (*kind, uid.clone()),
    }
}

/// `body` as a JSON Patch against `base`, the version the node has, when
/// the source still has that version and the patch is well smaller.
fn patch(
    source: &dyn Source,
    kind: Kind,
    uid: &str,
    base: &str,
    rv: &str,
    body: &[u8],
) -> Option<Change> {
    let old: serde_json::Value = serde_json::from_slice(&source.body_at(base)?).ok()?;
    let new: serde_json::Value = serde_json::from_slice(body).ok()?;
    let p = serde_json::to_vec(&json_patch::diff(&old, &new)).ok()?;
    (p.len() * 2 < body.len()).then(|| Change::Patch {
        kind,
        uid: uid.to_string(),
        base_version: base.to_string(),
        resource_version: rv.to_string(),
        patch: p,
    })
}

pub struct Session<'a> {
    node: String,
    source: &'a dyn Source,
    /// The kinds this node's protocol version knows, in put order.
    kinds: Vec<Kind>,
    /// kind -> uid -> resourceVersion the node has, or will have once the
    /// batches in flight commit. None until its inventory arrives.
    edge: Option<Inventory>,
    queue: VecDeque<Change>,
    /// The objects with a change in `queue`.
    queued: HashSet<(Kind, String)>,
    /// Buckets asked for (after a digest) and not answered yet: until
    /// then the view is incomplete and nothing is sent.
    query: Option<BTreeMap<Kind, Vec<u8>>>,
    /// Batches sent and not acked, with when they went.
    in_flight: VecDeque<(u64, std::time::Instant)>,
    /// Terminating pods this session told the node to delete: they are
    /// finalized when the node reports them gone, not before.
    stopping: HashSet<String>,
    next_batch: u64,
    /// Counters for the log and the benchmark.
    pub sent_changes: u64,
}

impl<'a> Session<'a> {
    /// A session with a node that speaks `version` (as negotiated).
    pub fn new(
        node: &str,
        source: &'a dyn Source,
        version: outrigger_proto::Version,
    ) -> Session<'a> {
        Session {
            node: node.to_string(),
            source,
            kinds: outrigger_proto::kinds::kinds_for(version),
            edge: None,
            queue: VecDeque::new(),
            queued: HashSet::new(),
            query: None,
            in_flight: VecDeque::new(),
            stopping: HashSet::new(),
            next_batch: 1,
            sent_changes: 0,
        }
    }

    /// Queue a change, dropping any older one for the same object that is
    /// still waiting: a node that is slow to ack costs at most one queued
    /// change per object, however often the objects change.
    fn enqueue(queue: &mut VecDeque<Change>, queued: &mut HashSet<(Kind, String)>, c: Change) {
        let key = id(&c);
        // Only a change already waiting costs a pass over the queue.
        if !queued.insert(key.clone()) {
            queue.retain(|q| id(q) != key);
        }
        queue.push_back(c);
    }

    /// Queue what the node lacks: puts (what pods use before the Pods),
    /// then deletes (Pods first).
    pub fn refresh(&mut self) {
        if self.query.is_some() {
            return;
        }
        let Some(edge) = self.edge.as_mut() else {
            return;
        };
        let desired = self.source.objects(&self.node);
        let terminating: HashSet<String> =
            self.source.terminating(&self.node).into_iter().collect();
        let held = self.source.held_back(&self.node);
        for &kind in &self.kinds {
            let have = edge.entry(kind).or_default();
            for (uid, (rv, body)) in desired.get(&kind).into_iter().flatten() {
                // A new pod waits for its token (a moment): sent with it.
                if kind == Kind::Pod && held.contains(uid) && !have.contains_key(uid) {
                    continue;
                }
                if kind == Kind::Pod && terminating.contains(uid) {
                    // Never there: nothing to stop (finalized below).
                    if !have.contains_key(uid) {
                        continue;
                    }
                    self.stopping.insert(uid.clone());
                }
                if have.get(uid) != Some(rv) {
                    let change = match have.get(uid) {
                        Some(base) => patch(self.source, kind, uid, base, rv, body),
                        None => None,
                    };
                    let change = change.unwrap_or_else(|| Change::Put {
                        kind,
                        uid: uid.clone(),
                        resource_version: rv.clone(),
                        body: body.to_vec(),
                    });
                    Self::enqueue(&mut self.queue, &mut self.queued, change);
                    have.insert(uid.clone(), rv.clone());
                }
            }
        }
        for &kind in self.kinds.iter().rev() {
            let have = edge.entry(kind).or_default();
            let gone: Vec<String> = have
                .keys()
                .filter(|u| !desired.get(&kind).is_some_and(|d| d.contains_key(*u)))
                .cloned()
                .collect();
            for uid in gone {
                have.remove(&uid);
                Self::enqueue(
                    &mut self.queue,
                    &mut self.queued,
                    Change::Delete { kind, uid },
                );
            }
        }
        // Deleted while the node never had them (or had already stopped
        // them): nothing to wait for.
        let pods = edge.entry(Kind::Pod).or_default();
        for uid in terminating {
            if !pods.contains_key(&uid) && !self.stopping.contains(&uid) {
                self.source.finalize(&self.node, &uid);
            }
        }
    }

    /// The next batch to send, if the window allows one.
    pub fn next_message(&mut self) -> Option<Message> {
        if self.queue.is_empty() || self.in_flight.len() >= WINDOW {
            return None;
        }
        let n = self.queue.len().min(BATCH);
        let changes: Vec<Change> = self.queue.drain(..n).collect();
        for c in &changes {
            self.queued.remove(&id(c));
        }
        let batch = self.next_batch;
        self.next_batch += 1;
        self.in_flight.push_back((batch, std::time::Instant::now()));
        self.sent_changes += changes.len() as u64;
        METRICS
            .changes_pushed
            .fetch_add(changes.len() as u64, std::sync::atomic::Ordering::Relaxed);
        // The journal position goes with the batch that empties the queue:
        // once it is committed, the node has everything up to there.
        // (One position covers every kind: it goes under "Pod".)
        let cursors = match (self.queue.is_empty(), self.source.cursor(&self.node)) {
            (true, Some(c)) => BTreeMap::from([(Kind::Pod, c)]),
            _ => BTreeMap::new(),
        };
        Some(Message::Sync(Sync::Changes {
            batch,
            changes,
            cursors,
        }))
    }

    /// What the node has, worked out from its cursor and our journal, if
    /// its digests confirm it for every kind.
    fn rewound(
        &self,
        desired: &crate::source::NodeObjects,
        digests: &BTreeMap<Kind, serde_bytes::ByteBuf>,
        cursors: &BTreeMap<Kind, String>,
    ) -> Option<Inventory> {
        let cursor = cursors.get(&Kind::Pod)?;
        let changes = self.source.since(&self.node, cursor)?;
        let mut view: Inventory = self
            .kinds
            .iter()
            .map(|k| {
                let v = desired
                    .get(k)
                    .into_iter()
                    .flatten()
                    .map(|(u, (rv, _))| (u.clone(), rv.clone()))
                    .collect();
                (*k, v)
            })
            .collect();
        for (kind, uid, before) in changes.into_iter().rev() {
            let m = view.entry(kind).or_default();
            match before {
                Some(v) => m.insert(uid, v),
                None => m.remove(&uid),
            };
        }
        let agree = self.kinds.iter().all(|k| {
            let theirs = digests.get(k).map(|b| b.as_ref()).unwrap_or(&[][..]);
            let ours = view.get(k).map(inventory::digests).unwrap_or_default();
            inventory::differing(&ours, theirs).is_empty()
        });
        agree.then_some(view)
    }

    /// A fresh view, diffed and queued; logged.
    fn start_over(&mut self, edge: Inventory) {
        let objects: usize = edge.values().map(|k| k.len()).sum();
        self.edge = Some(edge);
        // Whatever was in flight on an older view is superseded.
        self.queue.clear();
        self.queued.clear();
        self.in_flight.clear();
        self.refresh();
        let patches = self
            .queue
            .iter()
            .filter(|c| matches!(c, Change::Patch { .. }))
            .count();
        tracing::info!(node = %self.node, objects, changes = self.queue.len(), patches, "inventory received; sending the difference");
    }

    /// Handle a message from the node; returns the answer to send, if any.
    pub fn handle(&mut self, m: Message) -> Option<Message> {
        match m {
            // The usual reconnect: digests first; a bucket that matches is
            // what we would send, so only differing buckets are asked for.
            Message::Sync(Sync::Digest { kinds, cursors }) => {
                let desired = self.source.objects(&self.node);
                // Where the node says it was: rewind what we have to there;
                // if that matches its digests, we know what it has and
                // need not ask.
                if let Some(edge) = self.rewound(&desired, &kinds, &cursors) {
                    self.query = None;
                    self.start_over(edge);
                    return None;
                }
                let mut edge = BTreeMap::new();
                let mut query = BTreeMap::new();
                for &k in &self.kinds {
                    let want: BTreeMap<String, String> = desired
                        .get(&k)
                        .into_iter()
                        .flatten()
                        .map(|(u, (rv, _))| (u.clone(), rv.clone()))
                        .collect();
                    let theirs = kinds.get(&k).map(|b| b.as_ref()).unwrap_or(&[][..]);
                    let diff = inventory::differing(&inventory::digests(&want), theirs);
                    let view = want
                        .into_iter()
                        .filter(|(u, _)| !diff.contains(&(inventory::bucket(u) as u8)))
                        .collect();
                    edge.insert(k, view);
                    if !diff.is_empty() {
                        query.insert(k, diff);
                    }
                }
                if query.is_empty() {
                    self.query = None;
                    self.start_over(edge);
                    return None;
                }
                self.edge = Some(edge);
                self.queue.clear();
                self.queued.clear();
                self.in_flight.clear();
                let ask = query
                    .iter()
                    .map(|(k, b)| (*k, serde_bytes::ByteBuf::from(b.clone())))
                    .collect();
                self.query = Some(query);
                Some(Message::Sync(Sync::Query { kinds: ask }))
            }
            // The answer to a query: the entries of the buckets asked for.
            Message::Sync(Sync::Inventory { kinds }) if self.query.is_some() => {
                let query = self.query.take().unwrap_or_default();
                let mut edge = self.edge.take().unwrap_or_default();
                for (k, inv) in kinds {
                    let Some(buckets) = query.get(&k) else {
                        continue;
                    };
                    let view = edge.entry(k).or_default();
                    for (u, rv) in inv {
                        if buckets.contains(&(inventory::bucket(&u) as u8)) {
                            view.insert(u, rv);
                        }
                    }
                }
                self.start_over(edge);
                None
            }
            Message::Sync(Sync::Inventory { kinds }) => {
                let mut edge = kinds;
                for k in &self.kinds {
                    edge.entry(*k).or_default();
                }
                self.start_over(edge);
                None
            }
            Message::Sync(Sync::Stale { kind, uids }) => {
                // The node lacks a patch's base: forget what we thought it
                // had, and the next pass sends those objects whole.
                if let Some(have) = self.edge.as_mut().and_then(|e| e.get_mut(&kind)) {
                    for u in &uids {
                        have.remove(u);
                    }
                }
                tracing::info!(node = %self.node, %kind, objects = uids.len(), "patches without their base; sending whole");
                self.refresh();
                None
            }
            Message::Sync(Sync::Ack { batch }) => {
                if let Some(i) = self.in_flight.iter().position(|(b, _)| *b == batch) {
                    if let Some((_, sent)) = self.in_flight.remove(i) {
                        METRICS.push_ack.observe(sent.elapsed());
                        METRICS
                            .batches_acked
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                None
            }
            Message::Sync(Sync::Get {
                id,
                kind,
                namespace,
                name,
            }) => {
                let desired = self.source.objects(&self.node);
                let known = self.kinds.contains(&kind);
                let found = desired.get(&kind).filter(|_| known).and_then(|objects| {
                    objects.iter().find(|(_, (_, body))| {
                        let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
                        v["metadata"]["name"] == name.as_str()
                            && v["metadata"]["namespace"] == namespace.as_str()
                    })
                });
                let answer = match found {
                    Some((uid, (rv, body))) => Sync::Got {
                        id,
                        object: Some(Change::Put {
                            kind,
                            uid: uid.clone(),
                            resource_version: rv.clone(),
                            body: body.to_vec(),
                        }),
                        refused: None,
                    },
                    None => {
                        let reason = format!(
                            "{kind} {namespace}/{name} is not one node {}'s pods or devices use",
                            self.node
                        );
                        tracing::warn!(node = %self.node, reason, "refused");
                        Sync::Got {
                            id,
                            object: None,
                            refused: Some(reason),
                        }
                    }
                };
                Some(Message::Sync(answer))
            }
            other => {
                tracing::debug!(node = %self.node, message = ?other, "ignored");
                None
            }
        }
    }

    /// Nothing queued and nothing unacked.
    pub fn idle(&self) -> bool {
        self.queue.is_empty() && self.in_flight.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cm(i: usize, v: usize) -> String {
        format!("kind: ConfigMap\nmetadata: {{name: c{i}}}\ndata: {{v: '{v}'}}\n---\n")
    }

    #[test]
    fn a_node_that_never_acks_costs_one_queued_change_per_object() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("n")).unwrap();
        let write = |v: usize| {
            let text: String = (0..300).map(|i| cm(i, v)).collect();
            std::fs::write(d.path().join("n/all.yaml"), text).unwrap();
        };
        write(0);
        let src = crate::source::DirSource::new(d.path());
        let mut s = Session::new("n", &src, outrigger_proto::VERSION);
        s.handle(Message::Sync(Sync::Inventory {
            kinds: BTreeMap::new(),
        }));
        // The window fills and nothing is acked; every object keeps changing.
        let mut sent = 0;
        while s.next_message().is_some() {
            sent += 1;
        }
        assert_eq!(sent, 3);
        for v in 1..20 {
            write(v);
            s.refresh();
            while s.next_message().is_some() {
                sent += 1;
            }
            assert!(s.queue.len() <= 300, "queue grew to {}", s.queue.len());
        }
        assert!(sent <= WINDOW);
        // Once acks come, the node gets each object's latest version.
        s.handle(Message::Sync(Sync::Ack { batch: 1 }));
        match s.next_message() {
            Some(Message::Sync(Sync::Changes { changes, .. })) => match &changes[0] {
                Change::Put { body, .. } => {
                    let v: serde_json::Value = serde_json::from_slice(body).unwrap();
                    assert_eq!(v["data"]["v"], "19");
                }
                // Against the version the node was sent first.
                Change::Patch { patch, .. } => {
                    assert!(String::from_utf8_lossy(patch).contains(r#""value":"19""#));
                }
                c => panic!("{c:?}"),
            },
            m => panic!("{m:?}"),
        }
    }

    /// A source whose objects the test sets: pods being deleted are only
    /// finalized once the node no longer has them.
    #[derive(Default)]
    struct Fixed {
        objects: std::sync::Mutex<crate::source::NodeObjects>,
        terminating: std::sync::Mutex<Vec<String>>,
        finalized: std::sync::Mutex<Vec<String>>,
        notify: crate::source::Notifier,
    }

    impl Source for Fixed {
        fn objects(&self, _node: &str) -> crate::source::NodeObjects {
            self.objects.lock().unwrap().clone()
        }
        fn subscribe(&self, node: &str) -> tokio::sync::watch::Receiver<u64> {
            self.notify.subscribe(node)
        }
        fn terminating(&self, _node: &str) -> Vec<String> {
            self.terminating.lock().unwrap().clone()
        }
        fn finalize(&self, _node: &str, uid: &str) {
            self.finalized.lock().unwrap().push(uid.to_string());
        }
        fn record<'a>(
            &'a self,
            _node: &'a str,
            _rows: Vec<outrigger_proto::message::Row>,
        ) -> futures_util::future::BoxFuture<'a, Vec<i64>> {
            Box::pin(async { Vec::new() })
        }
    }

    #[test]
    fn a_deleted_pod_is_stopped_first_and_finalized_only_when_the_node_lacks_it() {
        let src = Fixed::default();
        let pods = BTreeMap::from([("a".to_string(), ("1".to_string(), b"{}"[..].into()))]);
        src.objects.lock().unwrap().insert(Kind::Pod, pods);
        let mut s = Session::new("n", &src, outrigger_proto::VERSION);
        // The node has a.
        let inv = BTreeMap::from([(
            Kind::Pod,
            BTreeMap::from([("a".to_string(), "1".to_string())]),
        )]);
        s.handle(Message::Sync(Sync::Inventory { kinds: inv }));
        while s.next_message().is_some() {}
        // a is deleted; b was created and deleted while the node was away.
        let pods = BTreeMap::from([
            (
                "a".to_string(),
                ("2".to_string(), br#"{"deleting":1}"#[..].into()),
            ),
            ("b".to_string(), ("1".to_string(), b"{}"[..].into())),
        ]);
        src.objects.lock().unwrap().insert(Kind::Pod, pods);
        *src.terminating.lock().unwrap() = vec!["a".into(), "b".into()];
        s.refresh();
        // b is finalized at once and never sent; a goes down as it is now
        // (being deleted), and waits for the node.
        assert_eq!(*src.finalized.lock().unwrap(), vec!["b".to_string()]);
        match s.next_message() {
            Some(Message::Sync(Sync::Changes { changes, .. })) => {
                assert!(
                    matches!(&changes[..], [Change::Put { uid, resource_version, .. }] if uid == "a" && resource_version == "2"),
                    "{changes:?}"
                );
            }
            m => panic!("{m:?}"),
        }
        s.refresh();
        assert_eq!(
            *src.finalized.lock().unwrap(),
            vec!["b".to_string(), "b".to_string()]
        );
    }

    /// Drain a session as a node would: commit every batch (versions only),
    /// keep the last cursors.
    fn drain(
        s: &mut Session,
        inv: &mut Inventory,
        cursors: &mut BTreeMap<Kind, String>,
    ) -> Vec<Change> {
        let mut all = Vec::new();
        while let Some(Message::Sync(Sync::Changes {
            batch,
            changes,
            cursors: c,
        })) = s.next_message()
        {
            for ch in &changes {
                match ch {
                    Change::Put {
                        kind,
                        uid,
                        resource_version,
                        ..
                    }
                    | Change::Patch {
                        kind,
                        uid,
                        resource_version,
                        ..
                    } => {
                        inv.entry(*kind)
                            .or_default()
                            .insert(uid.clone(), resource_version.clone());
                    }
                    Change::Delete { kind, uid } => {
                        inv.entry(*kind).or_default().remove(uid);
                    }
                }
            }
            if !c.is_empty() {
                *cursors = c;
            }
            all.extend(changes);
            s.handle(Message::Sync(Sync::Ack { batch }));
        }
        all
    }

    fn digest_of(inv: &Inventory, cursors: &BTreeMap<Kind, String>) -> Message {
        Message::Sync(Sync::Digest {
            kinds: inventory::digests_of(inv),
            cursors: cursors.clone(),
        })
    }

    #[test]
    fn a_reconnect_from_a_known_cursor_skips_the_query_and_sends_a_patch() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("n")).unwrap();
        let write = |changed: usize| {
            // Objects of a realistic size: a patch pays off.
            let filler = "x".repeat(1000);
            let text: String = (0..40)
                .map(|i| {
                    let v = if i == 7 { changed } else { 0 };
                    format!("kind: ConfigMap\nmetadata: {{name: c{i}}}\ndata: {{v: '{v}', f: {filler}}}\n---\n")
                })
                .collect();
            std::fs::write(d.path().join("n/all.yaml"), text).unwrap();
        };
        write(0);
        let src = crate::source::DirSource::new(d.path());
        let (mut inv, mut cursors) = (BTreeMap::new(), BTreeMap::new());
        let mut s = Session::new("n", &src, outrigger_proto::VERSION);
        s.handle(Message::Sync(Sync::Inventory {
            kinds: BTreeMap::new(),
        }));
        assert_eq!(drain(&mut s, &mut inv, &mut cursors).len(), 40);
        assert!(!cursors.is_empty(), "no cursor with the last batch");
        drop(s);

        // Offline, one object changes; the node comes back.
        write(1);
        let mut s = Session::new("n", &src, outrigger_proto::VERSION);
        assert!(
            s.handle(digest_of(&inv, &cursors)).is_none(),
            "asked anyway"
        );
        let changes = drain(&mut s, &mut inv, &mut cursors);
        assert_eq!(changes.len(), 1);
        let Change::Patch { patch, .. } = &changes[0] else {
            panic!("not a patch: {:?}", changes[0]);
        };
        assert!(String::from_utf8_lossy(patch).contains("\"1\""));
        drop(s);

        // A node whose store lost an object: the digests disagree with the
        // rewind, so it is asked, and gets the object whole.
        let lost = inv
            .get_mut(&Kind::ConfigMap)
            .unwrap()
            .pop_first()
            .unwrap()
            .0;
        let mut s = Session::new("n", &src, outrigger_proto::VERSION);
        let Some(Message::Sync(Sync::Query { kinds })) = s.handle(digest_of(&inv, &cursors)) else {
            panic!("not asked");
        };
        let answer = inventory::answer(&inv, &kinds);
        s.handle(Message::Sync(Sync::Inventory { kinds: answer }));
        let changes = drain(&mut s, &mut inv, &mut cursors);
        assert!(
            matches!(&changes[..], [Change::Put { uid, .. }] if *uid == lost),
            "{changes:?}"
        );
    }
}
