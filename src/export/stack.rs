//! The one place where layers become a device, like nbdkit's filter stack:
//!
//! ```text
//!   NBD client -> [export] -> cache (verified, persistent) -> origin
//! ```
//!
//! Later layers (copy-on-write overlay, readahead) slot in here and nowhere
//! else.

use std::sync::Arc;

use super::{BlockDevice, Export};
use crate::cache::ImageCache;

/// How to present one image.
pub struct ExportSpec {
    pub name: String,
    pub description: String,
}

/// A read-only export of a cached image.
pub fn read_only_export(spec: ExportSpec, cache: ImageCache) -> Export {
    let preferred = cache.block_size().get();
    let device: Arc<dyn BlockDevice> = Arc::new(cache);
    Export {
        name: spec.name,
        description: spec.description,
        device,
        read_only: true,
        // Every connection reads the same shared cache; nothing is written.
        multi_conn: true,
        preferred_block: preferred,
    }
}
