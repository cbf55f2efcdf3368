//! Origins: where an image's bytes really live. One narrow trait, read a byte
//! range and report identity; one file per kind of origin:
//!
//! - `http`  HTTP(S) with ranged GETs: every response checked (status,
//!   Content-Range, size, validator, length), retries, hedging; also the
//!   read path of origins that are HTTP underneath (a `Target` gives each
//!   request's URL)
//! - `s3`    `s3://BUCKET/KEY`: the HTTP origin with a URL presigned per
//!   request; S3's refusals explained (region, credentials, 404)
//! - `aws`   where S3 credentials, region and endpoint come from (lazybd's
//!   options, then the AWS variables and `~/.aws` files)
//! - `swift` `swift://CONTAINER/OBJECT`: the HTTP origin with an
//!   `X-Auth-Token`, renewed after a 401
//! - `glance` `glance://IMAGE_ID`: identity from the image's metadata, bytes
//!   from ranged `/file` or, where the store cannot seek, its Swift location,
//!   or else one sequential pass (`stream`)
//! - `stream` an origin read only from its start: a spooled sequential
//!   pass serves each read once it has gone past it
//! - `openstack` tokens for both, from the environment as python-swiftclient
//!   reads it (a given token, Swift v1, Keystone v3 with its catalog)
//! - `file`  a local file (the built-in sample, tests)
//!
//! And what all of them share: `headers` (extra request headers from flags,
//! files re-read on reload, `LAZYBD_HEADERS`), `digest` (published image
//! digests checked by whoever read every byte).
//!
//! An origin never caches. Everything an origin returns has been checked
//! against what was asked (length, position, identity), so the cache above
//! can store it without second-guessing.

mod aws;
pub mod digest;
mod file;
mod glance;
pub mod headers;
mod http;
mod openstack;
mod s3;
mod stream;
mod swift;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::block::ByteRange;
use crate::error::{Error, ErrorKind, Result};
use crate::stats::Stats;

pub use aws::{CredentialSource, Given, Region, S3Endpoint, S3Options, Secret, StaticKeys};
pub use digest::ContentDigest;
pub(crate) use file::FileOrigin;
pub(crate) use http::HttpOrigin;
pub(crate) use s3::S3Origin;

use crate::device::BoxFuture;

/// What an origin is and which version of it we are looking at. Two
/// identities with the same `locator` but different `size` or `validator`
/// are different images: their blocks must never be mixed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginIdentity {
    /// `file://` and the canonical path, or the URL without credentials
    /// and signing parameters, secret values hidden and hashed in (see
    /// `http::locator`): the query names the object, a signature does not.
    pub locator: String,
    /// Image size in bytes.
    pub size: u64,
    /// ETag, else Last-Modified, else `None` (changes then go undetected,
    /// which is logged as a warning at open).
    pub validator: Option<String>,
}

impl std::fmt::Display for OriginIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({} bytes, validator {})",
            self.locator,
            self.size,
            self.validator.as_deref().unwrap_or("none")
        )
    }
}

/// A read-only source of image bytes.
pub trait Origin: Send + Sync + 'static {
    /// The identity learned when the origin was opened.
    fn identity(&self) -> &OriginIdentity;

    /// Read exactly `range.len` bytes at `range.offset`.
    ///
    /// The caller guarantees `range` is non-empty and within
    /// `identity().size`. Implementations MUST return exactly `range.len`
    /// bytes of this identity's content or an error; a response that does not
    /// match what was asked (position, length, validator) is an error, never
    /// data. `ErrorKind::OriginChanged` means the identity no longer holds.
    fn read_range(&self, range: ByteRange) -> BoxFuture<'_, Result<Bytes>>;

    /// Parallel requests this origin allows (background work takes half).
    fn connections(&self) -> usize {
        8
    }

    /// A small file published beside the image, named by the image's own
    /// name plus `suffix` (e.g. `IMAGE.lazybd-profile`), at most `max`
    /// bytes. `Ok(None)` when there is none; never cached, never part of
    /// the image.
    fn sidecar(&self, _suffix: &str, _max: u64) -> BoxFuture<'_, Result<Option<Bytes>>> {
        Box::pin(async { Ok(None) })
    }

    /// The digest of the whole image as its origin publishes it (Glance's
    /// `os_hash_value`), for a reader that saw every byte to check.
    fn content_digest(&self) -> Option<&ContentDigest> {
        None
    }

    /// The image's format as its origin's metadata names it (Glance's
    /// `disk_format`: `raw`, `qcow2`, `iso`, ...).
    fn disk_format(&self) -> Option<&str> {
        None
    }

    /// A size no fetch of the cache above should cross a multiple of.
    /// Peers (`peer::client`) answer for 1 MiB units, each from its owner:
    /// a fetch of two units waiting on two owners could wait on a fetch of
    /// the other host's that waits on this one.
    fn fetch_unit(&self) -> Option<u64> {
        None
    }

    /// Whether the origin can only be read from its start (one sequential
    /// pass, `stream.rs`): the daemon then hydrates the image at once, in
    /// the pass's order.
    fn sequential_only(&self) -> bool {
        false
    }

    /// Re-read what may have changed since the origin was opened (header
    /// files, credentials files), for the requests made from now on. On
    /// error the previous values stay in use. Returns whether anything
    /// was re-read.
    fn reload(&self) -> Result<bool> {
        Ok(false)
    }
}

/// Hedging: a request still unanswered after a delay gets a twin (when a
/// connection is free); the first correct answer wins. A stalled connection
/// or an overloaded origin node then costs one delay, not a timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hedge {
    Off,
    After(Duration),
    /// Twice the origin's recent 95th percentile latency (at least 50 ms),
    /// once 32 requests have been timed; no hedging before that.
    Auto,
}

impl std::str::FromStr for Hedge {
    type Err = String;
    /// "auto", "off" / "0", or milliseconds.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Hedge::Auto),
            "off" | "0" => Ok(Hedge::Off),
            ms => ms
                .parse::<u64>()
                .map(|m| Hedge::After(Duration::from_millis(m)))
                .map_err(|_| format!("{s:?}: expected auto, off or milliseconds")),
        }
    }
}

/// Which HTTP proxy origin requests go through (a caching proxy, a P2P
/// engine's HTTP proxy such as Dragonfly's dfdaemon). Whatever comes back
/// through it gets every check a direct answer gets.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ProxySetting {
    /// `HTTPS_PROXY` / `HTTP_PROXY` / `ALL_PROXY` by the URL's scheme
    /// (lower-case names too; the upper-case one first, as reqwest reads
    /// them), `NO_PROXY` honoured: what curl and the AWS and OpenStack
    /// tools do.
    #[default]
    FromEnv,
    /// Direct, whatever the environment says.
    Off,
    /// This proxy for every origin request (`NO_PROXY` still honoured).
    Url(String),
}

impl std::str::FromStr for ProxySetting {
    type Err = String;
    /// "none", or an `http://` / `https://` proxy URL.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if s == "none" {
            return Ok(ProxySetting::Off);
        }
        match reqwest::Url::parse(s) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {
                Ok(ProxySetting::Url(s.to_string()))
            }
            _ => Err(format!(
                "{:?}: expected 'none' or an http:// or https:// proxy URL",
                http::redact_userinfo(s)
            )),
        }
    }
}

/// How to reach an origin; from the CLI or config.
#[derive(Debug, Clone)]
pub struct OriginOptions {
    /// Extra request headers (an auth token): fixed ones and files
    /// re-read on reload.
    pub headers: headers::HeaderSource,
    /// Bound on parallel requests to the origin.
    pub connections: usize,
    /// Deadline for one request, body included.
    pub request_timeout: Duration,
    /// Most retries of a failed request (transient failures only); the
    /// default is as many as `deadline` allows.
    pub retries: u32,
    /// How long one read may keep trying (retries with backoff, hedges)
    /// before it fails with EIO: a short origin outage is ridden out, a
    /// long one is reported.
    pub deadline: Duration,
    /// When to send a second copy of a slow request.
    pub hedge: Hedge,
    /// Extra PEM CA certificates to trust for https:// origins (a private CA),
    /// on top of the built-in web PKI roots.
    pub ca_file: Option<std::path::PathBuf>,
    /// What lazybd was told about S3 (`s3://` origins); the AWS environment
    /// fills in the rest.
    pub s3: S3Options,
    /// The HTTP proxy of origin requests.
    pub proxy: ProxySetting,
    /// Where an origin that can only be read from its start spools what
    /// its pass brought until a read takes it (`stream.rs`); the cache
    /// directory's `spool/` for a server, the temp directory if `None`.
    pub spool_dir: Option<std::path::PathBuf>,
}

impl Default for OriginOptions {
    fn default() -> Self {
        OriginOptions {
            headers: headers::HeaderSource::default(),
            connections: 16,
            request_timeout: Duration::from_secs(30),
            retries: u32::MAX,
            deadline: Duration::from_secs(30),
            hedge: Hedge::Auto,
            ca_file: None,
            s3: S3Options::default(),
            proxy: ProxySetting::default(),
            spool_dir: None,
        }
    }
}

/// The locator an `http://`, `https://` or `s3://` origin spec gets (None
/// for other specs), without opening it: to find an image's cache by its URL.
pub fn url_locator(spec: &str) -> Option<String> {
    let lower = spec.to_ascii_lowercase();
    if lower.starts_with("s3://") {
        return s3::locator(spec);
    }
    if lower.starts_with("swift://") {
        return swift::locator(spec);
    }
    if lower.starts_with("glance://") {
        return glance::locator(spec);
    }
    if !(lower.starts_with("http://") || lower.starts_with("https://")) {
        return None;
    }
    reqwest::Url::parse(spec).ok().map(|u| http::locator(&u))
}

/// Open the origin named by `spec`: `http://`, `https://`, `s3://`,
/// `file://` or a path.
pub async fn open(spec: &str, opts: &OriginOptions, stats: Arc<Stats>) -> Result<Arc<dyn Origin>> {
    let lower = spec.to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        Ok(Arc::new(HttpOrigin::open(spec, opts, stats).await?))
    } else if lower.starts_with("s3://") {
        Ok(Arc::new(S3Origin::open(spec, opts, stats).await?))
    } else if lower.starts_with("swift://") {
        Ok(Arc::new(swift::SwiftOrigin::open(spec, opts, stats).await?))
    } else if lower.starts_with("glance://") {
        Ok(Arc::new(
            glance::GlanceOrigin::open(spec, opts, stats).await?,
        ))
    } else if let Some(path) = spec.strip_prefix("file://") {
        Ok(Arc::new(FileOrigin::open(path.as_ref(), stats)?))
    } else if lower.contains("://") {
        Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "unsupported origin {spec:?}: use http://, https://, s3://, swift://, \
                 glance://, file:// or a path"
            ),
        ))
    } else {
        Ok(Arc::new(FileOrigin::open(spec.as_ref(), stats)?))
    }
}
