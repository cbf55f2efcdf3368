//! `lazybd serve` as a library call: open origin and cache, compose the
//! export, bind listeners, serve until told to stop, persist, report.
//! The binary only parses arguments and calls [`start`]; tests call it too.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::block::BlockSize;
use crate::cache::{CacheDir, ImageCache};
use crate::error::Result;
use crate::export::stack::{self, ExportSpec};
use crate::export::Exports;
use crate::origin::{self, OriginOptions};
use crate::overlay::Overlay;
use crate::server::{self, Limits, ListenAddr, Listener, Shared};
use crate::stats::Stats;

/// Everything `serve` needs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub origin: String,
    pub cache_dir: PathBuf,
    pub listen: Vec<ListenAddr>,
    pub name: String,
    pub description: Option<String>,
    /// None: keep the cache's block size, or the default for a new cache.
    pub block_size: Option<BlockSize>,
    pub origin_options: OriginOptions,
    pub limits: Limits,
    /// Serve a writable export with a copy-on-write overlay.
    pub writable: bool,
    /// Where the overlay lives; default `CACHE_DIR/overlays/NAME`.
    pub overlay_dir: Option<PathBuf>,
}

/// A running server.
pub struct Running {
    /// Bound TCP addresses (ports resolved), in listen order.
    pub tcp_addrs: Vec<std::net::SocketAddr>,
    pub stats: Arc<Stats>,
    pub cache: ImageCache,
    /// The writable export's overlay, if any.
    pub overlay: Option<Arc<Overlay>>,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<()>>,
    syncer: JoinHandle<()>,
}

impl Running {
    /// Stop accepting, answer in-flight requests, persist the cache.
    pub async fn shutdown(self) -> Result<Arc<Stats>> {
        let _ = self.stop.send(true);
        let r = self.task.await;
        self.syncer.abort();
        let mut sync = self.cache.sync();
        if let Some(o) = &self.overlay {
            // Not a promise to the client (only FLUSH is), but a clean stop
            // should leave nothing to chance.
            sync = sync.and(o.sync_blocking());
        }
        match r {
            Ok(r) => r?,
            Err(e) => {
                return Err(crate::error::Error::with_source(
                    crate::error::ErrorKind::Io,
                    "server task",
                    e,
                ))
            }
        }
        sync?;
        Ok(self.stats)
    }
}

/// Open everything and start serving in the background.
pub async fn start(cfg: ServeConfig) -> Result<Running> {
    let stats = Arc::new(Stats::default());
    let origin = origin::open(&cfg.origin, &cfg.origin_options, stats.clone()).await?;
    tracing::info!(origin = %origin.identity(), "origin opened");
    let dir = CacheDir::new(&cfg.cache_dir)?;
    let cache = dir.open_image(origin.clone(), cfg.block_size, stats.clone())?;
    let exports = Arc::new(Exports::new());
    let description = cfg
        .description
        .clone()
        .unwrap_or_else(|| format!("lazybd: {}", origin.identity().locator));
    let spec = ExportSpec {
        name: cfg.name.clone(),
        description,
    };
    let mut overlay = None;
    if cfg.writable {
        let dir = cfg
            .overlay_dir
            .clone()
            .unwrap_or_else(|| cfg.cache_dir.join("overlays").join(&cfg.name));
        let (export, o) = stack::writable_export(spec, cache.clone(), &dir)?;
        tracing::info!(export = %cfg.name, overlay = %dir.display(), "writable export: writes go to its overlay");
        exports.add(export);
        overlay = Some(o);
    } else {
        exports.add(stack::read_only_export(spec, cache.clone()));
    }
    let mut listeners = Vec::new();
    for a in &cfg.listen {
        listeners.push(Listener::bind(a).await?);
    }
    let tcp_addrs = listeners.iter().filter_map(|l| l.local_addr()).collect();
    let (stop, rx) = watch::channel(false);
    let shared = Shared {
        exports,
        stats: Some(stats.clone()),
        limits: cfg.limits.clone(),
    };
    let task = tokio::spawn(server::run(listeners, shared, rx));
    // Persist the map now and then so a power cut loses little work (a
    // process kill loses nothing: the mapping lives in the page cache).
    let c2 = cache.clone();
    let syncer = tokio::spawn(async move {
        let mut t = tokio::time::interval(Duration::from_secs(30));
        t.tick().await;
        loop {
            t.tick().await;
            let c = c2.clone();
            if let Ok(Err(e)) = tokio::task::spawn_blocking(move || c.sync()).await {
                tracing::warn!(error = %e, "periodic cache sync failed");
            }
        }
    });
    Ok(Running {
        tcp_addrs,
        stats,
        cache,
        overlay,
        stop,
        task,
        syncer,
    })
}
