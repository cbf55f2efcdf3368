//! A local file as origin: the embedded default and the test fixture. It goes
//! through exactly the same cache path as a remote origin.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::{Origin, OriginIdentity};
use crate::block::ByteRange;
use crate::device::BoxFuture;
use crate::error::{Error, ErrorKind, Result};
use crate::stats::Stats;

pub(crate) struct FileOrigin {
    /// Shared with blocking read tasks.
    file: Arc<File>,
    path: std::path::PathBuf,
    identity: OriginIdentity,
    stats: Arc<Stats>,
}

impl FileOrigin {
    pub(crate) fn open(path: &Path, stats: Arc<Stats>) -> Result<Self> {
        let ctx = || format!("opening origin file {}", path.display());
        let file = File::open(path).map_err(|e| Error::io(ctx(), e))?;
        let meta = file.metadata().map_err(|e| Error::io(ctx(), e))?;
        if !meta.is_file() {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("{}: not a regular file", path.display()),
            ));
        }
        let canonical = path.canonicalize().map_err(|e| Error::io(ctx(), e))?;
        // mtime (ns) + inode: a rewritten or replaced file changes one of them.
        let validator = format!(
            "mtime:{}.{:09}-ino:{}",
            meta.mtime(),
            meta.mtime_nsec(),
            meta.ino()
        );
        Ok(FileOrigin {
            file: Arc::new(file),
            path: canonical.clone(),
            identity: OriginIdentity {
                locator: format!("file://{}", canonical.display()),
                size: meta.len(),
                validator: Some(validator),
            },
            stats,
        })
    }
}

impl Origin for FileOrigin {
    fn identity(&self) -> &OriginIdentity {
        &self.identity
    }

    fn sidecar(&self, suffix: &str, max: u64) -> BoxFuture<'_, Result<Option<Bytes>>> {
        let mut name = self.path.clone().into_os_string();
        name.push(suffix);
        let path = std::path::PathBuf::from(name);
        Box::pin(async move {
            match std::fs::metadata(&path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
                Ok(m) if m.len() > max => {
                    return Err(Error::new(
                        ErrorKind::InvalidInput,
                        format!("{}: larger than {max} bytes", path.display()),
                    ))
                }
                Ok(_) => {}
            }
            std::fs::read(&path)
                .map(|v| Some(Bytes::from(v)))
                .map_err(|e| Error::io(format!("reading {}", path.display()), e))
        })
    }

    fn read_range(&self, range: ByteRange) -> BoxFuture<'_, Result<Bytes>> {
        debug_assert!(!range.is_empty() && range.within(self.identity.size));
        let file = self.file.clone();
        Box::pin(async move {
            Stats::add(&self.stats.origin_requests, 1);
            let started = std::time::Instant::now();
            let buf = tokio::task::spawn_blocking(move || {
                let mut buf = BytesMut::zeroed(range.len as usize);
                file.read_exact_at(&mut buf, range.offset).map(|_| buf)
            })
            .await
            .map_err(|e| Error::with_source(ErrorKind::Io, "origin read task", e))?
            .map_err(|e| {
                let kind = if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    // The file shrank under us: it is not the image we opened.
                    ErrorKind::OriginChanged
                } else {
                    ErrorKind::Origin
                };
                Error::with_source(
                    kind,
                    format!("reading {} at {range}", self.identity.locator),
                    e,
                )
            })?;
            Stats::add(&self.stats.origin_bytes, range.len);
            self.stats.origin_latency.record(started.elapsed());
            Ok(buf.freeze())
        })
    }
}
