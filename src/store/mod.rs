//! The cache's block store: a sparse data file at image offsets plus a
//! [`map::BlockMap`] (state per block, CRC per 4 KiB page). It knows how to
//! read verified bytes and how to publish fetched blocks in crash-safe
//! order. Blocks are written once and never rewritten in place, which is
//! what makes a CRC per page enough: a power cut can only lose a block
//! (it reads as a miss and is fetched again), never make it wrong.
//! Overlays, whose pages are rewritten, have their own store
//! (`overlay::store`); version-1 overlays used this one with two CRC slots,
//! and `overlay::migrate` still reads them through [`map::BlockMap`].
//!
//! [`map`] is public for the fuzz target `map_header`; the store itself is
//! crate-private.

pub mod map;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::block::{is_zero, BlockIndex, BlockSize, ByteRange, PAGE};
use crate::error::{Error, ErrorKind, Result};
use map::{BlockMap, BlockState, Geometry};

pub(crate) struct BlockStore {
    map: BlockMap,
    /// Sparse, same offsets as the image.
    data: File,
    bs: BlockSize,
    size: u64,
}

/// Open `dir/lock` and take an exclusive, non-blocking flock on it: one
/// user (cache or overlay) of a store directory at a time, across processes.
/// The lock lives as long as the returned file. `what` names the directory
/// in errors ("cache", "overlay").
pub(crate) fn lock_dir(dir: &Path, what: &str) -> Result<File> {
    let lock = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join("lock"))
        .map_err(|e| Error::io(format!("opening {what} {}", dir.display()), e))?;
    use std::os::unix::io::AsRawFd;
    // SAFETY: flock on a valid, owned file descriptor; no memory involved.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "{what} {} is in use by another export or lazybd process",
                    dir.display()
                ),
            ));
        }
        return Err(Error::io(format!("locking {what} {}", dir.display()), e));
    }
    Ok(lock)
}

impl BlockStore {
    /// Open `meta` and `data` in `dir` for `geometry`. A map whose header
    /// does not match is rebuilt empty (with a warning) and the data file
    /// emptied with it: this is the cache, whose blocks can be refetched.
    /// Returns the store and whether it started empty.
    pub(crate) fn open(dir: &Path, geometry: Geometry) -> Result<(BlockStore, bool)> {
        let (map, fresh) = BlockMap::open_or_create(&dir.join("meta"), geometry)?;
        let data_path = dir.join("data");
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&data_path)
            .map_err(|e| Error::io(format!("opening {}", data_path.display()), e))?;
        if fresh {
            data.set_len(0)
                .map_err(|e| Error::io(format!("resetting {}", data_path.display()), e))?;
        }
        data.set_len(geometry.image_size)
            .map_err(|e| Error::io(format!("sizing {}", data_path.display()), e))?;
        Ok((
            BlockStore {
                bs: geometry.block_size,
                size: geometry.image_size,
                map,
                data,
            },
            fresh,
        ))
    }

    pub(crate) fn map(&self) -> &BlockMap {
        &self.map
    }

    pub(crate) fn state(&self, b: u64) -> BlockState {
        self.map.state(BlockIndex(b))
    }

    pub(crate) fn set_state(&self, b: u64, s: BlockState) {
        self.map.set_state(BlockIndex(b), s)
    }

    /// The bytes of block `b` (the last block may be short).
    pub(crate) fn block_range(&self, b: u64) -> ByteRange {
        self.bs.range_of(BlockIndex(b), self.size)
    }

    /// Read the part of `r` that lies in blocks `[b0, b1)` (all present)
    /// into `out` (which holds `r`), verifying every page touched. Returns
    /// the blocks with a page that failed verification; their bytes in `out`
    /// are garbage and the caller must not use them.
    pub(crate) fn read_verified(
        &self,
        r: ByteRange,
        b0: u64,
        b1: u64,
        out: &mut [u8],
    ) -> Result<Vec<u64>> {
        Ok(self
            .read_verified_with(r, b0, b1, out, false)?
            .unwrap_or_default())
    }

    /// [`BlockStore::read_verified`] from the page cache only, for callers
    /// that must not block: `Ok(None)` when the bytes would have to come
    /// from the disk (or the file system cannot tell), and `out` is then
    /// partly written.
    pub(crate) fn read_verified_now(
        &self,
        r: ByteRange,
        b0: u64,
        b1: u64,
        out: &mut [u8],
    ) -> Result<Option<Vec<u64>>> {
        self.read_verified_with(r, b0, b1, out, true)
    }

    fn read_verified_with(
        &self,
        r: ByteRange,
        b0: u64,
        b1: u64,
        out: &mut [u8],
        nowait: bool,
    ) -> Result<Option<Vec<u64>>> {
        let bs = self.bs.bytes();
        let run = ByteRange {
            offset: b0 * bs,
            len: (b1 * bs).min(self.size) - b0 * bs,
        };
        let Some(want) = run.intersect(&r) else {
            return Ok(Some(Vec::new()));
        };
        // Expand to whole checksum pages (the last page may be short).
        let ps = want.offset / PAGE * PAGE;
        let pe = want
            .end()
            .div_ceil(PAGE)
            .saturating_mul(PAGE)
            .min(self.size);
        let dst_off = (want.offset - r.offset) as usize;
        let dst = &mut out[dst_off..dst_off + want.len as usize];
        let read_err = |e| Error::io(format!("reading store data at {ps}"), e);
        if ps == want.offset && pe == want.end() {
            // Page-aligned: read straight into the caller's buffer.
            if !self.read_at(dst, ps, nowait).map_err(read_err)? {
                return Ok(None);
            }
            Ok(Some(self.verify_pages(ps, dst)))
        } else {
            let mut scratch = vec![0u8; (pe - ps) as usize];
            if !self.read_at(&mut scratch, ps, nowait).map_err(read_err)? {
                return Ok(None);
            }
            let s = (want.offset - ps) as usize;
            dst.copy_from_slice(&scratch[s..s + want.len as usize]);
            Ok(Some(self.verify_pages(ps, &scratch)))
        }
    }

    /// Fill `buf` from the data file at `off`. With `nowait` only from the
    /// page cache (`preadv2(RWF_NOWAIT)`): `Ok(false)` as soon as the rest
    /// would have to wait for the disk, or when the file system cannot
    /// read without waiting.
    fn read_at(&self, buf: &mut [u8], off: u64, nowait: bool) -> std::io::Result<bool> {
        if !nowait {
            self.data.read_exact_at(buf, off)?;
            return Ok(true);
        }
        use std::os::unix::io::AsRawFd;
        let mut done = 0;
        while done < buf.len() {
            let rest = &mut buf[done..];
            let iov = libc::iovec {
                iov_base: rest.as_mut_ptr().cast(),
                iov_len: rest.len(),
            };
            // SAFETY: one iovec over `rest`, writable and alive for the
            // call; the descriptor is owned and open.
            let n = unsafe {
                libc::preadv2(
                    self.data.as_raw_fd(),
                    &iov,
                    1,
                    (off + done as u64) as libc::off_t,
                    libc::RWF_NOWAIT,
                )
            };
            if n > 0 {
                // A short read: the rest is not cached; the next call says so.
                done += n as usize;
                continue;
            }
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => {}
                Some(libc::EAGAIN) | Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => {
                    return Ok(false)
                }
                _ => return Err(e),
            }
        }
        Ok(true)
    }

    /// Check the pages of `buf` (starting at page-aligned image offset
    /// `start`) against their CRCs; return the blocks with a bad page.
    fn verify_pages(&self, start: u64, buf: &[u8]) -> Vec<u64> {
        let mut bad = Vec::new();
        for (i, page) in buf.chunks(PAGE as usize).enumerate() {
            let p = start / PAGE + i as u64;
            if !self.map.page_matches(p, crc32fast::hash(page)) {
                let b = p * PAGE / self.bs.bytes();
                if bad.last() != Some(&b) {
                    bad.push(b);
                }
            }
        }
        bad
    }

    /// Store whole blocks starting at block `first` from `bytes` (which
    /// covers them exactly) and publish them: all-zero blocks become
    /// `Zero` (nothing written), runs of others are written with one pwrite,
    /// then their CRCs are stored, then they become `Present`.
    ///
    /// The caller guarantees no one else writes these blocks meanwhile and
    /// that readers do not read them as present until this returns (they
    /// are missing, zero, or in flight).
    pub(crate) fn publish_blocks(&self, first: u64, bytes: &[u8]) -> Result<PublishCounts> {
        self.publish_blocks_with(first, bytes, false)
    }

    /// [`BlockStore::publish_blocks`], but with `keep_zeros` all-zero blocks
    /// are stored as data too (allocated zeroes, for WRITE_ZEROES NO_HOLE).
    fn publish_blocks_with(
        &self,
        first: u64,
        bytes: &[u8],
        keep_zeros: bool,
    ) -> Result<PublishCounts> {
        let is_zero = |d: &[u8]| !keep_zeros && is_zero(d);
        let base = first * self.bs.bytes();
        let count = self.bs.count(base + bytes.len() as u64) - first;
        // The map's pages for these blocks get disk space first: a full
        // disk fails here, before anything is written.
        self.map.ensure_blocks(first, first + count)?;
        let mut counts = PublishCounts::default();
        let slice = |b: u64| {
            let br = self.block_range(b);
            let s = (br.offset - base) as usize;
            &bytes[s..s + br.len as usize]
        };
        let mut b = first;
        while b < first + count {
            if is_zero(slice(b)) {
                self.set_state(b, BlockState::Zero);
                counts.zero += 1;
                b += 1;
                continue;
            }
            // A run of non-zero blocks: one pwrite, fewer inode-lock trips.
            let mut e = b + 1;
            while e < first + count && !is_zero(slice(e)) {
                e += 1;
            }
            let start = self.block_range(b).offset;
            let end = self.block_range(e - 1).end();
            let data = &bytes[(start - base) as usize..(end - base) as usize];
            self.data
                .write_all_at(data, start)
                .map_err(|err| Error::io(format!("writing blocks {b}..{e}"), err))?;
            for (i, page) in data.chunks(PAGE as usize).enumerate() {
                self.map
                    .set_page_crc(start / PAGE + i as u64, crc32fast::hash(page));
            }
            for k in b..e {
                self.set_state(k, BlockState::Present);
            }
            counts.present += e - b;
            b = e;
        }
        Ok(counts)
    }

    /// Make data and map durable (fdatasync + msync), data first: a map
    /// must never point at bytes that could still be lost.
    pub(crate) fn sync(&self) -> Result<()> {
        self.data
            .sync_data()
            .map_err(|e| Error::io("syncing store data", e))?;
        self.map.flush()
    }

    /// Drop the bytes of blocks that no longer need storage (zeroed or
    /// given back to the base); frees disk space where the filesystem can.
    /// Tells whether it worked: `Unsupported` when the file system cannot
    /// punch holes, another kind for I/O errors.
    /// On failure the bytes may still be there (all of them for
    /// `Unsupported`) or be partly zeroed: the caller decides what the
    /// blocks are (their CRCs catch the latter).
    pub(crate) fn try_punch(&self, r: ByteRange) -> Result<()> {
        use std::os::unix::io::AsRawFd;
        // SAFETY: fallocate on an owned, open descriptor with in-range
        // offsets; no memory is passed.
        let rc = unsafe {
            libc::fallocate(
                self.data.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                r.offset as libc::off_t,
                r.len as libc::off_t,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        let what = format!("punching a hole at {r} of the store data file");
        Err(match e.raw_os_error() {
            Some(libc::EOPNOTSUPP) => Error::with_source(ErrorKind::Unsupported, what, e),
            _ => Error::io(what, e),
        })
    }
}

/// What `publish_blocks` did.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct PublishCounts {
    pub(crate) present: u64,
    pub(crate) zero: u64,
}
