//! The one error type of lazybd: a kind (what went wrong, in terms a caller
//! can act on), a context (where: path, offset, operation) and an optional
//! source. [`Error::nbd_errno`] is the single place kinds become NBD errors.

use std::fmt;
use std::sync::Arc;

/// The error values an NBD reply carries (`doc/proto.md`, "Error values"):
/// the protocol fixes them to these Linux values. They live here, not in
/// `nbd`, so that this module (which every other one uses) imports nothing;
/// `nbd::wire` re-exports them.
pub mod errno {
    pub const EPERM: u32 = 1;
    pub const EIO: u32 = 5;
    pub const ENOMEM: u32 = 12;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    pub const EOVERFLOW: u32 = 75;
    pub const ENOTSUP: u32 = 95;
    pub const ESHUTDOWN: u32 = 108;
}

/// What went wrong, coarse enough to decide behaviour (retry, errno, exit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A request or argument is malformed or not allowed in this state.
    InvalidInput,
    /// Offset/length outside the export, or arithmetic overflow.
    OutOfRange,
    /// A write-like operation on a read-only export.
    ReadOnly,
    /// The local disk is full (cache or overlay).
    NoSpace,
    /// Local I/O failed.
    Io,
    /// The origin failed or answered something unusable (status, length,
    /// Content-Range). Possibly transient.
    Origin,
    /// The origin refused a request in a way retrying cannot fix (4xx).
    OriginRefused,
    /// The origin's identity (size, ETag, Last-Modified) differs from the one
    /// the cache was built from: nothing from it may be mixed with old blocks.
    OriginChanged,
    /// Local data failed its checksum or metadata is damaged.
    Corrupt,
    /// The peer broke the NBD protocol; the connection is dropped.
    Protocol,
    /// A request too large to serve (payload limit).
    TooLarge,
    /// Not supported here or not in the way asked (e.g. a FAST_ZERO that
    /// would be slow): ENOTSUP, the client falls back.
    Unsupported,
    /// The server is shutting down.
    Shutdown,
    /// Something named does not exist (export, image).
    NotFound,
    /// A deadline passed.
    TimedOut,
}

type Source = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// kind + context + source. Cheap to clone (the source is shared), because a
/// single origin failure is reported to every reader waiting on that fetch.
#[derive(Clone)]
pub struct Error {
    kind: ErrorKind,
    context: String,
    source: Option<Source>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, context: impl Into<String>) -> Self {
        Error {
            kind,
            context: context.into(),
            source: None,
        }
    }

    pub fn with_source(
        kind: ErrorKind,
        context: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error {
            kind,
            context: context.into(),
            source: Some(Arc::new(source)),
        }
    }

    /// Local I/O error with context; ENOSPC/EDQUOT/EFBIG become `NoSpace`.
    pub fn io(context: impl Into<String>, e: std::io::Error) -> Self {
        let kind = match e.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => ErrorKind::NoSpace,
            _ => ErrorKind::Io,
        };
        Error::with_source(kind, context, e)
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn context(&self) -> &str {
        &self.context
    }

    /// Prefix more context (outer operation first).
    pub fn context_prefix(mut self, outer: impl fmt::Display) -> Self {
        self.context = format!("{outer}: {}", self.context);
        self
    }

    /// The NBD error value for this error. The one mapping in lazybd.
    pub fn nbd_errno(&self) -> u32 {
        match self.kind {
            ErrorKind::InvalidInput | ErrorKind::OutOfRange => errno::EINVAL,
            ErrorKind::Unsupported => errno::ENOTSUP,
            ErrorKind::ReadOnly => errno::EPERM,
            ErrorKind::NoSpace => errno::ENOSPC,
            ErrorKind::TooLarge => errno::EOVERFLOW,
            ErrorKind::Shutdown => errno::ESHUTDOWN,
            ErrorKind::Io
            | ErrorKind::Origin
            | ErrorKind::OriginRefused
            | ErrorKind::OriginChanged
            | ErrorKind::Corrupt
            | ErrorKind::Protocol
            | ErrorKind::NotFound
            | ErrorKind::TimedOut => errno::EIO,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.context)?;
        if let Some(s) = &self.source {
            write!(f, ": {s}")?;
            let mut next = s.source();
            while let Some(inner) = next {
                write!(f, ": {inner}")?;
                next = inner.source();
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}
