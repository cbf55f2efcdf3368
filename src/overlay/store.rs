//! The overlay's page store: guest pages written to fresh slots of `pages`,
//! their locations appended to `journal`, an in-memory map rebuilt from
//! the journal at open. Metadata and data grow with what the guest wrote,
//! never with the image's virtual size.
//!
//! [`PageStore::open`], its read side and the file names are public for the
//! fuzz target `overlay_journal`, which replays arbitrary journals.
//!
//! Crash contract (RELIABILITY.md): after `kill -9` or a power cut at any
//! moment, every write acknowledged before the last completed flush reads
//! back exactly; every page written since reads as one of the contents it
//! held since that flush; nothing reads as EIO or as bytes nobody wrote.
//!
//! How the format keeps it, without a second copy of the data:
//!
//! * **A write never overwrites a slot anyone could fall back to.** Each
//!   write goes to a free slot, then its record is appended. The slot it
//!   replaces is only reusable once a flush has made the replacement
//!   durable (`pending_free`). So the previous content of every page is
//!   intact until the journal no longer needs it.
//! * **A flush** captures the journal end `x`, syncs `pages` (so every
//!   record before `x` points at durable bytes), appends `Flush{x}` and
//!   syncs the journal.
//! * **Replay** trusts the records before the last flush marker's `x`
//!   (their data was synced before the marker was written) and verifies
//!   every later record's page against its CRC, keeping the last one per
//!   page that verifies. A record lost or torn is skipped; its page keeps
//!   an earlier content, which the rule above kept intact.
//! * **Open** syncs what replay rebuilt (data, then journal) before
//!   anything is written, and compacts the journal when it has a tail or
//!   has grown well past the map: the new journal is written beside the
//!   old one and renamed over it.
//! * **A failed sync poisons the store**: Linux may have dropped the pages
//!   it failed to write and marked them clean, so no later sync can vouch
//!   for them; writes fail until the overlay is opened again.
//! * **Writes accepted without waiting** (`PageStore::write_now`,
//!   `PageStore::zero_now`, for the async workers) take their slots,
//!   journal offsets and map entries at once, like any write, but their
//!   bytes stay in memory (reads are served from there) until a drain on
//!   the blocking pool puts them on file: pages, then records, in journal
//!   order. A flush drains first, so the rule above holds for them too; a
//!   kill loses what was not drained, which the contract allows (nothing
//!   acknowledged since the last flush is promised). They only use slots
//!   and journal space already reserved, so a full disk still fails the
//!   write itself with ENOSPC, never a drain.
//!
//! Rejected: rewriting pages in place with two CRC slots (the previous
//! format). A torn or lost rewrite of a page left it matching neither CRC,
//! and mmap'd CRCs could reach the disk before the data they describe:
//! EIO forever on a page of a VM's disk. Also rejected: a write-ahead log
//! with checkpoints (every byte written twice).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::block::PAGE;
use crate::error::{Error, ErrorKind, Result};

use super::disk::{read_full, read_full_nowait, Dir, DiskFile};
use super::format::{
    Header, HeaderError, Record, JOURNAL_MAGIC, PAGES_MAGIC, RECORD, RECORDS_START,
};

pub const JOURNAL: &str = "journal";
pub const PAGES: &str = "pages";
const JOURNAL_NEW: &str = "journal.new";

/// What the map holds for a run of pages (absent: the base).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Data { slot: u64, crc: u32 },
    Zero,
}

#[derive(Debug, Clone, Copy)]
struct Ext {
    len: u64,
    kind: Kind,
}

/// Page -> location, as non-overlapping extents keyed by first page.
/// Data extents are one page long; zero extents any length.
#[derive(Default)]
struct PageMap {
    ext: BTreeMap<u64, Ext>,
    data_pages: u64,
}

impl PageMap {
    /// Set `[first, first + len)` to `kind`; returns the slots no longer
    /// referenced.
    fn set(&mut self, first: u64, len: u64, kind: Option<Kind>) -> Vec<u64> {
        let end = first + len;
        let mut freed = Vec::new();
        let mut hit: Vec<u64> = Vec::new();
        if let Some((&k, e)) = self.ext.range(..first).next_back() {
            if k + e.len > first {
                hit.push(k);
            }
        }
        hit.extend(self.ext.range(first..end).map(|(&k, _)| k));
        for k in hit {
            let e = self.ext.remove(&k).expect("extent found above");
            match e.kind {
                Kind::Data { slot, .. } => {
                    freed.push(slot);
                    self.data_pages -= 1;
                }
                Kind::Zero => {
                    if k < first {
                        self.ext.insert(
                            k,
                            Ext {
                                len: first - k,
                                kind: Kind::Zero,
                            },
                        );
                    }
                    if k + e.len > end {
                        self.ext.insert(
                            end,
                            Ext {
                                len: k + e.len - end,
                                kind: Kind::Zero,
                            },
                        );
                    }
                }
            }
        }
        if let Some(kind) = kind {
            debug_assert!(len == 1 || kind == Kind::Zero);
            if matches!(kind, Kind::Data { .. }) {
                self.data_pages += 1;
            }
            self.ext.insert(first, Ext { len, kind });
        }
        freed
    }

    /// Runs covering `[first, end)`, base runs included.
    fn runs(&self, first: u64, end: u64) -> Vec<(u64, u64, Option<Kind>)> {
        let mut out = Vec::new();
        let mut at = first;
        let push = |s: u64, e: u64, k: Option<Kind>, out: &mut Vec<(u64, u64, Option<Kind>)>| {
            if s < e {
                out.push((s, e - s, k));
            }
        };
        let start_key = match self.ext.range(..=first).next_back() {
            Some((&k, e)) if k + e.len > first => k,
            _ => first,
        };
        for (&k, e) in self.ext.range(start_key..end) {
            let s = k.max(first);
            push(at, s, None, &mut out);
            let e_end = (k + e.len).min(end);
            push(s, e_end, Some(e.kind), &mut out);
            at = e_end;
        }
        push(at, end, None, &mut out);
        out
    }

    /// Does page `p` have a data slot?
    fn holds_data(&self, p: u64) -> bool {
        matches!(
            self.ext.range(..=p).next_back(),
            Some((&k, e)) if k + e.len > p && matches!(e.kind, Kind::Data { .. })
        )
    }

    fn any_in(&self, first: u64, end: u64) -> bool {
        if let Some((&k, e)) = self.ext.range(..=first).next_back() {
            if k + e.len > first {
                return true;
            }
        }
        self.ext.range(first..end).next().is_some()
    }
}

/// A piece of a lookup: pages `[first, first + count)` and where they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Base,
    Zero,
    /// One (slot, crc) per page.
    Data(Vec<(u64, u32)>),
}

struct State {
    journal: Arc<dyn DiskFile>,
    generation: u64,
    log_end: u64,
    map: PageMap,
    free: BTreeSet<u64>,
    next_slot: u64,
    /// Slots replaced by the record at this journal offset; reusable once
    /// a flush covering that offset has completed. `bool`: punch it then.
    pending_free: Vec<(u64, u64, bool)>,
    /// Records in the journal (for the compaction rule).
    records: u64,
    /// Slots below this have disk space reserved (see `alloc`).
    reserved_end: u64,
    /// Journal bytes below this have disk space reserved.
    journal_reserved: u64,
    /// The journal's end right after the last completed flush (nothing
    /// written since when it is still the end).
    flushed_end: u64,
    /// The file system cannot reserve space: a write may still meet
    /// ENOSPC when it reaches the file, so none is accepted without
    /// waiting (it must be able to fail).
    no_reserve: bool,
    /// Writes accepted without waiting, not yet on file; in journal order.
    queue: VecDeque<Job>,
    /// Slot -> page bytes of the queued writes: reads find them here
    /// until a drain has written them.
    staged: HashMap<u64, Bytes>,
    staged_bytes: usize,
    /// A background drain is claimed (see [`PageStore::claim_drain`]).
    draining: bool,
}

/// A write accepted without waiting, for a drain to put on file.
struct Job {
    /// Runs of pages in consecutive slots: (first slot, their bytes).
    data: Vec<(u64, Bytes)>,
    /// Journal offset of its records, and their bytes.
    pos: u64,
    recs: Vec<u8>,
}

/// Replaced slots held before the overlay flushes on its own (32 MiB).
const FLUSH_AFTER: usize = 8192;
/// Journal bytes reserved at a time.
const GROW_JOURNAL: u64 = 256 << 10;

/// Most bytes of accepted writes held in memory: beyond, writers wait for
/// the disk (the blocking path), which is the back-pressure when the disk
/// is slower than the guest.
const STAGE_LIMIT: usize = 16 << 20;

/// Slots (4 MiB) reserved ahead of need by drains and blocking writes,
/// outside the state lock, so that writes accepted without waiting find
/// their slots reserved: exact reservation is one fallocate per write of
/// new pages, and once the rewrite reserve is used up (no flush) one per
/// write.
const HEADROOM: u64 = 1024;

/// Free bytes the file system must have before space is reserved ahead:
/// near a full disk, space is reserved exactly, write by write, so that a
/// new page meets ENOSPC as soon as the disk is full.
const HEADROOM_MIN_FREE: u64 = 1 << 30;

/// Largest write a drain makes of adjacent queued pages.
const DRAIN_WRITE: usize = 1 << 20;

impl State {
    /// Slots kept for rewrites of pages the overlay already holds: a write
    /// never overwrites a slot in place, so on a full disk a rewrite needs
    /// a slot too. New pages may not use these; rewrites may. Flushes give
    /// replaced slots back, so a guest that keeps flushing can keep
    /// rewriting its disk on a full host.
    fn rewrite_reserve(&self) -> u64 {
        (self.map.data_pages / 16).clamp(256, 16384)
    }

    /// Slots for pages of one write: `rewrite[i]` when page i already has
    /// one. `None`: no disk space (ENOSPC); nothing was taken. Without
    /// `pages` nothing is reserved (that may wait for the disk): `None`
    /// as well when space would have to be reserved.
    fn alloc(&mut self, pages: Option<&dyn DiskFile>, rewrite: &[bool]) -> Option<Vec<u64>> {
        let mut out = Vec::with_capacity(rewrite.len());
        let first_tail = self.next_slot;
        for _ in rewrite {
            match self.free.pop_first() {
                Some(s) => out.push(s),
                None => {
                    out.push(self.next_slot);
                    self.next_slot += 1;
                }
            }
        }
        // Tail slots taken by new pages are paid for with fresh space at
        // the end of the reservation, so new pages never eat the rewrite
        // reserve; rewrites may.
        let tail_new = rewrite
            .iter()
            .zip(&out)
            .filter(|(r, s)| !**r && **s >= first_tail)
            .count() as u64;
        let ok = if tail_new > 0 {
            let full = self.next_slot + self.rewrite_reserve();
            let min = self.reserved_end.max(self.next_slot - tail_new) + tail_new;
            (full <= self.reserved_end)
                || self.reserve_to(pages, full.max(min))
                || self.reserve_to(pages, min)
        } else {
            self.next_slot <= self.reserved_end || self.reserve_to(pages, self.next_slot)
        };
        if !ok {
            // Give everything back.
            self.next_slot = first_tail;
            self.free
                .extend(out.into_iter().filter(|&s| s < first_tail));
            return None;
        }
        Some(out)
    }

    /// Reserve space for every slot below `end`: exactly, so that a new
    /// page gets ENOSPC as soon as the disk is full (one fallocate per
    /// write that adds pages; rewrites within the reserve need none).
    fn reserve_to(&mut self, pages: Option<&dyn DiskFile>, end: u64) -> bool {
        let Some(pages) = pages else {
            return false;
        };
        let from = self.reserved_end;
        match pages.allocate(from * PAGE, (end - from) * PAGE) {
            Ok(()) => {}
            // Without fallocate there is nothing to reserve with.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => self.no_reserve = true,
            Err(_) => return false,
        }
        self.reserved_end = end;
        true
    }

    /// Reserve journal space ahead of appends (best effort: an append into
    /// space not reserved may still succeed).
    fn grow_journal(&mut self, need: u64) {
        if self.log_end + need <= self.journal_reserved {
            return;
        }
        let from = self.journal_reserved.max(self.log_end);
        if self.journal.allocate(from, GROW_JOURNAL.max(need)).is_ok() {
            self.journal_reserved = from + GROW_JOURNAL.max(need);
        }
    }
}

/// What opening found and did.
#[derive(Debug, Default, Clone)]
pub struct OpenReport {
    pub(crate) created: bool,
    /// Records after the last flush, and how many of them were kept.
    pub(crate) tail: u64,
    pub(crate) tail_kept: u64,
    pub(crate) compacted: bool,
}

pub struct PageStore {
    dir: Arc<dyn Dir>,
    pages: Arc<dyn DiskFile>,
    image_size: u64,
    npages: u64,
    identity: u64,
    state: Mutex<State>,
    /// Serialises flushes and compaction (held across their syncs; never
    /// taken by reads or writes).
    flushing: Mutex<()>,
    /// Set when a sync failed: what to tell writers.
    poisoned: Mutex<Option<String>>,
    /// Held by whoever puts queued writes on file (a drain, a flush, a
    /// compaction): one at a time, so records land in journal order.
    /// Taken before `state`, after `flushing`.
    drain_lock: Mutex<()>,
    /// The overlay is closing: a background drain that starts late has
    /// nothing to do and reserves nothing.
    closed: AtomicBool,
    /// Replaced slots held have reached `FLUSH_AFTER` (set by writes,
    /// cleared by a flush): read by every write without the state lock.
    flush_due: std::sync::atomic::AtomicBool,
}

fn io_err(dir: &dyn Dir, name: &str, what: &str, e: std::io::Error) -> Error {
    Error::io(format!("{what} {}", dir.path_of(name).display()), e)
}

fn refuse(dir: &dyn Dir, name: &str, e: HeaderError) -> Error {
    Error::new(
        ErrorKind::Corrupt,
        format!(
            "{}: {e}; refusing to open it, and leaving it untouched",
            dir.path_of(name).display()
        ),
    )
}

impl PageStore {
    /// Open the store in `dir` (creating it if it holds neither file) for
    /// an image of `image_size` bytes whose `base` record hashes to
    /// `identity`. Anything it cannot read is refused with an error naming
    /// the file; nothing is truncated or recreated.
    pub fn open(
        dir: Arc<dyn Dir>,
        image_size: u64,
        identity: u64,
    ) -> Result<(PageStore, OpenReport)> {
        let d = &*dir;
        let mut report = OpenReport::default();
        // A compaction that did not reach its rename: the old journal is
        // whole and current.
        d.remove(JOURNAL_NEW)
            .map_err(|e| io_err(d, JOURNAL_NEW, "removing", e))?;
        let has_j = d.exists(JOURNAL);
        let has_p = d.exists(PAGES);
        // `pages` alone, holding nothing but its header: a creation that
        // did not reach the journal's rename. Nothing was ever written.
        let unborn = !has_j
            && has_p
            && d.open(PAGES, false)
                .ok()
                .flatten()
                .and_then(|f| f.file_len().ok())
                .is_some_and(|l| l <= PAGE);
        if (!has_j && !has_p) || unborn {
            create(d, image_size, identity)?;
            report.created = true;
        } else if !has_j || !has_p {
            let (have, miss) = if has_j {
                (JOURNAL, PAGES)
            } else {
                (PAGES, JOURNAL)
            };
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "{} exists but {} does not: the overlay is incomplete; refusing to open it",
                    d.path_of(have).display(),
                    d.path_of(miss).display()
                ),
            ));
        }
        let open = |name: &str| -> Result<Arc<dyn DiskFile>> {
            d.open(name, false)
                .map_err(|e| io_err(d, name, "opening", e))?
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::NotFound,
                        format!("{} vanished", d.path_of(name).display()),
                    )
                })
        };
        let journal = open(JOURNAL)?;
        let pages = open(PAGES)?;
        let jh = read_header(d, JOURNAL, &*journal, JOURNAL_MAGIC)?;
        let ph = read_header(d, PAGES, &*pages, PAGES_MAGIC)?;
        for (name, h) in [(JOURNAL, &jh), (PAGES, &ph)] {
            if h.image_size != image_size || h.identity != identity {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!(
                        "{} belongs to another image (size {}, identity {:016x}; expected size {image_size}, identity {identity:016x}); refusing to open it",
                        d.path_of(name).display(),
                        h.image_size,
                        h.identity
                    ),
                ));
            }
        }
        let npages = image_size.div_ceil(PAGE);
        let store = PageStore {
            dir: dir.clone(),
            pages,
            image_size,
            npages,
            identity,
            state: Mutex::new(State {
                journal: journal.clone(),
                generation: jh.generation,
                log_end: RECORDS_START,
                map: PageMap::default(),
                free: BTreeSet::new(),
                next_slot: 1,
                pending_free: Vec::new(),
                records: 0,
                reserved_end: 0,
                journal_reserved: 0,
                no_reserve: false,
                queue: VecDeque::new(),
                staged: HashMap::new(),
                staged_bytes: 0,
                draining: false,
                flushed_end: 0,
            }),
            flushing: Mutex::new(()),
            poisoned: Mutex::new(None),
            drain_lock: Mutex::new(()),
            closed: AtomicBool::new(false),
            flush_due: Default::default(),
        };
        store.replay(&mut report)?;
        // Make what replay rebuilt durable before anything reuses a slot
        // it no longer references (a kill -9 leaves it in the page cache).
        // A store just created is durable already (`create` synced it).
        if !report.created {
            store
                .pages
                .sync()
                .map_err(|e| io_err(d, PAGES, "syncing", e))?;
            journal
                .sync()
                .map_err(|e| io_err(d, JOURNAL, "syncing", e))?;
        }
        if report.tail > 0 || store.bloated() {
            store.compact()?;
            report.compacted = true;
        }
        // So that the first writes can be accepted without waiting; not
        // for an overlay nothing was ever written to (most of a host's
        // VMs, at attach): its reserve would be megabytes on disk for each,
        // and its first write, on the blocking pool, reserves it.
        if store.data_pages() > 0 {
            store.top_up();
        }
        Ok((store, report))
    }

    fn replay(&self, report: &mut OpenReport) -> Result<()> {
        let d = &*self.dir;
        let mut st = self.state.lock().expect("state lock");
        let len = st
            .journal
            .file_len()
            .map_err(|e| io_err(d, JOURNAL, "reading", e))?;
        let mut buf = vec![0u8; len.saturating_sub(RECORDS_START) as usize];
        read_full(&*st.journal, &mut buf, RECORDS_START)
            .map_err(|e| io_err(d, JOURNAL, "reading", e))?;
        let mut recs: Vec<(u64, Record)> = Vec::new();
        let mut covered = RECORDS_START;
        for (i, chunk) in buf.chunks(RECORD).enumerate() {
            let pos = RECORDS_START + (i * RECORD) as u64;
            match Record::decode(chunk, st.generation, self.npages) {
                Some(Record::Flush { covered: x }) => covered = x.min(pos),
                Some(r) => recs.push((pos, r)),
                None => {}
            }
        }
        let mut page = vec![0u8; PAGE as usize];
        for (pos, r) in recs {
            let tail = pos >= covered;
            report.tail += tail as u64;
            match r {
                Record::Data { page: p, slot, crc } => {
                    if tail {
                        let n = self.page_len(p);
                        read_full(&*self.pages, &mut page[..n], slot * PAGE)
                            .map_err(|e| io_err(d, PAGES, "reading", e))?;
                        if crc32fast::hash(&page[..n]) != crc {
                            continue; // lost or torn since the last flush
                        }
                    }
                    st.map.set(p, 1, Some(Kind::Data { slot, crc }));
                }
                Record::Zero { page: p, count } => {
                    st.map.set(p, count, Some(Kind::Zero));
                }
                Record::Flush { .. } => unreachable!("flush records are not collected"),
            }
            report.tail_kept += tail as u64;
            st.records += 1;
        }
        st.log_end = RECORDS_START + buf.len().div_ceil(RECORD) as u64 * RECORD as u64;
        // Open syncs what replay found (see `open`): that is a flush.
        st.flushed_end = st.log_end;
        let mut used = BTreeSet::new();
        for e in st.map.ext.values() {
            if let Kind::Data { slot, .. } = e.kind {
                used.insert(slot);
            }
        }
        let next = used.last().map_or(1, |s| s + 1);
        // Gaps between used slots are free, but only those inside the
        // pages file: a gap past its end would be a huge set for nothing
        // (those slots are as good as new ones).
        let in_file = self
            .pages
            .file_len()
            .map_err(|e| io_err(d, PAGES, "reading", e))?
            .div_ceil(PAGE);
        let mut free = BTreeSet::new();
        let mut prev = 0;
        for &u in &used {
            free.extend(prev + 1..u.min(in_file).max(prev + 1));
            prev = u;
        }
        st.free = free;
        st.next_slot = next;
        // Slots below the end have their space; the reserve beyond is
        // taken again by the first write that needs it.
        st.reserved_end = next;
        Ok(())
    }

    fn bloated(&self) -> bool {
        let st = self.state.lock().expect("state lock");
        st.records > 2 * st.map.ext.len() as u64 + 32768
    }

    /// Bytes of page `p` (the last page of the image may be short).
    fn page_len(&self, p: u64) -> usize {
        PAGE.min(self.image_size - p * PAGE) as usize
    }

    /// Has so much been rewritten since the last flush that one is due?
    /// Replaced slots are held until a flush (see the module docs), so a
    /// guest that never flushes would grow `pages` and the list of held
    /// slots without bound; the overlay flushes on its own past this.
    pub(crate) fn wants_flush(&self) -> bool {
        self.flush_due.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Pages of guest data held (for listings and metrics: a counter).
    pub(crate) fn data_pages(&self) -> u64 {
        self.state.lock().expect("state lock").map.data_pages
    }

    /// Does the overlay hold anything (data or zero) in `[first, end)`?
    pub(crate) fn holds_any(&self, first: u64, end: u64) -> bool {
        self.state
            .lock()
            .expect("state lock")
            .map
            .any_in(first, end)
    }

    /// Where the pages `[first, end)` are, as runs `(first, count, piece)`.
    pub fn lookup(&self, first: u64, end: u64) -> Vec<(u64, u64, Piece)> {
        let st = self.state.lock().expect("state lock");
        let mut out: Vec<(u64, u64, Piece)> = Vec::new();
        for (s, n, k) in st.map.runs(first, end) {
            let piece = match k {
                None => Piece::Base,
                Some(Kind::Zero) => Piece::Zero,
                Some(Kind::Data { slot, crc }) => Piece::Data(vec![(slot, crc)]),
            };
            match (out.last_mut(), piece) {
                (Some((_, c, Piece::Data(v))), Piece::Data(w)) => {
                    *c += n;
                    v.extend(w);
                }
                (Some((_, c, Piece::Zero)), Piece::Zero) => *c += n,
                (Some((_, c, Piece::Base)), Piece::Base) => *c += n,
                (_, piece) => out.push((s, n, piece)),
            }
        }
        out
    }

    /// Read the data pages starting at page `first` from `slots` into
    /// `out` (which holds exactly those pages' bytes). Returns the pages
    /// that failed their CRC (their bytes in `out` are garbage). Blocks on
    /// the disk: not for the async workers (see `PageStore::read_slots_now`).
    pub fn read_slots(&self, first: u64, slots: &[(u64, u32)], out: &mut [u8]) -> Result<Vec<u64>> {
        Ok(self
            .read_slots_with(first, slots, out, false)?
            .unwrap_or_default())
    }

    /// [`PageStore::read_slots`] from the page cache only, for the async
    /// workers: `Ok(None)` when some page would have to come from the disk
    /// (or the file system cannot tell), and `out` is then partly written.
    pub(crate) fn read_slots_now(
        &self,
        first: u64,
        slots: &[(u64, u32)],
        out: &mut [u8],
    ) -> Result<Option<Vec<u64>>> {
        self.read_slots_with(first, slots, out, true)
    }

    fn read_slots_with(
        &self,
        first: u64,
        slots: &[(u64, u32)],
        out: &mut [u8],
        nowait: bool,
    ) -> Result<Option<Vec<u64>>> {
        // Pages of writes not drained yet are read from memory. A slot not
        // staged now is on file: a drain writes before it unstages.
        let staged: Vec<Option<Bytes>> = {
            let st = self.state.lock().expect("state lock");
            if st.staged.is_empty() {
                Vec::new()
            } else {
                slots.iter().map(|s| st.staged.get(&s.0).cloned()).collect()
            }
        };
        let staged_at = |k: usize| staged.get(k).and_then(|b| b.as_ref());
        let mut bad = Vec::new();
        let mut i = 0;
        let mut at = 0usize;
        while i < slots.len() {
            // A run of consecutive slots on file is one read.
            let mut j = i + 1;
            if staged_at(i).is_none() {
                while j < slots.len() && slots[j].0 == slots[j - 1].0 + 1 && staged_at(j).is_none()
                {
                    j += 1;
                }
            }
            let bytes: usize = (i..j).map(|k| self.page_len(first + k as u64)).sum();
            let buf = &mut out[at..at + bytes];
            let off = slots[i].0 * PAGE;
            let read = if let Some(b) = staged_at(i) {
                buf.copy_from_slice(&b[..bytes]);
                Ok(true)
            } else if nowait {
                read_full_nowait(&*self.pages, buf, off)
            } else {
                read_full(&*self.pages, buf, off).map(|()| true)
            };
            if !read.map_err(|e| io_err(&*self.dir, PAGES, "reading", e))? {
                return Ok(None);
            }
            let mut o = at;
            for (k, &(_, crc)) in slots.iter().enumerate().take(j).skip(i) {
                let n = self.page_len(first + k as u64);
                if crc32fast::hash(&out[o..o + n]) != crc {
                    bad.push(first + k as u64);
                }
                o += n;
            }
            at += bytes;
            i = j;
        }
        Ok(Some(bad))
    }

    fn poisoned(&self) -> bool {
        self.poisoned.lock().expect("poison lock").is_some()
    }

    fn check_poison(&self) -> Result<()> {
        match &*self.poisoned.lock().expect("poison lock") {
            Some(why) => Err(Error::new(ErrorKind::Io, why.clone())),
            None => Ok(()),
        }
    }

    fn poison(&self, what: &str, e: &std::io::Error) {
        let msg = format!(
            "overlay {}: {what} failed ({e}); what it held may not be on disk, so writes are refused until the export is added again",
            self.dir.path_of("").display()
        );
        tracing::error!("{msg}");
        *self.poisoned.lock().expect("poison lock") = Some(msg);
    }

    /// Append records; on error the journal end still moves past them (a
    /// prefix may have landed) so later records never overlap a torn one.
    fn append(&self, st: &mut State, recs: &[Record]) -> Result<u64> {
        let mut buf = Vec::with_capacity(recs.len() * RECORD);
        for r in recs {
            buf.extend_from_slice(&r.encode(st.generation));
        }
        st.grow_journal(buf.len() as u64);
        let pos = st.log_end;
        st.log_end += buf.len() as u64;
        st.records += recs.len() as u64;
        st.journal
            .write_at(&buf, pos)
            .map_err(|e| io_err(&*self.dir, JOURNAL, "writing", e))?;
        Ok(pos)
    }

    /// Append records that change the map. If that fails, a prefix of
    /// them may have landed, valid, and would win at the next replay over
    /// what the map says now (a later flush would even make them trusted):
    /// the store refuses further writes until it is opened again, when
    /// replay decides. Their slots stay allocated, so the bytes such a
    /// record names stay intact.
    fn append_or_poison(&self, st: &mut State, recs: &[Record]) -> Result<u64> {
        self.append(st, recs).inspect_err(|e| {
            self.poison("writing the journal", &std::io::Error::other(e.to_string()))
        })
    }

    /// Slots for a write of whole pages at page `first` whose pages are
    /// `crcs` (see [`page_crcs`]): `plan[i]` is page i's slot, `None` for a
    /// page recorded as zero. `pages`: as for [`State::alloc`] (`None`:
    /// reserve nothing, fail instead).
    fn plan(
        &self,
        st: &mut State,
        first: u64,
        crcs: &[Option<u32>],
        pages: Option<&dyn DiskFile>,
    ) -> Option<Vec<Option<u64>>> {
        debug_assert!(first + crcs.len() as u64 <= self.npages);
        let rewrite: Vec<bool> = (first..)
            .zip(crcs)
            .filter(|(_, c)| c.is_some())
            .map(|(p, _)| st.map.holds_data(p))
            .collect();
        let mut slots = st.alloc(pages, &rewrite)?.into_iter();
        Some(crcs.iter().map(|c| c.and_then(|_| slots.next())).collect())
    }

    /// Write whole pages starting at page `first` (`data` may end short
    /// only at the image end). All-zero pages become zero records unless
    /// `keep_zeros`. The caller serialises writers of the same pages.
    /// Waits for the disk: for the blocking pool.
    pub(crate) fn write(&self, first: u64, data: &[u8], keep_zeros: bool) -> Result<()> {
        self.check_poison()?;
        let crcs = page_crcs(data, keep_zeros);
        let plan = {
            let mut st = self.state.lock().expect("state lock");
            self.plan(&mut st, first, &crcs, Some(&*self.pages))
        };
        let Some(plan) = plan else {
            return Err(Error::new(
                ErrorKind::NoSpace,
                format!(
                    "no space left for overlay pages in {} (No space left on device)",
                    self.dir.path_of(PAGES).display()
                ),
            ));
        };
        // Data first: runs of consecutive pages in consecutive slots are
        // one write.
        for (i, j, s0) in slot_runs(&plan) {
            let bytes = &data[i * PAGE as usize..(j * PAGE as usize).min(data.len())];
            if let Err(e) = self.pages.write_at(bytes, s0 * PAGE) {
                // No record points at these slots: they are free again.
                let mut st = self.state.lock().expect("state lock");
                st.free.extend(plan.iter().flatten());
                return Err(io_err(&*self.dir, PAGES, "writing", e));
            }
        }
        // Then the records, and the map.
        let recs = records(first, &plan, &crcs);
        self.append_records(&recs, false)?;
        self.top_up();
        Ok(())
    }

    /// Append records that change the map and apply them (`punch`: the
    /// slots they replace are given back to the disk when reusable). The
    /// records go through the queue, written by a drain here, so that no
    /// journal write happens under the state lock the async workers take;
    /// without reserved journal room they are written under it, growing
    /// the journal (see [`PageStore::append`]). On return they are on file.
    fn append_records(&self, recs: &[Record], punch: bool) -> Result<()> {
        let mut st = self.state.lock().expect("state lock");
        let pos = if !st.no_reserve && journal_room(&st, recs.len()) {
            let pos = take_journal(&mut st, recs);
            let job = Job {
                data: Vec::new(),
                pos,
                recs: encode(recs, st.generation),
            };
            st.queue.push_back(job);
            pos
        } else {
            self.append_or_poison(&mut st, recs)?
        };
        apply(&mut st, recs, pos, punch);
        self.note_held(&st);
        drop(st);
        self.drain(false);
        self.check_poison()
    }

    /// [`PageStore::write`] without waiting for the disk, for the async
    /// workers: the write is accepted (slots, records and map taken now;
    /// its bytes kept in memory and read from there) and queued for a
    /// drain; the caller then gives [`PageStore::claim_drain`] its turn.
    /// `None` when it would have to wait: space to reserve, the memory
    /// for accepted writes full, or no way to reserve space at all.
    pub(crate) fn write_now(
        &self,
        first: u64,
        data: &[u8],
        keep_zeros: bool,
    ) -> Option<Result<()>> {
        if let Err(e) = self.check_poison() {
            return Some(Err(e));
        }
        if data.len() > STAGE_LIMIT {
            return None;
        }
        // Copied and checksummed before the state lock is taken: readers
        // on the async workers take it too.
        let bytes = Bytes::copy_from_slice(data);
        let crcs = page_crcs(data, keep_zeros);
        let mut st = self.state.lock().expect("state lock");
        // At most one record per page: checked before any slot is taken,
        // so that declining leaves nothing to give back.
        if st.no_reserve
            || st.staged_bytes + data.len() > STAGE_LIMIT
            || !journal_room(&st, crcs.len())
        {
            return None;
        }
        let plan = self.plan(&mut st, first, &crcs, None)?;
        let recs = records(first, &plan, &crcs);
        let pos = take_journal(&mut st, &recs);
        let mut job = Job {
            data: Vec::new(),
            pos,
            recs: encode(&recs, st.generation),
        };
        apply(&mut st, &recs, pos, false);
        self.note_held(&st);
        for (i, j, s0) in slot_runs(&plan) {
            let run = bytes.slice(i * PAGE as usize..(j * PAGE as usize).min(data.len()));
            for k in i..j {
                let page = bytes
                    .slice(k * PAGE as usize..(k * PAGE as usize + PAGE as usize).min(data.len()));
                st.staged_bytes += page.len();
                st.staged.insert(s0 + (k - i) as u64, page);
            }
            job.data.push((s0, run));
        }
        st.queue.push_back(job);
        Some(Ok(()))
    }

    /// Keep `flush_due` in step with the replaced slots held.
    fn note_held(&self, st: &State) {
        self.flush_due.store(
            st.pending_free.len() >= FLUSH_AFTER,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Pages `[first, first + count)` read as zeroes from now on; their
    /// space is given back once a flush has made that durable.
    pub(crate) fn zero(&self, first: u64, count: u64) -> Result<()> {
        self.check_poison()?;
        if count == 0 {
            return Ok(());
        }
        self.append_records(&[Record::Zero { page: first, count }], true)
    }

    /// [`PageStore::zero`] without waiting for the disk (see
    /// [`PageStore::write_now`]): `None` when the journal has no reserved
    /// room for its record.
    pub(crate) fn zero_now(&self, first: u64, count: u64) -> Option<Result<()>> {
        if let Err(e) = self.check_poison() {
            return Some(Err(e));
        }
        if count == 0 {
            return Some(Ok(()));
        }
        let mut st = self.state.lock().expect("state lock");
        if st.no_reserve || !journal_room(&st, 1) {
            return None;
        }
        let recs = [Record::Zero { page: first, count }];
        let pos = take_journal(&mut st, &recs);
        let job = Job {
            data: Vec::new(),
            pos,
            recs: encode(&recs, st.generation),
        };
        apply(&mut st, &recs, pos, true);
        self.note_held(&st);
        st.queue.push_back(job);
        Some(Ok(()))
    }

    /// Claim the background drain: true when accepted writes are queued
    /// and no drain is claimed. The caller MUST then run
    /// [`PageStore::drain`] with `background` (on the blocking pool).
    pub(crate) fn claim_drain(&self) -> bool {
        let mut st = self.state.lock().expect("state lock");
        if st.draining || st.queue.is_empty() {
            return false;
        }
        st.draining = true;
        true
    }

    /// Put the queued writes on file, oldest first, in batches: each
    /// batch's pages, then its records. Waits for the disk. `background`:
    /// run by the claimer of [`PageStore::claim_drain`], which gives the
    /// claim back when it finds the queue empty. A failed write poisons
    /// the store (the writes were acknowledged) and drops the queue; their
    /// bytes stay staged, so reads still see them until the overlay is
    /// opened again and replay decides.
    pub(crate) fn drain(&self, background: bool) {
        let _d = self.drain_lock.lock().expect("drain lock");
        loop {
            let (jobs, journal) = {
                let mut st = self.state.lock().expect("state lock");
                if st.queue.is_empty() || self.poisoned() {
                    st.queue.clear();
                    if background {
                        st.draining = false;
                    }
                    break;
                }
                (std::mem::take(&mut st.queue), st.journal.clone())
            };
            let written = self
                .put_pages(&jobs)
                .and_then(|()| self.put_records(&jobs, &*journal));
            if let Err((name, e)) = written {
                self.poison(&format!("writing {name}"), &e);
                continue;
            }
            let mut st = self.state.lock().expect("state lock");
            unstage(&mut st, &jobs);
        }
        drop(_d);
        self.top_up();
    }

    /// Write the pages of `jobs`: adjacent slots (of any jobs) in one write.
    fn put_pages(
        &self,
        jobs: &VecDeque<Job>,
    ) -> std::result::Result<(), (&'static str, std::io::Error)> {
        let mut runs: Vec<(u64, &Bytes)> = jobs
            .iter()
            .flat_map(|j| j.data.iter().map(|(s, b)| (*s, b)))
            .collect();
        runs.sort_unstable_by_key(|r| r.0);
        let mut i = 0;
        while i < runs.len() {
            let off = runs[i].0 * PAGE;
            let mut end = off + runs[i].1.len() as u64;
            let mut j = i + 1;
            while j < runs.len()
                && runs[j].0 * PAGE == end
                && (end - off) as usize + runs[j].1.len() <= DRAIN_WRITE
            {
                end += runs[j].1.len() as u64;
                j += 1;
            }
            let res = if j == i + 1 {
                self.pages.write_at(runs[i].1, off)
            } else {
                let buf: Vec<u8> = runs[i..j]
                    .iter()
                    .flat_map(|r| r.1.iter().copied())
                    .collect();
                self.pages.write_at(&buf, off)
            };
            res.map_err(|e| (PAGES, e))?;
            i = j;
        }
        Ok(())
    }

    /// Write the records of `jobs` (in journal order): adjacent ones in
    /// one write.
    fn put_records(
        &self,
        jobs: &VecDeque<Job>,
        journal: &dyn DiskFile,
    ) -> std::result::Result<(), (&'static str, std::io::Error)> {
        let mut i = 0;
        let jobs: Vec<&Job> = jobs.iter().collect();
        while i < jobs.len() {
            let pos = jobs[i].pos;
            let mut end = pos + jobs[i].recs.len() as u64;
            let mut j = i + 1;
            while j < jobs.len() && jobs[j].pos == end {
                end += jobs[j].recs.len() as u64;
                j += 1;
            }
            let res = if j == i + 1 {
                journal.write_at(&jobs[i].recs, pos)
            } else {
                let buf: Vec<u8> = jobs[i..j]
                    .iter()
                    .flat_map(|r| r.recs.iter().copied())
                    .collect();
                journal.write_at(&buf, pos)
            };
            res.map_err(|e| (JOURNAL, e))?;
            i = j;
        }
        Ok(())
    }

    /// Reserve slots and journal space ahead of need, outside the state
    /// lock (fallocate may wait for the disk; readers and inline writers
    /// take that lock): HEADROOM slots past the rewrite reserve and
    /// GROW_JOURNAL journal bytes, when the file system has room to spare.
    fn top_up(&self) {
        if self.closed.load(Ordering::Relaxed) {
            return;
        }
        let (slots, bytes, journal) = {
            let st = self.state.lock().expect("state lock");
            if st.no_reserve {
                return;
            }
            let want = st.next_slot + st.rewrite_reserve() + HEADROOM;
            let slots = (st.reserved_end + HEADROOM / 2 < want).then_some((st.reserved_end, want));
            let from = st.journal_reserved.max(st.log_end);
            let bytes = (st.journal_reserved < st.log_end + GROW_JOURNAL / 2)
                .then_some((from, from + GROW_JOURNAL));
            (slots, bytes, st.journal.clone())
        };
        if slots.is_none() && bytes.is_none() {
            return;
        }
        if !self.dir.free_space().is_ok_and(|f| f >= HEADROOM_MIN_FREE) {
            return;
        }
        if let Some((from, to)) = slots {
            let r = self.pages.allocate(from * PAGE, (to - from) * PAGE);
            let mut st = self.state.lock().expect("state lock");
            match r {
                // Slots below `from` were reserved already; whatever was
                // reserved meanwhile lies below `to` or beyond it.
                Ok(()) => st.reserved_end = st.reserved_end.max(to),
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => st.no_reserve = true,
                Err(_) => {}
            }
        }
        if let Some((from, to)) = bytes {
            if journal.allocate(from, to - from).is_ok() {
                let mut st = self.state.lock().expect("state lock");
                // Not if a compaction replaced the journal meanwhile.
                if Arc::ptr_eq(&st.journal, &journal) {
                    st.journal_reserved = st.journal_reserved.max(to);
                }
            }
        }
    }

    /// Put every queued write on file and stop background drains from
    /// doing anything more: the overlay is going away, its directory lock
    /// with it, and another may open the files next.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.drain(false);
    }

    /// Forget the queued writes, as a killed process would (tests).
    #[cfg(test)]
    pub(crate) fn abandon(&self) {
        let mut st = self.state.lock().expect("state lock");
        st.queue.clear();
    }

    /// Make every write that completed before this call durable.
    pub(crate) fn flush(&self) -> Result<()> {
        self.check_poison()?;
        let _f = self.flushing.lock().expect("flush lock");
        let (x, journal) = {
            let st = self.state.lock().expect("state lock");
            if st.log_end == st.flushed_end && st.pending_free.is_empty() {
                // Nothing was written since the last flush: nothing to make
                // durable, and no marker to add (an idle overlay's journal
                // does not grow).
                return Ok(());
            }
            (st.log_end, st.journal.clone())
        };
        // Every record before `x` must be on file, its page too, before
        // the syncs below vouch for them.
        self.drain(false);
        self.check_poison()?;
        if let Err(e) = self.pages.sync() {
            self.poison("syncing pages", &e);
            return Err(io_err(&*self.dir, PAGES, "syncing", e));
        }
        let marker_end = {
            let marker = [Record::Flush { covered: x }];
            let mut st = self.state.lock().expect("state lock");
            if !st.no_reserve && journal_room(&st, 1) {
                let pos = take_journal(&mut st, &marker);
                let job = Job {
                    data: Vec::new(),
                    pos,
                    recs: encode(&marker, st.generation),
                };
                st.queue.push_back(job);
                pos
            } else {
                self.append(&mut st, &marker)?
            }
        } + RECORD as u64;
        // The marker, and whatever was accepted meanwhile, goes on file
        // outside the state lock.
        self.drain(false);
        self.check_poison()?;
        if let Err(e) = journal.sync() {
            self.poison("syncing the journal", &e);
            return Err(io_err(&*self.dir, JOURNAL, "syncing", e));
        }
        let punch = {
            let mut st = self.state.lock().expect("state lock");
            if st.log_end == marker_end {
                st.flushed_end = marker_end;
            }
            let mut punch = Vec::new();
            let mut keep = Vec::new();
            for (pos, slot, p) in std::mem::take(&mut st.pending_free) {
                if pos < x {
                    st.free.insert(slot);
                    if p {
                        punch.push(slot);
                    }
                } else {
                    keep.push((pos, slot, p));
                }
            }
            st.pending_free = keep;
            self.note_held(&st);
            punch
        };
        self.punch(punch);
        if self.bloated() {
            drop(_f);
            // The flush is done; a compaction that fails (a full disk)
            // leaves the old journal, whole, and is tried again later.
            if let Err(e) = self.compact() {
                tracing::warn!(error = %e, "overlay journal compaction failed");
            }
        }
        Ok(())
    }

    /// Give freed slots' space back (runs of slots in one call). Failure
    /// only means the space is not returned.
    fn punch(&self, mut slots: Vec<u64>) {
        slots.sort_unstable();
        let mut i = 0;
        while i < slots.len() {
            let mut j = i + 1;
            while j < slots.len() && slots[j] == slots[j - 1] + 1 {
                j += 1;
            }
            if let Err(e) = self.pages.punch(slots[i] * PAGE, (j - i) as u64 * PAGE) {
                tracing::debug!(error = %e, "punching freed overlay slots");
            }
            i = j;
        }
    }

    /// Rewrite the journal as one record per extent of the map: written
    /// beside the old one, then renamed over it. Holds the state lock
    /// throughout, so the map it writes is the map as it is.
    fn compact(&self) -> Result<()> {
        self.check_poison()?;
        let _f = self.flushing.lock().expect("flush lock");
        let _d = self.drain_lock.lock().expect("drain lock");
        let d = &*self.dir;
        let mut st = self.state.lock().expect("state lock");
        // The new journal describes the map, accepted writes included:
        // their pages must be on file before the sync below (their records
        // are not needed).
        let jobs = std::mem::take(&mut st.queue);
        if let Err((name, e)) = self.put_pages(&jobs) {
            self.poison(&format!("writing {name}"), &e);
            return Err(io_err(d, name, "writing", e));
        }
        unstage(&mut st, &jobs);
        // Writes since the last flush have no synced data yet.
        if let Err(e) = self.pages.sync() {
            self.poison("syncing pages", &e);
            return Err(io_err(d, PAGES, "syncing", e));
        }
        let generation = st.generation + 1;
        let mut buf = Header {
            magic: *JOURNAL_MAGIC,
            generation,
            image_size: self.image_size,
            identity: self.identity,
        }
        .encode();
        let mut records = 0u64;
        let mut zero: Option<(u64, u64)> = None;
        let mut push = |r: Record, buf: &mut Vec<u8>| {
            buf.extend_from_slice(&r.encode(generation));
            records += 1;
        };
        for (&k, e) in &st.map.ext {
            match e.kind {
                Kind::Zero => match &mut zero {
                    Some((s, n)) if *s + *n == k => *n += e.len,
                    _ => {
                        if let Some((s, n)) = zero.take() {
                            push(Record::Zero { page: s, count: n }, &mut buf);
                        }
                        zero = Some((k, e.len));
                    }
                },
                Kind::Data { slot, crc } => {
                    if let Some((s, n)) = zero.take() {
                        push(Record::Zero { page: s, count: n }, &mut buf);
                    }
                    push(Record::Data { page: k, slot, crc }, &mut buf);
                }
            }
        }
        if let Some((s, n)) = zero.take() {
            push(Record::Zero { page: s, count: n }, &mut buf);
        }
        let end = buf.len() as u64;
        buf.extend_from_slice(&Record::Flush { covered: end }.encode(generation));
        let new = d
            .open(JOURNAL_NEW, true)
            .map_err(|e| io_err(d, JOURNAL_NEW, "creating", e))?
            .expect("created");
        if let Err(e) = new.write_at(&buf, 0).and_then(|_| new.sync()) {
            let _ = d.remove(JOURNAL_NEW);
            return Err(io_err(d, JOURNAL_NEW, "writing", e));
        }
        d.rename(JOURNAL_NEW, JOURNAL)
            .map_err(|e| io_err(d, JOURNAL, "replacing", e))?;
        if let Err(e) = d.sync() {
            // Either journal may be the one on disk now: both describe
            // durable data, but slots must not be reused until one is.
            self.poison("syncing the overlay directory", &e);
            return Err(io_err(d, "", "syncing", e));
        }
        st.journal = new;
        st.generation = generation;
        st.log_end = buf.len() as u64;
        // Nothing of the new journal is reserved yet.
        st.journal_reserved = st.log_end;
        st.flushed_end = st.log_end;
        st.records = records;
        // Nothing durable points at replaced slots any more.
        let mut punch = Vec::new();
        for (_, slot, p) in std::mem::take(&mut st.pending_free) {
            st.free.insert(slot);
            if p {
                punch.push(slot);
            }
        }
        self.note_held(&st);
        drop(st);
        self.punch(punch);
        Ok(())
    }

    /// Verify every data page; returns the pages that fail their CRC.
    pub(crate) fn check(&self) -> Result<Vec<u64>> {
        let all = self.lookup(0, self.npages);
        let mut bad = Vec::new();
        for (first, count, piece) in all {
            if let Piece::Data(slots) = piece {
                let bytes: usize = (0..count).map(|k| self.page_len(first + k)).sum();
                let mut buf = vec![0u8; bytes];
                bad.extend(self.read_slots(first, &slots, &mut buf)?);
            }
        }
        Ok(bad)
    }

    /// Repair: pages that fail their CRC read as zeroes from now on (their
    /// content is lost); everything else is kept. Durable on return.
    pub(crate) fn repair(&self, bad: &[u64]) -> Result<()> {
        for &p in bad {
            self.zero(p, 1)?;
        }
        self.flush()
    }
}

impl Drop for PageStore {
    /// Accepted writes go on file (a clean close loses nothing).
    fn drop(&mut self) {
        self.drain(false);
    }
}

/// The bytes of page `i` of a write's `data` (the last may be short).
fn page_of(data: &[u8], i: u64) -> &[u8] {
    let s = (i * PAGE) as usize;
    &data[s..(s + PAGE as usize).min(data.len())]
}

/// Runs `(i, j, s0)` of a write's pages `i..j` planned in consecutive
/// slots from `s0` (pages recorded as zero have none).
fn slot_runs(plan: &[Option<u64>]) -> Vec<(usize, usize, u64)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < plan.len() {
        let Some(s0) = plan[i] else {
            i += 1;
            continue;
        };
        let mut j = i + 1;
        while j < plan.len() && plan[j] == Some(s0 + (j - i) as u64) {
            j += 1;
        }
        out.push((i, j, s0));
        i = j;
    }
    out
}

/// Per page of a write's `data`: its CRC, or `None` for a page recorded
/// as zero (all zero, and not `keep_zeros`).
fn page_crcs(data: &[u8], keep_zeros: bool) -> Vec<Option<u32>> {
    (0..(data.len() as u64).div_ceil(PAGE))
        .map(|i| {
            let page = page_of(data, i);
            (keep_zeros || !crate::block::is_zero(page)).then(|| crc32fast::hash(page))
        })
        .collect()
}

/// The records of a write at page `first` of pages `crcs`, planned as
/// `plan`.
fn records(first: u64, plan: &[Option<u64>], crcs: &[Option<u32>]) -> Vec<Record> {
    let n = plan.len() as u64;
    let mut recs = Vec::with_capacity(plan.len());
    let mut zero_from: Option<u64> = None;
    for (i, slot) in plan.iter().enumerate() {
        let p = first + i as u64;
        match slot {
            None => {
                zero_from.get_or_insert(p);
            }
            Some(slot) => {
                if let Some(z) = zero_from.take() {
                    recs.push(Record::Zero {
                        page: z,
                        count: p - z,
                    });
                }
                recs.push(Record::Data {
                    page: p,
                    slot: *slot,
                    crc: crcs[i].expect("a page with a slot has a CRC"),
                });
            }
        }
    }
    if let Some(z) = zero_from {
        recs.push(Record::Zero {
            page: z,
            count: first + n - z,
        });
    }
    recs
}

fn encode(recs: &[Record], generation: u64) -> Vec<u8> {
    let mut buf = Vec::with_capacity(recs.len() * RECORD);
    for r in recs {
        buf.extend_from_slice(&r.encode(generation));
    }
    buf
}

/// Put a write's records (at journal offset `pos`) into the map; the
/// slots they replace are reusable after a flush covering `pos` (and
/// `punch`ed then).
fn apply(st: &mut State, recs: &[Record], pos: u64, punch: bool) {
    for r in recs {
        let freed = match *r {
            Record::Data { page, slot, crc } => st.map.set(page, 1, Some(Kind::Data { slot, crc })),
            Record::Zero { page, count } => st.map.set(page, count, Some(Kind::Zero)),
            Record::Flush { .. } => unreachable!("writes have no flush records"),
        };
        for s in freed {
            st.pending_free.push((pos, s, punch));
        }
    }
}

/// Is there reserved journal room for `n` more records? A write accepted
/// without waiting must not meet ENOSPC when it is drained.
fn journal_room(st: &State, n: usize) -> bool {
    st.log_end + (n * RECORD) as u64 <= st.journal_reserved
}

/// Room at the journal end for `recs` (checked with [`journal_room`]):
/// their offset.
fn take_journal(st: &mut State, recs: &[Record]) -> u64 {
    let len = (recs.len() * RECORD) as u64;
    debug_assert!(st.log_end + len <= st.journal_reserved);
    let pos = st.log_end;
    st.log_end += len;
    st.records += recs.len() as u64;
    pos
}

/// The pages of `jobs` are on file: reads go there from now on.
fn unstage(st: &mut State, jobs: &VecDeque<Job>) {
    for job in jobs {
        for (s0, run) in &job.data {
            for k in 0..(run.len() as u64).div_ceil(PAGE) {
                if let Some(b) = st.staged.remove(&(s0 + k)) {
                    st.staged_bytes -= b.len();
                }
            }
        }
    }
}

fn read_header(d: &dyn Dir, name: &str, f: &dyn DiskFile, magic: &[u8; 8]) -> Result<Header> {
    let mut h = vec![0u8; PAGE as usize];
    read_full(f, &mut h, 0).map_err(|e| io_err(d, name, "reading", e))?;
    Header::decode(&h, magic).map_err(|e| refuse(d, name, e))
}

/// A new, empty store: `pages` with its header, then the journal renamed
/// into place (its presence says the store is complete).
fn create(d: &dyn Dir, image_size: u64, identity: u64) -> Result<()> {
    let header = |magic: &[u8; 8]| {
        Header {
            magic: *magic,
            generation: 1,
            image_size,
            identity,
        }
        .encode()
    };
    let pages = d
        .open(PAGES, true)
        .map_err(|e| io_err(d, PAGES, "creating", e))?
        .expect("created");
    pages
        .write_at(&header(PAGES_MAGIC), 0)
        .and_then(|_| pages.sync())
        .map_err(|e| io_err(d, PAGES, "writing", e))?;
    let j = d
        .open(JOURNAL_NEW, true)
        .map_err(|e| io_err(d, JOURNAL_NEW, "creating", e))?
        .expect("created");
    j.write_at(&header(JOURNAL_MAGIC), 0)
        .and_then(|_| j.sync())
        .map_err(|e| io_err(d, JOURNAL_NEW, "writing", e))?;
    d.rename(JOURNAL_NEW, JOURNAL)
        .and_then(|_| d.sync())
        .map_err(|e| io_err(d, JOURNAL, "creating", e))
}

#[cfg(test)]
mod tests;
