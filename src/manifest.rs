//! Manifests: the trust root for an image's blocks, wherever they come
//! from. A manifest names one origin identity (size and validator) and
//! holds the SHA-256 of every block of the image at its block size. With a
//! manifest, every byte from the origin (and later from peers) is checked
//! against it before the cache stores or serves it; a block that does not
//! match is never served.
//!
//! ```text
//!   cache -> [Verified: widen to manifest blocks, hash, compare] -> origin
//! ```
//!
//! The check sits between the cache and the origin as one more
//! [`Origin`] ([`Verified`]), so nothing above it changes: the cache
//! stores only what came through.
//!
//! # File format (version 1, little-endian)
//!
//! ```text
//!   magic "LZBDMNF\0" | version u32 | algo u8 (1 = SHA-256) | 3 zero bytes
//!   block_size u32 | image_size u64
//!   validator_len u32 | validator (UTF-8; empty: the origin has none)
//!   locator_len u32   | locator (UTF-8; which image, as lazybd names it)
//!   digests: ceil(image_size / block_size) x 32 bytes
//!   SHA-256 of everything above (a damaged file is refused, not trusted)
//! ```
//!
//! Where one is found ([`ManifestSetting`]): given by path, or published
//! beside the image as `IMAGE.lazybd-manifest` (as a boot profile is).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::block::ByteRange;
use crate::device::BoxFuture;
use crate::error::{Error, ErrorKind, Result};
use crate::origin::{ContentDigest, Origin, OriginIdentity};
use crate::stats::Stats;

/// Suffix of a manifest published beside its image.
pub const SIDECAR_SUFFIX: &str = ".lazybd-manifest";
/// Largest manifest read (4 GiB of digests covers 8 TiB at 64 KiB blocks;
/// this bounds what a hostile origin can make lazybd hold).
pub const MAX_BYTES: u64 = 256 << 20;

const MAGIC: &[u8; 8] = b"LZBDMNF\0";
const VERSION: u32 = 1;
const ALGO_SHA256: u8 = 1;
const DIGEST: usize = 32;
const MIN_BLOCK: u64 = 4096;
const MAX_BLOCK: u64 = 16 << 20;
const MAX_TEXT: usize = 8192;

/// One block's digest.
pub type BlockDigest = [u8; DIGEST];

/// A decoded, checked manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub block_size: u64,
    pub image_size: u64,
    /// The origin's validator when it was built (ETag, ...).
    pub validator: Option<String>,
    /// The image it was built from, as lazybd names it.
    pub locator: String,
    pub digests: Vec<BlockDigest>,
}

/// The SHA-256 of `data`.
pub fn digest(data: &[u8]) -> BlockDigest {
    Sha256::digest(data).into()
}

fn bad(what: &str, why: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Corrupt, format!("manifest {what}: {why}"))
}

impl Manifest {
    /// Blocks of an image of `size` bytes at `block_size`.
    pub fn blocks_of(size: u64, block_size: u64) -> u64 {
        size.div_ceil(block_size)
    }

    /// Whether `block_size` is one a manifest may have.
    pub fn valid_block_size(block_size: u64) -> bool {
        block_size.is_power_of_two() && (MIN_BLOCK..=MAX_BLOCK).contains(&block_size)
    }

    /// The file's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let v = self.validator.as_deref().unwrap_or("");
        let mut out =
            Vec::with_capacity(64 + v.len() + self.locator.len() + 32 * self.digests.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&[ALGO_SHA256, 0, 0, 0]);
        out.extend_from_slice(&(self.block_size as u32).to_le_bytes());
        out.extend_from_slice(&self.image_size.to_le_bytes());
        for s in [v, self.locator.as_str()] {
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        for d in &self.digests {
            out.extend_from_slice(d);
        }
        let sum = digest(&out);
        out.extend_from_slice(&sum);
        out
    }

    /// Decode and check a manifest file's bytes; `what` names it in errors.
    pub fn decode(b: &[u8], what: &str) -> Result<Manifest> {
        let mut r = Reader { b, at: 0, what };
        if r.take(8)? != MAGIC {
            return Err(bad(what, "not a lazybd manifest (bad magic)"));
        }
        let version = r.u32()?;
        if version != VERSION {
            let why = if version > VERSION {
                format!("format version {version}, written by a newer lazybd (this one reads {VERSION})")
            } else {
                format!("unknown format version {version}")
            };
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("manifest {what}: {why}"),
            ));
        }
        let algo = r.take(4)?;
        if algo != [ALGO_SHA256, 0, 0, 0] {
            return Err(bad(what, format!("unknown digest algorithm {}", algo[0])));
        }
        let block_size = u64::from(r.u32()?);
        if !Self::valid_block_size(block_size) {
            return Err(bad(
                what,
                format!("block size {block_size} (a power of two, 4 KiB to 16 MiB)"),
            ));
        }
        let image_size = r.u64()?;
        if image_size > 1 << 60 {
            return Err(bad(what, format!("image size {image_size}")));
        }
        let validator = r.text("validator")?;
        let locator = r.text("locator")?;
        let n = Self::blocks_of(image_size, block_size);
        let left = (b.len() - r.at) as u64;
        if left != n * DIGEST as u64 + DIGEST as u64 {
            return Err(bad(
                what,
                format!(
                    "{left} bytes of digests and checksum, {} expected for {n} blocks",
                    n * DIGEST as u64 + DIGEST as u64
                ),
            ));
        }
        let body_end = b.len() - DIGEST;
        if digest(&b[..body_end]) != b[body_end..] {
            return Err(bad(what, "its checksum does not match (damaged)"));
        }
        let digests = b[r.at..body_end]
            .chunks_exact(DIGEST)
            .map(|c| c.try_into().expect("chunks of DIGEST"))
            .collect();
        Ok(Manifest {
            block_size,
            image_size,
            validator: (!validator.is_empty()).then_some(validator),
            locator,
            digests,
        })
    }

    /// `Ok` if this manifest was built from the image `id` is; else the
    /// error refusing it.
    pub fn check_identity(&self, id: &OriginIdentity, what: &str) -> Result<()> {
        if self.image_size == id.size && self.validator == id.validator {
            return Ok(());
        }
        let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "none".into());
        Err(Error::new(
            ErrorKind::OriginChanged,
            format!(
                "manifest {what} was built from {} ({} bytes, validator {}), the origin now has \
                 {} bytes, validator {}: refused (rebuild it with `lazybd manifest build`)",
                self.locator,
                self.image_size,
                show(&self.validator),
                id.size,
                show(&id.validator)
            ),
        ))
    }

    /// The byte range of block `k`.
    fn block_range(&self, k: u64) -> ByteRange {
        let offset = k * self.block_size;
        ByteRange {
            offset,
            len: self.block_size.min(self.image_size - offset),
        }
    }

    /// `r` widened to whole manifest blocks (the only unit a digest
    /// checks), and the index of its first block.
    pub fn widen(&self, r: ByteRange) -> (ByteRange, u64) {
        let bs = self.block_size;
        let first = r.offset / bs;
        let start = first * bs;
        let end = r.end().next_multiple_of(bs).min(self.image_size);
        (
            ByteRange {
                offset: start,
                len: end - start,
            },
            first,
        )
    }

    /// Check `data`, the bytes of blocks from `first` on (the last one may
    /// be the image's short tail): the index of the first block that does
    /// not match, if any.
    pub fn first_mismatch(&self, first: u64, data: &[u8]) -> Option<u64> {
        let mut at = 0usize;
        let mut k = first;
        while at < data.len() {
            let len = self.block_range(k).len as usize;
            let block = &data[at..(at + len).min(data.len())];
            if block.len() != len || self.digests.get(k as usize) != Some(&digest(block)) {
                return Some(k);
            }
            at += len;
            k += 1;
        }
        None
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
    what: &'a str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| bad(self.what, "truncated"))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn text(&mut self, field: &str) -> Result<String> {
        let n = self.u32()? as usize;
        if n > MAX_TEXT {
            return Err(bad(self.what, format!("{field} of {n} bytes")));
        }
        let s = self.take(n)?;
        String::from_utf8(s.to_vec()).map_err(|_| bad(self.what, format!("{field} is not UTF-8")))
    }
}

/// Which manifest an image's blocks are checked against.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ManifestSetting {
    /// The one published beside the image, if there is one.
    #[default]
    Auto,
    /// None: blocks are checked as the origin's answers are (status,
    /// ranges, validator), not against digests.
    Off,
    /// This file, for the image it was built from (by locator); other
    /// images as `Auto`.
    File(PathBuf),
}

impl std::str::FromStr for ManifestSetting {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "" => Err("an empty manifest setting (use auto, none or a path)".into()),
            "auto" => Ok(ManifestSetting::Auto),
            "none" | "off" => Ok(ManifestSetting::Off),
            p => Ok(ManifestSetting::File(PathBuf::from(p))),
        }
    }
}

/// Read the manifest file at `path`, checked.
pub fn read_file(path: &Path) -> Result<Manifest> {
    let what = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|e| Error::io(format!("manifest {what}"), e))?;
    if meta.len() > MAX_BYTES {
        return Err(bad(
            &what,
            format!("{} bytes, more than {MAX_BYTES}", meta.len()),
        ));
    }
    let b = std::fs::read(path).map_err(|e| Error::io(format!("manifest {what}"), e))?;
    Manifest::decode(&b, &what)
}

/// The manifest `setting` finds for `origin`'s image, checked against its
/// identity, and a name for it; `None` when there is none. A manifest
/// found but unreadable, damaged or built from another identity is an
/// error: the image is refused rather than served unchecked.
pub async fn find(
    origin: &dyn Origin,
    setting: &ManifestSetting,
) -> Result<Option<(Arc<Manifest>, String)>> {
    let id = origin.identity().clone();
    let (m, what) = match setting {
        ManifestSetting::Off => return Ok(None),
        ManifestSetting::File(p) => {
            let what = p.display().to_string();
            let m = tokio::task::spawn_blocking({
                let p = p.clone();
                move || read_file(&p)
            })
            .await
            .map_err(|e| Error::with_source(ErrorKind::Io, "manifest read task", e))??;
            if m.locator != id.locator {
                tracing::warn!(image = %id.locator, manifest = %what, built_from = %m.locator,
                    "the manifest given was built from another image: not used for this one");
                return Box::pin(find(origin, &ManifestSetting::Auto)).await;
            }
            (m, what)
        }
        ManifestSetting::Auto => {
            let what = format!("{}{SIDECAR_SUFFIX}", id.locator);
            let Some(b) = origin.sidecar(SIDECAR_SUFFIX, MAX_BYTES).await? else {
                tracing::debug!(image = %id.locator, "no manifest published beside the image");
                return Ok(None);
            };
            // A server that answers any path (an error page with 200, the
            // image itself) publishes nothing: only a file that says it is
            // a manifest is one, and is then held to it.
            if !b.starts_with(MAGIC) {
                tracing::warn!(image = %id.locator, manifest = %what,
                    "the origin's answer for the manifest is not one: no manifest used");
                return Ok(None);
            }
            (Manifest::decode(&b, &what)?, what)
        }
    };
    m.check_identity(&id, &what)?;
    tracing::info!(image = %id.locator, manifest = %what, blocks = m.digests.len(),
        block_size = m.block_size, "manifest: every block from the origin is checked against it");
    Ok(Some((Arc::new(m), what)))
}

/// `origin` with its blocks checked against the manifest `setting` finds
/// for it ([`find`]), or `origin` itself when there is none.
pub async fn attach(
    origin: Arc<dyn Origin>,
    setting: &ManifestSetting,
    stats: Arc<Stats>,
) -> Result<Arc<dyn Origin>> {
    Ok(match find(&*origin, setting).await? {
        Some((m, _)) => verified(origin, m, stats),
        None => origin,
    })
}

/// `origin` with every block checked against `m`.
pub fn verified(origin: Arc<dyn Origin>, m: Arc<Manifest>, stats: Arc<Stats>) -> Arc<dyn Origin> {
    Arc::new(Verified {
        inner: origin,
        m,
        stats,
    })
}

/// An origin whose every block is checked against a manifest.
pub struct Verified {
    inner: Arc<dyn Origin>,
    m: Arc<Manifest>,
    stats: Arc<Stats>,
}

/// Bytes hashed inline; more go to the blocking pool.
const INLINE_HASH: usize = 256 << 10;

impl Verified {
    async fn read(&self, r: ByteRange) -> Result<Bytes> {
        let bs = self.m.block_size;
        let (wide, first) = self.m.widen(r);
        let data = self.inner.read_range(wide).await?;
        let bad = if data.len() <= INLINE_HASH {
            self.m.first_mismatch(first, &data)
        } else {
            let (m, d) = (self.m.clone(), data.clone());
            tokio::task::spawn_blocking(move || m.first_mismatch(first, &d))
                .await
                .map_err(|e| Error::with_source(ErrorKind::Io, "manifest check task", e))?
        };
        if let Some(k) = bad {
            Stats::add(&self.stats.manifest_failures, 1);
            let id = self.inner.identity();
            tracing::error!(image = %id.locator, block = k, block_size = bs,
                "bytes from the origin do not match the manifest: not served");
            return Err(Error::new(
                ErrorKind::OriginChanged,
                format!(
                    "{}: block {k} ({} bytes at {}) from the origin does not match its manifest \
                     digest: not served",
                    id.locator,
                    self.m.block_range(k).len,
                    self.m.block_range(k).offset
                ),
            ));
        }
        let at = (r.offset - wide.offset) as usize;
        Ok(data.slice(at..at + r.len as usize))
    }
}

impl Origin for Verified {
    fn identity(&self) -> &OriginIdentity {
        self.inner.identity()
    }

    fn read_range(&self, range: ByteRange) -> BoxFuture<'_, Result<Bytes>> {
        Box::pin(self.read(range))
    }

    fn connections(&self) -> usize {
        self.inner.connections()
    }

    fn sidecar(&self, suffix: &str, max: u64) -> BoxFuture<'_, Result<Option<Bytes>>> {
        self.inner.sidecar(suffix, max)
    }

    fn content_digest(&self) -> Option<&ContentDigest> {
        self.inner.content_digest()
    }

    fn disk_format(&self) -> Option<&str> {
        self.inner.disk_format()
    }

    fn reload(&self) -> Result<bool> {
        self.inner.reload()
    }

    fn sequential_only(&self) -> bool {
        self.inner.sequential_only()
    }

    fn fetch_unit(&self) -> Option<u64> {
        self.inner.fetch_unit()
    }
}

/// Build the manifest of `origin`'s image at `block_size`, reading it
/// `jobs` pieces of `chunk` bytes at a time; `done` counts bytes read.
pub async fn build(
    origin: Arc<dyn Origin>,
    block_size: u64,
    jobs: usize,
    chunk: u64,
    done: Arc<std::sync::atomic::AtomicU64>,
) -> Result<Manifest> {
    if !Manifest::valid_block_size(block_size) {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("block size {block_size}: a power of two from 4 KiB to 16 MiB"),
        ));
    }
    let id = origin.identity().clone();
    let n = Manifest::blocks_of(id.size, block_size);
    // Whole blocks per piece.
    let per = (chunk / block_size).max(1);
    let mut digests = vec![[0u8; DIGEST]; n as usize];
    let mut set = tokio::task::JoinSet::new();
    let sem = Arc::new(tokio::sync::Semaphore::new(jobs.max(1)));
    for (first, count) in pieces_of(n, per) {
        let permit = sem.clone().acquire_owned().await.expect("not closed");
        let (o, d) = (origin.clone(), done.clone());
        let size = id.size;
        set.spawn(async move {
            let _permit = permit;
            let start = first * block_size;
            let end = ((first + count) * block_size).min(size);
            let data = o
                .read_range(ByteRange {
                    offset: start,
                    len: end - start,
                })
                .await?;
            let sums = tokio::task::spawn_blocking(move || {
                data.chunks(block_size as usize)
                    .map(digest)
                    .collect::<Vec<_>>()
            })
            .await
            .map_err(|e| Error::with_source(ErrorKind::Io, "hash task", e))?;
            d.fetch_add(end - start, std::sync::atomic::Ordering::Relaxed);
            Ok::<_, Error>((first, sums))
        });
        while let Some(r) = set.try_join_next() {
            let (first, sums) =
                r.map_err(|e| Error::with_source(ErrorKind::Io, "read task", e))??;
            digests[first as usize..first as usize + sums.len()].copy_from_slice(&sums);
        }
    }
    while let Some(r) = set.join_next().await {
        let (first, sums) = r.map_err(|e| Error::with_source(ErrorKind::Io, "read task", e))??;
        digests[first as usize..first as usize + sums.len()].copy_from_slice(&sums);
    }
    Ok(Manifest {
        block_size,
        image_size: id.size,
        validator: id.validator.clone(),
        locator: id.locator.clone(),
        digests,
    })
}

/// `(first block, blocks)` pieces of `per` blocks covering `n` blocks.
fn pieces_of(n: u64, per: u64) -> impl Iterator<Item = (u64, u64)> {
    (0..n.div_ceil(per)).map(move |i| (i * per, per.min(n - i * per)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(size: u64, bs: u64) -> (Vec<u8>, Manifest) {
        let data: Vec<u8> = (0..size).map(|i| (i * 31 + i / 977) as u8).collect();
        let m = Manifest {
            block_size: bs,
            image_size: size,
            validator: Some("\"abc-123\"".into()),
            locator: "http://h/img.raw".into(),
            digests: data.chunks(bs as usize).map(digest).collect(),
        };
        (data, m)
    }

    #[test]
    fn round_trip_and_damage_is_refused() {
        let (_, m) = sample(3 * 4096 + 100, 4096);
        let b = m.encode();
        assert_eq!(Manifest::decode(&b, "m").unwrap(), m);
        // Every single-byte change and every truncation is refused.
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0x40;
            assert!(Manifest::decode(&c, "m").is_err(), "flip at {i}");
            assert!(Manifest::decode(&b[..i], "m").is_err(), "cut at {i}");
        }
        let mut newer = b.clone();
        newer[8] = 2;
        let e = Manifest::decode(&newer, "x.lazybd-manifest").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(e.to_string().contains("x.lazybd-manifest") && e.to_string().contains("newer"));
        let none = Manifest {
            validator: None,
            ..m
        };
        assert_eq!(
            Manifest::decode(&none.encode(), "m").unwrap().validator,
            None
        );
    }

    #[test]
    fn blocks_are_checked_and_identity_pinned() {
        let (mut data, m) = sample(5 * 4096 + 7, 4096);
        assert_eq!(m.first_mismatch(0, &data), None);
        assert_eq!(m.first_mismatch(2, &data[2 * 4096..]), None);
        // A short answer is a mismatch, not a pass.
        assert_eq!(m.first_mismatch(4, &data[4 * 4096..5 * 4096 + 3]), Some(5));
        data[3 * 4096 + 9] ^= 1;
        assert_eq!(m.first_mismatch(0, &data), Some(3));
        let id = OriginIdentity {
            locator: "http://h/img.raw".into(),
            size: m.image_size,
            validator: m.validator.clone(),
        };
        m.check_identity(&id, "m").unwrap();
        let changed = OriginIdentity {
            validator: Some("\"other\"".into()),
            ..id
        };
        let e = m.check_identity(&changed, "m").unwrap_err();
        assert!(e.to_string().contains("refused"), "{e}");
    }

    /// An origin over bytes that can be made to lie.
    struct Mem {
        id: OriginIdentity,
        data: std::sync::Mutex<Vec<u8>>,
    }

    impl Origin for Mem {
        fn identity(&self) -> &OriginIdentity {
            &self.id
        }
        fn read_range(&self, r: ByteRange) -> BoxFuture<'_, Result<Bytes>> {
            let d = self.data.lock().unwrap();
            let b = Bytes::copy_from_slice(&d[r.offset as usize..r.end() as usize]);
            Box::pin(async move { Ok(b) })
        }
    }

    #[tokio::test]
    async fn verified_reads_widen_check_and_refuse() {
        let (data, m) = sample(10 * 4096 + 5, 4096);
        let mem = Arc::new(Mem {
            id: OriginIdentity {
                locator: m.locator.clone(),
                size: m.image_size,
                validator: m.validator.clone(),
            },
            data: std::sync::Mutex::new(data.clone()),
        });
        let built = build(mem.clone(), 4096, 3, 8192, Default::default())
            .await
            .unwrap();
        assert_eq!(built, m, "build agrees with the model");
        let path = std::env::temp_dir().join(format!("lazybd-manifest-{}", std::process::id()));
        std::fs::write(&path, m.encode()).unwrap();
        let stats = Arc::new(Stats::default());
        let o = attach(
            mem.clone(),
            &ManifestSetting::File(path.clone()),
            stats.clone(),
        )
        .await
        .unwrap();
        for (off, len) in [(0, 10), (4095, 2), (40960, 5), (100, 3 * 4096)] {
            let got = o
                .read_range(ByteRange::new(off, len).unwrap())
                .await
                .unwrap();
            assert_eq!(&got[..], &data[off as usize..(off + len) as usize]);
        }
        // The origin lies about one block: that block is refused, others served.
        mem.data.lock().unwrap()[2 * 4096 + 1] ^= 0xff;
        let e = o
            .read_range(ByteRange::new(2 * 4096 + 100, 10).unwrap())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::OriginChanged);
        assert!(e.to_string().contains("block 2"), "{e}");
        assert_eq!(Stats::get(&stats.manifest_failures), 1);
        assert!(o.read_range(ByteRange::new(0, 8192).unwrap()).await.is_ok());
        std::fs::remove_file(&path).ok();
    }
}
