//! Counters shared by the layers of one image and its exports. Relaxed
//! atomics: they are statistics, never used to order anything.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the origin latency histogram buckets.
const LATENCY_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0,
];

/// A fixed-bucket latency histogram in atomics (lock-free to record).
#[derive(Default, Debug)]
pub(crate) struct Histogram {
    /// Per bucket (not cumulative); the last slot is +Inf.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_ns: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub(crate) fn record(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns
            .fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// The bucket bound at or above quantile `q`, once `min` samples are
    /// in (None before, or when it lies in the +Inf bucket).
    pub(crate) fn quantile(&self, q: f64, min: u64) -> Option<Duration> {
        let count = self.count.load(Ordering::Relaxed);
        if count < min {
            return None;
        }
        let want = (count as f64 * q).ceil() as u64;
        let mut seen = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            seen += b.load(Ordering::Relaxed);
            if seen >= want {
                return LATENCY_BUCKETS.get(i).map(|&s| Duration::from_secs_f64(s));
            }
        }
        None
    }

    /// Samples recorded.
    pub(crate) fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Sum of the samples, in seconds.
    pub(crate) fn sum_secs(&self) -> f64 {
        self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9
    }

    /// (sum in seconds, count, per-bucket (upper bound, count)); the
    /// encoder makes them cumulative.
    pub(crate) fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut out = Vec::with_capacity(self.buckets.len());
        for (i, b) in self.buckets.iter().enumerate() {
            // f64::MAX is how prometheus-client spells the +Inf bucket.
            let bound = LATENCY_BUCKETS.get(i).copied().unwrap_or(f64::MAX);
            out.push((bound, b.load(Ordering::Relaxed)));
        }
        (self.sum_secs(), self.count(), out)
    }
}

#[derive(Default, Debug)]
pub struct Stats {
    /// Bytes returned to NBD clients by READ.
    pub bytes_served: AtomicU64,
    /// READ requests answered.
    pub reads: AtomicU64,
    /// Blocks served from the local cache without waiting for the origin.
    pub hits: AtomicU64,
    /// Blocks that had to come from the origin (fetched or joined in flight).
    pub misses: AtomicU64,
    /// Ranged requests sent to the origin (retries included).
    pub origin_requests: AtomicU64,
    /// Bytes received from the origin and accepted.
    pub origin_bytes: AtomicU64,
    /// Origin requests that failed (before any retry succeeded).
    pub origin_errors: AtomicU64,
    /// Cache pages whose CRC did not match: treated as misses and refetched.
    pub crc_failures: AtomicU64,
    /// Blocks that could not be stored (e.g. disk full) and were served uncached.
    pub store_failures: AtomicU64,
    /// Blocks found to be all zeroes (kept as metadata only).
    pub zero_blocks: AtomicU64,
    /// Blocks evicted to keep the cache under its size limit.
    pub evictions: AtomicU64,
    /// Evictions that failed because the hole could not be punched (the
    /// block stays cached; the size limit is not enforced).
    pub punch_failures: AtomicU64,
    /// Slow origin requests that were sent a second time (hedged).
    pub origin_hedges: AtomicU64,
    /// Answers with a block that did not match the image's manifest (not
    /// served, not cached).
    pub manifest_failures: AtomicU64,
    /// Bytes fetched from peers (checked) instead of the origin.
    pub peer_bytes: AtomicU64,
    /// Peer requests that failed or were refused (the origin was read).
    pub peer_failures: AtomicU64,
    /// Bytes this host served to its peers.
    pub peer_served_bytes: AtomicU64,
    /// Bytes brought in ahead of the guest by sequential readahead.
    pub readahead_bytes: AtomicU64,
    /// Bytes brought in ahead of the guest by boot profile replay.
    pub profile_bytes: AtomicU64,
    /// Bytes brought in by background hydration.
    pub hydrate_bytes: AtomicU64,
    /// Time of successful origin requests, body included.
    pub(crate) origin_latency: Histogram,
    /// Time guest reads spent waiting for the origin (from their first
    /// wait for a fetch to their answer), one sample per read that waited.
    /// Its sum bounds what a cold boot made of dependent reads loses to
    /// the origin's distance: reads that hit the cache are not in it.
    pub(crate) guest_wait: Histogram,
}

/// Who brought bytes in ahead of the guest: each kind of background work
/// has its own counter. Named here, with the counters, so the cache that
/// does the fetching need not know who its background users are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Work {
    Readahead,
    Profile,
    Hydrate,
}

impl Stats {
    /// The counter of bytes fetched for `work`.
    pub(crate) fn work_bytes(&self, work: Work) -> &AtomicU64 {
        match work {
            Work::Readahead => &self.readahead_bytes,
            Work::Profile => &self.profile_bytes,
            Work::Hydrate => &self.hydrate_bytes,
        }
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = Stats::get;
        write!(
            f,
            "reads={} bytes_served={} hits={} misses={} origin_requests={} origin_bytes={} \
             origin_errors={} crc_failures={} store_failures={} zero_blocks={} evictions={} \
             punch_failures={} readahead_bytes={} profile_bytes={} hydrate_bytes={} origin_hedges={} \
             manifest_failures={} peer_bytes={} peer_failures={} peer_served_bytes={} \
             guest_waits={} guest_wait_ms={}",
            g(&self.reads),
            g(&self.bytes_served),
            g(&self.hits),
            g(&self.misses),
            g(&self.origin_requests),
            g(&self.origin_bytes),
            g(&self.origin_errors),
            g(&self.crc_failures),
            g(&self.store_failures),
            g(&self.zero_blocks),
            g(&self.evictions),
            g(&self.punch_failures),
            g(&self.readahead_bytes),
            g(&self.profile_bytes),
            g(&self.hydrate_bytes),
            g(&self.origin_hedges),
            g(&self.manifest_failures),
            g(&self.peer_bytes),
            g(&self.peer_failures),
            g(&self.peer_served_bytes),
            self.guest_wait.count(),
            (self.guest_wait.sum_secs() * 1e3).round() as u64,
        )
    }
}
