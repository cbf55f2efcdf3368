//! The one place where layers become a device, like nbdkit's filter stack:
//!
//! ```text
//!   read-only:  NBD client -> [export] ------------> cache -> origin
//!   writable:   NBD client -> [export] -> overlay -> cache -> origin
//! ```
//!
//! The cache is shared by every export of an image; each writable export
//! has its own overlay; each export has its own readahead (its own
//! sequential streams) over the shared cache, and the image's format
//! (raw or qcow2) above that:
//!
//! ```text
//!   read-only:  export ------------> format -> readahead -> cache -> origin
//!   writable:   export -> overlay -> format -> readahead -> cache -> origin
//! ```

use std::sync::Arc;

use std::path::Path;

use super::Export;
use crate::block::ByteRange;
use crate::cache::ImageCache;
use crate::device::{BlockDevice, Writable};
use crate::error::Result;
use crate::format::{self, Format};
use crate::overlay::Overlay;
use crate::prefetch::readahead::Readahead;

/// How to present one image.
pub(crate) struct ExportSpec {
    pub(crate) name: String,
    pub(crate) description: String,
    /// Sequential readahead into the cache.
    pub(crate) readahead: bool,
    /// The image's format as asked (`None`: not given; see `format`).
    pub(crate) format: Option<Format>,
}

/// What sits on the shared cache for one export: readahead, and the
/// image's format above it. Returns the format decided too.
async fn base(spec: &ExportSpec, cache: &ImageCache) -> Result<(Arc<dyn BlockDevice>, Format)> {
    let image: Arc<dyn BlockDevice> = if spec.readahead {
        Arc::new(Readahead::new(cache.clone()))
    } else {
        Arc::new(cache.clone())
    };
    let origin = cache.origin();
    let disk_format = origin.disk_format();
    // The first bytes, where the rule needs them (no format said): read
    // unobserved, since no guest asked for them.
    let head = if format::needs_head(spec.format, disk_format) {
        let r = ByteRange::new(0, cache.image_size().min(format::HEAD_LEN))?;
        Some(cache.read_unobserved(r).await?.data)
    } else {
        None
    };
    format::open(
        spec.format,
        image,
        &origin.identity().locator,
        disk_format,
        head,
        Some(cache),
    )
    .await
}

fn export(
    spec: ExportSpec,
    cache: &ImageCache,
    device: Arc<dyn BlockDevice>,
    overlay: Option<Arc<Overlay>>,
) -> Export {
    let writable = overlay.clone().map(|o| o as Arc<dyn Writable>);
    Export {
        name: spec.name,
        description: spec.description,
        image: cache.origin().identity().locator.clone(),
        device,
        writable,
        overlay,
        // Read-only: every connection reads the same shared cache.
        // Writable: all connections share one overlay and a FLUSH syncs
        // all of it, so multi-connection clients see one consistent disk.
        multi_conn: true,
        preferred_block: cache.block_size().get(),
        stats: cache.stats().clone(),
        clients: Default::default(),
        closing: tokio::sync::watch::channel(false).0,
    }
}

/// A read-only export of a cached image.
pub(crate) async fn read_only_export(spec: ExportSpec, cache: ImageCache) -> Result<Export> {
    let (device, _) = base(&spec, &cache).await?;
    Ok(export(spec, &cache, device, None))
}

/// A writable export: a copy-on-write overlay in `overlay_dir` over the
/// shared cache.
pub(crate) async fn writable_export(
    spec: ExportSpec,
    cache: ImageCache,
    overlay_dir: &Path,
) -> Result<Export> {
    let (base, format) = base(&spec, &cache).await?;
    // The overlay records what it was written over: the image, and the
    // format that made the disk of it (a raw overlay's id stays the
    // image's, as overlays made before formats existed recorded it).
    let mut base_id = cache.origin().identity().to_string();
    if format != Format::Raw {
        base_id.push_str(&format!(" as {format}"));
    }
    // Opening an overlay reads and maybe replays its files: blocking work.
    let overlay = Arc::new(tokio::task::block_in_place(|| {
        Overlay::open(overlay_dir, base, &base_id)
    })?);
    let device: Arc<dyn BlockDevice> = overlay.clone();
    Ok(export(spec, &cache, device, Some(overlay)))
}
