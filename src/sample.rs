//! The built-in sample image: what `lazybd serve` exports when no origin is
//! named, so the server can be tried with nothing remote at hand. It is
//! deterministic (same bytes everywhere) and has zero regions, so holes and
//! `base:allocation` show up in `nbdinfo --map`.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub(crate) const SAMPLE_SIZE: u64 = 64 << 20;

/// Create `dir/sample.img` if it does not exist yet; return its path.
pub fn ensure(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("sample.img");
    if path
        .metadata()
        .map(|m| m.len() == SAMPLE_SIZE)
        .unwrap_or(false)
    {
        return Ok(path);
    }
    fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let tmp = dir.join("sample.img.tmp");
    let mut f =
        fs::File::create(&tmp).map_err(|e| Error::io(format!("creating {}", tmp.display()), e))?;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut buf = vec![0u8; 1 << 20];
    for mib in 0..SAMPLE_SIZE >> 20 {
        // MiB 8..16 and 40..48 are zero: they read back as holes.
        if (8..16).contains(&mib) || (40..48).contains(&mib) {
            buf.fill(0);
        } else {
            for c in buf.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                c.copy_from_slice(&x.to_le_bytes());
            }
            if mib == 0 {
                let banner = b"lazybd sample image: served lazily, verified, cached\n";
                buf[..banner.len()].copy_from_slice(banner);
            }
        }
        f.write_all(&buf)
            .map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
    }
    f.sync_all()
        .map_err(|e| Error::io(format!("syncing {}", tmp.display()), e))?;
    fs::rename(&tmp, &path).map_err(|e| Error::io(format!("renaming {}", tmp.display()), e))?;
    Ok(path)
}
