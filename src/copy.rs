//! `lazybd copy SOURCE DEST`: a whole image, in parallel, verified.
//!
//! The full-copy path for when a VM should not depend on the origin at all
//! (or to seed a local file): SOURCE is an HTTP(S) URL, a file or an NBD
//! URI; DEST a file (or block device) or an NBD URI.
//!
//! * Parallel: `jobs` chunks in flight (ranged GETs through the same
//!   strict origin code as the cache; one NBD connection per job).
//! * Holes: an NBD source's `base:allocation` holes are not read; chunks
//!   that read as all zeroes are not written to a fresh regular file (it
//!   stays sparse) and become WRITE_ZEROES on an NBD destination.
//! * Verified: each chunk's CRC32 is taken when it arrives and checked
//!   against the destination read back after writing; with `sha256` the
//!   whole image's digest must match at the end.
//! * A library call: [`start`] returns a [`CopyTask`] with live
//!   [`CopyProgress`] and [`CopyTask::wait`].

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::{Mutex, Semaphore};
use tokio::task::JoinHandle;

use crate::block::ByteRange;
use crate::error::{Error, ErrorKind, Result};
use crate::nbd::client::{NbdClient, NbdUri};
use crate::origin::{self, Origin, OriginOptions};
use crate::stats::Stats;

/// What to copy and how.
#[derive(Debug, Clone)]
pub struct CopySpec {
    pub source: String,
    pub dest: String,
    /// Chunks in flight.
    pub jobs: usize,
    /// Bytes per chunk (at most 32 MiB, the NBD spec's default maximum
    /// payload: what every server serves).
    pub chunk: u64,
    /// Expected SHA-256 of the whole image.
    pub sha256: Option<[u8; 32]>,
    /// Read each chunk back from DEST and compare its CRC32.
    pub verify: bool,
    pub origin_options: OriginOptions,
}

impl CopySpec {
    pub fn new(source: impl Into<String>, dest: impl Into<String>) -> Self {
        CopySpec {
            source: source.into(),
            dest: dest.into(),
            jobs: 8,
            chunk: 4 << 20,
            sha256: None,
            verify: true,
            origin_options: OriginOptions::default(),
        }
    }
}

/// Live counters of a running copy.
#[derive(Debug, Default)]
pub struct CopyProgress {
    /// Image size (known once the source is open).
    pub total: AtomicU64,
    /// Bytes done, in order (data and holes).
    pub done: AtomicU64,
    /// Bytes of those that were holes or zero chunks.
    pub zero: AtomicU64,
}

/// What a finished copy did.
#[derive(Debug, Clone)]
pub struct CopyReport {
    pub bytes: u64,
    pub zero_bytes: u64,
    pub sha256: [u8; 32],
    pub elapsed: Duration,
}

/// A copy running in the background.
pub struct CopyTask {
    pub progress: Arc<CopyProgress>,
    handle: JoinHandle<Result<CopyReport>>,
}

impl CopyTask {
    pub async fn wait(self) -> Result<CopyReport> {
        self.handle
            .await
            .map_err(|e| Error::with_source(ErrorKind::Io, "copy task", e))?
    }
}

/// Start copying; must be called inside a tokio runtime.
pub fn start(spec: CopySpec) -> CopyTask {
    let progress = Arc::new(CopyProgress::default());
    let p = progress.clone();
    CopyTask {
        progress,
        handle: tokio::spawn(run(spec, p)),
    }
}

/// A pool of NBD connections: up to one per job when the server allows
/// several (CAN_MULTI_CONN), else one, shared in turn.
struct Pool {
    conns: Mutex<Vec<NbdClient>>,
    free: Semaphore,
}

/// How long an extra connection may take: servers that serve one client
/// at a time (qemu-nbd's default) accept it only when the first goes.
const EXTRA_CONNECT: Duration = Duration::from_secs(3);

impl Pool {
    async fn open(uri: &NbdUri, n: usize) -> Result<Pool> {
        let first = NbdClient::connect(uri).await?;
        let want = if first.can_multi_conn() { n } else { 1 };
        let mut conns = vec![first];
        while conns.len() < want {
            match tokio::time::timeout(EXTRA_CONNECT, NbdClient::connect(uri)).await {
                Ok(Ok(c)) => conns.push(c),
                _ => break, // a connection limit: go on with what we have
            }
        }
        Ok(Pool {
            free: Semaphore::new(conns.len()),
            conns: Mutex::new(conns),
        })
    }

    /// Take a connection, waiting for one to be given back.
    async fn take(&self) -> NbdClient {
        let permit = self
            .free
            .acquire()
            .await
            .expect("pool semaphore never closes");
        permit.forget();
        self.conns
            .lock()
            .await
            .pop()
            .expect("a permit means a free connection")
    }

    async fn give(&self, c: NbdClient) {
        self.conns.lock().await.push(c);
        self.free.add_permits(1);
    }

    async fn size(&self) -> u64 {
        let c = self.take().await;
        let size = c.size();
        self.give(c).await;
        size
    }
}

enum Source {
    Origin(Arc<dyn Origin>),
    Nbd(Pool),
}

enum Dest {
    /// `fresh`: a regular file we truncated, so skipped ranges read as zero.
    File {
        f: Arc<File>,
        fresh: bool,
        path: PathBuf,
    },
    Nbd(Pool),
}

/// The pieces of one chunk, as copied, for the in-order digest.
type Pieces = Vec<(ByteRange, Piece)>;

/// A chunk, as read: its bytes or "all zero".
enum Piece {
    Data(Bytes),
    Zero,
}

impl Source {
    async fn size(&self) -> u64 {
        match self {
            Source::Origin(o) => o.identity().size,
            Source::Nbd(p) => p.size().await,
        }
    }

    /// Read `r` as a list of pieces (holes skipped where known).
    async fn read(&self, r: ByteRange) -> Result<Pieces> {
        match self {
            Source::Origin(o) => Ok(vec![(r, Piece::Data(o.read_range(r).await?))]),
            Source::Nbd(pool) => {
                let mut c = pool.take().await;
                let res = async {
                    let mut out = Vec::new();
                    let mut at = r.offset;
                    for e in c.extents(r).await? {
                        let er = ByteRange {
                            offset: at,
                            len: e.len,
                        };
                        at += e.len;
                        out.push(if e.zero {
                            (er, Piece::Zero)
                        } else {
                            (er, Piece::Data(c.read(er).await?))
                        });
                    }
                    Ok(out)
                }
                .await;
                pool.give(c).await;
                res
            }
        }
    }
}

impl Dest {
    async fn open(spec: &str, size: u64, jobs: usize) -> Result<Dest> {
        if NbdUri::is_nbd(spec) {
            let pool = Pool::open(&NbdUri::parse(spec)?, jobs).await?;
            {
                let c = pool.take().await;
                let refused = if c.read_only() {
                    Some(Error::new(
                        ErrorKind::ReadOnly,
                        format!("{spec}: the export is read-only"),
                    ))
                } else if c.size() < size {
                    Some(Error::new(
                        ErrorKind::InvalidInput,
                        format!("{spec}: export has {} bytes, the image {size}", c.size()),
                    ))
                } else {
                    None
                };
                pool.give(c).await;
                if let Some(e) = refused {
                    return Err(e);
                }
            }
            return Ok(Dest::Nbd(pool));
        }
        let path = PathBuf::from(spec.strip_prefix("file://").unwrap_or(spec));
        let ctx = || format!("opening destination {}", path.display());
        let regular = match std::fs::metadata(&path) {
            Ok(m) => m.is_file(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
            Err(e) => return Err(Error::io(ctx(), e)),
        };
        let f = std::fs::OpenOptions::new()
            .write(true)
            .read(true)
            .create(regular)
            .truncate(regular)
            .open(&path)
            .map_err(|e| Error::io(ctx(), e))?;
        if regular {
            f.set_len(size).map_err(|e| Error::io(ctx(), e))?;
        }
        Ok(Dest::File {
            f: Arc::new(f),
            fresh: regular,
            path,
        })
    }

    async fn write(&self, r: ByteRange, p: &Piece) -> Result<()> {
        match (self, p) {
            (Dest::File { fresh: true, .. }, Piece::Zero) => Ok(()),
            (Dest::File { f, path, .. }, p) => {
                let (f, path) = (f.clone(), path.clone());
                let data = match p {
                    Piece::Data(d) => d.clone(),
                    Piece::Zero => Bytes::from(vec![0u8; r.len as usize]),
                };
                blocking(move || {
                    f.write_all_at(&data, r.offset)
                        .map_err(|e| Error::io(format!("writing {} at {r}", path.display()), e))
                })
                .await
            }
            (Dest::Nbd(pool), p) => {
                let mut c = pool.take().await;
                let res = match p {
                    Piece::Data(d) => c.write(r.offset, d).await,
                    Piece::Zero => c.write_zeroes(r).await,
                };
                pool.give(c).await;
                res
            }
        }
    }

    async fn read_back(&self, r: ByteRange) -> Result<Bytes> {
        match self {
            Dest::File { f, path, .. } => {
                let (f, path) = (f.clone(), path.clone());
                blocking(move || {
                    let mut b = vec![0u8; r.len as usize];
                    f.read_exact_at(&mut b, r.offset)
                        .map(|_| Bytes::from(b))
                        .map_err(|e| {
                            Error::io(format!("reading back {} at {r}", path.display()), e)
                        })
                })
                .await
            }
            Dest::Nbd(pool) => {
                let mut c = pool.take().await;
                let res = c.read(r).await;
                pool.give(c).await;
                res
            }
        }
    }

    async fn finish(self) -> Result<()> {
        match self {
            Dest::File { f, path, .. } => {
                blocking(move || {
                    f.sync_all()
                        .map_err(|e| Error::io(format!("syncing {}", path.display()), e))
                })
                .await
            }
            Dest::Nbd(pool) => {
                let conns = std::mem::take(&mut *pool.conns.lock().await);
                let mut first = true;
                for mut c in conns {
                    if first {
                        c.flush().await?;
                        first = false;
                    }
                    c.disconnect().await;
                }
                Ok(())
            }
        }
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::with_source(ErrorKind::Io, "copy I/O task", e))?
}

/// Copy one chunk; returns its pieces for the in-order digest.
async fn chunk(src: Arc<Source>, dst: Arc<Dest>, r: ByteRange, verify: bool) -> Result<Pieces> {
    let mut pieces = src.read(r).await?;
    for (pr, p) in pieces.iter_mut() {
        if let Piece::Data(d) = p {
            if d.len() as u64 != pr.len {
                return Err(Error::new(
                    ErrorKind::Origin,
                    format!("source returned {} bytes for {pr}", d.len()),
                ));
            }
            if crate::block::is_zero(d) {
                *p = Piece::Zero;
            }
        }
        let crc = match p {
            Piece::Data(d) => crc32fast::hash(d),
            Piece::Zero => crc32fast::hash(&vec![0u8; pr.len as usize]),
        };
        dst.write(*pr, p).await?;
        if verify {
            let back = dst.read_back(*pr).await?;
            if crc32fast::hash(&back) != crc {
                return Err(Error::new(
                    ErrorKind::Corrupt,
                    format!(
                        "destination {pr} does not read back what was written (CRC32 mismatch)"
                    ),
                ));
            }
        }
    }
    Ok(pieces)
}

async fn run(spec: CopySpec, progress: Arc<CopyProgress>) -> Result<CopyReport> {
    let started = Instant::now();
    // Any NBD server serves the spec's default maximum (lazybd serves more).
    if spec.chunk == 0 || spec.chunk > crate::nbd::wire::DEFAULT_MAX_PAYLOAD as u64 {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "chunk size must be 1 byte .. 32 MiB",
        ));
    }
    let jobs = spec.jobs.max(1);
    let src = if NbdUri::is_nbd(&spec.source) {
        Source::Nbd(Pool::open(&NbdUri::parse(&spec.source)?, jobs).await?)
    } else {
        let mut opts = spec.origin_options.clone();
        opts.connections = opts.connections.max(jobs);
        Source::Origin(origin::open(&spec.source, &opts, Arc::new(Stats::default())).await?)
    };
    let size = src.size().await;
    // What the origin publishes as the whole image's digest (Glance's
    // os_hash_value): checked over every byte copied.
    let published = match &src {
        Source::Origin(o) => o.content_digest().cloned(),
        Source::Nbd(_) => None,
    };
    let mut published_hasher = published.as_ref().map(|d| d.hasher()).transpose()?;
    progress.total.store(size, Ordering::Relaxed);
    let dst = Arc::new(Dest::open(&spec.dest, size, jobs).await?);
    let src = Arc::new(src);
    let mut inflight: VecDeque<JoinHandle<Result<Pieces>>> = VecDeque::new();
    let mut hasher = Sha256::new();
    let zeros = vec![0u8; spec.chunk as usize];
    let mut next = 0u64;
    let mut zero_bytes = 0u64;
    loop {
        // Keep `jobs` chunks going; the digest consumes them in order.
        while next < size && inflight.len() < jobs {
            let r = ByteRange {
                offset: next,
                len: spec.chunk.min(size - next),
            };
            next = r.end();
            let (s, d) = (src.clone(), dst.clone());
            inflight.push_back(tokio::spawn(chunk(s, d, r, spec.verify)));
        }
        let Some(h) = inflight.pop_front() else { break };
        let pieces = h
            .await
            .map_err(|e| Error::with_source(ErrorKind::Io, "copy chunk task", e))??;
        for (r, p) in pieces {
            match p {
                Piece::Data(d) => {
                    hasher.update(&d);
                    if let Some(h) = published_hasher.as_mut() {
                        h.update(&d);
                    }
                }
                Piece::Zero => {
                    let mut left = r.len as usize;
                    while left > 0 {
                        let n = left.min(zeros.len());
                        hasher.update(&zeros[..n]);
                        if let Some(h) = published_hasher.as_mut() {
                            h.update(&zeros[..n]);
                        }
                        left -= n;
                    }
                    zero_bytes += r.len;
                    progress.zero.fetch_add(r.len, Ordering::Relaxed);
                }
            }
            progress.done.fetch_add(r.len, Ordering::Relaxed);
        }
    }
    let dst = Arc::into_inner(dst).expect("all chunk tasks are done");
    dst.finish().await?;
    if let Source::Nbd(pool) = &*src {
        // Say goodbye properly: servers log a client that just hangs up.
        for c in std::mem::take(&mut *pool.conns.lock().await) {
            c.disconnect().await;
        }
    }
    let digest: [u8; 32] = hasher.finalize().into();
    if let (Some(want), Some(h)) = (&published, published_hasher) {
        want.check(&h.finish_hex(), &spec.source)
            .map_err(|e| e.context_prefix(format!("{} must not be used", spec.dest)))?;
        tracing::info!(source = %spec.source, algo = %want.algo, "the copy matches the digest its origin publishes");
    }
    if let Some(want) = spec.sha256 {
        if want != digest {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "SHA-256 mismatch: expected {}, the image read as {}; {} must not be used",
                    hex(&want),
                    hex(&digest),
                    spec.dest
                ),
            ));
        }
    }
    Ok(CopyReport {
        bytes: size,
        zero_bytes,
        sha256: digest,
        elapsed: started.elapsed(),
    })
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Parse a 64-digit hex SHA-256.
pub fn parse_sha256(s: &str) -> Result<[u8; 32]> {
    let s = s.trim();
    let bad = || {
        Error::new(
            ErrorKind::InvalidInput,
            format!("{s:?}: expected 64 hex digits (SHA-256)"),
        )
    };
    if s.len() != 64 {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}
