//! The one place where layers become a device, like nbdkit's filter stack:
//!
//! ```text
//!   read-only:  NBD client -> [export] ------------> cache -> origin
//!   writable:   NBD client -> [export] -> overlay -> cache -> origin
//! ```
//!
//! The cache is shared by every export of an image; each writable export
//! has its own overlay. Later layers (readahead) slot in here and nowhere
//! else.

use std::sync::Arc;

use std::path::Path;

use super::{BlockDevice, Export, Writable};
use crate::cache::ImageCache;
use crate::error::Result;
use crate::overlay::Overlay;

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
        writable: None,
        // Every connection reads the same shared cache; nothing is written.
        multi_conn: true,
        preferred_block: preferred,
    }
}

/// A writable export: a copy-on-write overlay in `overlay_dir` over the
/// shared cache. Returns the export and its overlay (for listing).
pub fn writable_export(
    spec: ExportSpec,
    cache: ImageCache,
    overlay_dir: &Path,
) -> Result<(Export, Arc<Overlay>)> {
    let bs = cache.block_size();
    let base_id = cache.origin().identity().to_string();
    let base: Arc<dyn BlockDevice> = Arc::new(cache);
    let overlay = Arc::new(Overlay::open(overlay_dir, base, &base_id, bs)?);
    let device: Arc<dyn BlockDevice> = overlay.clone();
    let writable: Arc<dyn Writable> = overlay.clone();
    Ok((
        Export {
            name: spec.name,
            description: spec.description,
            device,
            writable: Some(writable),
            // All connections share this one overlay and a FLUSH syncs all
            // of it, so multi-connection clients see one consistent disk.
            multi_conn: true,
            preferred_block: bs.get(),
        },
        overlay,
    ))
}
