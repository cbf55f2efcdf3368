//! Copy-on-write overlay: one per writable export. Writes, TRIM and
//! WRITE_ZEROES land here and never reach the shared cache or the origin;
//! reads merge overlay blocks over the base device.
//!
//! ```text
//!   overlay page   read from         write of part of a page
//!   absent         base              base bytes + new bytes -> a fresh slot
//!   zero           zeroes            zeroes + new bytes     -> a fresh slot
//!   data           its slot (CRC)    its bytes + new bytes  -> a fresh slot
//! ```
//!
//! Pages live in [`store::PageStore`] (format in `format.rs`, crash
//! contract in `store.rs`), which does its I/O through `disk::Dir` so that
//! tests can cut power under it. FLUSH and FUA make every completed write
//! durable; after `kill -9` or a power cut every flushed write reads back
//! and every page reads as a content it held since.
//!
//! The overlay records the identity of the image it was made over; opening
//! it over a different image is refused, because its missing blocks would
//! silently read the new image's bytes.
//!
//! No disk I/O of the overlay blocks an async worker. Reads try the page
//! cache first (`RWF_NOWAIT`: the inline fast path and the first pass of
//! the full path); pages that would have to come from the disk are read on
//! the blocking pool. Writes are accepted in memory without waiting
//! (`PageStore::write_now`: slots, records and map taken at once) and
//! put on file by a drain on the blocking pool; a write that cannot be
//! accepted so (space to reserve, too much accepted already) runs the
//! blocking store write on the pool, its page stripes held until it is
//! done. Flushes run there too. See `write_now` below for the designs
//! this replaced.

pub mod disk;
pub mod format;
pub(crate) mod migrate;
pub mod store;
#[cfg(test)]
mod tests;

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::sync::{Mutex, OwnedMutexGuard};

use crate::block::{ByteRange, PAGE};
use crate::device::{BlockDevice, BoxFuture, Extent, ReadData, Writable, ZeroFlags};
use crate::error::{Error, ErrorKind, Result};
use store::{PageStore, Piece};

/// Writers of one page are serialised by one of these stripes; a read of
/// the base page and the merge happen under it, so two partial writes to
/// one page cannot lose each other's bytes.
const STRIPES: usize = 64;

/// Attempts before a page that keeps failing its CRC is reported: a page
/// whose slot was reused under a slow reader fails once; damage fails
/// every time.
const READ_ATTEMPTS: usize = 4;

/// Largest buffer of zeroes written at once for WRITE_ZEROES with NO_HOLE.
const ZERO_CHUNK: u64 = 1 << 20;

/// The bytes of partial-page zeroing (the edges of WRITE_ZEROES).
static ZERO_PAGE: [u8; PAGE as usize] = [0; PAGE as usize];

/// Stripes held by one writer, in lock order.
type Stripes = Vec<OwnedMutexGuard<()>>;

pub struct Overlay {
    base: Arc<dyn BlockDevice>,
    /// Shared with the blocking tasks that do its disk I/O.
    store: Arc<PageStore>,
    /// Set while a flush the overlay started on its own is running.
    self_flushing: Arc<std::sync::atomic::AtomicBool>,
    /// In `Arc`s so that a writer's guards go to the blocking pool with
    /// its store write and are released when that write is done, even if
    /// the request's future is dropped while it waits for it.
    stripes: Vec<Arc<Mutex<()>>>,
    dir: PathBuf,
    size: u64,
    /// Holds the overlay directory's exclusive flock.
    _lock: File,
}

/// What `base` records about the image an overlay was made over (the
/// block size line is the overlay's page, kept from version 1).
fn base_record(base_id: &str, size: u64) -> String {
    format!("base={base_id}\nsize={size}\nblock_size={PAGE}\n")
}

/// Pages `[first, end)` covering `r`.
fn pages_of(r: ByteRange) -> (u64, u64) {
    (r.offset / PAGE, r.end().div_ceil(PAGE))
}

/// What `overlay check` found.
#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    pub data_pages: u64,
    /// Pages that failed their CRC (byte offset = page * 4096).
    pub bad: Vec<u64>,
    /// Pages of a version-1 overlay that could not be migrated.
    pub migrate_lost: Vec<u64>,
    pub repaired: bool,
    pub migrated: bool,
}

/// Verify every page of the overlay in `dir` (which no server may hold);
/// with `repair`, pages that fail read as zeroes afterwards (reported).
pub fn check_dir(dir: &Path, repair: bool) -> Result<CheckReport> {
    let lock = crate::store::lock_dir(dir, "overlay")?;
    let record_path = dir.join("base");
    let record = fs::read_to_string(&record_path)
        .map_err(|e| Error::io(format!("reading {}", record_path.display()), e))?;
    let size = record
        .lines()
        .find_map(|l| l.strip_prefix("size="))
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Corrupt,
                format!("{}: no size= line", record_path.display()),
            )
        })?;
    let identity = crate::util::fnv64(record.as_bytes());
    let mut report = CheckReport::default();
    if migrate::pending(dir) {
        report.migrate_lost = migrate::migrate(dir, size, identity, repair)?;
        report.migrated = true;
    }
    let (store, _) = PageStore::open(Arc::new(disk::OsDir::new(dir)), size, identity)?;
    report.bad = store.check()?;
    report.data_pages = store.data_pages();
    if repair && !report.bad.is_empty() {
        store.repair(&report.bad)?;
        report.repaired = true;
    }
    drop(lock);
    Ok(report)
}

impl Overlay {
    /// Open or create the overlay in `dir` over `base`. `base_id` names the
    /// base image's identity (its `Display` form); a different one refuses.
    pub fn open(dir: &Path, base: Arc<dyn BlockDevice>, base_id: &str) -> Result<Overlay> {
        Self::open_on(dir, Arc::new(disk::OsDir::new(dir)), base, base_id)
    }

    /// [`Overlay::open`] with the store's files in `disk`, which is `dir`
    /// itself seen through another [`disk::Dir`] (tests watch the I/O).
    fn open_on(
        dir: &Path,
        disk: Arc<dyn disk::Dir>,
        base: Arc<dyn BlockDevice>,
        base_id: &str,
    ) -> Result<Overlay> {
        fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating overlay {}", dir.display()), e))?;
        let lock = crate::store::lock_dir(dir, "overlay")?;
        let size = base.size();
        let record = base_record(base_id, size);
        let record_path = dir.join("base");
        match fs::read_to_string(&record_path) {
            Ok(existing) if existing != record => {
                // Refuse, never discard: this is client data.
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!(
                        "overlay {} was made over another image or block size:\n{existing}now:\n{record}\
                         move it away or use another --overlay-dir",
                        dir.display()
                    ),
                ));
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                for f in ["meta", store::JOURNAL, store::PAGES] {
                    if dir.join(f).exists() {
                        return Err(Error::new(
                            ErrorKind::Corrupt,
                            format!(
                                "overlay {} has data ({f}) but no base record; refusing to open it",
                                dir.display()
                            ),
                        ));
                    }
                }
                crate::util::write_atomic(&record_path, record.as_bytes())?;
            }
            Err(e) => return Err(Error::io(format!("reading {}", record_path.display()), e)),
        }
        let identity = crate::util::fnv64(record.as_bytes());
        if migrate::pending(dir) {
            migrate::migrate(dir, size, identity, false)?;
        }
        let (store, report) = PageStore::open(disk, size, identity)?;
        if report.tail > 0 {
            tracing::info!(overlay = %dir.display(), records = report.tail, kept = report.tail_kept,
                "overlay recovered writes made since its last flush");
        }
        Ok(Overlay {
            base,
            store: Arc::new(store),
            self_flushing: Default::default(),
            stripes: (0..STRIPES).map(|_| Arc::new(Mutex::new(()))).collect(),
            dir: dir.to_path_buf(),
            size,
            _lock: lock,
        })
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes held by the overlay (data pages), for `export list`: a
    /// counter, not a scan.
    pub(crate) fn bytes_written(&self) -> u64 {
        self.store.data_pages() * PAGE
    }

    /// The stripe indices of pages `[p0, p1)`, sorted (the lock order).
    fn stripe_ids(p0: u64, p1: u64) -> Vec<usize> {
        if p1 - p0 >= STRIPES as u64 {
            return (0..STRIPES).collect();
        }
        let mut v: Vec<usize> = (p0..p1).map(|p| p as usize % STRIPES).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    async fn lock_pages(&self, p0: u64, p1: u64) -> Stripes {
        let mut g = Vec::new();
        for i in Self::stripe_ids(p0, p1) {
            g.push(self.stripes[i].clone().lock_owned().await);
        }
        g
    }

    fn try_lock_pages(&self, p0: u64, p1: u64) -> Option<Stripes> {
        Self::stripe_ids(p0, p1)
            .into_iter()
            .map(|i| self.stripes[i].clone().try_lock_owned().ok())
            .collect()
    }

    /// After a write was accepted without waiting: start the drain that
    /// puts it on file, on the blocking pool, unless one is at work.
    fn kick(&self) {
        if !self.store.claim_drain() {
            return;
        }
        let store = self.store.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(move || store.drain(true))),
            // Not on a runtime: nothing to keep from blocking.
            Err(_) => store.drain(true),
        }
    }

    /// Accept `buf` (whole pages from page `p0`) without waiting, or
    /// `None`; the caller holds the pages' stripes.
    fn store_write_now(&self, p0: u64, buf: &[u8], keep_zeros: bool) -> Option<Result<()>> {
        let res = self.store.write_now(p0, buf, keep_zeros)?;
        if res.is_ok() {
            self.kick();
            self.maybe_self_flush();
        }
        Some(res)
    }

    /// The bytes of pages `[first, first + count)` (the last page of the
    /// image may be short).
    fn run_bytes(&self, first: u64, count: u64) -> ByteRange {
        ByteRange {
            offset: first * PAGE,
            len: ((first + count) * PAGE).min(self.size) - first * PAGE,
        }
    }

    fn page_range(&self, p: u64) -> ByteRange {
        self.run_bytes(p, 1)
    }

    async fn read_impl(&self, r: ByteRange) -> Result<ReadData> {
        let (p0, p1) = pages_of(r);
        // The common case for a VM booting a template: nothing written here.
        if !self.store.holds_any(p0, p1) {
            return self.base.read(r).await;
        }
        // What the overlay does not hold and the pages not in the page
        // cache are read first, then the read is assembled from the map as
        // it is then. A page can change in between (a write, a TRIM) or
        // its old slot be reused under this read: assembling starts over.
        // Damage fails every attempt.
        let mut fetched = Fetched::default();
        for _ in 0..READ_ATTEMPTS {
            match self.assemble(r, &mut |q| fetched.base_part(q), &fetched.pages) {
                Assembled::Done(res) => return res,
                Assembled::Need(need) => self.fetch(need, &mut fetched).await?,
                Assembled::Torn(p) => {
                    // Bytes read before may be what tore; read them again.
                    fetched.pages.clear();
                    // Let the writer of that page finish, then retry.
                    drop(self.lock_pages(p, p + 1).await);
                }
            }
        }
        Err(Error::new(
            ErrorKind::Corrupt,
            format!(
                "overlay {}: read {r} keeps failing its checksum (damaged client data; see `lazybd overlay check`)",
                self.dir.display()
            ),
        ))
    }

    /// Read what an assembly asked for into `into`: the runs of overlay
    /// pages on the blocking pool (they are not in the page cache) while
    /// the base parts are read.
    async fn fetch(&self, need: Need, into: &mut Fetched) -> Result<()> {
        let Need { base, pages } = need;
        let reading = (!pages.is_empty()).then(|| {
            let store = self.store.clone();
            tokio::task::spawn_blocking(move || {
                let mut pages = pages;
                for run in &mut pages {
                    run.bad = store.read_slots(run.first, &run.slots, &mut run.data)?;
                }
                Ok::<_, Error>(pages)
            })
        });
        for q in base {
            let rd = self.base.read(q).await?;
            into.base.push((q, rd));
        }
        if let Some(task) = reading {
            let pages = task
                .await
                .map_err(|e| Error::with_source(ErrorKind::Io, "overlay read task", e))??;
            into.pages.extend(pages);
        }
        Ok(())
    }

    /// Assemble a read of `r` from the overlay's pages as they are now,
    /// asking `base` for the parts of `r` the overlay does not hold;
    /// `base` answers `None` for a part it cannot give without waiting.
    /// Overlay pages come from `fetched` when read there before (same
    /// slots), else from the page cache; those that would have to come
    /// from the disk are asked for in [`Assembled::Need`].
    fn assemble(
        &self,
        r: ByteRange,
        base: &mut dyn FnMut(ByteRange) -> Option<Result<ReadData>>,
        fetched: &[PageRun],
    ) -> Assembled {
        let (p0, p1) = pages_of(r);
        let mut out = BytesMut::zeroed(r.len as usize);
        let mut zero: Vec<ByteRange> = Vec::new();
        let mut need = Need::default();
        for (first, count, piece) in self.store.lookup(p0, p1) {
            let run = self.run_bytes(first, count);
            let part = run.intersect(&r).expect("run of covering pages meets r");
            let dst = (part.offset - r.offset) as usize;
            let src = (part.offset - run.offset) as usize;
            match piece {
                Piece::Zero => zero.push(part),
                Piece::Data(slots) => {
                    if let Some(f) = fetched
                        .iter()
                        .find(|f| f.first == first && f.slots == slots)
                    {
                        if let Some(&p) = f.bad.first() {
                            return Assembled::Torn(p);
                        }
                        out[dst..dst + part.len as usize]
                            .copy_from_slice(&f.data[src..src + part.len as usize]);
                        continue;
                    }
                    let aligned = part == run;
                    let mut scratch;
                    let buf: &mut [u8] = if aligned {
                        &mut out[dst..dst + part.len as usize]
                    } else {
                        scratch = vec![0u8; run.len as usize];
                        &mut scratch
                    };
                    match self.store.read_slots_now(first, &slots, buf) {
                        Ok(Some(bad)) if !bad.is_empty() => return Assembled::Torn(bad[0]),
                        Ok(Some(_)) => {}
                        Ok(None) => {
                            need.pages.push(PageRun {
                                first,
                                slots,
                                data: vec![0u8; run.len as usize],
                                bad: Vec::new(),
                            });
                            continue;
                        }
                        Err(err) => return Assembled::Done(Err(err)),
                    }
                    if !aligned {
                        let bytes = buf[src..src + part.len as usize].to_vec();
                        out[dst..dst + part.len as usize].copy_from_slice(&bytes);
                    }
                }
                Piece::Base => match base(part) {
                    Some(Ok(rd)) => {
                        out[dst..dst + part.len as usize].copy_from_slice(&rd.data);
                        zero.extend(rd.zero);
                    }
                    Some(Err(err)) => return Assembled::Done(Err(err)),
                    None => need.base.push(part),
                },
            }
        }
        if !need.base.is_empty() || !need.pages.is_empty() {
            return Assembled::Need(need);
        }
        zero.sort_by_key(|z| z.offset);
        Assembled::Done(Ok(ReadData {
            data: out.freeze(),
            zero: crate::block::merge_adjacent(zero),
        }))
    }

    /// The current bytes of page `p` for a read-modify-write, verified;
    /// the caller holds the page's stripe. `base` answers the base's part
    /// (`None`: it would have to wait), `pages` holds overlay pages read
    /// before. `None` when something must be read first, waiting: added
    /// to `need`.
    fn page_now(
        &self,
        p: u64,
        base: &mut dyn FnMut(ByteRange) -> Option<Result<ReadData>>,
        pages: &[PageRun],
        need: &mut Need,
    ) -> Option<Result<Vec<u8>>> {
        let pr = self.page_range(p);
        match self.assemble(pr, base, pages) {
            Assembled::Done(Ok(rd)) => Some(Ok(rd.data.to_vec())),
            Assembled::Done(Err(e)) => Some(Err(e)),
            Assembled::Need(more) => {
                need.base.extend(more.base);
                need.pages.extend(more.pages);
                None
            }
            // No writer can be at work on it (we hold its stripe): damage.
            Assembled::Torn(_) => Some(Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "overlay {}: page at {} fails its checksum; refusing to write over part of it (see `lazybd overlay check`)",
                    self.dir.display(),
                    pr.offset
                ),
            ))),
        }
    }

    /// Whole pages for `data` at `offset`: `data` itself when aligned,
    /// else the edge pages' current bytes merged with it. `edge` gives an
    /// edge page's bytes (or `None`: not without waiting).
    fn whole_pages<'a>(
        &self,
        offset: u64,
        data: &'a [u8],
        edge: &mut dyn FnMut(u64) -> Option<Result<Vec<u8>>>,
    ) -> Option<Result<std::borrow::Cow<'a, [u8]>>> {
        let r = ByteRange {
            offset,
            len: data.len() as u64,
        };
        let (p0, p1) = pages_of(r);
        let start = p0 * PAGE;
        let end = (p1 * PAGE).min(self.size);
        if offset == start && r.end() == end {
            return Some(Ok(std::borrow::Cow::Borrowed(data)));
        }
        let mut buf = vec![0u8; (end - start) as usize];
        // The first page when the write starts inside it (or is all inside
        // it), the last when the write ends inside it.
        let mut edges = Vec::new();
        if offset > start || p1 - p0 == 1 {
            edges.push(p0);
        }
        if p1 - p0 > 1 && r.end() < end {
            edges.push(p1 - 1);
        }
        // Every edge is asked before giving up, so that one round of
        // reads can fetch what both need.
        let mut waiting = false;
        for p in edges {
            match edge(p) {
                Some(Ok(b)) => {
                    let at = ((p - p0) * PAGE) as usize;
                    buf[at..at + b.len()].copy_from_slice(&b);
                }
                Some(Err(e)) => return Some(Err(e)),
                None => waiting = true,
            }
        }
        if waiting {
            return None;
        }
        let at = (offset - start) as usize;
        buf[at..at + data.len()].copy_from_slice(data);
        Some(Ok(std::borrow::Cow::Owned(buf)))
    }

    /// Write `data` at `offset` (validated by the protocol edge).
    /// `keep_zeros`: store all-zero pages as data (NO_HOLE) instead of
    /// recording them as zero.
    async fn write_impl(&self, offset: u64, data: Bytes, keep_zeros: bool) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let r = ByteRange {
            offset,
            len: data.len() as u64,
        };
        let (p0, p1) = pages_of(r);
        let stripes = self.lock_pages(p0, p1).await;
        // Edge pages the overlay does not hold come from the base first,
        // and edge pages not in the page cache from the blocking pool.
        let mut fetched = Fetched::default();
        for _ in 0..READ_ATTEMPTS {
            let mut need = Need::default();
            let whole = self.whole_pages(offset, &data, &mut |p| {
                self.page_now(p, &mut |q| fetched.base_part(q), &fetched.pages, &mut need)
            });
            match whole {
                Some(Ok(buf)) => {
                    if let Some(res) = self.store_write_now(p0, &buf, keep_zeros) {
                        return res;
                    }
                    let buf = match buf {
                        std::borrow::Cow::Borrowed(_) => data.clone(),
                        std::borrow::Cow::Owned(v) => Bytes::from(v),
                    };
                    let store = self.store.clone();
                    self.blocking(stripes, "overlay write task", move || {
                        store.write(p0, &buf, keep_zeros)
                    })
                    .await?;
                    self.maybe_self_flush();
                    return Ok(());
                }
                Some(Err(e)) => return Err(e),
                None => self.fetch(need, &mut fetched).await?,
            }
        }
        Err(Error::new(
            ErrorKind::Io,
            format!(
                "overlay {}: the base kept changing under a partial write",
                self.dir.display()
            ),
        ))
    }

    /// Run `f` (store I/O that may wait for the disk) on the blocking pool
    /// with `stripes` held until it returns: the caller's lock covers the
    /// store write even if the caller stops waiting for it.
    async fn blocking(
        &self,
        stripes: Stripes,
        what: &'static str,
        f: impl FnOnce() -> Result<()> + Send + 'static,
    ) -> Result<()> {
        tokio::task::spawn_blocking(move || {
            let r = f();
            drop(stripes);
            r
        })
        .await
        .map_err(|e| Error::with_source(ErrorKind::Io, what, e))?
    }

    /// Zero `r`: whole pages become zero (space freed after the next
    /// flush), partial edges are written as zero bytes unless `edges` is
    /// false (TRIM may skip them). With `no_hole` every page is written
    /// as allocated zero bytes instead, so it reads as data (not a hole).
    async fn zero_impl(&self, r: ByteRange, edges: bool, no_hole: bool) -> Result<()> {
        if r.is_empty() {
            return Ok(());
        }
        if no_hole {
            let zeros = Bytes::from(vec![0u8; ZERO_CHUNK as usize]);
            let mut at = r.offset;
            while at < r.end() {
                let n = (r.end() - at).min(ZERO_CHUNK - at % PAGE);
                self.write_impl(at, zeros.slice(..n as usize), true).await?;
                at += n;
            }
            return Ok(());
        }
        let first_full = r.offset.div_ceil(PAGE);
        let end_full = if r.end() == self.size {
            r.end().div_ceil(PAGE)
        } else {
            r.end() / PAGE
        };
        if first_full < end_full {
            let stripes = self.lock_pages(first_full, end_full).await;
            let count = end_full - first_full;
            match self.store.zero_now(first_full, count) {
                Some(res) => {
                    res?;
                    self.kick();
                }
                None => {
                    let store = self.store.clone();
                    self.blocking(stripes, "overlay zero task", move || {
                        store.zero(first_full, count)
                    })
                    .await?
                }
            }
        }
        if edges {
            let zeros = |n: u64| Bytes::from_static(&ZERO_PAGE[..n as usize]);
            let head_end = (first_full * PAGE).min(r.end());
            if r.offset < head_end {
                self.write_impl(r.offset, zeros(head_end - r.offset), false)
                    .await?;
            }
            let tail_start = (end_full * PAGE).max(r.offset).max(head_end);
            if tail_start < r.end() && end_full >= first_full {
                self.write_impl(tail_start, zeros(r.end() - tail_start), false)
                    .await?;
            }
        }
        Ok(())
    }

    /// After a write: a guest that rewrites without flushing makes the
    /// store hold replaced slots; past a bound, flush in the background
    /// (a flush only makes more durable, so an extra one is always safe).
    fn maybe_self_flush(&self) {
        use std::sync::atomic::Ordering;
        if !self.store.wants_flush() || self.self_flushing.swap(true, Ordering::AcqRel) {
            return;
        }
        let (store, flag) = (self.store.clone(), self.self_flushing.clone());
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            flag.store(false, Ordering::Release);
            return;
        };
        rt.spawn_blocking(move || {
            if let Err(e) = store.flush() {
                tracing::warn!(error = %e, "overlay flush (after many rewrites) failed");
            }
            flag.store(false, Ordering::Release);
        });
    }

    /// Sync from a blocking context (shutdown).
    pub(crate) fn sync_blocking(&self) -> Result<()> {
        self.store.flush()
    }

    async fn sync(&self) -> Result<()> {
        // fdatasync can take a while; keep it off the runtime workers.
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.flush())
            .await
            .map_err(|e| Error::with_source(ErrorKind::Io, "overlay sync task", e))?
    }
}

impl Drop for Overlay {
    /// Accepted writes go on file before the directory lock is let go
    /// (another overlay may open the files next). Waits for the disk, on
    /// whatever thread drops the last reference; export removal and
    /// shutdown flush first, so there is rarely anything left.
    fn drop(&mut self) {
        self.store.close();
    }
}

/// What [`Overlay::assemble`] made of a read.
enum Assembled {
    Done(Result<ReadData>),
    /// These must be read first, waiting.
    Need(Need),
    /// This page failed its CRC: its old slot reused under the read
    /// (worth another attempt) or damaged.
    Torn(u64),
}

/// What an assembly could not read without waiting.
#[derive(Default)]
struct Need {
    /// Parts the overlay does not hold, from the base.
    base: Vec<ByteRange>,
    /// Runs of the overlay's pages not in the page cache.
    pages: Vec<PageRun>,
}

/// Bytes read (waiting) for earlier attempts at an assembly.
#[derive(Default)]
struct Fetched {
    base: Vec<(ByteRange, ReadData)>,
    pages: Vec<PageRun>,
}

impl Fetched {
    fn base_part(&self, q: ByteRange) -> Option<Result<ReadData>> {
        self.base
            .iter()
            .find(|(x, _)| *x == q)
            .map(|(_, rd)| Ok(rd.clone()))
    }
}

/// A run of overlay pages `first..` in `slots` (one per page, with its
/// CRC), read on the blocking pool into `data`; `bad`: the pages that
/// failed their CRC there.
struct PageRun {
    first: u64,
    slots: Vec<(u64, u32)>,
    data: Vec<u8>,
    bad: Vec<u64>,
}

impl BlockDevice for Overlay {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&self, r: ByteRange) -> BoxFuture<'_, Result<ReadData>> {
        Box::pin(self.read_impl(r))
    }

    fn extents(&self, r: ByteRange) -> Result<Vec<Extent>> {
        let mut out: Vec<Extent> = Vec::new();
        let mut push = |e: Extent| match out.last_mut() {
            Some(last) if last.zero == e.zero => last.len += e.len,
            _ => out.push(e),
        };
        let (p0, p1) = pages_of(r);
        for (first, count, piece) in self.store.lookup(p0, p1) {
            let run = self.run_bytes(first, count);
            let part = run.intersect(&r).expect("run of covering pages meets r");
            match piece {
                Piece::Zero => push(Extent {
                    len: part.len,
                    zero: true,
                }),
                Piece::Data(_) => push(Extent {
                    len: part.len,
                    zero: false,
                }),
                Piece::Base => {
                    for e in self.base.extents(part)? {
                        push(e);
                    }
                }
            }
        }
        Ok(out)
    }

    fn read_now(&self, r: ByteRange) -> Option<Result<ReadData>> {
        let (p0, p1) = pages_of(r);
        if !self.store.holds_any(p0, p1) {
            return self.base.read_now(r);
        }
        match self.assemble(r, &mut |p| self.base.read_now(p), &[]) {
            Assembled::Done(res) => Some(res),
            Assembled::Need(_) | Assembled::Torn(_) => None,
        }
    }

    fn prefetch(&self, r: ByteRange) {
        let (p0, p1) = pages_of(r);
        for (first, count, piece) in self.store.lookup(p0, p1) {
            if piece == Piece::Base {
                let run = self.run_bytes(first, count);
                if let Some(part) = run.intersect(&r) {
                    self.base.prefetch(part);
                }
            }
        }
    }

    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.sync())
    }
}

impl Writable for Overlay {
    /// Accepted in memory without waiting when the page stripes are free,
    /// the edge pages' bytes are at hand (page cache, base local) and the
    /// store can take it (`PageStore::write_now`); a drain on the
    /// blocking pool puts it on file. Warm 4 KiB random writes at QD32 ran
    /// 1.39x (Unix socket) and 1.14x (TCP) as fast as with the store write
    /// inline on the worker, as before: drains write runs of pages and of
    /// records at once.
    ///
    /// Rejected (same writes, Unix socket, ext4, Linux 6.18, median IOPS of
    /// alternating rounds on a loaded machine where the inline store write
    /// made 45.0k): declining, so that `write` does the store write on the
    /// blocking pool, 18.1k (a handler task and a thread hand-off per
    /// write, up to 32 pool threads contending for the inode lock);
    /// declining with the store write still on the worker, 31.7k, so no
    /// design that declines the common case comes near. `pwritev2` with
    /// RWF_NOWAIT would keep the write inline and say EAGAIN instead of
    /// waiting, but ext4 answers EOPNOTSUPP to it for buffered writes,
    /// cached pages or not. A pwrite inline "only into cached pages" is no
    /// answer either: a buffered pwrite on ext4 can wait for the inode lock
    /// of a writer that dirty-page throttling put to sleep, for a journal
    /// commit (mtime, file size), for an extent allocation.
    fn write_now(&self, offset: u64, data: &[u8], fua: bool) -> Option<Result<()>> {
        if fua || data.is_empty() {
            return None; // a sync does not belong on the request loop
        }
        let r = ByteRange {
            offset,
            len: data.len() as u64,
        };
        let (p0, p1) = pages_of(r);
        let _g = self.try_lock_pages(p0, p1)?;
        let mut need = Need::default();
        let mut base = |q: ByteRange| self.base.read_now(q);
        match self.whole_pages(offset, data, &mut |p| {
            self.page_now(p, &mut base, &[], &mut need)
        })? {
            Ok(buf) => self.store_write_now(p0, &buf, false),
            Err(e) => Some(Err(e)),
        }
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.write_impl(offset, data, false).await?;
            if fua {
                self.sync().await?;
            }
            Ok(())
        })
    }

    fn trim(&self, r: ByteRange, fua: bool) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            // TRIM is advisory; dropping whole pages is enough.
            self.zero_impl(r, false, false).await?;
            if fua {
                self.sync().await?;
            }
            Ok(())
        })
    }

    fn write_zeroes(&self, r: ByteRange, f: ZeroFlags) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let aligned = r.offset % PAGE == 0 && (r.end() % PAGE == 0 || r.end() == self.size);
            if f.fast && (!aligned || f.no_hole) {
                // Partial pages need the page's bytes, NO_HOLE needs the
                // zeroes written: neither is fast. The client asked to be
                // told instead of waiting.
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    "fast zero needs a page-aligned range without NO_HOLE",
                ));
            }
            self.zero_impl(r, true, f.no_hole).await?;
            if f.fua {
                self.sync().await?;
            }
            Ok(())
        })
    }
}
