//! The persistent block map: per-block state and per-page CRC32, in one file
//! mapped with memmap2 and shared by every reader through atomics.
//!
//! ```text
//!  0        4096                     align(4096)
//!  +--------+------------------------+-------------------------------------+
//!  | header | state: 1 byte per block | crc32 x slots: per 4 KiB page       |
//!  +--------+------------------------+-------------------------------------+
//!  state: 0 = missing, 1 = present (data file holds it, CRCs valid),
//!         2 = zero (all zero bytes; nothing stored)
//!  slots: 1 for the cache (blocks are written once, then immutable);
//!         2 in version-1 overlays (read only, to migrate them).
//!  header: magic "LAZYBDM1", version u32 (2), block size u32, image size
//!         u64, identity hash u64, blocks u64, slots u32, crc32 of 0..44
//!         (version 1 had no crc).
//! ```
//!
//! The file is sparse: a page of it gets disk blocks (fallocate) when the
//! first block it describes is published, so metadata grows with what is
//! cached, not with the image (a 1 TiB image's map is 1 GiB of address
//! space and a few KiB on disk until blocks arrive). Allocation is an
//! ordinary error on a full disk; a store into a hole of a shared mapping
//! would be SIGBUS. Counts of present and zero blocks are kept as they
//! change, so listings and metrics never scan the map.
//!
//! Publication rule: a block's data is written to the data file and its page
//! CRCs stored *before* its state becomes present (Release); readers load the
//! state (Acquire) before trusting CRCs. After `kill -9` the mapping's dirty
//! pages survive in the page cache; after a power cut, a state may persist
//! without its data, which the CRC check on every read turns into a miss.
//! So the map never needs an fsync for correctness, only for keeping work.
//!
//! The header decoders and the read side of [`BlockMap`] are public for the
//! fuzz target `map_header`.

use std::fs::{File, OpenOptions};
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};

use memmap2::MmapMut;

use crate::block::{BlockIndex, BlockSize, PAGE};
use crate::error::{Error, ErrorKind, Result};

const MAGIC: &[u8; 8] = b"LAZYBDM1";
const VERSION: u32 = 2;
const HEADER: u64 = 4096;
const HEADER_FIELDS: usize = 48;
/// Bytes of a map page (the allocation unit).
const MAP_PAGE: u64 = 4096;

/// What the cache knows about one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockState {
    Missing = 0,
    Present = 1,
    Zero = 2,
}

impl BlockState {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => BlockState::Present,
            2 => BlockState::Zero,
            // Unknown values (damage) read as missing: refetching is safe.
            _ => BlockState::Missing,
        }
    }
}

/// The header fields that must match for a map to be reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub block_size: BlockSize,
    pub image_size: u64,
    /// Hash of the origin identity the blocks came from.
    pub identity_hash: u64,
    /// CRCs kept per page: 1 (write-once cache) or 2 (overlay).
    pub crc_slots: u32,
}

impl Geometry {
    fn blocks(&self) -> u64 {
        self.block_size.count(self.image_size)
    }
    fn pages(&self) -> u64 {
        self.image_size.div_ceil(PAGE)
    }
    fn crc_offset(&self) -> u64 {
        (HEADER + self.blocks()).div_ceil(4096) * 4096
    }
    fn file_len(&self) -> u64 {
        self.crc_offset() + self.pages() * 4 * self.crc_slots as u64
    }

    fn encode(&self) -> [u8; HEADER_FIELDS] {
        let mut h = [0u8; HEADER_FIELDS];
        h[..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&self.block_size.get().to_le_bytes());
        h[16..24].copy_from_slice(&self.image_size.to_le_bytes());
        h[24..32].copy_from_slice(&self.identity_hash.to_le_bytes());
        h[32..40].copy_from_slice(&self.blocks().to_le_bytes());
        h[40..44].copy_from_slice(&self.crc_slots.to_le_bytes());
        let crc = crc32fast::hash(&h[..44]);
        h[44..48].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Parse a header of version 1 or 2 (checksum checked); the error
    /// says what is wrong, for the warning or refusal that names the file.
    pub fn decode_versioned(h: &[u8]) -> std::result::Result<(Geometry, u32), String> {
        if h.len() < HEADER_FIELDS || &h[..8] != MAGIC {
            return Err("not a lazybd block map (bad magic)".into());
        }
        let u32_at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().unwrap_or_default());
        let u64_at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().unwrap_or_default());
        let version = u32_at(8);
        if version > VERSION {
            return Err(format!(
                "format version {version}, written by a newer lazybd (this one reads up to {VERSION})"
            ));
        }
        if version == 0 {
            return Err("format version 0".into());
        }
        if version >= 2 {
            let (stored, computed) = (u32_at(44), crc32fast::hash(&h[..44]));
            if stored != computed {
                return Err(format!(
                    "header checksum mismatch (stored {stored:08x}, computed {computed:08x})"
                ));
            }
        }
        let g = Geometry {
            block_size: BlockSize::new(u32_at(12) as u64)
                .map_err(|_| format!("invalid block size {}", u32_at(12)))?,
            image_size: u64_at(16),
            identity_hash: u64_at(24),
            crc_slots: u32_at(40),
        };
        if u64_at(32) != g.blocks() || !matches!(g.crc_slots, 1 | 2) {
            return Err("inconsistent header fields".into());
        }
        Ok((g, version))
    }

    /// Parse a current-version header; `None` if it is anything else.
    pub fn decode(h: &[u8]) -> Option<Geometry> {
        match Self::decode_versioned(h) {
            Ok((g, VERSION)) => Some(g),
            _ => None,
        }
    }
}

pub struct BlockMap {
    /// Kept for fallocate and msync; the mapping keeps its own reference.
    file: File,
    /// One bit per map page: it has disk blocks (see the module docs).
    allocated: Vec<AtomicU64>,
    /// Serialises allocation (see `ensure_bytes`).
    allocating: std::sync::Mutex<()>,
    /// Blocks in each state, kept as states change.
    present: AtomicU64,
    zero: AtomicU64,
    map: MmapMut,
    geometry: Geometry,
    blocks: u64,
    pages: u64,
    crc_offset: usize,
    slots: usize,
}

impl BlockMap {
    /// Open the map at `path` if its header matches `geometry`; otherwise
    /// (missing, damaged, older or newer, other image) create a fresh,
    /// all-missing one, with a warning naming the file and why: only the
    /// cache uses this, and its blocks can be fetched again. Returns the
    /// map and whether it was (re)created.
    pub(crate) fn open_or_create(path: &Path, geometry: Geometry) -> Result<(BlockMap, bool)> {
        let ctx = || format!("opening cache map {}", path.display());
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| Error::io(ctx(), e))?;
        let len = file.metadata().map_err(|e| Error::io(ctx(), e))?.len();
        let mut fresh = true;
        if len > 0 {
            let mut h = [0u8; HEADER_FIELDS];
            use std::os::unix::fs::FileExt;
            let why = match file.read_exact_at(&mut h, 0) {
                Err(e) => format!("unreadable header ({e})"),
                Ok(()) => match Geometry::decode_versioned(&h) {
                    Ok((g, VERSION)) if g == geometry && len == geometry.file_len() => {
                        String::new()
                    }
                    Ok((_, VERSION)) => "made for another image or block size".into(),
                    Ok((_, v)) => format!("format version {v} (now {VERSION})"),
                    Err(e) => e,
                },
            };
            if why.is_empty() {
                fresh = false;
            } else {
                tracing::warn!(map = %path.display(), reason = %why,
                    "cache map cannot be reused: rebuilding it empty (cached blocks will be fetched again)");
            }
        }
        if fresh {
            // Truncate first so no stale state byte survives a resize.
            file.set_len(0).map_err(|e| Error::io(ctx(), e))?;
            file.set_len(geometry.file_len())
                .map_err(|e| Error::io(ctx(), e))?;
            use std::os::unix::fs::FileExt;
            file.write_all_at(&geometry.encode(), 0)
                .map_err(|e| Error::io(ctx(), e))?;
        }
        Ok((Self::map(file, geometry, path)?, fresh))
    }

    /// Open an existing map of version 1 or 2, taking its geometry from
    /// its header; anything else is refused with an error naming the file.
    pub fn open_existing(path: &Path) -> Result<BlockMap> {
        let ctx = || format!("opening block map {}", path.display());
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::io(ctx(), e))?;
        let mut h = [0u8; HEADER_FIELDS];
        use std::os::unix::fs::FileExt;
        // A version-1 header is 44 bytes; reading 48 is always in the file.
        file.read_exact_at(&mut h, 0)
            .map_err(|e| Error::io(ctx(), e))?;
        let (g, _) = Geometry::decode_versioned(&h)
            .map_err(|why| Error::new(ErrorKind::Corrupt, format!("{}: {why}", path.display())))?;
        let len = file.metadata().map_err(|e| Error::io(ctx(), e))?.len();
        if len != g.file_len() {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!("{}: {len} bytes, expected {}", path.display(), g.file_len()),
            ));
        }
        Self::map(file, g, path)
    }

    fn map(file: File, geometry: Geometry, path: &Path) -> Result<BlockMap> {
        let len = geometry.file_len();
        let map_pages = len.div_ceil(MAP_PAGE);
        let allocated: Vec<AtomicU64> = (0..map_pages.div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect();
        for (s, e) in data_extents(&file, len)
            .map_err(|e| Error::io(format!("reading the extents of {}", path.display()), e))?
        {
            for p in s / MAP_PAGE..e.div_ceil(MAP_PAGE) {
                allocated[(p / 64) as usize].fetch_or(1 << (p % 64), Ordering::Relaxed);
            }
        }
        // SAFETY: the map file is private to this cache directory and held
        // under an exclusive flock by the serving process; it is never
        // truncated while mapped. All access after this point goes through
        // atomics (see `states` / `crcs`), so concurrent readers and writers
        // of the mapping are data-race free. Stores only go to pages that
        // were allocated first (`ensure_blocks`), so a full disk cannot
        // turn a store into SIGBUS.
        let map = unsafe { MmapMut::map_mut(&file) }
            .map_err(|e| Error::io(format!("mapping {}", path.display()), e))?;
        let m = BlockMap {
            blocks: geometry.blocks(),
            pages: geometry.pages(),
            crc_offset: geometry.crc_offset() as usize,
            slots: geometry.crc_slots as usize,
            file,
            allocated,
            allocating: std::sync::Mutex::new(()),
            present: AtomicU64::new(0),
            zero: AtomicU64::new(0),
            map,
            geometry,
        };
        // Count only the allocated pages of the state region: holes are
        // all missing.
        let (mut present, mut zero) = (0, 0);
        let states = m.states();
        let first = HEADER / MAP_PAGE;
        let last = (HEADER + m.blocks).div_ceil(MAP_PAGE);
        for p in first..last {
            if !m.is_allocated(p) {
                continue;
            }
            let s = ((p * MAP_PAGE).max(HEADER) - HEADER) as usize;
            let e = (((p + 1) * MAP_PAGE - HEADER) as usize).min(m.blocks as usize);
            for st in &states[s..e] {
                match BlockState::from_u8(st.load(Ordering::Relaxed)) {
                    BlockState::Present => present += 1,
                    BlockState::Zero => zero += 1,
                    BlockState::Missing => {}
                }
            }
        }
        m.present.store(present, Ordering::Relaxed);
        m.zero.store(zero, Ordering::Relaxed);
        Ok(m)
    }

    fn is_allocated(&self, map_page: u64) -> bool {
        self.allocated[(map_page / 64) as usize].load(Ordering::Relaxed) & (1 << (map_page % 64))
            != 0
    }

    /// Give disk blocks to the map pages of `[s, e)` (byte offsets in the
    /// map file) that have none yet.
    fn ensure_bytes(&self, s: u64, e: u64) -> Result<()> {
        for p in s / MAP_PAGE..e.div_ceil(MAP_PAGE) {
            if self.is_allocated(p) {
                continue;
            }
            // Under the lock, and checked again: zeroes written over a page
            // another thread has allocated and stored to would erase it.
            let _g = self.allocating.lock().expect("allocation lock");
            if self.is_allocated(p) {
                continue;
            }
            // Never past the end: that would change the file's length.
            let n = MAP_PAGE.min(self.geometry.file_len() - p * MAP_PAGE);
            allocate(&self.file, p * MAP_PAGE, n).map_err(|err| {
                Error::io(
                    format!("allocating block map space at {}", p * MAP_PAGE),
                    err,
                )
            })?;
            self.allocated[(p / 64) as usize].fetch_or(1 << (p % 64), Ordering::Relaxed);
        }
        Ok(())
    }

    /// Before publishing blocks `[b0, b1)`: make sure the map pages holding
    /// their state bytes and page CRCs have disk blocks. ENOSPC here is an
    /// ordinary error (the blocks are served uncached).
    pub(crate) fn ensure_blocks(&self, b0: u64, b1: u64) -> Result<()> {
        if b0 >= b1 {
            return Ok(());
        }
        self.ensure_bytes(HEADER + b0, HEADER + b1)?;
        let bs = self.geometry.block_size.bytes();
        let p0 = b0 * bs / PAGE;
        let p1 = ((b1 * bs).min(self.geometry.image_size)).div_ceil(PAGE);
        let w = 4 * self.slots as u64;
        self.ensure_bytes(
            self.crc_offset as u64 + p0 * w,
            self.crc_offset as u64 + p1 * w,
        )
    }

    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    fn states(&self) -> &[AtomicU8] {
        let base = self.map.as_ptr().wrapping_add(HEADER as usize);
        // SAFETY: [HEADER, HEADER + blocks) lies inside the mapping (file_len
        // covers it); AtomicU8 has the size and alignment of u8; the slice
        // borrows `self`, so it cannot outlive the mapping; all accesses to
        // this region are atomic.
        unsafe { std::slice::from_raw_parts(base as *const AtomicU8, self.blocks as usize) }
    }

    fn crcs(&self) -> &[AtomicU32] {
        let base = self.map.as_ptr().wrapping_add(self.crc_offset);
        debug_assert_eq!(base as usize % 4, 0);
        // SAFETY: the CRC region starts at a 4096-aligned offset of a
        // page-aligned mapping (so 4-byte alignment holds) and spans
        // `pages * slots * 4` bytes inside the mapping; AtomicU32 has the
        // layout of u32; the borrow is tied to `self`; all accesses are atomic.
        unsafe {
            std::slice::from_raw_parts(base as *const AtomicU32, self.pages as usize * self.slots)
        }
    }

    /// Is the map page holding block `b`'s state backed by disk blocks?
    /// Unbacked pages are never touched through the mapping, not even
    /// read: on tmpfs a read fault allocates, and on a full file system
    /// that is SIGBUS. Their blocks are all missing.
    fn state_backed(&self, b: BlockIndex) -> bool {
        self.is_allocated((HEADER + b.0) / MAP_PAGE)
    }

    pub fn state(&self, b: BlockIndex) -> BlockState {
        if !self.state_backed(b) {
            return BlockState::Missing;
        }
        BlockState::from_u8(self.states()[b.0 as usize].load(Ordering::Acquire))
    }

    /// Publish a block's state. For `Present`, the caller MUST have written
    /// the block's data and stored its page CRCs first; for any state but
    /// `Missing`, the caller MUST have called [`BlockMap::ensure_blocks`].
    pub(crate) fn set_state(&self, b: BlockIndex, s: BlockState) {
        if !self.state_backed(b) {
            // Only `Missing` may be stored without `ensure_blocks`, and an
            // unbacked block is missing already.
            debug_assert_eq!(s, BlockState::Missing);
            return;
        }
        let old = self.states()[b.0 as usize].swap(s as u8, Ordering::AcqRel);
        self.count(BlockState::from_u8(old), s);
    }

    fn count(&self, from: BlockState, to: BlockState) {
        if from == to {
            return;
        }
        for (st, d) in [(from, u64::MAX), (to, 1)] {
            match st {
                BlockState::Present => self.present.fetch_add(d, Ordering::Relaxed),
                BlockState::Zero => self.zero.fetch_add(d, Ordering::Relaxed),
                BlockState::Missing => 0,
            };
        }
    }

    /// Move `b` from `from` to `to` only if it is still `from`.
    pub(crate) fn transition(&self, b: BlockIndex, from: BlockState, to: BlockState) -> bool {
        if !self.state_backed(b) {
            debug_assert_eq!(to, BlockState::Missing);
            return false;
        }
        let ok = self.states()[b.0 as usize]
            .compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if ok {
            self.count(from, to);
        }
        ok
    }

    /// Raw state byte (for verification of damaged maps).
    pub fn raw_state(&self, b: BlockIndex) -> u8 {
        if !self.state_backed(b) {
            return 0;
        }
        self.states()[b.0 as usize].load(Ordering::Acquire)
    }

    /// The current CRC of a page.
    fn crc_backed(&self, page: u64) -> bool {
        self.is_allocated((self.crc_offset as u64 + page * 4 * self.slots as u64) / MAP_PAGE)
    }

    pub fn page_crc(&self, page: u64) -> u32 {
        if !self.crc_backed(page) {
            return 0;
        }
        self.crcs()[page as usize * self.slots].load(Ordering::Relaxed)
    }

    /// Does `crc` match the page's current (or, with two slots, previous) CRC?
    /// A page whose CRC was never recorded matches nothing.
    pub fn page_matches(&self, page: u64, crc: u32) -> bool {
        if !self.crc_backed(page) {
            return false;
        }
        let c = self.crcs();
        let i = page as usize * self.slots;
        c[i].load(Ordering::Relaxed) == crc
            || (self.slots == 2 && c[i + 1].load(Ordering::Relaxed) == crc)
    }

    /// Set a page's CRC for content written fresh (both slots).
    pub(crate) fn set_page_crc(&self, page: u64, crc: u32) {
        let c = self.crcs();
        let i = page as usize * self.slots;
        for s in &c[i..i + self.slots] {
            s.store(crc, Ordering::Relaxed);
        }
    }

    /// (present, zero) block counts: counters, not a scan.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.present.load(Ordering::Relaxed),
            self.zero.load(Ordering::Relaxed),
        )
    }

    /// Write dirty metadata pages back to the file (msync).
    pub(crate) fn flush(&self) -> Result<()> {
        self.map
            .flush()
            .map_err(|e| Error::io("flushing cache map", e))
    }
}

/// Give `[off, off + len)` of `file` disk blocks by writing zeroes over
/// it. The caller guarantees the range is a hole (reads as zeroes) or was
/// never stored to. Not fallocate: ext4 turns a store through a mapping
/// into an unwritten (fallocated) extent into a zero-out of up to a
/// megabyte around it, so a sparse map would fill up anyway.
fn allocate(file: &File, off: u64, len: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    const ZEROS: [u8; MAP_PAGE as usize] = [0; MAP_PAGE as usize];
    let mut at = off;
    while at < off + len {
        let n = (off + len - at).min(MAP_PAGE);
        file.write_all_at(&ZEROS[..n as usize], at)?;
        at += n;
    }
    Ok(())
}

/// The data (non-hole) extents of `file` below `len`, by SEEK_DATA /
/// SEEK_HOLE; the whole file where those are not supported.
fn data_extents(file: &File, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use std::os::unix::io::AsRawFd;
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut at = 0u64;
    while at < len {
        // SAFETY: lseek on an owned descriptor; no memory is passed.
        let d = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
        if d < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENXIO) => Ok(out),
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(vec![(0, len)]),
                _ => Err(e),
            };
        }
        // SAFETY: as above.
        let h = unsafe { libc::lseek(fd, d, libc::SEEK_HOLE) };
        if h < 0 {
            return Err(std::io::Error::last_os_error());
        }
        out.push((d as u64, (h as u64).min(len)));
        at = h as u64;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        SetState(u64, u8),
        SetCrc(u64, u32),
        Reopen,
    }

    fn op(blocks: u64, pages: u64) -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..blocks, 0u8..3).prop_map(|(b, s)| Op::SetState(b, s)),
            (0..pages, any::<u32>()).prop_map(|(p, c)| Op::SetCrc(p, c)),
            Just(Op::Reopen),
        ]
    }

    proptest! {
        /// The map behaves like a plain Vec of states and CRCs, across reopens.
        #[test]
        fn map_matches_model(size in 1u64..2_000_000, shift in 12u32..17,
                             ops in proptest::collection::vec(op(8, 8), 0..60)) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("meta");
            let g = Geometry { block_size: BlockSize::new(1 << shift).unwrap(), image_size: size, identity_hash: 42, crc_slots: 1 };
            let blocks = g.blocks();
            let pages = g.pages();
            let mut model_s = vec![0u8; blocks as usize];
            let mut model_c = vec![0u32; pages as usize];
            let (mut m, fresh) = BlockMap::open_or_create(&path, g).unwrap();
            prop_assert!(fresh);
            m.ensure_blocks(0, blocks).unwrap();
            for o in ops {
                match o {
                    Op::SetState(b, s) => {
                        let b = b % blocks;
                        let st = BlockState::from_u8(s);
                        m.set_state(BlockIndex(b), st);
                        model_s[b as usize] = s;
                    }
                    Op::SetCrc(p, c) => {
                        let p = p % pages;
                        m.set_page_crc(p, c);
                        model_c[p as usize] = c;
                    }
                    Op::Reopen => {
                        drop(m);
                        let (m2, fresh) = BlockMap::open_or_create(&path, g).unwrap();
                        prop_assert!(!fresh);
                        m = m2;
                    }
                }
                for b in 0..blocks {
                    prop_assert_eq!(m.state(BlockIndex(b)) as u8, model_s[b as usize]);
                }
                for p in 0..pages {
                    prop_assert_eq!(m.page_crc(p), model_c[p as usize]);
                }
            }
            let (present, zero) = m.counts();
            prop_assert_eq!(present, model_s.iter().filter(|&&s| s == 1).count() as u64);
            prop_assert_eq!(zero, model_s.iter().filter(|&&s| s == 2).count() as u64);
        }
    }

    #[test]
    fn other_geometry_starts_fresh() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta");
        let g = Geometry {
            block_size: BlockSize::DEFAULT,
            image_size: 1 << 20,
            identity_hash: 1,
            crc_slots: 1,
        };
        let (m, _) = BlockMap::open_or_create(&path, g).unwrap();
        m.ensure_blocks(3, 4).unwrap();
        m.set_state(BlockIndex(3), BlockState::Present);
        drop(m);
        let g2 = Geometry {
            identity_hash: 2,
            ..g
        };
        let (m, fresh) = BlockMap::open_or_create(&path, g2).unwrap();
        assert!(fresh);
        assert_eq!(m.state(BlockIndex(3)), BlockState::Missing);
        assert_eq!(BlockMap::open_existing(&path).unwrap().geometry(), g2);
    }

    #[test]
    fn the_map_is_sparse_until_blocks_arrive() {
        the_map_is_sparse_until_blocks_arrive_with(BlockSize::DEFAULT);
        the_map_is_sparse_until_blocks_arrive_with(BlockSize::new(64 << 10).unwrap());
    }

    fn the_map_is_sparse_until_blocks_arrive_with(bs: BlockSize) {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta");
        let per = bs.bytes() / PAGE;
        let g = Geometry {
            block_size: bs,
            image_size: 1 << 40,
            identity_hash: 1,
            crc_slots: 1,
        };
        let t = std::time::Instant::now();
        let (m, _) = BlockMap::open_or_create(&path, g).unwrap();
        let disk = |p: &Path| std::fs::metadata(p).unwrap().blocks() * 512;
        assert!(
            disk(&path) <= 64 << 10,
            "untouched 1 TiB map uses {} bytes",
            disk(&path)
        );
        assert_eq!(m.counts(), (0, 0));
        // 1024 blocks spread over the image.
        for i in 0..1024u64 {
            let b = i * 16_381 % m.blocks();
            m.ensure_blocks(b, b + 1).unwrap();
            for p in b * per..(b + 1) * per {
                m.set_page_crc(p, 7);
            }
            m.set_state(BlockIndex(b), BlockState::Present);
        }
        assert_eq!(m.counts(), (1024, 0));
        assert!(
            disk(&path) <= 16 << 20,
            "{} bytes for 1024 blocks",
            disk(&path)
        );
        drop(m);
        let (m, fresh) = BlockMap::open_or_create(&path, g).unwrap();
        assert!(!fresh);
        assert_eq!(
            m.counts(),
            (1024, 0),
            "counted again from the allocated pages"
        );
        assert!(
            disk(&path) <= 16 << 20,
            "{} bytes for 1024 blocks",
            disk(&path)
        );
        // Opening a 1 TiB map is quick (no scan of holes, no preallocation).
        assert!(t.elapsed() < std::time::Duration::from_secs(5));
        m.set_state(BlockIndex(16_381 % m.blocks()), BlockState::Missing);
        assert_eq!(m.counts(), (1023, 0));
    }

    #[test]
    fn a_map_of_another_version_or_damaged_is_rebuilt_and_old_ones_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta");
        let g = Geometry {
            block_size: BlockSize::DEFAULT,
            image_size: 1 << 20,
            identity_hash: 1,
            crc_slots: 1,
        };
        let (m, _) = BlockMap::open_or_create(&path, g).unwrap();
        m.ensure_blocks(0, 1).unwrap();
        m.set_state(BlockIndex(0), BlockState::Present);
        drop(m);
        use std::os::unix::fs::FileExt;
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        // A version-1 header (no checksum) is readable for migration...
        f.write_all_at(&1u32.to_le_bytes(), 8).unwrap();
        let old = BlockMap::open_existing(&path).unwrap();
        assert_eq!(old.state(BlockIndex(0)), BlockState::Present);
        drop(old);
        // ...and a newer one is refused by name.
        f.write_all_at(&9u32.to_le_bytes(), 8).unwrap();
        let e = BlockMap::open_existing(&path).err().unwrap().to_string();
        assert!(e.contains("newer lazybd") && e.contains("meta"), "{e}");
        // The cache rebuilds either (with a warning).
        let (m, fresh) = BlockMap::open_or_create(&path, g).unwrap();
        assert!(fresh);
        assert_eq!(m.state(BlockIndex(0)), BlockState::Missing);
        drop(m);
        // A flipped header bit is caught by the checksum.
        f.write_all_at(&[0x40], 20).unwrap();
        let e = BlockMap::open_existing(&path).err().unwrap().to_string();
        assert!(e.contains("checksum"), "{e}");
    }
}
