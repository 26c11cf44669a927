//! `edge-rt run`: the node agent's main loop.
//!
//! Order at start: PID 1 duties (if we are init), subreaper, signals, image
//! store and preloaded images, the node store, runtime (re-adopting what a
//! previous edge-rt left running), then every pod the node should run: those
//! of the manifest directory and those in the store, with no connection to
//! anything. Then it waits on signals, applies manifest and store changes as
//! they happen, reports status to the outbox and keeps the image store under
//! its budget.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};

use crate::config::Config;
use crate::image::registry::Puller;
use crate::image::{archive, ImageStore};
use crate::pods::events::EventRing;
use crate::pods::{self, PodManager};
use crate::runtime::Runtime;
use crate::static_pods;
use crate::store::{self, Kind, Store};
use crate::supervisor::{self, Event};

/// Import every archive or layout in `dir` not imported before (by name,
/// size and modification time), so a gateway image's base images are there
/// with no registry.
pub fn preload(store: &ImageStore, dir: &Path, state: &Path) -> Result<usize> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Ok(0);
    };
    let mut seen: BTreeMap<String, String> = std::fs::read(state)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let mut n = 0;
    let mut entries: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        let Ok(m) = std::fs::metadata(&p) else {
            continue;
        };
        let stamp = format!("{}:{:?}", m.len(), m.modified().ok());
        let key = p.display().to_string();
        if seen.get(&key) == Some(&stamp) {
            continue;
        }
        match archive::import(store, &p, None) {
            Ok(images) => {
                for i in images {
                    tracing::info!(image = ?i.names, digest = %i.digest, from = %p.display(), "preloaded");
                }
                seen.insert(key, stamp);
                n += 1;
            }
            Err(e) => tracing::error!(path = %p.display(), error = %e, "preload failed"),
        }
    }
    std::fs::write(state, serde_json::to_vec_pretty(&seen)?)
        .with_context(|| format!("writing {}", state.display()))?;
    Ok(n)
}

/// The least time between two reporter flushes driven by status changes.
const REPORT_GAP: Duration = Duration::from_millis(100);

pub async fn run(config_path: PathBuf) -> Result<()> {
    // A daemon works from "/": its start directory may vanish or be mounted
    // over (as PID 1 we mount /tmp and /run), and libcontainer changes to
    // and back from the working directory while creating a container.
    let config_path = std::path::absolute(&config_path).unwrap_or(config_path);
    std::env::set_current_dir("/").context("chdir /")?;
    let pid1 = supervisor::is_pid1();
    if pid1 {
        supervisor::pid1_mounts();
    }
    let mut cfg = Config::load(&config_path)?;
    if let Err(e) = supervisor::become_subreaper() {
        tracing::warn!(error = %e, "cannot become a child subreaper");
    }
    let mut signals = supervisor::install_signals().context("installing signal handlers")?;

    std::fs::create_dir_all(&cfg.node.data_dir)
        .with_context(|| format!("creating {}", cfg.node.data_dir.display()))?;
    let store = Arc::new(ImageStore::open(cfg.image_dir())?);
    let n = preload(
        &store,
        &cfg.node.preload_dir,
        &cfg.node.data_dir.join("preloaded.json"),
    )?;
    if n > 0 {
        tracing::info!(count = n, "imported preloaded images");
    }
    let node_store = open_store(&cfg);
    let rt = Runtime::open(cfg.runtime.clone(), store.clone())?;
    // A joined node is the Node it joined as (not its hostname): pods'
    // spec.nodeName, the downward API and its reports say so.
    let link = crate::link::LinkConfig::load(&cfg.node.data_dir);
    let mut placement = crate::pods::env::Placement::of_this_node();
    if let Ok(Some(l)) = &link {
        placement.node_name = l.node.clone();
    }
    let ctx = Arc::new(pods::Context {
        rt: rt.clone(),
        images: store.clone(),
        puller: std::sync::Mutex::new(Arc::new(Puller::new(&cfg.registry)?)),
        events: Arc::new(EventRing::default()),
        objects: Arc::new(crate::pods::source::Objects::default()),
        volumes_root: cfg.node.data_dir.join("pods"),
        node: placement,
        status_generation: Default::default(),
        status_changed: Default::default(),
        deletion_grace: Default::default(),
        network: if cfg.network.enabled {
            Some(Arc::new(crate::network::Network::new(
                cfg.network.clone(),
                &cfg.runtime.state_dir,
            )?))
        } else {
            None
        },
    });
    let pods = Arc::new(PodManager::new(ctx.clone()));
    tracing::info!(containers = rt.list().len(), pid1, "edge-rt running");

    // Everything the node should run, from what it has: no connection.
    let mut manifests = ManifestWatch::new(&cfg.node.manifests_dir);
    let mut from_files = manifests.read();
    reconcile(&pods, &from_files, node_store.as_deref());

    let socket = crate::api::socket_path(&cfg);
    let listener = crate::api::bind(&socket, cfg.api.group.as_deref())?;
    let server = Arc::new(crate::api::Server {
        pods: pods.clone(),
        started: std::time::Instant::now(),
        pid1,
        image_budget: cfg.images.budget_bytes,
        store: node_store.clone(),
    });
    tokio::spawn(server.serve(listener));
    tracing::info!(socket = %socket.display(), "local API listening");

    // The cloud link, if this node joined one.
    match link {
        Ok(Some(link)) => {
            tokio::spawn(crate::link::client::run(
                cfg.node.data_dir.clone(),
                link,
                node_store.clone(),
            ));
        }
        Ok(None) => tracing::info!("not joined to a cloud: standalone"),
        Err(e) => {
            tracing::error!(error = %e, "the link settings cannot be read; running standalone")
        }
    }
    let mut store_changed = match &node_store {
        Some(s) => s.subscribe(),
        None => tokio::sync::watch::channel(0).1,
    };
    let mut reporter = node_store.clone().map(|s| {
        let facts = crate::reporter::node_facts(&pods.context().node, &cfg.node);
        crate::reporter::Reporter::new(s, pods.clone(), facts)
    });
    let mut report_tick = tokio::time::interval(Duration::from_secs(1));
    report_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut gc = tokio::time::interval(Duration::from_secs(cfg.images.gc_interval_secs.max(10)));
    let mut last_flush = tokio::time::Instant::now();
    let mut flush_at: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = manifests.changed() => {
                from_files = manifests.read();
                reconcile(&pods, &from_files, node_store.as_deref());
            }
            Ok(()) = store_changed.changed() => reconcile(&pods, &from_files, node_store.as_deref()),
            // A status change goes out at once (then at most every
            // REPORT_GAP, however busy the pods); the tick catches the rest.
            _ = ctx.status_changed.notified(), if reporter.is_some() && flush_at.is_none() => {
                flush_at = Some(last_flush + REPORT_GAP);
            }
            _ = tokio::time::sleep_until(flush_at.unwrap_or_else(tokio::time::Instant::now)), if flush_at.is_some() => {
                flush_at = None;
                last_flush = tokio::time::Instant::now();
                if let Some(r) = reporter.as_mut() {
                    let _ = r.flush(store::now_ms());
                }
            }
            _ = report_tick.tick(), if reporter.is_some() => {
                last_flush = tokio::time::Instant::now();
                if let Some(r) = reporter.as_mut() {
                    let _ = r.flush(store::now_ms());
                }
            }
            _ = gc.tick() => {
                match store.gc(cfg.images.budget_bytes, &rt.in_use()) {
                    Ok(r) if !r.images_removed.is_empty() => tracing::info!(removed = ?r.images_removed, bytes = r.bytes_after, "image gc"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "image gc failed"),
                }
            }
            ev = signals.recv() => match ev {
                Some(Event::Reload) => match Config::load(&config_path) {
                    Ok(new) => {
                        match Puller::new(&new.registry) {
                            Ok(p) => ctx.set_puller(p),
                            Err(e) => tracing::error!(error = %e, "registry settings not applied"),
                        }
                        if new.node.manifests_dir != cfg.node.manifests_dir {
                            manifests = ManifestWatch::new(&new.node.manifests_dir);
                            from_files = manifests.read();
                            reconcile(&pods, &from_files, node_store.as_deref());
                        }
                        cfg.images = new.images;
                        cfg.node.manifests_dir = new.node.manifests_dir;
                        cfg.registry = new.registry;
                        tracing::info!("configuration reloaded (runtime and data paths apply at the next start)");
                    }
                    Err(e) => tracing::error!(error = %e, "reload failed; keeping the running configuration"),
                },
                Some(e @ (Event::Terminate | Event::Interrupt)) => {
                    if pid1 {
                        tracing::info!("shutting down: stopping containers");
                        for c in rt.list().into_iter().filter(|c| c.exit.is_none()) {
                            let _ = rt.stop(&c.id, Duration::from_secs(10)).await;
                        }
                        supervisor::pid1_halt(e == Event::Interrupt);
                    }
                    // As a service, containers keep running: the next edge-rt
                    // re-adopts them (restarts and upgrades do not kill pods).
                    if let Some(r) = reporter.as_mut() {
                        let _ = r.flush(store::now_ms());
                    }
                    tracing::info!("exiting; containers keep running");
                    return Ok(());
                }
                None => return Ok(()),
            }
        }
    }
}

/// The static pod directory, watched with inotify (a manifest change is
/// applied within milliseconds), with a slow full rescan behind it for what
/// inotify cannot see (a directory created later, a network filesystem).
struct ManifestWatch {
    dir: PathBuf,
    events: Option<inotify::EventStream<Vec<u8>>>,
    rescan: tokio::time::Interval,
    /// Errors already reported, so each is logged once.
    reported: BTreeMap<String, String>,
}

impl ManifestWatch {
    fn new(dir: &Path) -> ManifestWatch {
        let mut rescan = tokio::time::interval(Duration::from_secs(30));
        rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut w = ManifestWatch {
            dir: dir.to_path_buf(),
            events: None,
            rescan,
            reported: BTreeMap::new(),
        };
        w.watch();
        w
    }

    fn watch(&mut self) {
        use inotify::{Inotify, WatchMask};
        let r = Inotify::init().and_then(|i| {
            i.watches().add(
                &self.dir,
                WatchMask::CLOSE_WRITE
                    | WatchMask::MOVED_TO
                    | WatchMask::MOVED_FROM
                    | WatchMask::DELETE
                    | WatchMask::CREATE
                    | WatchMask::DELETE_SELF
                    | WatchMask::MOVE_SELF,
            )?;
            i.into_event_stream(vec![0u8; 4096])
        });
        match r {
            Ok(s) => self.events = Some(s),
            Err(e) => {
                if self.dir.exists() {
                    tracing::warn!(dir = %self.dir.display(), error = %e, "cannot watch the manifest directory; rescanning every 30 s");
                }
                self.events = None;
            }
        }
    }

    /// Resolves when the directory may have changed.
    async fn changed(&mut self) {
        use futures_util::StreamExt;
        match self.events.as_mut() {
            Some(ev) => tokio::select! {
                e = ev.next() => match e {
                    Some(Ok(e)) if e.mask.intersects(inotify::EventMask::DELETE_SELF | inotify::EventMask::MOVE_SELF | inotify::EventMask::IGNORED) => self.events = None,
                    Some(Ok(_)) => {}
                    _ => self.events = None,
                },
                _ = self.rescan.tick() => {}
            },
            None => {
                self.rescan.tick().await;
                self.watch();
            }
        }
    }

    /// Read the directory's pods, ConfigMaps and Secrets.
    fn read(&mut self) -> Objects {
        let (mut desired, mut config_maps, mut secrets) = (Vec::new(), Vec::new(), Vec::new());
        let mut errors = BTreeMap::new();
        for m in static_pods::load_dir(&self.dir) {
            match m.object {
                Ok(static_pods::Object::Pod(p)) => desired.push(*p),
                Ok(static_pods::Object::ConfigMap(c)) => config_maps.push(c),
                Ok(static_pods::Object::Secret(s)) => secrets.push(s),
                Err(ref e) => {
                    let place = m.place();
                    if self.reported.get(&place) != Some(e) {
                        tracing::error!(file = %place, error = %e, "invalid pod manifest; other pods are not affected");
                    }
                    errors.insert(place, e.clone());
                }
            }
        }
        self.reported = errors;
        Objects {
            pods: desired,
            config_maps,
            secrets,
            tokens: Vec::new(),
        }
    }
}

/// Pods and the objects they use, from one source.
#[derive(Default, Clone)]
struct Objects {
    pods: Vec<Pod>,
    config_maps: Vec<ConfigMap>,
    secrets: Vec<Secret>,
    /// Service account tokens (from the cloud only; manifests have none).
    tokens: Vec<outrigger_proto::kinds::ServiceAccountToken>,
}

/// Open the node store. A store that cannot be opened (its key unreadable,
/// a schema from a newer edge-rt) leaves the node running its static pods,
/// with the reason logged and shown by `edge-rt status`; a corrupt one is
/// moved aside inside `Store::open`.
fn open_store(cfg: &Config) -> Option<Arc<Store>> {
    match Store::open(&cfg.store, &cfg.node.data_dir) {
        Ok(s) => {
            if let Err(e) = s.set_link(false, store::now_ms()) {
                tracing::warn!(error = %e, "recording the link state");
            }
            Some(Arc::new(s))
        }
        Err(e) => {
            tracing::error!(error = %e, "THE NODE STORE CANNOT BE OPENED: running static pods only");
            None
        }
    }
}

/// The store's pods, ConfigMaps, Secrets and tokens, typed. An object that does not
/// parse is logged and skipped; the rest run.
fn from_store(s: &Store) -> Objects {
    fn load<T: serde::de::DeserializeOwned>(s: &Store, kind: Kind) -> Vec<T> {
        let objects = match s.objects(kind) {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(kind = kind.as_str(), error = %e, "reading the store");
                return vec![];
            }
        };
        objects
            .into_iter()
            .filter_map(|o| {
                let mut body = o.body;
                // The row's identity is the truth (a body may lack it).
                body["metadata"]["uid"] = o.uid.clone().into();
                body["metadata"]["namespace"] = o.namespace.clone().into();
                match serde_json::from_value::<T>(body) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        tracing::error!(kind = kind.as_str(), namespace = %o.namespace, name = %o.name, error = %e, "stored object does not parse; skipped");
                        None
                    }
                }
            })
            .collect()
    }
    Objects {
        pods: load(s, Kind::Pod),
        config_maps: load(s, Kind::ConfigMap),
        secrets: load(s, Kind::Secret),
        tokens: load(s, Kind::ServiceAccountToken),
    }
}

type ObjectMeta = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// The stored objects whose namespace and name no manifest uses (the file
/// on the node wins; the other is logged and left out).
fn not_in_files<T: k8s_openapi::Metadata<Ty = ObjectMeta>>(files: &[T], stored: Vec<T>) -> Vec<T> {
    fn key(m: &ObjectMeta) -> (String, String) {
        (
            m.namespace.clone().unwrap_or_else(|| "default".into()),
            m.name.clone().unwrap_or_default(),
        )
    }
    let taken: std::collections::BTreeSet<_> = files.iter().map(|o| key(o.metadata())).collect();
    stored
        .into_iter()
        .filter(|o| {
            let k = key(o.metadata());
            let free = !taken.contains(&k);
            if !free {
                tracing::warn!(kind = T::KIND, object = ?k, "a manifest defines this name too; the stored one is left out");
            }
            free
        })
        .collect()
}

/// Hand the union of the manifest directory and the store to the pod
/// manager.
fn reconcile(pods: &PodManager, files: &Objects, store: Option<&Store>) {
    let mut all = files.clone();
    if let Some(s) = store {
        let mut stored = from_store(s);
        // A pod the cluster is deleting stops here (with the deletion's
        // grace period); the cloud removes it once the node reports it gone.
        let mut grace = HashMap::new();
        stored.pods.retain(|p| {
            if p.metadata.deletion_timestamp.is_none() {
                return true;
            }
            if let (Some(uid), Some(g)) =
                (&p.metadata.uid, p.metadata.deletion_grace_period_seconds)
            {
                grace.insert(uid.clone(), g);
            }
            false
        });
        *pods
            .context()
            .deletion_grace
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = grace;
        all.pods.extend(not_in_files(&files.pods, stored.pods));
        all.config_maps
            .extend(not_in_files(&files.config_maps, stored.config_maps));
        all.secrets
            .extend(not_in_files(&files.secrets, stored.secrets));
        all.tokens = stored.tokens;
    }
    // Objects first: a new pod finds what it references.
    pods.context()
        .objects
        .replace(all.config_maps, all.secrets, all.tokens);
    pods.apply(all.pods);
}
