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
//! - `raw`: the guest's disk is the file, byte for byte.
//! - `qcow2`: the disk a qcow2 template holds, decoded lazily.
//!
//! Layered images (a chain of caches, one per backing file) come next,
//! each a [`crate::device::BlockDevice`] over the cache(s) below it.
//!
//! # Which format: never guessed silently
//!
//! Probing the format of an untrusted image is how qemu's raw-probing
//! hazard happens: a raw disk whose guest wrote a qcow2 header at sector 0
//! turns into a different disk. lazybd's rule:
//!
//! - `--format raw` or `qcow2` (or an export's `format`): that format, and
//!   `qcow2` refuses a file that is not one.
//! - An image service's metadata (Glance's `disk_format`) is an explicit
//!   format too (`raw`, `iso`, `ami`/`aki`/`ari` are raw; `qcow2`; other
//!   formats are refused, naming them); a `--format` given wins, with a
//!   warning when the two differ.
//! - `--format auto`: qcow2 if the file starts with qcow2's magic, else
//!   raw; for operators who trust their templates' bytes.
//! - Nothing given: raw, except that a file starting with qcow2's magic is
//!   refused with an error saying to choose, because serving a qcow2
//!   container as a raw disk is never what the operator meant, and
//!   decoding it unasked is the hazard above.

pub mod qcow2;

mod raw;

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::cache::ImageCache;
use crate::device::BlockDevice;
use crate::error::{Error, ErrorKind, Result};

/// The format asked for an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// The bytes are the disk.
    Raw,
    /// A qcow2 image holds the disk.
    Qcow2,
    /// qcow2 if the bytes are a qcow2 image, else raw.
    Auto,
}

impl std::str::FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            "auto" => Ok(Format::Auto),
            _ => Err(Error::new(
                ErrorKind::InvalidInput,
                format!("image format {s:?}: use raw, qcow2 or auto"),
            )),
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Auto => "auto",
        })
    }
}

/// What an image service's `disk_format` means here: `Ok(None)` for
/// formats lazybd cannot decode.
fn from_disk_format(d: &str) -> Option<Format> {
    match d {
        // The bytes are the disk (kernels and ramdisks, ISO images too).
        "raw" | "iso" | "ami" | "aki" | "ari" => Some(Format::Raw),
        "qcow2" => Some(Format::Qcow2),
        _ => None,
    }
}

/// Bytes of the image's start the rule looks at (qcow2's magic).
pub(crate) const HEAD_LEN: u64 = 4;

/// Whether deciding needs the image's first [`HEAD_LEN`] bytes.
pub(crate) fn needs_head(f: Option<Format>, disk_format: Option<&str>) -> bool {
    matches!((f, disk_format), (Some(Format::Auto), _) | (None, None))
}

/// The guest's view of the image `image` (whose device serves the image
/// file's bytes) named `name`, in format `f` (`None`: not given, see the
/// module's rule), the origin's metadata naming `disk_format`, `head` the
/// image's first bytes when [`needs_head`], `shared` the image's cache
/// when state decoded once may be shared by its exports. Returns the device
/// and the format decided.
pub(crate) async fn open(
    f: Option<Format>,
    image: Arc<dyn BlockDevice>,
    name: &str,
    disk_format: Option<&str>,
    head: Option<bytes::Bytes>,
    shared: Option<&ImageCache>,
) -> Result<(Arc<dyn BlockDevice>, Format)> {
    if let (Some(given @ (Format::Raw | Format::Qcow2)), Some(d)) = (f, disk_format) {
        if from_disk_format(d) != Some(given) {
            tracing::warn!(image = %name, format = %given, disk_format = d,
                "--format differs from the image's disk_format: using --format");
        }
    }
    let decided = match (f, disk_format) {
        (Some(Format::Raw), _) => Format::Raw,
        (Some(Format::Qcow2), _) => Format::Qcow2,
        (None, Some(d)) => from_disk_format(d).ok_or_else(|| {
            Error::new(
                ErrorKind::Unsupported,
                format!(
                    "{name}: disk_format {d:?}: lazybd decodes raw and qcow2 images (convert \
                     it with `qemu-img convert -O qcow2`, or give --format raw to serve its \
                     bytes as they are)"
                ),
            )
        })?,
        (Some(Format::Auto), _) | (None, None) => {
            let is_qcow2 = head.as_deref().is_some_and(qcow2::layout::looks_like_qcow2);
            match (is_qcow2, f) {
                (false, _) => Format::Raw,
                (true, Some(_)) => Format::Qcow2,
                (true, None) => {
                    return Err(Error::new(
                        ErrorKind::InvalidInput,
                        format!(
                            "{name} is a qcow2 image: serve the disk it holds with \
                             --format qcow2 (format = \"qcow2\" in an [[export]]), or its \
                             bytes as they are with --format raw"
                        ),
                    ))
                }
            }
        }
    };
    let dev = match decided {
        Format::Qcow2 => match shared {
            // One decoding per image, shared by its exports.
            Some(cache) => {
                let d = cache
                    .shared_layer(|| qcow2::Decoded::open(&image, name))
                    .await?;
                qcow2::over(image, d)
            }
            None => qcow2::open(image, name).await?,
        },
        _ => raw::open(image),
    };
    Ok((dev, decided))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::ByteRange;
    use crate::device::testing::MemDevice as Mem;
    use bytes::Bytes;

    /// What the stack gives `open`: the device's first bytes.
    fn head(d: &Arc<dyn BlockDevice>) -> Option<Bytes> {
        let r = ByteRange::new(0, d.size().min(HEAD_LEN)).unwrap();
        d.read_now(r).map(|d| d.unwrap().data)
    }

    fn run<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn the_format_is_never_guessed_silently() {
        let qcow2_magic: Arc<dyn BlockDevice> = Arc::new(Mem(Bytes::from_static(b"QFI\xfb....")));
        let raw: Arc<dyn BlockDevice> = Arc::new(Mem(Bytes::from_static(b"\xeb\x63\x90 boot")));
        run(async {
            // Nothing given: raw bytes are raw; qcow2 bytes are refused.
            let (_, f) = open(None, raw.clone(), "a.img", None, head(&raw), None)
                .await
                .unwrap();
            assert_eq!(f, Format::Raw);
            let e = match open(
                None,
                qcow2_magic.clone(),
                "b.img",
                None,
                head(&qcow2_magic),
                None,
            )
            .await
            {
                Err(e) => e,
                Ok(_) => panic!("a qcow2 image was served without a format"),
            };
            assert_eq!(e.kind(), ErrorKind::InvalidInput);
            let m = e.to_string();
            assert!(
                m.contains("b.img") && m.contains("--format qcow2") && m.contains("--format raw"),
                "{m}"
            );
            // Asked: raw serves the container's bytes as they are.
            let (dev, f) = open(
                Some(Format::Raw),
                qcow2_magic.clone(),
                "b.img",
                None,
                head(&qcow2_magic),
                None,
            )
            .await
            .unwrap();
            assert_eq!((f, dev.size()), (Format::Raw, 8));
            assert_eq!(
                open(Some(Format::Auto), raw.clone(), "a", None, head(&raw), None)
                    .await
                    .unwrap()
                    .1,
                Format::Raw
            );
            // auto decodes what looks like qcow2 (here a truncated header).
            let e = match open(
                Some(Format::Auto),
                qcow2_magic.clone(),
                "b.img",
                None,
                head(&qcow2_magic),
                None,
            )
            .await
            {
                Err(e) => e,
                Ok(_) => panic!("a truncated qcow2 header decoded"),
            };
            assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
            let e = match open(
                Some(Format::Qcow2),
                raw.clone(),
                "a.img",
                None,
                head(&raw),
                None,
            )
            .await
            {
                Err(e) => e,
                Ok(_) => panic!("a raw image decoded as qcow2"),
            };
            assert!(e.to_string().contains("not a qcow2 image"), "{e}");
            // An image service's disk_format decides when no format is given.
            let (_, f) = open(None, raw.clone(), "g", Some("iso"), head(&raw), None)
                .await
                .unwrap();
            assert_eq!(f, Format::Raw);
            // Declared raw: served raw, whatever its first bytes (no probing).
            let (_, f) = open(
                None,
                qcow2_magic.clone(),
                "g",
                Some("raw"),
                head(&qcow2_magic),
                None,
            )
            .await
            .unwrap();
            assert_eq!(f, Format::Raw);
            let e = match open(None, raw.clone(), "g", Some("vmdk"), head(&raw), None).await {
                Err(e) => e,
                Ok(_) => panic!("a vmdk image served"),
            };
            assert_eq!(e.kind(), ErrorKind::Unsupported);
            assert!(e.to_string().contains("disk_format \"vmdk\""), "{e}");
            let (_, f) = open(
                Some(Format::Raw),
                raw.clone(),
                "g",
                Some("vmdk"),
                head(&raw),
                None,
            )
            .await
            .unwrap();
            assert_eq!(f, Format::Raw);
        });
    }

    #[test]
    fn formats_parse_and_print() {
        for f in [Format::Raw, Format::Qcow2, Format::Auto] {
            assert_eq!(f.to_string().parse::<Format>().unwrap(), f);
        }
        assert!("vmdk"
            .parse::<Format>()
            .unwrap_err()
            .to_string()
            .contains("raw, qcow2 or auto"));
    }
}
