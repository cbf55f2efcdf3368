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
                crate::util::write_atomic(&record_path, record.as_bytes())?;
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
        let bs = self.store.block_size();
        // The common case for a VM booting a template: nothing written here.
        if bs
            .covering(r)
            .all(|b| self.store.state(b) == BlockState::Missing)
        {
            return self.base.read(r).await;
        }
        // Base pieces are read first, then the read is assembled from the
        // states as they are then. A block can change state in between (a
        // write, a TRIM) or a page can be caught mid-rewrite: assembling
        // starts over. Damage fails every attempt.
        let mut fetched: Vec<(ByteRange, ReadData)> = Vec::new();
        for _ in 0..READ_ATTEMPTS {
            let mut lookup = |p: ByteRange| {
                let i = fetched.iter().position(|(q, _)| *q == p)?;
                Some(Ok(fetched.swap_remove(i).1))
            };
            match self.assemble(r, &mut lookup) {
                Assembled::Done(res) => return res,
                Assembled::NeedBase(pieces) => {
                    fetched.clear();
                    for p in pieces {
                        fetched.push((p, self.base.read(p).await?));
                    }
                }
                Assembled::Torn(b) => {
                    // Let the writer of that block finish, then retry.
                    drop(self.stripe(b).lock().await);
                }
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

    /// Assemble a read of `r` from the overlay's blocks as they are now,
    /// asking `base` for the parts of `r` in missing blocks; `base` answers
    /// `None` for a part it cannot give without waiting.
    fn assemble(
        &self,
        r: ByteRange,
        base: &mut dyn FnMut(ByteRange) -> Option<Result<ReadData>>,
    ) -> Assembled {
        let bs = self.store.block_size();
        let blocks = bs.covering(r);
        let mut out = BytesMut::zeroed(r.len as usize);
        let mut zero: Vec<ByteRange> = Vec::new();
        let mut need: Vec<ByteRange> = Vec::new();
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
            let piece = run.intersect(&r).expect("run of covering blocks meets r");
            let dst = (piece.offset - r.offset) as usize;
            match s {
                BlockState::Zero => zero.push(piece),
                BlockState::Present => match self.store.read_verified(r, b, e, &mut out) {
                    Ok(bad) if !bad.is_empty() => return Assembled::Torn(bad[0]),
                    Ok(_) => {}
                    Err(err) => return Assembled::Done(Err(err)),
                },
                BlockState::Missing => match base(piece) {
                    Some(Ok(rd)) => {
                        out[dst..dst + piece.len as usize].copy_from_slice(&rd.data);
                        zero.extend(rd.zero);
                    }
                    Some(Err(err)) => return Assembled::Done(Err(err)),
                    None => need.push(piece),
                },
            }
            b = e;
        }
        if !need.is_empty() {
            return Assembled::NeedBase(need);
        }
        zero.sort_by_key(|z| z.offset);
        Assembled::Done(Ok(ReadData {
            data: out.freeze(),
            zero: merge(zero),
        }))
    }

    /// Whether writing `piece` of block `b` needs the base block's bytes
    /// (a partial write over a block the overlay does not hold yet).
    fn needs_base(&self, b: u64, piece: ByteRange) -> bool {
        self.store.state(b) == BlockState::Missing && piece != self.store.block_range(b)
    }

    /// Write `src` at `piece` of block `b`; the caller holds the block's
    /// stripe and passes the base block when [`Self::needs_base`] said so.
    fn write_block(
        &self,
        b: u64,
        piece: ByteRange,
        src: &[u8],
        keep_zeros: bool,
        base: Option<ReadData>,
    ) -> Result<()> {
        let br = self.store.block_range(b);
        if self.store.state(b) == BlockState::Present {
            return self.store.overwrite(piece.offset, src);
        }
        if piece == br {
            self.store.publish_blocks_with(b, src, keep_zeros)?;
            return Ok(());
        }
        let mut buf = match base {
            Some(rd) => BytesMut::from(&rd.data[..]),
            None => BytesMut::zeroed(br.len as usize),
        };
        let at = (piece.offset - br.offset) as usize;
        buf[at..at + src.len()].copy_from_slice(src);
        self.store.publish_blocks_with(b, &buf, keep_zeros)?;
        Ok(())
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
            let base = if self.needs_base(b, piece) {
                Some(self.base.read(self.store.block_range(b)).await?)
            } else {
                None
            };
            self.write_block(b, piece, src, keep_zeros, base)?;
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

/// What [`Overlay::assemble`] made of a read.
enum Assembled {
    Done(Result<ReadData>),
    /// These parts of missing blocks must come from the base first.
    NeedBase(Vec<ByteRange>),
    /// A page of this block failed its CRC: torn by a concurrent rewrite
    /// (worth another attempt once its writer is done) or damaged.
    Torn(u64),
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
        let bs = self.store.block_size();
        if bs
            .covering(r)
            .all(|b| self.store.state(b) == BlockState::Missing)
        {
            return self.base.read_now(r);
        }
        match self.assemble(r, &mut |p| self.base.read_now(p)) {
            Assembled::Done(res) => Some(res),
            Assembled::NeedBase(_) | Assembled::Torn(_) => None,
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
    fn write_now(&self, offset: u64, data: &[u8], fua: bool) -> Option<Result<()>> {
        if fua {
            return None; // a sync does not belong on the request loop
        }
        let bs = self.store.block_size();
        let r = ByteRange {
            offset,
            len: data.len() as u64,
        };
        for (BlockIndex(b), piece) in bs.split(r, self.store.size()) {
            let src = &data[(piece.offset - offset) as usize..(piece.end() - offset) as usize];
            // Giving up half way is fine: the slow path writes the same
            // bytes again, and overlapping in-flight writes are unordered.
            let _g = self.stripe(b).try_lock().ok()?;
            let base = if self.needs_base(b, piece) {
                match self.base.read_now(self.store.block_range(b))? {
                    Ok(rd) => Some(rd),
                    Err(e) => return Some(Err(e)),
                }
            } else {
                None
            };
            if let Err(e) = self.write_block(b, piece, src, false, base) {
                return Some(Err(e));
            }
        }
        Some(Ok(()))
    }

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
