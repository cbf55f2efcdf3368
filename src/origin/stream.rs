//! Origins that can only be read from their start: a Glance image whose
//! store cannot read at an offset and which exposes no location lazybd can
//! read directly. One sequential pass of the whole object is spooled to an
//! unlinked file in the cache directory, and each read is served as soon as
//! the pass has gone past it.
//!
//! ```text
//!   GET (no Range) -> 200, exactly `size` bytes, hashed as they come
//!        |
//!        v  spool (unlinked file)  --read_range--> bytes, then punched out
//! ```
//!
//! - A read waits while the pass makes progress: the pass is the only way
//!   to the bytes, so the read deadline of ranged origins does not apply;
//!   the stall timeout does. A pass that stalls or breaks is started again
//!   from the beginning (there is nothing else to ask for), up to
//!   `retries` times with backoff; then the waiting reads fail, and the
//!   next read starts a fresh pass.
//! - The spool keeps only what no read has taken: a range once served is
//!   punched out (the cache holds it now). A range wanted again (after an
//!   eviction) starts a new pass. The daemon hydrates such images at once
//!   ([`Origin::sequential_only`]), so the cache fills in the pass's order
//!   and the spool stays nearly empty.
//! - Every pass is checked like any response (status 200, Content-Length,
//!   the body exactly `size` bytes) and hashed: a complete pass whose digest
//!   is not the published one poisons the origin, and every later read is
//!   an origin-changed error.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::sync::Notify;

use super::{ContentDigest, Origin, OriginIdentity};
use crate::block::ByteRange;
use crate::device::BoxFuture;
use crate::error::{Error, ErrorKind, Result};
use crate::stats::Stats;

/// Starts one GET of the whole object.
pub(super) type StartPass =
    Box<dyn Fn() -> BoxFuture<'static, Result<reqwest::Response>> + Send + Sync>;

/// The spool's unit of punching and of "taken" bookkeeping.
const PAGE: u64 = 4096;
/// Bytes gathered from the body before one spool write.
const WRITE_CHUNK: usize = 1 << 20;

/// How a [`StreamOrigin`] reads.
pub(super) struct StreamOptions {
    /// Directory of the spool file (it is unlinked at once).
    pub(super) spool_dir: std::path::PathBuf,
    /// No progress for this long fails a pass.
    pub(super) stall: Duration,
    /// Passes started again after one fails, before reads fail.
    pub(super) retries: u32,
}

/// An origin read in sequential passes; see the module docs.
pub struct StreamOrigin {
    shared: Arc<Shared>,
}

struct Shared {
    identity: OriginIdentity,
    digest: Option<ContentDigest>,
    spool: Arc<File>,
    start: StartPass,
    opts: StreamOptions,
    stats: Arc<Stats>,
    state: Mutex<State>,
    progress: Notify,
}

#[derive(Default)]
struct State {
    /// Bytes of the image the spool has ever held (every pass writes the
    /// same bytes, checked by each pass's digest).
    have: u64,
    /// The running pass's position.
    pos: u64,
    running: bool,
    /// Passes started so far; the running one's number.
    generation: u64,
    /// The last pass that failed for good, and why.
    failed: Option<(u64, Error)>,
    /// A complete pass did not have the published digest.
    poisoned: Option<Error>,
    /// Pages served and punched out of the spool, one bit each.
    taken: Vec<u64>,
    /// Pages below this index were rewritten by the running pass.
    restored_to: u64,
    /// The pass task, aborted with the origin.
    task: Option<tokio::task::AbortHandle>,
}

impl State {
    fn page_taken(&self, p: u64) -> bool {
        self.taken
            .get((p / 64) as usize)
            .is_some_and(|w| w & (1 << (p % 64)) != 0)
    }

    fn set_taken(&mut self, p: u64, on: bool) {
        let (i, bit) = ((p / 64) as usize, 1u64 << (p % 64));
        if on {
            if self.taken.len() <= i {
                self.taken.resize(i + 1, 0);
            }
            self.taken[i] |= bit;
        } else if let Some(w) = self.taken.get_mut(i) {
            *w &= !bit;
        }
    }

    /// Whether the spool holds every byte of `r` now.
    fn holds(&self, r: ByteRange) -> bool {
        if r.end() > self.have {
            return false;
        }
        let first = r.offset / PAGE;
        let last = (r.end() - 1) / PAGE;
        (first..=last).all(|p| !self.page_taken(p))
    }
}

impl StreamOrigin {
    /// Start the first pass of `identity`'s object; `digest` is what a
    /// complete pass must hash to.
    pub(super) fn start(
        identity: OriginIdentity,
        digest: Option<ContentDigest>,
        start: StartPass,
        opts: StreamOptions,
        stats: Arc<Stats>,
    ) -> Result<StreamOrigin> {
        let spool = Arc::new(spool_file(&opts.spool_dir, &identity.locator)?);
        let shared = Arc::new(Shared {
            identity,
            digest,
            spool,
            start,
            opts,
            stats,
            state: Mutex::new(State::default()),
            progress: Notify::new(),
        });
        Shared::begin_pass(&shared, &mut shared.lock());
        Ok(StreamOrigin { shared })
    }
}

/// A new spool file in `dir`, unlinked at once: nothing is left behind
/// however the process ends.
fn spool_file(dir: &Path, locator: &str) -> Result<File> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("creating spool directory {}", dir.display()), e))?;
    let path = dir.join(format!(
        "spool-{}-{:x}",
        std::process::id(),
        crate::util::fnv64(locator.as_bytes())
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
    ));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| Error::io(format!("creating spool file {}", path.display()), e))?;
    std::fs::remove_file(&path)
        .map_err(|e| Error::io(format!("unlinking spool file {}", path.display()), e))?;
    Ok(f)
}

impl Drop for StreamOrigin {
    fn drop(&mut self) {
        if let Some(t) = self.shared.lock().task.take() {
            t.abort();
        }
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn locator(&self) -> &str {
        &self.identity.locator
    }

    /// Start a pass (the caller saw none running).
    fn begin_pass(this: &Arc<Shared>, st: &mut State) {
        st.generation += 1;
        st.running = true;
        st.pos = 0;
        st.restored_to = 0;
        let generation = st.generation;
        let s = this.clone();
        let h = tokio::spawn(async move { s.pass(generation).await });
        st.task = Some(h.abort_handle());
    }

    /// One pass, retried from the start while it fails in a way that may
    /// pass.
    async fn pass(self: Arc<Self>, generation: u64) {
        let mut attempt = 0u32;
        loop {
            let res = self.pass_once().await;
            let e = match res {
                Ok(()) => {
                    self.lock().running = false;
                    self.progress.notify_waiters();
                    tracing::info!(origin = %self.locator(), "sequential pass complete");
                    return;
                }
                Err(e) => e,
            };
            let again = matches!(e.kind(), ErrorKind::Origin | ErrorKind::TimedOut)
                && attempt < self.opts.retries;
            if again {
                attempt += 1;
                tracing::warn!(origin = %self.locator(), error = %e, attempt,
                    "sequential pass failed: starting it again from the beginning");
                tokio::time::sleep(Duration::from_millis(500 << attempt.min(5))).await;
                let mut st = self.lock();
                st.pos = 0;
                st.restored_to = 0;
                continue;
            }
            tracing::error!(origin = %self.locator(), error = %e, "sequential pass failed");
            let mut st = self.lock();
            st.running = false;
            if e.kind() == ErrorKind::OriginChanged {
                st.poisoned = Some(e.clone());
            }
            st.failed = Some((generation, e));
            drop(st);
            self.progress.notify_waiters();
            return;
        }
    }

    async fn pass_once(&self) -> Result<()> {
        let size = self.identity.size;
        let resp = (self.start)().await?;
        let status = resp.status();
        if status != reqwest::StatusCode::OK {
            let kind = if status.is_server_error() {
                ErrorKind::Origin
            } else {
                ErrorKind::OriginRefused
            };
            return Err(Error::new(
                kind,
                format!(
                    "{}: GET of the whole image: HTTP {status} (want 200)",
                    self.locator()
                ),
            ));
        }
        if let Some(n) = resp.content_length() {
            if n != size {
                return Err(Error::new(
                    ErrorKind::OriginChanged,
                    format!(
                        "{}: the whole image's Content-Length is {n}, its size is {size}",
                        self.locator()
                    ),
                ));
            }
        }
        let mut hasher = self.digest.as_ref().and_then(|d| d.hasher().ok());
        let mut resp = resp;
        let mut pos = 0u64;
        let mut buf = BytesMut::with_capacity(WRITE_CHUNK);
        loop {
            let chunk = tokio::time::timeout(self.opts.stall, resp.chunk())
                .await
                .map_err(|_| {
                    Error::new(
                        ErrorKind::TimedOut,
                        format!(
                            "{}: the whole image's body stalled at byte {} for {} s",
                            self.locator(),
                            pos + buf.len() as u64,
                            self.opts.stall.as_secs_f64()
                        ),
                    )
                })?
                .map_err(|e| {
                    Error::with_source(
                        ErrorKind::Origin,
                        format!("{}: reading the whole image", self.locator()),
                        e.without_url(),
                    )
                })?;
            let end = match &chunk {
                Some(c) => {
                    buf.extend_from_slice(c);
                    if pos + buf.len() as u64 > size {
                        return Err(Error::new(
                            ErrorKind::OriginChanged,
                            format!(
                                "{}: the whole image's body is longer than its size, {size}",
                                self.locator()
                            ),
                        ));
                    }
                    false
                }
                None => true,
            };
            if buf.len() >= WRITE_CHUNK || (end && !buf.is_empty()) {
                let data = buf.split().freeze();
                Stats::add(&self.stats.origin_bytes, data.len() as u64);
                hasher = self.write(pos, data.clone(), hasher).await?;
                pos += data.len() as u64;
                self.advance(pos);
            }
            if end {
                break;
            }
        }
        if pos != size {
            return Err(Error::new(
                ErrorKind::Origin,
                format!(
                    "{}: the whole image's body ended at byte {pos} of {size}",
                    self.locator()
                ),
            ));
        }
        if let (Some(d), Some(h)) = (&self.digest, hasher) {
            d.check(&h.finish_hex(), self.locator())?;
        }
        Ok(())
    }

    /// Write `data` at `pos` of the spool and hash it, off the runtime.
    async fn write(
        &self,
        pos: u64,
        data: Bytes,
        mut hasher: Option<super::digest::Hasher>,
    ) -> Result<Option<super::digest::Hasher>> {
        let spool = self.spool.clone();
        let locator = self.locator().to_string();
        tokio::task::spawn_blocking(move || {
            if let Some(h) = hasher.as_mut() {
                h.update(&data);
            }
            spool
                .write_all_at(&data, pos)
                .map_err(|e| Error::io(format!("{locator}: writing the spool file"), e))?;
            Ok(hasher)
        })
        .await
        .map_err(|e| Error::with_source(ErrorKind::Io, "spool write task", e))?
    }

    /// The running pass has written the image up to `pos`.
    fn advance(&self, pos: u64) {
        let mut st = self.lock();
        st.pos = pos;
        st.have = st.have.max(pos);
        // Pages the pass wrote whole are in the spool again.
        let whole = if pos == self.identity.size {
            pos.div_ceil(PAGE)
        } else {
            pos / PAGE
        };
        for p in st.restored_to..whole {
            st.set_taken(p, false);
        }
        st.restored_to = st.restored_to.max(whole);
        drop(st);
        self.progress.notify_waiters();
    }

    async fn read(self: Arc<Self>, r: ByteRange) -> Result<Bytes> {
        let mut waited_on: Option<u64> = None;
        loop {
            let notified = self.progress.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = self.lock();
                if let Some(e) = &st.poisoned {
                    return Err(e.clone());
                }
                if st.holds(r) {
                    break;
                }
                match (&st.failed, waited_on) {
                    (Some((g, e)), Some(w)) if *g >= w => return Err(e.clone()),
                    _ => {}
                }
                if !st.running {
                    Shared::begin_pass(&self, &mut st);
                }
                waited_on = Some(st.generation);
            }
            notified.await;
        }
        Stats::add(&self.stats.origin_requests, 1);
        let (spool, locator) = (self.spool.clone(), self.locator().to_string());
        let data = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; r.len as usize];
            spool
                .read_exact_at(&mut buf, r.offset)
                .map_err(|e| Error::io(format!("{locator}: reading the spool file"), e))?;
            Ok::<_, Error>(buf)
        })
        .await
        .map_err(|e| Error::with_source(ErrorKind::Io, "spool read task", e))??;
        self.take(r);
        Ok(Bytes::from(data))
    }

    /// `r` was served: the whole pages inside it leave the spool.
    fn take(&self, r: ByteRange) {
        let first = r.offset.div_ceil(PAGE);
        let end = if r.end() == self.identity.size {
            r.end().div_ceil(PAGE)
        } else {
            r.end() / PAGE
        };
        if end <= first {
            return;
        }
        {
            let mut st = self.lock();
            for p in first..end {
                st.set_taken(p, true);
            }
        }
        let len = (end * PAGE).min(self.identity.size.next_multiple_of(PAGE)) - first * PAGE;
        if let Err(e) = crate::util::punch_hole(&self.spool, first * PAGE, len) {
            // Only space is lost: the bytes are marked taken either way.
            tracing::debug!(origin = %self.locator(), error = %e, "spool: cannot punch a hole");
        }
    }
}

impl Origin for StreamOrigin {
    fn identity(&self) -> &OriginIdentity {
        &self.shared.identity
    }

    fn read_range(&self, range: ByteRange) -> BoxFuture<'_, Result<Bytes>> {
        Box::pin(self.shared.clone().read(range))
    }

    fn connections(&self) -> usize {
        1
    }

    fn content_digest(&self) -> Option<&ContentDigest> {
        self.shared.digest.as_ref()
    }

    fn sequential_only(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A one-connection-at-a-time HTTP server answering every GET with the
    /// whole of `body`, `chunk` bytes at a time with `pause` between, and
    /// cutting the first `cut` answers short halfway.
    async fn server(
        body: Arc<Vec<u8>>,
        chunk: usize,
        pause: Duration,
        cut: usize,
    ) -> (String, Arc<AtomicUsize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/img", l.local_addr().unwrap());
        let gets = Arc::new(AtomicUsize::new(0));
        let g = gets.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                let n = g.fetch_add(1, Ordering::SeqCst);
                let body = body.clone();
                tokio::spawn(async move {
                    let mut req = [0u8; 4096];
                    let _ = s.read(&mut req).await;
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    s.write_all(head.as_bytes()).await.unwrap();
                    let stop = if n < cut { body.len() / 2 } else { body.len() };
                    for c in body[..stop].chunks(chunk) {
                        if s.write_all(c).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(pause).await;
                    }
                });
            }
        });
        (url, gets)
    }

    fn origin(url: &str, size: u64, digest: Option<ContentDigest>, dir: &Path) -> StreamOrigin {
        let client = reqwest::Client::new();
        let url = url.to_string();
        let start: StartPass = Box::new(move || {
            let (c, u) = (client.clone(), url.clone());
            Box::pin(async move {
                c.get(u)
                    .send()
                    .await
                    .map_err(|e| Error::with_source(ErrorKind::Origin, "GET", e))
            })
        });
        StreamOrigin::start(
            OriginIdentity {
                locator: "glance://t".into(),
                size,
                validator: None,
            },
            digest,
            start,
            StreamOptions {
                spool_dir: dir.to_path_buf(),
                stall: Duration::from_secs(5),
                retries: 2,
            },
            Arc::new(Stats::default()),
        )
        .unwrap()
    }

    fn sha256(b: &[u8]) -> ContentDigest {
        let d = ContentDigest {
            algo: "sha256".into(),
            hex: String::new(),
        };
        let mut h = d.hasher().unwrap();
        h.update(b);
        ContentDigest {
            hex: h.finish_hex(),
            ..d
        }
    }

    fn body(n: usize) -> Arc<Vec<u8>> {
        Arc::new((0..n).map(|i| (i * 7 + i / 4096) as u8).collect())
    }

    fn dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!(
            "lazybd-stream-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_are_served_as_the_pass_goes_and_again_after_being_taken() {
        let b = body(3 * 1024 * 1024 + 123);
        let (url, gets) = server(b.clone(), 64 * 1024, Duration::from_millis(1), 0).await;
        let d = dir();
        let o = origin(&url, b.len() as u64, Some(sha256(&b)), &d);
        // The spool was unlinked at once.
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 0);
        let size = b.len() as u64;
        // The end first (GPT's backup header): waits for the whole pass.
        for (off, len) in [
            (size - 1000, 1000),
            (0, 65536),
            (65536 + 5, 4000),
            (0, size),
        ] {
            let r = ByteRange::new(off, len).unwrap();
            let got = o.read_range(r).await.unwrap();
            assert_eq!(&got[..], &b[off as usize..(off + len) as usize], "{r}");
        }
        // Everything was taken: a read of it again needs (and gets) a new pass.
        assert_eq!(gets.load(Ordering::SeqCst), 2);
        let r = ByteRange::new(100_000, 8192).unwrap();
        assert_eq!(&o.read_range(r).await.unwrap()[..], &b[100_000..108_192]);
        std::fs::remove_dir_all(&d).ok();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_broken_pass_is_started_again_and_a_wrong_digest_poisons() {
        let b = body(1024 * 1024);
        let (url, gets) = server(b.clone(), 32 * 1024, Duration::ZERO, 1).await;
        let d = dir();
        let o = origin(&url, b.len() as u64, Some(sha256(&b)), &d);
        let r = ByteRange::new(900_000, 100_000).unwrap();
        assert_eq!(&o.read_range(r).await.unwrap()[..], &b[900_000..1_000_000]);
        assert_eq!(gets.load(Ordering::SeqCst), 2, "the cut pass was retried");

        let mut wrong = sha256(&b);
        wrong.hex = "00".repeat(32);
        let (url, _) = server(b.clone(), 256 * 1024, Duration::ZERO, 0).await;
        let o = origin(&url, b.len() as u64, Some(wrong), &d);
        // The last bytes may be served before the pass has hashed them
        // (reads are served as it goes); once the digest is known, every
        // read is refused.
        let _ = o
            .read_range(ByteRange::new(b.len() as u64 - 10, 10).unwrap())
            .await;
        let mut refused = None;
        for _ in 0..100 {
            match o.read_range(ByteRange::new(0, 10).unwrap()).await {
                Err(e) => {
                    refused = Some(e);
                    break;
                }
                Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        let e = refused.expect("reads refused once the digest is known");
        assert_eq!(e.kind(), ErrorKind::OriginChanged, "poisoned: {e}");
        std::fs::remove_dir_all(&d).ok();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_body_of_another_size_is_refused() {
        let b = body(200_000);
        let (url, _) = server(b.clone(), 50_000, Duration::ZERO, 0).await;
        let d = dir();
        let o = origin(&url, 300_000, None, &d);
        let e = o
            .read_range(ByteRange::new(0, 10).unwrap())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::OriginChanged, "{e}");
        assert!(e.to_string().contains("Content-Length is 200000"), "{e}");
        std::fs::remove_dir_all(&d).ok();
    }
}
