//! Copy-on-write overlay: one per writable export. Writes, TRIM and
//! WRITE_ZEROES land here and never reach the shared cache or the origin;
//! reads merge overlay blocks over the base device.
//!
//! ```text
//!   overlay block state   read from          write of part of a block
//!   missing               base               base block + new bytes -> publish
//!   zero                  zeroes             zero block + new bytes -> publish
//!   present               overlay (CRC)      rewrite in place (CRC rotation)
//! ```
//!
//! Durability: FLUSH (and FUA) fdatasync the data file, then msync the map.
//! Crash safety without a journal: a block becomes present only after its
//! data and CRCs are written; a present page rewritten in place keeps its
//! previous CRC as a second valid value until the new bytes are written
//! (see `BlockStore::overwrite`). After `kill -9` at any moment every page
//! reads as its old or its new content, never as a mix within a page, and
//! every write acknowledged before a FLUSH reads back.
//!
//! The overlay records the identity of the image it was made over; opening
//! it over a different image is refused, because its missing blocks would
//! silently read the new image's bytes.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::sync::Mutex;

use crate::block::{BlockIndex, BlockSize, ByteRange};
use crate::error::{Error, ErrorKind, Result};
use crate::export::{BlockDevice, Extent, ReadData, Writable, ZeroFlags};
use crate::origin::BoxFuture;
use crate::store::map::{BlockState, Geometry};
use crate::store::BlockStore;

/// Writers of one block are serialised by one of these stripes; a read of
/// the base block and the merge happen under it, so two partial writes to
/// one missing block cannot lose each other's bytes.
const STRIPES: usize = 64;

/// Attempts before a page that keeps failing its CRC is reported: a page
/// being rewritten concurrently may fail once; damage fails every time.
const READ_ATTEMPTS: usize = 4;

pub struct Overlay {
    base: Arc<dyn BlockDevice>,
    /// Shared with blocking sync tasks.
    store: Arc<BlockStore>,
    stripes: Vec<Mutex<()>>,
    dir: PathBuf,
    /// Holds the overlay directory's exclusive flock.
    _lock: File,
}

/// What `base` records about the image an overlay was made over.
fn base_record(base_id: &str, size: u64, bs: BlockSize) -> String {
    format!("base={base_id}\nsize={size}\nblock_size={}\n", bs.bytes())
}

impl Overlay {
    /// Open or create the overlay in `dir` over `base`. `base_id` names the
    /// base image's identity (its `Display` form); a different one refuses.
    pub fn open(
        dir: &Path,
        base: Arc<dyn BlockDevice>,
        base_id: &str,
        bs: BlockSize,
    ) -> Result<Overlay> {
        fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating overlay {}", dir.display()), e))?;
        let lock = crate::store::lock_dir(dir, "overlay")?;
        let size = base.size();
        let record = base_record(base_id, size, bs);
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
                if dir.join("meta").exists() {
                    return Err(Error::new(
                        ErrorKind::Corrupt,
                        format!("overlay {} has data but no base record", dir.display()),
                    ));
                }
                let tmp = dir.join("base.tmp");
                fs::write(&tmp, &record)
                    .and_then(|_| File::open(&tmp)?.sync_all())
                    .and_then(|_| fs::rename(&tmp, &record_path))
                    .map_err(|e| Error::io(format!("writing {}", record_path.display()), e))?;
            }
            Err(e) => return Err(Error::io(format!("reading {}", record_path.display()), e)),
        }
        let geometry = Geometry {
            block_size: bs,
            image_size: size,
            identity_hash: crate::util::fnv64(record.as_bytes()),
            crc_slots: 2,
        };
        let (store, fresh) = BlockStore::open(dir, geometry)?;
        if fresh {
            store.sync()?;
        }
        Ok(Overlay {
            base,
            store: Arc::new(store),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            dir: dir.to_path_buf(),
            _lock: lock,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes held by the overlay (present blocks), for `export list`.
    pub fn bytes_written(&self) -> u64 {
        self.store.map().counts().0 * self.store.block_size().bytes()
    }

    fn stripe(&self, b: u64) -> &Mutex<()> {
        &self.stripes[(b as usize) % STRIPES]
    }

    async fn read_impl(&self, r: ByteRange) -> Result<ReadData> {
        // A block can change state under a read (a TRIM turns present into
        // zero); the read then starts over. Damage fails every attempt.
        for _ in 0..READ_ATTEMPTS {
            if let Some(rd) = self.read_once(r).await? {
                return Ok(rd);
            }
        }
        Err(Error::new(
            ErrorKind::Corrupt,
            format!(
                "overlay {}: read {r} keeps failing its checksum (damaged client data)",
                self.dir.display()
            ),
        ))
    }

    /// One attempt; `None` when a present page failed its CRC (torn by a
    /// concurrent rewrite or state change: worth another attempt).
    async fn read_once(&self, r: ByteRange) -> Result<Option<ReadData>> {
        let bs = self.store.block_size();
        let blocks = bs.covering(r);
        // The common case for a VM booting a template: nothing written here.
        if blocks
            .clone()
            .all(|b| self.store.state(b) == BlockState::Missing)
        {
            return self.base.read(r).await.map(Some);
        }
        let mut out = BytesMut::zeroed(r.len as usize);
        let mut zero: Vec<ByteRange> = Vec::new();
        let mut b = blocks.start;
        while b < blocks.end {
            let s = self.store.state(b);
            let mut e = b + 1;
            while e < blocks.end && self.store.state(e) == s {
                e += 1;
            }
            let run = ByteRange {
                offset: self.store.block_range(b).offset,
                len: self.store.block_range(e - 1).end() - self.store.block_range(b).offset,
            };
            let Some(piece) = run.intersect(&r) else {
                b = e;
                continue;
            };
            let dst = (piece.offset - r.offset) as usize;
            match s {
                BlockState::Zero => zero.push(piece),
                BlockState::Present => {
                    let bad = self.store.read_verified(r, b, e, &mut out)?;
                    if let Some(&first) = bad.first() {
                        // Let the writer of that block finish, then retry.
                        drop(self.stripe(first).lock().await);
                        return Ok(None);
                    }
                }
                BlockState::Missing => {
                    let rd = self.base.read(piece).await?;
                    out[dst..dst + piece.len as usize].copy_from_slice(&rd.data);
                    zero.extend(rd.zero);
                }
            }
            b = e;
        }
        zero.sort_by_key(|z| z.offset);
        Ok(Some(ReadData {
            data: out.freeze(),
            zero: merge(zero),
        }))
    }

    /// Write `data` at `offset` (validated by the protocol edge).
    /// `keep_zeros`: store all-zero blocks as data (NO_HOLE) instead of
    /// recording them as zero.
    async fn write_impl(&self, offset: u64, data: &[u8], keep_zeros: bool) -> Result<()> {
        let bs = self.store.block_size();
        let r = ByteRange {
            offset,
            len: data.len() as u64,
        };
        for (BlockIndex(b), piece) in bs.split(r, self.store.size()) {
            let src = &data[(piece.offset - offset) as usize..(piece.end() - offset) as usize];
            let _g = self.stripe(b).lock().await;
            let br = self.store.block_range(b);
            match self.store.state(b) {
                BlockState::Present => self.store.overwrite(piece.offset, src)?,
                s @ (BlockState::Missing | BlockState::Zero) => {
                    let whole = if piece == br {
                        Bytes::copy_from_slice(src)
                    } else {
                        let mut buf = if s == BlockState::Missing {
                            BytesMut::from(&self.base.read(br).await?.data[..])
                        } else {
                            BytesMut::zeroed(br.len as usize)
                        };
                        let at = (piece.offset - br.offset) as usize;
                        buf[at..at + src.len()].copy_from_slice(src);
                        buf.freeze()
                    };
                    self.store.publish_blocks_with(b, &whole, keep_zeros)?;
                }
            }
        }
        Ok(())
    }

    /// Zero `r`: whole blocks become `zero` (space freed), partial edges are
    /// written as zero bytes unless `edges` is false (TRIM may skip them).
    /// With `no_hole` every block is written as allocated zero bytes instead,
    /// so it reads as data (not a hole) and later writes need no new space.
    async fn zero_impl(&self, r: ByteRange, edges: bool, no_hole: bool) -> Result<()> {
        let bs = self.store.block_size();
        let zeros = vec![0u8; bs.bytes() as usize];
        for (BlockIndex(b), piece) in bs.split(r, self.store.size()) {
            let br = self.store.block_range(b);
            if piece == br && !no_hole {
                let _g = self.stripe(b).lock().await;
                let was = self.store.state(b);
                // State first: a crash before the punch leaves a zero block
                // over stale bytes (ignored), never a present block over a hole.
                self.store.set_state(b, BlockState::Zero);
                if was == BlockState::Present {
                    self.store.punch(br);
                }
            } else if edges || no_hole {
                self.write_impl(piece.offset, &zeros[..piece.len as usize], no_hole)
                    .await?;
            }
        }
        Ok(())
    }

    /// Sync from a blocking context (shutdown).
    pub fn sync_blocking(&self) -> Result<()> {
        self.store.sync()
    }

    async fn sync(&self) -> Result<()> {
        // fdatasync can take a while; keep it off the runtime workers.
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.sync())
            .await
            .map_err(|e| Error::with_source(ErrorKind::Io, "overlay sync task", e))?
    }
}

fn merge(v: Vec<ByteRange>) -> Vec<ByteRange> {
    let mut out: Vec<ByteRange> = Vec::with_capacity(v.len());
    for r in v {
        match out.last_mut() {
            Some(m) if m.end() == r.offset => m.len += r.len,
            _ => out.push(r),
        }
    }
    out
}

impl BlockDevice for Overlay {
    fn size(&self) -> u64 {
        self.store.size()
    }

    fn read(&self, r: ByteRange) -> BoxFuture<'_, Result<ReadData>> {
        Box::pin(self.read_impl(r))
    }

    fn extents(&self, r: ByteRange) -> Result<Vec<Extent>> {
        let bs = self.store.block_size();
        let mut out: Vec<Extent> = Vec::new();
        let mut push = |e: Extent| match out.last_mut() {
            Some(last) if last.zero == e.zero => last.len += e.len,
            _ => out.push(e),
        };
        for (BlockIndex(b), piece) in bs.split(r, self.store.size()) {
            match self.store.state(b) {
                BlockState::Zero => push(Extent {
                    len: piece.len,
                    zero: true,
                }),
                BlockState::Present => push(Extent {
                    len: piece.len,
                    zero: false,
                }),
                BlockState::Missing => {
                    for e in self.base.extents(piece)? {
                        push(e);
                    }
                }
            }
        }
        Ok(out)
    }

    fn read_now(&self, r: ByteRange) -> Option<Result<ReadData>> {
        // Only the untouched-template case is worth a fast path here.
        let bs = self.store.block_size();
        if bs
            .covering(r)
            .all(|b| self.store.state(b) == BlockState::Missing)
        {
            self.base.read_now(r)
        } else {
            None
        }
    }

    fn prefetch(&self, r: ByteRange) {
        let bs = self.store.block_size();
        for (BlockIndex(b), piece) in bs.split(r, self.store.size()) {
            if self.store.state(b) == BlockState::Missing {
                self.base.prefetch(piece);
            }
        }
    }

    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.sync())
    }
}

impl Writable for Overlay {
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.write_impl(offset, &data, false).await?;
            if fua {
                self.sync().await?;
            }
            Ok(())
        })
    }

    fn trim(&self, r: ByteRange, fua: bool) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            // TRIM is advisory; dropping whole blocks is enough.
            self.zero_impl(r, false, false).await?;
            if fua {
                self.sync().await?;
            }
            Ok(())
        })
    }

    fn write_zeroes(&self, r: ByteRange, f: ZeroFlags) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let bs = self.store.block_size().bytes();
            let aligned = r.offset % bs == 0 && (r.end() % bs == 0 || r.end() == self.store.size());
            if f.fast && (!aligned || f.no_hole) {
                // Partial blocks need the base block, NO_HOLE needs the
                // zeroes written: neither is fast. The client asked to be
                // told instead of waiting.
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    "fast zero needs a block-aligned range without NO_HOLE",
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
