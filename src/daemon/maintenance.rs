//! Maintenance of a running server: the evictor that keeps the caches
//! under `--cache-size`, the periodic sync, and retries of exports whose
//! origin was down at start.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::state::{Daemon, ExportConfig};

/// Eviction starts when cached data exceeds this share of the limit...
pub const HIGH_WATERMARK: f64 = 0.95;
/// ...and stops when it is back under this one.
const LOW_WATERMARK: f64 = 0.90;

/// Persist maps now and then so a power cut loses little work (a process
/// kill loses nothing: the mappings live in the page cache). Aborted at
/// shutdown, which syncs once more.
pub(super) async fn periodic_sync(d: Arc<Daemon>) {
    let mut t = tokio::time::interval(Duration::from_secs(30));
    t.tick().await;
    loop {
        t.tick().await;
        if let Err(e) = d.sync_all().await {
            tracing::warn!(error = %e, "periodic sync failed");
        }
    }
}

/// Keep cached data under `limit`: check often (a cold sequential read can
/// fill a gigabyte a second), evict from high to low watermark.
pub(super) async fn evictor(d: Arc<Daemon>, limit: u64, mut stop: watch::Receiver<bool>) {
    let high = (limit as f64 * HIGH_WATERMARK) as u64;
    let low = (limit as f64 * LOW_WATERMARK) as u64;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let caches = d.open_caches();
        let total: u64 = caches.iter().map(|c| c.present_bytes()).sum();
        if total <= high {
            continue;
        }
        let want = total - low;
        let freed = tokio::task::spawn_blocking(move || {
            let mut freed = 0;
            // Largest caches first: they hold the most cold blocks.
            let mut caches = caches;
            caches.sort_by_key(|c| std::cmp::Reverse(c.present_bytes()));
            // A cache whose file system cannot punch holes frees nothing
            // (it said so once, in a warning naming its directory).
            for c in caches.iter().filter(|c| c.can_evict()) {
                if freed >= want {
                    break;
                }
                freed += c.evict(want - freed);
            }
            freed
        })
        .await
        .unwrap_or(0);
        if freed > 0 {
            tracing::info!(
                limit,
                cached = total,
                freed,
                "cache over its size limit: evicted least recently used blocks"
            );
        } else {
            tracing::debug!(
                limit,
                cached = total,
                "cache over its size limit: nothing could be evicted"
            );
        }
    }
}

/// Keep trying to add an export whose image could not be opened at start.
pub(super) async fn retry_export(d: Arc<Daemon>, e: ExportConfig, mut stop: watch::Receiver<bool>) {
    let mut wait = Duration::from_secs(2);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        match d.add_export(&e).await {
            Ok(()) => {
                tracing::info!(export = %e.name, "export available after retry");
                return;
            }
            Err(err) => {
                tracing::warn!(export = %e.name, error = %err, retry_in_s = wait.as_secs(), "export still unavailable");
                wait = (wait * 2).min(Duration::from_secs(60));
            }
        }
    }
}
