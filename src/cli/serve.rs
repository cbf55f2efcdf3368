//! `lazybd serve`: resolve the settings, run the daemon until SIGTERM or
//! SIGINT (SIGHUP: re-read origins' header and credentials files), log
//! each image's counters at the end.

use std::process::ExitCode;

use anyhow::Context;
use lazybd::config::FileConfig;
use lazybd::daemon;

use super::settings;
use super::ServeArgs;

pub fn run(mut a: ServeArgs) -> anyhow::Result<ExitCode> {
    a.env_headers = std::env::var("LAZYBD_HEADERS").ok();
    let file = match &a.config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    let cfg = settings::resolve(&a, &file, |cache_dir| {
        let p = lazybd::sample::ensure(cache_dir).context("creating the sample image")?;
        tracing::info!(path = %p.display(), "no origin given: serving the built-in sample image");
        Ok(p)
    })?;
    if cfg.exports.is_empty() {
        tracing::warn!("no exports configured: add them with `lazybd export add`");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        // SIGHUP's default is to terminate: catch it before a start that
        // may take a while (origins probed), so an early `systemctl reload`
        // is a reload after start, not the end of the server.
        let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let running = daemon::start(cfg).await?;
        let exports = running.daemon.list().len();
        daemon::notify::ready(&format!("serving {exports} export(s)"));
        wait_for_signal(&running.daemon, hup).await;
        daemon::notify::stopping();
        tracing::info!("signal received: stopping (answering in-flight requests)");
        for (image, stats) in running.shutdown().await? {
            tracing::info!(%image, "summary: {stats}");
        }
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Until SIGTERM or SIGINT; each SIGHUP reloads origins' files.
async fn wait_for_signal(daemon: &daemon::Daemon, hup: Option<tokio::signal::unix::Signal>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Some(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        hup,
    ) else {
        // Without signal handlers we can only run until killed.
        std::future::pending::<()>().await;
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => return,
            _ = int.recv() => return,
            _ = hup.recv() => {
                tracing::info!("SIGHUP: re-reading origins' header and credentials files");
                daemon::notify::reloading();
                // Errors are logged per origin by reload itself.
                if let Ok(n) = daemon.reload() {
                    tracing::info!(origins = n, "reload done");
                }
                daemon::notify::ready(&format!("serving {} export(s)", daemon.list().len()));
            }
        }
    }
}
