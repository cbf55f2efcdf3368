//! `lazybd cache info` and `lazybd cache verify`: inspect and check a cache
//! directory offline or beside a running server.
//!
//! Locking: `info` and a plain `verify` only read, and take no lock, so
//! they never stop a server from starting or serving. What they see is
//! therefore a snapshot: a server using the image meanwhile may fetch
//! blocks (not checked), evict them (their data punched out under a state
//! read a moment before, so they can show as damaged) or discard the cache
//! for a changed origin. `verify --repair` writes the map (damaged blocks
//! become missing, to be refetched), so it takes the image directory's
//! exclusive lock, the one a server holds while it serves, for the whole
//! check and repair: it refuses while a server holds the cache, and no
//! server can open it until the repair is done. Rejected: a plain verify
//! that takes the lock when it is free, which would make a server that
//! starts during a long check fail to start.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::dir::{CacheDir, Recorded};
use crate::block::{BlockIndex, PAGE};
use crate::error::{Error, Result};
use crate::store::map::{BlockMap, BlockState};

/// Summary of one cached image.
#[derive(Debug, Clone)]
pub struct ImageInfo {
    pub dir: PathBuf,
    pub recorded: Recorded,
    pub blocks: u64,
    pub present: u64,
    pub zero: u64,
    /// Bytes of image content held (present blocks).
    pub cached_bytes: u64,
    /// Bytes the data file really occupies on disk.
    pub disk_bytes: u64,
}

pub fn info(root: &Path) -> Result<Vec<ImageInfo>> {
    let dir = CacheDir::new(root)?;
    let mut out = Vec::new();
    for d in dir.images()? {
        let Some(recorded) = Recorded::read(&d) else {
            continue;
        };
        let map = BlockMap::open_existing(&d.join("meta"))?;
        let (present, zero) = map.counts();
        let g = map.geometry();
        let mut cached = 0;
        for b in 0..map.blocks() {
            if map.state(BlockIndex(b)) == BlockState::Present {
                cached += g.block_size.range_of(BlockIndex(b), g.image_size).len;
            }
        }
        let disk = std::fs::metadata(d.join("data"))
            .map(|m| m.blocks() * 512)
            .unwrap_or(0);
        out.push(ImageInfo {
            dir: d,
            recorded,
            blocks: map.blocks(),
            present,
            zero,
            cached_bytes: cached,
            disk_bytes: disk,
        });
    }
    Ok(out)
}

/// Result of verifying one image.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    pub checked_blocks: u64,
    pub damaged_blocks: Vec<u64>,
    /// State bytes that are not a known value.
    pub bad_states: u64,
    pub repaired: bool,
    /// Read without the lock (no `repair`): a server may have changed the
    /// cache during the check (see the module docs).
    pub snapshot: bool,
}

/// Check every CRC of every present block of the image in `dir`. With
/// `repair`, take the directory's lock first (refused with an error naming
/// `dir` while a server holds it) and mark damaged blocks missing.
pub fn verify_image(
    dir: &Path,
    repair: bool,
    mut progress: impl FnMut(u64, u64),
) -> Result<VerifyReport> {
    // Held until the repair is flushed.
    let _lock = if repair {
        Some(crate::store::lock_dir(dir, "cache").map_err(|e| {
            Error::new(
                e.kind(),
                format!(
                    "cannot repair: {e}; stop the server using it first \
                     (verify without --repair only reads, as a snapshot)"
                ),
            )
        })?)
    } else {
        None
    };
    let map = BlockMap::open_existing(&dir.join("meta"))?;
    let data_path = dir.join("data");
    let data = File::open(&data_path)
        .map_err(|e| Error::io(format!("opening {}", data_path.display()), e))?;
    let g = map.geometry();
    let mut rep = VerifyReport {
        snapshot: !repair,
        ..VerifyReport::default()
    };
    let mut buf = vec![0u8; g.block_size.bytes() as usize];
    for b in 0..map.blocks() {
        if b % 1024 == 0 {
            progress(b, map.blocks());
        }
        let raw = map.raw_state(BlockIndex(b));
        if raw > BlockState::Zero as u8 {
            rep.bad_states += 1;
            rep.damaged_blocks.push(b);
            continue;
        }
        if map.state(BlockIndex(b)) != BlockState::Present {
            continue;
        }
        rep.checked_blocks += 1;
        let r = g.block_size.range_of(BlockIndex(b), g.image_size);
        let buf = &mut buf[..r.len as usize];
        let ok = data.read_exact_at(buf, r.offset).is_ok()
            && buf
                .chunks(PAGE as usize)
                .enumerate()
                .all(|(i, p)| map.page_matches(r.offset / PAGE + i as u64, crc32fast::hash(p)));
        if !ok {
            rep.damaged_blocks.push(b);
        }
    }
    progress(map.blocks(), map.blocks());
    if repair && !rep.damaged_blocks.is_empty() {
        for &b in &rep.damaged_blocks {
            map.set_state(BlockIndex(b), BlockState::Missing);
        }
        map.flush()?;
        rep.repaired = true;
    }
    Ok(rep)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::BlockSize;
    use crate::store::map::Geometry;
    use crate::store::BlockStore;

    const BS: u64 = 64 << 10;

    /// A cache directory of 4 present blocks, block 2 damaged on disk.
    fn damaged_cache() -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("image-0123456789abcdef");
        std::fs::create_dir_all(&dir).unwrap();
        let g = Geometry {
            block_size: BlockSize::new(BS).unwrap(),
            image_size: 4 * BS,
            identity_hash: 1,
            crc_slots: 1,
        };
        let (store, _) = BlockStore::open(&dir, g).unwrap();
        let data: Vec<u8> = (0..4 * BS).map(|i| (i % 251) as u8 + 1).collect();
        store.publish_blocks(0, &data).unwrap();
        store.sync().unwrap();
        drop(store);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("data"))
            .unwrap();
        f.write_all_at(b"garbage", 2 * BS + 100).unwrap();
        (tmp, dir)
    }

    #[test]
    fn repair_refuses_a_cache_a_server_holds_and_changes_nothing() {
        let (_tmp, dir) = damaged_cache();
        let meta = || std::fs::read(dir.join("meta")).unwrap();
        let before = meta();
        // What a running server holds while it serves the image.
        let held = crate::store::lock_dir(&dir, "cache").unwrap();
        let e = verify_image(&dir, true, |_, _| {}).expect_err("repair under a server");
        let msg = e.to_string();
        assert!(msg.contains(&dir.display().to_string()), "{msg}");
        assert!(msg.contains("in use"), "{msg}");
        assert!(meta() == before, "a refused repair changed the map");
        // A plain verify reads without the lock and changes nothing.
        let rep = verify_image(&dir, false, |_, _| {}).unwrap();
        assert_eq!(rep.damaged_blocks, vec![2]);
        assert!(!rep.repaired && rep.snapshot);
        assert!(meta() == before);
        // Once the server is gone, the repair runs.
        drop(held);
        // ... holding the lock: a server starting meanwhile is refused.
        let mut server_refused = Vec::new();
        let rep = verify_image(&dir, true, |_, _| {
            server_refused.push(crate::store::lock_dir(&dir, "cache").is_err())
        })
        .unwrap();
        assert!(rep.repaired && !rep.snapshot);
        assert!(!server_refused.is_empty() && server_refused.iter().all(|&r| r));
        let map = BlockMap::open_existing(&dir.join("meta")).unwrap();
        assert_eq!(map.state(BlockIndex(2)), BlockState::Missing);
        assert_eq!(map.state(BlockIndex(1)), BlockState::Present);
    }
}
