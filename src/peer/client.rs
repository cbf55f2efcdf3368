//! Fetching from peers: [`Peered`], the origin layer that asks each unit's
//! owner first and the origin when that fails. See `peer/mod.rs`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use reqwest::header::{AUTHORIZATION, CONTENT_RANGE, RANGE};
use reqwest::StatusCode;

use super::{image_key, owner, PeerOptions, UNIT};
use crate::block::ByteRange;
use crate::device::BoxFuture;
use crate::error::{Error, ErrorKind, Result};
use crate::manifest::Manifest;
use crate::origin::{ContentDigest, Origin, OriginIdentity};
use crate::stats::Stats;

/// How long a peer that failed is not asked: a peer that sent bytes not
/// matching the manifest is a liar for a long time; one that timed out or
/// refused a connection may be back soon (it may be starting), so it is
/// avoided for a time that doubles with each failure in a row, up to a
/// bound.
const AVOID_LIAR: Duration = Duration::from_secs(600);
const AVOID_FAILED: Duration = Duration::from_millis(250);
const AVOID_MAX: Duration = Duration::from_secs(30);
/// Largest peer answer accepted (a cache fetch is at most a few MiB).
const MAX_ANSWER: u64 = 64 << 20;

/// The peers of this host, shared by every image's [`Peered`].
pub struct PeerSet {
    own: Option<String>,
    list: RwLock<Vec<String>>,
    file: Option<std::path::PathBuf>,
    fixed: Vec<String>,
    token: Option<String>,
    client: reqwest::Client,
    trust_unverified: bool,
    /// Peers not asked until a time, and their failures in a row.
    avoided: Mutex<HashMap<String, (Instant, u32)>>,
}

impl PeerSet {
    /// The peers `o` names; `None` if this host fetches from none.
    pub fn new(o: &PeerOptions) -> Result<Option<Arc<PeerSet>>> {
        if !o.fetches() {
            return Ok(None);
        }
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(1).min(o.timeout))
            .timeout(o.timeout)
            // A peer never redirects; a token must not follow one.
            .redirect(reqwest::redirect::Policy::none())
            // Peers are on the cluster network: no proxy.
            .no_proxy()
            .pool_max_idle_per_host(16)
            .build()
            .map_err(|e| Error::with_source(ErrorKind::InvalidInput, "peer HTTP client", e))?;
        let set = PeerSet {
            own: o.own_url(),
            list: RwLock::new(Vec::new()),
            file: o.peers_file.clone(),
            fixed: o.peers.iter().map(|p| super::normalize(p)).collect(),
            token: o.token.clone(),
            client,
            trust_unverified: o.trust_unverified,
            avoided: Mutex::new(HashMap::new()),
        };
        set.reload()?;
        Ok(Some(Arc::new(set)))
    }

    /// Re-read the peers file (the fixed list stays).
    pub fn reload(&self) -> Result<bool> {
        let mut list = self.fixed.clone();
        if let Some(f) = &self.file {
            let text = std::fs::read_to_string(f)
                .map_err(|e| Error::io(format!("peers file {}", f.display()), e))?;
            list.extend(super::parse_peers_file(&text));
        }
        list.sort();
        list.dedup();
        let n = list.len();
        *self.list.write().unwrap_or_else(|p| p.into_inner()) = list;
        tracing::info!(
            peers = n,
            own = self.own.as_deref().unwrap_or("none"),
            "peers list read"
        );
        Ok(self.file.is_some())
    }

    fn avoided(&self, peer: &str) -> bool {
        let a = self.avoided.lock().unwrap_or_else(|p| p.into_inner());
        a.get(peer)
            .is_some_and(|(until, _)| *until > Instant::now())
    }

    /// `peer` failed: avoid it for `base`, doubled for each failure in a
    /// row before this one (at most [`AVOID_MAX`] unless `base` is more).
    fn avoid(&self, peer: &str, base: Duration) -> Duration {
        let mut a = self.avoided.lock().unwrap_or_else(|p| p.into_inner());
        let e = a.entry(peer.to_string()).or_insert((Instant::now(), 0));
        let d = (base * 2u32.saturating_pow(e.1.min(16))).min(AVOID_MAX.max(base));
        *e = (Instant::now() + d, e.1.saturating_add(1));
        d
    }

    /// `peer` answered: its failures are forgotten.
    fn answered(&self, peer: &str) {
        let mut a = self.avoided.lock().unwrap_or_else(|p| p.into_inner());
        if a.contains_key(peer) {
            a.remove(peer);
        }
    }

    /// The peer to ask for `unit` of `key`: its owner, unless that is this
    /// host or a peer being avoided (then the origin).
    fn ask_for(&self, key: &str, unit: u64) -> Option<String> {
        let list = self.list.read().unwrap_or_else(|p| p.into_inner());
        let o = owner(&list, key, unit)?;
        if Some(o) == self.own.as_deref() || self.avoided(o) {
            return None;
        }
        Some(o.to_string())
    }
}

/// An image's origin with its units fetched from their owners first.
pub struct Peered {
    inner: Arc<dyn Origin>,
    manifest: Option<Arc<Manifest>>,
    peers: Arc<PeerSet>,
    key: String,
    stats: Arc<Stats>,
}

impl Peered {
    /// `inner` (the origin, checked by `manifest` if there is one) with
    /// peers first; `inner` itself when peers may not be used for it.
    pub fn wrap(
        inner: Arc<dyn Origin>,
        manifest: Option<Arc<Manifest>>,
        peers: Arc<PeerSet>,
        stats: Arc<Stats>,
    ) -> Arc<dyn Origin> {
        let id = inner.identity();
        if manifest.is_none() && !peers.trust_unverified {
            tracing::warn!(image = %id.locator,
                "no manifest for this image: its blocks are not fetched from peers (give a \
                 manifest, or --peer-trust to take peers' bytes unchecked)");
            return inner;
        }
        if inner.sequential_only() {
            return inner;
        }
        let key = image_key(id);
        tracing::info!(image = %id.locator, key = %key, verified = manifest.is_some(),
            "fetching this image's blocks from peers first");
        Arc::new(Peered {
            inner,
            manifest,
            peers,
            key,
            stats,
        })
    }

    async fn read(&self, r: ByteRange) -> Result<Bytes> {
        // Runs of consecutive units with the same source.
        let mut runs: Vec<(ByteRange, Option<String>)> = Vec::new();
        let mut at = r.offset;
        while at < r.end() {
            let unit = at / UNIT;
            let end = ((unit + 1) * UNIT).min(r.end());
            let who = self.peers.ask_for(&self.key, unit);
            match runs.last_mut() {
                Some((last, w)) if *w == who => last.len += end - at,
                _ => runs.push((
                    ByteRange {
                        offset: at,
                        len: end - at,
                    },
                    who,
                )),
            }
            at = end;
        }
        if let [(whole, None)] = runs.as_slice() {
            return self.inner.read_range(*whole).await;
        }
        let parts = crate::util::join_all(
            runs.iter()
                .map(|(range, who)| {
                    Box::pin(self.part(*range, who.clone())) as BoxFuture<'_, Result<Bytes>>
                })
                .collect(),
        )
        .await;
        let mut out = BytesMut::with_capacity(r.len as usize);
        for p in parts {
            out.extend_from_slice(&p?);
        }
        Ok(out.freeze())
    }

    /// One run: from the peer `who`, else (or when that fails) the origin.
    async fn part(&self, range: ByteRange, who: Option<String>) -> Result<Bytes> {
        if let Some(peer) = who {
            match self.fetch_peer(&peer, range).await {
                Ok(b) => {
                    Stats::add(&self.stats.peer_bytes, b.len() as u64);
                    self.peers.answered(&peer);
                    return Ok(b);
                }
                Err((e, avoid)) => {
                    Stats::add(&self.stats.peer_failures, 1);
                    let d = if avoid.is_zero() {
                        avoid
                    } else {
                        self.peers.avoid(&peer, avoid)
                    };
                    tracing::warn!(peer = %peer, range = %range, error = %e,
                        avoid_ms = d.as_millis() as u64, "peer fetch failed: reading the origin instead");
                }
            }
        }
        self.inner.read_range(range).await
    }

    /// `range` from `peer`, checked (status, Content-Range, length, and the
    /// manifest's digests); on error also how long to avoid the peer.
    async fn fetch_peer(
        &self,
        peer: &str,
        range: ByteRange,
    ) -> std::result::Result<Bytes, (Error, Duration)> {
        let size = self.inner.identity().size;
        // Whole manifest blocks: the unit a digest checks.
        let (wide, first) = match &self.manifest {
            Some(m) => m.widen(range),
            None => (range, 0),
        };
        let failed = |why: String| (Error::new(ErrorKind::Origin, why), AVOID_FAILED);
        let url = format!("{peer}/v1/images/{}", self.key);
        let mut req = self
            .peers
            .client
            .get(&url)
            .header(RANGE, format!("bytes={}-{}", wide.offset, wide.end() - 1));
        if let Some(t) = &self.peers.token {
            req = req.header(AUTHORIZATION, format!("Bearer {t}"));
        }
        let resp = req.send().await.map_err(|e| {
            // Refused at once (the peer's host is up, lazybd is not, or not
            // yet): asking again costs a round trip, so the peer is not
            // avoided and is used as soon as it listens. A timeout costs
            // the whole deadline: that peer is avoided.
            let avoid = if e.is_connect() && !e.is_timeout() {
                Duration::ZERO
            } else {
                AVOID_FAILED
            };
            (
                Error::new(ErrorKind::Origin, format!("GET {url}: {}", e.without_url())),
                avoid,
            )
        })?;
        if resp.status() != StatusCode::PARTIAL_CONTENT {
            // 404: the peer does not cache the image (yet); not its fault.
            let avoid = AVOID_FAILED;
            return Err((
                Error::new(
                    ErrorKind::Origin,
                    format!("GET {url} {wide}: HTTP {}", resp.status()),
                ),
                avoid,
            ));
        }
        let want_cr = format!("bytes {}-{}/{size}", wide.offset, wide.end() - 1);
        let cr = resp
            .headers()
            .get(CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if cr != want_cr {
            return Err((
                Error::new(
                    ErrorKind::Origin,
                    format!("GET {url}: Content-Range {cr:?}, asked for {want_cr:?}"),
                ),
                AVOID_LIAR,
            ));
        }
        let mut resp = resp;
        let mut body = BytesMut::with_capacity(wide.len as usize);
        while let Some(c) = resp
            .chunk()
            .await
            .map_err(|e| failed(format!("GET {url}: {}", e.without_url())))?
        {
            if body.len() as u64 + c.len() as u64 > wide.len.min(MAX_ANSWER) {
                return Err((
                    Error::new(
                        ErrorKind::Origin,
                        format!("GET {url}: a longer body than asked"),
                    ),
                    AVOID_LIAR,
                ));
            }
            body.extend_from_slice(&c);
        }
        if body.len() as u64 != wide.len {
            return Err(failed(format!(
                "GET {url}: {} bytes of {}",
                body.len(),
                wide.len
            )));
        }
        let body = body.freeze();
        if let Some(m) = &self.manifest {
            let (m2, b2) = (m.clone(), body.clone());
            let bad = tokio::task::spawn_blocking(move || m2.first_mismatch(first, &b2))
                .await
                .map_err(|e| failed(format!("manifest check task: {e}")))?;
            if let Some(k) = bad {
                Stats::add(&self.stats.manifest_failures, 1);
                tracing::error!(peer = %peer, image = %self.inner.identity().locator, block = k,
                    "a peer sent bytes that do not match the manifest: not used, the peer avoided");
                return Err((
                    Error::new(
                        ErrorKind::OriginChanged,
                        format!("peer {peer}: block {k} does not match the manifest"),
                    ),
                    AVOID_LIAR,
                ));
            }
        }
        let at = (range.offset - wide.offset) as usize;
        Ok(body.slice(at..at + range.len as usize))
    }
}

impl Origin for Peered {
    fn identity(&self) -> &OriginIdentity {
        self.inner.identity()
    }

    fn read_range(&self, range: ByteRange) -> BoxFuture<'_, Result<Bytes>> {
        Box::pin(self.read(range))
    }

    fn connections(&self) -> usize {
        self.inner.connections()
    }

    fn fetch_unit(&self) -> Option<u64> {
        Some(UNIT)
    }

    fn sidecar(&self, suffix: &str, max: u64) -> BoxFuture<'_, Result<Option<Bytes>>> {
        self.inner.sidecar(suffix, max)
    }

    fn content_digest(&self) -> Option<&ContentDigest> {
        self.inner.content_digest()
    }

    fn disk_format(&self) -> Option<&str> {
        self.inner.disk_format()
    }

    fn reload(&self) -> Result<bool> {
        let a = self.inner.reload()?;
        Ok(self.peers.reload()? || a)
    }
}
