//! Starting and stopping a server: bind the listeners, the control socket
//! and the metrics endpoint over one [`Daemon`], start the maintenance
//! tasks, and at shutdown answer what is in flight and persist everything.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::state::{BootOptions, Daemon, ExportConfig, Sources};
use super::{control, maintenance, metrics};
use crate::block::BlockSize;
use crate::cache::{CacheDir, ImageCache};
use crate::error::{Error, ErrorKind, Result};
use crate::origin::OriginOptions;
use crate::server::{self, Limits, ListenAddr, Listener, Shared};
use crate::stats::Stats;

/// Everything `serve` needs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub cache_dir: PathBuf,
    pub listen: Vec<ListenAddr>,
    /// None: keep each cache's block size, or the default for a new cache.
    pub block_size: Option<BlockSize>,
    pub origin_options: OriginOptions,
    /// Which manifest each image's blocks are checked against.
    pub manifest: crate::manifest::ManifestSetting,
    /// Sharing blocks with other hosts.
    pub peers: crate::peer::PeerOptions,
    pub limits: Limits,
    pub exports: Vec<ExportConfig>,
    /// Control socket for `lazybd export ...`; None: no runtime management.
    pub control: Option<PathBuf>,
    /// Prometheus endpoint address; None: no metrics listener.
    pub metrics: Option<String>,
    /// Upper bound on cached block data across all images (bytes); None:
    /// unbounded. Eviction starts above 95% and stops at 90% (watermarks,
    /// so it works in batches, not on every fetch). Overlays never count.
    pub cache_size: Option<u64>,
    pub boot: BootOptions,
    /// TLS for NBD clients (STARTTLS); off by default.
    pub tls: crate::tls::TlsOptions,
}

/// A running server.
pub struct Running {
    /// Bound TCP addresses (ports resolved), in listen order.
    pub tcp_addrs: Vec<std::net::SocketAddr>,
    pub daemon: Arc<Daemon>,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<()>>,
    /// Control and metrics listeners: they end by themselves on `stop`.
    listeners: Vec<JoinHandle<()>>,
    /// The periodic sync: aborted at shutdown.
    syncer: JoinHandle<()>,
    budget: crate::nbd::transmission::Budget,
}

impl Running {
    /// Read-reply bytes no connection holds right now (of `--max-buffered`).
    pub fn budget_available(&self) -> u64 {
        self.budget.available()
    }

    /// The shared cache of `image` if open.
    pub async fn cache(&self, image: &str) -> Option<ImageCache> {
        self.daemon.cache_now(image)
    }

    /// Stop accepting, answer in-flight requests, persist everything.
    /// Returns the counters of every image.
    pub async fn shutdown(self) -> Result<Vec<(String, Arc<Stats>)>> {
        let _ = self.stop.send(true);
        let r = self.task.await;
        self.syncer.abort();
        for l in self.listeners {
            // They remove their sockets on the way out.
            let _ = l.await;
        }
        // Replay and hydration finish their in-flight fetches and stop.
        for t in self.daemon.take_tasks() {
            let _ = t.await;
        }
        if let Err(e) = self.daemon.finish_profiles() {
            tracing::error!(error = %e, "cannot save boot profiles");
        }
        let sync = self.daemon.sync_all().await;
        r.map_err(|e| Error::with_source(ErrorKind::Io, "server task", e))??;
        sync?;
        Ok(self.daemon.image_stats_now())
    }
}

/// Open everything and start serving in the background.
pub async fn start(cfg: ServeConfig) -> Result<Running> {
    // Certificates first: a bad file is a start-up error, before any work.
    let tls = crate::tls::Tls::load(&cfg.tls)?;
    if cfg.peers.listen.is_some() && cfg.peers.token.as_deref().unwrap_or("").is_empty() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "--peer-listen serves cached images to whoever has the shared token: give one \
             (--peer-token-file FILE, or LAZYBD_PEER_TOKEN)",
        ));
    }
    let peers = crate::peer::client::PeerSet::new(&cfg.peers)?;
    let (stop, rx) = watch::channel(false);
    let daemon = Arc::new(Daemon::new(
        CacheDir::new(&cfg.cache_dir)?,
        cfg.block_size,
        Sources {
            origin: cfg.origin_options.clone(),
            manifest: cfg.manifest.clone(),
            peers,
        },
        cfg.boot.clone(),
        cfg.cache_size,
        rx.clone(),
    ));
    let mut retry = Vec::new();
    for e in &cfg.exports {
        match daemon.add_export(e).await {
            Ok(()) => {}
            // One dead image URL must not take every other VM disk down:
            // with several exports, a failing one is retried in the
            // background, unless retrying cannot help (a bad setting, an
            // image lazybd cannot serve).
            Err(err)
                if cfg.exports.len() > 1
                    && !matches!(err.kind(), ErrorKind::InvalidInput | ErrorKind::Unsupported) =>
            {
                tracing::error!(export = %e.name, error = %err, "export unavailable; retrying in the background");
                retry.push(e.clone());
            }
            Err(err) => return Err(err.context_prefix(format!("export {:?}", e.name))),
        }
    }
    let mut listeners = Vec::new();
    for a in &cfg.listen {
        listeners.push(Listener::bind(a).await?);
    }
    let tcp_addrs = listeners.iter().filter_map(|l| l.local_addr()).collect();
    let mut aux = Vec::new();
    if let Some(path) = &cfg.control {
        aux.push(control::serve(path, daemon.clone(), rx.clone())?);
    }
    if let Some(addr) = &cfg.metrics {
        aux.push(metrics::serve(addr, daemon.clone(), rx.clone()).await?);
    }
    if let Some(addr) = &cfg.peers.listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| Error::io(format!("peer listener {addr}"), e))?;
        tracing::info!(listen = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            own = cfg.peers.own_url().as_deref().unwrap_or(""), "serving cached images to peers");
        let d = daemon.clone();
        let lookup: crate::peer::server::Lookup = Arc::new(move |k| d.cache_by_peer_key(k));
        let token = cfg.peers.token.clone().unwrap_or_default();
        aux.push(tokio::spawn(crate::peer::server::serve(
            l,
            token,
            lookup,
            rx.clone(),
        )));
    }
    let shared = Shared {
        exports: daemon.exports.clone(),
        limits: cfg.limits.clone(),
        tls,
        budget: crate::nbd::transmission::Budget::new(
            cfg.limits.max_buffered,
            cfg.limits.send_timeout,
        ),
    };
    let budget = shared.budget.clone();
    let task = tokio::spawn(server::run(listeners, shared, rx.clone()));
    let syncer = tokio::spawn(maintenance::periodic_sync(daemon.clone()));
    for e in retry {
        aux.push(tokio::spawn(maintenance::retry_export(
            daemon.clone(),
            e,
            rx.clone(),
        )));
    }
    if let Some(limit) = cfg.cache_size {
        aux.push(tokio::spawn(maintenance::evictor(
            daemon.clone(),
            limit,
            rx.clone(),
        )));
    }
    Ok(Running {
        tcp_addrs,
        daemon,
        stop,
        task,
        listeners: aux,
        syncer,
        budget,
    })
}
