//! Background hydration: bring every block of an image into the cache, so
//! the image no longer depends on the origin.
//!
//! * Large requests: runs of missing blocks up to the cache's fetch size,
//!   `JOBS` in parallel, cached and zero blocks skipped.
//! * Guest first: it uses the cache's background permits (guest misses keep
//!   the other half of the origin's connections) and pauses while a guest
//!   read waits on the origin. Guest reads of cached blocks never queue
//!   behind it: they are served inline from the page cache, and hydrated
//!   blocks are stored on the blocking pool.
//! * Rate limit: a token bucket in bytes per second (`--hydrate-rate`).
//! * Resumable: progress is the block map itself, so after a restart the
//!   scan skips what is already there. A status file (`hydrate.json` in the
//!   image's cache directory: blocks done, total, rate, ETA) is rewritten
//!   every second for `lazybd cache info`; metrics read the same numbers.
//!   It is written on the blocking pool, one write at a time (a second
//!   with the last one unfinished is skipped), and never fsynced: it is
//!   informational, and a run after a power cut rewrites it at once.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use crate::block::{BlockIndex, ByteRange};
use crate::cache::ImageCache;
use crate::error::{Error, ErrorKind, Result};
use crate::origin::ContentDigest;
use crate::stats::Work;
use crate::util::human_bytes;

/// Parallel hydration requests (also bounded by the background permits).
const JOBS: usize = 4;
/// Status file in the image's cache directory.
const STATUS_FILE: &str = "hydrate.json";
/// Records that the fully cached image matched its published digest
/// (algorithm and hex), so a restart does not hash it again.
const VERIFIED_FILE: &str = "digest-verified";

/// What `cache info` and metrics show.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Progress {
    /// Blocks present or known zero.
    pub done_blocks: u64,
    pub total_blocks: u64,
    /// Bytes per second over the last few seconds.
    pub rate: u64,
    /// Seconds to completion at that rate (None: unknown).
    pub eta_secs: Option<u64>,
    pub complete: bool,
    /// Unix time of this status.
    pub updated: u64,
}

impl Progress {
    pub fn load(image_dir: &Path) -> Option<Progress> {
        serde_json::from_slice(&std::fs::read(image_dir.join(STATUS_FILE)).ok()?).ok()
    }
}

/// Live progress of a running hydration, read by metrics.
#[derive(Debug, Default)]
pub(crate) struct Live {
    pub(crate) done_blocks: AtomicU64,
    pub(crate) total_blocks: AtomicU64,
    pub(crate) rate: AtomicU64,
}

/// Token bucket: `rate` bytes per second, bursts of one second.
struct Bucket {
    rate: u64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    async fn take(&mut self, n: u64) {
        loop {
            let now = Instant::now();
            self.tokens = (self.tokens + (now - self.last).as_secs_f64() * self.rate as f64)
                .min(self.rate.max(n) as f64);
            self.last = now;
            if self.tokens >= n as f64 {
                self.tokens -= n as f64;
                return;
            }
            let wait = (n as f64 - self.tokens) / self.rate as f64;
            tokio::time::sleep(Duration::from_secs_f64(wait.min(1.0))).await;
        }
    }
}

/// The next run of missing blocks at or after `from`, at most `max` long.
fn next_missing(cache: &ImageCache, from: u64, blocks: u64, max: u64) -> Option<(u64, u64)> {
    let first = (from..blocks).find(|&b| cache.is_missing(b))?;
    let mut n = 1;
    while n < max && first + n < blocks && cache.is_missing(first + n) {
        n += 1;
    }
    Some((first, n))
}

/// Hydrate `cache` until complete or `stop`. `rate`: bytes per second.
pub(crate) async fn run(
    cache: ImageCache,
    rate: Option<u64>,
    live: Arc<Live>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let bs = cache.block_size();
    let (_, _, blocks) = cache.counts();
    let per_fetch = (cache.max_fetch() / bs.bytes()).max(1);
    let mut bucket = rate.map(|rate| Bucket {
        rate: rate.max(1),
        // Start with one second's worth: the first request goes at once.
        tokens: rate as f64,
        last: Instant::now(),
    });
    let started = Instant::now();
    let image = cache.origin().identity().locator.clone();
    live.total_blocks.store(blocks, Ordering::Relaxed);
    tracing::info!(%image, rate = rate.map(human_bytes).unwrap_or_else(|| "unlimited".into()),
        "hydration started");
    // A check made earlier still holds only for an image cached whole
    // before this run began: anything fetched now is checked anew.
    let complete_at_start = next_missing(&cache, 0, blocks, 1).is_none();
    let verified_file = cache.dir().join(VERIFIED_FILE);
    if !complete_at_start {
        let _ = std::fs::remove_file(&verified_file);
    }
    let mut jobs: JoinSet<Result<u64>> = JoinSet::new();
    let mut cursor = 0u64;
    let mut wrapped = false;
    let mut window = RateWindow::new();
    let mut status = StatusWriter::new(cache.dir().join(STATUS_FILE));
    let mut last_status = Instant::now() - Duration::from_secs(10);
    let mut last_log = Instant::now();
    let mut failures = 0u32;
    loop {
        if *stop.borrow() {
            break;
        }
        // Progress: status file every second, a log line every 10 s.
        if last_status.elapsed() >= Duration::from_secs(1) {
            let p = progress(&cache, &mut window, false);
            publish(&mut status, &live, &p);
            if last_log.elapsed() >= Duration::from_secs(10) {
                log_progress(&image, &p, bs.bytes());
                last_log = Instant::now();
            }
            last_status = Instant::now();
        }
        // Guest first: while a guest read waits on the origin, wait too.
        if cache.guest_waiting() > 0 {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(5)) => {}
                _ = stop.wait_for(|s| *s) => break,
            }
            continue;
        }
        while jobs.len() >= JOBS {
            match jobs.join_next().await {
                Some(Ok(Err(e))) if e.kind() == ErrorKind::OriginChanged => return Err(e),
                Some(Ok(Err(e))) => {
                    failures += 1;
                    tracing::warn!(error = %e, "hydration fetch failed; will retry");
                    // Back off; the blocks are still missing and the scan
                    // comes back to them on its next pass.
                    tokio::time::sleep(Duration::from_millis(200 * failures.min(25) as u64)).await;
                }
                Some(Ok(Ok(_))) => failures = 0,
                _ => {}
            }
        }
        let Some((first, n)) = next_missing(&cache, cursor, blocks, per_fetch) else {
            // Reached the end: let fetches finish, then one more pass from
            // the start (failed or evicted blocks), then done.
            while let Some(r) = jobs.join_next().await {
                if let Ok(Err(e)) = r {
                    if e.kind() == ErrorKind::OriginChanged {
                        return Err(e);
                    }
                }
            }
            if wrapped && next_missing(&cache, 0, blocks, 1).is_none() {
                break;
            }
            if wrapped {
                // Still missing after a full pass: origin trouble. Pause.
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = stop.wait_for(|s| *s) => break,
                }
            }
            wrapped = true;
            cursor = 0;
            continue;
        };
        let start = bs.range_of(BlockIndex(first), cache.image_size()).offset;
        let end = bs
            .range_of(BlockIndex(first + n - 1), cache.image_size())
            .end();
        let range = ByteRange {
            offset: start,
            len: end - start,
        };
        if let Some(b) = bucket.as_mut() {
            tokio::select! {
                _ = b.take(range.len) => {}
                _ = stop.wait_for(|s| *s) => break,
            }
        }
        let permit = tokio::select! {
            p = cache.background_permits().clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = stop.wait_for(|s| *s) => break,
        };
        cursor = first + n;
        let c = cache.clone();
        jobs.spawn(async move {
            let _permit = permit;
            c.fetch_background(range, Work::Hydrate).await
        });
    }
    // Stopping: in-flight fetches finish (their blocks are worth keeping).
    while jobs.join_next().await.is_some() {}
    let p = progress(&cache, &mut window, true);
    publish(&mut status, &live, &p);
    status.finish().await;
    if p.complete {
        tracing::info!(%image, elapsed_s = started.elapsed().as_secs(), "hydration complete: the image is fully cached");
        if let Some(d) = cache.origin().content_digest().cloned() {
            let mark = format!("{} {}\n", d.algo, d.hex);
            let checked = complete_at_start
                && std::fs::read_to_string(&verified_file).is_ok_and(|m| m == mark);
            if checked {
                tracing::info!(%image, algo = %d.algo,
                    "the cached image was checked against its published digest before: not hashed again");
            } else if verify(&cache, &d, &image, stop.clone()).await? {
                if let Err(e) = crate::util::write_atomic(&verified_file, mark.as_bytes()) {
                    tracing::warn!(%image, error = %e, "cannot record the digest check: it is made again at the next start");
                }
            }
        }
    } else {
        log_progress(&image, &p, bs.bytes());
    }
    Ok(())
}

/// Read the whole (fully cached) image and check it against the digest its
/// origin publishes: `Ok(true)` when it matches, `Ok(false)` when stopped
/// first. A mismatch is reported as the origin having changed: the bytes
/// are not the image that was published.
async fn verify(
    cache: &ImageCache,
    d: &ContentDigest,
    image: &str,
    stop: watch::Receiver<bool>,
) -> Result<bool> {
    const CHUNK: u64 = 4 << 20;
    let mut h = d.hasher()?;
    let size = cache.image_size();
    let mut off = 0;
    while off < size {
        if *stop.borrow() {
            tracing::info!(%image, "stopping: the digest check of the cached image is left for the next start");
            return Ok(false);
        }
        let r = ByteRange {
            offset: off,
            len: CHUNK.min(size - off),
        };
        // Unobserved: lazybd's own read, not a guest's (boot profiles).
        let data = cache.read_unobserved(r).await?.data;
        // Hashing 4 MiB takes milliseconds: not on a runtime worker.
        h = tokio::task::spawn_blocking(move || {
            h.update(&data);
            h
        })
        .await
        .map_err(|e| Error::with_source(ErrorKind::Io, "digest task", e))?;
        off = r.end();
    }
    match d.check(&h.finish_hex(), image) {
        Ok(()) => {
            tracing::info!(%image, algo = %d.algo, "the fully cached image matches the digest its origin publishes");
            Ok(true)
        }
        Err(e) => {
            tracing::error!(%image, error = %e, "the cached image does not match its published digest");
            Err(e)
        }
    }
}

/// Rate over a sliding window of samples (bytes known, time).
struct RateWindow {
    samples: std::collections::VecDeque<(Instant, u64)>,
}

impl RateWindow {
    fn new() -> Self {
        RateWindow {
            samples: Default::default(),
        }
    }

    fn rate(&mut self, now: Instant, done_bytes: u64) -> u64 {
        self.samples.push_back((now, done_bytes));
        while self.samples.len() > 2
            && now - self.samples.front().expect("non-empty").0 > Duration::from_secs(5)
        {
            self.samples.pop_front();
        }
        let (t0, b0) = *self.samples.front().expect("non-empty");
        let dt = (now - t0).as_secs_f64();
        if dt < 0.5 {
            return 0;
        }
        (done_bytes.saturating_sub(b0) as f64 / dt) as u64
    }
}

fn progress(cache: &ImageCache, w: &mut RateWindow, stopped: bool) -> Progress {
    let (present, zero, total) = cache.counts();
    let done = present + zero;
    let bs = cache.block_size().bytes();
    let rate = w.rate(Instant::now(), done * bs);
    let left = total.saturating_sub(done) * bs;
    Progress {
        done_blocks: done,
        total_blocks: total,
        rate: if stopped { 0 } else { rate },
        eta_secs: (rate > 0 && !stopped).then(|| left / rate),
        complete: done == total,
        updated: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    }
}

fn publish(status: &mut StatusWriter, live: &Live, p: &Progress) {
    live.done_blocks.store(p.done_blocks, Ordering::Relaxed);
    live.total_blocks.store(p.total_blocks, Ordering::Relaxed);
    live.rate.store(p.rate, Ordering::Relaxed);
    if let Ok(json) = serde_json::to_vec(p) {
        status.write(json);
    }
}

/// Writes the status file off the async workers (a slow or stuck disk must
/// not stall them), one write at a time.
struct StatusWriter {
    path: PathBuf,
    /// The write under way, if any.
    pending: Option<JoinHandle<()>>,
    /// The newest status not yet written (a write was under way).
    latest: Option<Vec<u8>>,
}

impl StatusWriter {
    fn new(path: PathBuf) -> Self {
        StatusWriter {
            path,
            pending: None,
            latest: None,
        }
    }

    /// Start writing `json`, unless a write is still under way: then it
    /// waits for the next call (or [`StatusWriter::finish`]).
    fn write(&mut self, json: Vec<u8>) {
        if self.pending.as_ref().is_some_and(|h| !h.is_finished()) {
            self.latest = Some(json);
            return;
        }
        self.latest = None;
        let path = self.path.clone();
        self.pending = Some(tokio::task::spawn_blocking(move || {
            if let Err(e) = write_status(&path, &json) {
                tracing::debug!(error = %e, "cannot write hydration status");
            }
        }));
    }

    /// Wait for the write under way, then write the newest status left.
    async fn finish(&mut self) {
        if let Some(h) = self.pending.take() {
            let _ = h.await;
        }
        if let Some(json) = self.latest.take() {
            self.write(json);
            if let Some(h) = self.pending.take() {
                let _ = h.await;
            }
        }
    }
}

/// Replace the status file: temp file, rename (readers see a whole file),
/// no fsync (see the module doc).
fn write_status(path: &Path, json: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, json)?;
    std::fs::rename(&tmp, path)
}

fn log_progress(image: &str, p: &Progress, bs: u64) {
    let pct = if p.total_blocks > 0 {
        100.0 * p.done_blocks as f64 / p.total_blocks as f64
    } else {
        100.0
    };
    tracing::info!(%image,
        "hydrating: {pct:.1}% ({} of {}), {}/s, ETA {}",
        human_bytes(p.done_blocks * bs),
        human_bytes(p.total_blocks * bs),
        human_bytes(p.rate),
        p.eta_secs.map(|s| format!("{s}s")).unwrap_or_else(|| "unknown".into()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::BlockSize;
    use crate::cache::CacheDir;
    use crate::stats::Stats;

    /// A status write that never ends (the temp file is a FIFO nobody
    /// reads) stalls neither the runtime nor hydration: the write happens
    /// off the runtime's one thread.
    #[test]
    fn a_stuck_status_write_stalls_neither_the_runtime_nor_hydration() {
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::fs::OpenOptionsExt;
        let dir = tempfile::tempdir().unwrap();
        let img: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8 | 1).collect();
        let path = dir.path().join("image.raw");
        std::fs::write(&path, &img).unwrap();
        let stats = Arc::new(Stats::default());
        let origin = Arc::new(crate::origin::FileOrigin::open(&path, stats.clone()).unwrap());
        let cache = CacheDir::new(dir.path().join("cache"))
            .unwrap()
            .open_image(origin, Some(BlockSize::new(64 << 10).unwrap()), stats)
            .unwrap();
        let fifo = cache.dir().join(format!("{STATUS_FILE}.tmp"));
        let c_path = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        let (done_tx, done) = std::sync::mpsc::channel();
        let live = Arc::new(Live::default());
        let (l, c) = (live.clone(), cache.clone());
        let runtime = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let (stop_tx, stop) = watch::channel(false);
                let run = tokio::spawn(run(c.clone(), None, l, stop));
                while c.counts().0 + c.counts().1 < c.counts().2 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                done_tx.send(()).unwrap();
                let _ = stop_tx.send(true);
                run.await.unwrap().unwrap();
            });
        });
        let hydrated = done.recv_timeout(Duration::from_secs(10));
        // Let the stuck writer go: open the FIFO's other end and drain it.
        let reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo);
        if let Ok(mut r) = reader {
            let end = Instant::now() + Duration::from_secs(2);
            let mut buf = [0u8; 4096];
            while Instant::now() < end {
                match std::io::Read::read(&mut r, &mut buf) {
                    Ok(0) if !fifo.exists() => break,
                    _ => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        }
        assert!(
            hydrated.is_ok(),
            "hydration stalled behind a status write on the runtime's thread"
        );
        runtime.join().unwrap();
        assert!(
            live.done_blocks.load(Ordering::Relaxed) == live.total_blocks.load(Ordering::Relaxed)
        );
        let p = Progress::load(cache.dir()).expect("the final status is written");
        assert!(p.complete);
    }

    /// An origin that publishes a digest of its image (as Glance does).
    struct Published {
        file: crate::origin::FileOrigin,
        digest: ContentDigest,
    }

    impl crate::origin::Origin for Published {
        fn identity(&self) -> &crate::origin::OriginIdentity {
            self.file.identity()
        }
        fn read_range(&self, r: ByteRange) -> crate::device::BoxFuture<'_, Result<bytes::Bytes>> {
            self.file.read_range(r)
        }
        fn content_digest(&self) -> Option<&ContentDigest> {
            Some(&self.digest)
        }
    }

    #[test]
    fn a_completed_hydration_checks_the_published_digest() {
        use sha2::{Digest, Sha256};
        let dir = tempfile::tempdir().unwrap();
        let img: Vec<u8> = (0..(1u32 << 20) + 777).map(|i| (i % 253) as u8).collect();
        let path = dir.path().join("image.raw");
        std::fs::write(&path, &img).unwrap();
        let right: String = Sha256::digest(&img)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        for (n, hex) in [right, "00".repeat(32)].into_iter().enumerate() {
            let stats = Arc::new(Stats::default());
            let origin = Arc::new(Published {
                file: crate::origin::FileOrigin::open(&path, stats.clone()).unwrap(),
                digest: ContentDigest {
                    algo: "sha256".into(),
                    hex,
                },
            });
            let cache = CacheDir::new(dir.path().join(format!("cache{n}")))
                .unwrap()
                .open_image(origin, Some(BlockSize::new(64 << 10).unwrap()), stats)
                .unwrap();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let res = rt.block_on(run(
                cache,
                None,
                Arc::new(Live::default()),
                watch::channel(false).1,
            ));
            if n == 0 {
                res.expect("the right digest");
            } else {
                let e = res.expect_err("a wrong digest is reported");
                assert_eq!(e.kind(), ErrorKind::OriginChanged, "{e}");
                assert!(e.to_string().contains("publishes 0000"), "{e}");
            }
        }
    }
}
