//! The persistent, verified block cache in front of an origin.
//!
//! One [`ImageCache`] per origin image, shared by every export of it. Reads
//! are served from the local data file when the block map says present and
//! every 4 KiB page touched passes its CRC; otherwise the missing blocks are
//! fetched from the origin:
//!
//! * single-flight: a block being fetched is in `inflight`; later readers
//!   join that fetch instead of asking the origin again;
//! * coalescing: adjacent missing blocks of one read become one ranged GET
//!   (up to `max_fetch` bytes);
//! * fetches run as their own tasks, so a reader that goes away (client
//!   disconnect) never leaves joiners waiting on a dropped future;
//! * a fetched block is stored, then its CRCs, then it is marked present;
//!   all-zero blocks are recorded as `zero` and not stored;
//! * if storing fails (disk full), the bytes are still served, uncached.
//!
//! Disk I/O never runs on the async workers unless it cannot block: a read
//! tries the page cache first (`RWF_NOWAIT`: the inline fast path and the
//! first pass of the full path); blocks whose bytes would have to come from
//! the disk are read on the blocking pool, where stores of fetched blocks
//! run too.
//!
//! Eviction (see `ImageCache::evict`) never makes readers wait for a
//! punch, never punches bytes a reader is reading, and never punches a
//! block fetched again meanwhile:
//!
//! ```text
//!            demote (CAS, inflight lock)        punched, marker removed
//!  present ---------------------------> evicting ----------------------> missing
//!     ^      + "evicting" marker in        |  readers: the state says      |
//!     |        inflight for the block      |  missing, plan_fetch finds    |
//!     |                                    |  the marker, they wait for it |
//!     |      pins drain: readers that      |  and plan again; nobody can   |
//!     |      saw it present finish first   |  claim a fetch of it          |
//!     +------------------------------------------------------------------+
//!                         fetched and published again
//! ```
//!
//! Readers pin the blocks whose bytes they read (a per-block count) and
//! check the state after pinning; the evictor demotes, then waits for the
//! pins to drain. Fences on both sides make one of them see the other.

pub mod dir;
pub mod verify;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, AtomicBool, AtomicU16, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use tokio::sync::{watch, Semaphore};

use crate::block::{BlockIndex, BlockSize, ByteRange};
use crate::device::{BlockDevice, BoxFuture, Extent, ReadData};
use crate::error::{Error, ErrorKind, Result};
use crate::origin::Origin;
use crate::stats::{Histogram, Stats, Work};
use crate::store::map::BlockState;
use crate::store::BlockStore;

pub use dir::CacheDir;

/// Largest single origin request made by coalescing (bytes).
const DEFAULT_MAX_FETCH: u64 = 4 << 20;

/// Fetches up to this size are stored on the runtime thread that received
/// them: a pwrite of a few pages into the page cache and their CRCs take a
/// few microseconds, less than handing them to the blocking pool and back
/// (two thread wake-ups), which dominated the CPU cost of a cold random
/// read. Larger fetches go to the blocking pool, so a big store (or a disk
/// that throttles writeback) never holds up the other connections.
const INLINE_STORE_MAX: u64 = 64 << 10;

/// Rounds of one read in which blocks failed their CRC before it gives up
/// (each such round refetched them from the origin).
const MAX_CRC_ROUNDS: u32 = 3;

/// Rounds of one read before it gives up on blocks the evictor keeps
/// taking (see `ImageCache::read_impl`): far beyond any real cache, which
/// evicts what was read least recently, not what a read is waiting for.
const MAX_READ_ROUNDS: u32 = 1000;

/// The outcome of one origin fetch: the run's bytes, shared by all joiners,
/// and whether the flight has settled (its blocks are stored, or storing
/// failed). Readers take the bytes as soon as they arrive; the store runs
/// after that, off the reply's path; background work waits for the settle.
type FetchResult = Option<(Result<Bytes>, bool)>;

/// One origin fetch in progress covering blocks `[first, first + count)`,
/// or (`evicting`) the marker of blocks being evicted: it resolves, with no
/// bytes, once they are punched and may be fetched again.
struct Flight {
    first: u64,
    rx: watch::Receiver<FetchResult>,
    evicting: bool,
}

struct Inner {
    origin: Arc<dyn Origin>,
    /// Blocks, their states and CRCs (write-once: one CRC slot).
    store: BlockStore,
    bs: BlockSize,
    size: u64,
    /// Block number -> the fetch that will bring it. Lock held only for map
    /// lookups/updates, never across `.await` or I/O.
    inflight: Mutex<HashMap<u64, Arc<Flight>>>,
    max_fetch: u64,
    /// Blocks of the origin's fetch unit: no fetch crosses a multiple of it
    /// (see `Origin::fetch_unit`).
    fetch_unit_blocks: Option<u64>,
    stats: Arc<Stats>,
    /// Log "cannot store" once, not per block.
    store_warned: AtomicBool,
    /// Log "cannot punch" once, not per eviction.
    punch_warned: AtomicBool,
    /// The file system cannot punch holes: eviction frees nothing, so it
    /// is not tried again (demoting blocks would only cost refetches).
    punch_unsupported: AtomicBool,
    /// When storing last failed (ms since `opened`, 0: not failing). While
    /// stores fail (a full disk), background fetches would only fetch bytes
    /// to throw away, so they wait: see [`ImageCache::storing`].
    store_failed_at: AtomicU64,
    opened: std::time::Instant,
    /// No block was present or zero when the cache was opened.
    opened_empty: bool,
    /// Holds the directory's exclusive flock for the cache's lifetime.
    _lock: File,
    /// Readers of each block's bytes right now (see [`Inner::pin`]): the
    /// evictor punches a block it demoted only once its count is zero.
    pins: Vec<AtomicU16>,
    /// Clock reference bits, one per block, set when a read is served.
    refs: Vec<AtomicU8>,
    /// The clock hand (next block the evictor looks at).
    hand: AtomicU64,
    /// Bytes of present blocks (data held on disk).
    present_bytes: AtomicU64,
    /// The image's cache directory (profile, hydration status live here).
    dir: PathBuf,
    /// Origin requests background work (readahead, profile replay,
    /// hydration) may have in flight together: at most half the origin's
    /// connections, so guest misses always find a free one.
    background: Arc<Semaphore>,
    /// Guest reads waiting for the origin right now; hydration backs off
    /// while any are.
    guest_waiting: AtomicUsize,
    /// Set while a read observer is installed; reads check it before
    /// taking the observer's lock.
    observed: AtomicBool,
    observer: Mutex<Option<Box<dyn ReadObserver>>>,
    /// State the layers above keep once per image rather than per export
    /// (a qcow2 image's decoded tables), by type.
    layers: Mutex<HashMap<std::any::TypeId, LayerCell>>,
}

/// `n` atomics at zero, from zeroed memory: for a 1 TiB image these are
/// 16 M entries per array, and writing each one (as collecting
/// `AtomicU16::new(0)` does) cost 20+ ms of the attach; zeroed pages come
/// from the kernel untouched, and are only faulted in where blocks are used.
fn zeroed_u16s(n: usize) -> Vec<AtomicU16> {
    let mut v = std::mem::ManuallyDrop::new(vec![0u16; n]);
    // SAFETY: AtomicU16 has the same size, alignment and bit validity as
    // u16 (documented), so the allocation of `n` u16 zeroes is one of `n`
    // AtomicU16 zeroes; `v` gives up ownership (ManuallyDrop) so it is
    // freed once, by the new Vec, with the same layout.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<AtomicU16>(), v.len(), v.capacity()) }
}

/// As [`zeroed_u16s`], for bytes.
fn zeroed_u8s(n: usize) -> Vec<AtomicU8> {
    let mut v = std::mem::ManuallyDrop::new(vec![0u8; n]);
    // SAFETY: as in `zeroed_u16s`: AtomicU8 has u8's size, alignment and
    // bit validity, and ownership passes from `v` to the new Vec.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<AtomicU8>(), v.len(), v.capacity()) }
}

/// Sees the guest reads a cache serves, in the order they arrive (a boot
/// profile recorder is one). `note` runs on the read path under a lock:
/// it MUST be cheap and never block. The `Any` views let whoever installed
/// an observer take its own type back (from [`ImageCache::stop_observing`]).
pub(crate) trait ReadObserver: Send + 'static {
    fn note(&mut self, r: ByteRange);
    fn as_any(&self) -> &dyn std::any::Any;
    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any>;
}

/// Background fetches planned by [`ImageCache::start_background`].
pub(crate) struct BackgroundFetch {
    flights: Vec<Arc<Flight>>,
    claimed: u64,
    inner: Arc<Inner>,
    why: Work,
}

impl BackgroundFetch {
    /// Blocks this fetch claimed (0: all of them were cached or already
    /// on their way, fetched by someone else).
    pub(crate) fn claimed_blocks(&self) -> u64 {
        self.claimed
    }

    /// Wait until every block is stored (or its fetch failed); the bytes
    /// this fetch claimed, counted on its kind's counter.
    pub(crate) async fn finish(self) -> Result<u64> {
        for f in &self.flights {
            wait_settled(f).await?;
        }
        let inner = &self.inner;
        let bytes = self.claimed * inner.bs.bytes();
        Stats::add(inner.stats.work_bytes(self.why), bytes);
        Ok(bytes)
    }
}

/// Decrements `guest_waiting` when a guest read stops waiting, however
/// it ends (also when its future is dropped).
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        Waiting(n)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Records how long a guest read waited for the origin when it ends
/// (however it ends): from its first wait for a fetch, if it had one.
struct OriginWait<'a> {
    into: Option<&'a Histogram>,
    since: Option<std::time::Instant>,
}

impl OriginWait<'_> {
    fn begin(&mut self) {
        if self.into.is_some() && self.since.is_none() {
            self.since = Some(std::time::Instant::now());
        }
    }
}

impl Drop for OriginWait<'_> {
    fn drop(&mut self) {
        if let (Some(h), Some(t)) = (self.into, self.since) {
            h.record(t.elapsed());
        }
    }
}

/// One layer's per-image state (see [`ImageCache::shared_layer`]).
type LayerCell = Arc<tokio::sync::OnceCell<Arc<dyn std::any::Any + Send + Sync>>>;

/// A cached view of one origin image. Cheap to clone.
#[derive(Clone)]
pub struct ImageCache {
    inner: Arc<Inner>,
}

/// Where the bytes of a piece of a read come from.
enum Plan {
    /// Already in `out` (served locally, or zero).
    Done,
    /// Needs this flight's result.
    Wait(Arc<Flight>),
}

impl ImageCache {
    /// Build a cache over an opened store. Used by [`CacheDir`].
    fn new(
        origin: Arc<dyn Origin>,
        store: BlockStore,
        stats: Arc<Stats>,
        lock: File,
        dir: PathBuf,
    ) -> Self {
        let g = store.map().geometry();
        let background = (origin.connections() / 2).max(1);
        let blocks = store.map().blocks();
        let (present_blocks, zero_blocks) = store.map().counts();
        let present = present_blocks * g.block_size.bytes();
        let fetch_unit_blocks = origin
            .fetch_unit()
            .map(|u| (u / g.block_size.bytes()).max(1));
        ImageCache {
            inner: Arc::new(Inner {
                pins: zeroed_u16s(blocks as usize),
                refs: zeroed_u8s(blocks as usize),
                hand: AtomicU64::new(0),
                present_bytes: AtomicU64::new(present),
                origin,
                bs: g.block_size,
                size: g.image_size,
                store,
                inflight: Mutex::new(HashMap::new()),
                max_fetch: DEFAULT_MAX_FETCH.max(g.block_size.bytes()),
                fetch_unit_blocks,
                stats,
                store_warned: AtomicBool::new(false),
                punch_warned: AtomicBool::new(false),
                punch_unsupported: AtomicBool::new(false),
                store_failed_at: AtomicU64::new(0),
                opened: std::time::Instant::now(),
                opened_empty: present_blocks + zero_blocks == 0,
                _lock: lock,
                dir,
                background: Arc::new(Semaphore::new(background)),
                guest_waiting: AtomicUsize::new(0),
                observed: AtomicBool::new(false),
                observer: Mutex::new(None),
                layers: Mutex::new(HashMap::new()),
            }),
        }
    }

    pub fn block_size(&self) -> BlockSize {
        self.inner.bs
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.inner.stats
    }

    pub(crate) fn origin(&self) -> &Arc<dyn Origin> {
        &self.inner.origin
    }

    /// The one `T` of this image that the layers above share between its
    /// exports, made by `init` on first use (concurrent first uses wait
    /// for one `init`; a failed one is tried again by the next use). The
    /// cache only keeps it: what `T` is belongs to the layer.
    pub(crate) async fn shared_layer<T, F, Fut>(&self, init: F) -> Result<Arc<T>>
    where
        T: Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let cell = self
            .inner
            .layers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(std::any::TypeId::of::<T>())
            .or_default()
            .clone();
        let v = cell
            .get_or_try_init(|| async {
                init()
                    .await
                    .map(|t| Arc::new(t) as Arc<dyn std::any::Any + Send + Sync>)
            })
            .await?
            .clone();
        Ok(v.downcast::<T>()
            .unwrap_or_else(|_| unreachable!("layer state is keyed by its own type")))
    }

    /// The image's directory in the cache.
    pub(crate) fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Image size in bytes.
    pub(crate) fn image_size(&self) -> u64 {
        self.inner.size
    }

    /// Largest origin request coalescing makes.
    pub(crate) fn max_fetch(&self) -> u64 {
        self.inner.max_fetch
    }

    /// Permits for background origin requests (see `Inner::background`).
    pub(crate) fn background_permits(&self) -> &Arc<Semaphore> {
        &self.inner.background
    }

    /// Guest reads waiting on the origin right now.
    pub(crate) fn guest_waiting(&self) -> usize {
        self.inner.guest_waiting.load(Ordering::Relaxed)
    }

    /// Whether block `b` must still come from the origin.
    pub fn is_missing(&self, b: u64) -> bool {
        self.inner.store.map().state(BlockIndex(b)) == BlockState::Missing
    }

    /// Show every guest read this cache serves to `obs` from now on (it
    /// replaces any observer installed before).
    pub(crate) fn observe_reads(&self, obs: Box<dyn ReadObserver>) {
        *self
            .inner
            .observer
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(obs);
        self.inner.observed.store(true, Ordering::Relaxed);
    }

    /// Look at the observer without removing it.
    pub(crate) fn with_observer<T>(&self, f: impl FnOnce(Option<&dyn ReadObserver>) -> T) -> T {
        f(self
            .inner
            .observer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_deref())
    }

    /// Remove the observer and hand it back.
    pub(crate) fn stop_observing(&self) -> Option<Box<dyn ReadObserver>> {
        self.inner.observed.store(false, Ordering::Relaxed);
        self.inner
            .observer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Show a guest read to the observer, if any.
    #[inline]
    fn observe(&self, r: ByteRange) {
        if self.inner.observed.load(Ordering::Relaxed) {
            if let Some(obs) = self
                .inner
                .observer
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_mut()
            {
                obs.note(r);
            }
        }
    }

    /// Bring the missing blocks of `r` into the cache for background work
    /// (readahead, profile replay, hydration), joining fetches already in
    /// flight, and resolve once they are stored. The caller bounds its own
    /// concurrency (see [`Self::background_permits`]). Returns the bytes
    /// this call fetched itself (blocks it only joined are counted by
    /// whoever started them). While stores fail (a full disk) it fetches
    /// nothing and returns a `NoSpace` error: the bytes could not be kept.
    pub(crate) fn fetch_background(
        &self,
        r: ByteRange,
        why: Work,
    ) -> impl std::future::Future<Output = Result<u64>> + Send + 'static {
        let planned = self.start_background(r, why);
        async move { planned?.finish().await }
    }

    /// The first half of [`Self::fetch_background`]: claim or join the
    /// fetches of the missing blocks of `r` now (so a read of the same
    /// blocks issued next joins them), and tell how many blocks this call
    /// claimed; [`BackgroundFetch::finish`] waits for them.
    pub(crate) fn start_background(&self, r: ByteRange, why: Work) -> Result<BackgroundFetch> {
        if !self.storing() {
            return Err(Error::new(
                ErrorKind::NoSpace,
                "the cache cannot store blocks right now; background fetches wait",
            ));
        }
        let missing: Vec<u64> = self
            .inner
            .bs
            .covering(r)
            .filter(|&b| self.is_missing(b))
            .collect();
        let (plans, claimed) = if missing.is_empty() {
            (Vec::new(), 0)
        } else {
            self.plan_fetch(&missing)
        };
        let mut flights: Vec<Arc<Flight>> = Vec::new();
        for p in plans {
            if let Plan::Wait(f) = p {
                // Blocks being evicted are not brought back: a later pass
                // (hydration's next scan) finds them missing.
                if !f.evicting && !flights.iter().any(|g| Arc::ptr_eq(g, &f)) {
                    flights.push(f);
                }
            }
        }
        Ok(BackgroundFetch {
            flights,
            claimed,
            inner: self.inner.clone(),
            why,
        })
    }

    /// False for a few seconds after storing fetched blocks failed (and
    /// until a store succeeds again). Background work checks it so a full
    /// disk does not turn readahead into origin traffic that is thrown away;
    /// after the pause one background fetch probes again.
    pub(crate) fn storing(&self) -> bool {
        const PAUSE_MS: u64 = 5_000;
        let inner = &self.inner;
        let at = inner.store_failed_at.load(Ordering::Relaxed);
        at == 0 || inner.opened.elapsed().as_millis() as u64 >= at + PAUSE_MS
    }

    /// Whether the cache held no block when this process opened it (a
    /// first start on this host), whatever has arrived since.
    pub(crate) fn opened_empty(&self) -> bool {
        self.inner.opened_empty
    }

    /// (present, zero, total) blocks.
    pub fn counts(&self) -> (u64, u64, u64) {
        let map = self.inner.store.map();
        let (p, z) = map.counts();
        (p, z, map.blocks())
    }

    /// Bytes of block data held on disk (counted in whole blocks).
    pub fn present_bytes(&self) -> u64 {
        self.inner.present_bytes.load(Ordering::Relaxed)
    }

    /// Evict up to `want` bytes of present blocks, least recently used first
    /// (a clock over the block map: a block read since the hand last passed
    /// gets a second chance). Zero blocks cost nothing and stay. Blocking
    /// (waits for readers of its victims, punches holes), but holds nothing
    /// readers wait on while it does; returns the bytes freed.
    ///
    /// A hole that cannot be punched leaves its block cached (its bytes and
    /// CRCs are untouched, or caught by the CRCs if partly zeroed), is
    /// counted in `punch_failures`, logged once, and ends this call; on a
    /// file system without hole punching, eviction stops for good.
    pub(crate) fn evict(&self, want: u64) -> u64 {
        self.evict_with(want, |store, r| store.try_punch(r))
    }

    /// Whether eviction can free space here (false once the file system
    /// turned out unable to punch holes).
    pub(crate) fn can_evict(&self) -> bool {
        !self.inner.punch_unsupported.load(Ordering::Relaxed)
    }

    /// [`Self::evict`] with the punch given (tests slow it down or fail it).
    fn evict_with(
        &self,
        want: u64,
        mut punch: impl FnMut(&BlockStore, ByteRange) -> Result<()>,
    ) -> u64 {
        const BATCH: usize = 64;
        let inner = &self.inner;
        let blocks = inner.store.map().blocks();
        if blocks == 0 || !self.can_evict() {
            return 0;
        }
        let mut failed = false;
        let mut freed = 0;
        let mut looked = 0u64;
        // Two turns of the clock: the first may only clear reference bits.
        while freed < want && looked < 2 * blocks && !failed {
            let mut victims = Vec::with_capacity(BATCH);
            while victims.len() < BATCH && looked < 2 * blocks {
                let b = inner.hand.fetch_add(1, Ordering::Relaxed) % blocks;
                looked += 1;
                if inner.store.state(b) != BlockState::Present {
                    continue;
                }
                if inner.refs[b as usize].swap(0, Ordering::Relaxed) == 1 {
                    continue;
                }
                victims.push(b);
                if freed + victims.len() as u64 * inner.bs.bytes() >= want {
                    break;
                }
            }
            if victims.is_empty() {
                continue;
            }
            // Demote, and park an "evicting" marker in `inflight` for each
            // victim: from here until the marker goes, readers of these
            // blocks wait for it and nobody can fetch and publish one again
            // (a punch landing after that would destroy fresh data).
            let (tx, rx) = watch::channel(None);
            let marker = Arc::new(Flight {
                first: victims[0],
                rx,
                evicting: true,
            });
            let mut demoted = Vec::with_capacity(victims.len());
            {
                let mut inflight = inner.inflight.lock().unwrap_or_else(|p| p.into_inner());
                for b in victims {
                    // Still in `inflight`: its fetch is publishing it. Leave it.
                    if !inflight.contains_key(&b)
                        && inner.store.map().transition(
                            BlockIndex(b),
                            BlockState::Present,
                            BlockState::Missing,
                        )
                    {
                        inflight.insert(b, marker.clone());
                        demoted.push(b);
                    }
                }
            }
            // Pairs with the fence in `Inner::pin`: a reader either sees the
            // demotion or has its pin seen here.
            fence(Ordering::SeqCst);
            // Reads that found these blocks present before the demotion
            // finish first (they are short: one pread each).
            for &b in &demoted {
                wait_unpinned(&inner.pins[b as usize]);
            }
            // One punch per run of adjacent victims (the clock hand takes
            // them in order): small blocks would otherwise cost a system
            // call and an extent split each.
            for run in demoted.chunk_by(|a, b| a + 1 == *b) {
                let (first, last) = (run[0], run[run.len() - 1]);
                let res = if failed {
                    Ok(()) // not tried: restored below
                } else {
                    let (a, z) = (
                        inner.store.block_range(first),
                        inner.store.block_range(last),
                    );
                    punch(
                        &inner.store,
                        ByteRange {
                            offset: a.offset,
                            len: z.end() - a.offset,
                        },
                    )
                };
                if let Err(e) = &res {
                    failed = true;
                    self.punch_failed(e);
                }
                if failed {
                    // Back to present: nothing wrote the blocks while their
                    // marker was up, so their bytes and CRCs still agree (a
                    // partial punch fails the CRC and is refetched).
                    for &b in run {
                        inner.store.map().transition(
                            BlockIndex(b),
                            BlockState::Missing,
                            BlockState::Present,
                        );
                    }
                    continue;
                }
                let bytes = run.len() as u64 * inner.bs.bytes();
                inner.present_bytes.fetch_sub(bytes, Ordering::Relaxed);
                Stats::add(&inner.stats.evictions, run.len() as u64);
                freed += bytes;
            }
            {
                let mut inflight = inner.inflight.lock().unwrap_or_else(|p| p.into_inner());
                for b in &demoted {
                    if inflight.get(b).is_some_and(|f| Arc::ptr_eq(f, &marker)) {
                        inflight.remove(b);
                    }
                }
            }
            // Waiting readers plan again: the blocks are missing now.
            let _ = tx.send(Some((Ok(Bytes::new()), true)));
        }
        freed
    }

    /// Count and report a failed punch (once per cache).
    fn punch_failed(&self, e: &Error) {
        let inner = &self.inner;
        Stats::add(&inner.stats.punch_failures, 1);
        let unsupported = e.kind() == ErrorKind::Unsupported;
        if unsupported {
            inner.punch_unsupported.store(true, Ordering::Relaxed);
        }
        if !inner.punch_warned.swap(true, Ordering::Relaxed) {
            let why = if unsupported {
                "its file system cannot punch holes; eviction is off for this image"
            } else {
                "eviction will try again"
            };
            tracing::warn!(
                error = %e,
                "cannot punch holes in the cache data file in {}: --cache-size cannot be enforced \
                 (the blocks stay cached; {why})",
                inner.dir.display()
            );
        }
    }

    /// Persist metadata and data (shutdown, FLUSH).
    pub(crate) fn sync(&self) -> Result<()> {
        self.inner.store.sync()
    }

    /// Serve `r` now if every block is local (present or zero) and
    /// verifies; `None` sends the caller to the full read path.
    fn read_local_now(&self, r: ByteRange) -> Option<Result<ReadData>> {
        let inner = &self.inner;
        self.observe(r);
        let blocks = inner.bs.covering(r);
        let map = inner.store.map();
        if blocks
            .clone()
            .any(|b| map.state(BlockIndex(b)) == BlockState::Missing)
        {
            return None;
        }
        let todo: Vec<u64> = blocks.collect();
        let mut out = BytesMut::zeroed(r.len as usize);
        let mut zero = Vec::new();
        match inner.local_pass(r, &todo, &mut out, &mut zero, true) {
            Err(e) => Some(Err(e)),
            // Demoted meanwhile (CRC, eviction): the full path refetches.
            // Not in the page cache: the full path reads it off the workers.
            Ok(pass) if !pass.need.is_empty() || !pass.blocked.is_empty() => None,
            Ok(pass) => {
                Stats::add(&inner.stats.hits, pass.local);
                merge_ranges(&mut zero);
                Some(Ok(ReadData {
                    data: out.freeze(),
                    zero,
                }))
            }
        }
    }

    /// A read by lazybd itself, not on a guest's behalf (the probe of an
    /// image's format): served and cached like any read, but not shown to
    /// the read observer, so a boot profile holds only what guests read.
    pub(crate) async fn read_unobserved(&self, r: ByteRange) -> Result<ReadData> {
        self.read_impl(r, false).await
    }

    async fn read_impl(&self, r: ByteRange, observed: bool) -> Result<ReadData> {
        let inner = &self.inner;
        let mut out = BytesMut::zeroed(r.len as usize);
        let mut zero = Vec::new();
        if r.is_empty() {
            return Ok(ReadData {
                data: out.freeze(),
                zero,
            });
        }
        if observed {
            self.observe(r);
        }
        let blocks = inner.bs.covering(r);
        let _waiting = Waiting::new(&inner.guest_waiting);
        let mut clock = OriginWait {
            into: observed.then_some(&inner.stats.guest_wait),
            since: None,
        };
        if let Some(data) = self.cold_read(r, blocks.clone(), &mut clock).await? {
            return Ok(ReadData { data, zero });
        }
        // Blocks of this read not yet in `out`.
        let mut todo: Vec<u64> = blocks.clone().collect();
        // Rounds in which a block failed its CRC: a refetch or two settles
        // a damaged block; failing again after that means real trouble
        // (the disk returns bad bytes, or the origin changes under us).
        let mut crc_rounds = 0;
        // A block can also be evicted between planning and reading, or
        // published by another reader's fetch and evicted again before this
        // round reads it. Such a round is not a failure and does not spin
        // (it waited for an eviction or a fetch), but the evictor could in
        // principle keep winning; a cache that small is reported, not
        // looped on forever.
        for _round in 0..MAX_READ_ROUNDS {
            let mut pass = inner.local_pass(r, &todo, &mut out, &mut zero, true)?;
            if !pass.blocked.is_empty() {
                // The disk reads go to the blocking pool, `out` with them.
                let (inner2, blocked) = (inner.clone(), std::mem::take(&mut pass.blocked));
                let mut buf = std::mem::take(&mut out);
                let (buf, z, slow) = tokio::task::spawn_blocking(move || {
                    let mut z = Vec::new();
                    let slow = inner2.local_pass(r, &blocked, &mut buf, &mut z, false);
                    (buf, z, slow)
                })
                .await
                .map_err(|e| Error::with_source(ErrorKind::Io, "cache read task", e))?;
                out = buf;
                zero.extend(z);
                let slow = slow?;
                pass.local += slow.local;
                pass.failed += slow.failed;
                pass.need.extend(slow.need);
                // Ascending, so that planning coalesces adjacent blocks.
                pass.need.sort_unstable();
            }
            Stats::add(&inner.stats.hits, pass.local);
            if pass.failed > 0 {
                crc_rounds += 1;
                if crc_rounds > MAX_CRC_ROUNDS {
                    return Err(Error::new(
                        ErrorKind::Corrupt,
                        format!("read {r}: blocks keep failing their checksum after refetch"),
                    ));
                }
            }
            let need = pass.need;
            if need.is_empty() {
                merge_ranges(&mut zero);
                return Ok(ReadData {
                    data: out.freeze(),
                    zero,
                });
            }
            Stats::add(&inner.stats.misses, need.len() as u64);
            let (plans, _) = self.plan_fetch(&need);
            todo.clear();
            for (b, plan) in need.iter().zip(plans) {
                match plan {
                    Plan::Done => todo.push(*b),
                    Plan::Wait(f) => {
                        clock.begin();
                        let bytes = wait(&f).await?;
                        if f.evicting {
                            // Punched now: the next round fetches it.
                            todo.push(*b);
                        } else {
                            inner.copy_from_flight(r, *b, &f, &bytes, &mut out);
                        }
                    }
                }
            }
            if todo.is_empty() {
                merge_ranges(&mut zero);
                return Ok(ReadData {
                    data: out.freeze(),
                    zero,
                });
            }
        }
        Err(Error::new(
            ErrorKind::Io,
            format!(
                "read {r}: its blocks were evicted {MAX_READ_ROUNDS} times while it ran; \
                 the cache is too small for the working set (raise --cache-size)"
            ),
        ))
    }

    /// Cold sequential fast path: when every block of `r` is missing and one
    /// flight brings them all, hand out a slice of the fetched bytes instead
    /// of copying them into a fresh buffer. `None`: take the general path
    /// (any flight started here is joined there, nothing is fetched twice).
    async fn cold_read(
        &self,
        r: ByteRange,
        blocks: std::ops::Range<u64>,
        clock: &mut OriginWait<'_>,
    ) -> Result<Option<Bytes>> {
        let inner = &self.inner;
        if blocks
            .clone()
            .any(|b| inner.store.map().state(BlockIndex(b)) != BlockState::Missing)
        {
            return Ok(None);
        }
        let need: Vec<u64> = blocks.collect();
        let (plans, _) = self.plan_fetch(&need);
        let Some(Plan::Wait(f)) = plans.first() else {
            return Ok(None);
        };
        if f.evicting
            || !plans
                .iter()
                .all(|p| matches!(p, Plan::Wait(g) if Arc::ptr_eq(f, g)))
        {
            return Ok(None);
        }
        Stats::add(&inner.stats.misses, need.len() as u64);
        clock.begin();
        let bytes = wait(f).await?;
        let start = (r.offset - f.first * inner.bs.bytes()) as usize;
        let part = start..start + r.len as usize;
        // A slice keeps the whole fetch buffer (up to `max_fetch`, e.g. a
        // readahead this read joined) alive for as long as the reply waits
        // to be sent, while the reply budget counts only `r.len`. Below a
        // quarter of the buffer the copy is cheap next to what it frees.
        if (r.len as usize) < bytes.len() / 4 {
            return Ok(Some(Bytes::copy_from_slice(&bytes[part])));
        }
        Ok(Some(bytes.slice(part)))
    }

    /// For each needed block: join its flight, start a new one (coalescing
    /// adjacent claims), or report it became available meanwhile (`Done`:
    /// the caller reads it locally in its next round). Also returns how
    /// many blocks this call claimed (new flights it started).
    fn plan_fetch(&self, need: &[u64]) -> (Vec<Plan>, u64) {
        let inner = &self.inner;
        let mut plans: Vec<Option<Plan>> = Vec::with_capacity(need.len());
        let mut claims: Vec<(usize, u64)> = Vec::new(); // (index in need, block)
        {
            let mut inflight = inner.inflight.lock().unwrap_or_else(|p| p.into_inner());
            for (i, &b) in need.iter().enumerate() {
                if let Some(f) = inflight.get(&b) {
                    plans.push(Some(Plan::Wait(f.clone())));
                } else if inner.store.map().state(BlockIndex(b)) != BlockState::Missing {
                    plans.push(Some(Plan::Done));
                } else {
                    plans.push(None);
                    claims.push((i, b));
                }
            }
            // Group claims into runs of adjacent blocks, each at most max_fetch.
            let per_run = (inner.max_fetch / inner.bs.bytes()).max(1);
            let mut k = 0;
            while k < claims.len() {
                let first = claims[k].1;
                let mut n = 1;
                while k + (n as usize) < claims.len()
                    && claims[k + n as usize].1 == first + n
                    && n < per_run
                    && !inner
                        .fetch_unit_blocks
                        .is_some_and(|u| (first + n) % u == 0)
                {
                    n += 1;
                }
                let flight = self.start_fetch(first, n);
                for c in &claims[k..k + n as usize] {
                    inflight.insert(c.1, flight.clone());
                    plans[c.0] = Some(Plan::Wait(flight.clone()));
                }
                k += n as usize;
            }
        }
        let plans = plans.into_iter().map(|p| p.unwrap_or(Plan::Done)).collect();
        (plans, claims.len() as u64)
    }

    /// Spawn the fetch of blocks `[first, first + count)`. The caller holds
    /// the inflight lock and inserts the flight for each block; the task
    /// removes them only after the blocks are stored, so a reader always
    /// finds a block either in flight or in its final state.
    fn start_fetch(&self, first: u64, count: u64) -> Arc<Flight> {
        let (tx, rx) = watch::channel(None);
        let flight = Arc::new(Flight {
            first,
            rx,
            evicting: false,
        });
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let start = inner.bs.range_of(BlockIndex(first), inner.size).offset;
            let end = inner
                .bs
                .range_of(BlockIndex(first + count - 1), inner.size)
                .end();
            let range = ByteRange {
                offset: start,
                len: end - start,
            };
            let res = inner.origin.read_range(range).await;
            // The bytes go to the readers now: they need not wait for the
            // store. The blocks stay in flight until it is done, so a later
            // reader still joins this flight (its bytes are there at once).
            let _ = tx.send(Some((res.clone(), false)));
            match &res {
                Ok(bytes) => {
                    let stored = if bytes.len() as u64 <= INLINE_STORE_MAX {
                        Ok(inner.store(first, bytes))
                    } else {
                        let (inner2, bytes2) = (inner.clone(), bytes.clone());
                        tokio::task::spawn_blocking(move || inner2.store(first, &bytes2)).await
                    };
                    if let Ok(Err(e)) | Err(e) =
                        stored.map_err(|e| Error::with_source(ErrorKind::Io, "cache store task", e))
                    {
                        Stats::add(&inner.stats.store_failures, count);
                        let now = inner.opened.elapsed().as_millis() as u64;
                        inner.store_failed_at.store(now.max(1), Ordering::Relaxed);
                        if !inner.store_warned.swap(true, Ordering::Relaxed) {
                            tracing::warn!(error = %e, "cannot store fetched blocks in the cache; serving them uncached");
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, first_block = first, blocks = count, "origin fetch failed");
                }
            }
            {
                let mut inflight = inner.inflight.lock().unwrap_or_else(|p| p.into_inner());
                for b in first..first + count {
                    inflight.remove(&b);
                }
            }
            tx.send_modify(|v| {
                if let Some((_, settled)) = v {
                    *settled = true;
                }
            });
        });
        flight
    }

    fn prefetch_impl(&self, r: ByteRange) {
        let inner = &self.inner;
        let missing: Vec<u64> = inner
            .bs
            .covering(r)
            .filter(|&b| inner.store.map().state(BlockIndex(b)) == BlockState::Missing)
            .collect();
        if !missing.is_empty() {
            // Starting the flights is the whole job; nobody waits on them.
            let _ = self.plan_fetch(&missing);
        }
    }

    fn extents_impl(&self, r: ByteRange) -> Vec<Extent> {
        let inner = &self.inner;
        let mut out: Vec<Extent> = Vec::new();
        for (b, piece) in inner.bs.split(r, inner.size) {
            let zero = inner.store.map().state(b) == BlockState::Zero;
            match out.last_mut() {
                Some(last) if last.zero == zero => last.len += piece.len,
                _ => out.push(Extent {
                    len: piece.len,
                    zero,
                }),
            }
        }
        out
    }
}

/// What one [`Inner::local_pass`] found.
#[derive(Default)]
struct Pass {
    /// Blocks served locally (present and verified, or zero).
    local: u64,
    /// Blocks that must come from the origin: missing, or demoted because
    /// they failed their CRC or were evicted.
    need: Vec<u64>,
    /// Of `need`, the blocks that failed their CRC in this pass.
    failed: u64,
    /// Present blocks not read because their bytes are not in the page
    /// cache (only with `nowait`): read them on the blocking pool.
    blocked: Vec<u64>,
}

/// Blocks pinned for reading (see [`Inner::pin`]); unpinned on drop.
struct Pinned<'a> {
    pins: &'a [AtomicU16],
    blocks: std::ops::Range<u64>,
}

impl Drop for Pinned<'_> {
    fn drop(&mut self) {
        for b in self.blocks.clone() {
            // Release: the read is done before the evictor sees zero.
            self.pins[b as usize].fetch_sub(1, Ordering::Release);
        }
    }
}

/// Wait until no reader has `pin`'s block pinned. Pins are held for one
/// pread, so this spins briefly, then yields, then sleeps.
fn wait_unpinned(pin: &AtomicU16) {
    let mut tries = 0u32;
    while pin.load(Ordering::Acquire) != 0 {
        tries += 1;
        if tries < 100 {
            std::hint::spin_loop();
        } else if tries < 200 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
    }
}

impl Inner {
    /// Pin `blocks` before reading their bytes; the caller MUST check their
    /// states after this returns and read only blocks still present. While
    /// pinned, a block the evictor demotes is not punched.
    fn pin(&self, blocks: std::ops::Range<u64>) -> Pinned<'_> {
        for b in blocks.clone() {
            self.pins[b as usize].fetch_add(1, Ordering::Relaxed);
        }
        // Pairs with the fence in `evict_with` (store-load on both sides:
        // pin then load state here, demote then load pins there).
        fence(Ordering::SeqCst);
        Pinned {
            pins: &self.pins,
            blocks,
        }
    }

    /// One pass over the blocks `todo` (ascending) of read `r`: serve the
    /// local ones into `out` (which holds `r`) and `zero`, and tell which
    /// must come from the origin. With `nowait` it reads only from the page
    /// cache (it may then run on an async worker) and reports the rest as
    /// `blocked`; without, it blocks on disk reads (blocking pool only).
    fn local_pass(
        &self,
        r: ByteRange,
        todo: &[u64],
        out: &mut [u8],
        zero: &mut Vec<ByteRange>,
        nowait: bool,
    ) -> Result<Pass> {
        let map = self.store.map();
        let mut pass = Pass::default();
        let mut i = 0;
        while i < todo.len() {
            let b = todo[i];
            // A run of consecutive blocks in one state: one pread.
            let st = map.state(BlockIndex(b));
            let mut j = i + 1;
            while j < todo.len()
                && todo[j] == todo[j - 1] + 1
                && map.state(BlockIndex(todo[j])) == st
            {
                j += 1;
            }
            let end = todo[j - 1] + 1;
            match st {
                BlockState::Present => {
                    let _pinned = self.pin(b..end);
                    // Looked at unpinned: read what is still present now.
                    let e = (b..end)
                        .find(|&k| map.state(BlockIndex(k)) != BlockState::Present)
                        .unwrap_or(end);
                    if e == b {
                        continue; // demoted meanwhile: look again
                    }
                    i += (e - b) as usize;
                    let Some(bad) = self.read_local(r, b, e, out, nowait)? else {
                        pass.blocked.extend(b..e);
                        continue;
                    };
                    for k in b..e {
                        self.refs[k as usize].store(1, Ordering::Relaxed);
                    }
                    pass.local += e - b - bad.len() as u64;
                    pass.failed += bad.len() as u64;
                    pass.need.extend(bad);
                }
                BlockState::Zero => {
                    let zr = ByteRange {
                        offset: b * self.bs.bytes(),
                        len: (end - b) * self.bs.bytes(),
                    };
                    if let Some(z) = zr.intersect(&r) {
                        // `out` may hold bytes of a round that found the
                        // block present before it was refetched as zero.
                        let s = (z.offset - r.offset) as usize;
                        out[s..s + z.len as usize].fill(0);
                        zero.push(z);
                    }
                    pass.local += (j - i) as u64;
                    i = j;
                }
                BlockState::Missing => {
                    pass.need.extend_from_slice(&todo[i..j]);
                    i = j;
                }
            }
        }
        Ok(pass)
    }

    /// Read present blocks `[b0, b1)`'s part of `r` into `out`, verifying
    /// every page touched. Returns the blocks that failed verification
    /// (already marked missing, so they will be refetched); `None` if
    /// `nowait` and the bytes are not all in the page cache.
    fn read_local(
        &self,
        r: ByteRange,
        b0: u64,
        b1: u64,
        out: &mut [u8],
        nowait: bool,
    ) -> Result<Option<Vec<u64>>> {
        let bad = if nowait {
            match self.store.read_verified_now(r, b0, b1, out)? {
                Some(bad) => bad,
                None => return Ok(None),
            }
        } else {
            self.store.read_verified(r, b0, b1, out)?
        };
        for &b in &bad {
            if self
                .store
                .map()
                .transition(BlockIndex(b), BlockState::Present, BlockState::Missing)
            {
                // Its bytes no longer count: the refetch adds them again.
                self.present_bytes
                    .fetch_sub(self.bs.bytes(), Ordering::Relaxed);
                Stats::add(&self.stats.crc_failures, 1);
                tracing::warn!(
                    block = b,
                    "cache block failed its CRC check; refetching from origin"
                );
            }
        }
        Ok(Some(bad))
    }

    /// Copy block `b`'s part of `r` from a completed flight into `out`.
    fn copy_from_flight(&self, r: ByteRange, b: u64, f: &Flight, bytes: &Bytes, out: &mut [u8]) {
        let br = self.bs.range_of(BlockIndex(b), self.size);
        let flight_start = f.first * self.bs.bytes();
        if let Some(piece) = br.intersect(&r) {
            let src = (piece.offset - flight_start) as usize;
            let dst = (piece.offset - r.offset) as usize;
            out[dst..dst + piece.len as usize]
                .copy_from_slice(&bytes[src..src + piece.len as usize]);
        }
    }

    /// Store fetched blocks (data, then CRCs, then state: see store.rs).
    /// Blocking; runs on the blocking pool.
    fn store(&self, first: u64, bytes: &Bytes) -> Result<()> {
        let c = self.store.publish_blocks(first, bytes)?;
        self.store_failed_at.store(0, Ordering::Relaxed);
        Stats::add(&self.stats.zero_blocks, c.zero);
        self.present_bytes
            .fetch_add(c.present * self.bs.bytes(), Ordering::Relaxed);
        Ok(())
    }
}

/// The flight's bytes, as soon as they arrive.
async fn wait(f: &Flight) -> Result<Bytes> {
    wait_for(f, false).await
}

/// The flight's bytes once its blocks are stored (or storing failed).
async fn wait_settled(f: &Flight) -> Result<Bytes> {
    wait_for(f, true).await
}

async fn wait_for(f: &Flight, settled: bool) -> Result<Bytes> {
    let mut rx = f.rx.clone();
    let r = rx
        .wait_for(|v| v.as_ref().is_some_and(|(_, s)| *s || !settled))
        .await
        .map_err(|_| Error::new(ErrorKind::Io, "origin fetch task ended without a result"))?;
    match &*r {
        Some((Ok(b), _)) => Ok(b.clone()),
        Some((Err(e), _)) => Err(e.clone()),
        None => Err(Error::new(ErrorKind::Io, "origin fetch has no result")),
    }
}

/// Sort and merge adjacent zero ranges (the merge is `block::merge_adjacent`).
fn merge_ranges(v: &mut Vec<ByteRange>) {
    v.sort_by_key(|r| r.offset);
    *v = crate::block::merge_adjacent(std::mem::take(v));
}

impl BlockDevice for ImageCache {
    fn size(&self) -> u64 {
        self.inner.size
    }

    fn read(&self, r: ByteRange) -> BoxFuture<'_, Result<ReadData>> {
        Box::pin(self.read_impl(r, true))
    }

    fn extents(&self, r: ByteRange) -> Result<Vec<Extent>> {
        Ok(self.extents_impl(r))
    }

    fn prefetch(&self, r: ByteRange) {
        self.prefetch_impl(r)
    }

    fn read_now(&self, r: ByteRange) -> Option<Result<ReadData>> {
        if r.is_empty() {
            return None;
        }
        self.read_local_now(r)
    }

    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        // A read-only cache has nothing a client wrote; FLUSH is a no-op
        // (cache durability is not a client promise).
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    const BS: u64 = 64 << 10;
    const MIB: u64 = 1 << 20;

    /// An in-memory origin. Every answer is a fresh allocation whose
    /// address is recorded (so tests can tell what a reply points into);
    /// with `gate` closed, reads wait until permits are added.
    struct MemOrigin {
        data: Vec<u8>,
        identity: crate::origin::OriginIdentity,
        gate: Option<Semaphore>,
        requests: AtomicU64,
        /// (address, length) of every buffer handed out.
        buffers: Mutex<Vec<(usize, usize)>>,
    }

    impl MemOrigin {
        fn new(data: Vec<u8>, gated: bool) -> Arc<MemOrigin> {
            Arc::new(MemOrigin {
                identity: crate::origin::OriginIdentity {
                    locator: "mem://image".into(),
                    size: data.len() as u64,
                    validator: Some("v1".into()),
                },
                data,
                gate: gated.then(|| Semaphore::new(0)),
                requests: AtomicU64::new(0),
                buffers: Mutex::new(Vec::new()),
            })
        }

        fn open(&self) {
            if let Some(g) = &self.gate {
                g.add_permits(Semaphore::MAX_PERMITS / 2);
            }
        }

        /// Whether `p` points into a buffer this origin handed out.
        fn owns(&self, p: *const u8) -> bool {
            let p = p as usize;
            self.buffers
                .lock()
                .unwrap()
                .iter()
                .any(|&(a, n)| p >= a && p < a + n)
        }
    }

    impl Origin for MemOrigin {
        fn identity(&self) -> &crate::origin::OriginIdentity {
            &self.identity
        }

        fn read_range(&self, r: ByteRange) -> BoxFuture<'_, Result<Bytes>> {
            Box::pin(async move {
                if let Some(g) = &self.gate {
                    let _p = g.acquire().await.unwrap();
                }
                self.requests.fetch_add(1, Ordering::SeqCst);
                let v = self.data[r.offset as usize..r.end() as usize].to_vec();
                self.buffers
                    .lock()
                    .unwrap()
                    .push((v.as_ptr() as usize, v.len()));
                Ok(Bytes::from(v))
            })
        }
    }

    /// Pseudo-random bytes without a zero block.
    fn image(len: u64) -> Vec<u8> {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x as u8) | 1
            })
            .collect()
    }

    fn open(origin: Arc<MemOrigin>) -> (tempfile::TempDir, ImageCache) {
        let dir = tempfile::tempdir().unwrap();
        let cache = CacheDir::new(dir.path())
            .unwrap()
            .open_image(
                origin,
                Some(BlockSize::new(BS).unwrap()),
                Arc::new(Stats::default()),
            )
            .unwrap();
        (dir, cache)
    }

    /// Wait until every fetch has stored its blocks: a read returns as
    /// soon as its bytes arrive, before they are stored.
    async fn settled(cache: &ImageCache) {
        while !cache.inner.inflight.lock().unwrap().is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }

    fn range(offset: u64, len: u64) -> ByteRange {
        ByteRange { offset, len }
    }

    /// Overwrite a few bytes of the cache's data file.
    fn damage(cache: &ImageCache, at: u64) {
        use std::os::unix::fs::FileExt;
        std::fs::OpenOptions::new()
            .write(true)
            .open(cache.dir().join("data"))
            .unwrap()
            .write_all_at(b"garbage!", at)
            .unwrap();
    }

    /// `present_bytes` is what the map holds as present, in whole blocks.
    fn accounted(cache: &ImageCache) -> bool {
        cache.present_bytes() == cache.counts().0 * BS
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_block_failing_its_crc_leaves_present_bytes() {
        let img = image(MIB);
        let origin = MemOrigin::new(img.clone(), false);
        let (_dir, cache) = open(origin.clone());
        assert!(cache.read(range(0, MIB)).await.unwrap().data == img);
        settled(&cache).await;
        assert_eq!(cache.present_bytes(), MIB);
        damage(&cache, 3 * BS + 5000);
        // The inline path finds the damage, demotes the block and gives up.
        assert!(cache.read_now(range(3 * BS, 8192)).is_none());
        assert_eq!(cache.counts().0, 15);
        assert!(accounted(&cache), "{} bytes", cache.present_bytes());
        // The full path refetches it.
        let r = cache.read(range(3 * BS, 8192)).await.unwrap();
        assert!(r.data == img[3 * BS as usize..3 * BS as usize + 8192]);
        settled(&cache).await;
        assert_eq!(cache.present_bytes(), MIB);
        // Same through the full path alone.
        damage(&cache, 7 * BS + 100);
        let r = cache.read(range(7 * BS, 4096)).await.unwrap();
        assert!(r.data == img[7 * BS as usize..7 * BS as usize + 4096]);
        settled(&cache).await;
        assert!(accounted(&cache), "{} bytes", cache.present_bytes());
        assert_eq!(cache.present_bytes(), MIB);
        assert_eq!(Stats::get(&cache.stats().crc_failures), 2);
    }

    /// A small read that joins a large fetch (readahead's 4 MiB) gets its
    /// own copy: a reply slice would keep the whole fetch buffer alive
    /// while the reply budget counts only the slice. A large read keeps the
    /// zero-copy slice.
    #[tokio::test(flavor = "current_thread")]
    async fn a_small_read_joining_a_large_fetch_does_not_pin_its_buffer() {
        let img = image(8 * MIB);
        let origin = MemOrigin::new(img.clone(), true);
        let (_dir, cache) = open(origin.clone());
        let fetch = cache
            .start_background(range(0, 4 * MIB), Work::Readahead)
            .unwrap();
        assert_eq!(fetch.claimed_blocks(), 64);
        let spawn_read = |r: ByteRange| {
            let c = cache.clone();
            tokio::spawn(async move { c.read(r).await })
        };
        let small = spawn_read(range(8192, 4096));
        let large = spawn_read(range(MIB, 2 * MIB));
        // Both reads are planned (joined the fetch) before it answers.
        while cache.guest_waiting() < 2 {
            tokio::task::yield_now().await;
        }
        origin.open();
        let small = small.await.unwrap().unwrap().data;
        let large = large.await.unwrap().unwrap().data;
        fetch.finish().await.unwrap();
        assert_eq!(origin.requests.load(Ordering::SeqCst), 1);
        assert!(small == img[8192..12288]);
        assert!(large == img[MIB as usize..3 * MIB as usize]);
        assert!(
            !origin.owns(small.as_ptr()),
            "a 4 KiB reply points into the 4 MiB fetch buffer"
        );
        assert!(origin.owns(large.as_ptr()), "a 2 MiB reply is a slice");
        // What the reply holds is what the budget counts.
        let own = small.try_into_mut().expect("the reply owns its bytes");
        assert_eq!(own.capacity(), 4096);
    }

    /// Clear every reference bit and put the clock hand on block `b`: the
    /// next eviction takes `b` first.
    fn aim(cache: &ImageCache, b: u64) {
        for r in &cache.inner.refs {
            r.store(0, Ordering::Relaxed);
        }
        cache.inner.hand.store(b, Ordering::Relaxed);
    }

    /// Evict one block (the one `aim`ed at) on a thread of its own, with a
    /// punch that waits to be let go. Returns (the range being punched, as
    /// soon as the punch is reached; the go signal; the evictor).
    fn held_eviction(
        cache: &ImageCache,
    ) -> (
        std::sync::mpsc::Receiver<ByteRange>,
        std::sync::mpsc::Sender<()>,
        std::thread::JoinHandle<u64>,
    ) {
        let (at_tx, at) = std::sync::mpsc::channel();
        let (go, go_rx) = std::sync::mpsc::channel::<()>();
        let c = cache.clone();
        let evictor = std::thread::spawn(move || {
            c.evict_with(BS, |store, r| {
                at_tx.send(r).unwrap();
                go_rx.recv().unwrap();
                store.try_punch(r)
            })
        });
        (at, go, evictor)
    }

    /// The evictor punches without holding anything readers wait on: while
    /// a punch is held up, other blocks are read as usual. A read of the
    /// block being evicted waits for the punch and only then fetches it
    /// again: a fetch published before the punch landed would be destroyed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn readers_never_wait_for_a_punch_nor_lose_a_refetch_to_it() {
        let img = image(MIB);
        let at = |o: u64, n: u64| &img[o as usize..(o + n) as usize];
        let origin = MemOrigin::new(img.clone(), false);
        let (_dir, cache) = open(origin.clone());
        cache.read(range(0, MIB)).await.unwrap();
        settled(&cache).await;
        let fetched = origin.requests.load(Ordering::SeqCst);
        aim(&cache, 5);
        let (punching, go, evictor) = held_eviction(&cache);
        let r = tokio::task::spawn_blocking(move || punching.recv().unwrap())
            .await
            .unwrap();
        assert_eq!(r, range(5 * BS, BS));
        let quick = std::time::Duration::from_secs(2);
        let other = cache
            .read_now(range(7 * BS, 4096))
            .expect("inline")
            .unwrap();
        assert!(other.data == at(7 * BS, 4096));
        let other = tokio::time::timeout(quick, cache.read(range(8 * BS, 2 * BS)))
            .await
            .expect("a read of other blocks waits for nothing")
            .unwrap();
        assert!(other.data == at(8 * BS, 2 * BS));
        assert!(cache.read_now(range(5 * BS, 4096)).is_none());
        let c = cache.clone();
        let evicted = tokio::spawn(async move { c.read(range(4 * BS + 100, 2 * BS)).await });
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(!evicted.is_finished(), "the read waits for the punch");
        assert_eq!(
            origin.requests.load(Ordering::SeqCst),
            fetched,
            "no fetch of the block before its punch"
        );
        go.send(()).unwrap();
        let evicted = tokio::time::timeout(quick, evicted)
            .await
            .expect("the read goes on after the punch")
            .unwrap()
            .unwrap();
        assert_eq!(evictor.join().unwrap(), BS);
        assert!(evicted.data == at(4 * BS + 100, 2 * BS));
        assert_eq!(origin.requests.load(Ordering::SeqCst), fetched + 1);
        // Fetched after the punch, so intact.
        settled(&cache).await;
        let again = cache.read_now(range(5 * BS, BS)).expect("present").unwrap();
        assert!(again.data == at(5 * BS, BS));
        assert_eq!(cache.present_bytes(), MIB);
        assert!(accounted(&cache));
        assert_eq!(Stats::get(&cache.stats().evictions), 1);
        assert_eq!(Stats::get(&cache.stats().crc_failures), 0);
    }

    /// A block demoted while a reader has it pinned (between checking its
    /// state and reading its bytes) is punched only after that read.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_block_is_punched_only_after_its_readers() {
        let img = image(MIB);
        let (_dir, cache) = open(MemOrigin::new(img.clone(), false));
        cache.read(range(0, MIB)).await.unwrap();
        settled(&cache).await;
        aim(&cache, 5);
        let reading = cache.inner.pin(5..6);
        let (punching, go, evictor) = held_eviction(&cache);
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(cache.is_missing(5), "demoted at once");
        assert!(
            punching.try_recv().is_err(),
            "but not punched under a reader"
        );
        drop(reading);
        let r = punching
            .recv_timeout(std::time::Duration::from_secs(2))
            .unwrap();
        assert_eq!(r, range(5 * BS, BS));
        go.send(()).unwrap();
        assert_eq!(evictor.join().unwrap(), BS);
    }

    /// Readers and an evictor racing over a small cache: every read is
    /// right, and no block is ever punched under a reader or after a
    /// refetch (either would show as a CRC failure).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_racing_the_evictor_are_right_and_never_see_a_punch() {
        let img = Arc::new(image(2 * MIB));
        let (_dir, cache) = open(MemOrigin::new(img.to_vec(), false));
        let stop = Arc::new(AtomicBool::new(false));
        let c = cache.clone();
        let s = stop.clone();
        let evictor = std::thread::spawn(move || {
            let mut freed = 0;
            while !s.load(Ordering::Relaxed) {
                freed += c.evict(4 * BS);
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
            freed
        });
        let mut readers = Vec::new();
        for seed in 1..=4u64 {
            let (c, img) = (cache.clone(), img.clone());
            readers.push(tokio::spawn(async move {
                let mut x = seed * 0x9E37_79B9;
                for _ in 0..2000 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let len = 1 + x % (3 * BS);
                    let off = (x >> 20) % (2 * MIB - len);
                    let r = range(off, len);
                    let got = match c.read_now(r) {
                        Some(d) => d.unwrap(),
                        None => c.read(r).await.unwrap(),
                    };
                    assert!(got.data == img[off as usize..(off + len) as usize], "{r}");
                }
            }));
        }
        for r in readers {
            r.await.unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        assert!(evictor.join().unwrap() > 0);
        assert_eq!(Stats::get(&cache.stats().crc_failures), 0);
        assert!(accounted(&cache));
    }

    /// Guest reads that wait for the origin are timed, one sample each,
    /// however many fetches they wait for; hits and lazybd's own reads are
    /// not.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn guest_reads_that_wait_for_the_origin_are_timed() {
        let (_dir, cache) = open(MemOrigin::new(image(2 * MIB), false));
        let waits = |c: &ImageCache| c.stats().guest_wait.count();
        cache.read_unobserved(range(0, BS)).await.unwrap();
        assert_eq!(waits(&cache), 0, "lazybd's own read");
        let t = std::time::Instant::now();
        cache.read(range(2 * BS, BS)).await.unwrap();
        assert_eq!(waits(&cache), 1);
        settled(&cache).await;
        // Blocks 1 (missing), 2 (cached above) and 3 (missing): two fetches.
        cache.read(range(BS, 3 * BS)).await.unwrap();
        assert_eq!(waits(&cache), 2, "one sample per read");
        let sum = cache.stats().guest_wait.sum_secs();
        assert!(sum > 0.0 && sum <= t.elapsed().as_secs_f64(), "{sum} s");
        settled(&cache).await;
        cache.read(range(0, 4 * BS)).await.unwrap();
        assert!(cache.read_now(range(BS, BS)).is_some());
        assert_eq!(waits(&cache), 2, "hits wait for nothing");
        let s = cache.stats().to_string();
        assert!(s.contains("guest_waits=2 guest_wait_ms="), "{s}");
    }

    /// A hole that cannot be punched: the block stays cached and correct,
    /// the failure is counted, and a file system without hole punching
    /// stops eviction (an I/O error is tried again next time).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_punch_keeps_the_block_and_is_counted() {
        let img = image(MIB);
        let origin = MemOrigin::new(img.clone(), false);
        let (_dir, cache) = open(origin.clone());
        cache.read(range(0, MIB)).await.unwrap();
        settled(&cache).await;
        let fetched = origin.requests.load(Ordering::SeqCst);
        let tries = AtomicU64::new(0);
        let failing = |kind: ErrorKind| {
            let tries = &tries;
            move |_: &BlockStore, _: ByteRange| {
                tries.fetch_add(1, Ordering::SeqCst);
                Err(Error::new(kind, "injected"))
            }
        };
        aim(&cache, 5);
        assert_eq!(cache.evict_with(4 * BS, failing(ErrorKind::Io)), 0);
        assert_eq!(tries.load(Ordering::SeqCst), 1, "the first failure ends it");
        assert_eq!(cache.counts().0, 16, "every victim is present again");
        assert!(cache.can_evict());
        aim(&cache, 5);
        assert_eq!(cache.evict_with(BS, failing(ErrorKind::Unsupported)), 0);
        assert_eq!(tries.load(Ordering::SeqCst), 2);
        assert!(!cache.can_evict());
        assert_eq!(cache.evict(BS), 0, "no more tries");
        assert_eq!(cache.counts().0, 16);
        assert_eq!(cache.present_bytes(), MIB);
        assert_eq!(Stats::get(&cache.stats().punch_failures), 2);
        assert_eq!(Stats::get(&cache.stats().evictions), 0);
        let r = cache
            .read_now(range(4 * BS, 4 * BS))
            .expect("still cached")
            .unwrap();
        assert!(r.data == img[4 * BS as usize..8 * BS as usize]);
        assert_eq!(origin.requests.load(Ordering::SeqCst), fetched);
    }

    /// The store reports what fallocate said (here it can punch).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_punch_reports_its_outcome() {
        let (_dir, cache) = open(MemOrigin::new(image(MIB), false));
        cache.read(range(0, MIB)).await.unwrap();
        settled(&cache).await;
        let store = &cache.inner.store;
        store.try_punch(range(2 * BS, BS)).unwrap();
        let mut page = vec![1u8; 4096];
        let data = std::fs::File::open(cache.dir().join("data")).unwrap();
        std::os::unix::fs::FileExt::read_exact_at(&data, &mut page, 2 * BS).unwrap();
        assert!(page.iter().all(|&b| b == 0), "punched");
    }

    /// Bytes that are not in the page cache are not read inline (that
    /// would block an async worker on the disk): the fast path declines,
    /// the full path reads them on the blocking pool (locally, not from the
    /// origin), and from then on they are served inline again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn blocks_not_in_the_page_cache_are_read_off_the_workers() {
        use std::os::unix::io::AsRawFd;
        let img = image(MIB);
        let at = |o: u64, n: u64| &img[o as usize..(o + n) as usize];
        let origin = MemOrigin::new(img.clone(), false);
        let (_dir, cache) = open(origin.clone());
        cache.read(range(0, MIB)).await.unwrap();
        settled(&cache).await;
        let fetched = origin.requests.load(Ordering::SeqCst);
        assert!(cache.read_now(range(3 * BS, 4096)).is_some());
        // Written back, then dropped from the page cache.
        cache.sync().unwrap();
        let data = std::fs::File::open(cache.dir().join("data")).unwrap();
        // DONTNEED skips pages still under writeback: ask again until the
        // kernel has dropped them (a few rounds at most).
        let mut declined = false;
        for _ in 0..50 {
            data.sync_data().unwrap();
            // SAFETY: an advisory call on an open descriptor; no memory passed.
            let rc =
                unsafe { libc::posix_fadvise(data.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            assert_eq!(rc, 0);
            if cache.read_now(range(3 * BS, 4096)).is_none() {
                declined = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(declined, "the inline path would have waited for the disk");
        let r = cache.read(range(3 * BS - 100, 2 * BS)).await.unwrap();
        assert!(r.data == at(3 * BS - 100, 2 * BS));
        assert_eq!(origin.requests.load(Ordering::SeqCst), fetched);
        let r = cache
            .read_now(range(3 * BS, 4096))
            .expect("in the page cache now");
        assert!(r.unwrap().data == at(3 * BS, 4096));
        assert_eq!(Stats::get(&cache.stats().crc_failures), 0);
    }
}
