//! `lazybd cache info` and `lazybd cache verify`: inspect and check a cache
//! directory offline (or beside a running server: both only read, except
//! `--repair`, which marks damaged blocks missing so they are refetched).

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
}

/// Check every CRC of every present block of the image in `dir`.
pub fn verify_image(
    dir: &Path,
    repair: bool,
    mut progress: impl FnMut(u64, u64),
) -> Result<VerifyReport> {
    let map = BlockMap::open_existing(&dir.join("meta"))?;
    let data_path = dir.join("data");
    let data = File::open(&data_path)
        .map_err(|e| Error::io(format!("opening {}", data_path.display()), e))?;
    let g = map.geometry();
    let mut rep = VerifyReport::default();
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
