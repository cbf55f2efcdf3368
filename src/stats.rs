//! Counters shared by the layers of one image and its exports. Relaxed
//! atomics: they are statistics, never used to order anything.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

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
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
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
             origin_errors={} crc_failures={} store_failures={} zero_blocks={}",
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
        )
    }
}
