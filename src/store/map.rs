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
//!         2 for overlays (current + previous CRC, so a page rewritten in
//!         place is valid as either its old or its new content while the
//!         write is under way; see `BlockStore::overwrite`).
//! ```
//!
//! Publication rule: a block's data is written to the data file and its page
//! CRCs stored *before* its state becomes present (Release); readers load the
//! state (Acquire) before trusting CRCs. After `kill -9` the mapping's dirty
//! pages survive in the page cache; after a power cut, a state may persist
//! without its data, which the CRC check on every read turns into a miss.
//! So the map never needs an fsync for correctness, only for keeping work.

use std::fs::{File, OpenOptions};
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};

use memmap2::MmapMut;

use crate::block::{BlockIndex, BlockSize, PAGE};
use crate::error::{Error, ErrorKind, Result};

const MAGIC: &[u8; 8] = b"LAZYBDM1";
const VERSION: u32 = 1;
const HEADER: u64 = 4096;
const HEADER_FIELDS: usize = 44;

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
        h
    }

    /// Parse a header; `None` if it is not a lazybd map of this version.
    pub fn decode(h: &[u8]) -> Option<Geometry> {
        if h.len() < HEADER_FIELDS || &h[..8] != MAGIC {
            return None;
        }
        let u32_at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().unwrap_or_default());
        let u64_at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().unwrap_or_default());
        if u32_at(8) != VERSION {
            return None;
        }
        let g = Geometry {
            block_size: BlockSize::new(u32_at(12) as u64).ok()?,
            image_size: u64_at(16),
            identity_hash: u64_at(24),
            crc_slots: u32_at(40),
        };
        (u64_at(32) == g.blocks() && matches!(g.crc_slots, 1 | 2)).then_some(g)
    }
}

pub struct BlockMap {
    /// Kept for flock and msync; the mapping keeps its own reference.
    file: File,
    map: MmapMut,
    geometry: Geometry,
    blocks: u64,
    pages: u64,
    crc_offset: usize,
    slots: usize,
}

impl BlockMap {
    /// Open the map at `path` if its header matches `geometry`; otherwise
    /// (missing, damaged, other image) create a fresh, all-missing one.
    /// Returns the map and whether it was (re)created.
    pub fn open_or_create(path: &Path, geometry: Geometry) -> Result<(BlockMap, bool)> {
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
        if len == geometry.file_len() {
            let mut h = [0u8; HEADER_FIELDS];
            use std::os::unix::fs::FileExt;
            if file.read_exact_at(&mut h, 0).is_ok() && Geometry::decode(&h) == Some(geometry) {
                fresh = false;
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

    /// Open an existing map, taking its geometry from its header.
    pub fn open_existing(path: &Path) -> Result<BlockMap> {
        let ctx = || format!("opening cache map {}", path.display());
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::io(ctx(), e))?;
        let mut h = [0u8; HEADER_FIELDS];
        use std::os::unix::fs::FileExt;
        file.read_exact_at(&mut h, 0)
            .map_err(|e| Error::io(ctx(), e))?;
        let g = Geometry::decode(&h).ok_or_else(|| {
            Error::new(
                ErrorKind::Corrupt,
                format!("{}: not a lazybd cache map", path.display()),
            )
        })?;
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
        // Every page of the mapping gets its disk blocks now: a store into
        // a sparse hole of a shared mapping on a full disk is SIGBUS, which
        // would kill every VM's server; ENOSPC here is an ordinary error.
        use std::os::unix::io::AsRawFd;
        let len = geometry.file_len();
        // SAFETY: fallocate on an open descriptor we own, within its length;
        // no memory is passed.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len as libc::off_t) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            // File systems without fallocate keep the old behaviour.
            if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
                return Err(Error::io(
                    format!(
                        "allocating {len} bytes for the block map {}",
                        path.display()
                    ),
                    e,
                ));
            }
        }
        // SAFETY: the map file is private to this cache directory and held
        // under an exclusive flock by the serving process; it is never
        // truncated while mapped. All access after this point goes through
        // atomics (see `states` / `crcs`), so concurrent readers and writers
        // of the mapping are data-race free.
        let map = unsafe { MmapMut::map_mut(&file) }
            .map_err(|e| Error::io(format!("mapping {}", path.display()), e))?;
        Ok(BlockMap {
            blocks: geometry.blocks(),
            pages: geometry.pages(),
            crc_offset: geometry.crc_offset() as usize,
            slots: geometry.crc_slots as usize,
            file,
            map,
            geometry,
        })
    }

    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// The file backing the map (for locking).
    pub fn file(&self) -> &File {
        &self.file
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

    pub fn state(&self, b: BlockIndex) -> BlockState {
        BlockState::from_u8(self.states()[b.0 as usize].load(Ordering::Acquire))
    }

    /// Publish a block's state. For `Present`, the caller MUST have written
    /// the block's data and stored its page CRCs first.
    pub fn set_state(&self, b: BlockIndex, s: BlockState) {
        self.states()[b.0 as usize].store(s as u8, Ordering::Release);
    }

    /// Move `b` from `from` to `to` only if it is still `from`.
    pub fn transition(&self, b: BlockIndex, from: BlockState, to: BlockState) -> bool {
        self.states()[b.0 as usize]
            .compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Raw state byte (for verification of damaged maps).
    pub fn raw_state(&self, b: BlockIndex) -> u8 {
        self.states()[b.0 as usize].load(Ordering::Acquire)
    }

    /// The current CRC of a page.
    pub fn page_crc(&self, page: u64) -> u32 {
        self.crcs()[page as usize * self.slots].load(Ordering::Relaxed)
    }

    /// Does `crc` match the page's current (or, with two slots, previous) CRC?
    pub fn page_matches(&self, page: u64, crc: u32) -> bool {
        let c = self.crcs();
        let i = page as usize * self.slots;
        c[i].load(Ordering::Relaxed) == crc
            || (self.slots == 2 && c[i + 1].load(Ordering::Relaxed) == crc)
    }

    /// Set a page's CRC for content written fresh (both slots).
    pub fn set_page_crc(&self, page: u64, crc: u32) {
        let c = self.crcs();
        let i = page as usize * self.slots;
        for s in &c[i..i + self.slots] {
            s.store(crc, Ordering::Relaxed);
        }
    }

    /// Before rewriting a page in place: keep its current CRC as previous and
    /// make `crc` current, so the page verifies as either version until the
    /// write lands. Needs two slots.
    pub fn rotate_page_crc(&self, page: u64, crc: u32) {
        debug_assert_eq!(self.slots, 2);
        let c = self.crcs();
        let i = page as usize * self.slots;
        c[i + 1].store(c[i].load(Ordering::Relaxed), Ordering::Relaxed);
        c[i].store(crc, Ordering::Relaxed);
    }

    /// (present, zero) block counts.
    pub fn counts(&self) -> (u64, u64) {
        let mut present = 0;
        let mut zero = 0;
        for s in self.states() {
            match BlockState::from_u8(s.load(Ordering::Relaxed)) {
                BlockState::Present => present += 1,
                BlockState::Zero => zero += 1,
                BlockState::Missing => {}
            }
        }
        (present, zero)
    }

    /// Write dirty metadata pages back to the file (msync).
    pub fn flush(&self) -> Result<()> {
        self.map
            .flush()
            .map_err(|e| Error::io("flushing cache map", e))
    }
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
    fn two_slots_accept_old_and_new_during_a_rewrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta");
        let g = Geometry {
            block_size: BlockSize::DEFAULT,
            image_size: 1 << 20,
            identity_hash: 1,
            crc_slots: 2,
        };
        let (m, _) = BlockMap::open_or_create(&path, g).unwrap();
        m.set_page_crc(5, 111);
        assert!(m.page_matches(5, 111) && !m.page_matches(5, 222));
        m.rotate_page_crc(5, 222);
        assert!(m.page_matches(5, 111) && m.page_matches(5, 222));
        m.rotate_page_crc(5, 333);
        assert!(!m.page_matches(5, 111) && m.page_matches(5, 222) && m.page_matches(5, 333));
        assert!(!m.page_matches(4, 111) && !m.page_matches(6, 222));
        // A one-slot map of the same image is a different geometry.
        drop(m);
        let (_, fresh) = BlockMap::open_or_create(&path, Geometry { crc_slots: 1, ..g }).unwrap();
        assert!(fresh);
    }
}
