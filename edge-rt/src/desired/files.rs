//! The file source: the static pod directory (pods, and the ConfigMaps and
//! Secrets they use), watched with inotify, a slow rescan behind it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::Objects;
use crate::static_pods;

/// The static pod directory, watched with inotify (a manifest change is
/// applied within milliseconds), with a slow full rescan behind it for what
/// inotify cannot see (a directory created later, a network filesystem).
pub struct ManifestWatch {
    dir: PathBuf,
    events: Option<inotify::EventStream<Vec<u8>>>,
    rescan: tokio::time::Interval,
    /// Errors already reported, so each is logged once.
    reported: BTreeMap<String, String>,
}

impl ManifestWatch {
    pub fn new(dir: &Path) -> ManifestWatch {
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
    pub async fn changed(&mut self) {
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
    pub fn read(&mut self) -> Objects {
        let (mut desired, mut config_maps, mut secrets) = (Vec::new(), Vec::new(), Vec::new());
        let (mut devices, mut device_models) = (Vec::new(), Vec::new());
        let mut errors = BTreeMap::new();
        for m in static_pods::load_dir(&self.dir) {
            match m.object {
                Ok(static_pods::Object::Pod(p)) => desired.push(*p),
                Ok(static_pods::Object::ConfigMap(c)) => config_maps.push(c),
                Ok(static_pods::Object::Secret(s)) => secrets.push(s),
                Ok(static_pods::Object::Device(d)) => devices.push(*d),
                Ok(static_pods::Object::DeviceModel(m)) => device_models.push(m),
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
            devices,
            device_models,
            local_desired: Vec::new(),
        }
    }
}
