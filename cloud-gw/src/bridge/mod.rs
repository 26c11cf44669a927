//! The Kubernetes bridge: what a kubelet does toward the API server, done
//! by cloud-gw on each edge node's behalf.
//!
//! - [`cache`]: one shared watch each on bound pods, ConfigMaps and
//!   Secrets, indexed per node (a node gets its pods and what they use).
//! - [`nodes`]: the Node object (created at join, adopted if it exists),
//!   its status from the edge's report, the Lease while the link is up.
//! - [`secret`]: cloud-gw's CA and tokens in a Secret, created once.
//! - [`admission`]: the webhook that keeps edge pods from being evicted;
//!   [`autonomy`]: the same for pods once they are bound to an edge node.
//! - [`report`]: pod status through the status subresource, Events, and
//!   deletion completed once the edge has stopped the pod.
//! - [`devices`]: Devices bound to edge nodes and their DeviceModels down,
//!   device status up.
//! - [`pod_tokens`]: service account tokens for the pods of the nodes
//!   served here, through the TokenRequest API, refreshed as a kubelet does.
//! - [`services`]: which Services, EndpointSlices and site Nodes each edge
//!   node gets (Services and DNS at the edge).
//!
//! Nothing here is kept per node beyond the caches every replica rebuilds
//! from the API server: any replica can serve any node.

pub mod admission;
pub mod autonomy;
pub mod cache;
pub mod devices;
pub mod nodes;
pub mod pod_tokens;
pub mod report;
pub mod secret;
pub mod services;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use outrigger_proto::message::Row;

use crate::source::{NodeObjects, Notifier, Source};
use cache::{Cache, Key, Kind};

/// The watches a node's objects come from; a node is served only once
/// each has listed.
const READY_WATCHES: u8 = 8;

/// Concurrent writes to the API server (a kubelet has QPS limits for the
/// same reason: one cloud-gw speaks for thousands of nodes).
const API_WRITES: usize = 32;

#[derive(Clone)]
pub struct BridgeConfig {
    /// Taint edge nodes `node-role.kubernetes.io/edge:NoSchedule`, so only
    /// pods that tolerate it land there.
    pub edge_taint: bool,
    /// How often a connected node's Lease is renewed (a kubelet: 10 s).
    pub lease_period: Duration,
    /// Node status is written on change and at least this often.
    pub status_period: Duration,
    /// A pod's service account token is requested again once it is this
    /// old, if 80% of its life has not come first (a kubelet: 24 h).
    pub token_max_age: Duration,
    /// cloud-gw's own namespace: where it probes the cluster's default
    /// tolerations with a dry-run pod.
    pub namespace: String,
    /// The cluster's DNS domain and DNS Service, as edge nodes are told.
    pub cluster_dns: services::ClusterDns,
    /// The kubelet ports of the nodes whose links this replica holds, put
    /// into their status (addresses, `daemonEndpoints.kubeletEndpoint.Port`).
    /// None: no endpoint (kubectl logs, exec and top cannot reach edge
    /// nodes).
    pub kubelet: Option<std::sync::Arc<crate::kubelet::ports::Ports>>,
}

impl Default for BridgeConfig {
    fn default() -> Self {
        BridgeConfig {
            edge_taint: false,
            lease_period: Duration::from_secs(10),
            status_period: Duration::from_secs(60),
            token_max_age: Duration::from_secs(24 * 3600),
            namespace: "default".into(),
            cluster_dns: Default::default(),
            kubelet: None,
        }
    }
}

pub(crate) struct Inner {
    pub client: Client,
    pub cfg: BridgeConfig,
    pub cache: Mutex<Cache>,
    pub notify: Notifier,
    /// Pods being removed for good right now (uids).
    pub finalizing: Mutex<HashSet<String>>,
    /// The last node report per connected node, rewritten every
    /// `status_period` with a fresh heartbeat.
    pub reports: Mutex<BTreeMap<String, outrigger_proto::report::NodeReport>>,
    /// Writes to the API server at once, across all nodes: each needs a
    /// connection (HTTP/1.1), so this also bounds the client's pool.
    pub api_slots: tokio::sync::Semaphore,
    /// What changed per node between looks (reconnects without a query).
    pub journals: crate::source::Journals,
    /// Nodes labelled as edge nodes (the webhook's question).
    pub edge_nodes: Mutex<HashSet<String>>,
    /// Watches that have listed everything once: pods, ConfigMaps, Secrets,
    /// Devices, DeviceModels, edge Nodes, Services, EndpointSlices
    /// ([`READY_WATCHES`]).
    ready: tokio::sync::watch::Sender<u8>,
    /// Service account tokens: nodes served here, what changed, what is
    /// due when.
    pub(crate) tokens: Mutex<pod_tokens::State>,
    /// Pods or served nodes changed: the token loop looks again.
    pub token_wake: tokio::sync::Notify,
    /// The cluster's default not-ready/unreachable tolerations, as last
    /// probed (the webhook replaces exactly these).
    pub toleration_defaults: Mutex<admission::Defaults>,
    /// Namespaces labelled `outrigger.io/autonomy=disabled`.
    pub opted_out: Mutex<HashSet<String>>,
    /// Pods whose tolerations are being patched now (uids).
    pub patching: Mutex<HashSet<String>>,
}

/// What the webhook and the bound-pod check decide with.
pub(crate) fn admission_context(inner: &Inner) -> admission::Context {
    admission::Context {
        edge_nodes: lock(&inner.edge_nodes).clone(),
        defaults: *lock(&inner.toleration_defaults),
        opted_out_namespaces: lock(&inner.opted_out).clone(),
    }
}

/// Objects from the API server, status into it.
pub struct KubeSource {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn key_of(m: &kube::api::ObjectMeta) -> Key {
    (
        m.namespace.clone().unwrap_or_else(|| "default".into()),
        m.name.clone().unwrap_or_default(),
    )
}

impl KubeSource {
    /// Start the three watches. Serve nodes only after [`KubeSource::ready`]:
    /// a node served from half a cache would be told to delete pods.
    pub fn start(client: Client, cfg: BridgeConfig) -> KubeSource {
        let mut cache = Cache::default();
        cache.services.dns = cfg.cluster_dns.clone();
        let inner = Arc::new(Inner {
            client: client.clone(),
            cfg,
            cache: Mutex::new(cache),
            notify: Notifier::default(),
            finalizing: Mutex::new(HashSet::new()),
            reports: Mutex::new(BTreeMap::new()),
            edge_nodes: Mutex::new(HashSet::new()),
            journals: Default::default(),
            api_slots: tokio::sync::Semaphore::new(API_WRITES),
            ready: tokio::sync::watch::channel(0).0,
            tokens: Default::default(),
            token_wake: tokio::sync::Notify::new(),
            toleration_defaults: Default::default(),
            opted_out: Default::default(),
            patching: Default::default(),
        });
        tokio::spawn(pod_tokens::run(inner.clone()));
        tokio::spawn(probe_defaults(inner.clone()));
        tokio::spawn(autonomy::sweep(inner.clone()));
        tokio::spawn(devices::run(inner.clone()));
        let namespaces = watcher(
            Api::<Namespace>::all(client.clone()),
            watcher::Config::default().labels(&format!("{}=disabled", admission::AUTONOMY)),
        );
        tokio::spawn(follow_names(inner.clone(), "namespaces", namespaces, |i| {
            &i.opted_out
        }));
        // Pods bound to any node: one watch for all edge nodes.
        let pods = watcher(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default().fields("spec.nodeName!="),
        );
        let bridge = inner.clone();
        tokio::spawn(follow(
            inner.clone(),
            "pods",
            pods,
            Cache::pod_keys,
            move |c, e| match e {
                Change::Put(p) => {
                    autonomy::check(&bridge, &p);
                    c.put_pod(&p)
                }
                Change::Gone(k) => c.remove_pod(&k),
            },
            false,
        ));
        let cms = watcher(Api::<ConfigMap>::all(client.clone()), Default::default());
        tokio::spawn(follow(
            inner.clone(),
            "configmaps",
            cms,
            |c| c.config_keys(Kind::ConfigMap),
            |c, e| config_change(c, Kind::ConfigMap, e),
            false,
        ));
        let nodes = watcher(
            Api::<Node>::all(client.clone()),
            watcher::Config::default().labels(nodes::EDGE_ROLE),
        );
        let bridge = inner.clone();
        tokio::spawn(follow(
            inner.clone(),
            "nodes",
            nodes,
            |c| c.services.node_names(),
            move |c, e| match e {
                Change::Put(n) => {
                    let name = n.metadata.name.clone().unwrap_or_default();
                    lock(&bridge.edge_nodes).insert(name);
                    serde_json::to_value(&n)
                        .map(|v| c.put_node(v))
                        .unwrap_or_default()
                }
                Change::Gone((_, name)) => {
                    lock(&bridge.edge_nodes).remove(&name);
                    c.services.remove_node(&name)
                }
            },
            false,
        ));
        let services = watcher(Api::<Service>::all(client.clone()), Default::default());
        tokio::spawn(follow(
            inner.clone(),
            "services",
            services,
            |c| c.services.service_keys(),
            |c, e| service_change(c, Kind::Service, e),
            false,
        ));
        let slices = watcher(
            Api::<EndpointSlice>::all(client.clone()),
            Default::default(),
        );
        tokio::spawn(follow(
            inner.clone(),
            "endpointslices",
            slices,
            |c| c.services.slice_keys(),
            |c, e| service_change(c, Kind::EndpointSlice, e),
            false,
        ));
        let secrets = watcher(Api::<Secret>::all(client), Default::default());
        tokio::spawn(follow(
            inner.clone(),
            "secrets",
            secrets,
            |c| c.config_keys(Kind::Secret),
            |c, e| config_change(c, Kind::Secret, e),
            false,
        ));
        KubeSource { inner }
    }

    /// Resolves once every watch has listed its objects.
    pub async fn ready(&self) {
        let mut rx = self.inner.ready.subscribe();
        let _ = rx.wait_for(|n| *n >= READY_WATCHES).await;
    }

    pub fn is_ready(&self) -> bool {
        *self.inner.ready.borrow() >= READY_WATCHES
    }
}

fn watcher<K>(
    api: Api<K>,
    cfg: watcher::Config,
) -> impl futures_util::Stream<Item = Result<Event<K>, watcher::Error>> + Send
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    watcher::watcher(api, cfg).default_backoff()
}

/// What a watch event means for the cache.
enum Change<K> {
    Put(K),
    Gone(Key),
}

fn service_change<K: serde::Serialize>(c: &mut Cache, kind: Kind, e: Change<K>) -> Vec<String> {
    match e {
        Change::Put(o) => match serde_json::to_value(&o) {
            Ok(v) => c.put_service(kind, v),
            Err(_) => Vec::new(),
        },
        Change::Gone(k) => c.remove_service(kind, &k),
    }
}

fn config_change<K: serde::Serialize>(c: &mut Cache, kind: Kind, e: Change<K>) -> Vec<String> {
    match e {
        Change::Put(o) => match serde_json::to_value(&o) {
            Ok(v) => c.put_config(kind, v),
            Err(_) => Vec::new(),
        },
        Change::Gone(k) => c.remove_config(kind, &k),
    }
}

/// Feed one watch into the cache. A re-list (after a watch error or a 410)
/// replaces what it covers: objects not listed again are removed.
/// `keys` lists what the cache holds of this kind (a re-list removes the
/// ones it does not list again). `counted`: its readiness was counted
/// already (the first list must not count again).
async fn follow<K, S, F>(
    inner: Arc<Inner>,
    what: &'static str,
    stream: S,
    keys: fn(&Cache) -> Vec<Key>,
    apply: F,
    counted: bool,
) where
    K: kube::Resource + Clone + Send + 'static,
    S: futures_util::Stream<Item = Result<Event<K>, watcher::Error>> + Send,
    F: Fn(&mut Cache, Change<K>) -> Vec<String> + Send,
{
    let mut stream = std::pin::pin!(stream);
    let mut listed: Option<HashSet<Key>> = None;
    let mut first = !counted;
    while let Some(ev) = stream.next().await {
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                tracing::warn!(what, error = %e, "watch failed; retrying with back-off");
                continue;
            }
        };
        let touched = {
            let mut c = lock(&inner.cache);
            match ev {
                Event::Init => {
                    listed = Some(HashSet::new());
                    Vec::new()
                }
                Event::InitApply(o) => {
                    if let Some(l) = listed.as_mut() {
                        l.insert(key_of(o.meta()));
                    }
                    apply(&mut c, Change::Put(o))
                }
                Event::InitDone => {
                    let seen = listed.take().unwrap_or_default();
                    let stale = keys(&c);
                    let mut touched = Vec::new();
                    for k in stale.into_iter().filter(|k| !seen.contains(k)) {
                        touched.extend(apply(&mut c, Change::Gone(k)));
                    }
                    if first {
                        first = false;
                        inner.ready.send_modify(|n| *n += 1);
                        tracing::info!(what, objects = seen.len(), "watch listed");
                    }
                    touched
                }
                Event::Apply(o) => apply(&mut c, Change::Put(o)),
                Event::Delete(o) => apply(&mut c, Change::Gone(key_of(o.meta()))),
            }
        };
        if what == "pods" {
            pod_tokens::changed(&inner, &touched);
        }
        for n in touched {
            inner.notify.changed(&n);
        }
    }
}

/// The cluster's default tolerations, learned at start and every five
/// minutes (an API server restarted with other flags changes them).
async fn probe_defaults(inner: Arc<Inner>) {
    let mut known: Option<admission::Defaults> = None;
    loop {
        match admission::probe_defaults(inner.client.clone(), &inner.cfg.namespace).await {
            Ok(d) => {
                if known != Some(d) {
                    tracing::info!(namespace = inner.cfg.namespace, unreachable = ?d.unreachable, not_ready = ?d.not_ready, "the cluster's default tolerations (seconds)");
                }
                known = Some(d);
                *lock(&inner.toleration_defaults) = d;
            }
            Err(e) => {
                tracing::warn!(namespace = inner.cfg.namespace, error = %e, "cannot learn the cluster's default tolerations (a dry-run pod); assuming the API server's 300 s")
            }
        }
        let wait = if known.is_some() { 300 } else { 10 };
        tokio::time::sleep(Duration::from_secs(wait)).await;
    }
}

/// Keep a set of names of what a watch selects (edge Nodes, opted-out
/// namespaces: for the webhook and the autonomy check; not needed to serve).
async fn follow_names<K, S>(
    inner: Arc<Inner>,
    what: &'static str,
    stream: S,
    set: fn(&Inner) -> &Mutex<HashSet<String>>,
) where
    K: kube::Resource,
    S: futures_util::Stream<Item = Result<Event<K>, watcher::Error>> + Send,
{
    let mut stream = std::pin::pin!(stream);
    let mut listed = HashSet::new();
    while let Some(ev) = stream.next().await {
        let name = |o: &K| o.meta().name.clone().unwrap_or_default();
        match ev {
            Ok(Event::Init) => listed.clear(),
            Ok(Event::InitApply(o)) => {
                listed.insert(name(&o));
            }
            Ok(Event::InitDone) => *lock(set(&inner)) = std::mem::take(&mut listed),
            Ok(Event::Apply(o)) => {
                lock(set(&inner)).insert(name(&o));
            }
            Ok(Event::Delete(o)) => {
                lock(set(&inner)).remove(&name(&o));
            }
            Err(e) => tracing::warn!(what, error = %e, "watch failed; retrying with back-off"),
        }
    }
}

impl crate::http::State for KubeSource {
    fn ready(&self) -> bool {
        self.is_ready()
    }

    fn admission(&self) -> admission::Context {
        admission_context(&self.inner)
    }

    fn device_model(
        &self,
        namespace: &str,
        name: &str,
    ) -> Option<outrigger_proto::device::DeviceModelSpec> {
        lock(&self.inner.cache).device_model(namespace, name)
    }
}

impl crate::kubelet::Pods for KubeSource {
    fn locate(&self, namespace: &str, name: &str) -> Option<(String, String)> {
        let c = lock(&self.inner.cache);
        c.pod(namespace, name)
            .map(|p| (p.node.clone(), p.obj.uid.clone()))
    }
}

impl KubeSource {
    /// The client the bridge speaks to the API server with.
    pub fn client(&self) -> Client {
        self.inner.client.clone()
    }
}

impl Source for KubeSource {
    fn objects(&self, node: &str) -> NodeObjects {
        let out = lock(&self.inner.cache).objects(node);
        self.inner.journals.look(node, &out);
        out
    }

    fn cursor(&self, node: &str) -> Option<String> {
        Some(self.inner.journals.cursor(node))
    }

    fn since(&self, node: &str, cursor: &str) -> Option<Vec<(Kind, String, Option<String>)>> {
        self.inner.journals.since(node, cursor)
    }

    fn subscribe(&self, node: &str) -> tokio::sync::watch::Receiver<u64> {
        self.inner.notify.subscribe(node)
    }

    fn held_back(&self, node: &str) -> HashSet<String> {
        pod_tokens::held_back(&self.inner, node)
    }

    fn terminating(&self, node: &str) -> Vec<String> {
        lock(&self.inner.cache).terminating(node)
    }

    fn body_at(&self, version: &str) -> Option<Arc<[u8]>> {
        lock(&self.inner.cache).versions.get(version)
    }

    fn finalize(&self, node: &str, uid: &str) {
        report::finalize(&self.inner, node, uid);
    }

    fn record<'a>(&'a self, node: &'a str, rows: Vec<Row>) -> BoxFuture<'a, Vec<i64>> {
        Box::pin(report::record(&self.inner, node, rows))
    }

    fn joined<'a>(
        &'a self,
        node: &'a str,
        labels: &'a BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            nodes::ensure(&self.inner, node, labels)
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn prepare<'a>(&'a self, node: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(pod_tokens::prepare(self.inner.clone(), node))
    }

    fn connected(&self, node: &str) -> Option<tokio::task::JoinHandle<()>> {
        Some(tokio::spawn(nodes::keep_alive(
            self.inner.clone(),
            node.to_string(),
        )))
    }
}
