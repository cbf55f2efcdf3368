//! Boot profiles: which parts of an image a boot reads, in order.
//!
//! A boot reads a small part of its image (tens of MiB), in nearly the same
//! order every time, mostly one request at a time; cold, every read waits a
//! round trip. Recording that order once and replaying it on the next cold
//! start, many requests in parallel and before the guest asks, turns those
//! round trips into one transfer.
//!
//! * Recording (`Recorder`): the cache notes the first read of each block
//!   for a while after the first read (or until told to stop); the result is
//!   saved as `profile` in the image's cache directory.
//! * Replay (`replay`): at open, fetch the profile's missing blocks in
//!   recorded order, coalesced into large requests, with the cache's
//!   background permits (guest misses keep the other half of the origin's
//!   connections, and join a replay fetch already under way).
//! * Publishing: a profile beside the image on the origin
//!   (`IMAGE.lazybd-profile`) is used when the cache has none, so one
//!   recording serves every host.
//!
//! The file format is small and checked (a profile only ever causes
//! prefetches, but a damaged one must not cause nonsense):
//!
//! ```text
//!   "LBDPROF1"  image size u64le  count u32le
//!   count x (zigzag varint: start page - previous end page,
//!            varint: length in pages)              pages = 4 KiB
//!   crc32 u32le of everything before
//! ```
//!
//! The magic's last byte is the format version ('1'); a profile of a newer
//! version is ignored with a warning that says so (a profile can always be
//! recorded again: it is never client data).
//!
//! [`Profile`] is public for `lazybd profile`, the tests and the fuzz
//! target `profile_decode`; recording and replay are crate-private.

use std::path::Path;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::block::{BlockSize, ByteRange, PAGE};
use crate::cache::ImageCache;
use crate::error::{Error, ErrorKind, Result};
use crate::stats::Work;
use crate::util::human_bytes;

const MAGIC: &[u8; 8] = b"LBDPROF1";
/// Name of the profile in an image's cache directory.
pub const FILE: &str = "profile";
/// Suffix of a profile published beside the image on the origin.
pub const SIDECAR_SUFFIX: &str = ".lazybd-profile";
/// Largest profile accepted (about a million ranges).
const MAX_BYTES: u64 = 16 << 20;

/// Ranges of an image, in the order a boot first read them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    pub image_size: u64,
    /// Page-aligned (the last may end at `image_size`), non-empty.
    pub ranges: Vec<ByteRange>,
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(b: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*pos)?;
        *pos += 1;
        v |= ((byte & 0x7f) as u64) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

impl Profile {
    /// Bytes the profile covers.
    pub fn bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.len).sum()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(24 + self.ranges.len() * 4);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.image_size.to_le_bytes());
        out.extend_from_slice(&(self.ranges.len() as u32).to_le_bytes());
        let mut prev_end = 0u64;
        for r in &self.ranges {
            let start = r.offset / PAGE;
            let pages = r.len.div_ceil(PAGE);
            let delta = start as i64 - prev_end as i64;
            put_varint(&mut out, ((delta << 1) ^ (delta >> 63)) as u64);
            put_varint(&mut out, pages);
            prev_end = start + pages;
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    pub fn decode(b: &[u8]) -> Result<Profile> {
        let bad = |why: &str| Error::new(ErrorKind::Corrupt, format!("boot profile: {why}"));
        // The magic's last byte is the format version.
        if b.len() >= 8 && b[..7] == MAGIC[..7] && b[7] > MAGIC[7] {
            return Err(bad(&format!(
                "format version {}, written by a newer lazybd (this one reads version 1)",
                b[7] as char
            )));
        }
        if b.len() < 24 || &b[..8] != MAGIC {
            return Err(bad("not a lazybd profile (bad magic)"));
        }
        if b.len() as u64 > MAX_BYTES {
            return Err(bad("too large"));
        }
        let (body, crc) = b.split_at(b.len() - 4);
        if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
            return Err(bad("checksum mismatch (damaged or truncated)"));
        }
        let image_size = u64::from_le_bytes(body[8..16].try_into().expect("8 bytes"));
        let count = u32::from_le_bytes(body[16..20].try_into().expect("4 bytes")) as usize;
        // Each entry takes at least two bytes: a count beyond that is a lie.
        if count > (body.len() - 20) / 2 {
            return Err(bad("entry count exceeds the file"));
        }
        let pages_total = image_size.div_ceil(PAGE);
        let mut ranges = Vec::with_capacity(count);
        let mut pos = 20;
        let mut prev_end = 0u64;
        for _ in 0..count {
            let z = get_varint(body, &mut pos).ok_or_else(|| bad("truncated entry"))?;
            let pages = get_varint(body, &mut pos).ok_or_else(|| bad("truncated entry"))?;
            let delta = ((z >> 1) as i64) ^ -((z & 1) as i64);
            let start = (prev_end as i64)
                .checked_add(delta)
                .filter(|s| *s >= 0)
                .ok_or_else(|| bad("range before the image start"))? as u64;
            let end = start
                .checked_add(pages)
                .filter(|e| *e <= pages_total && pages > 0)
                .ok_or_else(|| bad("range outside the image"))?;
            let offset = start * PAGE;
            ranges.push(ByteRange {
                offset,
                len: (end * PAGE).min(image_size) - offset,
            });
            prev_end = end;
        }
        if pos != body.len() {
            return Err(bad("trailing bytes after the entries"));
        }
        Ok(Profile { image_size, ranges })
    }

    /// The profile saved in an image's cache directory, if any.
    pub fn load(image_dir: &Path) -> Result<Option<Profile>> {
        let path = image_dir.join(FILE);
        match std::fs::read(&path) {
            Ok(b) => Profile::decode(&b)
                .map(Some)
                .map_err(|e| e.context_prefix(path.display().to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
        }
    }

    /// Save atomically (temp file, fsync, rename) in an image's directory.
    pub fn save(&self, image_dir: &Path) -> Result<()> {
        crate::util::write_atomic(&image_dir.join(FILE), &self.encode())
    }

    /// Check the profile belongs to an image of `size` bytes.
    pub fn check_image(&self, size: u64) -> Result<()> {
        if self.image_size != size {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "boot profile is for an image of {} bytes, this one has {size}",
                    self.image_size
                ),
            ));
        }
        Ok(())
    }
}

/// Records the first read of each block, in order, for a while.
struct Recorder {
    bs: BlockSize,
    image_size: u64,
    /// One bit per block: already recorded.
    seen: Vec<u64>,
    ranges: Vec<ByteRange>,
    /// Set by the first read: the clock starts when the guest does.
    started: Option<Instant>,
    /// How long to record after the first read; None: until stopped.
    limit: Option<Duration>,
}

impl Recorder {
    pub(crate) fn new(bs: BlockSize, image_size: u64, limit: Option<Duration>) -> Self {
        let blocks = bs.count(image_size);
        Recorder {
            bs,
            image_size,
            seen: vec![0; blocks.div_ceil(64) as usize],
            ranges: Vec::new(),
            started: None,
            limit,
        }
    }

    /// Note a guest read (cheap: a bit test per block once started).
    pub(crate) fn note(&mut self, r: ByteRange) {
        let now = Instant::now();
        let started = *self.started.get_or_insert(now);
        if self.limit.is_some_and(|l| now - started > l) {
            return;
        }
        for b in self.bs.covering(r) {
            let (w, bit) = ((b / 64) as usize, 1u64 << (b % 64));
            if self.seen[w] & bit != 0 {
                continue;
            }
            self.seen[w] |= bit;
            let br = self
                .bs
                .range_of(crate::block::BlockIndex(b), self.image_size);
            match self.ranges.last_mut() {
                Some(last) if last.end() == br.offset => last.len += br.len,
                _ => self.ranges.push(br),
            }
        }
    }

    /// Whether the recording window has passed.
    fn expired(&self) -> bool {
        match (self.started, self.limit) {
            (Some(s), Some(l)) => s.elapsed() > l,
            _ => false,
        }
    }

    pub(crate) fn into_profile(self) -> Profile {
        Profile {
            image_size: self.image_size,
            ranges: self.ranges,
        }
    }
}

impl crate::cache::ReadObserver for Recorder {
    fn note(&mut self, r: ByteRange) {
        Recorder::note(self, r)
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any> {
        self
    }
}

/// Start recording the first reads of `cache`'s image as a boot profile.
pub(crate) fn start_recording(cache: &ImageCache, limit: Option<Duration>) {
    cache.observe_reads(Box::new(Recorder::new(
        cache.block_size(),
        cache.image_size(),
        limit,
    )));
}

/// Is `cache` recording no longer (never started, stopped, or its window
/// has passed)?
pub(crate) fn recording_over(cache: &ImageCache) -> bool {
    cache.with_observer(|o| {
        let rec = o.and_then(|o| o.as_any().downcast_ref::<Recorder>());
        rec.map_or(true, Recorder::expired)
    })
}

/// Stop a cache's recording and save what it holds. Returns the profile
/// saved (None: nothing was recording, or nothing was read).
pub(crate) fn finish_recording(cache: &ImageCache) -> Result<Option<Profile>> {
    let Some(obs) = cache.stop_observing() else {
        return Ok(None);
    };
    let Ok(rec) = obs.into_any().downcast::<Recorder>() else {
        return Ok(None); // not a recording (profiles are the only observers today)
    };
    let p = rec.into_profile();
    if p.ranges.is_empty() {
        tracing::info!(image = %cache.origin().identity().locator, "boot profile: nothing was read; not saved");
        return Ok(None);
    }
    p.save(cache.dir())?;
    tracing::info!(image = %cache.origin().identity().locator, ranges = p.ranges.len(),
        bytes = %human_bytes(p.bytes()), dir = %cache.dir().display(), "boot profile saved");
    Ok(Some(p))
}

/// The profile to replay for a freshly opened image: the cache's own, else
/// one published beside the image on the origin (then kept in the cache).
pub(crate) async fn find(cache: &ImageCache) -> Result<Option<Profile>> {
    let size = cache.image_size();
    if let Some(p) = Profile::load(cache.dir())? {
        p.check_image(size)?;
        return Ok(Some(p));
    }
    // A published profile is for the first, empty start on a host; a cache
    // that held blocks already has been through a boot. (As opened: the
    // export's own first reads may already have stored a block.)
    if !cache.opened_empty() {
        return Ok(None);
    }
    let Some(bytes) = cache.origin().sidecar(SIDECAR_SUFFIX, MAX_BYTES).await? else {
        return Ok(None);
    };
    let p = Profile::decode(&bytes).map_err(|e| e.context_prefix("published profile"))?;
    p.check_image(size)?;
    tracing::info!(ranges = p.ranges.len(), bytes = %human_bytes(p.bytes()),
        "using the boot profile published beside the image");
    if let Err(e) = p.save(cache.dir()) {
        tracing::warn!(error = %e, "cannot keep the published profile in the cache");
    }
    Ok(Some(p))
}

/// What a replay did.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct ReplayReport {
    pub(crate) requests: u64,
    pub(crate) bytes: u64,
    pub(crate) elapsed: Duration,
}

/// Parallel fetches a replay keeps going (bounded again by the cache's
/// background permits).
const REPLAY_JOBS: usize = 8;

/// Fetch the profile's missing blocks in recorded order, coalesced into
/// requests of up to the cache's fetch size, [`REPLAY_JOBS`] at a time.
pub(crate) async fn replay(
    cache: ImageCache,
    p: Profile,
    mut stop: watch::Receiver<bool>,
) -> Result<ReplayReport> {
    let started = Instant::now();
    let bs = cache.block_size();
    let per_fetch = (cache.max_fetch() / bs.bytes()).max(1);
    // Missing blocks in recorded order, as runs of adjacent blocks.
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for r in &p.ranges {
        for b in bs.covering(*r) {
            if !cache.is_missing(b) {
                continue;
            }
            match runs.last_mut() {
                Some((first, n)) if *first + *n == b && *n < per_fetch => *n += 1,
                _ => runs.push((b, 1)),
            }
        }
    }
    let mut report = ReplayReport::default();
    let mut jobs: JoinSet<Result<u64>> = JoinSet::new();
    for (first, n) in runs {
        while jobs.len() >= REPLAY_JOBS {
            if let Some(Ok(Err(e))) = jobs.join_next().await {
                if e.kind() == ErrorKind::OriginChanged {
                    return Err(e);
                }
                tracing::debug!(error = %e, "profile fetch failed");
            }
        }
        let permit = tokio::select! {
            p = cache.background_permits().clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = stop.wait_for(|s| *s) => break,
        };
        let range = bs.range_of(crate::block::BlockIndex(first), cache.image_size());
        let end = bs
            .range_of(crate::block::BlockIndex(first + n - 1), cache.image_size())
            .end();
        let range = ByteRange {
            offset: range.offset,
            len: end - range.offset,
        };
        let c = cache.clone();
        report.requests += 1;
        jobs.spawn(async move {
            let _permit = permit;
            c.fetch_background(range, Work::Profile).await
        });
    }
    while let Some(r) = jobs.join_next().await {
        match r {
            Ok(Ok(b)) => report.bytes += b,
            Ok(Err(e)) => tracing::debug!(error = %e, "profile fetch failed"),
            Err(_) => {}
        }
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_damage() {
        let p = Profile {
            image_size: 10 * PAGE + 100,
            ranges: vec![
                ByteRange {
                    offset: 4 * PAGE,
                    len: 2 * PAGE,
                },
                ByteRange {
                    offset: 0,
                    len: PAGE,
                },
                ByteRange {
                    offset: 10 * PAGE,
                    len: 100,
                },
            ],
        };
        let b = p.encode();
        assert_eq!(Profile::decode(&b).unwrap(), p);
        for i in 0..b.len() {
            let mut d = b.clone();
            d[i] ^= 0x40;
            assert!(Profile::decode(&d).is_err(), "flipped byte {i} accepted");
        }
        assert!(Profile::decode(&b[..b.len() - 1]).is_err());
        // A newer format says so (and is only ignored: never client data).
        let mut newer = b.clone();
        newer[7] = b'2';
        let e = Profile::decode(&newer).unwrap_err().to_string();
        assert!(
            e.contains("format version 2, written by a newer lazybd"),
            "{e}"
        );
    }

    #[test]
    fn recorder_keeps_first_touch_order() {
        let bs = BlockSize::new(8192).unwrap();
        let mut r = Recorder::new(bs, 100_000, None);
        r.note(ByteRange {
            offset: 20_000,
            len: 100,
        }); // block 2
        r.note(ByteRange {
            offset: 24_000,
            len: 9000,
        }); // blocks 2, 3, 4
        r.note(ByteRange { offset: 0, len: 10 }); // block 0
        r.note(ByteRange {
            offset: 16_384,
            len: 10,
        }); // block 2 again
        let p = r.into_profile();
        assert_eq!(
            p.ranges,
            vec![
                ByteRange {
                    offset: 16_384,
                    len: 3 * 8192
                },
                ByteRange {
                    offset: 0,
                    len: 8192
                },
            ]
        );
        assert_eq!(Profile::decode(&p.encode()).unwrap(), p);
    }
}
