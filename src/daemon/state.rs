//! The serving state: open images (one shared cache each, opened once
//! however many exports ask at the same time), the exports registry, and
//! what runs per image (profile recording and replay, hydration). Exports
//! are added and removed here ([`Daemon::add_export`],
//! [`Daemon::remove_export`]), by the start-up and the control socket alike.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::block::BlockSize;
use crate::cache::{CacheDir, ImageCache};
use crate::error::{Error, ErrorKind, Result};
use crate::export::stack::{self, ExportSpec};
use crate::export::Exports;
use crate::format::Format;
use crate::manifest::{self, ManifestSetting};
use crate::origin::{self, OriginOptions};
use crate::peer::client::{PeerSet, Peered};
use crate::prefetch::{hydrate, profile};
use crate::stats::Stats;

/// One export to serve.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExportConfig {
    pub name: String,
    /// Origin: URL or path.
    pub image: String,
    #[serde(default)]
    pub writable: bool,
    /// Overlay of a writable export; default `CACHE_DIR/overlays/NAME`.
    #[serde(default)]
    pub overlay_dir: Option<PathBuf>,
    #[serde(default)]
    pub description: Option<String>,
    /// Hydrate this export's image in the background (see [`BootOptions`]).
    #[serde(default)]
    pub hydrate: bool,
    /// The image's format (`None`: raw, refusing what looks like qcow2;
    /// see [`crate::format`]).
    #[serde(default)]
    pub format: Option<Format>,
}

/// Boot acceleration and hydration, for every image served.
#[derive(Debug, Clone)]
pub struct BootOptions {
    /// Record a boot profile of each image opened: `Some(Some(d))` for `d`
    /// after its first read, `Some(None)` until `profile stop` or shutdown.
    pub record_profile: Option<Option<Duration>>,
    /// Replay an image's profile (its cache's, or one published beside it
    /// on the origin) when it is opened.
    pub replay_profile: bool,
    /// Hydrate every image (exports can also ask one by one).
    pub hydrate: bool,
    /// Hydration rate limit, bytes per second.
    pub hydrate_rate: Option<u64>,
    /// Sequential readahead per export.
    pub readahead: bool,
}

impl Default for BootOptions {
    fn default() -> Self {
        BootOptions {
            record_profile: None,
            replay_profile: true,
            hydrate: false,
            hydrate_rate: None,
            readahead: true,
        }
    }
}

/// What `export list` shows.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub image: String,
    pub writable: bool,
    pub clients: usize,
    pub overlay_dir: Option<PathBuf>,
    pub overlay_bytes: u64,
}

/// An image in [`Daemon::images`].
enum Slot {
    Open(ImageCache),
    /// One caller is probing the origin and opening the cache; the others
    /// wait for its outcome here. A closed channel without an outcome: the
    /// opener was cancelled, try again.
    Opening(watch::Receiver<Option<Result<ImageCache>>>),
}

/// The opener's claim on an `Opening` slot: dropped before the outcome is
/// sent (the opener's future was cancelled), it clears the slot, and the
/// waiters, seeing the channel close, try again.
struct Claim<'a> {
    images: &'a std::sync::Mutex<HashMap<String, Slot>>,
    image: &'a str,
    tx: Option<watch::Sender<Option<Result<ImageCache>>>>,
}

impl Claim<'_> {
    /// Publish the outcome: the slot becomes `Open` (or goes, on error),
    /// then the waiters get it.
    fn finish(mut self, res: &Result<ImageCache>) {
        {
            let mut images = self.images.lock().unwrap_or_else(|p| p.into_inner());
            match res {
                Ok(c) => images.insert(self.image.to_string(), Slot::Open(c.clone())),
                Err(_) => images.remove(self.image),
            };
        }
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Some(res.clone()));
        }
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if self.tx.is_some() {
            let mut images = self.images.lock().unwrap_or_else(|p| p.into_inner());
            // Only the claim's owner turns an `Opening` slot into anything.
            if matches!(images.get(self.image), Some(Slot::Opening(_))) {
                images.remove(self.image);
            }
        }
    }
}

/// The serving state shared by listeners and the control socket.
pub struct Daemon {
    cache_dir: CacheDir,
    block_size: Option<BlockSize>,
    origin_options: OriginOptions,
    manifest: ManifestSetting,
    /// The peers images are fetched from first, if any.
    peers: Option<Arc<PeerSet>>,
    /// Open images by origin spec: every export of an image shares one cache.
    /// Held only to look up or change a slot, never across `.await`: the
    /// origin probe of one image must not stall adds of others, the
    /// evictor or the periodic sync.
    images: std::sync::Mutex<HashMap<String, Slot>>,
    /// (locator, counters) of open images, readable without awaiting (metrics).
    image_stats: std::sync::RwLock<Vec<(String, Arc<Stats>)>>,
    pub(crate) exports: Arc<Exports>,
    boot: BootOptions,
    cache_size: Option<u64>,
    /// Turns true at shutdown: background work of images stops.
    stop: watch::Receiver<bool>,
    /// Background work of images (replay, hydration, recording timers),
    /// awaited at shutdown.
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
    /// Hydration progress by image locator (metrics).
    hydrations: std::sync::RwLock<Vec<(String, Arc<hydrate::Live>)>>,
}

/// Where images' bytes come from and how they are checked.
pub(super) struct Sources {
    pub(super) origin: OriginOptions,
    pub(super) manifest: ManifestSetting,
    pub(super) peers: Option<Arc<PeerSet>>,
}

impl Daemon {
    /// The state of a server about to start: nothing open yet.
    pub(super) fn new(
        cache_dir: CacheDir,
        block_size: Option<BlockSize>,
        sources: Sources,
        boot: BootOptions,
        cache_size: Option<u64>,
        stop: watch::Receiver<bool>,
    ) -> Daemon {
        Daemon {
            boot,
            cache_size,
            stop,
            tasks: Default::default(),
            hydrations: Default::default(),
            cache_dir,
            block_size,
            origin_options: sources.origin,
            manifest: sources.manifest,
            peers: sources.peers,
            images: Default::default(),
            image_stats: Default::default(),
            exports: Arc::new(Exports::new()),
        }
    }

    /// The shared cache of `image` if it is open (not being opened).
    pub(crate) fn cache_now(&self, image: &str) -> Option<ImageCache> {
        match self
            .images
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(image)
        {
            Some(Slot::Open(c)) => Some(c.clone()),
            _ => None,
        }
    }

    /// The background work of images, for the caller to await (shutdown).
    pub(super) fn take_tasks(&self) -> Vec<JoinHandle<()>> {
        std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The shared cache of `image`, opening origin and cache on first use.
    /// Concurrent first uses share one opening (one probe, one cache).
    pub(crate) async fn image(&self, image: &str) -> Result<ImageCache> {
        enum Next {
            Wait(watch::Receiver<Option<Result<ImageCache>>>),
            Open(watch::Sender<Option<Result<ImageCache>>>),
        }
        loop {
            let next = {
                let mut images = self.images.lock().unwrap_or_else(|p| p.into_inner());
                match images.get(image) {
                    Some(Slot::Open(c)) => return Ok(c.clone()),
                    Some(Slot::Opening(rx)) => Next::Wait(rx.clone()),
                    None => {
                        let (tx, rx) = watch::channel(None);
                        images.insert(image.to_string(), Slot::Opening(rx));
                        Next::Open(tx)
                    }
                }
            };
            let tx = match next {
                Next::Wait(mut rx) => match rx.wait_for(|v| v.is_some()).await {
                    Ok(v) => match &*v {
                        Some(res) => return res.clone(),
                        None => continue,
                    },
                    // The opener was cancelled: take over or join anew.
                    Err(_) => continue,
                },
                Next::Open(tx) => tx,
            };
            let claim = Claim {
                images: &self.images,
                image,
                tx: Some(tx),
            };
            let res = self.open_image(image).await;
            claim.finish(&res);
            if let Ok(cache) = &res {
                self.start_image_work(cache);
            }
            return res;
        }
    }

    /// The open image whose peer key is `key` (`peer::image_key`).
    pub(crate) fn cache_by_peer_key(&self, key: &str) -> Option<ImageCache> {
        self.open_caches()
            .into_iter()
            .find(|c| crate::peer::image_key(c.origin().identity()) == key)
    }

    /// Every open image's cache (not those being opened).
    pub(super) fn open_caches(&self) -> Vec<ImageCache> {
        self.images
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter_map(|s| match s {
                Slot::Open(c) => Some(c.clone()),
                Slot::Opening(_) => None,
            })
            .collect()
    }

    /// Open an image's origin and cache (the caller holds its `Opening`
    /// slot, not the `images` lock).
    async fn open_image(&self, image: &str) -> Result<ImageCache> {
        let stats = Arc::new(Stats::default());
        let origin = origin::open(image, &self.origin_options, stats.clone()).await?;
        // Under the cache: nothing unchecked is stored or served, whether
        // it came from a peer or from the origin.
        let found = manifest::find(&*origin, &self.manifest)
            .await?
            .map(|(m, _)| m);
        let origin = match &found {
            Some(m) => manifest::verified(origin, m.clone(), stats.clone()),
            None => origin,
        };
        let origin = match &self.peers {
            Some(p) => Peered::wrap(origin, found, p.clone(), stats.clone()),
            None => origin,
        };
        tracing::info!(origin = %origin.identity(), "origin opened");
        let (cache_dir, bs) = (self.cache_dir.clone(), self.block_size);
        // Opening the cache reads and maybe truncates files: blocking work.
        let cache = tokio::task::spawn_blocking(move || cache_dir.open_image(origin, bs, stats))
            .await
            .map_err(|e| Error::with_source(ErrorKind::Io, "cache open task", e))??;
        self.image_stats
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push((
                cache.origin().identity().locator.clone(),
                cache.stats().clone(),
            ));
        Ok(cache)
    }

    fn spawn(&self, f: impl std::future::Future<Output = ()> + Send + 'static) {
        let h = tokio::spawn(f);
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        tasks.retain(|t| !t.is_finished());
        tasks.push(h);
    }

    /// Background work of a freshly opened image: profile recording and
    /// replay, hydration when asked for every image.
    fn start_image_work(&self, cache: &ImageCache) {
        let locator = cache.origin().identity().locator.clone();
        if let Some(limit) = self.boot.record_profile {
            profile::start_recording(cache, limit);
            tracing::info!(image = %locator, seconds = limit.map(|d| d.as_secs()),
                "recording a boot profile from the first read");
            if limit.is_some() {
                let (c, mut stop) = (cache.clone(), self.stop.clone());
                self.spawn(async move {
                    loop {
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                            // Shutdown saves what was recorded.
                            _ = stop.wait_for(|s| *s) => return,
                        }
                        if profile::recording_over(&c) {
                            if let Err(e) = profile::finish_recording(&c) {
                                tracing::error!(error = %e, "cannot save the boot profile");
                            }
                            return;
                        }
                    }
                });
            }
        }
        if self.boot.replay_profile {
            let (c, stop) = (cache.clone(), self.stop.clone());
            self.spawn(async move {
                let p = match profile::find(&c).await {
                    Ok(Some(p)) => p,
                    Ok(None) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "boot profile not used");
                        return;
                    }
                };
                let image = c.origin().identity().locator.clone();
                match profile::replay(c, p, stop).await {
                    Ok(r) => tracing::info!(%image, requests = r.requests,
                        fetched = %crate::util::human_bytes(r.bytes),
                        ms = r.elapsed.as_millis() as u64, "boot profile replayed"),
                    Err(e) => tracing::warn!(%image, error = %e, "boot profile replay stopped"),
                }
            });
        }
        if self.boot.hydrate {
            self.hydrate(cache);
        } else if cache.origin().sequential_only() {
            // Its bytes come in one pass anyway: keep them all, in order,
            // as the pass brings them.
            tracing::info!(image = %locator, "the origin reads only from its start: hydrating the image");
            self.hydrate(cache);
        }
    }

    /// Start hydrating an image unless it is already being hydrated.
    pub(crate) fn hydrate(&self, cache: &ImageCache) {
        let locator = cache.origin().identity().locator.clone();
        if let Some(limit) = self.cache_size {
            if limit < cache.image_size() {
                tracing::warn!(image = %locator, limit, "not hydrating: the image is larger than --cache-size");
                return;
            }
        }
        let live = {
            let mut h = self.hydrations.write().unwrap_or_else(|p| p.into_inner());
            if h.iter().any(|(l, _)| *l == locator) {
                return;
            }
            let live = Arc::new(hydrate::Live::default());
            h.push((locator.clone(), live.clone()));
            live
        };
        let (c, stop, rate) = (cache.clone(), self.stop.clone(), self.boot.hydrate_rate);
        self.spawn(async move {
            if let Err(e) = hydrate::run(c, rate, live, stop).await {
                tracing::error!(image = %locator, error = %e, "hydration stopped");
            }
        });
    }

    /// Hydration progress of images being hydrated (metrics).
    pub(crate) fn hydrations(&self) -> Vec<(String, Arc<hydrate::Live>)> {
        self.hydrations
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Re-read every open origin's header files and credentials (SIGHUP,
    /// `lazybd reload`). Each origin keeps its previous values if its own
    /// reload fails; the first error is returned after all were tried.
    /// Returns how many origins re-read something.
    pub fn reload(&self) -> Result<usize> {
        let mut reloaded = 0;
        let mut first_err = None;
        for c in self.open_caches() {
            let image = c.origin().identity().locator.clone();
            match c.origin().reload() {
                Ok(true) => {
                    reloaded += 1;
                    tracing::info!(%image, "origin headers and credentials reloaded");
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(%image, error = %e, "reload failed: the previous headers and credentials stay in use");
                    first_err.get_or_insert(e.context_prefix(&image));
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(reloaded),
        }
    }

    /// Stop every boot profile recording and save the profiles.
    pub(crate) fn finish_profiles(&self) -> Result<()> {
        let caches = self.open_caches();
        let mut r = Ok(());
        for c in caches {
            if let Err(e) = profile::finish_recording(&c) {
                r = Err(e);
            }
        }
        r
    }

    pub async fn add_export(&self, cfg: &ExportConfig) -> Result<()> {
        crate::config::validate_name(&cfg.name)
            .map_err(|m| Error::new(ErrorKind::InvalidInput, format!("export name {m}")))?;
        if self
            .exports
            .get(&cfg.name)
            .is_some_and(|e| e.name == cfg.name)
        {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("an export named {:?} exists already", cfg.name),
            ));
        }
        let cache = self.image(&cfg.image).await?;
        if cfg.hydrate {
            self.hydrate(&cache);
        }
        let image = cache.origin().identity().locator.clone();
        let spec = ExportSpec {
            readahead: self.boot.readahead,
            format: cfg.format,
            name: cfg.name.clone(),
            description: cfg
                .description
                .clone()
                .unwrap_or_else(|| format!("lazybd: {}", cache.origin().identity().locator)),
        };
        let export = if cfg.writable {
            let dir = cfg
                .overlay_dir
                .clone()
                .unwrap_or_else(|| self.cache_dir.root().join("overlays").join(&cfg.name));
            let e = stack::writable_export(spec, cache, &dir).await?;
            tracing::info!(export = %cfg.name, overlay = %dir.display(), "writable export: writes go to its overlay");
            e
        } else {
            stack::read_only_export(spec, cache).await?
        };
        self.exports.add(export)?;
        // The locator, not the spec: a spec's query may carry a signature.
        tracing::info!(export = %cfg.name, %image, writable = cfg.writable, "export added");
        Ok(())
    }

    /// Remove an export. With clients connected it refuses unless `force`,
    /// which lets them finish in-flight requests and disconnects them.
    /// `delete_overlay` removes a writable export's overlay data.
    pub async fn remove_export(&self, name: &str, force: bool, delete_overlay: bool) -> Result<()> {
        let Some(e) = self.exports.get(name).filter(|e| e.name == name) else {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("no export named {name:?}"),
            ));
        };
        let clients = e.clients();
        if clients > 0 && !force {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("export {name:?} has {clients} connected client(s); use --force to disconnect them"),
            ));
        }
        self.exports.remove(name);
        let _ = e.closing.send(true);
        // Wait for connections to answer what they have in flight and close.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while e.clients() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if let Some(o) = &e.overlay {
            let dir = o.dir().to_path_buf();
            let o = o.clone();
            tokio::task::spawn_blocking(move || o.sync_blocking())
                .await
                .map_err(|e| Error::with_source(ErrorKind::Io, "overlay sync task", e))??;
            if delete_overlay {
                // The last references go with the export and its connections.
                drop(e);
                std::fs::remove_dir_all(&dir)
                    .map_err(|err| Error::io(format!("deleting overlay {}", dir.display()), err))?;
                tracing::info!(export = %name, overlay = %dir.display(), "overlay deleted");
            }
        }
        tracing::info!(export = %name, "export removed");
        Ok(())
    }

    pub fn list(&self) -> Vec<ExportInfo> {
        self.exports
            .all()
            .iter()
            .map(|e| ExportInfo {
                name: e.name.clone(),
                image: e.image.clone(),
                writable: !e.read_only(),
                clients: e.clients(),
                overlay_dir: e.overlay.as_ref().map(|o| o.dir().to_path_buf()),
                overlay_bytes: e.overlay.as_ref().map(|o| o.bytes_written()).unwrap_or(0),
            })
            .collect()
    }

    /// Persist every cache and overlay.
    pub async fn sync_all(&self) -> Result<()> {
        let caches = self.open_caches();
        let overlays: Vec<_> = self
            .exports
            .all()
            .iter()
            .filter_map(|e| e.overlay.clone())
            .collect();
        tokio::task::spawn_blocking(move || {
            let mut r = Ok(());
            for c in caches {
                r = r.and(c.sync());
            }
            for o in overlays {
                r = r.and(o.sync_blocking());
            }
            r
        })
        .await
        .map_err(|e| Error::with_source(ErrorKind::Io, "sync task", e))?
    }

    /// (locator, counters) of every open image.
    pub fn image_stats_now(&self) -> Vec<(String, Arc<Stats>)> {
        self.image_stats
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}
