//! Image formats: how guest offsets become bytes of the image's file. The
//! layer sits between the overlay and the image's readahead and cache
//! (`export::stack` composes it), so caches, readahead, verification and
//! origins all deal in the origin's own bytes, whatever the guest sees
//! (readahead follows the image's sequential runs, which a container's
//! sequential guest reads mostly are):
//!
//! ```text
//!   export -> [overlay] -> format -> readahead -> cache -> origin
//! ```
//!
//! - `raw`: the guest's disk is the file, byte for byte (today's only
//!   format). Container formats (qcow2) and layered images (a chain of
//!   caches, one per backing file) come next, each one file here, each a
//!   [`crate::device::BlockDevice`] over the cache(s) below it.

mod raw;

use std::sync::Arc;

use crate::device::BlockDevice;

/// The format of an image's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Format {
    /// The bytes are the disk.
    #[default]
    Raw,
}

/// The guest's view of an image in format `f` whose bytes `image` serves.
pub(crate) fn open(f: Format, image: Arc<dyn BlockDevice>) -> Arc<dyn BlockDevice> {
    match f {
        Format::Raw => raw::open(image),
    }
}
