//! Adaptive sequential readahead, one per export, between the export (or
//! its overlay) and the shared cache:
//!
//! ```text
//!   export -> [overlay] -> readahead -> cache -> origin
//! ```
//!
//! A guest booting or copying reads long sequential runs, one request at a
//! time; each cold request would cost a full origin round trip. Readahead
//! watches a few streams per export; a read that continues a stream keeps
//! the cache filled a window ahead, and the window doubles (up to
//! [`MAX_WINDOW`]) each time the reader has consumed a whole window, so a
//! stream earns its window by reading and one that stops leaves little
//! fetched for nothing; a stream that is not continued is forgotten (least
//! recently used of [`STREAMS`]), so a new one starts small again.
//!
//! Readahead never delays the read that triggered it: it is a spawned
//! background fetch, started only if a permit is free at once (per export:
//! [`MAX_INFLIGHT`] fetches of at most [`MAX_WINDOW`] bytes; per image: the
//! cache's background permits), otherwise skipped.
//!
//! A miss that is no stream's fetches only its own blocks (the cache block
//! is a 4 KiB page by default), unless it lands next to another recent miss
//! ([`CELL`]-sized neighbourhoods, the last [`RECENT`] remembered): data
//! laid out together is read together (a file system's inode table and
//! directories, a small file read in pieces, a database page's neighbours),
//! and one fetch of the whole cell saves the round trips of the reads that
//! follow. Scattered random reads rarely meet a recent cell (32 cells of a
//! 1 GiB image are 0.2% of it), so they stay at the bytes they ask for.

use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

use crate::block::ByteRange;
use crate::cache::ImageCache;
use crate::device::{BlockDevice, BoxFuture, Extent, ReadData};
use crate::error::Result;
use crate::stats::Work;

/// Streams tracked per export (a VM reading a few files at once).
const STREAMS: usize = 8;
/// Window of a stream's first readahead.
const MIN_WINDOW: u64 = 256 << 10;
/// Largest window: a few round trips' worth at 1 Gbit/s and 10 ms.
const MAX_WINDOW: u64 = 8 << 20;
/// Readahead fetches in flight per export.
const MAX_INFLIGHT: usize = 4;
/// A read starting this far behind a stream's end still belongs to it
/// (re-reads, requests of a sequential run delivered out of order).
const BEHIND: u64 = 1 << 20;
/// Largest forward gap that still continues a stream.
const MAX_GAP: u64 = 1 << 20;
/// The neighbourhood a miss next to a recent miss fetches whole.
const CELL: u64 = 64 << 10;
/// Recent misses (their cells) remembered per export.
const RECENT: usize = 32;

#[derive(Debug, Clone, Copy, Default)]
struct Stream {
    /// Where the stream's next read is expected.
    next: u64,
    /// Current window (0 = slot unused).
    window: u64,
    /// Readahead has been started up to here (exclusive).
    ahead: u64,
    /// Sequential reads seen in a row.
    run: u32,
    /// Where the stream was when its window last grew: it grows again only
    /// once the reader has consumed a whole window past that point.
    grown_at: u64,
    /// For least-recently-used replacement.
    tick: u64,
}

#[derive(Default)]
struct Streams {
    s: [Stream; STREAMS],
    tick: u64,
    /// Cells of recent misses that were no stream's (+1: 0 = empty slot).
    recent: [u64; RECENT],
    next_recent: usize,
}

impl Streams {
    /// Remember the miss at `r`; true if a recent one was in the same or
    /// an adjacent cell.
    fn near_recent_miss(&mut self, r: ByteRange) -> bool {
        let (c0, c1) = (r.offset / CELL + 1, (r.end() - 1) / CELL + 1);
        let near = self
            .recent
            .iter()
            .any(|&c| c != 0 && c + 1 >= c0 && c <= c1 + 1);
        self.recent[self.next_recent] = c0;
        self.next_recent = (self.next_recent + 1) % RECENT;
        near
    }
}

pub(crate) struct Readahead {
    cache: ImageCache,
    streams: Mutex<Streams>,
    inflight: Arc<Semaphore>,
}

impl Readahead {
    pub(crate) fn new(cache: ImageCache) -> Self {
        Readahead {
            cache,
            streams: Mutex::new(Streams::default()),
            inflight: Arc::new(Semaphore::new(MAX_INFLIGHT)),
        }
    }

    /// Account for a guest read; start readahead if it continues a stream.
    fn observe(&self, r: ByteRange) {
        if r.is_empty() {
            return;
        }
        let want = {
            let mut st = self.streams.lock().unwrap_or_else(|p| p.into_inner());
            st.tick += 1;
            let tick = st.tick;
            let size = self.cache.image_size();
            let max_fetch = self.cache.max_fetch().max(MIN_WINDOW);
            // Forward, a stream continues only across a small gap (a few
            // requests of this size delivered out of order), so random
            // reads near each other do not look sequential.
            let ahead = (r.len * 3).min(MAX_GAP);
            let hit = st.s.iter().position(|s| {
                s.window > 0 && r.offset + BEHIND >= s.next && r.offset <= s.next + ahead
            });
            match hit {
                Some(i) => {
                    let s = &mut st.s[i];
                    s.tick = tick;
                    if r.offset < s.next {
                        // A re-read, an overlapping read or a late arrival:
                        // part of the stream, but no sequential progress.
                        return;
                    }
                    s.next = r.end();
                    s.run += 1;
                    // The window doubles only after the reader has used a
                    // whole window's worth since it last grew: what a
                    // stream that stops leaves fetched and unread is then
                    // at most about what it read, not MAX_WINDOW (a boot
                    // reads many files of a few hundred KiB in order).
                    if s.run > 2 && s.next >= s.grown_at + s.window {
                        s.window = (s.window * 2).min(MAX_WINDOW);
                        s.grown_at = s.next;
                    }
                    // Top up when less than half a window is left ahead.
                    // Ranges end on a grid (the window, up to one origin
                    // request), so readers of one image at different
                    // offsets (many VMs, one template) claim the same whole
                    // cells and join each other's fetches instead of
                    // splitting them into slivers.
                    let grid = s.window.min(max_fetch);
                    // Rounded down: never further than the window (the
                    // grid is at most the window, so this is past `next`).
                    let target = ((s.next + s.window) / grid * grid).min(size);
                    if s.run >= 2 && s.ahead < s.next + s.window / 2 && target > s.ahead.max(s.next)
                    {
                        // The reader has outrun readahead: restart at this
                        // very read, so the read joins the readahead fetch
                        // instead of claiming a sliver of its own (the
                        // range still ends on the grid).
                        let from = if s.ahead >= s.next {
                            s.ahead
                        } else {
                            s.ahead.max(r.offset)
                        };
                        Some((
                            i,
                            ByteRange {
                                offset: from,
                                len: target - from,
                            },
                        ))
                    } else {
                        None
                    }
                }
                None => {
                    let bs = self.cache.block_size().bytes();
                    if bs < CELL && self.cache.is_missing(r.offset / bs) && st.near_recent_miss(r) {
                        // Planned before the read reaches the cache, which
                        // joins these fetches for its own blocks.
                        let from = r.offset / CELL * CELL;
                        let to = r.end().div_ceil(CELL).saturating_mul(CELL).min(size);
                        self.cache.prefetch(ByteRange {
                            offset: from,
                            len: to - from,
                        });
                    }
                    let i = (0..STREAMS).min_by_key(|&i| st.s[i].tick).unwrap_or(0);
                    st.s[i] = Stream {
                        next: r.end(),
                        window: MIN_WINDOW,
                        ahead: r.end(),
                        run: 1,
                        grown_at: r.end(),
                        tick,
                    };
                    None
                }
            }
        };
        let Some((i, range)) = want else { return };
        let bs = self.cache.block_size();
        if !bs.covering(range).any(|b| self.cache.is_missing(b)) {
            // Already local: nothing to fetch, but the stream moves on.
            self.advance(i, range.end());
            return;
        }
        let Ok(mine) = self.inflight.clone().try_acquire_owned() else {
            return;
        };
        let Ok(image) = self.cache.background_permits().clone().try_acquire_owned() else {
            return;
        };
        self.advance(i, range.end());
        // Planned here, before the triggering read goes to the cache: when
        // the range covers that read, the read joins these fetches.
        match self.cache.start_background(range, Work::Readahead) {
            // A full disk (see `ImageCache::storing`): nothing it fetched
            // could be kept.
            Err(e) => tracing::debug!(error = %e, %range, "readahead not started"),
            // Everything is cached or on its way (another export of the
            // image leads this stretch): give the permits back at once, so
            // they go to fetches that bring something.
            Ok(f) if f.claimed_blocks() == 0 => {}
            Ok(f) => {
                tokio::spawn(async move {
                    let _permits = (mine, image);
                    if let Err(e) = f.finish().await {
                        tracing::debug!(error = %e, %range, "readahead fetch failed");
                    }
                });
            }
        }
    }

    fn advance(&self, i: usize, to: u64) {
        let mut st = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        st.s[i].ahead = st.s[i].ahead.max(to);
    }
}

impl BlockDevice for Readahead {
    fn size(&self) -> u64 {
        self.cache.size()
    }

    fn read(&self, r: ByteRange) -> BoxFuture<'_, Result<ReadData>> {
        self.observe(r);
        self.cache.read(r)
    }

    fn extents(&self, r: ByteRange) -> Result<Vec<Extent>> {
        self.cache.extents(r)
    }

    fn prefetch(&self, r: ByteRange) {
        self.cache.prefetch(r)
    }

    fn read_now(&self, r: ByteRange) -> Option<Result<ReadData>> {
        // Only a read that will be answered counts here: `None` means the
        // caller comes back through `read`, which observes it then.
        let res = self.cache.read_now(r);
        if res.is_some() {
            self.observe(r);
        }
        res
    }

    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        self.cache.flush()
    }
}
