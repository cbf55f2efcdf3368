//! Migration of a version-1 overlay (`meta`: a block map with two CRC
//! slots per 4 KiB page preallocated for the whole image; `data`: pages at
//! image offsets) to version 2, in place and crash-safely:
//!
//! 1. the new store is built in `v2.tmp/` from every page that verifies;
//! 2. `v2.tmp/pages` is renamed to `pages`, then `v2.tmp/journal` to
//!    `journal`: the journal's arrival is the commit point;
//! 3. only then are `meta` and `data` removed.
//!
//! A crash before the commit leaves version 1 whole (the next open starts
//! again); after it, version 2 is whole and the old files are leftovers.
//! A page that verifies against neither CRC cannot be migrated: migration
//! is refused (naming the pages) unless the operator asked for a repair.

use std::path::Path;
use std::sync::Arc;

use crate::block::{BlockIndex, PAGE};
use crate::error::{Error, ErrorKind, Result};
use crate::store::map::{BlockMap, BlockState};

use super::disk::{Dir, OsDir};
use super::store::{PageStore, JOURNAL, PAGES};

const TMP: &str = "v2.tmp";

/// Does `dir` hold version-1 files that still need migrating (or leftovers
/// of a finished migration)?
pub(crate) fn pending(dir: &Path) -> bool {
    dir.join("meta").exists()
}

fn io(what: &str, p: &Path, e: std::io::Error) -> Error {
    Error::io(format!("{what} {}", p.display()), e)
}

/// Migrate `dir`; returns the pages that could not be kept (only with
/// `keep_going`; otherwise such pages refuse the migration).
pub(crate) fn migrate(
    dir: &Path,
    image_size: u64,
    identity: u64,
    keep_going: bool,
) -> Result<Vec<u64>> {
    let meta = dir.join("meta");
    let data_path = dir.join("data");
    if dir.join(JOURNAL).exists() {
        // Committed earlier; the old files are leftovers.
        for p in [&meta, &data_path] {
            if let Err(e) = std::fs::remove_file(p) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    return Err(io("removing", p, e));
                }
            }
        }
        return Ok(Vec::new());
    }
    let map = BlockMap::open_existing(&meta).map_err(|e| {
        Error::new(
            ErrorKind::Corrupt,
            format!(
                "{} (version-1 overlay map): {}; refusing to open it, and leaving it untouched",
                meta.display(),
                e.context()
            ),
        )
    })?;
    let g = map.geometry();
    if g.block_size.bytes() != PAGE
        || g.crc_slots != 2
        || g.image_size != image_size
        || g.identity_hash != identity
    {
        return Err(Error::new(
            ErrorKind::Corrupt,
            format!(
                "{}: a version-1 map of another geometry (block {}, {} CRC slots, size {}, identity {:016x}; expected 4 KiB, 2, {image_size}, {identity:016x}); refusing to open it",
                meta.display(),
                g.block_size,
                g.crc_slots,
                g.image_size,
                g.identity_hash
            ),
        ));
    }
    let data = std::fs::File::open(&data_path).map_err(|e| io("opening", &data_path, e))?;
    let tmp = dir.join(TMP);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io("removing", &tmp, e))?;
    }
    std::fs::create_dir(&tmp).map_err(|e| io("creating", &tmp, e))?;
    let (store, _) = PageStore::open(Arc::new(OsDir::new(&tmp)), image_size, identity)?;
    let pages = image_size.div_ceil(PAGE);
    let mut lost = Vec::new();
    let mut buf = vec![0u8; PAGE as usize];
    use std::os::unix::fs::FileExt;
    for p in 0..pages {
        match map.state(BlockIndex(p)) {
            BlockState::Missing => {}
            BlockState::Zero => store.zero(p, 1)?,
            BlockState::Present => {
                let n = PAGE.min(image_size - p * PAGE) as usize;
                data.read_exact_at(&mut buf[..n], p * PAGE)
                    .map_err(|e| io("reading", &data_path, e))?;
                if map.page_matches(p, crc32fast::hash(&buf[..n])) {
                    store.write(p, &buf[..n], true)?;
                } else {
                    lost.push(p);
                    store.zero(p, 1)?;
                }
            }
        }
    }
    if !lost.is_empty() && !keep_going {
        drop(store);
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(Error::new(
            ErrorKind::Corrupt,
            format!(
                "{}: {} page(s) fail both their CRCs (first at byte {}); not migrating. \
                 `lazybd overlay check --repair {}` migrates keeping every page that verifies",
                meta.display(),
                lost.len(),
                lost[0] * PAGE,
                dir.display()
            ),
        ));
    }
    store.flush()?;
    drop(store);
    let sync_dir = |d: &Path| OsDir::new(d).sync().map_err(|e| io("syncing", d, e));
    std::fs::rename(tmp.join(PAGES), dir.join(PAGES)).map_err(|e| io("moving", &tmp, e))?;
    sync_dir(dir)?;
    std::fs::rename(tmp.join(JOURNAL), dir.join(JOURNAL)).map_err(|e| io("moving", &tmp, e))?;
    sync_dir(dir)?;
    let _ = std::fs::remove_dir_all(&tmp);
    drop(map);
    std::fs::remove_file(&meta).map_err(|e| io("removing", &meta, e))?;
    std::fs::remove_file(&data_path).map_err(|e| io("removing", &data_path, e))?;
    sync_dir(dir)?;
    tracing::info!(overlay = %dir.display(), lost = lost.len(), "overlay migrated to format version 2");
    Ok(lost)
}
