//! `edge-rt run`: the node agent's main loop.
//!
//! Order at start: PID 1 duties (if we are init), subreaper, signals, image
//! store and preloaded images, the node store, runtime (re-adopting what a
//! previous edge-rt left running), then every pod the node should run: those
//! of the manifest directory and those in the store, with no connection to
//! anything. Then it waits on signals, applies manifest and store changes as
//! they happen, reports status to the outbox and keeps the image store under
//! its budget.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::config::Config;
use crate::desired::{self, files::ManifestWatch};
use crate::image::registry::Puller;
use crate::image::{archive, ImageStore};
use crate::pods::events::EventRing;
use crate::pods::{self, PodManager};
use crate::runtime::Runtime;
use crate::store::{self, Store};
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
    let accelerators =
        crate::accelerators::Accelerators::new(cfg.accelerators.clone(), node_store.clone());
    let rt = Runtime::open(cfg.runtime.clone(), store.clone())?;
    // A joined node is the Node it joined as (not its hostname): pods'
    // spec.nodeName, the downward API and its reports say so.
    let link = crate::link::LinkConfig::load(&cfg.node.data_dir);
    let mut placement = crate::pods::env::Placement::of_this_node();
    if let Ok(Some(l)) = &link {
        placement.node_name = l.node.clone();
    }
    // The pod CIDR the cluster gave this node (its Node's spec.podCIDR)
    // wins over the configured one, so a site's gateways never overlap.
    let configured_gateway = crate::network::gateway_of(&cfg.network.pod_cidr);
    if let Some(cidr) = node_store
        .as_deref()
        .and_then(|s| crate::services::allocated_pod_cidr(s, &placement.node_name))
    {
        if cidr != cfg.network.pod_cidr {
            tracing::info!(
                configured = cfg.network.pod_cidr,
                allocated = cidr,
                "pod CIDR from the cluster"
            );
            cfg.network.pod_cidr = cidr;
        }
    }
    let network = if cfg.network.enabled {
        Some(Arc::new(crate::network::Network::new(
            cfg.network.clone(),
            &cfg.runtime.state_dir,
        )?))
    } else {
        None
    };
    // The node's DNS server (on the bridge) answers ClusterFirst pods
    // unless the configuration names the cluster's DNS; its sockets are
    // bound first, so pods are never told an address nothing answers on.
    let dns_sockets = match (&node_store, cfg.services.dns) {
        (Some(_), true) => crate::services::bind_dns(&cfg.services, network.as_deref()),
        _ => Vec::new(),
    };
    let serve_dns = !dns_sockets.is_empty();
    if serve_dns && cfg.dns.cluster_dns.is_empty() {
        cfg.dns.cluster_dns = vec![dns_sockets[0].ip().to_string()];
    }
    let ctx = Arc::new(pods::Context {
        rt: rt.clone(),
        images: store.clone(),
        puller: std::sync::Mutex::new(Arc::new(puller_or_default(&cfg.registry)?)),
        events: Arc::new(EventRing::default()),
        objects: Arc::new(crate::pods::source::Objects::default()),
        volumes_root: cfg.node.data_dir.join("pods"),
        node: placement,
        accelerators: accelerators.clone(),
        dns: cfg.dns.clone(),
        status_generation: Default::default(),
        status_changed: Default::default(),
        network: network.clone(),
    });
    let pods = Arc::new(PodManager::new(ctx.clone()));
    // The embedded MQTT broker, before anything connects to it.
    let embedded = if cfg.devices.embedded_broker {
        let bridge = ctx.network.as_ref().map(|n| n.gateway());
        match crate::devices::broker::listen_addrs(&cfg.devices, bridge) {
            Ok(listen) => {
                if let Some(n) = &ctx.network {
                    // A listener on the pod bridge needs the bridge up.
                    if listen
                        .iter()
                        .any(|a| a.ip() == std::net::IpAddr::V4(n.gateway()))
                    {
                        if let Err(e) = n.ensure_bridge() {
                            tracing::warn!(error = %e, "pod bridge not ready for the MQTT broker");
                        }
                    }
                }
                let local = crate::devices::broker::local_address(&listen);
                tokio::spawn(crate::devices::broker::supervise(
                    cfg.devices.clone(),
                    listen,
                ));
                local
            }
            Err(e) => {
                tracing::error!(error = %e, "the embedded MQTT broker is not started");
                None
            }
        }
    } else {
        None
    };
    let devices = crate::devices::DeviceManager::new(
        crate::devices::broker_config(&cfg.devices, &pods.context().node.node_name, embedded),
        cfg.devices.publish_twins,
    );
    tracing::info!(containers = rt.list().len(), pid1, "edge-rt running");

    // Everything the node should run, from what it has: no connection.
    let mut manifests = ManifestWatch::new(&cfg.node.manifests_dir);
    let mut from_files = manifests.read();
    reconcile(&pods, &devices, &from_files, node_store.as_deref());
    // Pods removed while edge-rt was down free their devices.
    accelerators.retain(
        &pods
            .list()
            .iter()
            .map(|p| pods::uid(p).to_string())
            .collect(),
    );
    tokio::spawn(accelerators.clone().watch());

    let socket = crate::api::socket_path(&cfg);
    let listener = crate::api::bind(&socket, cfg.api.group.as_deref())?;
    let server = Arc::new(crate::api::Server {
        pods: pods.clone(),
        started: std::time::Instant::now(),
        pid1,
        image_budget: cfg.images.budget_bytes,
        store: node_store.clone(),
        devices: devices.clone(),
    });
    tokio::spawn(server.serve(listener));
    tracing::info!(socket = %socket.display(), "local API listening");
    if let Some(addr) = &cfg.api.metrics_listen {
        // Metrics are an extra: a port in use is logged, not fatal.
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => {
                tracing::info!(%addr, "Prometheus metrics at /metrics");
                tokio::spawn(crate::api::metrics::serve(l, devices.clone()));
            }
            Err(e) => tracing::error!(%addr, error = %e, "metrics listener not started"),
        }
    }

    // Services and DNS at the edge, from the store.
    if let Some(s) = &node_store {
        let mut services = cfg.services.clone();
        services.dns = serve_dns;
        services.rules &= network.is_some();
        services.routes &= network.is_some();
        crate::services::start(
            crate::services::Setup {
                cfg: services,
                node: pods.context().node.node_name.clone(),
                domain: cfg.dns.cluster_domain.clone(),
                dns_also: configured_gateway
                    .filter(|g| network.as_ref().is_some_and(|n| n.gateway() != *g))
                    .into_iter()
                    .collect(),
                network: network.clone(),
                resolv_conf: cfg.dns.resolv_conf.clone(),
                dns_sockets,
            },
            s.clone(),
            pods.clone(),
        )
        .await;
    }

    // The cloud link, if this node joined one.
    match link {
        Ok(Some(link)) => {
            tokio::spawn(crate::link::client::run(
                cfg.node.data_dir.clone(),
                link,
                node_store.clone(),
                pods.clone(),
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
        crate::reporter::Reporter::new(s, pods.clone(), facts).with_devices(devices.clone())
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
                reconcile(&pods, &devices, &from_files, node_store.as_deref());
            }
            Ok(()) = store_changed.changed() => reconcile(&pods, &devices, &from_files, node_store.as_deref()),
            // A status change goes out at once (then at most every
            // REPORT_GAP, however busy the pods); the tick catches the rest.
            _ = ctx.status_changed.notified(), if reporter.is_some() && flush_at.is_none() => {
                flush_at = Some(last_flush + REPORT_GAP);
            }
            // Accelerators came or went: the Node's capacity changed.
            _ = accelerators.changed.notified(), if reporter.is_some() && flush_at.is_none() => {
                flush_at = Some(last_flush + REPORT_GAP);
            }
            // A twin changed: its report is due within its report cycle.
            _ = devices.changed.notified(), if reporter.is_some() && flush_at.is_none() => {
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
                            reconcile(&pods, &devices, &from_files, node_store.as_deref());
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

/// The registry client. Registry settings that cannot be used (a CA
/// bundle gone) must not keep the node from running what it has: pulls go
/// on without them, and the error is logged.
fn puller_or_default(cfg: &crate::image::registry::RegistryConfig) -> Result<Puller> {
    match Puller::new(cfg) {
        Ok(p) => Ok(p),
        Err(e) => {
            tracing::error!(error = %e, "registry settings not usable; pulling without the CA bundle");
            let mut plain = cfg.clone();
            plain.ca_bundle = None;
            Ok(Puller::new(&plain)?)
        }
    }
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

/// Hand what the node should run (the manifest directory and the store,
/// merged) to the pod manager and the device manager.
fn reconcile(
    pods: &PodManager,
    devices: &Arc<crate::devices::DeviceManager>,
    files: &desired::Objects,
    store: Option<&Store>,
) {
    let d = desired::merge(files, store.map(desired::stored::read));
    // Objects first: a new pod finds what it references.
    pods.context()
        .objects
        .replace(d.config_maps, d.secrets, d.tokens);
    pods.apply(d.pods);
    devices.apply(d.devices);
    if let (Some(s), false) = (store, d.stale_local.is_empty()) {
        // Its change wakes the next reconcile, which finds none left.
        if let Err(e) = s.set_local_desired(&[], &d.stale_local) {
            tracing::warn!(error = %e, "dropping desired values set at the node that no longer hold");
        }
    }
}
