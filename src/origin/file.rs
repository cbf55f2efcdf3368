//! A local file as origin: the embedded default and the test fixture. It goes
//! through exactly the same cache path as a remote origin.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::{BoxFuture, Origin, OriginIdentity};
use crate::block::ByteRange;
use crate::error::{Error, ErrorKind, Result};
use crate::stats::Stats;

pub struct FileOrigin {
    /// Shared with blocking read tasks.
    file: Arc<File>,
    identity: OriginIdentity,
    stats: Arc<Stats>,
}

impl FileOrigin {
    pub fn open(path: &Path, stats: Arc<Stats>) -> Result<Self> {
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
