//! The block map header (`store::map`, used by the cache and overlays) and
//! `BlockMap::open_existing` on damaged files.
//!
//! `Geometry::decode` runs on the raw input. Then the input (minus its first
//! byte, which picks the mode) is written as the whole content of a map file
//! and `BlockMap::open_existing` opens it. A header that decodes almost never
//! comes with a file of the exact length it implies, so with mode bit 0x01
//! the file is extended (sparse, zero-filled) to the length the header asks
//! for, when that is at most 64 MiB: that reaches the mmap and the accessors.
//!
//! Properties: no panic; `open_existing` succeeds only on a file whose header
//! decodes; an opened map reports the decoded geometry, and every block state
//! and page CRC inside the geometry can be read.

#![no_main]

use std::io::Write;
use std::path::PathBuf;
use std::sync::OnceLock;

use lazybd::block::BlockIndex;
use lazybd::store::map::{BlockMap, Geometry};
use libfuzzer_sys::fuzz_target;

/// Largest file the padding mode creates (sparse, so it is cheap).
const MAX_PADDED: u64 = 64 << 20;
const HEADER: u64 = 4096;
const PAGE: u64 = 4096;

/// One scratch file per fuzzing process (on tmpfs when there is one, so a
/// run costs no disk I/O), rewritten by every run and removed after it.
fn scratch() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let shm = std::path::Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        dir.join(format!("lazybd-fuzz-map-{}", std::process::id()))
    })
}

/// The file length a map of geometry `g` must have (mirrors the layout in
/// src/store/map.rs, which keeps it private).
fn file_len(g: &Geometry) -> Option<u64> {
    let blocks = g.block_size.count(g.image_size);
    let pages = g.image_size.div_ceil(PAGE);
    let crc_offset = HEADER
        .checked_add(blocks)?
        .div_ceil(4096)
        .checked_mul(4096)?;
    crc_offset.checked_add(pages.checked_mul(4)?.checked_mul(g.crc_slots as u64)?)
}

fuzz_target!(|data: &[u8]| {
    let decoded = Geometry::decode(data);
    if let Some(g) = decoded {
        assert!(g.block_size.bytes().is_power_of_two());
        assert!(matches!(g.crc_slots, 1 | 2));
        // The header lives in the first 4 KiB page, and once a prefix
        // decodes, bytes after it cannot change the result.
        let n = (8..=data.len())
            .find(|&n| Geometry::decode(&data[..n]).is_some())
            .expect("a prefix decodes");
        assert!(n <= 4096, "header needs {n} bytes");
        assert_eq!(Geometry::decode(&data[..n]), Some(g));
        assert_eq!(Geometry::decode(&data[..data.len().min(4096)]), Some(g));
    }

    let Some((&mode, content)) = data.split_first() else {
        return;
    };
    // open_existing reads versions 1 and 2 (version 1 for migration).
    let header = Geometry::decode_versioned(content).ok().map(|(g, _)| g);
    let path = scratch();
    {
        let mut f = std::fs::File::create(path).expect("create map file");
        f.write_all(content).expect("write map file");
        if mode & 0x01 != 0 {
            if let Some(len) = header.as_ref().and_then(file_len) {
                if len <= MAX_PADDED && len > content.len() as u64 {
                    f.set_len(len).expect("extend map file");
                }
            }
        }
    }

    match BlockMap::open_existing(path) {
        Ok(m) => {
            let g = m.geometry();
            assert_eq!(Some(g), header, "opened a map whose header does not decode");
            let blocks = g.block_size.count(g.image_size);
            assert_eq!(m.blocks(), blocks);
            let pages = g.image_size.div_ceil(PAGE);
            let (present, zero) = m.counts();
            assert!(present + zero <= blocks);
            for b in [0, blocks / 2, blocks.wrapping_sub(1)] {
                if b < blocks {
                    let _ = m.state(BlockIndex(b));
                    let _ = m.raw_state(BlockIndex(b));
                }
            }
            for p in [0, pages / 2, pages.wrapping_sub(1)] {
                if p < pages {
                    // A page whose CRC has no disk blocks yet (a hole)
                    // reads 0 and matches nothing.
                    let crc = m.page_crc(p);
                    assert!(m.page_matches(p, crc) || crc == 0);
                }
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
    let _ = std::fs::remove_file(path);
});
