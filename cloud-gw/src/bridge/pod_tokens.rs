//! Service account tokens for edge pods, as a kubelet's token manager gets
//! them: every projected `serviceAccountToken` source of a pod (the
//! `kube-api-access-*` volume the ServiceAccount admission plugin gives
//! every pod, or a user's own) gets a token from the TokenRequest API,
//! bound to the pod, for the source's audience and lifetime. It goes to the
//! pod's node like a Secret (kind `ServiceAccountToken`), and is requested
//! again once 80% of its life is up (or it is `token_max_age` old, 24 h as
//! the kubelet has it), so the file in the container is replaced before it
//! expires.
//!
//! Only for the nodes whose link this replica holds: a node gets its pods'
//! tokens before its objects are first looked at ([`prepare`]), and they
//! are refreshed while its link stays here. A node that goes offline keeps
//! the last token it got; a pod whose token expires meanwhile keeps
//! running, and its API calls fail until the link is back. Node
//! restriction: a node is only ever sent tokens for pods bound to it (the
//! cache holds none other for it), and the API server refuses a token
//! bound to a pod that is gone.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::PostParams;
use kube::Api;
use outrigger_proto::kinds::{Kind, ServiceAccountToken, TokenMeta, TokenSpec, TokenStatus};

use super::cache::{Key, Obj, TokenWant};
use super::{lock, Inner};

/// Token requests at once (each also takes one of the API write slots).
const CONCURRENT: usize = 8;
/// How long a node's first sync waits for its pods' tokens.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(10);

/// The token loop's state, kept in the bridge's `Inner`: which nodes are
/// served here, whose pods changed since the loop last looked, and when
/// each token held (or failing) is due again, in order. The loop looks at
/// changed nodes and due tokens only, so its work follows what changed,
/// not how many pods there are.
#[derive(Default)]
pub(crate) struct State {
    /// Nodes whose link this replica holds (links per node).
    served: HashMap<String, usize>,
    dirty: HashSet<String>,
    due: HashMap<Key, Due>,
    queue: BTreeSet<(Instant, Key)>,
    /// Requested and not answered yet: not asked for twice.
    inflight: HashSet<Key>,
}

#[derive(Debug, Clone)]
struct Due {
    at: Instant,
    failures: u32,
    node: String,
}

impl State {
    fn schedule(&mut self, key: Key, due: Due) {
        if let Some(old) = self.due.get(&key) {
            self.queue.remove(&(old.at, key.clone()));
        }
        self.queue.insert((due.at, key.clone()));
        self.due.insert(key, due);
    }

    fn forget(&mut self, key: &Key) {
        if let Some(old) = self.due.remove(key) {
            self.queue.remove(&(old.at, key.clone()));
        }
    }

    fn is_served(&self, node: &str) -> bool {
        self.served.contains_key(node)
    }
}

/// One token to request.
struct Job {
    node: String,
    pod: Key,
    pod_uid: String,
    want: TokenWant,
}

/// How long until a token just issued should be requested again: once
/// 80% of its `ttl` is up, counted from now with `remaining` seconds of it
/// left as the API server said, and never later than `max_age`.
pub fn refresh_after(ttl_secs: i64, remaining_secs: i64, max_age: Duration) -> Duration {
    let ttl = ttl_secs.max(1);
    let remaining = remaining_secs.clamp(0, ttl);
    let until = (remaining - ttl / 5).max(0) as u64;
    Duration::from_secs(until).min(max_age)
}

/// Back-off after failed requests: 2 s doubling to 64 s.
fn retry_after(failures: u32) -> Duration {
    Duration::from_secs(2u64 << failures.clamp(1, 6).saturating_sub(1))
}

/// The tokens of `node`'s pods to request now: those not held (and not
/// backing off), and those due, unless already asked for. With `only`,
/// just those keys. They count as in flight from here.
fn jobs_of(inner: &Inner, node: &str, only: Option<&HashSet<Key>>, now: Instant) -> Vec<Job> {
    let cache = lock(&inner.cache);
    let mut state = lock(&inner.tokens);
    let mut jobs = Vec::new();
    for (pod, pod_uid, wants) in cache.token_wants_of(node) {
        for want in wants {
            let key = (pod.0.clone(), want.name.clone());
            if only.is_some_and(|o| !o.contains(&key)) || state.inflight.contains(&key) {
                continue;
            }
            let waiting = state.due.get(&key).is_some_and(|d| d.at > now);
            let held = cache.token(&key.0, &key.1).is_some();
            if waiting && (held || state.due[&key].failures > 0) {
                continue;
            }
            state.inflight.insert(key);
            jobs.push(Job {
                node: node.to_string(),
                pod: pod.clone(),
                pod_uid: pod_uid.clone(),
                want,
            });
        }
    }
    jobs
}

/// `node`'s pods whose first token is still to come (not held, not
/// failed): the session waits for it before sending a pod the node lacks.
pub(crate) fn held_back(inner: &Inner, node: &str) -> HashSet<String> {
    let cache = lock(&inner.cache);
    let state = lock(&inner.tokens);
    cache
        .token_wants_of(node)
        .into_iter()
        .filter(|(pod, _, wants)| {
            wants.iter().any(|w| {
                let key = (pod.0.clone(), w.name.clone());
                cache.token(&key.0, &key.1).is_none()
                    && state.due.get(&key).is_none_or(|d| d.failures == 0)
            })
        })
        .map(|(_, uid, _)| uid)
        .collect()
}

/// A token counted as in flight until this goes, however its request ends.
struct InFlight<'a>(&'a Inner, Key);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        lock(&self.0.tokens).inflight.remove(&self.1);
    }
}

/// Request one token and hand it to the cache (and so to the node).
async fn fetch(inner: &Inner, job: Job) {
    let key = (job.pod.0.clone(), job.want.name.clone());
    let inflight = InFlight(inner, key.clone());
    let result = match inner.api_slots.acquire().await {
        Ok(_slot) => request(inner, &job).await,
        Err(_) => Err("shutting down".into()),
    };
    drop(inflight);
    match result {
        Ok((obj, refresh)) => {
            let nodes = lock(&inner.cache).put_token(&job.pod, &job.pod_uid, obj);
            let due = Due {
                at: Instant::now() + refresh,
                failures: 0,
                node: job.node.clone(),
            };
            lock(&inner.tokens).schedule(key, due);
            for n in nodes {
                inner.notify.changed(&n);
            }
        }
        Err(e) => {
            let mut state = lock(&inner.tokens);
            let failures = state.due.get(&key).map_or(0, |d| d.failures) + 1;
            if failures == 1 {
                tracing::warn!(namespace = %job.pod.0, pod = %job.pod.1, service_account = %job.want.service_account, error = %e, "service account token not issued; retrying");
            }
            let due = Due {
                at: Instant::now() + retry_after(failures),
                failures,
                node: job.node.clone(),
            };
            state.schedule(key, due);
        }
    }
}

async fn request(inner: &Inner, job: &Job) -> Result<(Obj, Duration), String> {
    let (ns, pod_name) = &job.pod;
    let api = Api::<ServiceAccount>::namespaced(inner.client.clone(), ns);
    let tr = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: job.want.audience.clone().map(|a| vec![a]),
            expiration_seconds: Some(job.want.expiration_seconds),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(pod_name.clone()),
                uid: Some(job.pod_uid.clone()),
            }),
        }),
        ..Default::default()
    };
    let got = api
        .create_token_request(&job.want.service_account, &PostParams::default(), &tr)
        .await
        .map_err(|e| e.to_string())?;
    let status = got.status.unwrap_or_default();
    let (Some(token), Some(expires)) = (status.token, status.expiration_timestamp) else {
        return Err("the API server answered without a token".into());
    };
    let expires = expires.0;
    let remaining = expires
        .duration_since(k8s_openapi::jiff::Timestamp::now())
        .as_secs();
    let token = ServiceAccountToken {
        api_version: ServiceAccountToken::API_VERSION.into(),
        kind: Kind::ServiceAccountToken.as_str().into(),
        metadata: TokenMeta {
            name: job.want.name.clone(),
            namespace: ns.clone(),
            uid: job.want.uid.clone(),
        },
        spec: TokenSpec {
            service_account_name: job.want.service_account.clone(),
            audience: job.want.audience.clone(),
            expiration_seconds: job.want.expiration_seconds,
            pod_name: pod_name.clone(),
            pod_uid: job.pod_uid.clone(),
        },
        status: TokenStatus {
            token,
            expiration_timestamp: format!("{expires:.0}"),
        },
    };
    let body = serde_json::to_value(&token).map_err(|e| e.to_string())?;
    let refresh = refresh_after(
        job.want.expiration_seconds,
        remaining,
        inner.cfg.token_max_age,
    );
    Ok((super::cache::strip(body, false), refresh))
}

async fn fetch_all(inner: &Inner, jobs: Vec<Job>) {
    futures_util::stream::iter(jobs)
        .for_each_concurrent(CONCURRENT, |j| fetch(inner, j))
        .await;
}

/// Before a node's first sync on this replica: its pods' tokens, or as
/// many as come within a few seconds (the rest follow as they come: the
/// requests go on without the wait).
pub(crate) async fn prepare(inner: Arc<Inner>, node: &str) {
    let jobs = jobs_of(&inner, node, None, Instant::now());
    if jobs.is_empty() {
        return;
    }
    let n = jobs.len();
    let work = tokio::spawn(async move { fetch_all(&inner, jobs).await });
    if tokio::time::timeout(PREPARE_TIMEOUT, work).await.is_err() {
        tracing::info!(
            node,
            tokens = n,
            "service account tokens still coming after 10 s; syncing meanwhile"
        );
    }
}

/// A link of `node` came up here (`up`) or went.
pub(crate) fn serve(inner: &Inner, node: &str, up: bool) {
    let mut s = lock(&inner.tokens);
    let n = s.served.entry(node.to_string()).or_default();
    if up {
        *n += 1;
        s.dirty.insert(node.to_string());
    } else {
        *n = n.saturating_sub(1);
        if *n == 0 {
            s.served.remove(node);
        }
    }
    drop(s);
    inner.token_wake.notify_one();
}

/// Pods of these nodes changed (the pod watch).
pub(crate) fn changed(inner: &Inner, nodes: &[String]) {
    let mut s = lock(&inner.tokens);
    let mut any = false;
    for n in nodes {
        if s.is_served(n) {
            any |= s.dirty.insert(n.clone());
        }
    }
    drop(s);
    if any {
        inner.token_wake.notify_one();
    }
}

/// The token loop: the tokens of nodes whose pods changed, and those due,
/// then sleep until the next is due or something changes.
pub(crate) async fn run(inner: Arc<Inner>) {
    loop {
        let now = Instant::now();
        let (dirty, due, next) = {
            let mut s = lock(&inner.tokens);
            let dirty: Vec<String> = s.dirty.drain().collect();
            let mut due: HashMap<String, HashSet<Key>> = HashMap::new();
            while let Some((at, key)) = s.queue.first().cloned() {
                if at > now {
                    break;
                }
                s.queue.remove(&(at, key.clone()));
                let Some(d) = s.due.get(&key) else {
                    continue;
                };
                // Not served here any more: refreshed when it is again.
                if s.is_served(&d.node) {
                    due.entry(d.node.clone()).or_default().insert(key);
                }
            }
            (dirty, due, s.queue.first().map(|(at, _)| *at))
        };
        let mut jobs = Vec::new();
        for node in &dirty {
            jobs.extend(jobs_of(&inner, node, None, now));
        }
        for (node, keys) in &due {
            if dirty.contains(node) {
                continue;
            }
            let found = jobs_of(&inner, node, Some(keys), now);
            // What is no longer wanted (the pod went) is forgotten.
            let mut s = lock(&inner.tokens);
            for k in keys {
                let wanted = found.iter().any(|j| j.pod.0 == k.0 && j.want.name == k.1);
                if !wanted && !s.inflight.contains(k) {
                    s.forget(k);
                }
            }
            drop(s);
            jobs.extend(found);
        }
        fetch_all(&inner, jobs).await;
        let wait = next
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_secs(3600))
            .max(Duration::from_millis(50));
        tokio::select! {
            _ = inner.token_wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_refreshed_at_80_percent_of_their_life_or_their_max_age() {
        let day = Duration::from_secs(86_400);
        // An hour's token, just issued: again after 48 minutes.
        assert_eq!(refresh_after(3600, 3600, day), Duration::from_secs(2880));
        // Issued a while ago (the clock said less remains): sooner.
        assert_eq!(refresh_after(3600, 1000, day), Duration::from_secs(280));
        // Already in its last fifth, or expired: at once.
        assert_eq!(refresh_after(3600, 500, day), Duration::ZERO);
        assert_eq!(refresh_after(3600, -5, day), Duration::ZERO);
        // A year's token: no older than the max age.
        assert_eq!(refresh_after(31_536_000, 31_536_000, day), day);
        assert_eq!(retry_after(1), Duration::from_secs(2));
        assert_eq!(retry_after(3), Duration::from_secs(8));
        assert_eq!(retry_after(30), Duration::from_secs(64));
    }
}
