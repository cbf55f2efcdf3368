//! Prometheus metrics (`serve --metrics HOST:PORT`, GET /metrics), encoded
//! by prometheus-client in the OpenMetrics text format.
//!
//! Counters live where they are counted (relaxed atomics in [`Stats`],
//! export client counts, overlay maps); a collector reads them at scrape
//! time, so the hot path never touches the metrics library.

use std::sync::{Arc, Weak};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::state::Daemon;
use crate::error::{Error, Result};
use crate::prefetch::hydrate;
use crate::stats::{Histogram, Stats};
use std::sync::atomic::Ordering::Relaxed;

type Field = fn(&Stats) -> u64;

/// (name, help, value) of each per-image counter.
const IMAGE_COUNTERS: [(&str, &str, Field); 20] = [
    ("lazybd_read_requests", "NBD READ requests answered", |s| {
        Stats::get(&s.reads)
    }),
    ("lazybd_read_bytes", "Bytes returned by NBD READ", |s| {
        Stats::get(&s.bytes_served)
    }),
    (
        "lazybd_cache_hits",
        "Blocks served from the local cache",
        |s| Stats::get(&s.hits),
    ),
    (
        "lazybd_cache_misses",
        "Blocks that had to come from the origin",
        |s| Stats::get(&s.misses),
    ),
    (
        "lazybd_origin_requests",
        "Ranged requests sent to the origin, retries included",
        |s| Stats::get(&s.origin_requests),
    ),
    (
        "lazybd_origin_bytes",
        "Bytes received from the origin and accepted",
        |s| Stats::get(&s.origin_bytes),
    ),
    ("lazybd_origin_errors", "Origin requests that failed", |s| {
        Stats::get(&s.origin_errors)
    }),
    (
        "lazybd_origin_hedges",
        "Slow origin requests sent a second time (hedged)",
        |s| Stats::get(&s.origin_hedges),
    ),
    (
        "lazybd_manifest_failures",
        "Origin answers with a block that did not match the manifest (not served)",
        |s| Stats::get(&s.manifest_failures),
    ),
    (
        "lazybd_peer_bytes",
        "Bytes fetched from peers (checked) instead of the origin",
        |s| Stats::get(&s.peer_bytes),
    ),
    (
        "lazybd_peer_failures",
        "Peer requests that failed or were refused (the origin was read)",
        |s| Stats::get(&s.peer_failures),
    ),
    ("lazybd_peer_served_bytes", "Bytes served to peers", |s| {
        Stats::get(&s.peer_served_bytes)
    }),
    (
        "lazybd_crc_failures",
        "Cache pages that failed their CRC (refetched)",
        |s| Stats::get(&s.crc_failures),
    ),
    (
        "lazybd_store_failures",
        "Fetched blocks that could not be stored (served uncached)",
        |s| Stats::get(&s.store_failures),
    ),
    (
        "lazybd_zero_blocks",
        "Blocks found all-zero (metadata only)",
        |s| Stats::get(&s.zero_blocks),
    ),
    (
        "lazybd_cache_evictions",
        "Blocks evicted to respect the cache size",
        |s| Stats::get(&s.evictions),
    ),
    (
        "lazybd_cache_punch_failures",
        "Evictions that failed to punch a hole (the cache size limit is not enforced)",
        |s| Stats::get(&s.punch_failures),
    ),
    (
        "lazybd_readahead_bytes",
        "Bytes fetched ahead of the guest by sequential readahead",
        |s| Stats::get(&s.readahead_bytes),
    ),
    (
        "lazybd_profile_bytes",
        "Bytes fetched ahead of the guest by boot profile replay",
        |s| Stats::get(&s.profile_bytes),
    ),
    (
        "lazybd_hydrate_bytes",
        "Bytes fetched by background hydration",
        |s| Stats::get(&s.hydrate_bytes),
    ),
];

#[derive(Debug)]
struct DaemonCollector(Weak<Daemon>);

impl Collector for DaemonCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let Some(d) = self.0.upgrade() else {
            return Ok(());
        };
        let images = d.image_stats_now();
        for (name, help, field) in IMAGE_COUNTERS {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (image, st) in &images {
                let labels = [("image", image.as_str())];
                m.encode_family(&labels)?
                    .encode_counter::<NoLabelSet, _, u64>(&field(st), None)?;
            }
        }
        for (name, help, pick) in [
            (
                "lazybd_origin_request_seconds",
                "Latency of successful origin requests",
                (|s: &Stats| &s.origin_latency) as fn(&Stats) -> &Histogram,
            ),
            (
                "lazybd_guest_origin_wait_seconds",
                "Time guest reads waited for the origin (reads that waited)",
                |s: &Stats| &s.guest_wait,
            ),
        ] {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
            for (image, st) in &images {
                let (sum, count, buckets) = pick(st).snapshot();
                let labels = [("image", image.as_str())];
                m.encode_family(&labels)?
                    .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
            }
        }
        let hydrations = d.hydrations();
        for (name, help, pick) in [
            (
                "lazybd_hydrate_done_blocks",
                "Blocks of an image being hydrated that are cached (or zero)",
                (|l: &hydrate::Live| l.done_blocks.load(Relaxed)) as fn(&hydrate::Live) -> u64,
            ),
            (
                "lazybd_hydrate_total_blocks",
                "Blocks of an image being hydrated",
                |l: &hydrate::Live| l.total_blocks.load(Relaxed),
            ),
            (
                "lazybd_hydrate_rate_bytes",
                "Hydration rate over the last seconds, bytes per second",
                |l: &hydrate::Live| l.rate.load(Relaxed),
            ),
        ] {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (image, live) in &hydrations {
                let labels = [("image", image.as_str())];
                m.encode_family(&labels)?
                    .encode_gauge(&(pick(live) as i64))?;
            }
        }
        let exports = d.list();
        let mut m = enc.encode_descriptor(
            "lazybd_export_clients",
            "Connected clients",
            None,
            MetricType::Gauge,
        )?;
        for e in &exports {
            let labels = [("export", e.name.as_str()), ("image", e.image.as_str())];
            m.encode_family(&labels)?
                .encode_gauge(&(e.clients as i64))?;
        }
        let mut m = enc.encode_descriptor(
            "lazybd_overlay_bytes",
            "Bytes held by a writable export's overlay",
            None,
            MetricType::Gauge,
        )?;
        for e in exports.iter().filter(|e| e.writable) {
            let labels = [("export", e.name.as_str())];
            m.encode_family(&labels)?
                .encode_gauge(&(e.overlay_bytes as i64))?;
        }
        Ok(())
    }
}

/// The current metrics as OpenMetrics text.
fn render(daemon: &Arc<Daemon>) -> String {
    let mut reg = Registry::default();
    reg.register_collector(Box::new(DaemonCollector(Arc::downgrade(daemon))));
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &reg);
    out
}

/// Serve GET /metrics on `addr` until `stop`.
pub(crate) async fn serve(
    addr: &str,
    daemon: Arc<Daemon>,
    mut stop: watch::Receiver<bool>,
) -> Result<JoinHandle<()>> {
    let l = TcpListener::bind(addr)
        .await
        .map_err(|e| Error::io(format!("metrics listener {addr}"), e))?;
    tracing::info!(metrics = %addr, "metrics endpoint listening (GET /metrics)");
    Ok(tokio::spawn(async move {
        loop {
            let s = tokio::select! {
                r = l.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
                _ = stop.wait_for(|s| *s) => return,
            };
            let d = daemon.clone();
            tokio::spawn(async move {
                let _ = scrape(s, d).await;
            });
        }
    }))
}

async fn scrape(mut s: tokio::net::TcpStream, d: Arc<Daemon>) -> std::io::Result<()> {
    // A request head is small; a peer sending more is not a scraper.
    let mut buf = vec![0u8; 8192];
    let mut n = 0;
    while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
        if n == buf.len() {
            return Ok(());
        }
        let r =
            tokio::time::timeout(std::time::Duration::from_secs(10), s.read(&mut buf[n..])).await;
        match r {
            Ok(Ok(0)) | Err(_) => return Ok(()),
            Ok(Ok(k)) => n += k,
            Ok(Err(e)) => return Err(e),
        }
    }
    let head = String::from_utf8_lossy(&buf[..n]);
    let path = head.split_whitespace().nth(1).unwrap_or("");
    let (status, ctype, body) = if head.starts_with("GET ") && (path == "/metrics" || path == "/") {
        (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            render(&d),
        )
    } else {
        (
            "404 Not Found",
            "text/plain",
            "try GET /metrics\n".to_string(),
        )
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(resp.as_bytes()).await?;
    s.shutdown().await
}
